"""Data parallelism over ``torch.distributed`` ranks, launched by ``torchrun`` or ``accelerate launch``.

Every rank holds a model replica and the same item list; each scores its round-robin shard (:func:`shard`), and the
shards are gathered back into the single-process order (:func:`gather_sharded`) so every rank ends with the same
full result. Without an initialised process group (or with one rank) every helper is the identity, so library code
calls them unconditionally.

Failure handling: a collective that one rank never reaches blocks the others until the process-group timeout. So
every exchange here carries a status — :func:`gather_checked` runs the local step, catches its error and sends it
with the payload; when any rank failed, every rank raises :class:`RankFailedError` naming the failed rank and its
error, and nothing after (in particular no result file) is written. :func:`all_or_nothing` wraps a whole run: a rank
that fails outside an exchange announces its failure to the others, which are waiting at their next exchange.
A rank that dies without raising (killed, segfault) is caught by the launcher: ``torchrun`` stops every worker
when one exits with an error.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch

from sst_merge.errors import ConfigError, SSTMergeError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attribute set on an exception once its rank has told the others, so an outer guard does not announce it twice.
_ANNOUNCED = "_sst_merge_rank_announced"


class RankFailedError(SSTMergeError):
    """Another rank (or this one) failed; the whole distributed run stops without writing results."""


# ---- who am I -------------------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def active() -> bool:
    """True when a process group with more than one rank is initialised (work is then sharded)."""
    dist = _dist()
    return dist is not None and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank: from the process group, else ``$RANK`` (set by torchrun), else 0."""
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks: from the process group, else ``$WORLD_SIZE``, else 1."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank on this node (``$LOCAL_RANK``, set by torchrun and accelerate), used to pick this rank's GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Ranks on this node (``$LOCAL_WORLD_SIZE``), 1 when not launched by torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    """True on rank 0 — the only rank that writes files and prints results."""
    return rank() == 0


# ---- process group ----------------------------------------------------------------------------------------------


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by torchrun's environment; return whether the run is distributed.

    A no-op returning ``False`` when ``$WORLD_SIZE`` is unset or 1 (a plain ``python``/``sst-merge`` call) and
    ``True`` when a group is already initialised (e.g. by ``accelerate launch`` or the caller). The backend is
    ``nccl`` when CUDA is available (each rank then uses GPU ``$LOCAL_RANK``) and ``gloo`` on CPU.

    Args:
        backend: force a backend (``gloo``, ``nccl``).
        timeout_s: how long a collective waits for a missing rank (default: ``$SST_MERGE_DIST_TIMEOUT`` or
            torch's default of 30 minutes for gloo / 10 for nccl).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed; launch a single process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun or accelerate launch"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())  # before init: object collectives use the current device
    env_timeout = os.environ.get("SST_MERGE_DIST_TIMEOUT")
    seconds = timeout_s if timeout_s is not None else (float(env_timeout) if env_timeout else None)
    kwargs: dict[str, Any] = {"timeout": _dt.timedelta(seconds=seconds)} if seconds else {}
    dist.init_process_group(backend, init_method="env://", **kwargs)
    log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def shutdown() -> None:
    """Leave the process group if this process joined one (idempotent)."""
    dist = _dist()
    if dist is not None:
        dist.destroy_process_group()


def device() -> torch.device:
    """The device collectives run on: this rank's GPU under nccl, else the CPU."""
    dist = _dist()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def replica_device_map(requested: str | None) -> str | dict[str, Any] | None:
    """The ``device_map`` for loading this rank's model replica.

    * ``None`` (default): with CUDA, the whole replica on GPU ``$LOCAL_RANK`` (one replica per GPU under torchrun;
      GPU 0 in a single process); without CUDA ``None`` (Transformers' default: the CPU).
    * ``"auto"``: model parallel over the GPUs (Accelerate's big-model placement). In a single process it spreads
      the model over every visible GPU; under torchrun with one rank per GPU it is the same as the default.
    * anything else (``"cpu"``, ``"cuda:1"``) is passed to ``from_pretrained`` unchanged.

    Raises:
        ConfigError: ``auto`` with several ranks per node *and* several GPUs per rank — that placement is not
            derived here; run one rank per node (``--nproc_per_node 1``) or one rank per GPU.
    """
    if requested is None:
        return {"": local_rank()} if torch.cuda.is_available() else None
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return None
    per_node = local_world_size()
    if per_node <= 1:
        return "auto"
    gpus = torch.cuda.device_count()
    if gpus <= per_node:
        return {"": local_rank()}
    raise ConfigError(
        f"device_map=auto with {per_node} ranks on a node of {gpus} GPUs: launch one rank per node "
        "(--nproc_per_node 1, model parallel) or one rank per GPU (data parallel)"
    )


# ---- sharding ---------------------------------------------------------------------------------------------------


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """Indices of ``n`` items that rank ``rank_`` processes: round-robin, so long and short items spread evenly."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if not 0 <= r < w:
        raise ValueError(f"rank {r} is outside [0, {w})")
    return list(range(r, n, w))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (all of them when the run is not distributed)."""
    if not active():
        return list(items)
    return [items[i] for i in shard_indices(len(items))]


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Re-interleave round-robin shards (``parts[r]`` from rank ``r``) into the original order of ``n`` items."""
    w = len(parts)
    for r, part in enumerate(parts):
        if len(part) != len(range(r, n, w)):
            raise RankFailedError(f"rank {r} returned {len(part)} results for its shard of {n} items")
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        out[r::w] = list(part)
    return out


# ---- exchanges --------------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _exchange(tag: str, error: str | None, payload: Any) -> list[Any]:
    """All-gather ``(tag, error, payload)``; raise :class:`RankFailedError` when a rank failed or ranks diverged."""
    dist = _dist()
    got: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(got, (tag, error, payload))
    failed = [(r, t, e) for r, (t, e, _) in enumerate(got) if e is not None]
    if failed:
        r, t, e = failed[0]
        raise RankFailedError(f"rank {r} failed at {t!r}: {e}; the run stopped on every rank, no results written")
    tags = {t for t, _, _ in got}
    if len(tags) > 1:
        raise RankFailedError(f"ranks reached different steps ({', '.join(sorted(tags))}); the run stopped")
    return [p for _, _, p in got]


def gather_checked(tag: str, fn: Callable[[], T]) -> list[T]:
    """Run ``fn()`` on every rank and return every rank's result (index = rank); fail on all ranks if one fails.

    Without a distributed run it returns ``[fn()]`` and lets ``fn``'s exceptions through unchanged. Under one,
    the local exception is re-raised on its rank after the others were told; the other ranks raise
    :class:`RankFailedError`.
    """
    if not active():
        return [fn()]
    try:
        value = fn()
    except Exception as e:
        if not isinstance(e, RankFailedError) and not getattr(e, _ANNOUNCED, False):
            setattr(e, _ANNOUNCED, True)
            with contextlib.suppress(RankFailedError):  # the exchange re-raises our own error; ours is the one to see
                _exchange(tag, _describe(e), None)
        raise
    return _exchange(tag, None, value)


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (index = rank); ``[obj]`` without a distributed run. Failures are checked."""
    return gather_checked("all_gather_object", lambda: obj)


def gather_sharded(tag: str, items: Sequence[Any], fn: Callable[[list[Any]], list[T]]) -> list[T]:
    """Apply ``fn`` (one result per item) to this rank's shard of ``items``; return all results in item order."""
    if not active():
        return list(fn(list(items)))
    mine = shard(items)
    parts = gather_checked(tag, lambda: list(fn(mine)) if mine else [])
    return unshard(parts, len(items))


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself without a distributed run).

    Unchecked: a rank that fails before reaching it leaves the others waiting. Where the sender may fail, use
    ``gather_checked(tag, lambda: obj if rank() == src else None)[src]``.
    """
    dist = _dist()
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a distributed run)."""
    if active():
        _dist().barrier()


def all_reduce_tensors(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Sum a (possibly nested) dict of tensors over ranks; return the sums as CPU tensors in the input dtypes.

    The sums run on :func:`device` (the rank's GPU under nccl). A tensor already there is summed in place — no copy,
    which matters for ``lowrank`` gradient rows of several GiB. Without a distributed run the tensors are returned
    as they are.
    """
    if not active():
        return dict(tensors)
    dist = _dist()
    dev = device()
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if isinstance(value, Mapping):
            out[key] = all_reduce_tensors(value)
            continue
        buf = value.to(dev)
        dist.all_reduce(buf)
        out[key] = buf.cpu()
    return out


@contextlib.contextmanager
def all_or_nothing(tag: str) -> Iterator[None]:
    """Guard a whole distributed run: leave the block only if every rank finished it without error.

    A rank whose block raises tells the others (which are then waiting at an exchange) and re-raises; on success the
    ranks check each other once more at the end, so rank 0 writes results only after every rank succeeded.
    Without a distributed run this does nothing.
    """
    try:
        yield
    except Exception as e:
        if active() and not isinstance(e, RankFailedError) and not getattr(e, _ANNOUNCED, False):
            setattr(e, _ANNOUNCED, True)
            with contextlib.suppress(RankFailedError):
                _exchange(tag, _describe(e), None)
        raise
    if active():
        _exchange(tag, None, None)
