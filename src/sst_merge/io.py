"""Atomic file and directory writes (with the user's umask), content hashes.

A file or directory appears at its final path only once it is complete (temporary name beside it, then an atomic
rename), so a killed process never leaves a partial entry that a later read could take as finished. Written files
get the mode the user's umask gives a new file (0644 under umask 022), not the 0600 of a temporary file.

Fault injection (tests only): ``SST_MERGE_KILL_AT=after-write:N`` makes the process SIGKILL itself right after
its N-th atomic write is in place, ``before-rename:N`` right before the N-th rename (the temporary file complete,
the final path not yet written). The interruption tests use it to stop ``run``, ``merge`` and ``train`` at chosen
points.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sst_merge.errors import OutputExistsError


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows; else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_fault_counts: dict[str, int] = {}


def fault_point(stage: str) -> None:
    """SIGKILL this process at the N-th ``stage`` when ``SST_MERGE_KILL_AT=stage:N`` (see the module docstring)."""
    spec = os.environ.get("SST_MERGE_KILL_AT")
    if not spec or not spec.startswith(f"{stage}:"):
        return
    _fault_counts[stage] = _fault_counts.get(stage, 0) + 1
    if _fault_counts[stage] == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends, give it the umask's mode and rename it into place.

    Nothing is left at ``path`` (and no temporary file) if the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        fault_point("before-rename")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fault_point("after-write")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and an atomic rename."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically. NaN/Infinity are refused (they are not JSON)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing, non-empty output path unless ``force``; call this before any heavy work."""
    path = Path(path)
    if path.exists() and (path.is_file() or any(path.iterdir())) and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it or choose another path")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success move it into place (replacing only with force).

    Nothing is left at ``path`` if the body raises.
    """
    path = Path(path)
    check_output_dir(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        fault_point("before-rename")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point("after-write")


def json_digest(obj: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``obj`` (sorted keys; other values by ``str``): every cache key's hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
