"""Time one fit of the ``learned`` merge method on the real model and print the fitted coefficients (no evaluation).

Base ``smollm2-135m``, the shipped ``passage_qa`` (utility) and ``safety`` adapters, the method's defaults unless
``key=value`` arguments override them; the cache goes to ``OUT`` (a second run with the same settings is a hit):

    python scripts/learned_fit_timing.py OUT [steps=24 lr=0.05 ...]
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.merge import MergeContext, get_method
from sst_merge.models import load_model

ADAPTERS = Path(__file__).resolve().parents[1] / "src" / "sst_merge" / "resources" / "adapters"


def main(out: str, *overrides: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sst_merge.merge.learned_fit").setLevel(logging.DEBUG)  # one line per step, with its time
    ads = [LoraAdapter.load(ADAPTERS / "passage_qa"), LoraAdapter.load(ADAPTERS / "safety")]
    loads: list[float] = []

    def loader():
        t = time.perf_counter()
        model = load_model("smollm2-135m")
        loads.append(time.perf_counter() - t)
        return model

    ctx = MergeContext(adapters=ads, weights=[1.0, 1.0], roles=["utility", "safety"], modules=sorted(ads[0].modules),
                       base_model="smollm2-135m", load_model=loader, workdir=out, show_progress=False)  # fmt: skip
    method = get_method("learned")
    params = method.Params.model_validate({k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)})
    t0 = time.perf_counter()
    method.check(params, ctx)
    t1 = time.perf_counter()
    method.merge(params, ctx)
    t2 = time.perf_counter()
    d = ctx.diagnostics["learned"]
    c = torch.tensor(d["coefficients"])
    print(f"threads {torch.get_num_threads()} check {t1 - t0:.1f}s merge {t2 - t1:.1f}s (model load "
          f"{sum(loads):.1f}s, fit {d['fit_seconds']:.1f}s, {d['fit']}) coefficients {c.numel()} data "
          f"{ {k: v['n'] for k, v in d['data'].items()} }")  # fmt: skip
    layer = [int(g.split("layers.")[1].split(".")[0]) if "layers." in g else -1 for g in d["groups"]]
    for name, row in zip(d["adapters"], c, strict=True):
        print(f"{Path(name).name}: mean {row.mean():.3f} min {row.min():.3f} max {row.max():.3f}")
        for proj in ("q_proj", "v_proj"):
            idx = sorted((j for j, g in enumerate(d["groups"]) if g.endswith(proj)), key=lambda j: layer[j])
            if idx:
                print(f"  {proj} by layer: " + " ".join(f"{float(row[j]):.2f}" for j in idx))
    curve = d["loss_curve"]
    k = min(5, len(curve))
    if curve:
        first, last = (sum(x["loss"] for x in part) / k for part in (curve[:k], curve[-k:]))
        print(f"objective (minibatch) mean of first {k} steps {first:.3f}, last {k} {last:.3f}")
    Path(out, "learned_diagnostics.json").write_text(json.dumps(d))


if __name__ == "__main__":
    main(*sys.argv[1:])
