"""`sst-merge train`: train a LoRA adapter for the safety task or a generated utility task."""

from __future__ import annotations

import argparse

from sst_merge.commands.flags import add_set_flag
from sst_merge.config import apply_overrides


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "train",
        help="train a LoRA adapter (safety, a utility task, or several joined by '+') on a model",
        description="Train a LoRA adapter with the loss on response tokens only. Without -o the adapter is written "
        "to (and reused from) the cache, keyed by model, task, settings and seed.",
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, local model directory or hub id")
    p.add_argument(
        "--task",
        required=True,
        help="'safety', a utility task (see `sst-merge list`), or several joined by '+' for one multi-task adapter "
        "on the union of their training data (e.g. safety+passage_qa)",
    )
    p.add_argument("-o", "--output", default=None, help="adapter directory to write (default: the cache)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default depends on the task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 8; a multi-task adapter: 8 per task)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default depends on the task)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,v_proj", help="comma-separated module names")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--no-cache", action="store_true", help="train even if a cached adapter exists")
    add_set_flag(p, "any other training setting, e.g. safety_data=forms, preference_weight=1 (repeatable)")
    return p


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge.train import train_adapter

    settings = {
        "steps": args.steps,
        "seed": args.seed,
        "rank": args.rank,
        "lr": args.lr,
        "alpha": args.alpha,
        "batch_size": args.batch_size,
        "target_modules": [m.strip() for m in args.target_modules.split(",") if m.strip()],
    }
    settings.update(apply_overrides({}, args.overrides))  # --set wins over a flag's default
    path = train_adapter(
        args.model,
        args.task,
        out_dir=args.output,
        force=args.force,
        use_cache=not args.no_cache,
        progress=not args.quiet,
        **settings,
    )
    print(path)
    return 0
