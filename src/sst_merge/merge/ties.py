"""TIES-Merging (Yadav et al. 2023) with mergekit's ``normalize: true`` semantics.

Per module: trim each τᵢ to its top ``max(1, int(density·numel))`` entries by magnitude, elect the sign of
``Σ wᵢ τ̂ᵢ`` (+1 on ties at 0), and average the agreeing entries weighted by wᵢ: ``λ · Σ wᵢ mᵢ τ̂ᵢ / Σ wᵢ mᵢ``
(0 where no adapter agrees). Note PEFT's ``ties`` divides by the *count* of agreeing adapters instead.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sst_merge.merge.base import MERGE_METHODS, MergeMethod, MethodParams
from sst_merge.merge.sparsify import magnitude_trim, sign_consensus_merge


class TiesParams(MethodParams):
    """TIES parameters: ``density`` is the fraction of entries kept per module (by magnitude)."""

    density: float = Field(gt=0, le=1, description="fraction of each ΔW's entries kept, in (0, 1]")


@MERGE_METHODS.register("ties")
class Ties(MergeMethod[TiesParams]):
    name = "ties"
    Params = TiesParams
    trims = True  # the planner's law: trim and sign election over every module
    description = "trim to top-density by magnitude, elect sign, disjoint weighted mean (mergekit semantics)"

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: TiesParams, generator: torch.Generator
    ) -> torch.Tensor:
        trimmed = [magnitude_trim(t, params.density) for t in taus]
        return sign_consensus_merge(trimmed, weights) * params.lambda_
