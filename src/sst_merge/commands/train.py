"""`sst-merge train` (being built; see the open issues)."""

from __future__ import annotations

import argparse

from sst_merge.errors import SSTMergeError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser("train", help="(not yet available)")


def run(args: argparse.Namespace) -> int:
    raise SSTMergeError("'train' is not available yet")
