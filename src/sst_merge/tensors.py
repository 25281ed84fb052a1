"""Checks on tensors that every layer shares (a lower layer than adapters, merge and fisher, which all use them)."""

from __future__ import annotations

import torch


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """``torch.isfinite(t).all()`` without its temporaries (an ``abs`` copy and two masks of ``t``'s size).

    The minimum and maximum are finite exactly when every element is: NaN propagates into both, +Inf is the
    maximum, -Inf the minimum. One read of ``t``; a 0-dim bool tensor on ``t``'s device (no host sync). An empty
    tensor is finite, as with ``isfinite``.
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)
