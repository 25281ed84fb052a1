"""DARE + TIES: the DARE sparsifier (see :mod:`dare_linear`) followed by the TIES sign election and disjoint
weighted mean (see :mod:`ties`): ``λ · Σ wᵢ mᵢ τ̃ᵢ / Σ wᵢ mᵢ`` (``normalize: false`` drops the division, which is
mergekit's default for its ``dare_ties``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from sst_merge.merge.base import MERGE_METHODS, MergeMethod
from sst_merge.merge.dare_linear import DareParams
from sst_merge.merge.sparsify import dare_drop, sign_consensus_merge


class DareTiesParams(DareParams):
    """``dare_linear``'s parameters plus ``normalize`` (divide by the agreeing weights, as in ``ties``)."""

    normalize: bool = Field(
        True, description="divide by Σ wᵢmᵢ like ties (mergekit's dare_ties defaults to false: plain Σ wᵢmᵢτ̃ᵢ)"
    )


@MERGE_METHODS.register("dare_ties")
class DareTies(MergeMethod[DareTiesParams]):
    name = "dare_ties"
    Params = DareTiesParams
    description = "DARE random drop + rescale, then TIES sign election and disjoint mean (seeded)"

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: DareTiesParams, generator: torch.Generator
    ) -> torch.Tensor:
        dropped = [dare_drop(t, params.density, generator, params.rescale) for t in taus]
        return sign_consensus_merge(dropped, weights, params.normalize) * params.lambda_
