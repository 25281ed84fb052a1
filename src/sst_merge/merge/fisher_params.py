"""Parameters of the methods that run a Fisher pass (``sst``, ``safety_span``, ``fisher_merge``, ``regmean``): the
shared :class:`~sst_merge.fisher.settings.FisherSettings` block, and the one builder of a pass's setup.

``estimation`` is accepted nested or flat (``n_samples: 32``, the spelling every config has used) and written flat,
so a merge's recorded parameters and every cache key are what they were before the block existed.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer, model_validator

from sst_merge.fisher import settings as fsettings
from sst_merge.fisher.pipeline import FisherSetup
from sst_merge.fisher.settings import FisherSettings
from sst_merge.merge.base import MergeContext, MethodParams


class FisherMethodParams(MethodParams):
    """Parameters shared by the methods that estimate Fisher statistics: ``estimation`` (nested or flat)."""

    estimation: FisherSettings = Field(default_factory=FisherSettings, description="how the Fisher pass runs")

    @model_validator(mode="before")
    @classmethod
    def _fold_flat_settings(cls, data: Any) -> Any:
        return fsettings.fold(data) if isinstance(data, dict) else data

    @model_serializer(mode="wrap")
    def _write_flat(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        return fsettings.flatten(handler(self))

    # The flat names, read by callers written before the block (plan.py).
    @property
    def n_samples(self) -> int:
        return self.estimation.n_samples

    @property
    def batch_size(self) -> int:
        return self.estimation.batch_size

    @property
    def max_length(self) -> int:
        return self.estimation.max_length

    @property
    def max_new_tokens(self) -> int:
        return self.estimation.max_new_tokens

    def fisher_setup(
        self,
        ctx: MergeContext,
        approximation: str,
        modules: list[str],
        pre_merge: dict[str, torch.Tensor],
        pre_merge_key: Any,
        load_model: Any = None,
    ) -> FisherSetup:
        """The setup of a Fisher pass of this merge at ``base + pre_merge`` (``load_model``: default the context's)."""
        return self.estimation.setup(
            approximation,
            modules,
            load_model or ctx.load_model,
            str(ctx.base_model) if ctx.base_model else None,
            pre_merge,
            pre_merge_key,
            self.seed,
            ctx.workdir,
            ctx.show_progress,
        )
