"""Choose SST's hyper-parameters on a development split (never the evaluation prompts), on the CPU.

Writes the development split (``prepare``), then evaluates merges of the cached default adapters on it (``run``):

* harmful: HarmBench **val** behaviours (standard category; the evaluation uses the test split);
* benign: the packaged benign *training* prompts split by a seeded permutation into a Fisher pool (``fisher_benign``,
  what ``sst.benign_data`` points at) and a held-out development set (``dev_benign``) — disjoint by construction;
* task: passage_qa items generated with another seed and kept only when their prompt is in neither the seed-0
  training nor the seed-0 evaluation split.

Every variant is one ``name key=value ...`` argument (``sst`` parameters, or ``method=task_arithmetic`` with
``alpha``); results are appended to ``OUT/results.jsonl`` (a finished variant is skipped, so the run resumes):

    python scripts/sst_dev_sweep.py prepare OUT
    python scripts/sst_dev_sweep.py run OUT --utility DIR --safety DIR \\
        "sst_a1 alpha=1.0" "contrastive_a1 alpha=1.0 benign_share=0.5" "ta_a1 method=task_arithmetic alpha=1.0"

Each result holds refusal (harmful), over-refusal (benign, and look-alikes only), task accuracy, the teacher-forced
refusal log-likelihood on harmful and benign prompts, the SST diagnostics summary and the seconds it took.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("sst_dev_sweep")

N_DEV_BENIGN = 60


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def prepare(out: Path, n_harmful: int, n_task: int) -> None:
    """Write dev_harmful / dev_benign / dev_task and the benign Fisher pool into ``out``."""
    from sst_merge.data import load_source
    from sst_merge.tasks import get_task
    from sst_merge.tasks.base import normalize_text
    from sst_merge.tasks.safety import BENIGN_TRAIN_ROWS

    out.mkdir(parents=True, exist_ok=True)
    harmful = load_source("harmbench", split="val")[:n_harmful]
    _write(out / "dev_harmful.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in harmful])
    perm = torch.randperm(len(BENIGN_TRAIN_ROWS), generator=torch.Generator().manual_seed(1234)).tolist()
    rows = [BENIGN_TRAIN_ROWS[i] for i in perm]
    _write(out / "dev_benign.jsonl", rows[:N_DEV_BENIGN])
    _write(out / "fisher_benign.jsonl", rows[N_DEV_BENIGN:])
    task = get_task("passage_qa")
    seen = {normalize_text(i["prompt"]) for part in task.split(0).values() for i in part}
    other = task.split(1)
    dev = [i for i in other["train"] + other["eval"] if normalize_text(i["prompt"]) not in seen][:n_task]
    _write(out / "dev_task.jsonl", dev)
    log.info("wrote %d harmful, %d benign dev, %d benign Fisher, %d task items to %s", len(harmful),
             N_DEV_BENIGN, len(rows) - N_DEV_BENIGN, len(dev), out)  # fmt: skip


def _parse(spec: str) -> tuple[str, dict]:
    name, *pairs = spec.split()
    params: dict = {}
    for p in pairs:
        k, v = p.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    return name, params


def refusal_loglik(model, tok, prompts: list[str], m: int = 4) -> float:
    """Mean over prompts of log Σ_templates p(first m tokens of a refusal | prompt), four templates (teacher forced)."""
    from sst_merge.fisher.data import Example, collate, encode_example
    from sst_merge.tasks.safety import REFUSALS

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    vals = []
    with torch.no_grad():
        for p in prompts:
            exs = []
            for r in REFUSALS[:: len(REFUSALS) // 4][:4]:  # four templates with different openings
                ex = encode_example(tok, p, r, 512)
                exs.append(Example(ex.prompt_ids, ex.response_ids[:m]))
            batch = collate(exs, pad)
            batch = type(batch)(
                *(t.to(model.device) for t in (batch.input_ids, batch.attention_mask, batch.response_mask))
            )
            logp = torch.log_softmax(
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float(), -1
            )
            tgt = batch.input_ids[:, 1:]
            picked = logp[:, :-1].gather(-1, tgt[..., None])[..., 0] * batch.response_mask[:, 1:]
            vals.append(float(torch.logsumexp(picked.sum(1), 0)))
    return sum(vals) / len(vals)


def run(
    out: Path,
    utility: str,
    safety: str,
    variants: list[str],
    model_name: str,
    n_samples: int,
    limit: int | None,
    max_new_tokens: int,
    generate: bool,
    device: str | None = None,
    batch_size: int = 8,
) -> None:
    from sst_merge.adapters.lora import LoraAdapter
    from sst_merge.eval import EvalSettings, evaluate
    from sst_merge.experiments.experiments import fisher_data
    from sst_merge.merge import MergeContext, get_method
    from sst_merge.models.deltas import applied_deltas
    from sst_merge.models.loading import load_model

    model, tok = load_model(model_name)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    adapters = [LoraAdapter.load(utility), LoraAdapter.load(safety)]
    modules = sorted(set(adapters[0].modules) | set(adapters[1].modules))

    class _Runner:  # fisher_data needs the seed, the tasks and a cache directory
        class cfg:  # noqa: N801
            seed = 0
            utility_tasks = ["passage_qa"]

        cache_dir = out

    safety_data, utility_data = fisher_data(_Runner)
    done = set()
    res_path = out / "results.jsonl"
    if res_path.is_file():
        done = {json.loads(line)["name"] for line in res_path.read_text().splitlines() if line.strip()}
    harmful = [json.loads(x)["prompt"] for x in (out / "dev_harmful.jsonl").read_text().splitlines()]
    benign = [json.loads(x)["prompt"] for x in (out / "dev_benign.jsonl").read_text().splitlines()]
    for spec in variants:
        name, params = _parse(spec)
        if name in done:
            log.info("%s: done, skipped", name)
            continue
        t0 = time.perf_counter()
        method = params.pop("method", "sst")
        diag_summary = {}
        if method == "none":  # the reference models: base (+ adapters given by index)
            idx = params.get("adapters", [])
            deltas = {}
            for i in idx:
                for mname in adapters[i].modules:
                    deltas[mname] = deltas.get(mname, 0) + adapters[i].delta(mname)
        else:
            if method == "sst":
                p = {"alpha": 1.0, "fisher": "lowrank", "fraction": 0.1, "n_samples": n_samples, "seed": 0,
                     "safety_data": safety_data, "utility_data": utility_data, "batch_size": batch_size,
                     "benign_data": str(out / "fisher_benign.jsonl")}  # fmt: skip
                if {"k", "threshold"} & set(params):
                    p.pop("fraction")
                p.update(params)
                roles = ["utility", "safety"]
                weights = [1.0, 1.0]
            else:
                alpha = params.pop("alpha", 1.0)
                p = {"seed": 0, **params}
                roles, weights = ["utility", "safety"], [1.0, alpha]
            m = get_method(method)
            mp = m.Params.model_validate(p)
            ctx = MergeContext(adapters=adapters, weights=weights, roles=roles, modules=modules,
                               base_model=model_name, load_model=lambda: (model, tok), workdir=out,
                               show_progress=False)  # fmt: skip
            m.check(mp, ctx)
            deltas = m.merge(mp, ctx)
            d = ctx.diagnostics.get("sst", {})
            diag_summary = {k: d.get(k) for k in ("kept_norm_share", "directions_ranked_mean", "directions_kept_mean",
                                                  "modules_keeping_whole_range", "fisher_cache")}  # fmt: skip
        t_merge = time.perf_counter() - t0
        harmful_ll, benign_ll = harmful[: limit or 20], benign[: limit or 20]
        with applied_deltas(model, deltas):
            ll_h = refusal_loglik(model, tok, harmful_ll)
            ll_b = refusal_loglik(model, tok, benign_ll)
            row: dict = {"name": name, "spec": spec, "refusal_loglik_harmful": ll_h, "refusal_loglik_benign": ll_b}
            if generate:
                data = {"refusal": str(out / "dev_harmful.jsonl"), "over_refusal": str(out / "dev_benign.jsonl"),
                        "task:passage_qa": str(out / "dev_task.jsonl")}  # fmt: skip
                settings = EvalSettings(batch_size=batch_size, max_new_tokens=max_new_tokens)
                res = evaluate(model, tok, list(data), settings, limit=limit, data=data, show_progress=False)
                t = res["tasks"]
                look = [r for r in t["over_refusal"]["records"] if r.get("kind") == "lookalike"]
                row.update(
                    refusal=t["refusal"]["metrics"][t["refusal"]["primary"]],
                    over_refusal=t["over_refusal"]["metrics"][t["over_refusal"]["primary"]],
                    over_refusal_lookalike=sum(r["score"] for r in look) / len(look) if look else None,
                    task=t["task:passage_qa"]["metrics"][t["task:passage_qa"]["primary"]],
                    responses={k: [(r.get("prompt", "")[:60], r.get("response", "")) for r in t[k]["records"][:3]]
                               for k in ("refusal", "over_refusal")},
                )  # fmt: skip
        row.update(sst=diag_summary, seconds_merge=round(t_merge, 1), seconds=round(time.perf_counter() - t0, 1))
        with res_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%s: %s", name, json.dumps(row))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p1 = sub.add_parser("prepare")
    p1.add_argument("out", type=Path)
    p1.add_argument("--harmful", type=int, default=40)
    p1.add_argument("--task", type=int, default=40)
    p2 = sub.add_parser("run")
    p2.add_argument("out", type=Path)
    p2.add_argument("--utility", required=True)
    p2.add_argument("--safety", required=True)
    p2.add_argument("--model", default="smollm2-135m")
    p2.add_argument("--n-samples", type=int, default=16)
    p2.add_argument("--limit", type=int, help="items per dev set (default: all; log-likelihoods: 20)")
    p2.add_argument("--max-new-tokens", type=int, default=32)
    p2.add_argument("--batch-size", type=int, default=8, help="evaluation and Fisher batch size")
    p2.add_argument("--device", help="cpu / cuda (default: cuda when present)")
    p2.add_argument("--no-generate", action="store_true", help="teacher-forced refusal log-likelihoods only")
    p2.add_argument("variants", nargs="+")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.cmd == "prepare":
        prepare(args.out, args.harmful, args.task)
    else:
        run(
            args.out,
            args.utility,
            args.safety,
            args.variants,
            args.model,
            args.n_samples,
            args.limit,
            args.max_new_tokens,
            not args.no_generate,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
