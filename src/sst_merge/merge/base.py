"""The merge-method interface and its registry.

A merge method turns the per-module ΔW of several adapters into one ΔW per module. Methods are classes registered
by name in :data:`MERGE_METHODS`; adding one is a new file plus its ``@MERGE_METHODS.register`` line, and the CLI,
config and runner pick it up unchanged. Each method declares a pydantic ``Params`` model (unknown keys refused).

Most methods are module-local: they implement :meth:`MergeMethod.merge_module`, a pure tensor kernel that never
sees a model or a file. Methods that need the model (SST-Merge's Fisher estimation) override :meth:`merge`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.errors import ConfigError
from sst_merge.registry import Registry


class MethodParams(BaseModel):
    """Parameters shared by every method. ``lambda`` is the global scale λ (default 1)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lambda_: float = Field(1.0, alias="lambda", description="global scale λ applied to the merged ΔW")
    seed: int = Field(0, description="seed for any randomness (DARE masks, Fisher sampling)")


#: A method's own parameters (a subclass of :class:`MethodParams`); ``MergeMethod[P]`` is typed by it.
P = TypeVar("P", bound=MethodParams)


@dataclass
class MergeContext:
    """What a merge sees: the adapters, their weights and roles, and (lazily) the base model.

    Attributes:
        adapters: loaded adapters, in config order.
        weights: one weight per adapter.
        roles: ``utility`` or ``safety`` per adapter.
        modules: the module names to merge (the union of every adapter's targets).
        base_model: the base model's path or alias (for methods that need the model).
        load_model: returns ``(model, tokenizer)`` for the base model; only methods that need it call it.
        workdir: a directory for caches and diagnostics (may be ``None``).
        diagnostics: methods put JSON-serialisable diagnostics here; they are written with the output.
        show_progress: whether to draw progress bars.
    """

    adapters: list[LoraAdapter]
    weights: list[float]
    roles: list[str]
    modules: list[str]
    base_model: str | None = None
    load_model: Callable[[], tuple[Any, Any]] | None = None
    workdir: Any = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True

    def taus(self, module: str) -> list[torch.Tensor | None]:
        """ΔW of every adapter for ``module`` (fp32), ``None`` where an adapter does not touch it."""
        return [a.delta(module) if module in a.factors else None for a in self.adapters]

    def weighted_sum(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """``Σ wᵢ ΔWᵢ`` over the adapters ``indices`` (in that order), for every module one of them touches."""
        out: dict[str, torch.Tensor] = {}
        for i in indices:
            for m in self.adapters[i].modules:
                dw = self.weights[i] * self.adapters[i].delta(m)
                out[m] = out[m] + dw if m in out else dw
        return out


class MergeMethod(Generic[P]):
    """Base class of merge methods, generic in their parameters: ``class Ties(MergeMethod[TiesParams])``.

    Subclasses set ``name``, ``Params`` (the same class as the type argument) and implement a kernel or ``merge``.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: One line shown by ``sst-merge list``.
    description: ClassVar[str] = ""
    #: Bumped when the method's output for the same inputs changes, so cached evaluations of it are not reused.
    version: ClassVar[int] = 1

    # -- the planner's facts (sst_merge.plan reads them through the registry, never a method's name) ---------------
    #: the Fisher statistic the method computes per adapter on that adapter's own data (``None``: no such pass)
    own_statistic: ClassVar[str | None] = None
    #: whether the merge runs TIES' trim and sign election over every module
    trims: ClassVar[bool] = False
    #: whether the merge runs SST's Fisher pass (``F_s`` and ``F_u`` at the pre-merge point)
    sst_fisher_pass: ClassVar[bool] = False

    def fit_plan(self, params: P) -> dict[str, int] | None:
        """What fitting the method's coefficients runs (``steps``, ``batch``, ``length``, ``terms``, ``benign``,
        ``tokens``: :class:`sst_merge.plan.LearnedFit`'s fields), or ``None`` for a method that fits nothing."""
        return None

    #: The parameter that holds the safety weight (``sst``: ``alpha``); ``None``: the safety adapter's own weight.
    safety_weight_param: ClassVar[str | None] = None

    def check(self, params: P, ctx: MergeContext) -> None:
        """Refuse inputs this method cannot merge (raise :class:`~sst_merge.errors.ConfigError`); called before any
        heavy work. The default accepts everything."""

    def apply_safety_weight(
        self, params: dict[str, Any], weights: list[float], roles: list[str], alpha: float
    ) -> tuple[dict[str, Any], list[float]]:
        """Return the ``(params, adapter weights)`` that put the safety adapter at safety weight ``alpha``.

        A safety-weight sweep (exp3) calls this, so a method decides what its safety weight is. The default: the
        parameter :attr:`safety_weight_param` where the method has one (the safety adapter's own weight then stays
        1), else every ``safety`` adapter's weight becomes ``alpha`` (the ``Σ wᵢτᵢ`` methods).
        """
        name = self.safety_weight_param
        if name is None:
            return dict(params), [alpha if r == "safety" else w for w, r in zip(weights, roles, strict=True)]
        return {**params, name: alpha}, [1.0 if r == "safety" else w for w, r in zip(weights, roles, strict=True)]

    def configured_safety_weight(self, params: dict[str, Any]) -> float:
        """Return the safety weight that ``params`` (the method's configured parameters) give.

        exp2 merges each method at this weight: :attr:`safety_weight_param`'s value (its default where unset), or 1
        for the ``Σ wᵢτᵢ`` methods, which hold no safety weight in their parameters.
        """
        name = self.safety_weight_param
        return 1.0 if name is None else float(params.get(name, self.Params.model_fields[name].default))

    def linear_coefficients(self, params: P, ctx: MergeContext) -> list[float] | None:
        """Return cᵢ such that the merge equals Σ cᵢ τᵢ for every module, or ``None`` if it is not linear."""
        return None

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: P, generator: torch.Generator
    ) -> torch.Tensor:
        """Merge one module's ΔW list (fp32, same shape) into one ΔW. Pure: tensors in, tensor out."""
        raise NotImplementedError

    def merge(self, params: P, ctx: MergeContext) -> dict[str, torch.Tensor]:
        """Merge every module. The default calls :meth:`merge_module` per module with a seeded generator.

        Adapters that do not touch a module contribute a zero ΔW there (same shape as the others).
        """
        return dict(self.stream_modules(params, ctx))

    def iter_merge(self, params: P, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(module, ΔW)`` one module at a time, so outputs can be written without holding every ΔW.

        A method that overrides :meth:`merge` yields from its result; module-local methods stream
        (:meth:`stream_modules`).
        """
        if type(self).merge is not MergeMethod.merge:
            yield from self.merge(params, ctx).items()
        else:
            yield from self.stream_modules(params, ctx)

    def stream_modules(self, params: P, ctx: MergeContext) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield :meth:`merge_module` of each module in ``ctx.modules`` order, with one generator seeded once
        (so the stream and :meth:`merge` draw the same random numbers)."""
        gen = torch.Generator().manual_seed(params.seed)
        for module in tqdm(ctx.modules, desc=f"merge ({self.name})", disable=not ctx.show_progress, leave=False):
            taus = ctx.taus(module)
            ref = next(t for t in taus if t is not None)
            taus = [torch.zeros_like(ref) if t is None else t for t in taus]
            yield module, self.merge_module(taus, ctx.weights, params, gen)


def check_same_linear_targets(ctx: MergeContext, method: str) -> None:
    """Refuse adapters that change an embedding or whose target modules differ (methods that estimate statistics or
    coefficients per module of every adapter need the same linear targets in all of them).

    Raises:
        ConfigError: one line naming the adapter and the fix.
    """
    first = ctx.adapters[0]
    for i, a in enumerate(ctx.adapters):
        if a.embedding_modules:
            raise ConfigError(
                f"{method}: adapter {i} ({a.path}) changes embedding {sorted(a.embedding_modules)[0]}; "
                "it merges linear layers only — retrain the adapter without embedding targets"
            )
        if set(a.modules) != set(first.modules):
            odd = sorted(set(a.modules) ^ set(first.modules))[0]
            raise ConfigError(
                f"{method}: adapter {i} ({a.path}) and adapter 0 ({first.path}) target different "
                f"modules (e.g. {odd}) — retrain with the same target modules"
            )


MERGE_METHODS: Registry[type[MergeMethod]] = Registry("merge method")
