"""Flags that several sub-commands share, declared once so that their names, defaults and destinations agree."""

from __future__ import annotations

import argparse
import re

from sst_merge.config import DEVICE_MAP_PATTERN


def device_map_arg(value: str) -> str:
    """argparse type of ``--device-map``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (one clear error otherwise)."""
    if not re.fullmatch(DEVICE_MAP_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device map; use auto, cpu, cuda or cuda:N")
    return value


def add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, a list that starts empty.

    Args:
        p: the sub-command's parser.
        help: the help text, with an example of the command's own dotted keys.
    """
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_output_flags(p: argparse.ArgumentParser, help: str, force_help: str, required: bool = False) -> None:
    """``-o/--output DIR`` and ``--force`` (``args.output``, ``args.force``).

    Args:
        p: the sub-command's parser.
        help: help text of ``-o/--output`` (what the directory holds, its default).
        force_help: help text of ``--force`` (what an existing directory gets).
        required: whether ``-o/--output`` must be given.
    """
    p.add_argument("-o", "--output", required=required, help=help)
    p.add_argument("--force", action="store_true", help=force_help)


def add_dry_run_flag(p: argparse.ArgumentParser) -> None:
    """``--dry-run`` (``args.dry_run``): validate, print ``sst-merge plan``'s estimate, exit 0 or 2; load no weights."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print the memory/time estimate of `sst-merge plan` for it and exit without "
        "loading weights (exit 2 with the option that would fit when it cannot fit)",
    )
