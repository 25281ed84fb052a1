"""DARE + task arithmetic (Yu et al. 2024): drop entries at random, rescale, then ``λ · Σ wᵢ τ̃ᵢ``.

Each entry of τᵢ is kept with probability ``density`` (a seeded ``torch.Generator``; the same seed gives the same
output) and kept entries are multiplied by ``1/density`` (the paper's rule: E[τ̃ᵢ] = τᵢ). ``rescale: l1`` instead
rescales the kept entries so that each τ̃ᵢ keeps τᵢ's L1 norm (the norm-preserving variant mergekit offers);
``rescale: none`` keeps them unscaled.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sst_merge.merge.base import MERGE_METHODS, MergeMethod, MethodParams
from sst_merge.merge.sparsify import DareRescale, dare_drop, weighted_sum


class DareParams(MethodParams):
    """DARE parameters: keep probability ``density`` and the rescaling rule of the kept entries."""

    density: float = Field(gt=0, le=1, description="probability of keeping each ΔW entry, in (0, 1]")
    rescale: DareRescale = Field("inverse", description="inverse (×1/density, the paper), l1 (keep L1 norm), none")


@MERGE_METHODS.register("dare_linear")
class DareLinear(MergeMethod[DareParams]):
    name = "dare_linear"
    Params = DareParams
    description = "random drop with prob 1-density, rescale 1/density, then task arithmetic (seeded)"

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: DareParams, generator: torch.Generator
    ) -> torch.Tensor:
        dropped = [dare_drop(t, params.density, generator, params.rescale) for t in taus]
        return weighted_sum(dropped, weights) * params.lambda_
