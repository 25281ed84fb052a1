"""``safety_span``: SST-Merge keeping the whole range ``F_s`` ranks — the oblique projection of the safety update onto
the span of the safety gradients (design §5). Until the ``share`` rule, every default ``sst`` run with lowrank was
this method; it is ``sst`` with ``share: 1`` and no other selection.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sst_merge.merge.base import MERGE_METHODS
from sst_merge.merge.sst import SSTMerge, SSTParams


class SafetySpanParams(SSTParams):
    """Parameters of ``safety_span``: ``sst``'s, with the whole ranked range kept (``share: 1``, no other selection)."""

    share: float | None = Field(1.0, description="fixed at 1: every direction F_s ranks is kept")

    @model_validator(mode="before")
    @classmethod
    def _whole_range(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in ("k", "fraction", "threshold") if data.get(k) is not None]
            if given or data.get("share", 1.0) != 1.0:
                what = (given or ["share"])[0]
                raise ValueError(
                    f"safety_span keeps the whole range of F_s, so it takes no {what}; use method sst for a k / "
                    "fraction / threshold / share selection"
                )
        return data


@MERGE_METHODS.register("safety_span")
class SafetySpan(SSTMerge):
    """The oblique projection of the safety update onto the span of the safety gradients (``sst`` with ``share: 1``):
    with ``lowrank``, the smallest-``B``-norm update with ``τ_safety``'s first-order effect on each of the N_s safety
    Fisher examples (design §5). Until the ``share`` rule, every default ``sst`` run with lowrank was this method."""

    name = "safety_span"
    Params = SafetySpanParams
    description = "Σ wᵢτᵢ(utility) + α·P(τ_safety), P the oblique projector onto the safety gradients' span"
