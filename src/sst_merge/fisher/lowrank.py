"""The ``lowrank`` approximation: the exact GEVP of empirical Fishers given by their per-example gradient rows.

With ``F_s = G_sᵀG_s/N_s`` (rows of ``G_s`` are per-example gradients, shape N_s×p) and
``B = G_uᵀG_u/N_u + εI``, every eigenvector with ``λ > 0`` lies in the span of ``B⁻¹G_sᵀ``. The non-zero ``λ`` are the
eigenvalues of the N_s×N_s matrix ``M = G_s B⁻¹ G_sᵀ / N_s`` (eigenvectors ``u_i``), and

    P_k x = Σ_{i≤k} B⁻¹G_sᵀu_i (u_iᵀ G_s x) / (N_s λ_i).

``B⁻¹`` is applied with the Woodbury identity ``B⁻¹ = (I − G_uᵀ K⁻¹ G_u)/ε`` where ``K = εN_u I + G_uG_uᵀ``
(N_u×N_u, Cholesky-factorised). Cost O(p·(N_s+N_u)²) per module instead of O(p³); nothing p×p is ever formed.
Directions with ``λ = 0`` are never represented; the identity (every direction kept) is returned exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sst_merge.fisher.approximation import (
    APPROXIMATIONS,
    Approximation,
    ModuleResult,
    Stats,
    active_penalties,
    check_mean,
    per_example_batch_seconds,
)
from sst_merge.fisher.gevp import Selection, count_positive
from sst_merge.machine import Rates, p_copies_seconds


@dataclass
class LowrankSolution:
    """The small eigenproblem of one module (float64).

    Attributes:
        lam: the non-zero-candidate eigenvalues of ``M`` in decreasing order (N_s,).
        U: eigenvectors of ``M`` as columns, same order.
        L: lower Cholesky factor of ``K = εN_u I + G_uG_uᵀ``.
        damping: ``ε`` (absolute).
    """

    lam: torch.Tensor
    U: torch.Tensor
    L: torch.Tensor
    damping: float


def _binv(y: torch.Tensor, G_u: torch.Tensor, L: torch.Tensor, damping: float) -> torch.Tensor:
    """Apply ``B⁻¹`` to the columns of ``y`` (p×m) with Woodbury."""
    z = torch.cholesky_solve(G_u @ y, L)  # (N_u, m)
    return (y - G_u.T @ z) / damping


def lowrank_gevp(G_s: torch.Tensor, G_u: torch.Tensor, damping: float) -> LowrankSolution:
    """Solve the N_s×N_s eigenproblem of ``M = G_s B⁻¹ G_sᵀ / N_s`` (absolute damping ``ε > 0``)."""
    if not damping > 0:
        raise ValueError("lowrank needs a positive damping ε (B = G_uᵀG_u/N_u + εI must be invertible)")
    Gs = G_s.double()
    Gu = G_u.double()
    n_s, n_u = Gs.shape[0], Gu.shape[0]
    K = Gu @ Gu.T + damping * n_u * torch.eye(n_u, dtype=torch.float64)
    L = torch.linalg.cholesky(K)
    Suu = Gu @ Gs.T  # (N_u, N_s)
    # G_s B⁻¹ G_sᵀ = (G_sG_sᵀ − G_sG_uᵀ K⁻¹ G_uG_sᵀ)/ε, with K⁻¹ through the Cholesky factor: W = L⁻¹ G_uG_sᵀ.
    W = torch.linalg.solve_triangular(L, Suu, upper=False)
    M = (Gs @ Gs.T - W.T @ W) / (damping * n_s)
    M = (M + M.T) / 2
    lam, U = torch.linalg.eigh(M)
    lam, U = lam.flip(0).clamp_min(0), U.flip(1)
    return LowrankSolution(lam=lam, U=U, L=L, damping=damping)


def lowrank_project(
    x: torch.Tensor, G_s: torch.Tensor, G_u: torch.Tensor, sol: LowrankSolution, selection: Selection
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Project ``x`` (any shape with ``p`` entries, flattened row-major like the gradient rows).

    Returns:
        ``(P x, λ in decreasing order (the N_s known values), n_kept)``.
    """
    p = x.numel()
    n = selection.count(sol.lam, p)
    if n >= p:
        return x.clone(), sol.lam, p
    n = min(n, count_positive(sol.lam))
    if n == 0:
        return torch.zeros_like(x), sol.lam, 0
    Gs = G_s.double()
    n_s = Gs.shape[0]
    Uk, lk = sol.U[:, :n], sol.lam[:n]
    coef = Uk @ ((Uk.T @ (Gs @ x.double().reshape(-1))) / (n_s * lk))  # (N_s,)
    y = _binv((Gs.T @ coef)[:, None], G_u.double(), sol.L, sol.damping)[:, 0]
    return y.reshape(x.shape).to(x.dtype), sol.lam, n


@APPROXIMATIONS.register("lowrank")
class Lowrank(Approximation):
    """Stores ``{"rows": G}`` (N×p, row b = the row-major flattened ``g_b``), so ``F = GᵀG/N`` exactly."""

    name = "lowrank"

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        return {"rows": torch.zeros(n, out_features * in_features, dtype=torch.float32)}

    def update(self, stats, a, delta, g, index) -> None:
        stats["rows"][index] = g.reshape(g.shape[0], -1).to(stats["rows"].device)

    def trace(self, stats: Stats) -> float:
        return float(stats["rows"].double().pow(2).sum()) / stats["rows"].shape[0]

    def combine(self, parts: list[tuple[float, Stats]]) -> Stats:
        # Σ w_j G_jᵀG_j/N_j = CᵀC/N_C with C the rows G_j scaled by √(w_j N_C / N_j), N_C = Σ N_j.
        if len(parts) == 1 and parts[0][0] == 1.0:
            return parts[0][1]
        n_c = sum(st["rows"].shape[0] for _, st in parts)
        return {"rows": torch.cat([st["rows"].double() * math.sqrt(w * n_c / st["rows"].shape[0]) for w, st in parts])}

    def project(self, stats_s, stats_u, tau, eps, selection, penalties=None) -> ModuleResult:
        G_s, G_u = stats_s["rows"], stats_u["rows"]
        mean_diag = float(G_u.double().pow(2).sum()) / (G_u.shape[0] * G_u.shape[1])
        damping = eps * check_mean(mean_diag, "mean diagonal of F_u")
        # B = rowsᵀrows/N_rows + εI = F_u + Σ β_j F_j + εI (the penalties' rows stacked under G_u, scaled)
        rows = self.combine([(1.0, stats_u), *active_penalties(penalties)])["rows"]
        sol = lowrank_gevp(G_s, rows, damping)
        out, lam_desc, n = lowrank_project(tau, G_s, rows, sol, selection)
        return ModuleResult(out, lam_desc, tau.numel(), count_positive(lam_desc), n, damping)

    # -- planner laws (sst_merge.plan; see Approximation) -----------------------------------------------------------

    plan_alternatives = ("kfac",)  # two d×d factors per module instead of N rows of p
    memory_grows_with_n = True

    def host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        return 2 * n * sum(o * i for o, i in mods) * 4  # N rows of p, fp32, for both statistics

    def per_example_bytes(self, mods: list[tuple[int, int]], batch: int) -> float:
        return batch * max(o * i for o, i in mods) * 4

    def finish_copy_elements(self, mods: list[tuple[int, int]]) -> int:
        return 0  # the rows are fp32 already

    def batch_seconds(
        self, forward_s: float, mods: list[tuple[int, int]], batch: int, tokens: int, matmul: float, rates: Rates
    ) -> float:
        return per_example_batch_seconds(forward_s, mods, batch, tokens, matmul, rates)

    def statistics_seconds(self, overhead_s: float, mods: list[tuple[int, int]], n: int, rates: Rates) -> float:
        """The N×p fp32 rows are zeroed (fresh) and checked: 8 bytes per element."""
        sizes = [n * o * i for o, i in mods]
        return overhead_s + sum(
            rates.fresh_seconds(m * 4, device=True) + rates.moved_seconds(8 * m, 4 * m) for m in sizes
        )

    def gevp_seconds(self, o: int, i: int, n: int, rates: Rates) -> float:
        """N·p elements of each statistic's rows through a fixed number of fp64 passes (copies, products with ΔW and
        back) at the ``rows`` rate, the page faults of its fresh buffers (:data:`LOWRANK_FP64_COPIES` of N·p fp64
        and :data:`LOWRANK_P_COPIES` of p, each once it reaches the mmap threshold), the three N×N Gram products
        (6N²p FLOPs) and the N×N ``eigh``."""
        p = o * i
        faults = LOWRANK_FP64_COPIES * rates.fresh_seconds(n * p * 8) + p_copies_seconds(p, LOWRANK_P_COPIES, rates)
        return n * p / rates.rows + faults + lowrank_gram_flops(n, p) / rates.fp64 + n**3 / rates.eigh

    def gevp_host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        big = max(o * i for o, i in mods)
        return 2 * n * big * 8 + 4 * big * 8


#: fresh fp64 copies of the N × p rows in the solve: the damping's mean diagonal (the copy and its square),
#: ``lowrank_gevp``'s and ``lowrank_project``'s copies of G_s and G_u.
LOWRANK_FP64_COPIES = 6
#: fresh p-sized (fp64, fp32) buffers of ``lowrank_project``: ΔW's fp64 copy, G_sᵀc, G_uᵀz, the difference, its
#: scaling; the fp32 result.
LOWRANK_P_COPIES = (5, 1)


def lowrank_gram_flops(n: int, p: int) -> float:
    """FLOPs of lowrank's three N×N Gram products over p columns (``G_uG_uᵀ``, ``G_uG_sᵀ``, ``G_sG_sᵀ``)."""
    return 3 * 2 * n * n * p
