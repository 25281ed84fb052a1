"""Project one module's safety ΔW with a registered approximation: relative damping, solve, select, project.

``eps`` is relative to the mean diagonal of ``F_u`` in every approximation:

* ``dense``, ``diagonal`` and ``lowrank``: ``ε = eps · mean(diag F_u)`` added to ``F_u``;
* ``kfac``: ``ε_A = √eps · mean(diag A_u)`` and ``ε_G = √eps · mean(diag G_u)``, so the isotropic term of the damped
  Kronecker product, ``ε_A ε_G I``, is ``eps · mean(diag(A_u ⊗ G_u))`` — the same relative ``ε`` (this is the
  π = 1 split of Martens & Grosse's factored Tikhonov damping).

A penalty Fisher ``F_b`` with weight ``β`` joins the right-hand side, ``F_s v = λ (F_u + β F_b + εI) v``; ``β = 0``
is exactly the projector without it.
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
        penalties: ``(β, statistics)`` pairs added to ``F_u`` on the right-hand side (e.g. the benign-refusal Fisher).
    """
    return get_approximation(approx).project(stats_s, stats_u, tau, eps, selection, penalties)
