"""The ``kfac`` approximation: ``F ≈ A ⊗ G`` per module, solved with d×d work only.

For a linear layer ``y = W a`` (W of shape out×in) the per-example gradient is ``Σ_t δ_t a_tᵀ`` and, with the
column-major ``vec(ΔW)``, ``vec(g) = Σ_t a_t ⊗ δ_t``; K-FAC approximates ``E[vec g vec gᵀ] ≈ A ⊗ G`` with
``A = E[a aᵀ]`` (in×in) and ``G = E[δ δᵀ]`` (out×out).

Damping is applied per factor, ``B = (A_u + ε_A I) ⊗ (G_u + ε_G I)``, so ``B`` stays a Kronecker product. Then the
generalized eigenvectors of ``(A_s ⊗ G_s, B)`` are ``x_i ⊗ y_j`` with ``A_s x = μ (A_u + ε_A I) x`` and
``G_s y = ν (G_u + ε_G I) y``, and ``λ_ji = μ_i ν_j``. With ``X``, ``Y`` the factor eigenvectors (``B``-orthonormal
per factor) and a 0/1 selection mask ``S`` over (j, i), the oblique projection is

    P(ΔW) = Y ((Yᵀ G̃_u ΔW Ã_u X) ⊙ S) Xᵀ,

with the *damped* factors ``G̃_u``, ``Ã_u`` (that is ``B``). Cost: two eigensolves of size in and out, never p×p.
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
    sums_statistics_seconds,
)
from sst_merge.fisher.gevp import Selection, count_positive, dense_gevp, select_grid
from sst_merge.machine import Rates, p_copies_seconds


@dataclass
class KfacSolution:
    """Factor eigen-decompositions of one module (float64).

    Attributes:
        mu: input-factor eigenvalues (in,), decreasing.
        X: input-factor eigenvectors as columns, ``Xᵀ Ã_u X = I``.
        nu: output-factor eigenvalues (out,), decreasing.
        Y: output-factor eigenvectors as columns, ``Yᵀ G̃_u Y = I``.
        A_u: damped utility input factor ``A_u + ε_A I``.
        G_u: damped utility output factor ``G_u + ε_G I``.
    """

    mu: torch.Tensor
    X: torch.Tensor
    nu: torch.Tensor
    Y: torch.Tensor
    A_u: torch.Tensor
    G_u: torch.Tensor

    @property
    def lam(self) -> torch.Tensor:
        """``λ_ji = ν_j μ_i`` as an (out, in) grid."""
        return self.nu[:, None] * self.mu[None, :]


def kfac_gevp(
    A_s: torch.Tensor, A_u: torch.Tensor, G_s: torch.Tensor, G_u: torch.Tensor, damp_A: float, damp_G: float
) -> KfacSolution:
    """Solve the two factor eigenproblems with per-factor damping (absolute values ``damp_A``, ``damp_G``)."""
    Ad = A_u.double() + damp_A * torch.eye(A_u.shape[0], dtype=torch.float64)
    Gd = G_u.double() + damp_G * torch.eye(G_u.shape[0], dtype=torch.float64)
    mu, X = dense_gevp(A_s, Ad)
    nu, Y = dense_gevp(G_s, Gd)
    # A Fisher factor is PSD; tiny negative eigenvalues are round-off and would flip the sign of a product λ = μν.
    return KfacSolution(mu=mu.clamp_min(0), X=X, nu=nu.clamp_min(0), Y=Y, A_u=Ad, G_u=Gd)


def kfac_project(x: torch.Tensor, sol: KfacSolution, selection: Selection) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Project ``x`` (out×in) onto the selected Kronecker eigen-directions.

    Returns:
        ``(P x, λ in decreasing order (flat, p values), n_kept)``.
    """
    mask, lam_desc, n = select_grid(sol.lam, selection)
    if mask is None:
        return x.clone(), lam_desc, n
    S = mask.double()  # (out, in), S[j, i] selects y_j ⊗ x_i
    C = sol.Y.T @ sol.G_u @ x.double() @ sol.A_u @ sol.X  # (out, in): B-coordinates of ΔW
    return (sol.Y @ (C * S) @ sol.X.T).to(x.dtype), lam_desc, n


@APPROXIMATIONS.register("kfac")
class Kfac(Approximation):
    """Stores ``{"A": Σ a aᵀ / n_tokens, "G": Σ δ δᵀ / N}``; per-factor damping ``√eps`` (see the module docstring).

    A sum of Kronecker products is not a Kronecker product, so no penalty Fisher can be added to ``B``.
    """

    name = "kfac"
    per_example = False
    supports_penalty = False

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        return {
            "A": torch.zeros(in_features, in_features, dtype=torch.float64),
            "G": torch.zeros(out_features, out_features, dtype=torch.float64),
        }

    def update(self, stats, a, delta, g, index) -> None:
        a2 = a.reshape(-1, a.shape[-1]).float()
        d2 = delta.reshape(-1, delta.shape[-1]).float()
        stats["A"] += (a2.T @ a2).double().to(stats["A"].device)
        stats["G"] += (d2.T @ d2).double().to(stats["G"].device)

    def finish(self, stats: Stats, n: int, n_tokens: int) -> Stats:
        stats["A"] = stats["A"].div_(max(n_tokens, 1)).float()
        stats["G"] = stats["G"].div_(n).float()
        return stats

    def trace(self, stats: Stats) -> float:
        return float(stats["A"].double().diagonal().sum() * stats["G"].double().diagonal().sum())

    def project(self, stats_s, stats_u, tau, eps, selection, penalties=None) -> ModuleResult:
        if active_penalties(penalties):
            raise ValueError(
                "kfac cannot add a penalty Fisher to F_u (not a Kronecker product); use lowrank or diagonal"
            )
        dA = math.sqrt(eps) * check_mean(float(stats_u["A"].diagonal().double().mean()), "mean diagonal of A_u")
        dG = math.sqrt(eps) * check_mean(float(stats_u["G"].diagonal().double().mean()), "mean diagonal of G_u")
        sol = kfac_gevp(stats_s["A"], stats_u["A"], stats_s["G"], stats_u["G"], dA, dG)
        out, lam_desc, n = kfac_project(tau, sol, selection)
        return ModuleResult(out, lam_desc, tau.numel(), count_positive(lam_desc), n, (dA, dG))

    # -- planner laws (sst_merge.plan; see Approximation) -----------------------------------------------------------

    def host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        f = sum(o * o + i * i for o, i in mods)
        return f * 4 + f * 8

    def per_example_bytes(self, mods: list[tuple[int, int]], batch: int) -> float:
        return 0  # no per-example gradients: the factors come from the captured inputs and output gradients

    def finish_copy_elements(self, mods: list[tuple[int, int]]) -> int:
        return max(max(o, i) ** 2 for o, i in mods)

    def batch_seconds(
        self, forward_s: float, mods: list[tuple[int, int]], batch: int, tokens: int, matmul: float, rates: Rates
    ) -> float:
        """``aᵀa`` and ``δᵀδ`` (2·B·T·(in² + out²) FLOPs), their fp32 results and fp64 copies (fresh), and the fp64
        accumulation."""
        f = sum(o * o + i * i for o, i in mods)
        fresh = sum(rates.fresh_seconds(d * d * b, device=True) for o, i in mods for d in (o, i) for b in (4, 8))
        moved = sum(rates.moved_seconds((4 + 8 + 8 + 16) * d * d, d * d * 8) for o, i in mods for d in (o, i))
        return forward_s + 2 * tokens * f / matmul + fresh + moved

    def statistics_seconds(self, overhead_s: float, mods: list[tuple[int, int]], n: int, rates: Rates) -> float:
        return sums_statistics_seconds(overhead_s, [d * d for o, i in mods for d in (i, o)], rates)

    def gevp_seconds(self, o: int, i: int, n: int, rates: Rates) -> float:
        """Two generalized eigenproblems (o³ + i³ at the ``eigh`` rate), the selection on the o×i λ grid, the
        projection's fp64 products ``Yᵀ G̃_u ΔW Ã_u X`` and ``Y (C ⊙ S) Xᵀ`` (2o³ + 4o²i + 6oi² FLOPs), and the page
        faults of its fresh p-sized buffers (:data:`KFAC_P_COPIES`)."""
        p = o * i
        select = p * math.log2(p) / rates.sort
        products = (2 * o**3 + 4 * o * o * i + 6 * o * i * i) / rates.fp64
        return (o**3 + i**3) / rates.eigh + select + products + p_copies_seconds(p, KFAC_P_COPIES, rates)

    def gevp_host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        return max(2 * (o * o + i * i) * 8 * 3 + o * i * 8 * 4 for o, i in mods)


def input_project(
    tau: torch.Tensor, A_s: torch.Tensor, A_c: torch.Tensor, eps: float, selection: Selection
) -> ModuleResult:
    """Keep ``τ``'s action on the input components that harmful prompts excite and the contrast inputs do not.

    The input side of a module (``y = W a``): solve ``A_s x = μ (A_c + ε I) x`` with ``A_s`` the Gram of the module's
    inputs on harmful prompts and ``A_c`` that of the contrast inputs (benign prompts and task items), ``ε = eps ·
    mean diag A_c``. Each eigenvector is a *functional*: ``s_i = x_iᵀ a`` has variance ``μ_i`` over harmful inputs
    and (up to ε) 1 over contrast inputs (``Xᵀ Ã_c X = I``). An input decomposes as ``a = Σ_i (Ã_c x_i) s_i`` (since
    ``X⁻ᵀ = Ã_c X``), and ``P = Ã_c X_k X_kᵀ`` keeps the selected components: ``P Ã_c x_j = Ã_c x_j`` for a selected
    ``j`` and 0 otherwise (oblique, ``P² = P``). The result is ``τ P``: the safety update unchanged on the components
    where harmful inputs carry more energy than the contrast inputs, zero on the others (the null-space idea of
    AlphaEdit, Fang et al. 2025, with a generalized eigenproblem in place of a hard null space). It is kfac's
    projector with the output side left whole.

    Returns:
        A :class:`ModuleResult` whose directions are the ``in`` input components.
    """
    damping = eps * check_mean(float(A_c.diagonal().double().mean()), "mean diagonal of the contrast inputs' Gram")
    Ad = A_c.double() + damping * torch.eye(A_c.shape[0], dtype=torch.float64)
    mu, X = dense_gevp(A_s, Ad)
    mu = mu.clamp_min(0)  # a Gram is PSD: negative values are round-off
    d = mu.numel()
    n = selection.count(mu, d)
    if n >= d:
        out = tau.clone()
    else:
        Xk = X[:, :n]
        out = (tau.double() @ (Ad @ Xk) @ Xk.T).to(tau.dtype)  # τ Ã_c X_k X_kᵀ
    return ModuleResult(out, mu, d, count_positive(mu), min(n, d), damping)


#: fresh p-sized (fp64, fp32) buffers of one module's GEVP + projection besides the sort's own: the λ grid, the
#: indices, the sorted λ, the mask in fp64, ΔW in fp64, the products ``G̃_u ΔW``, ``· Ã_u``, ``· X``, ``C ⊙ S``,
#: ``Y ·``, ``· Xᵀ``; the fp32 result.
KFAC_P_COPIES = (11, 1)
