"""`sst-merge cache info|verify|prune [DIR ...]`: what the caches hold, which entries are damaged, what no key reaches.

DIR defaults to the project cache (``$SST_MERGE_CACHE`` or ``~/.cache/sst-merge``); a run's ``RUN/cache`` (its
evaluations, records, Fisher data and statistics) is passed explicitly. The logic lives in :mod:`sst_merge.cache`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sst_merge import cache
from sst_merge.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "cache",
        help="show sizes per kind, check for damaged entries, prune what no cache key reaches",
        description="Inspect and repair caches. DIR defaults to $SST_MERGE_CACHE or ~/.cache/sst-merge; pass a "
        "run's RUN/cache for its evaluations. verify exits 1 when it finds damage (with --fix the damaged entries "
        "are moved aside to NAME.damaged-TIME, never deleted). prune only lists what it would delete unless --yes.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    dirs_help = "cache directories (default: the project cache)"
    info = actions.add_parser("info", help="entries and bytes per kind (evaluations, Fisher statistics, ...)")
    verify = actions.add_parser("verify", help="check every entry; exit 1 if one is damaged (unless --fix)")
    verify.add_argument("--fix", action="store_true", help="move damaged entries aside (they are recomputed)")
    prune = actions.add_parser("prune", help="list (with --yes delete) what no current cache key reaches")
    prune.add_argument("--yes", action="store_true", help="delete what is listed (default: list only)")
    for a in (info, verify, prune):
        a.add_argument("dirs", nargs="*", metavar="DIR", help=dirs_help)
    return p


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge.experiments.runner import EVAL_CACHE_VERSION
    from sst_merge.fisher.cache import CACHE_VERSION
    from sst_merge.models.embedded import cache_dir

    dirs = [Path(d).expanduser() for d in args.dirs] or [cache_dir()]
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"cache directory {d} does not exist; pass an existing directory (e.g. RUN/cache)")
    status = 0
    for d in dirs:
        if args.action == "info":
            rows = cache.info(d)
            print(f"{d}: {cache.human_size(sum(size for _, size in rows.values()))}")
            for kind, (n, size) in sorted(rows.items(), key=lambda r: -r[1][1]):
                print(f"  {kind:<15} {n:>6} {cache.human_size(size):>10}")
        elif args.action == "verify":
            bad = cache.verify(d, fix=args.fix)
            for path, reason in bad:
                print(f"{'moved aside' if args.fix else 'damaged'}: {path} ({reason})")
            print(
                f"{d}: {len(bad)} damaged entr{'y' if len(bad) == 1 else 'ies'}"
                + (", moved aside" if args.fix and bad else "")
            )
            status = status or int(bool(bad) and not args.fix)
        else:
            victims = cache.prunable(d, {"evaluation": EVAL_CACHE_VERSION, "fisher": CACHE_VERSION})
            for entry, reason in victims:
                print(
                    f"{'deleted' if args.yes else 'would delete'}: {entry.path} ({cache.human_size(entry.size)}, {reason})"
                )
                if args.yes:
                    cache.remove(entry.path)
            total = cache.human_size(sum(e.size for e, _ in victims))
            verb = "deleted" if args.yes else "would free"
            print(
                f"{d}: {len(victims)} entr{'y' if len(victims) == 1 else 'ies'}, {verb} {total}"
                + ("" if args.yes or not victims else "; pass --yes to delete")
            )
    return status
