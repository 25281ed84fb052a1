"""Check: ``sst-merge train`` with a shipped adapter's recorded settings reproduces an adapter whose evaluation
matches the shipped one's (the retrained adapter's value lies inside the shipped adapter's 95% interval).

Slow (it trains each adapter again: minutes per adapter on a CPU), so it is a benchmark, not a unit test. Both
adapters are evaluated alone on the base model with the demo's settings (exp1, minimal mode: the task's held-out
items for passage_qa, HarmBench refusal for safety); the shipped adapter's evaluation is read from the demo's
evaluation cache when the demo has run.

Usage::

    python bench/shipped_adapters.py --workdir /tmp/reship --json bench/results/shipped_adapters.json
    python bench/shipped_adapters.py --tasks passage_qa
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import emit

from sst_merge.experiments import resolve_config
from sst_merge.experiments.runner import AdapterRef, ModelSpec, Runner
from sst_merge.models.embedded import cache_dir
from sst_merge.train import train_adapter
from sst_merge.train.shipped import SHIPPED_ROOT, SHIPPED_TASKS, file_problems, read_manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(SHIPPED_TASKS), choices=SHIPPED_TASKS)
    parser.add_argument("--workdir", default=None, help="where the retrained adapters go (default: a temp dir)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sst-merge-reship-"))
    report: dict = {"tasks": {}}
    ok = True
    for task in args.tasks:
        shipped = SHIPPED_ROOT / task
        problems = file_problems(shipped)
        if problems:
            raise SystemExit(f"{shipped}: files do not match the manifest: {problems}")
        manifest = read_manifest(shipped)
        settings = dict(manifest["settings"])
        t0 = time.perf_counter()
        retrained = train_adapter(manifest["model"], task, out_dir=work / task, force=True, use_cache=False,
                                  **settings)  # fmt: skip
        train_seconds = time.perf_counter() - t0
        cfg = resolve_config("minimal", {"experiment": "exp1", "model": manifest["model"],
                                         "cache_dir": str(cache_dir() / "evals"), "seed": manifest["seed"]})  # fmt: skip
        runner = Runner(cfg, work / "run")
        role, metric = ("safety", "refusal") if task == "safety" else ("utility", f"task:{task}")
        a = runner.evaluate(ModelSpec(task if task == "safety" else "utility", (AdapterRef(str(shipped), 1.0, role),)))
        b = runner.evaluate(ModelSpec(f"retrained {task}", (AdapterRef(str(retrained), 1.0, role),)))
        lo, hi = a[metric].ci
        inside = lo <= b[metric].value <= hi
        ok &= inside
        report["tasks"][task] = {
            "command": manifest["command"], "settings": settings, "metric": metric,
            "shipped": {"value": a[metric].value, "ci95": [lo, hi], "n": a[metric].n},
            "retrained": {"value": b[metric].value, "ci95": list(b[metric].ci or ()), "n": b[metric].n,
                          "train_seconds": round(train_seconds, 1)},
            "retrained_inside_shipped_interval": inside,
        }  # fmt: skip
    report["all_inside"] = ok
    emit(report, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
