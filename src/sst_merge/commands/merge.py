"""`sst-merge merge CONFIG.yaml -o OUT_DIR [--force] [--set key=value ...] [--allow-pickle]`."""

from __future__ import annotations

import argparse
import os

from sst_merge.commands.flags import add_dry_run_flag, add_output_flags, add_set_flag
from sst_merge.commands.plan import dry_run_merge


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "merge",
        help="merge LoRA adapters (task_arithmetic, linear, ties, dare_*, sst) into a PEFT adapter or a full model",
        description="Merge the adapters of a YAML config in ΔW space and write a PEFT adapter or a full model.",
    )
    p.add_argument("config", help="merge config (YAML); see examples/*.yaml")
    add_output_flags(
        p,
        help="output directory (written atomically)",
        force_help="replace an existing output directory",
        required=True,
    )
    add_set_flag(p, help="override a config value, e.g. --set params.density=0.3 --set adapters.1.weight=0.5")
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept pickle (.bin) adapter weights; they can run code"
    )
    add_dry_run_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge.merge.api import load_config, merge

    config = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run_merge(config, args.output, args.force, args.allow_pickle)
    out = merge(
        config,
        args.output,
        force=args.force,
        allow_pickle=args.allow_pickle,
        show_progress=os.environ.get("TQDM_DISABLE") != "1",
    )
    print(out)
    return 0
