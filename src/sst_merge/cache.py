"""Cache entries checked on every read: a damaged one is reported, moved aside and recomputed; verify, info, prune.

Every cache the project keeps goes through :func:`read_checked` with the check of its kind (below): evaluations
(``eval-KEY.json``, with the SHA-256 of their per-item records), Fisher statistics (``fisher-*.safetensors``),
Fisher data files, adapters, the safety adapter's benign answers, learned merge coefficients (``learned-*.json``) and
the converted embedded model. A check parses
the entry and tests its keys and shapes (and a content hash where one was stored); an entry that fails is logged
in one line naming the file, renamed to ``NAME.damaged-TIMESTAMP`` beside itself (never deleted) and reported as
missing, so the caller recomputes it and the run goes on.

Writes are atomic (:mod:`sst_merge.io`), so a killed process leaves at most a hidden temporary (``.NAME.*.tmp``)
that no read ever looks at. Entries two processes could compute at once are computed under :func:`entry_lock`
(an ``fcntl`` lock on ``NAME.lock``), so the second process waits and reads the first one's result.

:func:`scan` classifies everything under a cache directory by kind; ``sst-merge cache info|verify|prune`` are
thin wrappers over :func:`scan`, :func:`verify` and :func:`prunable`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sst_merge.io import json_digest, sha256_file

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Temporaries, orphans and unheld locks younger than this may belong to a run in progress; prune keeps them.
GRACE_SECONDS = 3600


class Damaged(Exception):  # noqa: N818 — it names the state of the entry, not an error of the caller
    """A cache entry failed its check; ``also`` names files that belong to it and go aside with it."""

    def __init__(self, reason: str, also: tuple[Path, ...] = ()) -> None:
        super().__init__(reason)
        self.also = also


def _damage_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    # ValueError covers JSONDecodeError and UnicodeDecodeError; KeyError/TypeError/IndexError a wrong structure.
    return (Damaged, ValueError, KeyError, TypeError, IndexError, AttributeError, SafetensorError)


def move_aside(path: Path, reason: str) -> Path | None:
    """Rename a damaged entry to ``NAME.damaged-TIMESTAMP`` and log one line; None if it is already gone."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    if target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{os.getpid()}")
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process moved it aside first
        return None
    reason = " ".join(str(reason).split())[:200]
    log.warning("damaged cache entry %s (%s): moved aside to %s, recomputing", path, reason, target.name)
    return target


def read_checked(path: str | os.PathLike, load: Callable[[Path], T]) -> T | None:
    """Return ``load(path)``; None if the entry is missing, or damaged (then it is moved aside, see above).

    ``load`` parses and checks the entry, raising :class:`Damaged` (or a parse error) for a bad one. Errors of the
    file system itself (a permission denied) are not damage and propagate.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        return load(path)
    except FileNotFoundError:
        return None  # moved aside or replaced by another process in between: a miss
    except _damage_errors() as e:
        move_aside(path, str(e) or type(e).__name__)
        for other in getattr(e, "also", ()):
            if Path(other).exists():
                move_aside(Path(other), f"belongs to the damaged {path.name}")
        return None


@contextlib.contextmanager
def entry_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock for computing the entry ``path`` (``NAME.lock`` beside it; a no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes still keep the entry whole, only the work may be done twice
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.stem}.lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


_digests: dict[tuple[str, int, int], str] = {}


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's content, remembered per (path, size, mtime) so a cache key costs one hash per file."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(p)
    return _digests[key]


def model_fingerprint(name: str) -> str:
    """A cheap identity of a base model for cache keys: for a local directory, its files' names and sizes and its
    ``config.json``; otherwise the name itself (an alias or a hub id).

    Reading a 7B model's weights to hash them would cost more than most cached results save; a re-saved model with
    other weights changes a file's size or its config in practice. Where it lies does not enter it.
    """
    p = Path(name)
    if not p.is_dir():
        return name
    files = [(f.name, f.stat().st_size) for f in sorted(p.iterdir()) if f.is_file()]
    config = (p / "config.json").read_text() if (p / "config.json").is_file() else ""
    return json_digest({"files": files, "config": config})[:16]


def content_keyed(value: Any, named: Callable[[str], str | None] | None = None) -> Any:
    """``value`` with every string naming an existing file replaced by ``{"sha256": its content hash}``.

    Cache keys built from it depend on what a data file holds, not where it lies: a moved or copied cache
    directory (and its data) still hits, and an edited file misses. ``named`` gives the content digest of a string
    that names data by another way (a seeded data source), or None; it is asked before the file system.
    """
    if isinstance(value, dict):
        return {k: content_keyed(v, named) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [content_keyed(v, named) for v in value]
    if isinstance(value, str) and value and "\n" not in value and len(value) < 4096:
        if named is not None and (digest := named(value)) is not None:
            return {"sha256": digest}
        with contextlib.suppress(OSError):
            if Path(value).expanduser().is_file():
                return {"sha256": content_digest(value)}
    return value


# ---- checks, one per kind ------------------------------------------------------------------------------------------


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def check_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Parse a JSONL file whose every line is an object with the keys ``required``."""
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or any(k not in row for k in required):
            raise Damaged(f"line {i} is not an object with {', '.join(required) or 'fields'}")
        rows.append(row)
    return rows


def check_evaluation(path: Path) -> dict[str, Any]:
    """An ``eval-KEY.json``: its key matches its name, every metric has a value and n, its records are whole."""
    data = _json(path)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise Damaged("no metrics object")
    key = path.stem.removeprefix("eval-")
    if data.get("key", key) != key:
        raise Damaged(f"holds the evaluation {data.get('key')}, not {key}")
    for name, m in data["metrics"].items():
        if not isinstance(m, dict) or "value" not in m or not isinstance(m.get("n"), int):
            raise Damaged(f"metric {name} lacks a value or n")
    records = path.with_name(data.get("records") or f"records-{key}.jsonl")
    if not records.is_file():
        raise Damaged(f"its records {records.name} are missing")
    if "records_sha256" in data:
        if sha256_file(records) != data["records_sha256"]:
            raise Damaged(f"its records {records.name} do not match their SHA-256", also=(records,))
    else:  # written before the hash was stored: parse them
        try:
            check_jsonl(records)
        except (ValueError, Damaged) as e:
            raise Damaged(f"its records {records.name} are damaged ({e})", also=(records,)) from e
    return data


def check_safetensors(path: Path) -> dict[str, str]:
    """The header of a safetensors file parses and covers the whole file; return its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def check_fisher(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Fisher statistics: named ``MODULE::STAT``, finite; return ``(module → stat → tensor, metadata)``."""
    # deferred: torch and safetensors (sst_merge.tensors imports torch); the rest of this module needs neither
    import torch
    from safetensors.torch import load_file

    from sst_merge.tensors import all_finite

    meta = check_safetensors(path)
    stats: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in load_file(str(path)).items():
        module, sep, stat = name.rpartition("::")
        if not sep or not module or not stat:
            raise Damaged(f"tensor {name!r} is not named MODULE::STAT")
        if t.is_floating_point() and not bool(all_finite(t)):
            raise Damaged(f"tensor {name} holds NaN or Inf")
        stats.setdefault(module, {})[stat] = t
    if not stats:
        raise Damaged("holds no statistics")
    short = path.stem.rsplit("-", 1)[-1]
    if "key" in meta and not meta["key"].startswith(short):
        raise Damaged(f"holds the statistics of key {meta['key'][:32]}, not {short}")
    return stats, meta


def check_adapter(path: Path) -> Path:
    """A PEFT adapter directory: its config parses with a rank, its weights pair every lora_A with a lora_B."""
    from safetensors import safe_open

    config = _json(path / "adapter_config.json")
    if not isinstance(config, dict) or not isinstance(config.get("r"), int):
        raise Damaged("adapter_config.json has no rank r")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise Damaged("adapter_model.safetensors is missing")
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        a = {n.replace("lora_A", "lora_X") for n in names if "lora_A" in n}
        b = {n.replace("lora_B", "lora_X") for n in names if "lora_B" in n}
        if not a or a != b:
            raise Damaged("adapter_model.safetensors does not pair every lora_A with a lora_B")
        for n in names:
            if "lora_A" in n and f.get_slice(n).get_shape()[0] != config["r"]:
                raise Damaged(f"{n} does not have rank {config['r']}")
    return path


def check_model(path: Path) -> Path:
    """A converted model directory: config, every safetensors header, a tokenizer file that parses."""
    config = _json(path / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise Damaged("config.json has no model_type")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise Damaged("no model.safetensors")
    for w in weights:
        check_safetensors(w)
    tokenizer = [path / n for n in ("tokenizer.json", "tokenizer_config.json") if (path / n).is_file()]
    if not tokenizer:
        raise Damaged("no tokenizer file")
    for t in tokenizer:
        _json(t)
    return path


def check_benign_answers(path: Path, prompts: list[str] | None = None) -> list[dict[str, Any]]:
    """The safety adapter's benign answers: one object per prompt (in order, when ``prompts`` is given)."""
    items = _json(path)
    keys = ("id", "prompt", "response", "answer", "kind")
    if not isinstance(items, list) or not all(isinstance(i, dict) and all(k in i for k in keys) for i in items):
        raise Damaged(f"not a list of objects with {', '.join(keys)}")
    if prompts is not None and [i["prompt"] for i in items] != list(prompts):
        raise Damaged(f"holds answers to other prompts ({len(items)} for {len(prompts)})")
    return items


def check_fisher_data(path: Path) -> list[dict[str, Any]]:
    """A Fisher data file (``fisher-data/*.jsonl``, written by versions that copied the embedded Fisher data into the
    cache; runs now name the seeded sources instead): JSONL with a prompt on every line."""
    return check_jsonl(path, ("prompt",))


def check_learned(path: Path) -> dict[str, Any]:
    """Learned merge coefficients (``learned-KEY.json``) or their reference answers (``learned-answers-KEY.json``):
    the stored key matches the name, and the payload is a list."""
    data = _json(path)
    field = "answers" if path.name.startswith("learned-answers-") else "coefficients"
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        raise Damaged(f"no {field} list")
    if not str(data.get("key", "")).startswith(path.stem.rsplit("-", 1)[-1]):
        raise Damaged(f"holds key {str(data.get('key'))[:32]}, not {path.stem.rsplit('-', 1)[-1]}")
    return data


# ---- kinds, scan, verify, prune ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A kind of cache entry: how to recognise it (a file name or a directory) and how to check it."""

    name: str
    matches: Callable[[Path], bool]
    check: Callable[[Path], Any] | None = None
    directory: bool = False


def _is_temporary(p: Path) -> bool:
    return p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old"))


KINDS: tuple[Kind, ...] = (
    Kind("damaged", lambda p: ".damaged-" in p.name),
    Kind("temporary", _is_temporary),
    Kind("lock", lambda p: p.suffix == ".lock"),
    Kind("model", lambda p: p.parent.name == "models" and (p / "config.json").is_file(), check_model, True),
    Kind("adapter", lambda p: (p / "adapter_config.json").is_file(), check_adapter, True),
    Kind("evaluation", lambda p: p.name.startswith("eval-") and p.suffix == ".json", check_evaluation),
    Kind("records", lambda p: p.name.startswith("records-") and p.suffix == ".jsonl", check_jsonl),
    Kind("fisher", lambda p: p.name.startswith("fisher-") and p.suffix == ".safetensors", check_fisher),
    Kind("fisher-data", lambda p: p.parent.name == "fisher-data" and p.suffix == ".jsonl", check_fisher_data),
    Kind("benign-answers", lambda p: p.parent.name == "benign-answers" and p.suffix == ".json", check_benign_answers),
    Kind("learned", lambda p: p.name.startswith("learned-") and p.suffix == ".json", check_learned),
)


_DIRECTORY_KINDS = tuple(k for k in KINDS if k.directory or k.name in ("damaged", "temporary"))


@dataclass(frozen=True)
class Entry:
    """One cache entry found by :func:`scan`."""

    path: Path
    kind: Kind
    size: int
    mtime: float


def _size(p: Path) -> int:
    if p.is_dir():
        return sum(q.stat().st_size for q in p.rglob("*") if q.is_file() and not q.is_symlink())
    return p.stat().st_size


def scan(root: str | os.PathLike) -> list[Entry]:
    """Every entry under ``root`` with its kind (``other`` for files no kind claims), sorted by path."""
    other = Kind("other", lambda p: True)
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in sorted(dirnames):
            p = here / name
            kind = next((k for k in _DIRECTORY_KINDS if k.matches(p)), None)
            if kind is not None:
                dirnames.remove(name)  # an entry of its own: do not descend
                with contextlib.suppress(FileNotFoundError):
                    out.append(Entry(p, kind, _size(p), p.stat().st_mtime))
        for name in filenames:
            p = here / name
            kind = next((k for k in KINDS if not k.directory and k.matches(p)), other)
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                out.append(Entry(p, kind, st.st_size, st.st_mtime))
    return sorted(out, key=lambda e: str(e.path))


def info(root: str | os.PathLike) -> dict[str, tuple[int, int]]:
    """Kind → (number of entries, bytes) under ``root``."""
    out: dict[str, tuple[int, int]] = {}
    for e in scan(root):
        n, size = out.get(e.kind.name, (0, 0))
        out[e.kind.name] = (n + 1, size + e.size)
    return out


def verify(root: str | os.PathLike, fix: bool = False) -> list[tuple[Path, str]]:
    """Check every entry under ``root``; return ``(path, reason)`` of the damaged ones (moved aside if ``fix``)."""
    bad: list[tuple[Path, str]] = []
    for e in scan(root):
        if e.kind.check is None:
            continue
        try:
            e.kind.check(e.path)
        except FileNotFoundError:
            continue
        except _damage_errors() as err:
            reason = " ".join((str(err) or type(err).__name__).split())[:200]
            bad.append((e.path, reason))
            if fix:
                move_aside(e.path, reason)
                for other in getattr(err, "also", ()):
                    if Path(other).exists():
                        move_aside(Path(other), f"belongs to the damaged {e.path.name}")
    return bad


def _lock_held(path: Path) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def prunable(root: str | os.PathLike, versions: dict[str, int], now: float | None = None) -> list[tuple[Entry, str]]:
    """Entries under ``root`` that no current cache key can reach, each with the reason.

    That is: entries moved aside as damaged; temporaries of killed writers and unheld locks older than
    :data:`GRACE_SECONDS`; per-item records whose evaluation is gone (same age rule); evaluations and Fisher
    statistics that record a cache version other than ``versions["evaluation"]`` / ``versions["fisher"]`` (an
    entry that records none predates the field and is kept: it may still be reachable); the Fisher data files older
    versions wrote (runs now name ``safety_fisher`` / ``utility:NAME``, whose keys equal those files' content keys).
    """
    now = time.time() if now is None else now
    out: list[tuple[Entry, str]] = []
    for e in scan(root):
        old = now - e.mtime > GRACE_SECONDS
        kind = e.kind.name
        if kind == "damaged":
            out.append((e, "moved aside as damaged"))
        elif kind == "temporary" and old:
            out.append((e, "left by an interrupted write"))
        elif kind == "lock" and old and not _lock_held(e.path):
            out.append((e, "lock no process holds"))
        elif kind == "records" and old:
            key = e.path.stem.removeprefix("records-")
            if not (e.path.parent / f"eval-{key}.json").is_file():
                out.append((e, "records of an evaluation that is gone"))
        elif kind == "evaluation":  # a damaged one is verify's business, not prune's: skipped here
            with contextlib.suppress(OSError, *_damage_errors()):
                v = _json(e.path).get("v")
                if v is not None and v != versions.get("evaluation"):
                    out.append((e, f"evaluation cache version {v}, now {versions.get('evaluation')}"))
        elif kind == "fisher-data":
            out.append((e, "Fisher data copied by an older version; runs now read the named source"))
        elif kind == "fisher":
            with contextlib.suppress(OSError, *_damage_errors()):
                v = check_safetensors(e.path).get("cache_version")
                if v is not None and int(v) != versions.get("fisher"):
                    out.append((e, f"Fisher cache version {v}, now {versions.get('fisher')}"))
    return out


def remove(path: Path) -> None:
    """Delete one entry (a file or a directory)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def human_size(n: float) -> str:
    """Bytes as ``12.3 MB`` (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
