"""On-disk cache of Fisher statistics (safetensors), keyed by everything that determines them.

An α sweep (or a k / eps / threshold sweep) re-uses the statistics: the key covers the model, the utility adapters
and their weights (they define the pre-merge point), the data, and the estimation settings — never α, k or eps,
which act after the estimate. ``F_s`` and ``F_u`` are cached separately, so a new utility data set keeps ``F_s``.

Location, first that applies: the ``cache_dir`` parameter, the merge's ``workdir``/``fisher-cache``,
``$SST_MERGE_CACHE/fisher`` (the project's cache root, as for the embedded model), ``~/.cache/sst-merge/fisher`` (under
``$XDG_CACHE_HOME`` when set). Files are written atomically and checked when read (:mod:`sst_merge.cache`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sst_merge.cache import check_fisher, read_checked
from sst_merge.io import atomic_file, json_digest

log = logging.getLogger(__name__)

#: Bump when the meaning of cached statistics changes, so old files are not re-used.
CACHE_VERSION = 3  # 2: true-Fisher samples seeded per prompt; 3: given responses end at EOS (models.tokenize), and
#                    a model directory is identified by sst_merge.cache.model_fingerprint (file sizes, not mtimes)
_SEP = "::"


def cache_dir(explicit: str | None = None, workdir: Any = None) -> Path:
    """Resolve the cache directory (see the module docstring for the order)."""
    if explicit:
        return Path(explicit).expanduser()
    if workdir is not None:
        return Path(workdir) / "fisher-cache"
    env = os.environ.get("SST_MERGE_CACHE")
    if env:
        return Path(env).expanduser() / "fisher"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sst-merge" / "fisher"


def tensor_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (used when no model name is known)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``parts`` (plus the cache version)."""
    return json_digest({"version": CACHE_VERSION, **parts})


def load_stats(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]] | None:
    """Load cached statistics and their metadata; ``None`` if the file is missing, or damaged (then it is moved
    aside with one log line, see :mod:`sst_merge.cache`, and the caller recomputes it)."""
    return read_checked(path, check_fisher)


def save_stats(path: Path, stats: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> None:
    """Write statistics atomically (temporary file + rename), recording the cache version for ``cache prune``."""
    flat = {f"{m}{_SEP}{k}": t.contiguous() for m, s in stats.items() for k, t in s.items()}
    with atomic_file(path) as tmp:
        save_file(flat, str(tmp), metadata={**metadata, "cache_version": str(CACHE_VERSION)})
