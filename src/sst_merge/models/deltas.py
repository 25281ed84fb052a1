"""A model with ΔW added to its weights for the duration of a block, the exact originals restored after.

The one way every layer evaluates, estimates a Fisher at or fits coefficients around a merged point without copying
the model: the experiment runner, the Fisher pipeline (the pre-merge point) and the learned coefficients' reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from sst_merge.errors import AdapterError


@contextlib.contextmanager
def applied_deltas(model: nn.Module, deltas: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Add ΔW to the named modules' weights for the duration of the block; restore the exact originals after."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, dw in deltas.items():
                w = model.get_submodule(name).weight
                if tuple(w.shape) != tuple(dw.shape):
                    raise AdapterError(
                        f"module {name}: ΔW shape {tuple(dw.shape)} does not match weight {tuple(w.shape)}"
                    )
                saved[name] = w.detach().clone()
                w.copy_((w.float() + dw.to(w.device)).to(w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, w0 in saved.items():
                model.get_submodule(name).weight.copy_(w0)
