"""Linear (weighted average): ``λ · Σ wᵢ τᵢ / Σ wᵢ`` (λ defaults to 1, giving design §4's ``Σ wᵢ τᵢ / Σ wᵢ``)."""

from __future__ import annotations

import torch

from sst_merge.errors import ConfigError
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams
from sst_merge.merge.sparsify import weighted_sum


class LinearParams(MethodParams):
    """Only the shared ``lambda`` and ``seed`` (unused)."""


def _normalised(weights: list[float]) -> list[float]:
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ConfigError(f"method linear divides by the sum of adapter weights, which is 0 ({weights}); change them")
    return [w / total for w in weights]


@MERGE_METHODS.register("linear")
class Linear(MergeMethod[LinearParams]):
    name = "linear"
    Params = LinearParams
    description = "λ·Σ wᵢτᵢ / Σ wᵢ, a weighted average (exact as a PEFT adapter)"

    def check(self, params: MethodParams, ctx: MergeContext) -> None:
        _normalised(ctx.weights)

    def linear_coefficients(self, params: MethodParams, ctx: MergeContext) -> list[float]:
        return [params.lambda_ * c for c in _normalised(ctx.weights)]

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: MethodParams, generator: torch.Generator
    ) -> torch.Tensor:
        return weighted_sum(taus, _normalised(weights)) * params.lambda_
