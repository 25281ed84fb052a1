"""Shared by the benchmark scripts (run as ``python bench/NAME.py``, so this module is importable by name)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sst_merge.io import atomic_write_text


def emit(report: dict[str, Any], out: str | None) -> None:
    """Print the report as JSON and, with ``out``, write it there too (atomically)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        atomic_write_text(Path(out), text + "\n")


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-``reps`` float32 ``n``×``n`` matmul rate, GFLOP/s (the machine's rate every benchmark quotes)."""
    import torch  # deferred: common.emit is used by scripts that never load torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9
