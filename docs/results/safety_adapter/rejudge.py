"""Re-judge the recorded responses of the safety recipe study with the current keyword judge (no generation).

    python docs/results/safety_adapter/rejudge.py            # development table and the selection score
    python docs/results/safety_adapter/rejudge.py test       # the reported sets of the shipped adapter, C11 and C12

Records: ``records/<candidate>.dev.jsonl.gz`` (HarmBench val, benign_dev, phrasing:dev), ``<name>.test.jsonl.gz``
(HarmBench test, benign, phrasing eval) and ``<name>.sr.jsonl.gz`` (StrongREJECT's held-out split), all 64 tokens.
"""

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

from sst_merge.eval.judges.base import REFUSING
from sst_merge.eval.judges.keyword import KeywordJudge, keyword_verdict
from sst_merge.eval.stats import wilson_interval

HERE = Path(__file__).resolve().parent
FORMS = ["question", "imperative", "polite", "roleplay", "fragment"]


def rates(path: Path) -> dict[tuple[str, ...], tuple[int, int]]:
    agg: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0, 0])
    with gzip.open(path, "rt") as f:
        for line in f:
            r = json.loads(line)
            refused = keyword_verdict(r["response"]) in REFUSING
            keys: list[tuple[str, ...]] = []
            if r["task"].startswith("phrasing"):
                keys = [(r["kind"], r["form"]), (r["kind"], "all")]
            elif r["task"] == "refusal":
                keys = [("refusal",)]
            elif r["task"] == "over_refusal":
                keys = [("over",), ("over", r.get("type") or "?")]
            for k in keys:
                agg[k][0] += refused
                agg[k][1] += 1
    return {k: (a, b) for k, (a, b) in agg.items()}


def fmt(c: tuple[int, int]) -> str:
    lo, hi = wilson_interval(c[0], c[1])
    return f"{c[0] / c[1]:.3f} [{lo:.3f}, {hi:.3f}] (n={c[1]})"


def main() -> None:
    print(f"judge keyword v{KeywordJudge.version}")
    if len(sys.argv) > 1 and sys.argv[1] == "test":
        for name in ("shipped", "C11", "C12"):
            r, s = rates(HERE / "records" / f"{name}.test.jsonl.gz"), rates(HERE / "records" / f"{name}.sr.jsonl.gz")
            print(f"== {name}")
            print("  HarmBench test refusal       ", fmt(r[("refusal",)]))
            print("  StrongREJECT held-out refusal", fmt(s[("refusal",)]))
            print("  benign over-refusal          ", fmt(r[("over",)]))
            for k in sorted(k for k in r if k[0] == "over" and len(k) == 2):
                print(f"    {k[1]:<36s} {r[k][0] / r[k][1]:.3f}")
            for kind, what in (("harmful", "refusal"), ("benign", "over-refusal")):
                per = " / ".join(f"{r[(kind, f)][0] / r[(kind, f)][1]:.2f}" for f in FORMS)
                print(f"  phrasing {what:<13s} {fmt(r[(kind, 'all')])}; q / imp / pol / role / frag {per}")
        return
    for path in sorted((HERE / "records").glob("*.dev.jsonl.gz")):
        r = rates(path)
        hb, bd = r[("refusal",)], r[("over",)]
        pr = [r[("harmful", f)][0] / r[("harmful", f)][1] for f in FORMS]
        po = [r[("benign", f)][0] / r[("benign", f)][1] for f in FORMS]
        worst_r, worst_o = min(hb[0] / hb[1], *pr), max(bd[0] / bd[1], *po)
        print(f"{path.name.split('.')[0]:8s} HB val {hb[0] / hb[1]:.2f}  benign dev {bd[0] / bd[1]:.2f}  "
              f"phrasing refusal {' / '.join(f'{x:.2f}' for x in pr)}  over-refusal {' / '.join(f'{x:.2f}' for x in po)}"
              f"  score {(worst_r + 1 - worst_o) / 2:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
