"""What makes a result reproducible: versions, git revision, schema version, stable hashes of configs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from sst_merge import __version__

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
    """SHA-256 of the canonical JSON of ``obj`` (first 16 hex digits), for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(path: str) -> str:
    """A cheap identity for a model directory (file names, sizes and config.json), or the hub id itself."""
    p = Path(path)
    if not p.is_dir():
        return path
    parts = []
    for f in sorted(p.iterdir()):
        if f.is_file():
            parts.append((f.name, f.stat().st_size))
    cfg = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return stable_hash({"files": parts, "config": cfg})
