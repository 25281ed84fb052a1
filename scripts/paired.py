"""Paired differences between two models: what a report's table cannot say (it compares each model with the
reference only).

    python scripts/paired.py RUN_DIR MODEL_A MODEL_B [--n-boot 2000] [--seed 0]
    python scripts/paired.py A.records.jsonl B.records.jsonl              (two `sst-merge eval -o A.json` outputs)

Reads the per-item records (a run's ``RUN_DIR/records.jsonl``, every model of it; or the ``OUT.records.jsonl`` of two
``sst-merge eval`` calls) and prints, for B − A: the balanced score's change (refusal on harmful vs benign prompts;
for the phrasing prompts too) and each measurement's mean difference (refusal, over-refusal, each task, the
phrasing prompts by kind), with paired percentile-bootstrap 95% intervals over the items both models answered — the
functions exp1/exp3 use (:func:`sst_merge.eval.stats.balanced_change_report`,
:func:`~sst_merge.eval.stats.mean_difference_report`), paired by item id in A's order
(:func:`~sst_merge.eval.stats.aligned_scores`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sst_merge.errors import DataError
from sst_merge.eval.stats import aligned_scores, balanced_change_report, mean_difference_report


def measurement(record: dict) -> str:
    """The measurement a record belongs to: its task, the phrasing prompts split by kind (harmful / benign)."""
    return f"{record['task']}:{record['kind']}" if record["task"] == "phrasing" and "kind" in record else record["task"]


def scores(records: Path, model: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """model label → measurement → {item id: score}; ``model`` labels a file without one (an ``sst-merge eval``
    output)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for n, line in enumerate(records.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        label = r.get("model", model)
        if label is None or not all(k in r for k in ("task", "id", "score")):
            raise DataError(f"{records}: line {n} lacks model, task, id or score; is this a records.jsonl?")
        out.setdefault(label, {}).setdefault(measurement(r), {})[r["id"]] = float(r["score"])
    return out


#: (harmful, benign) measurements whose balanced score is compared
BALANCED = (("refusal", "over_refusal", "balanced_score"), ("phrasing:harmful", "phrasing:benign", "phrasing balanced"))


def compare(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], n_boot: int, seed: int) -> list[tuple]:
    """Rows ``(measurement, value, ci95, n)`` of B − A over the measurements both models have."""
    rows = []
    for harmful, benign, name in BALANCED:
        if {harmful, benign} <= set(a) & set(b):
            ha, hb = aligned_scores(a[harmful], b[harmful])
            ba, bb = aligned_scores(a[benign], b[benign])
            r = balanced_change_report(ha, hb, ba, bb, n_boot=n_boot, seed=seed)
            rows.append((name, r["value"], r["ci95"], len(ha) + len(ba)))
    for task in [t for t in a if t in b]:
        ra, rb = aligned_scores(a[task], b[task])
        r = mean_difference_report(ra, rb, n_boot=n_boot, seed=seed)
        rows.append((task, r["value"], r["ci95"], r["n"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("where", nargs="+", help="RUN_DIR MODEL_A MODEL_B, or A.records.jsonl B.records.jsonl")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        if len(args.where) == 2:  # two `sst-merge eval` outputs, each labelled by its file name
            files = [Path(w) for w in args.where]
            label_a, label_b = (f.name.removesuffix(".records.jsonl").removesuffix(".jsonl") for f in files)
            if label_a == label_b:
                label_a, label_b = str(files[0]), str(files[1])
            for f in files:
                if not f.is_file():
                    raise DataError(
                        f"{f} does not exist; give the OUT.records.jsonl that `sst-merge eval -o OUT` wrote"
                    )
            by_model = {**scores(files[0], label_a), **scores(files[1], label_b)}
        elif len(args.where) == 3:
            run_dir, label_a, label_b = Path(args.where[0]), args.where[1], args.where[2]
            records = run_dir / "records.jsonl"
            if not records.is_file():
                raise DataError(f"{records} does not exist; give the directory `sst-merge run -o DIR` wrote")
            by_model = scores(records)
            for label in (label_a, label_b):
                if label not in by_model:
                    raise DataError(f"no model {label!r} in {records}; it holds: {', '.join(by_model)}")
        else:
            raise DataError(f"give RUN_DIR MODEL_A MODEL_B or two records files, not {len(args.where)} arguments")
        rows = compare(by_model[label_a], by_model[label_b], args.n_boot, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{label_b} − {label_a} (paired bootstrap, {args.n_boot} resamples, seed {args.seed}):")
    for name, value, (lo, hi), n in rows:
        print(f"  {name}: {value:+.3f} [{lo:+.3f}, {hi:+.3f}] (n = {n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
