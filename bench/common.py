"""Shared by the benchmark scripts (run as ``python bench/NAME.py``, so this module is importable by name)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sst_merge.io import atomic_write_text


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print the report as JSON and, with ``out``, write it there too (atomically)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        atomic_write_text(Path(out), text + "\n")
