"""Learned merge coefficients (the AdaMerging family, Yang et al. 2024): ``ΔW_m = λ Σᵢ c_{i,g(m)} τ_{i,m}``.

One coefficient per adapter and group ``g`` — a module (``granularity: module``, AdaMerging's "layer-wise", one per
parameter tensor) or a decoder layer (``layer``) — fitted on the *development split* to a three-way objective
(design §4), each term the mean NLL of response tokens:

* **harmful** (``harmful_data``, default ``harmbench_val``): each prompt → one of the project's refusals
  (:func:`~sst_merge.tasks.safety.refusal_for`), loss on its first ``loss_tokens`` tokens;
* **benign** (``benign_data``, default ``benign_dev``): each prompt → the *reference* model's own greedy answer
  (base + the utility adapters at their weights), first ``loss_tokens`` tokens;
* **task** (``task_data``, default ``utility_dev:TASK`` of each utility adapter's task): the dev item's answer.

The reference in AdaMerging (github.com/EnnengYang/AdaMerging, ``src/main_layer_wise_adamerging.py``) starts every
coefficient at 0.3, clamps to [0, 1] and minimises prediction entropy on unlabelled *test* inputs with Adam (lr
1e-3, 500 steps). Here a coefficient starts at ``init · wᵢ`` (1: task arithmetic, where a LoRA is trained to
act), is projected onto ``clamp`` (default [0, 2]: an adapter may be dropped or doubled), and the data are labelled
development sets; a source that is or overlaps an evaluation set is refused (:mod:`sst_merge.tasks.holdout`).

The fitted coefficients are cached by content (model, adapters and weights, data, every setting), so a rerun reads
them without loading the model. The safety weight of a sweep is ``harmful_weight``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from sst_merge.cache import Damaged, entry_lock, model_fingerprint, read_checked
from sst_merge.errors import ConfigError
from sst_merge.fisher import cache as fcache
from sst_merge.fisher.data import items_hash, load_items
from sst_merge.io import atomic_write_json, json_digest
from sst_merge.merge import learned_data
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams, check_same_linear_targets
from sst_merge.merge.learned_fit import FitSettings, coefficient_groups, fit, module_factors
from sst_merge.merge.sparsify import weighted_sum
from sst_merge.models.tokenize import pad_id
from sst_merge.tasks.holdout import check_not_evaluation, check_not_evaluation_name

log = logging.getLogger(__name__)

#: Bump when fitted coefficients for the same key would change, so cached ones are not reused.
CACHE_VERSION = 1
TERMS = ("harmful", "benign", "task")


class LearnedParams(MethodParams):
    """Parameters of ``learned`` (YAML ``params:``)."""

    granularity: Literal["module", "layer"] = Field("module", description="one coefficient per module or per layer")
    init: float = Field(1.0, description="starting coefficient, times the adapter's weight (1: task arithmetic)")
    steps: int = Field(24, ge=0, description="Adam steps (0: no fit, task arithmetic at init); ~8 s each on SmolLM2")
    lr: float = Field(0.05, gt=0, description="Adam learning rate on the coefficients")
    batch_size: int = Field(4, ge=1, description="examples of each term per step (one forward of 3× as many)")
    harmful_data: str = Field("harmbench_val", description="harmful prompts → a refusal (development split)")
    benign_data: str = Field("benign_dev", description="benign prompts → the reference model's greedy answer")
    task_data: list[str] | None = Field(None, description="task items (default: utility_dev:TASK per utility adapter)")
    harmful_weight: float = Field(1.0, ge=0, description="weight of the refusal term (the sweep's safety weight)")
    benign_weight: float = Field(1.0, ge=0, description="weight of the benign-answer term")
    task_weight: float = Field(1.0, ge=0, description="weight of the task term")
    loss_tokens: int = Field(8, ge=1, description="response tokens of a refusal / benign answer that carry the loss")
    clamp: tuple[float, float] = Field((0.0, 2.0), description="range every coefficient is kept in")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response)")
    cache: bool = Field(True, description="re-use fitted coefficients (and reference answers) from the disk cache")
    cache_dir: str | None = Field(None, description="cache location (default: as the Fisher cache)")

    @field_validator("task_data", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _sane(self) -> LearnedParams:
        lo, hi = self.clamp
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"clamp must be two finite numbers, low < high (got {list(self.clamp)})")
        if self.steps > 0 and self.harmful_weight == self.benign_weight == self.task_weight == 0:
            raise ValueError("every term weight is 0, so there is nothing to fit; raise one or set steps: 0")
        return self

    def weights(self) -> dict[str, float]:
        return {"harmful": self.harmful_weight, "benign": self.benign_weight, "task": self.task_weight}


@MERGE_METHODS.register("learned")
class LearnedMerge(MergeMethod[LearnedParams]):
    """Per-module (or per-layer) coefficients of each adapter's ΔW, fitted on the development split."""

    name = "learned"
    Params = LearnedParams

    def fit_plan(self, params: LearnedParams) -> dict[str, int]:
        """The planner's law: Adam steps, one forward + backward per weighted term, benign answers generated first."""
        weights = params.weights()
        benign = (
            load_items(params.benign_data, need_response=False, what="benign_data") if weights["benign"] > 0 else []
        )
        terms = sum(w > 0 for w in weights.values())
        return {
            "steps": params.steps,
            "batch": params.batch_size,
            "length": params.max_length,
            "terms": terms,
            "benign": len(benign),
            "tokens": params.loss_tokens,
        }

    description = "λ·Σ c_{i,g}τᵢ, coefficients per module/layer fitted on dev data (refuse / answer / task)"
    # the safety weight α is harmful_weight: how much the fit values refusing harmful prompts against answering
    # benign ones and the task; the safety adapter's own weight stays 1 (its starting coefficient)
    safety_weight_param = "harmful_weight"

    def check(self, params: LearnedParams, ctx: MergeContext) -> None:
        """Refuse mismatched adapters, evaluation data, too little data or no base model, before any model load."""
        self._groups(params, ctx)
        if params.steps > 0:
            if ctx.load_model is None or not ctx.base_model:
                raise ConfigError("learned fits on the base model; give the merge a base model (or set steps: 0)")
            self._data(params, ctx)

    def linear_coefficients(self, params: LearnedParams, ctx: MergeContext) -> list[float] | None:
        if params.steps > 0:
            return None  # the coefficients differ per module
        return [params.lambda_ * params.init * w for w in ctx.weights]

    def merge(self, params: LearnedParams, ctx: MergeContext) -> dict[str, torch.Tensor]:
        groups, names = self._groups(params, ctx)
        c0 = torch.tensor([[params.init * w] * len(names) for w in ctx.weights], dtype=torch.float64)
        diag: dict[str, Any] = {"method": "learned", "settings": params.model_dump(by_alias=True), "groups": names}
        if params.steps == 0:
            coeffs, diag["fit"] = c0, "skipped (steps = 0)"
        else:
            coeffs = self._fitted(params, ctx, groups, names, c0, diag)
        diag["adapters"] = [str(a.path) for a in ctx.adapters]
        diag["coefficients"] = coeffs.tolist()  # (adapters × groups), in the order of "adapters" and "groups"
        diag["coefficients_mean"] = coeffs.mean(1).tolist()
        ctx.diagnostics["learned"] = diag
        return {
            m: weighted_sum(ctx.taus(m), coeffs[:, groups[m]].tolist()) * params.lambda_  # type: ignore[arg-type]
            for m in ctx.modules
        }

    # ---- inputs ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _groups(params: LearnedParams, ctx: MergeContext) -> tuple[dict[str, int], list[str]]:
        check_same_linear_targets(ctx, "learned")
        return coefficient_groups(list(ctx.modules), params.granularity)

    def _data(self, params: LearnedParams, ctx: MergeContext) -> dict[str, tuple[list[str], list[dict]]]:
        """Load, vet and size each weighted term's data: term → (its sources, its items)."""
        sources = {"harmful": [params.harmful_data], "benign": [params.benign_data], "task": params.task_data}
        if params.task_weight > 0 and not sources["task"]:
            sources["task"] = learned_data.default_task_data(ctx.adapters, ctx.roles)
        out: dict[str, tuple[list[str], list[dict]]] = {}
        for term, w in params.weights().items():
            if w == 0:
                continue
            items: list[dict] = []
            for src in sources[term] or []:
                check_not_evaluation_name(src, f"{term}_data")
                got = load_items(src, need_response=term == "task", what=f"{term}_data")
                check_not_evaluation(src, [it["prompt"] for it in got], f"{term}_data")
                items += got
            if len(items) < params.batch_size:
                raise ConfigError(
                    f"learned: {term}_data {sources[term]} holds {len(items)} items, fewer than "
                    f"batch_size {params.batch_size}; give more items or lower batch_size"
                )
            out[term] = (list(sources[term] or []), items)
        return out

    # ---- fit (cached) -------------------------------------------------------------------------------------------

    def _fitted(
        self,
        params: LearnedParams,
        ctx: MergeContext,
        groups: dict[str, int],
        names: list[str],
        c0: torch.Tensor,
        diag: dict[str, Any],
    ) -> torch.Tensor:
        """Return the fitted coefficients (adapters × groups): from the cache, or fitted and cached."""
        data = self._data(params, ctx)
        directory = fcache.cache_dir(params.cache_dir, ctx.workdir)
        model_fp = {"name": ctx.base_model, "model": model_fingerprint(str(ctx.base_model))}
        hashes = {t: items_hash(items, need_response=t == "task") for t, (_, items) in data.items()}
        key = json_digest(
            {
                "version": CACHE_VERSION,
                "model": model_fp,
                "modules": sorted(groups),
                "adapters": [[a.sha256, w, r] for a, w, r in zip(ctx.adapters, ctx.weights, ctx.roles, strict=True)],
                "data": hashes,
                "settings": params.model_dump(by_alias=True, exclude={"cache", "cache_dir"}),
            }
        )
        path = Path(directory) / f"learned-{key[:32]}.json"
        diag["data"] = {t: {"sources": s, "n": len(items), "sha256": hashes[t]} for t, (s, items) in data.items()}
        diag["cache_dir"] = str(directory)
        with entry_lock(path) if params.cache else contextlib.nullcontext():
            hit = read_checked(path, lambda p: _check_entry(p, key, c0.shape)) if params.cache else None
            if hit is None:
                model, tok = ctx.load_model()
                examples = learned_data.examples(model, tok, data, params, ctx, directory, model_fp)
                terms = [(t, params.weights()[t], examples.get(t, [])) for t in TERMS]
                settings = FitSettings(
                    params.steps,
                    params.lr,
                    params.batch_size,
                    params.seed,
                    params.lambda_,
                    params.clamp,
                    ctx.show_progress,
                )
                res = fit(model, terms, module_factors(ctx.adapters, groups), c0, pad_id(tok), settings)
                hit = {
                    "key": key,
                    "coefficients": res.coeffs.tolist(),
                    "groups": names,
                    "loss_curve": res.curve,
                    "seconds": res.seconds,
                    "data": diag["data"],
                }
                if params.cache:
                    atomic_write_json(path, hit)
                diag["fit"] = "computed"
                log.info("learned: fitted %d coefficients in %.1f s", c0.numel(), res.seconds)
            else:
                diag["fit"] = "cache hit"
        diag["loss_curve"], diag["fit_seconds"] = hit["loss_curve"], hit["seconds"]
        return torch.tensor(hit["coefficients"], dtype=torch.float64)


def _check_entry(path: Path, key: str, shape: torch.Size) -> dict[str, Any]:
    """A cached fit: its key matches, its coefficients have the shape asked for and are finite."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("key") != key:
        raise Damaged(f"holds the fit of key {str(data.get('key'))[:32]}, not {key[:32]}")
    c = torch.tensor(data["coefficients"], dtype=torch.float64)
    if tuple(c.shape) != tuple(shape) or not bool(torch.isfinite(c).all()):
        raise Damaged(f"coefficients of shape {tuple(c.shape)} (want {tuple(shape)}) or not finite")
    return data
