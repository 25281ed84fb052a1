"""Project one module's safety ΔW with a chosen approximation: relative damping, solve, select, project.

``eps`` is relative to the mean diagonal of ``F_u`` in every approximation:

* ``diagonal`` and ``lowrank``: ``ε = eps · mean(diag F_u)`` added to ``F_u``;
* ``kfac``: ``ε_A = √eps · mean(diag A_u)`` and ``ε_G = √eps · mean(diag G_u)``, so the isotropic term of the damped
  Kronecker product, ``ε_A ε_G I``, is ``eps · mean(diag(A_u ⊗ G_u))`` — the same relative ``ε`` (this is the
  π = 1 split of Martens & Grosse's factored Tikhonov damping).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sst_merge.fisher.diagonal import diagonal_gevp, diagonal_project
from sst_merge.fisher.gevp import Selection, count_positive
from sst_merge.fisher.kfac import kfac_gevp, kfac_project
from sst_merge.fisher.lowrank import lowrank_gevp, lowrank_project

APPROXIMATIONS = ("diagonal", "kfac", "lowrank")


class ZeroUtilityFisherError(ValueError):
    """``F_u`` is zero on a module, so a relative ``ε`` is zero and ``B`` is singular."""


@dataclass
class ModuleResult:
    """One module's projection and what to report about it.

    Attributes:
        projected: ``P_k(τ_safety)``, same shape and dtype as the input.
        lam_desc: known eigenvalues in decreasing order (float64).
        n_directions: dimension ``p`` of the module's space.
        n_positive: number of eigenvalues > 0.
        n_kept: number of directions kept (``p`` = identity).
        damping: the absolute damping used (for kfac: ``(ε_A, ε_G)``).
    """

    projected: torch.Tensor
    lam_desc: torch.Tensor
    n_directions: int
    n_positive: int
    n_kept: int
    damping: float | tuple[float, float]


def _check_mean(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} is not finite")
    if value <= 0:
        raise ZeroUtilityFisherError(f"{what} is zero: the utility data produced no gradient for this module")
    return value


def project_module(
    approx: str,
    stats_s: dict[str, torch.Tensor],
    stats_u: dict[str, torch.Tensor],
    tau: torch.Tensor,
    eps: float,
    selection: Selection,
) -> ModuleResult:
    """Project ``tau`` (out×in) with the Fisher statistics of one module.

    Args:
        approx: ``diagonal`` (stats ``{"diag"}``), ``kfac`` (``{"A", "G"}``) or ``lowrank`` (``{"rows"}``, N×p).
        stats_s: safety statistics.
        stats_u: utility statistics.
        tau: the safety ΔW of the module.
        eps: damping relative to the mean diagonal of ``F_u``.
        selection: which directions to keep.
    """
    p = tau.numel()
    if approx == "diagonal":
        fu = stats_u["diag"]
        damping = eps * _check_mean(float(fu.double().mean()), "mean diagonal of F_u")
        lam = diagonal_gevp(stats_s["diag"], fu, damping)
        out, lam_desc, n = diagonal_project(tau, lam, selection)
    elif approx == "kfac":
        dA = math.sqrt(eps) * _check_mean(float(stats_u["A"].diagonal().double().mean()), "mean diagonal of A_u")
        dG = math.sqrt(eps) * _check_mean(float(stats_u["G"].diagonal().double().mean()), "mean diagonal of G_u")
        sol = kfac_gevp(stats_s["A"], stats_u["A"], stats_s["G"], stats_u["G"], dA, dG)
        out, lam_desc, n = kfac_project(tau, sol, selection)
        damping = (dA, dG)
    elif approx == "lowrank":
        G_s, G_u = stats_s["rows"], stats_u["rows"]
        mean_diag = float(G_u.double().pow(2).sum()) / (G_u.shape[0] * G_u.shape[1])
        damping = eps * _check_mean(mean_diag, "mean diagonal of F_u")
        sol = lowrank_gevp(G_s, G_u, damping)
        out, lam_desc, n = lowrank_project(tau, G_s, G_u, sol, selection)
    else:
        raise ValueError(f"unknown Fisher approximation {approx!r}; choose one of {', '.join(APPROXIMATIONS)}")
    return ModuleResult(
        projected=out,
        lam_desc=lam_desc,
        n_directions=p,
        n_positive=count_positive(lam_desc),
        n_kept=n,
        damping=damping,
    )
