"""The Fisher approximations as a registry: each one is one file that says what it stores and how it projects.

An :class:`Approximation` has two halves:

* estimation — :meth:`~Approximation.init`, :meth:`~Approximation.update` (one batch of captured activations ``a``,
  output gradients ``δ`` and, when :attr:`~Approximation.per_example`, the per-example gradients ``g``) and
  :meth:`~Approximation.finish`; :func:`sst_merge.fisher.estimate.estimate_fisher` drives them;
* projection — :meth:`~Approximation.project`: relative damping, the generalized eigenproblem
  ``F_s v = λ (F_u + Σ β_j F_j + εI) v``, selection and the oblique projection of one module's safety ΔW.

``eps`` is relative to the mean diagonal of ``F_u`` only (a penalty Fisher ``F_j`` added with weight ``β_j`` does not
change the damping, so ``β = 0`` is exactly the projector without the penalty). Register a new approximation with
``@APPROXIMATIONS.register("name")`` in its own module and import that module in :mod:`sst_merge.fisher.solve`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from sst_merge.fisher.gevp import Selection
from sst_merge.machine import Rates
from sst_merge.registry import Registry

Stats = dict[str, torch.Tensor]


class ZeroUtilityFisherError(ValueError):
    """``F_u`` is zero on a module, so a relative ``ε`` is zero and ``B`` is singular."""


@dataclass
class ModuleResult:
    """One module's projection and what to report about it.

    Attributes:
        projected: ``P_k(τ_safety)``, same shape and dtype as the input.
        lam_desc: known eigenvalues in decreasing order (float64).
        n_directions: dimension ``p`` of the module's space.
        n_positive: number of eigenvalues > 0 (the rank of ``F_s``: the directions the GEVP really ranks).
        n_kept: number of directions kept (``p`` = identity).
        damping: the absolute damping used (for kfac: ``(ε_A, ε_G)``).
    """

    projected: torch.Tensor
    lam_desc: torch.Tensor
    n_directions: int
    n_positive: int
    n_kept: int
    damping: float | tuple[float, float]


def check_mean(value: float, what: str) -> float:
    """Return a mean diagonal that sets a relative damping; raise when it is not finite or zero."""
    if not math.isfinite(value):
        raise ValueError(f"{what} is not finite")
    if value <= 0:
        raise ZeroUtilityFisherError(f"{what} is zero: the utility data produced no gradient for this module")
    return value


class Approximation:
    """One Fisher approximation: what it stores per module, how it accumulates, how it projects."""

    name: ClassVar[str] = ""
    #: whether :meth:`update` needs the per-example gradients ``g`` (B, out, in)
    per_example: ClassVar[bool] = True
    #: whether a penalty Fisher can be added to ``B`` (the structure survives a weighted sum)
    supports_penalty: ClassVar[bool] = True

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        """Zero statistics of one ``out×in`` module for ``n`` examples."""
        raise NotImplementedError

    def update(
        self, stats: Stats, a: torch.Tensor, delta: torch.Tensor, g: torch.Tensor | None, index: list[int]
    ) -> None:
        """Add one batch: ``a`` (B, T, in), ``δ`` (B, T, out), ``g`` (B, out, in) or None, example indices."""
        raise NotImplementedError

    def finish(self, stats: Stats, n: int, n_tokens: int) -> Stats:
        """Normalise the sums into the statistics (``n`` examples, ``n_tokens`` non-padding tokens)."""
        return stats

    def trace(self, stats: Stats) -> float:
        """``tr F`` of one module's statistics (compares the scale of two Fishers, e.g. to read β)."""
        raise NotImplementedError

    def combine(self, parts: list[tuple[float, Stats]]) -> Stats:
        """Statistics of ``Σ w_j F_j`` from ``(w_j, statistics of F_j)`` pairs (weights > 0).

        The base class handles one part of weight 1 (nothing to add); an approximation whose structure survives a
        weighted sum (:attr:`supports_penalty`) overrides this.
        """
        if len(parts) == 1 and parts[0][0] == 1.0:
            return parts[0][1]
        raise ValueError(
            f"{self.name} cannot add Fishers (the structure is not kept by a sum); use lowrank or diagonal"
        )

    def project(
        self,
        stats_s: Stats,
        stats_u: Stats,
        tau: torch.Tensor,
        eps: float,
        selection: Selection,
        penalties: list[tuple[float, Stats]] | None = None,
    ) -> ModuleResult:
        """Project ``tau`` (out×in) onto the selected eigen-directions of ``F_s v = λ (F_u + Σ β F_j + εI) v``."""
        raise NotImplementedError

    # -- the planner's laws (sst_merge.plan): what this approximation costs, so the planner never asks its name ------
    # ``mods``: (out, in) of every target module over all layers; ``n``: examples per statistic; ``rates``: the
    # machine's (:class:`sst_merge.machine.Rates`). Each law defaults to raising: a new approximation writes its own.

    #: approximations ``plan`` suggests, in order, when a run with this one does not fit (registered names)
    plan_alternatives: ClassVar[tuple[str, ...]] = ()
    #: whether the statistics grow with N (then ``plan`` suggests a smaller ``n_samples`` when a run does not fit)
    memory_grows_with_n: ClassVar[bool] = False

    def host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        """Host bytes of both statistics at the end of the utility pass (F_s done, F_u accumulating)."""
        raise NotImplementedError(f"fisher {self.name}: no planner law host_bytes")

    def per_example_bytes(self, mods: list[tuple[int, int]], batch: int) -> float:
        """Device bytes of one batch's per-example gradients of the largest module (and what is kept beside them)."""
        raise NotImplementedError(f"fisher {self.name}: no planner law per_example_bytes")

    def finish_copy_elements(self, mods: list[tuple[int, int]]) -> int:
        """Elements of the fp32 copy :meth:`finish` makes of the largest fp64 sum while the sum is alive."""
        raise NotImplementedError(f"fisher {self.name}: no planner law finish_copy_elements")

    def batch_seconds(
        self, forward_s: float, mods: list[tuple[int, int]], batch: int, tokens: int, matmul: float, rates: Rates
    ) -> float:
        """Seconds of one Fisher batch: ``forward_s`` (forward + backward and Python's share) plus this
        approximation's statistic update over ``batch`` examples of ``tokens`` tokens in all, GEMMs at ``matmul``."""
        raise NotImplementedError(f"fisher {self.name}: no planner law batch_seconds")

    def statistics_seconds(self, overhead_s: float, mods: list[tuple[int, int]], n: int, rates: Rates) -> float:
        """Seconds of a pass's work on its statistics, once per pass: ``overhead_s`` plus zeroing, scaling, checking."""
        raise NotImplementedError(f"fisher {self.name}: no planner law statistics_seconds")

    def gevp_seconds(self, o: int, i: int, n: int, rates: Rates) -> float:
        """Seconds of the GEVP + projection of one out×in module (:meth:`project`) on the host."""
        raise NotImplementedError(f"fisher {self.name}: no planner law gevp_seconds")

    def gevp_host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        """Host bytes of the largest module's GEVP + projection besides the statistics."""
        raise NotImplementedError(f"fisher {self.name}: no planner law gevp_host_bytes")


#: name → approximation class
APPROXIMATIONS: Registry[type[Approximation]] = Registry("Fisher approximation")


def get_approximation(name: str) -> Approximation:
    """Return an instance of the approximation ``name`` (raises naming the valid names)."""
    return APPROXIMATIONS.get(name)()


def active_penalties(penalties: list[tuple[float, Stats]] | None) -> list[tuple[float, Stats]]:
    """The penalties with a non-zero weight (``β = 0`` leaves ``B`` exactly as without the penalty)."""
    out = []
    for beta, stats in penalties or []:
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"a penalty weight must be finite and >= 0, got {beta}")
        if beta > 0:
            out.append((beta, stats))
    return out


# -- shared by the planner laws of the approximations built on per-example gradients and fp64 sums -------------------

#: bytes moved (read + written) per element of the per-example gradients (B × p, fp32) after their einsum writes
#: them: the finite check reads them (``aminmax``), then ``diagonal`` squares them in place and sums over examples,
#: ``lowrank`` copies them into its rows.
PER_EXAMPLE_BYTES = 16


def per_example_batch_seconds(
    forward_s: float,
    mods: list[tuple[int, int]],
    batch: int,
    tokens: int,
    matmul: float,
    rates: Rates,
    extra_fresh: float = 0.0,
) -> float:
    """``forward_s`` plus the per-example gradients' einsum (2·B·T·p FLOPs), the page faults of their fresh B×p fp32
    buffer (plus ``extra_fresh``: what the approximation faults besides) and :data:`PER_EXAMPLE_BYTES` per element
    moved."""
    p = sum(o * i for o, i in mods)
    fresh = sum(rates.fresh_seconds(batch * o * i * 4, device=True) for o, i in mods) + extra_fresh
    moved = sum(rates.moved_seconds(PER_EXAMPLE_BYTES * batch * o * i, batch * o * i * 4) for o, i in mods)
    return forward_s + 2 * tokens * p / matmul + fresh + moved


def sums_statistics_seconds(overhead_s: float, sizes: list[int], rates: Rates) -> float:
    """``overhead_s`` plus the work on fp64 sums of ``sizes`` elements: zeroed (fresh), scaled in place, copied to
    fp32 (fresh) and checked (``aminmax``): 40 bytes moved per element. On a GPU the sums are device memory (no
    faults), and the result is copied to the host once."""
    fresh = sum(rates.fresh_seconds(n * 8, device=True) + rates.fresh_seconds(n * 4, device=True) for n in sizes)
    to_host = 0.0 if rates.device_faults else sum(rates.fresh_seconds(n * 4) for n in sizes)
    return overhead_s + fresh + to_host + sum(rates.moved_seconds(40 * n, 8 * n) for n in sizes)
