"""The generalized eigenproblem ``F_s v = λ B v`` (``B = F_u + εI``): selection rules, the dense solver, the projector.

Pure math: tensors in, tensors out, float64 inside. The structured solvers live beside this file
(:mod:`~sst_merge.fisher.diagonal`, :mod:`~sst_merge.fisher.kfac`, :mod:`~sst_merge.fisher.lowrank`); the dense
solver here is the reference they are tested against.

Generalized eigenvectors are ``B``-orthonormal (``VᵀBV = I``), not orthonormal, so the projector onto the span of the
top-k of them is the *oblique* ``P_k = V_k V_kᵀ B`` (idempotent; orthogonal only when ``B = I``). The dense problem is
solved with :func:`scipy.linalg.eigh` on the pair ``(a, b)`` (a Cholesky reduction), never as an eigenproblem of
``B⁻¹A`` (not symmetric).

**Selection** (the same rule in every approximation). Eigenvalues are sorted in decreasing order:

* ``k``: keep the top ``k`` directions of the module;
* ``fraction``: keep the top ``ceil(fraction · p)`` of the module's ``p`` directions;
* ``share``: keep the top ``ceil(share · r)`` of the ``r`` directions the problem *ranks* (``λ > 0``: the rank of
  ``F_s``). With ``lowrank``, ``r ≤ N_s`` (the safety examples), far below ``p``, so a ``fraction`` of ``p`` keeps the
  whole ranked range and selects nothing; a ``share`` below 1 keeps a non-empty subset of it, a strict one wherever
  ``r > 1 / (1 − share)``. ``share = 1`` keeps the whole range — the oblique projection onto the span ``F_s`` sees;
* ``threshold``: keep the directions with ``λ > threshold`` (strictly).

Directions with ``λ = 0`` (the null space of ``F_s``, where the safety Fisher sees nothing) form a degenerate
eigenspace with no preferred basis, so a partial selection never picks among them: ``k`` and ``fraction`` are capped at
the number of positive eigenvalues. Keeping *all* ``p`` directions (``k ≥ p``, ``fraction = 1``) is the exception: the
projector is then the identity, exactly, in every approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch

#: Eigenvalues at or below ``POSITIVE_RTOL · λ_max`` count as zero (round-off in a rank-deficient ``F_s``).
POSITIVE_RTOL = 1e-9


@dataclass(frozen=True)
class Selection:
    """Which generalized eigen-directions to keep; exactly one field is set.

    Attributes:
        k: number of top directions per module (``None`` when unused).
        fraction: share of the module's directions, in (0, 1].
        threshold: keep ``λ > threshold`` (≥ 0).
        share: share of the directions with ``λ > 0`` (the ranked ones), in (0, 1].
    """

    k: int | None = None
    fraction: float | None = None
    threshold: float | None = None
    share: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.k, self.fraction, self.threshold, self.share) if v is not None]
        if len(given) != 1:
            raise ValueError("exactly one of k, fraction, threshold, share must be set")
        if self.k is not None and self.k < 0:
            raise ValueError("k must be >= 0")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError("threshold must be >= 0")
        if self.share is not None and not 0.0 < self.share <= 1.0:
            raise ValueError("share must be in (0, 1]")

    def count(self, lam_desc: torch.Tensor, p: int) -> int:
        """Return how many directions to keep; ``p`` means every direction (the identity projector).

        Args:
            lam_desc: the known eigenvalues in decreasing order (a structured solver may know fewer than ``p``; the
                rest are zero).
            p: the dimension of the module's space.
        """
        n_pos = count_positive(lam_desc)
        if self.threshold is not None:
            return int((lam_desc > self.threshold).sum()) if n_pos else 0
        if self.share is not None:  # the identity only where every one of the p directions is ranked
            return p if n_pos >= p and self.share == 1.0 else math.ceil(self.share * n_pos)
        want = self.k if self.k is not None else math.ceil(self.fraction * p)  # type: ignore[operator]
        if want >= p:
            return p
        return min(want, n_pos)

    def describe(self) -> dict:
        """JSON-ready description (for diagnostics)."""
        if self.k is not None:
            return {"k": self.k}
        if self.fraction is not None:
            return {"fraction": self.fraction}
        if self.share is not None:
            return {"share": self.share}
        return {"threshold": self.threshold}


def count_positive(lam_desc: torch.Tensor) -> int:
    """Number of eigenvalues that are positive beyond round-off (``> POSITIVE_RTOL · λ_max``)."""
    if lam_desc.numel() == 0:
        return 0
    top = float(lam_desc.max())
    if not top > 0:
        return 0
    return int((lam_desc > POSITIVE_RTOL * top).sum())


def select_grid(lam: torch.Tensor, selection: Selection) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Select among eigenvalues laid out on a grid (diagonal: one per weight; kfac: ``λ_ji = ν_j μ_i``).

    Ties are broken by index order (a stable sort), so the selection is deterministic.

    Returns:
        ``(mask, λ in decreasing order (flat), n_kept)``; ``mask`` is a bool tensor of ``lam``'s shape, or ``None``
        when every direction is kept (the identity).
    """
    flat = lam.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    lam_desc = flat[order]
    p = flat.numel()
    n = selection.count(lam_desc, p)
    if n >= p:
        return None, lam_desc, p
    mask = torch.zeros(p, dtype=torch.bool)
    mask[order[:n]] = True
    return mask.reshape(lam.shape), lam_desc, n


def dense_gevp(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``a v = λ b v`` for symmetric ``a`` and SPD ``b`` with :func:`scipy.linalg.eigh`.

    Returns:
        ``(lam, V)``: eigenvalues in decreasing order (float64, shape (p,)) and ``B``-orthonormal eigenvectors as
        columns (``VᵀbV = I``), in the same order.
    """
    a64 = a.detach().double().cpu().numpy()
    b64 = b.detach().double().cpu().numpy()
    lam, vecs = scipy.linalg.eigh((a64 + a64.T) / 2, (b64 + b64.T) / 2)
    order = np.argsort(-lam, kind="stable")
    return torch.from_numpy(lam[order].copy()), torch.from_numpy(vecs[:, order].copy())


def oblique_projector(V: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    """Return ``P = V_n V_nᵀ b`` for the first ``n`` columns of ``V`` (``b``-orthonormal eigenvectors)."""
    Vn = V[:, :n].double()
    return Vn @ (Vn.T @ b.double())


def dense_project(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, selection: Selection
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Project a flat vector ``x`` onto the selected generalized eigenvectors of ``(a, b)`` (dense reference).

    Returns:
        ``(P x, lam, n_kept)`` with ``P x`` in ``x``'s dtype.
    """
    lam, V = dense_gevp(a, b)
    p = x.numel()
    n = selection.count(lam, p)
    if n >= p:
        return x.clone(), lam, p
    Vn = V[:, :n]
    y = Vn @ (Vn.T @ (b.double() @ x.double().reshape(-1)))
    return y.reshape(x.shape).to(x.dtype), lam, n
