"""Print a Markdown table of chosen models from experiment runs (the README's and docs/results' headline tables).

    python scripts/results_table.py [--floor RUN_DIR:LABEL --bound RUN_DIR:LABEL] RUN_DIR:MODEL_LABEL[@DISPLAY NAME] ...

Each argument names a run directory (its ``results.json``) and a model label in it; the row shows refusal on the
harmful prompts, over-refusal on the benign ones, task accuracy, the balanced score (each with its 95% interval) and,
with ``--floor`` and ``--bound``, the share of the balanced-score gap between the floor (task arithmetic at α = 1) and
the bound (the multi-task LoRA) that each row closes, ``(b − b_floor) / (b_bound − b_floor)`` (a point value; the
exp3 reports of runs with the ceiling rows carry its paired-bootstrap interval). Every number is read from the
JSON, none is typed in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(metric: dict | None) -> str:
    if metric is None:
        return "–"
    ci = metric.get("ci95")
    return f"{metric['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "")


def metrics(arg: str) -> tuple[str, dict]:
    """``(display name, metrics)`` of ``RUN_DIR:LABEL[@NAME]``."""
    where, _, rest = arg.partition(":")
    label, _, name = rest.partition("@")
    res = json.loads((Path(where) / "results.json").read_text())
    return name or label, res["models"][label]["metrics"]


def main(args: list[str]) -> int:
    floor = bound = None
    while args and args[0] in ("--floor", "--bound"):
        value = metrics(args[1])[1]["balanced_score"]["value"]
        floor, bound = (value, bound) if args[0] == "--floor" else (floor, value)
        args = args[2:]
    print("| model | refusal (harmful) ↑ | over-refusal (benign) ↓ | passage_qa ↑ | balanced score ↑ | gap closed |")
    print("|---|---|---|---|---|---|")
    for arg in args:
        name, m = metrics(arg)
        gap = "–"
        if floor is not None and bound is not None and bound > floor:
            gap = f"{(m['balanced_score']['value'] - floor) / (bound - floor):.2f}"
        task = next((v for k, v in m.items() if k.startswith("task:")), None)
        row = [name, cell(m.get("refusal")), cell(m.get("over_refusal")), cell(task), cell(m.get("balanced_score")),
               gap]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
