"""Print a Markdown table of chosen models from experiment runs (the README's and docs/results' headline tables).

    python scripts/results_table.py RUN_DIR:MODEL_LABEL[@DISPLAY NAME] ...

Each argument names a run directory (its ``results.json``) and a model label in it; the row shows refusal on the
harmful prompts, over-refusal on the benign ones, task accuracy, the balanced score (each with its 95% interval) and,
where the run has them, the per-form phrasing refusal and the gap closed between task arithmetic at α = 1 and the
multi-task bound. Every number is read from the JSON, none is typed in.
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


def gap(res: dict, label: str) -> str:
    for c in res["experiments"].get("exp3", {}).get("comparisons", []):
        g = c.get("gap_closed", {}).get("balanced_score") if c["model"] == label else None
        if g and g.get("value") is not None:
            return f"{g['value']:.2f}"
    return "–"


def main(args: list[str]) -> int:
    print("| model | refusal (harmful) ↑ | over-refusal (benign) ↓ | passage_qa ↑ | balanced score ↑ | gap closed |")
    print("|---|---|---|---|---|---|")
    for arg in args:
        where, _, rest = arg.partition(":")
        label, _, name = rest.partition("@")
        res = json.loads((Path(where) / "results.json").read_text())
        m = res["models"][label]["metrics"]
        task = next((v for k, v in m.items() if k.startswith("task:")), None)
        row = [name or label, cell(m.get("refusal")), cell(m.get("over_refusal")), cell(task),
               cell(m.get("balanced_score")), gap(res, label)]  # fmt: skip
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
