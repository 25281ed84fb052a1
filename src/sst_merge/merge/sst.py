"""SST-Merge: ``ΔW = Σ_utility wᵢ τᵢ + α · P_k(τ_safety)`` with a Fisher-GEVP projector (SPEC §5).

``P_k`` keeps the directions with the highest safety gain per unit of utility damage: the top generalized
eigenvectors of ``F_s v = λ (F_u + εI) v``, as the oblique projector ``V_k V_kᵀ B``. Both Fishers are estimated at
the *pre-merge point* — the base model plus the weighted utility ΔW — in eval mode, with respect to the full weight
``W`` of every module the safety adapter changes (the space the projection acts on):

* ``F_s``: per-example gradients of ``log p(refusal | harmful prompt)`` on ``safety_data``; response tokens only.
* ``F_u``: per-example gradients of ``log p(y | x)`` on ``utility_data``; ``y`` sampled from the pre-merge model with
  a seeded generator (``utility_fisher: true``, the default: the true Fisher) or the dataset's responses
  (``empirical``).

Approximations: ``diagonal``, ``kfac``, ``lowrank`` (see :mod:`sst_merge.fisher`). Statistics are cached on disk,
so sweeping α, k, fraction, threshold or eps re-uses them. ``lambda`` (from the shared parameters) scales the whole
result, like task arithmetic's λ; the safety adapter's own ``weight`` must stay 1 (its scale is ``alpha``).

A failure in the Fisher step raises; the method never returns an unmerged or utility-only model in its place.
With ``alpha = 0`` the result is exactly the utility part, and when every direction is kept (``k: all`` or
``fraction: 1.0``) it is exactly task arithmetic with the safety weight α; neither needs the Fisher, so it is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from sst_merge import distributed as ddp
from sst_merge.errors import AdapterError, ConfigError
from sst_merge.fisher import cache as fcache
from sst_merge.fisher.data import (
    Example,
    encode_example,
    encode_prompt,
    items_hash,
    load_items,
    subsample,
    truncate,
)
from sst_merge.fisher.estimate import applied_deltas, estimate_fisher
from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.grads import FisherError
from sst_merge.fisher.sampling import sample_responses
from sst_merge.fisher.solve import ZeroUtilityFisherError, project_module
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams

log = logging.getLogger(__name__)

#: How many of the largest λ per module go into the diagnostics (a kfac/diagonal spectrum has p = out·in values).
SPECTRUM_TOP = 256

FISHER_DEFINITIONS = {
    "F_s": "E over safety items of g gᵀ, g = ∇_W log p(response | prompt) summed over response tokens only (prompt "
    "and padding masked), chat template applied, eval mode, at base + utility ΔW",
    "F_u_true": "as F_s on utility prompts, with responses sampled from the pre-merge model (temperature 1, seeded)",
    "F_u_empirical": "as F_s on utility items with the dataset's responses",
    "B": "F_u + εI, ε = eps · mean diag(F_u) (kfac: per-factor damping √eps · mean diag of each factor)",
    "projector": "P_k = V_k V_kᵀ B over the top generalized eigenvectors of F_s v = λ B v (oblique, idempotent)",
}


class SSTParams(MethodParams):
    """Parameters of ``sst`` (YAML ``params:``). Exactly one of ``k``, ``fraction``, ``threshold``."""

    alpha: float = Field(1.0, description="scale of the projected safety update")
    fisher: Literal["diagonal", "kfac", "lowrank"] = Field("lowrank", description="Fisher approximation")
    k: int | Literal["all"] | None = Field(None, description="top-k directions per module ('all' = identity)")
    fraction: float | None = Field(None, gt=0, le=1, description="top share of each module's directions")
    threshold: float | None = Field(None, ge=0, description="keep directions with λ > threshold")
    eps: float = Field(1e-3, gt=0, description="damping relative to the mean diagonal of F_u")
    n_samples: int = Field(64, ge=1, description="examples per Fisher (F_s and F_u each)")
    safety_data: str | None = Field(None, description="JSONL (prompt, response=refusal) or a named source")
    utility_data: str | None = Field(None, description="JSONL (prompt[, response]) or a named source")
    utility_fisher: Literal["true", "empirical"] = Field("true", description="sampled (true) or dataset responses")
    batch_size: int = Field(8, ge=1, description="examples per forward/backward")
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response)")
    max_new_tokens: int = Field(64, ge=1, description="sampled response length for the true Fisher")
    cache: bool = Field(True, description="re-use Fisher statistics from the on-disk cache")
    cache_dir: str | None = Field(
        None, description="cache location (default: workdir, $SST_MERGE_CACHE/fisher or ~/.cache/sst-merge/fisher)"
    )

    @field_validator("utility_fisher", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        # YAML reads `utility_fisher: true` as a boolean.
        if v is True:
            return "true"
        if v is False:
            return "empirical"
        return v

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("k must be >= 0 or 'all'")
        return v

    @model_validator(mode="after")
    def _one_selection(self) -> SSTParams:
        given = [n for n in ("k", "fraction", "threshold") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of k, fraction, threshold" + (f" (got {', '.join(given)})" if given else "")
            )
        if not math.isfinite(self.alpha):
            raise ValueError("alpha must be finite")
        return self

    @property
    def keeps_everything(self) -> bool:
        """Whether the projector is the identity by definition (``k: all`` or ``fraction: 1``)."""
        return self.k == "all" or self.fraction == 1.0

    def selection(self, p: int | None = None) -> Selection:
        if self.k == "all":
            return Selection(k=p if p is not None else 2**62)
        return Selection(k=self.k, fraction=self.fraction, threshold=self.threshold)  # type: ignore[arg-type]


def _roles(ctx: MergeContext) -> tuple[int, list[int]]:
    bad = sorted({r for r in ctx.roles if r not in ("utility", "safety")})
    if bad:
        raise ConfigError(f"sst: adapter role {bad[0]!r} is not 'utility' or 'safety'; set role on every adapter")
    safety = [i for i, r in enumerate(ctx.roles) if r == "safety"]
    utility = [i for i, r in enumerate(ctx.roles) if r == "utility"]
    if len(safety) != 1:
        raise ConfigError(f"sst needs exactly one adapter with role: safety (got {len(safety)}); mark one adapter")
    if not utility:
        raise ConfigError("sst needs at least one adapter with role: utility (got none); add the task adapters")
    s = safety[0]
    if ctx.weights[s] != 1.0:
        raise ConfigError(
            f"sst: the safety adapter's weight is {ctx.weights[s]}; its scale is params.alpha — set weight 1 (or omit it)"
        )
    emb = sorted(ctx.adapters[s].embedding_modules)
    if emb:
        raise AdapterError(
            f"adapter {ctx.adapters[s].path}: sst projects linear layers only, but the safety adapter changes "
            f"embedding {emb[0]}; retrain it without embedding targets"
        )
    return s, utility


@MERGE_METHODS.register("sst")
class SSTMerge(MergeMethod):
    """SST-Merge: utility adapters plus the Fisher-GEVP projection of the safety adapter."""

    name = "sst"
    Params = SSTParams
    version = 2  # 2: true-Fisher samples seeded per prompt (independent of batch, order and ranks)
    description = "Σ wᵢτᵢ(utility) + α·P_k(τ_safety), P_k from the GEVP F_s v = λ(F_u+εI)v"

    def check(self, params: SSTParams, ctx: MergeContext) -> None:  # type: ignore[override]
        """Refuse bad roles, weights, targets or data before any model is loaded."""
        _roles(ctx)
        if params.alpha != 0 and not params.keeps_everything:
            _load_data(params)
            if ctx.load_model is None:
                raise ConfigError("sst needs the base model for the Fisher; give the merge a base model")

    def linear_coefficients(self, params: SSTParams, ctx: MergeContext) -> list[float] | None:  # type: ignore[override]
        if not (params.alpha == 0 or params.keeps_everything):
            return None
        s, _ = _roles(ctx)
        lam = params.lambda_
        return [lam * (params.alpha if i == s else w) for i, w in enumerate(ctx.weights)]

    def merge(self, params: SSTParams, ctx: MergeContext) -> dict[str, torch.Tensor]:  # type: ignore[override]
        s, utility = _roles(ctx)
        safety = ctx.adapters[s]
        lam = params.lambda_

        utility_dw: dict[str, torch.Tensor] = {}
        for i in utility:
            for m in ctx.adapters[i].modules:
                dw = ctx.weights[i] * ctx.adapters[i].delta(m)
                utility_dw[m] = utility_dw[m] + dw if m in utility_dw else dw
        tau_s = {m: safety.delta(m) for m in safety.modules}
        for m in tau_s:
            if m in utility_dw and utility_dw[m].shape != tau_s[m].shape:
                raise AdapterError(
                    f"module {m}: safety ΔW {tuple(tau_s[m].shape)} vs utility ΔW {tuple(utility_dw[m].shape)}"
                )

        diag: dict[str, Any] = {
            "method": "sst",
            "approximation": params.fisher,
            "alpha": params.alpha,
            "lambda": lam,
            "selection": {"k": params.k} if params.k == "all" else params.selection().describe(),
            "eps": params.eps,
            "seed": params.seed,
            "utility_fisher": params.utility_fisher,
            "fisher_definitions": {
                k: v for k, v in FISHER_DEFINITIONS.items() if k != f"F_u_{_other(params.utility_fisher)}"
            },
        }
        ctx.diagnostics["sst"] = diag

        all_identity = params.keeps_everything or (
            isinstance(params.k, int) and all(params.k >= t.numel() for t in tau_s.values())
        )
        if params.alpha == 0 or all_identity:
            why = "alpha = 0" if params.alpha == 0 else "every direction kept (projector = identity)"
            log.info("sst: %s; the Fisher is not needed and was not computed", why)
            diag["fisher"] = f"skipped ({why})"
            projected = {m: t.clone() for m, t in tau_s.items()}
        else:
            stats_s, stats_u, info = self._fisher(params, ctx, s, utility, utility_dw, list(tau_s))
            diag.update(info)
            projected = self._project(params, ctx, tau_s, stats_s, stats_u, diag)

        out: dict[str, torch.Tensor] = {}
        for m in ctx.modules:
            if m in tau_s:
                base = utility_dw.get(m, torch.zeros_like(tau_s[m]))
                out[m] = lam * (base + params.alpha * projected[m])
            elif m in utility_dw:
                out[m] = lam * utility_dw[m]
        return out

    # ---- Fisher statistics (cached) -----------------------------------------------------------------------------

    def _fisher(
        self,
        params: SSTParams,
        ctx: MergeContext,
        s: int,
        utility: list[int],
        utility_dw: dict[str, torch.Tensor],
        modules: list[str],
    ) -> tuple[dict, dict, dict[str, Any]]:
        # Everything that can be wrong with the input is checked here, before a model is loaded.
        empirical = params.utility_fisher == "empirical"
        s_items, u_items = _load_data(params)
        if ctx.load_model is None:
            raise ConfigError("sst needs the base model for the Fisher; give the merge a base model")

        model = tok = None
        if ctx.base_model:
            model_fp: Any = fcache.model_fingerprint(str(ctx.base_model))
        else:  # no name to key on: fingerprint the loaded model's weights and config
            model, tok = ctx.load_model()
            model_fp = {
                "config": model.config.to_json_string(),
                "weights": fcache.tensor_fingerprint({m: model.get_submodule(m).weight for m in modules}),
            }
        common = {
            "model": model_fp,
            "pre_merge": sorted((ctx.adapters[i].sha256, ctx.weights[i]) for i in utility),
            "modules": sorted(modules),
            "approximation": params.fisher,
            "max_length": params.max_length,
        }
        key_s = fcache.cache_key({**common, "role": "safety", "data": items_hash(s_items, True)})
        key_u = fcache.cache_key(
            {
                **common,
                "role": "utility",
                "data": items_hash(u_items, empirical),
                "utility_fisher": params.utility_fisher,
                "seed": params.seed,
                "max_new_tokens": None if empirical else params.max_new_tokens,
            }
        )
        directory = fcache.cache_dir(params.cache_dir, ctx.workdir)
        path_s = directory / f"fisher-{params.fisher}-{key_s[:32]}.safetensors"
        path_u = directory / f"fisher-{params.fisher}-{key_u[:32]}.safetensors"
        got_s = fcache.load_stats(path_s) if params.cache else None
        got_u = fcache.load_stats(path_u) if params.cache else None
        info: dict[str, Any] = {
            "fisher_cache": {"safety": "hit" if got_s else "computed", "utility": "hit" if got_u else "computed"}
        }

        if got_s is None or got_u is None:
            if model is None:
                model, tok = ctx.load_model()
            model.eval()
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            p_total = sum(math.prod(model.get_submodule(m).weight.shape) for m in modules)
            if params.fisher == "lowrank":
                gib = 4 * p_total * (len(s_items) + len(u_items)) / 2**30
                log.info(
                    "sst: lowrank keeps %d gradient rows of %d values: %.2f GiB",
                    len(s_items) + len(u_items),
                    p_total,
                    gib,
                )
            t0 = time.perf_counter()
            with applied_deltas(model, utility_dw):
                if got_s is None:
                    exs = [encode_example(tok, it["prompt"], it["response"], params.max_length) for it in s_items]
                    stats = estimate_fisher(
                        model, modules, exs, params.fisher, pad_id, params.batch_size, ctx.show_progress, "Fisher F_s"
                    )
                    got_s = (stats, {"n": str(len(exs))})
                    if params.cache and ddp.is_main():
                        fcache.save_stats(path_s, stats, {"n": str(len(exs)), "key": key_s})
                if got_u is None:
                    exs = self._utility_examples(params, model, tok, u_items, ctx.show_progress)
                    stats = estimate_fisher(
                        model, modules, exs, params.fisher, pad_id, params.batch_size, ctx.show_progress, "Fisher F_u"
                    )
                    got_u = (stats, {"n": str(len(exs))})
                    if params.cache and ddp.is_main():
                        fcache.save_stats(path_u, stats, {"n": str(len(exs)), "key": key_u})
            info["fisher_seconds"] = round(time.perf_counter() - t0, 3)
        stats_s, meta_s = got_s
        stats_u, meta_u = got_u
        missing = [m for m in modules if m not in stats_s or m not in stats_u]
        if missing:
            raise FisherError(f"Fisher statistics are missing module {missing[0]}; delete the cache in {directory}")
        info.update(
            {
                "n_safety": int(meta_s.get("n", len(s_items))),
                "n_utility": int(meta_u.get("n", len(u_items))),
                "safety_data": params.safety_data,
                "utility_data": params.utility_data,
                "cache_dir": str(directory),
            }
        )
        return stats_s, stats_u, info

    @staticmethod
    def _utility_examples(params: SSTParams, model: Any, tok: Any, items: list[dict], show_progress: bool) -> list:
        if params.utility_fisher == "empirical":
            return [encode_example(tok, it["prompt"], it["response"], params.max_length) for it in items]
        prompts = [encode_prompt(tok, it["prompt"]) for it in items]
        prompts = [p[max(0, len(p) - (params.max_length - 1)) :] for p in prompts]
        # under torch.distributed each rank samples its share of the prompts and every rank gets all responses;
        # each prompt's sample depends only on the seed and the prompt, not on the rank or the batch
        responses = ddp.gather_sharded(
            "sample (true Fisher)",
            prompts,
            lambda part: sample_responses(
                model, tok, part, params.max_new_tokens, params.seed, params.batch_size, show_progress
            ),
        )
        return [
            truncate(Example(tuple(p), tuple(r)), params.max_length) for p, r in zip(prompts, responses, strict=True)
        ]

    # ---- projection ---------------------------------------------------------------------------------------------

    @staticmethod
    def _project(
        params: SSTParams,
        ctx: MergeContext,
        tau_s: dict[str, torch.Tensor],
        stats_s: dict,
        stats_u: dict,
        diag: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        projected: dict[str, torch.Tensor] = {}
        per_module: dict[str, Any] = {}
        for m in tqdm(list(tau_s), desc=f"GEVP ({params.fisher})", disable=not ctx.show_progress, leave=False):
            tau = tau_s[m]
            try:
                res = project_module(
                    params.fisher, stats_s[m], stats_u[m], tau, params.eps, params.selection(tau.numel())
                )
            except ZeroUtilityFisherError as e:
                raise FisherError(f"module {m}: {e}; check utility_data, or use a larger n_samples") from e
            if not torch.isfinite(res.projected).all():
                raise FisherError(f"module {m}: the projected safety update is not finite; raise eps")
            projected[m] = res.projected
            norm, kept = float(tau.norm()), float(res.projected.norm())
            per_module[m] = {
                "n_directions": res.n_directions,
                "n_positive": res.n_positive,
                "n_kept": res.n_kept,
                "lambda_top": [float(v) for v in res.lam_desc[:SPECTRUM_TOP]],
                "lambda_sum": float(res.lam_desc.sum()),
                "damping": list(res.damping) if isinstance(res.damping, tuple) else res.damping,
                "safety_norm": norm,
                "kept_norm": kept,
                # an oblique projector can lengthen a vector, so the share may exceed 1
                "kept_norm_share": kept / norm if norm > 0 else None,
            }
        diag["modules"] = per_module
        total = math.sqrt(sum(v["safety_norm"] ** 2 for v in per_module.values()))
        kept = math.sqrt(sum(v["kept_norm"] ** 2 for v in per_module.values()))
        diag["kept_norm_share"] = kept / total if total > 0 else None
        log.info(
            "sst: kept %.3f of the safety update's norm over %d modules",
            diag["kept_norm_share"] or 0.0,
            len(per_module),
        )
        json.dumps(diag, allow_nan=False)  # diagnostics must be valid JSON: fail here, not when writing the output
        return projected


def _load_data(params: SSTParams) -> tuple[list[dict], list[dict]]:
    """Load and subsample the safety and utility items (seeded); raise on missing or malformed data."""
    if not params.safety_data:
        raise ConfigError("sst: params.safety_data is required (JSONL with prompt/response, or a named source)")
    if not params.utility_data:
        raise ConfigError("sst: params.utility_data is required (JSONL with prompt[/response], or a named source)")
    empirical = params.utility_fisher == "empirical"
    s_items = load_items(params.safety_data, need_response=True, what="safety_data")
    u_items = load_items(params.utility_data, need_response=empirical, what="utility_data")
    s_items = subsample(s_items, params.n_samples, params.seed, "safety_data")
    u_items = subsample(u_items, params.n_samples, params.seed + 1, "utility_data")
    return s_items, u_items


def _other(kind: str) -> str:
    return "empirical" if kind == "true" else "true"
