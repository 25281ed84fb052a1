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

    ``density >= 1`` returns ``tau`` unchanged. Exactly k entries are kept: the threshold is the k-th largest
    magnitude (``torch.kthvalue``, a selection, cheaper than ``torch.topk`` for k ≈ numel/2); if entries tie at
    the threshold, ``torch.topk`` picks exactly k of them.
    """
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    mag = flat.abs()
    keep = mag >= torch.kthvalue(mag, n - k + 1).values
    if int(keep.sum()) != k:  # ties at the threshold
        keep = torch.zeros_like(keep)
        keep[torch.topk(mag, k, sorted=False).indices] = True
    return (flat * keep).view_as(tau)


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
    vs = [t.float() * float(w) for t, w in zip(taus, weights, strict=True)]
    total = torch.stack(vs).sum(0)
    elected = torch.where(total >= 0, 1.0, -1.0)  # s
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    for v, w in zip(vs, weights, strict=True):
        agreeing = (v * elected).clamp_min_(0)  # |vᵢ| where vᵢ is non-zero with sign s, else 0
        num += agreeing
        den += (agreeing > 0) * float(w)
    num *= elected
    if not normalize:
        return num
    return num / torch.where(den == 0, torch.ones_like(den), den)
