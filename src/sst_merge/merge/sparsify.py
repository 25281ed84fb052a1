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
    magnitude, found by selection, never a sort (:func:`kth_largest`); if entries tie at the threshold,
    ``torch.topk`` picks exactly k of them.
    """
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    mag = flat.abs()
    keep = mag >= kth_largest(mag, k)
    if int(torch.count_nonzero(keep)) != k:  # ties at the threshold
        keep = torch.zeros_like(keep)
        keep[torch.topk(mag, k, sorted=False).indices] = True
    return (flat * keep).view_as(tau)


#: Entries of the strided sample :func:`kth_largest` brackets the threshold with.
_SAMPLE = 4096


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th largest entry of the 1-D ``values`` (exactly what ``torch.kthvalue(values, n-k+1)`` gives).

    Faster than one ``kthvalue`` over all n entries: the quantiles of a strided sample (deterministic, no random
    numbers) bracket the answer in ``[lo, hi]``; when the count above ``hi`` and the band ``[lo, hi]`` show the
    k-th largest lies in the band, ``kthvalue`` runs on the band only (a few percent of n). A sample that misses
    falls back to the full ``kthvalue``, so the result is always exact; only the speed depends on the sample.
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}] (the number of values)")
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(values, n - k + 1).values
    sample = values[:: n // _SAMPLE].float()
    q, m = 1 - k / n, sample.numel()
    margin = 4 * (q * (1 - q) / m) ** 0.5 + 2 / m  # 4 standard errors of a sample quantile, plus rounding
    lo = float(torch.quantile(sample, max(0.0, q - margin)))  # sample values: exact in the input's dtype
    hi = float(torch.quantile(sample, min(1.0, q + margin)))
    above = int(torch.count_nonzero(values > hi))
    band = values[(values >= lo) & (values <= hi)]
    j = k - above  # rank of the answer inside the band, counted from its top
    if 1 <= j <= band.numel():
        return torch.kthvalue(band, band.numel() - j + 1).values
    return torch.kthvalue(values, n - k + 1).values


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
    total = weighted_sum(taus, weights)  # Σ vᵢ
    elected = torch.where(total >= 0, 1.0, -1.0)  # s
    num = torch.zeros_like(total)
    den = torch.zeros_like(total)
    agreeing = torch.empty_like(total)
    for t, w in zip(taus, weights, strict=True):
        # |vᵢ| where vᵢ is non-zero with sign s, else 0 (in place: these tensors are a module's full ΔW)
        torch.mul(t.float(), elected, out=agreeing).mul_(float(w)).clamp_min_(0)
        num.add_(agreeing)
        den.add_((agreeing > 0).to(den.dtype), alpha=float(w))
    num.mul_(elected)
    if not normalize:
        return num
    return num.div_(torch.where(den == 0, 1.0, den))
