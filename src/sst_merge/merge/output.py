"""Write a merge's output directory: a PEFT adapter or a full model, plus metadata and a model card.

Files in every output:

* ``README.md`` — model card: method, parameters, inputs with content hashes, tool version.
* ``merge_config.json`` — the resolved merge config (re-runnable with ``sst-merge merge``).
* ``merge_metadata.json`` — the same facts machine-readable, per-module rank and relative Frobenius error of a
  truncated PEFT output, and the method's diagnostics.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from sst_merge import __version__, models
from sst_merge.adapters.lora import CONFIG_NAME
from sst_merge.adapters.lowrank import concat_factors, randomized_svd_factors, svd_factors
from sst_merge.adapters.save import save_lora
from sst_merge.fisher.diagnostics import write_spectrum
from sst_merge.io import atomic_write_json, atomic_write_text, sha256_file
from sst_merge.models import resolve_model
from sst_merge.models.loading import DTYPES, loadable_base

log = logging.getLogger(__name__)


Deltas = Iterable[tuple[str, torch.Tensor]]
T = TypeVar("T")


def write_output(plan: Any, deltas: Deltas | None, out_dir: Path) -> dict[str, Any]:
    """Write the output of ``plan`` (a :class:`~sst_merge.merge.api.MergePlan`) into ``out_dir``; return metadata.

    ``deltas`` yields the merged ``(module, ΔW)`` pairs (a dict's ``.items()`` or a stream from
    :func:`~sst_merge.merge.api.iter_plan`, consumed once, one module at a time); it may be ``None`` only for an
    exact PEFT output (factors are concatenated).
    """
    out = plan.config.output
    if out.format == "peft":
        modules = _write_peft(plan, deltas, out_dir)
    else:
        assert deltas is not None, "a full output needs the merged ΔW"
        modules = _write_full(plan, deltas, out_dir)
    meta = _metadata(plan, modules)
    atomic_write_json(out_dir / "merge_config.json", plan.config.model_dump(mode="json"))
    atomic_write_json(out_dir / "merge_metadata.json", meta)
    if "sst" in plan.context.diagnostics:  # λ spectrum per module and kept norm share: JSON + PNG (design §5)
        write_spectrum(plan.context.diagnostics["sst"], out_dir)
    atomic_write_text(out_dir / "README.md", model_card(meta))
    return meta


def _write_peft(plan: Any, deltas: Deltas | None, out_dir: Path) -> dict[str, dict[str, Any]]:
    ctx, out = plan.context, plan.config.output
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    stats: dict[str, dict[str, Any]] = {}
    embedding = set().union(*(a.embedding_modules for a in ctx.adapters))
    if deltas is None:
        coeffs = plan.method.linear_coefficients(plan.params, ctx)
        for m in ctx.modules:
            have = [(a, c) for a, c in zip(ctx.adapters, coeffs, strict=True) if m in a.factors]
            factors[m] = concat_factors([a.factors[m] for a, _ in have], [c * a.scale(m) for a, c in have])
            stats[m] = {"rank": int(factors[m][0].shape[0]), "rel_frobenius_error": 0.0}
    else:
        stream = _prefetched(deltas) if _pipeline_pays() else deltas
        bar = tqdm(stream, total=len(ctx.modules), desc="merge + SVD", disable=not ctx.show_progress, leave=False)
        for m, delta in bar:
            A, B, err = _truncate(delta, out.rank, out.energy)
            factors[m] = (A, B)
            stats[m] = {"rank": int(A.shape[0]), "rel_frobenius_error": err}
    dtype = torch.float32 if out.dtype == "auto" else DTYPES[out.dtype]
    # the base directory that loads here (an alias means nothing to PEFT), as `sst-merge train` records it
    base = loadable_base(plan.config.base_model)
    save_lora(out_dir, factors, base_model=base, embedding_modules=embedding, dtype=dtype)
    return stats


def _pipeline_pays() -> bool:
    """Whether a spare core is idle while torch computes: then merging the next module while this one is truncated
    overlaps the two (torch releases the GIL inside its kernels); with every core already in torch's pool it
    would only oversubscribe them."""
    return (os.cpu_count() or 1) > torch.get_num_threads()


def _prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield ``items`` in order, computed ahead by one background thread (at most ``depth`` waiting).

    The iterator runs entirely in that thread (so a method's generator draws in the same order as without it);
    an exception there is raised here, at the item where it happened.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():  # the consumer may have stopped (an error there): never block on a full queue
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # handed to the consumer, raised there
            put((done, e))

    thread = threading.Thread(target=produce, name="merge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _truncate(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A fixed rank uses the randomised SVD (its sketch seeded per module, so the output does not depend on module
    order); an energy target needs the whole spectrum, so it uses the exact one."""
    if rank is not None:
        return randomized_svd_factors(delta, rank, generator=torch.Generator().manual_seed(0))
    return svd_factors(delta, energy=energy)


def _base_dtype(base_model: str) -> torch.dtype:
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(resolve_model(base_model)), "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype, getattr(torch, dtype, None))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _write_full(plan: Any, deltas: Deltas, out_dir: Path) -> dict[str, dict[str, Any]]:

    out, base = plan.config.output, plan.config.base_model
    dtype = _base_dtype(base) if out.dtype == "auto" else DTYPES[out.dtype]
    # A fresh fp32 copy: ΔW is added in fp32 and the sum cast once, and no caller's model is modified.
    model, tok = models.load_model(base, dtype="float32")
    stats: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        bar = tqdm(
            deltas,
            total=len(plan.context.modules),
            desc="merge + add ΔW",
            disable=not plan.context.show_progress,
            leave=False,
        )
        for m, d in bar:
            weight = model.get_submodule(m).weight
            weight.add_(d.to(weight.dtype))
            stats[m] = {"delta_frobenius_norm": float(torch.linalg.matrix_norm(d))}
    model.to(dtype)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return stats


def _metadata(plan: Any, modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ctx, cfg = plan.context, plan.config
    inputs = []
    for spec, a in zip(cfg.adapters, ctx.adapters, strict=True):
        inputs.append(
            {
                "path": spec.path,
                "weight": spec.weight,
                "role": spec.role,
                "r": a.r,
                "lora_alpha": a.lora_alpha,
                "use_rslora": a.use_rslora,
                "base_model_name_or_path": a.base_model,
                "weights_sha256": a.sha256,
                "config_sha256": sha256_file(a.path / CONFIG_NAME),
            }
        )
    errors = [s["rel_frobenius_error"] for s in modules.values() if "rel_frobenius_error" in s]
    ranks = [s["rank"] for s in modules.values() if "rank" in s]
    out = cfg.output
    summary: dict[str, Any] = {"format": out.format, "dtype": out.dtype, "modules": len(modules)}
    if out.format == "peft":
        summary |= {
            "exact": out.rank is None and out.energy is None,
            "svd": None if out.rank is None and out.energy is None else "randomized" if out.rank else "exact",
            "rank": out.rank,
            "energy": out.energy,
            "max_rank": max(ranks),
            "max_rel_frobenius_error": max(errors),
            "mean_rel_frobenius_error": sum(errors) / len(errors),
        }
    return {
        "tool": "sst-merge",
        "version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": cfg.method,
        "params": plan.params.model_dump(mode="json", by_alias=True),
        "base_model": cfg.base_model,
        "inputs": inputs,
        "output": summary,
        "modules": modules,
        "diagnostics": _jsonable(ctx.diagnostics),
    }


def _jsonable(obj: Any) -> Any:
    """Turn a method's diagnostics into strict JSON: tensors/arrays to lists, NaN/Inf to null, keys to str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # torch tensors, numpy arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def model_card(meta: dict[str, Any]) -> str:
    """Render the model card (README.md) of an output from its metadata."""
    out = meta["output"]
    lines = [
        f"# Merged with sst-merge ({meta['method']})",
        "",
        f"Made by sst-merge {meta['version']} on {meta['created_utc']} with `sst-merge merge`.",
        "",
        f"* **Method:** `{meta['method']}`",
        f"* **Parameters:** `{json.dumps(meta['params'], sort_keys=True)}`",
        f"* **Base model:** `{meta['base_model']}`",
        f"* **Output:** {out['format']}",
    ]
    if out["format"] == "peft":
        if out["exact"]:
            lines.append(f"  — exact (LoRA factors concatenated, rank up to {out['max_rank']})")
        else:
            how = f"rank {out['rank']}" if out["rank"] is not None else f"energy {out['energy']}"
            lines.append(
                f"  — truncated {out.get('svd') or 'exact'} SVD at {how} (max rank {out['max_rank']}); relative Frobenius error per module: "
                f"max {out['max_rel_frobenius_error']:.4g}, mean {out['mean_rel_frobenius_error']:.4g} "
                "(all modules in merge_metadata.json)"
            )
    lines += ["", "## Inputs", "", "| role | weight | adapter | r | weights sha256 |", "|---|---|---|---|---|"]
    for i in meta["inputs"]:
        lines.append(f"| {i['role']} | {i['weight']} | `{i['path']}` | {i['r']} | `{i['weights_sha256']}` |")
    lines += ["", "The resolved config is in `merge_config.json`; re-run with `sst-merge merge merge_config.json`.", ""]
    return "\n".join(lines)
