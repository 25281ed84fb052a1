"""What makes a result reproducible: versions, git revision, schema version, stable hashes of configs.

A model directory's identity is :func:`sst_merge.cache.model_fingerprint`.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from sst_merge import __version__
from sst_merge.io import json_digest

SCHEMA_VERSION = 2  # 2: the three-way account (see experiments/schema.py)

_LIBRARIES = ("torch", "transformers", "peft", "safetensors", "numpy", "scipy", "pydantic")


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that can change a result."""
    out: dict[str, str | None] = {"sst-merge": __version__, "python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The source tree's git revision (with ``-dirty`` for uncommitted changes), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


def stable_hash(obj: Any) -> str:
    """The first 16 hex digits of :func:`~sst_merge.io.json_digest`, for cache keys."""
    return json_digest(obj)[:16]
