"""Pure tensor kernels for the baseline merge methods: trimming, DARE dropping, TIES sign consensus.

Tensors in, tensors out: no model, file or config. Inputs are fp32 ΔW of one module (any shape); randomness comes
only from the ``torch.Generator`` passed in.
"""

from __future__ import annotations

import math
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
    magnitude, found by selection, never a sort (:func:`kth_largest`), and the entries at or above it are kept in one
    pass (``hardshrink`` just below the threshold); if entries tie at the threshold, ``torch.topk`` picks exactly k
    of them.
    """
    if density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    mag = flat.abs()
    threshold, at_or_above = _kth_largest_counted(mag, k)
    if at_or_above != k:  # ties at the threshold
        keep = torch.zeros(n, dtype=torch.bool, device=tau.device)
        keep[torch.topk(mag, k, sorted=False).indices] = True
        return (flat * keep).view_as(tau)
    # |x| > the largest value below the threshold  ⇔  |x| >= threshold (no value of the dtype lies between them)
    below = torch.nextafter(threshold, torch.tensor(-math.inf, dtype=threshold.dtype, device=threshold.device))
    return torch.nn.functional.hardshrink(tau, float(below))


#: Entries of the strided sample :func:`kth_largest` brackets the threshold with.
_SAMPLE = 4096


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Return the k-th largest entry of the 1-D ``values`` (exactly what ``torch.kthvalue(values, n-k+1)`` gives).

    Faster than one ``kthvalue`` over all n entries: order statistics of a strided sample (deterministic, no random
    numbers; the stride is a prime, so on a flattened matrix it visits every column instead of the few a stride
    sharing a factor with the row length would — a LoRA ΔW's columns differ in scale) bracket the answer in
    ``[lo, hi]``; when the count above ``hi`` and the band ``[lo, hi]`` show the
    k-th largest lies in the band, ``kthvalue`` runs on the band only (a few percent of n). A sample that misses
    falls back to the full ``kthvalue``, so the result is always exact; only the speed depends on the sample.
    """
    return _kth_largest_counted(values, k)[0]


def _kth_largest_counted(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """:func:`kth_largest` and the number of entries ``>=`` it (``k`` unless entries tie there)."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}] (the number of values)")
    if n > 4 * _SAMPLE:
        sample = values[:: _prime_at_least(n // _SAMPLE)].sort().values  # exact values of the input's dtype
        q, m = 1 - k / n, sample.numel()
        margin = 4 * (q * (1 - q) / m) ** 0.5 + 2 / m  # 4 standard errors of a sample quantile, plus rounding
        lo = sample[max(0, math.floor((q - margin) * (m - 1)))]
        hi = sample[min(m - 1, math.ceil((q + margin) * (m - 1)))]
        above_hi = values > hi
        above = int(torch.count_nonzero(above_hi))
        band = values[(values >= lo) ^ above_hi]  # lo <= v <= hi (above_hi is a subset of values >= lo)
        j = k - above  # rank of the answer inside the band, counted from its top
        if 1 <= j <= band.numel():
            kth = torch.kthvalue(band, band.numel() - j + 1).values
            return kth, above + int(torch.count_nonzero(band >= kth))
    kth = torch.kthvalue(values, n - k + 1).values
    return kth, int(torch.count_nonzero(values >= kth))


def _prime_at_least(m: int) -> int:
    """The smallest prime ``>= m`` (trial division; m is at most a few hundred thousand here)."""
    m = max(m, 2)
    while any(m % d == 0 for d in range(2, math.isqrt(m) + 1)):
        m += 1
    return m


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
    # u < p with u ~ U[0, 1) drawn entry by entry from ``generator`` is what torch.bernoulli(full(p)) draws and
    # compares, so the mask is the same for the same generator state; drawing u directly skips the p tensor and
    # its slower per-entry kernel, and u's buffer becomes the output (no other copy)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32, device=tau.device).lt_(density)  # 1.0 / 0.0
    out = keep.mul_(tau) if torch.promote_types(tau.dtype, keep.dtype) == keep.dtype else keep * tau
    if rescale == "inverse":
        out = out.div_(density)
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
    elected = total.sign_().add_(0.5).sign_()  # s: +1 where Σ vᵢ >= 0, else -1 (sign() - 1, 0, 1 → -1, 1, 1)
    num = torch.zeros_like(elected)
    den = torch.zeros_like(elected)
    agreeing = torch.empty_like(elected)
    for t, w in zip(taus, weights, strict=True):
        # |vᵢ| where vᵢ is non-zero with sign s, else 0 (in place: these tensors are a module's full ΔW)
        torch.mul(t.float(), elected, out=agreeing).mul_(float(w)).clamp_min_(0)
        num.add_(agreeing)
        den.add_(agreeing.sign_(), alpha=float(w))  # mᵢ = sign(|vᵢ|) ∈ {0, 1}
    num.mul_(elected)
    if not normalize:
        return num
    # where no adapter agrees num is 0 and the divisor becomes 1 (elementwise arithmetic: torch.where is slow on CPU)
    return num.div_(den.add_(den.abs().sign_().sub_(1).neg_()))
