"""Task arithmetic (Ilharco et al. 2023): ``λ · Σ wᵢ τᵢ``."""

from __future__ import annotations

import torch

from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams
from sst_merge.merge.sparsify import weighted_sum


class TaskArithmeticParams(MethodParams):
    """Only the shared ``lambda`` (global scale) and ``seed`` (unused: the method is deterministic)."""


@MERGE_METHODS.register("task_arithmetic")
class TaskArithmetic(MergeMethod[TaskArithmeticParams]):
    name = "task_arithmetic"
    Params = TaskArithmeticParams
    description = "λ·Σ wᵢτᵢ (exact as a PEFT adapter by concatenating factors)"

    def linear_coefficients(self, params: MethodParams, ctx: MergeContext) -> list[float]:
        return [params.lambda_ * w for w in ctx.weights]

    def merge_module(
        self, taus: list[torch.Tensor], weights: list[float], params: MethodParams, generator: torch.Generator
    ) -> torch.Tensor:
        return weighted_sum(taus, weights) * params.lambda_
