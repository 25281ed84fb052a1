"""The merge library call: a validated config in, merged ΔW or an output directory out.

``sst-merge merge`` is a thin wrapper over :func:`merge`; the experiment runner calls :func:`merge_deltas` or
:func:`merge` directly. Everything a user can get wrong is checked in :func:`prepare`, before the base model is
loaded or any ΔW is computed, and nothing is written until the merge has succeeded.

Relative paths (adapters, base model) are resolved against the current directory, like any command-line tool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sst_merge import distributed as ddp
from sst_merge import models
from sst_merge.adapters.lora import LoraAdapter
from sst_merge.config import apply_overrides, load_yaml, validate
from sst_merge.errors import AdapterError, ConfigError
from sst_merge.io import atomic_output_dir, check_output_dir
from sst_merge.merge import get_method
from sst_merge.merge.base import MergeContext, MergeMethod, MethodParams
from sst_merge.merge.output import write_output
from sst_merge.models import base_identity, resolve_model
from sst_merge.tensors import all_finite

log = logging.getLogger(__name__)


class AdapterSpec(BaseModel):
    """One input adapter: its directory, weight wᵢ and role."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="PEFT LoRA adapter directory")
    weight: float = Field(1.0, description="the adapter's weight wᵢ")
    role: Literal["utility", "safety"] = Field("utility", description="utility or safety (used by the sst method)")


class OutputSpec(BaseModel):
    """What the merge writes: a PEFT adapter (``peft``) or a full model (``full``)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["peft", "full"] = Field("peft", description="peft adapter directory, or full model weights")
    rank: int | None = Field(None, ge=1, description="peft: truncated-SVD rank per module")
    energy: float | None = Field(None, gt=0, le=1, description="peft: keep this fraction of ‖ΔW‖_F² per module")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="full: saved weight dtype (auto = the base model's own dtype); peft: float32 unless set"
    )

    @model_validator(mode="after")
    def _one_truncation(self) -> OutputSpec:
        if self.rank is not None and self.energy is not None:
            raise ValueError("give output.rank or output.energy, not both")
        if self.format == "full" and (self.rank is not None or self.energy is not None):
            raise ValueError("output.rank/output.energy apply only to format: peft; remove them for a full model")
        return self


class MergeConfig(BaseModel):
    """A merge: base model, method, adapters, method parameters, output. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="base model: alias, local directory or hub id")
    method: str = Field(description="a registered merge method (sst-merge list)")
    adapters: list[AdapterSpec] = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (validated by it)")
    output: OutputSpec = Field(default_factory=OutputSpec)


def load_config(path: str | Path, overrides: list[str] | None = None) -> MergeConfig:
    """Read a merge YAML, apply dotted ``key=value`` overrides, validate it."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(MergeConfig, data, source=f"config {path}")


def _as_config(config: MergeConfig | dict[str, Any]) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else validate(MergeConfig, dict(config))


@dataclass
class MergePlan:
    """A validated merge, ready to run: the method instance, its parsed params, and the context."""

    config: MergeConfig
    method: MergeMethod
    params: MethodParams
    context: MergeContext

    @property
    def exact_peft(self) -> bool:
        """Whether the PEFT output is written exactly by concatenating factors (no truncation asked for)."""
        out = self.config.output
        return (
            out.rank is None
            and out.energy is None
            and self.method.linear_coefficients(self.params, self.context) is not None
        )


def _memoised_loader(base_model: str) -> Callable[[], tuple[Any, Any]]:
    cache: list[tuple[Any, Any]] = []

    def load() -> tuple[Any, Any]:
        if not cache:
            log.info("loading base model %s", base_model)
            cache.append(models.load_model(base_model, device_map=ddp.replica_device_map(None)))  # the GPU when present
        return cache[0]

    return load


def check_compatible(adapters: list[LoraAdapter]) -> list[str]:
    """Refuse adapters that cannot be merged together; return the sorted union of their modules.

    Checks: ``modules_to_save`` copies, one base model, overlapping target modules, equal ΔW shapes per module.
    """
    for a in adapters:
        a.check_extra()
    first = adapters[0]
    for a in adapters[1:]:
        # one base recorded two ways (an alias, its cache directory here or on another machine) is one base
        x, y = (base_identity(b) if b else "" for b in (first.base_model, a.base_model))
        if x and y and x != y:
            raise AdapterError(
                f"adapters {first.path} (base {first.base_model}) and {a.path} (base {a.base_model}) were trained on "
                "different base models; merge only adapters of one base model (or fix base_model_name_or_path)"
            )
        common = set(first.modules) & set(a.modules)
        if not common:
            raise AdapterError(
                f"adapters {first.path} ({_summary(first.modules)}) and {a.path} ({_summary(a.modules)}) share no "
                "target module; their ΔW do not line up, so there is nothing to merge"
            )
    shapes: dict[str, tuple[tuple[int, int], Path]] = {}
    for a in adapters:
        for m, (A, B) in a.factors.items():
            shape = (int(B.shape[0]), int(A.shape[1]))
            if m in shapes and shapes[m][0] != shape:
                raise AdapterError(
                    f"module {m}: ΔW shape {shapes[m][0]} in {shapes[m][1]} but {shape} in {a.path}; the adapters "
                    "are for different model sizes"
                )
            shapes.setdefault(m, (shape, a.path))
    modules = sorted(shapes)
    for a in adapters:
        missing = len(modules) - len(a.modules)
        if missing:
            log.info("adapter %s does not touch %d of %d modules; its ΔW there is 0", a.path, missing, len(modules))
    return modules


def _summary(modules: list[str]) -> str:
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return f"{len(modules)} modules: {', '.join(leaves)}"


def check_base_shapes(base_model: str, adapters: list[LoraAdapter]) -> None:
    """Check every module against the base model's architecture, built on the meta device (no weights loaded).

    Raises:
        AdapterError: a module is missing from the base model, has another shape, or is a tied embedding.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(resolve_model(base_model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    io_modules = {
        n for n, mod in model.named_modules() if mod in (model.get_input_embeddings(), model.get_output_embeddings())
    }
    for a in adapters:
        for m, (A, B) in a.factors.items():
            try:
                weight = model.get_submodule(m).weight
            except AttributeError:
                raise AdapterError(
                    f"adapter {a.path}: module {m} does not exist in base model {base_model}; "
                    "is the adapter for another model?"
                ) from None
            shape = (int(B.shape[0]), int(A.shape[1]))
            if tuple(weight.shape) != shape:
                raise AdapterError(
                    f"adapter {a.path}: module {m} has ΔW shape {shape} but base model {base_model} has "
                    f"{tuple(weight.shape)}; is the adapter for another model?"
                )
            if tied and m in io_modules:
                raise AdapterError(
                    f"adapter {a.path}: module {m} is a tied embedding in base model {base_model}; a full-model "
                    "merge would change both embeddings. Use output.format: peft"
                )


def prepare(
    config: MergeConfig | dict[str, Any],
    allow_pickle: bool = False,
    load_model: Callable[[], tuple[Any, Any]] | None = None,
    show_progress: bool = True,
    workdir: str | Path | None = None,
    params: MethodParams | None = None,
) -> MergePlan:
    """Validate everything about a merge before heavy work: method, params, adapters, output.

    Args:
        config: the merge config (a :class:`MergeConfig` or a plain dict).
        allow_pickle: accept ``adapter_model.bin`` pickle checkpoints (they can run code when loaded).
        load_model: returns ``(model, tokenizer)`` of the base model for methods that need it; default loads
            ``config.base_model`` once, on first use.
        show_progress: draw progress bars.
        workdir: a directory methods may use for caches and diagnostics (``MergeContext.workdir``).
        params: the method's parameters, already validated (an experiment's spec carries them); default: validate
            ``config.params``.

    Raises:
        ConfigError, AdapterError: one line naming the bad input and the fix.
    """
    config = _as_config(config)
    method = get_method(config.method)
    if params is None:
        params = validate(method.Params, dict(config.params), source=f"params of method {config.method}")
    elif not isinstance(params, method.Params):
        raise ConfigError(f"params of method {config.method} are {type(params).__name__}, not {method.Params.__name__}")
    adapters = [LoraAdapter.load(spec.path, allow_pickle=allow_pickle) for spec in config.adapters]
    modules = check_compatible(adapters)
    ctx = MergeContext(
        adapters=adapters,
        weights=[spec.weight for spec in config.adapters],
        roles=[spec.role for spec in config.adapters],
        modules=modules,
        base_model=config.base_model,
        load_model=load_model or _memoised_loader(config.base_model),
        workdir=Path(workdir) if workdir is not None else None,
        show_progress=show_progress,
    )
    method.check(params, ctx)
    plan = MergePlan(config=config, method=method, params=params, context=ctx)
    out = config.output
    if out.format == "peft" and out.rank is None and out.energy is None and not plan.exact_peft:
        raise ConfigError(
            f"method {config.method} is not a sum of LoRA factors, so a peft output needs a truncation: "
            "set output.rank (e.g. output.rank=16) or output.energy (e.g. output.energy=0.99), or use output.format=full"
        )
    if out.format == "full":
        check_base_shapes(config.base_model, adapters)
    return plan


def merge_deltas(
    config: MergeConfig | dict[str, Any],
    allow_pickle: bool = False,
    load_model: Callable[[], tuple[Any, Any]] | None = None,
    show_progress: bool = True,
    workdir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Return the merged ΔW (fp32, module name → (out, in)) of a merge config; nothing is written.

    Arguments as for :func:`prepare`.
    """
    plan = prepare(config, allow_pickle, load_model=load_model, show_progress=show_progress, workdir=workdir)
    return run_plan(plan)


def run_plan(plan: MergePlan) -> dict[str, torch.Tensor]:
    """Run a prepared merge and return its ΔW; refuse a result with NaN/Inf (a failed merge is never saved)."""
    return dict(iter_plan(plan))


def iter_plan(plan: MergePlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Run a prepared merge one module at a time, yielding ``(module, ΔW)``; NaN/Inf raise :class:`ConfigError`."""
    ctx = plan.context
    log.info("merging %d adapters with %s over %d modules", len(ctx.adapters), plan.method.name, len(ctx.modules))
    for m, d in plan.method.iter_merge(plan.params, ctx):
        if not all_finite(d):
            raise ConfigError(f"method {plan.method.name} produced NaN/Inf in module {m}; check its parameters")
        yield m, d


def merge(
    config: MergeConfig | dict[str, Any],
    out_dir: str | Path,
    force: bool = False,
    allow_pickle: bool = False,
    load_model: Callable[[], tuple[Any, Any]] | None = None,
    show_progress: bool = True,
    workdir: str | Path | None = None,
) -> Path:
    """Merge the adapters of ``config`` and write the output directory (atomically); return its path.

    Args:
        config: the merge config.
        out_dir: the output directory; an existing non-empty one is refused unless ``force``.
        force: replace an existing output.
        allow_pickle: accept pickle adapter checkpoints.
        load_model: base-model loader for methods that need the model (see :func:`prepare`). The ``full`` output
            always loads its own fresh copy of the base model, so a caller's model is never modified.
        show_progress: draw progress bars.
        workdir: a directory methods may use for caches (see :func:`prepare`).
    """
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    plan = prepare(config, allow_pickle, load_model=load_model, show_progress=show_progress, workdir=workdir)
    # ΔW is streamed into the output module by module (never all held at once); an exact peft output needs none.
    deltas = None if (plan.config.output.format == "peft" and plan.exact_peft) else iter_plan(plan)
    with atomic_output_dir(out_dir, force=force) as tmp:
        write_output(plan, deltas, tmp)
    log.info("wrote %s", out_dir)
    return out_dir
