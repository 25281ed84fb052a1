"""The hand-labelled responses that measure a refusal judge: precision and recall of refusal, per prompt kind.

``sst_merge/resources/judge_labels.jsonl`` holds real responses of the project's own models (the base model, the
shipped safety and passage_qa adapters, their SST and task-arithmetic merges at α = 1 and 2, and an earlier
form-varied safety adapter; HarmBench, over-refusal and phrasing prompts; 32 and 64 new tokens), each labelled by
reading it as ``full_refusal``, ``partial_refusal`` or ``compliance`` (XSTest's three classes; the rules are in the
resources README). ``split`` halves the set by prompt (``dev``: looked at when the
keyword judge was improved; ``heldout``: not), so both numbers can be reported.

Print a judge's numbers with ``python -m sst_merge.eval.judges.labels [JUDGE]``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from sst_merge.eval.judges import get_judge
from sst_merge.eval.judges.base import REFUSING, Judge

LABELS = ("full_refusal", "partial_refusal", "compliance")
#: Verdict → label, for the three-class agreement (an empty response has no refusal in it).
VERDICT_LABEL = {"refusal": "full_refusal", "partial_refusal": "partial_refusal", "compliance": "compliance"}


def load_labels() -> list[dict[str, Any]]:
    """The labelled responses (``id, prompt, kind, model, max_new_tokens, response, label, split``)."""
    text = files("sst_merge.resources").joinpath("judge_labels.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Agreement:
    """Refusal (full or partial) as the positive class: counts, precision, recall, and three-class accuracy."""

    n: int
    tp: int
    fp: int
    fn: int
    exact: int  # verdicts whose class (full / partial / compliance) equals the label

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def accuracy3(self) -> float:
        return self.exact / self.n if self.n else float("nan")


def agreement(verdicts: Sequence[str], labels: Sequence[str]) -> Agreement:
    """Compare judge verdicts with labels; a verdict counts as refusal when it is in :data:`REFUSING`."""
    tp = fp = fn = exact = 0
    for v, lab in zip(verdicts, labels, strict=True):
        said, truth = v in REFUSING, lab != "compliance"
        tp += said and truth
        fp += said and not truth
        fn += truth and not said
        exact += VERDICT_LABEL.get(v, "compliance") == lab
    return Agreement(len(labels), tp, fp, fn, exact)


def measure(judge: Judge, rows: list[dict[str, Any]] | None = None) -> dict[tuple[str, str], Agreement]:
    """``(kind, split) → Agreement`` of ``judge`` on the labelled set; kind and split ``"all"`` pool the rest."""
    rows = load_labels() if rows is None else rows
    verdicts = judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])
    out = {}
    for kind in ("harmful", "benign", "all"):
        for split in ("dev", "heldout", "all"):
            idx = [i for i, r in enumerate(rows) if kind in ("all", r["kind"]) and split in ("all", r["split"])]
            out[(kind, split)] = agreement([verdicts[i] for i in idx], [rows[i]["label"] for i in idx])
    return out


def balance(rows: list[dict[str, Any]] | None = None) -> dict[str, Counter[str]]:
    """Label counts per prompt kind (and ``"all"``): the labelled set's class balance."""
    rows = load_labels() if rows is None else rows
    out: dict[str, Counter[str]] = {"harmful": Counter(), "benign": Counter(), "all": Counter()}
    for r in rows:
        out[r["kind"]][r["label"]] += 1
        out["all"][r["label"]] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    judge = get_judge(args[0] if args else "keyword")
    for kind, counts in balance().items():
        print(f"{kind:8s} {sum(counts.values()):4d} responses: " + ", ".join(f"{lab} {counts[lab]}" for lab in LABELS))
    print(f"judge {judge.name} v{judge.version}")
    print("kind     split     n    refusals  precision  recall  3-class acc")
    for (kind, split), a in measure(judge).items():
        print(
            f"{kind:8s} {split:8s} {a.n:4d}  {a.tp + a.fn:4d}      {a.precision:.3f}      {a.recall:.3f}   "
            f"{a.accuracy3:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
