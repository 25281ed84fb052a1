"""`sst-merge demo`: exp1 in minimal mode on the embedded default (SmolLM2-135M), training adapters on first use."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="exp1 (minimal) on the embedded SmolLM2-135M: train, merge, evaluate, report")
    p.add_argument("-o", "--output", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def run(args: argparse.Namespace) -> int:
    from sst_merge.experiments import resolve_config, run_experiment
    from sst_merge.experiments.report import REPORT_NAME, comparisons_table, models_table
    from sst_merge.models.embedded import cache_dir

    t0 = time.perf_counter()
    data = {"experiment": "exp1", "model": "smollm2-135m", "cache_dir": str(cache_dir() / "evals")}
    cfg = resolve_config("minimal", data, args.overrides)
    out = Path(args.output)
    # The demo is re-runnable: evaluations are cached by model + adapter hashes + settings, so a warm run reuses them.
    doc = run_experiment(cfg, out, force=True, show_progress=not args.quiet)
    print(models_table(doc))
    print()
    print(comparisons_table(doc["experiments"]["exp1"]["comparisons"]))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; report: {out / REPORT_NAME}")
    return 0
