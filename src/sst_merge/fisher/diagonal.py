"""The ``diagonal`` approximation: ``F ≈ diag(E[g²])``.

With diagonal ``F_s`` and ``B = F_u + εI`` the generalized eigenvectors are the coordinate axes scaled by
``1/sqrt(B_ii)``, the eigenvalues are ``λ_i = F_s,ii / (F_u,ii + ε)``, and the oblique projector ``V_k V_kᵀ B`` is a
0/1 mask on the selected entries. Selection is per module (each module ranks its own entries); ties are broken by
index order (a stable sort), so the mask is deterministic.
"""

from __future__ import annotations

import math

import torch

from sst_merge.fisher.approximation import (
    APPROXIMATIONS,
    Approximation,
    ModuleResult,
    Stats,
    active_penalties,
    check_mean,
    per_example_batch_seconds,
    sums_statistics_seconds,
)
from sst_merge.fisher.gevp import Selection, count_positive, select_grid
from sst_merge.machine import Rates, p_copies_seconds


def diagonal_gevp(fs_diag: torch.Tensor, fu_diag: torch.Tensor, damping: float) -> torch.Tensor:
    """Return ``λ = F_s,ii / (F_u,ii + damping)`` element-wise (float64, same shape as the inputs)."""
    b = fu_diag.double() + damping
    if not bool((b > 0).all()):
        raise ValueError("F_u + damping has non-positive diagonal entries; raise eps")
    return fs_diag.double() / b


def diagonal_project(
    x: torch.Tensor, lam: torch.Tensor, selection: Selection
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the entries of ``x`` whose ``λ`` is among the selected; zero the rest.

    Returns:
        ``(P x, lam sorted in decreasing order, n_kept)``.
    """
    mask, lam_desc, n = select_grid(lam.reshape(x.shape), selection)
    if mask is None:
        return x.clone(), lam_desc, n
    return x * mask.to(x.dtype), lam_desc, n


@APPROXIMATIONS.register("diagonal")
class Diagonal(Approximation):
    """Stores ``{"diag": E_b[g_b²]}`` (out×in); ``B = diag(F_u) + Σ β_j diag(F_j) + εI``."""

    name = "diagonal"

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        return {"diag": torch.zeros(out_features, in_features, dtype=torch.float64)}

    def update(self, stats, a, delta, g, index) -> None:
        # g is this batch's own temporary: squared in place, summed over examples, added into the fp64 sum
        stats["diag"].add_(g.square_().sum(0).to(stats["diag"].device))

    def finish(self, stats: Stats, n: int, n_tokens: int) -> Stats:
        stats["diag"] = stats["diag"].div_(n).float()
        return stats

    def trace(self, stats: Stats) -> float:
        return float(stats["diag"].double().sum())

    def combine(self, parts: list[tuple[float, Stats]]) -> Stats:
        return {"diag": sum(w * st["diag"].double() for w, st in parts).to(parts[0][1]["diag"].dtype)}

    def project(self, stats_s, stats_u, tau, eps, selection, penalties=None) -> ModuleResult:
        fu = stats_u["diag"]
        damping = eps * check_mean(float(fu.double().mean()), "mean diagonal of F_u")
        b = fu.double()
        for beta, st in active_penalties(penalties):
            b = b + beta * st["diag"].double()
        lam = diagonal_gevp(stats_s["diag"], b, damping)
        out, lam_desc, n = diagonal_project(tau, lam, selection)
        return ModuleResult(out, lam_desc, tau.numel(), count_positive(lam_desc), n, damping)

    # -- planner laws (sst_merge.plan; see Approximation) -----------------------------------------------------------

    def host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        p = sum(o * i for o, i in mods)
        return p * 4 + p * 8  # F_s result (fp32) + F_u accumulator (fp64)

    def per_example_bytes(self, mods: list[tuple[int, int]], batch: int) -> float:
        return (batch + 1) * max(o * i for o, i in mods) * 4  # the per-example gradients and their sum

    def finish_copy_elements(self, mods: list[tuple[int, int]]) -> int:
        return max(o * i for o, i in mods)

    def batch_seconds(
        self, forward_s: float, mods: list[tuple[int, int]], batch: int, tokens: int, matmul: float, rates: Rates
    ) -> float:
        # the sum over examples (fp32) and its fp64 copy added into the statistic
        extra = sum(rates.fresh_seconds(o * i * b, device=True) for o, i in mods for b in (4, 8))
        return per_example_batch_seconds(forward_s, mods, batch, tokens, matmul, rates, extra)

    def statistics_seconds(self, overhead_s: float, mods: list[tuple[int, int]], n: int, rates: Rates) -> float:
        return sums_statistics_seconds(overhead_s, [o * i for o, i in mods], rates)

    def gevp_seconds(self, o: int, i: int, n: int, rates: Rates) -> float:
        """The λ selection, p·log2 p (an argsort of the p ratios, a gather and a mask), and the page faults of its
        fresh p-sized buffers (:data:`DIAGONAL_P_COPIES`, each once it reaches the mmap threshold)."""
        p = o * i
        return p * math.log2(p) / rates.sort + p_copies_seconds(p, DIAGONAL_P_COPIES, rates)

    def gevp_host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        return 4 * max(o * i for o, i in mods) * 8


#: fresh p-sized (fp64, fp32) buffers of one module's GEVP + projection besides the sort's own: the damping's mean,
#: F_u and F_s in fp64, F_u + ε, the ratio λ, the argsort's indices and the sorted λ; the mask in ΔW's dtype and the
#: product.
DIAGONAL_P_COPIES = (7, 2)
