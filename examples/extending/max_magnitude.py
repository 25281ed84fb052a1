"""A merge method in one file: per entry, keep the adapter update with the largest weighted magnitude.

Register it by importing this module; then ``method: max_magnitude`` works in a merge config, in ``sst-merge
merge`` (after ``import examples.extending.max_magnitude``) and in an experiment's ``sweep.methods``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sst_merge.merge.base import MERGE_METHODS, MergeMethod, MethodParams


class MaxMagnitudeParams(MethodParams):
    """``lambda`` and ``seed`` come from :class:`MethodParams`; this method adds one option."""

    keep_sign: bool = Field(True, description="keep the chosen entry's sign (false: its absolute value)")


@MERGE_METHODS.register("max_magnitude")
class MaxMagnitude(MergeMethod[MaxMagnitudeParams]):
    name = "max_magnitude"
    Params = MaxMagnitudeParams
    description = "per entry, the wᵢτᵢ of largest magnitude, times λ"

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: MaxMagnitudeParams, generator: torch.Generator
    ) -> torch.Tensor:
        stacked = torch.stack([w * t for w, t in zip(weights, taus, strict=True)])  # (n_adapters, out, in)
        pick = stacked.abs().argmax(dim=0, keepdim=True)  # (1, out, in)
        chosen = stacked.gather(0, pick).squeeze(0)  # (out, in)
        return params.lambda_ * (chosen if params.keep_sign else chosen.abs())
