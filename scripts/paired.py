"""Paired differences between two models of one run: what a report's table cannot say (it compares each model with
the reference only).

    python scripts/paired.py RUN_DIR MODEL_A MODEL_B [--n-boot 2000] [--seed 0]

Reads ``RUN_DIR/records.jsonl`` (every evaluated item of every model, with its score) and prints, for B − A: the
balanced score's change and each measurement's mean difference (refusal, over-refusal, each task), with paired
percentile-bootstrap 95% intervals over the items both models answered — the functions exp1/exp3 use
(:func:`sst_merge.eval.stats.balanced_change_report`, :func:`~sst_merge.eval.stats.mean_difference_report`), paired
by item id in A's order (:func:`~sst_merge.eval.stats.aligned_scores`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sst_merge.errors import DataError
from sst_merge.eval.stats import aligned_scores, balanced_change_report, mean_difference_report


def scores(records: Path) -> dict[str, dict[str, dict[str, float]]]:
    """model label → measurement → {item id: score}, from a run's ``records.jsonl``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n, line in enumerate(records.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        if not all(k in r for k in ("model", "task", "id", "score")):
            raise DataError(f"{records}: line {n} lacks model, task, id or score; is this a run's records.jsonl?")
        out.setdefault(r["model"], {}).setdefault(r["task"], {})[r["id"]] = float(r["score"])
    return out


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], n_boot: int, seed: int) -> list[tuple]:
    """Rows ``(measurement, value, ci95, n)`` of B − A over the measurements both models have."""
    rows = []
    if {"refusal", "over_refusal"} <= set(a) & set(b):
        ha, hb = aligned_scores(a["refusal"], b["refusal"])
        ba, bb = aligned_scores(a["over_refusal"], b["over_refusal"])
        r = balanced_change_report(ha, hb, ba, bb, n_boot=n_boot, seed=seed)
        rows.append(("balanced_score", r["value"], r["ci95"], len(ha) + len(ba)))
    for task in [t for t in a if t in b]:
        ra, rb = aligned_scores(a[task], b[task])
        r = mean_difference_report(ra, rb, n_boot=n_boot, seed=seed)
        rows.append((task, r["value"], r["ci95"], r["n"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("model_a")
    ap.add_argument("model_b")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    records = args.run_dir / "records.jsonl"
    try:
        if not records.is_file():
            raise DataError(f"{records} does not exist; give the directory `sst-merge run -o DIR` wrote")
        by_model = scores(records)
        for label in (args.model_a, args.model_b):
            if label not in by_model:
                raise DataError(f"no model {label!r} in {records}; it holds: {', '.join(by_model)}")
        rows = compare(by_model[args.model_a], by_model[args.model_b], args.n_boot, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model_b} − {args.model_a} (paired bootstrap, {args.n_boot} resamples, seed {args.seed}):")
    for name, value, (lo, hi), n in rows:
        print(f"  {name}: {value:+.3f} [{lo:+.3f}, {hi:+.3f}] (n = {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
