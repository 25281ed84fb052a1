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
