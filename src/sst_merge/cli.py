"""The ``sst-merge`` command line: a thin parser over the library.

Each sub-command lives in :mod:`sst_merge.commands` as a module with ``add_parser(subparsers)`` and ``run(args)``;
command modules import heavy libraries inside ``run`` so that ``sst-merge --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sst_merge import __version__
from sst_merge.errors import SSTMergeError

COMMANDS = ("merge", "list", "eval", "train", "run", "report", "demo", "plan", "cache")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sst-merge", description="Merge LoRA adapters for safety; measure the Safety Tax."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_flags(parser, default=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"sst_merge.commands.{name}")
        p = module.add_parser(sub)
        _add_global_flags(p, default=False)
        p.set_defaults(_run=module.run)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, default: bool) -> None:
    """``-v`` / ``-q`` on the top parser (with their defaults) and again on each sub-command, where an absent flag
    sets nothing (``SUPPRESS``), so ``sst-merge -q demo`` and ``sst-merge demo -q`` mean the same."""
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if default else argparse.SUPPRESS,
        help="more logging (-vv for debug)",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False if default else argparse.SUPPRESS,
        help="only warnings and errors; no progress bars",
    )


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logger = logging.getLogger("sst_merge")
    logger.setLevel(level)
    if not any(getattr(h, "_sst_merge_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._sst_merge_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the process exit status (2 for bad input, with one line on stderr)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args._run(args) or 0)
    except SSTMergeError as e:
        print(f"sst-merge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
