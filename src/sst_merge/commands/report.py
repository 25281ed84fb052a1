"""`sst-merge report RUN_DIR`: regenerate report.md, summary.csv and plots from results.json alone."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="regenerate the Markdown report, CSV and plots of a run from its results.json")
    p.add_argument("run_dir", help="directory of a finished `sst-merge run`")
    return p


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge.experiments.report import write_report

    print(write_report(args.run_dir))
    return 0
