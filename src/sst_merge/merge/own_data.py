"""Per-adapter statistics from each adapter's own data at its own model: what ``fisher_merge`` and ``regmean`` weigh
the adapters with (design §4).

For adapter i, ``n_samples`` items of its data source (``params.data[i]``, or by default the training data the
adapter recorded in ``train_info.json``) become one objective: items that carry a ``response`` are used with it,
the others with the adapter's own model's greedy answer — so the safety adapter's statistics cover "refuse harmful"
*and* "answer benign". :func:`sst_merge.fisher.pipeline.fisher_statistics` estimates it at base + τᵢ over every merged
module (``diagonal``: ``E[g²]``; ``kfac``: ``A``, the module-input Gram, and ``G``), cached on disk by the items'
content and the adapter's hash, so a weight or λ sweep re-uses every statistic and never loads the model.

:func:`check_inputs` validates everything (modules, embeddings, weights, model, data) before any model is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.data.sources import DEFAULT_SEED
from sst_merge.errors import ConfigError, DataError
from sst_merge.fisher.data import load_items, subsample
from sst_merge.fisher.objective import Objective, Part
from sst_merge.fisher.pipeline import Stats, fisher_statistics
from sst_merge.merge.base import MergeContext, check_same_linear_targets
from sst_merge.merge.fisher_params import FisherMethodParams

log = logging.getLogger(__name__)

#: The named source of the shipped safety adapter's training data (recipe ``strongreject``; ``@seed=N`` at seed N).
SAFETY_TRAIN = "safety_train"

DEFINITION = (
    "adapter i's own objective at its own model (base + τᵢ, eval mode): its data's prompts with the given response, "
    "or the model's greedy answer where an item has none; log p(response | prompt) over response tokens only"
)


class OwnDataParams(FisherMethodParams):
    """Parameters of the per-adapter statistics pass, shared by ``fisher_merge`` and ``regmean`` (the pass's settings:
    ``estimation``, flat or nested, with ``n_samples`` items per adapter)."""

    data: list[str] | None = Field(
        None,
        description="one data source per adapter, in config order (JSONL path or named source); default: each "
        "adapter's own training data as its train_info.json records (utility:NAME, safety_train)",
    )


@dataclass(frozen=True)
class AdapterData:
    """One adapter's data: where it came from and the subsampled items (with a response first, then without)."""

    source: str
    given: tuple[dict[str, Any], ...]
    greedy: tuple[dict[str, Any], ...]

    def objective(self) -> Objective:
        parts = (Part(self.given, "given", label="given response"), Part(self.greedy, "greedy", label="greedy answer"))
        return Objective("own_data", tuple(p for p in parts if p.items), DEFINITION)

    def describe(self) -> dict[str, Any]:
        return {
            "data": self.source,
            "n": len(self.given) + len(self.greedy),
            "n_given": len(self.given),
            "n_greedy": len(self.greedy),
        }


def recorded_source(adapter: LoraAdapter) -> str | None:
    """Return the named source of the data ``adapter`` was trained on, from its ``train_info.json`` (else ``None``).

    The seeded sources draw the training split at the adapter's seed (``utility:NAME@seed=N``; the plain name at
    seed 0); for the safety adapter only the default recipe has a source.
    """
    path = Path(adapter.path) / "train_info.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    task, config = info.get("task"), info.get("config", {})
    seed = config.get("seed", DEFAULT_SEED)
    if not task or not isinstance(seed, int):
        return None
    at = "" if seed == DEFAULT_SEED else f"@seed={seed}"
    if task == "safety":
        return SAFETY_TRAIN + at if config.get("safety_data", "strongreject") == "strongreject" else None
    return f"utility:{task}{at}"


def has_response(item: dict[str, Any]) -> bool:
    """Whether ``item`` carries a non-empty ``response`` (used as given; otherwise the model answers greedily)."""
    return isinstance(item.get("response"), str) and bool(item["response"])


def stratified_subsample(items: list[dict[str, Any]], n: int, seed: int, what: str) -> AdapterData:
    """Take ``n`` of ``items`` (seeded), keeping the share of items with a response; needs ``len(items) >= n``."""
    given = [it for it in items if has_response(it)]
    bare = [it for it in items if not has_response(it)]
    # n <= len(items) puts n·share in [n - len(bare), len(given)], and both ends are integers: rounding stays inside
    n_given = round(n * len(given) / len(items))
    return AdapterData(
        what, tuple(subsample(given, n_given, seed, what)), tuple(subsample(bare, n - n_given, seed + 1, what))
    )


def _name(ctx: MergeContext, i: int) -> str:
    return f"adapter {i} ({ctx.adapters[i].path})"


def check_inputs(params: OwnDataParams, ctx: MergeContext, method: str) -> list[AdapterData]:
    """Refuse what the method cannot merge and return each adapter's data; loads no model.

    Raises:
        ConfigError: one line naming the input and the fix.
    """
    check_same_linear_targets(ctx, method)
    if any(w < 0 for w in ctx.weights) or sum(ctx.weights) <= 0:
        raise ConfigError(
            f"{method}: adapter weights {ctx.weights} must be >= 0 with a positive sum (a weighted "
            "average); set each adapter's weight"
        )
    if ctx.load_model is None:
        raise ConfigError(f"{method} needs the base model for each adapter's statistics; give the merge a base model")
    if params.data is not None and len(params.data) != len(ctx.adapters):
        raise ConfigError(
            f"{method}: params.data has {len(params.data)} sources for {len(ctx.adapters)} adapters; "
            "give one per adapter, in config order"
        )
    out = []
    for i, a in enumerate(ctx.adapters):
        source = params.data[i] if params.data is not None else recorded_source(a)
        if source is None:
            raise ConfigError(
                f"{method}: {_name(ctx, i)} records no training task of a named source (train_info.json "
                "with a task and a seed); give its data in params.data (one source per adapter)"
            )
        try:
            items = load_items(source, need_response=False, what=f"params.data[{i}]")
        except (DataError, ConfigError) as e:  # a missing file or unknown name: say which adapter's
            raise ConfigError(f"{method}: {_name(ctx, i)}: {e}") from e
        n = params.estimation.n_samples
        if len(items) < n:
            raise ConfigError(
                f"{method}: data {source} of {_name(ctx, i)} has {len(items)} items, fewer than "
                f"n_samples={n}; lower params.n_samples or give more data"
            )
        out.append(stratified_subsample(items, n, params.seed, source))
    return out


def _once(load: Callable[[], tuple[Any, Any]]) -> Callable[[], tuple[Any, Any]]:
    """``load``, called at most once: every adapter's pass shares one model (each applies and removes its ΔW)."""
    got: list[tuple[Any, Any]] = []

    def load_once() -> tuple[Any, Any]:
        if not got:
            got.append(load())
        return got[0]

    return load_once


def own_statistics(
    params: OwnDataParams, ctx: MergeContext, approximation: str, method: str
) -> tuple[list[Stats | None], dict[str, Any]]:
    """Return each adapter's statistics (``None`` for a zero-weight adapter, which adds nothing) and diagnostics."""
    data = check_inputs(params, ctx, method)
    load = _once(ctx.load_model)  # type: ignore[arg-type]  (check_inputs refused None)
    stats: list[Stats | None] = []
    per_adapter = []
    for i, (a, d) in enumerate(zip(ctx.adapters, data, strict=True)):
        row = {"path": str(a.path), "weight": ctx.weights[i], **d.describe()}
        per_adapter.append(row)
        if ctx.weights[i] == 0:
            row["cache"] = "skipped (weight 0)"
            stats.append(None)
            continue
        setup = params.fisher_setup(
            ctx,
            approximation,
            list(ctx.modules),
            {m: a.delta(m) for m in ctx.modules},
            (a.sha256, 1.0),
            load_model=load,
        )
        got, info = fisher_statistics([d.objective()], setup)
        row["cache"] = info["fisher_cache"]["own_data"]
        stats.append(got["own_data"])
    log.info("%s: statistics per adapter: %s", method, ", ".join(f"{r['data']} ({r['cache']})" for r in per_adapter))
    return stats, {"approximation": approximation, "definition": DEFINITION, "adapters": per_adapter}
