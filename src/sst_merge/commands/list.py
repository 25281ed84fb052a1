"""`sst-merge list`: print what is registered (merge methods, and any other registry added to SECTIONS)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _merge_methods() -> list[tuple[str, str]]:
    from sst_merge.merge import MERGE_METHODS

    return [(name, MERGE_METHODS.get(name).description) for name in MERGE_METHODS.names()]


#: (title, function returning (name, one-line description) rows). Other registries add a line here.
SECTIONS: list[tuple[str, Callable[[], list[tuple[str, str]]]]] = [
    ("merge methods", _merge_methods),
]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser("list", help="list registered merge methods (and other registries)")


def run(args: argparse.Namespace) -> int:
    for i, (title, rows_fn) in enumerate(SECTIONS):
        rows = rows_fn()
        if i:
            print()
        print(f"{title}:")
        width = max((len(name) for name, _ in rows), default=0)
        for name, desc in rows:
            print(f"  {name.ljust(width)}  {desc}".rstrip())
    return 0
