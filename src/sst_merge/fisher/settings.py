"""How a Fisher pass is run: one typed block shared by every method that estimates statistics (``sst``,
``safety_span``, ``fisher_merge``, ``regmean``).

The block is spelled nested (``estimation: {n_samples: 32, batch_size: 4}``) or, as it always was, flat among the
method's parameters (``n_samples: 32``); :func:`fold` turns the flat spelling into the nested one when parameters are
validated, :func:`flatten` the nested one into the flat one wherever parameters are written or keyed, so both
spellings give the same parameters, the same files and the same cache keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from sst_merge.fisher import cache as fcache
from sst_merge.fisher.pipeline import FisherSetup

#: The name of the nested block in a method's parameters.
BLOCK = "estimation"


class FisherSettings(BaseModel):
    """How many examples a Fisher pass takes, in what batches and lengths, and where its statistics are cached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_samples: int = Field(64, ge=1, description="examples per Fisher (per objective, or per adapter)")
    batch_size: int = Field(8, ge=1, description="examples per forward/backward")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response)")
    max_new_tokens: int = Field(64, ge=1, description="length of responses the model generates (sampled / greedy)")
    cache: bool = Field(True, description="re-use Fisher statistics from the on-disk cache")
    cache_dir: str | None = Field(
        None, description="cache location (default: workdir, $SST_MERGE_CACHE/fisher or ~/.cache/sst-merge/fisher)"
    )

    def setup(
        self,
        approximation: str,
        modules: list[str],
        load_model: Callable[[], tuple[Any, Any]],
        model_name: str | None,
        pre_merge: dict[str, torch.Tensor],
        pre_merge_key: Any,
        seed: int,
        workdir: str | Path | None = None,
        show_progress: bool = False,
    ) -> FisherSetup:
        """The :class:`FisherSetup` of a pass at ``base + pre_merge`` over ``modules`` with these settings."""
        return FisherSetup(
            approximation=approximation,
            modules=modules,
            load_model=load_model,
            model_name=model_name,
            pre_merge=pre_merge,
            pre_merge_key=pre_merge_key,
            max_length=self.max_length,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            seed=seed,
            cache=self.cache,
            cache_dir=fcache.cache_dir(self.cache_dir, workdir),
            show_progress=show_progress,
        )


#: The settings' flat spellings (each a key of the method's parameters).
KEYS = tuple(FisherSettings.model_fields)


def fold(data: dict[str, Any]) -> dict[str, Any]:
    """Move flat settings (``n_samples: 32``) into the nested block; refuse a setting given both ways."""
    flat = {k: data[k] for k in KEYS if k in data}
    if not flat:
        return data
    nested = data.get(BLOCK) or {}
    if isinstance(nested, BaseModel):
        nested = nested.model_dump(exclude_unset=True)
    both = sorted(set(flat) & set(nested))
    if both:
        raise ValueError(f"{both[0]} is given twice, flat and in {BLOCK}; give it once")
    rest = {k: v for k, v in data.items() if k not in KEYS}
    return {**rest, BLOCK: {**nested, **flat}}


def flatten(data: dict[str, Any], nested_wins: bool = False) -> dict[str, Any]:
    """The flat spelling of parameters that may hold the nested block (the form parameters are keyed and written in).

    A setting given both ways is refused, unless ``nested_wins`` (a layered config whose latest layer wrote the
    block: its value replaces the earlier layer's flat one).
    """
    nested = data.get(BLOCK)
    if not isinstance(nested, dict):
        return dict(data)
    both = sorted(set(nested) & set(data))
    if both and not nested_wins:
        raise ValueError(f"{both[0]} is given twice, flat and in {BLOCK}; give it once")
    return {**{k: v for k, v in data.items() if k != BLOCK}, **nested}
