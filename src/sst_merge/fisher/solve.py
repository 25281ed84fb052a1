"""Project one module's safety ΔW with a registered approximation: relative damping, solve, select, project.

``eps`` is relative to the mean diagonal of ``F_u`` in every approximation:

* ``dense``, ``diagonal`` and ``lowrank``: ``ε = eps · mean(diag F_u)`` added to ``F_u``;
* ``kfac``: ``ε_A = √eps · mean(diag A_u)`` and ``ε_G = √eps · mean(diag G_u)``, so the isotropic term of the damped
  Kronecker product, ``ε_A ε_G I``, is ``eps · mean(diag(A_u ⊗ G_u))`` — the same relative ``ε`` (this is the
  π = 1 split of Martens & Grosse's factored Tikhonov damping).

A penalty Fisher ``F_b`` with weight ``β`` joins the right-hand side, ``F_s v = λ (F_u + β F_b + εI) v``; ``β = 0``
is exactly the projector without it.

``subspace="utility_complement"`` turns the problem around (design §5): it solves
``(F_u + β F_b) v = μ (F_s + εI) v`` (``ε`` relative to ``F_s``), selects the directions with the *most* utility
(and benign-refusal) cost per unit of safety, and removes them, ``τ − V_k V_kᵀ (F_s + εI) τ``, keeping the rest of
the safety update. The selection then counts removed directions.
"""

from __future__ import annotations

import torch

# importing the approximation modules registers them
from sst_merge.fisher import dense, diagonal, kfac, lowrank  # noqa: F401
from sst_merge.fisher.approximation import (
    APPROXIMATIONS,
    ModuleResult,
    Stats,
    ZeroUtilityFisherError,
    active_penalties,
    get_approximation,
)
from sst_merge.fisher.gevp import Selection

__all__ = ["APPROXIMATIONS", "ModuleResult", "ZeroUtilityFisherError", "approximation_names", "project_module"]


def approximation_names() -> list[str]:
    """The registered approximation names."""
    return APPROXIMATIONS.names()


def project_module(
    approx: str,
    stats_s: Stats,
    stats_u: Stats,
    tau: torch.Tensor,
    eps: float,
    selection: Selection,
    penalties: list[tuple[float, Stats]] | None = None,
    subspace: str = "safety",
) -> ModuleResult:
    """Project ``tau`` (out×in) with the Fisher statistics of one module.

    Args:
        approx: a registered approximation (``dense`` ``{"F"}``, ``diagonal`` ``{"diag"}``, ``kfac`` ``{"A", "G"}``,
            ``lowrank`` ``{"rows"}``, N×p).
        stats_s: safety statistics.
        stats_u: utility statistics.
        tau: the safety ΔW of the module.
        eps: damping relative to the mean diagonal of ``F_u``.
        selection: which directions to keep.
        penalties: ``(β, statistics)`` pairs added to ``F_u`` (e.g. the benign-refusal Fisher).
        subspace: ``"safety"`` keeps the selected directions of ``F_s v = λ (F_u + Σ β F_j + εI) v``;
            ``"utility_complement"`` removes the selected directions of ``(F_u + Σ β F_j) v = μ (F_s + εI) v``
            (``n_kept`` of the result then counts the removed directions).
    """
    kind = get_approximation(approx)
    if subspace == "safety":
        return kind.project(stats_s, stats_u, tau, eps, selection, penalties)
    if subspace != "utility_complement":
        raise ValueError(f"unknown subspace {subspace!r}; choose safety or utility_complement")
    cost = kind.combine([(1.0, stats_u), *active_penalties(penalties)])
    removed = kind.project(cost, stats_s, tau, eps, selection)
    return ModuleResult(
        tau - removed.projected,
        removed.lam_desc,
        removed.n_directions,
        removed.n_positive,
        removed.n_kept,
        removed.damping,
    )
