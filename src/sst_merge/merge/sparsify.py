"""Pure tensor kernels for the baseline merge methods: trimming, DARE dropping, TIES sign consensus.

Tensors in, tensors out: no model, file or config. Inputs are fp32 ΔW of one module (any shape); randomness comes
only from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

DareRescale = Literal["inverse", "l1", "none"]


def weighted_sum(taus: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Return Σ wᵢ τᵢ (fp32)."""
    out = torch.zeros_like(taus[0], dtype=torch.float32)
    for t, w in zip(taus, weights, strict=True):
        out.add_(t, alpha=float(w))
    return out


def magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density·numel))`` entries of largest magnitude, zero the rest (TIES "trim").

    ``density >= 1`` returns ``tau`` unchanged. Ties at the threshold are broken by ``torch.topk`` (exactly k kept).
    """
    if density >= 1:
        return tau
    k = max(1, int(density * tau.numel()))
    flat = tau.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.view_as(tau)


def dare_drop(
    tau: torch.Tensor, density: float, generator: torch.Generator, rescale: DareRescale = "inverse"
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Bernoulli, seeded), drop the rest, and rescale (DARE).

    Args:
        tau: one module's ΔW.
        density: keep probability p in (0, 1]; ``p >= 1`` returns ``tau`` unchanged (no random numbers drawn).
        generator: the source of randomness; the same generator state gives the same mask.
        rescale: ``"inverse"`` multiplies kept entries by 1/p (Yu et al. 2024, so E[result] = τ);
            ``"l1"`` rescales the kept entries so the L1 norm equals τ's (mergekit's ``rescale_norm: l1``
            style, not unbiased entry-wise); ``"none"`` leaves them as they are.
    """
    if density >= 1:
        return tau
    keep = torch.bernoulli(torch.full_like(tau, density, dtype=torch.float32), generator=generator)
    out = tau * keep
    if rescale == "inverse":
        out = out / density
    elif rescale == "l1":
        before, after = tau.abs().sum(), out.abs().sum()
        if before >= 1e-7 and after >= 1e-7:  # mergekit's tolerance: tiny norms are left unscaled
            out = out * (before / after)
    return out


def sign_consensus_merge(
    taus: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """TIES elect + disjoint merge with mergekit's semantics.

    With ``vᵢ = wᵢ τᵢ``: the elected sign is ``s = +1`` where ``Σ vᵢ ≥ 0`` else ``-1``; ``mᵢ`` marks the entries
    where ``vᵢ`` is non-zero and has sign ``s``; the result is ``Σ mᵢ vᵢ / Σ wᵢ mᵢ`` element-wise
    (``normalize=True``; 0 where no adapter agrees, the divisor being set to 1 there as mergekit does), or
    ``Σ mᵢ vᵢ`` with ``normalize=False``.
    """
    stacked = torch.stack([t.float() for t in taus])  # (n, *shape)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).view(-1, *([1] * taus[0].ndim))
    weighted = stacked * w
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == elected  # sign 0 (a trimmed/dropped entry) never agrees
    num = (weighted * mask).sum(0)
    if not normalize:
        return num
    den = (w * mask).sum(0)
    den = torch.where(den == 0, torch.ones_like(den), den)
    return num / den
