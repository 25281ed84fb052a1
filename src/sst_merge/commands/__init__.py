"""CLI sub-commands, one module each (``add_parser`` + ``run``)."""

from __future__ import annotations

import argparse
import re


def device_map_arg(value: str) -> str:
    """argparse type of ``--device-map``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (one clear error otherwise)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device map; use auto, cpu, cuda or cuda:N")
    return value
