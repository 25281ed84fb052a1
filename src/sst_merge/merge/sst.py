"""SST-Merge: ``ΔW = Σ_utility wᵢ τᵢ + α · P_k(τ_safety)`` with a Fisher-GEVP projector (design §5).

``P_k`` keeps the directions with the highest safety gain per unit of utility damage: the top generalized
eigenvectors of ``F_s v = λ (F_u + β F_b + εI) v``, as the oblique projector ``V_k V_kᵀ B``. The Fishers are
estimated at the *pre-merge point* — the base model plus the weighted utility ΔW — in eval mode, with respect to the
full weight ``W`` of every module the safety adapter changes (the space the projection acts on), by one call of
:func:`sst_merge.fisher.pipeline.fisher_statistics` over objectives given as data (:mod:`sst_merge.fisher.objective`):

* ``F_s``: per-example gradients of ``log p(refusal | harmful prompt)`` on ``safety_data``; response tokens only.
  With ``benign_share > 0`` that share of the ``n_samples`` examples are benign prompts → a compliant answer (the
  pre-merge model's greedy answer, or ``benign_data``'s given responses): the *contrastive* ``F_s`` of the safety
  adapter's own objective (refuse harmful requests, keep answering benign ones).
* ``F_u``: per-example gradients of ``log p(y | x)`` on ``utility_data``; ``y`` sampled from the pre-merge model with
  a seeded generator (``utility_fisher: true``, the default: the true Fisher) or the dataset's responses
  (``empirical``).
* ``F_b`` (``beta > 0``): the Fisher of a refusal's first ``benign_refusal_tokens`` tokens on benign prompts (where a
  refusal is decided), so directions that make benign prompts refuse cost utility.

``subspace: utility_complement`` asks the opposite question of the same Fishers: it removes from ``τ_safety`` the
top directions of ``(F_u + β F_b) v = μ (F_s + εI) v`` — the most utility (and benign-refusal) cost per unit of
safety — and keeps the rest, ``τ − V_k V_kᵀ (F_s + εI) τ``. With lowrank and a selection that covers the whole
range of ``F_u + βF_b`` (the default ``fraction``), the result is the update closest to ``τ_safety`` in the
``F_s + εI`` norm whose first-order effect on every utility (and benign-refusal) Fisher example is zero.

Approximations come from a registry (``dense``, ``diagonal``, ``kfac``, ``lowrank``; see :mod:`sst_merge.fisher`).
Statistics are cached on disk per objective, so sweeping α, β, k, fraction, threshold or eps re-uses them.
``lambda`` (from the shared parameters) scales the whole result, like task arithmetic's λ; the safety adapter's own
``weight`` must stay 1 (its scale is ``alpha``). With lowrank, ``F_s`` has rank ≤ its number of examples per module,
so a ``k`` / ``fraction`` at or above that keeps every ranked direction: the diagnostics report the ranked and kept
directions, and the method warns (``full_range: error`` refuses).

A failure in the Fisher step raises; the method never returns an unmerged or utility-only model in its place.
With ``alpha = 0`` the result is exactly the utility part, and when every direction is kept (``k: all`` or
``fraction: 1.0``) it is exactly task arithmetic with the safety weight α; neither needs the Fisher, so it is skipped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from sst_merge.errors import AdapterError, ConfigError
from sst_merge.fisher import cache as fcache
from sst_merge.fisher.data import load_items, subsample
from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.grads import FisherError
from sst_merge.fisher.kfac import input_project
from sst_merge.fisher.objective import Objective, Part
from sst_merge.fisher.pipeline import FisherSetup, fisher_statistics
from sst_merge.fisher.solve import APPROXIMATIONS, ZeroUtilityFisherError, get_approximation, project_module
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams
from sst_merge.tensors import all_finite

log = logging.getLogger(__name__)

#: How many of the largest λ per module go into the diagnostics (a kfac/diagonal spectrum has p = out·in values).
SPECTRUM_TOP = 256

FISHER_DEFINITIONS = {
    "F_s": "E over safety items of g gᵀ, g = ∇_W log p(response | prompt) summed over response tokens only (prompt "
    "and padding masked), chat template applied, eval mode, at base + utility ΔW; items: harmful prompt → refusal, "
    "plus (benign_share > 0) benign prompt → a compliant answer (contrastive: the safety adapter's own objective)",
    "F_u_true": "as F_s on utility prompts, with responses sampled from the pre-merge model (temperature 1, seeded)",
    "F_u_empirical": "as F_s on utility items with the dataset's responses",
    "F_b": "as F_s on benign prompts → a refusal, loss on the first benign_refusal_tokens response tokens only",
    "B": "F_u + β F_b + εI, ε = eps · mean diag(F_u) (kfac: per-factor damping √eps · mean diag of each factor)",
    "projector": "P_k = V_k V_kᵀ B over the top generalized eigenvectors of F_s v = λ B v (oblique, idempotent); "
    "subspace utility_complement: I − V_k V_kᵀ (F_s + εI) over the top eigenvectors of (F_u + βF_b) v = μ (F_s + εI) v",
}
#: space: input — module-input Grams (kfac's A factor: Σ a aᵀ / tokens over prompt and response tokens)
INPUT_DEFINITIONS = {
    "A_harmful": "Gram of each module's inputs at base + utility ΔW over harmful prompts and a refusal's first token",
    "A_contrast": "½ (A of the benign prompts with the pre-merge model's greedy answers + A of the utility items)",
    "projector": "τ (A_contrast + εI) X_k X_kᵀ over the top eigenvectors of A_harmful x = μ (A_contrast + εI) x "
    "(ε = eps · mean diag A_contrast): τ kept on harmful-specific input directions, zero on the others",
}

#: The selection rules (exactly one is set).
SELECTIONS = ("k", "fraction", "threshold", "share")

#: The packaged benign training prompts (written for the project, disjoint from every evaluation prompt).
BENIGN_TRAIN_DATA = str(Path(__file__).resolve().parent.parent / "resources" / "benign_train_prompts.jsonl")


class SSTParams(MethodParams):
    """Parameters of ``sst`` (YAML ``params:``). Exactly one of ``k``, ``fraction``, ``threshold``, ``share``."""

    alpha: float = Field(1.0, description="scale of the projected safety update")
    fisher: str = Field("lowrank", description="Fisher approximation: dense | diagonal | kfac | lowrank")
    k: int | Literal["all"] | None = Field(None, description="top-k directions per module ('all' = identity)")
    fraction: float | None = Field(None, gt=0, le=1, description="top share of each module's directions")
    threshold: float | None = Field(None, ge=0, description="keep directions with λ > threshold")
    share: float | None = Field(
        None, gt=0, le=1, description="top share of the directions the GEVP ranks (λ > 0; with lowrank ≤ n_samples)"
    )
    space: Literal["gradient", "input"] = Field(
        "gradient",
        description="gradient: the GEVP of per-example-gradient Fishers (F_s vs F_u); input: the GEVP of module-input "
        "Grams (harmful prompts vs benign prompts and task items, kfac's A factors), applied on τ's input side",
    )
    eps: float = Field(1e-3, gt=0, description="damping relative to the mean diagonal of F_u")
    n_samples: int = Field(64, ge=1, description="examples per Fisher (F_s and F_u each)")
    safety_data: str | None = Field(None, description="JSONL (prompt, response=refusal) or a named source")
    utility_data: str | None = Field(None, description="JSONL (prompt[, response]) or a named source")
    utility_fisher: Literal["true", "empirical"] = Field("true", description="sampled (true) or dataset responses")
    benign_share: float = Field(
        0.0, ge=0, lt=1, description="share of F_s's n_samples that are benign prompt → compliant answer (0: none)"
    )
    benign_data: str | None = Field(
        None, description="benign prompts for F_s and F_b (default: the packaged benign training prompts)"
    )
    benign_responses: Literal["greedy", "given"] = Field(
        "greedy", description="F_s's compliant answers: the pre-merge model's greedy answer or benign_data's response"
    )
    beta: float = Field(0.0, ge=0, description="weight of the benign-refusal Fisher F_b in B = F_u + β F_b + εI")
    benign_refusal_tokens: int = Field(4, ge=1, description="response tokens of a refusal that carry F_b's loss")
    subspace: Literal["safety", "utility_complement"] = Field(
        "safety",
        description="safety: keep the top directions of F_s v = λ(F_u + βF_b + εI)v; utility_complement: remove the "
        "top directions of (F_u + βF_b) v = μ(F_s + εI)v and keep the rest of τ_safety (k / fraction / threshold "
        "then count removed directions)",
    )
    project: Literal["safety", "utility"] = Field(
        "safety",
        description="which update the GEVP projects: safety (α·P τ_safety added to the utility adapters, Fishers at "
        "base + utility ΔW) or utility (P Σ wᵢτᵢ added to α·τ_safety, Fishers at base + τ_safety; the utility "
        "objective ranks directions, the safety objective (+ βF_b) is their cost)",
    )
    full_range: Literal["warn", "error"] = Field(
        "warn", description="a k / fraction that keeps every direction F_s ranks: warn, or refuse (error)"
    )
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

    @field_validator("fisher")
    @classmethod
    def _known_fisher(cls, v: str) -> str:
        if v not in APPROXIMATIONS:
            raise ValueError(f"unknown Fisher approximation {v!r}; choose one of {', '.join(APPROXIMATIONS.names())}")
        return v

    @field_validator("k")
    @classmethod
    def _k_positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 0:
            raise ValueError("k must be >= 0 or 'all'")
        return v

    @model_validator(mode="after")
    def _one_selection(self) -> SSTParams:
        given = [n for n in SELECTIONS if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of k, fraction, threshold, share" + (f" (got {', '.join(given)})" if given else "")
            )
        if not math.isfinite(self.alpha):
            raise ValueError("alpha must be finite")
        if self.beta > 0 and not get_approximation(self.fisher).supports_penalty:
            raise ValueError(
                f"beta > 0 needs a Fisher that can add F_b to F_u; fisher {self.fisher} cannot (use lowrank)"
            )
        if self.subspace == "utility_complement" and self.k == "all":
            raise ValueError("subspace utility_complement counts removed directions: k: all would remove all of "
                             "τ_safety; give a number, a fraction or a threshold")  # fmt: skip
        if self.space == "input":
            other = {"fisher": (self.fisher, "kfac"), "project": (self.project, "safety"),
                     "subspace": (self.subspace, "safety"), "beta": (self.beta, 0.0),
                     "benign_share": (self.benign_share, 0.0)}  # fmt: skip
            bad = [f"{k}={v}" for k, (v, want) in other.items() if v != want]
            if bad:
                raise ValueError("space: input projects with kfac's input Grams: it needs fisher=kfac, project=safety, "
                                 f"subspace=safety, beta=0, benign_share=0 (got {', '.join(bad)})")  # fmt: skip
        return self

    @property
    def n_benign_safety(self) -> int:
        """Benign examples in F_s (the rest of n_samples are harmful → refusal)."""
        return round(self.benign_share * self.n_samples)

    @property
    def keeps_everything(self) -> bool:
        """Whether the projector is the identity by definition.

        ``k: all`` or ``fraction: 1`` keep every direction; with ``subspace: utility_complement``, ``k: 0`` removes
        none.
        """
        if self.subspace == "utility_complement":
            return self.k == 0
        return self.k == "all" or self.fraction == 1.0

    def selection(self, p: int | None = None) -> Selection:
        if self.k == "all":
            return Selection(k=p if p is not None else 2**62)
        return Selection(k=self.k, fraction=self.fraction, threshold=self.threshold, share=self.share)  # type: ignore[arg-type]


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
class SSTMerge(MergeMethod[SSTParams]):
    """SST-Merge: utility adapters plus the Fisher-GEVP projection of the safety adapter."""

    name = "sst"
    Params = SSTParams
    # 2: true-Fisher samples seeded per prompt (independent of batch, order and ranks); 3: F_s ends at EOS; 4: the
    # input side projects with Ã_c X_k X_kᵀ (its first form, X_k X_kᵀ Ã_c, broke the model: never reuse those results)
    version = 4
    description = "Σ wᵢτᵢ(utility) + α·P_k(τ_safety), P_k from the GEVP F_s v = λ(F_u+εI)v"

    def check(self, params: SSTParams, ctx: MergeContext) -> None:
        """Refuse bad roles, weights, targets or data before any model is loaded."""
        _roles(ctx)
        if (params.alpha != 0 or params.project == "utility") and not params.keeps_everything:
            _objectives(params)
            if ctx.load_model is None:
                raise ConfigError("sst needs the base model for the Fisher; give the merge a base model")

    def linear_coefficients(self, params: SSTParams, ctx: MergeContext) -> list[float] | None:
        if not (params.keeps_everything or (params.alpha == 0 and params.project == "safety")):
            return None
        s, _ = _roles(ctx)
        lam = params.lambda_
        return [lam * (params.alpha if i == s else w) for i, w in enumerate(ctx.weights)]

    def merge(self, params: SSTParams, ctx: MergeContext) -> dict[str, torch.Tensor]:
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
            "benign_share": params.benign_share,
            "beta": params.beta,
            "subspace": params.subspace,
            "project": params.project,
            "space": params.space,
            "fisher_definitions": dict(INPUT_DEFINITIONS)
            if params.space == "input"
            else {
                k: v
                for k, v in FISHER_DEFINITIONS.items()
                if k != f"F_u_{_other(params.utility_fisher)}" and (k != "F_b" or params.beta > 0)
            },
        }
        if params.benign_share > 0 or params.beta > 0:
            diag["benign_responses"] = params.benign_responses
            diag["benign_refusal_tokens"] = params.benign_refusal_tokens
        ctx.diagnostics["sst"] = diag

        all_identity = params.keeps_everything or (
            params.subspace == "safety"
            and isinstance(params.k, int)
            and all(
                params.k >= (t.shape[1] if params.space == "input" else t.numel())
                for t in (tau_s if params.project == "safety" else utility_dw).values()
            )
        )
        if params.project == "utility" and not all_identity:
            # the safety adapter whole, the utility update projected: Fishers at base + τ_safety
            stats, info = self._fisher(params, ctx, tau_s, [(safety.sha256, 1.0)], sorted(set(utility_dw) | set(tau_s)))
            diag.update(info)
            kept_u = self._project(params, ctx, utility_dw, stats, diag)
            merged: dict[str, torch.Tensor] = {}
            for m in ctx.modules:
                if m in tau_s or m in kept_u:
                    dw = params.alpha * tau_s[m] if m in tau_s else torch.zeros_like(kept_u[m])
                    merged[m] = lam * (dw + kept_u[m] if m in kept_u else dw)
            return merged
        if (params.alpha == 0 and params.project == "safety") or all_identity:
            why = (
                "alpha = 0" if params.alpha == 0 and not all_identity else "every direction kept (projector = identity)"
            )
            log.info("sst: %s; the Fisher is not needed and was not computed", why)
            diag["fisher"] = f"skipped ({why})"
            projected = {m: t.clone() for m, t in tau_s.items()}
        else:
            pre_key = sorted((ctx.adapters[i].sha256, ctx.weights[i]) for i in utility)
            stats, info = self._fisher(params, ctx, utility_dw, pre_key, list(tau_s))
            diag.update(info)
            projected = self._project(params, ctx, tau_s, stats, diag)

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
        pre_merge: dict[str, torch.Tensor],
        pre_merge_key: Any,
        modules: list[str],
    ) -> tuple[dict[str, dict], dict[str, Any]]:
        # Everything that can be wrong with the input is checked here, before a model is loaded.
        objectives = _objectives(params)
        if ctx.load_model is None:
            raise ConfigError("sst needs the base model for the Fisher; give the merge a base model")
        setup = FisherSetup(
            approximation=params.fisher,
            modules=modules,
            load_model=ctx.load_model,
            model_name=str(ctx.base_model) if ctx.base_model else None,
            pre_merge=pre_merge,
            pre_merge_key=pre_merge_key,
            max_length=params.max_length,
            batch_size=params.batch_size,
            max_new_tokens=params.max_new_tokens,
            seed=params.seed,
            cache=params.cache,
            cache_dir=fcache.cache_dir(params.cache_dir, ctx.workdir),
            show_progress=ctx.show_progress,
        )
        stats, info = fisher_statistics(objectives, setup)
        info["n_safety"] = info["n"]["safety"]
        info["n_utility"] = info["n"]["utility"]
        info["safety_data"] = params.safety_data
        info["utility_data"] = params.utility_data
        if params.benign_share > 0 or params.beta > 0:
            info["benign_data"] = params.benign_data or "packaged benign training prompts"
        return stats, info

    # ---- projection ---------------------------------------------------------------------------------------------

    @staticmethod
    def _project(
        params: SSTParams,
        ctx: MergeContext,
        tau_s: dict[str, torch.Tensor],
        stats: dict[str, dict],
        diag: dict[str, Any],
    ) -> dict[str, torch.Tensor]:
        """Project each module of ``tau_s`` (the update being projected): ``params.project`` names the objective
        that ranks a direction (safety or utility), the other one is its cost, plus ``β F_b`` when β > 0."""
        num, den = ("safety", "utility") if params.project == "safety" else ("utility", "safety")
        projected: dict[str, torch.Tensor] = {}
        per_module: dict[str, Any] = {}
        whole_range: list[str] = []
        for m in tqdm(list(tau_s), desc=f"GEVP ({params.fisher})", disable=not ctx.show_progress, leave=False):
            tau = tau_s[m]
            penalties = [(params.beta, stats["benign_refusal"][m])] if params.beta > 0 else None
            try:
                if params.space == "input":
                    contrast = (stats["utility"][m]["A"].double() + stats["benign_inputs"][m]["A"].double()) / 2
                    res = input_project(
                        tau, stats["safety"][m]["A"], contrast, params.eps, params.selection(tau.shape[1])
                    )
                else:
                    res = project_module(
                        params.fisher,
                        stats[num][m],
                        stats[den][m],
                        tau,
                        params.eps,
                        params.selection(tau.numel()),
                        penalties,
                        params.subspace,
                    )
            except ZeroUtilityFisherError as e:
                raise FisherError(f"module {m}: {e}; check utility_data, or use a larger n_samples") from e
            if not all_finite(res.projected):
                raise FisherError(f"module {m}: the projected safety update is not finite; raise eps")
            if params.subspace == "safety" and _keeps_whole_range(params, res.n_kept, res.n_positive, res.n_directions):
                whole_range.append(m)
            projected[m] = res.projected
            norm, kept = float(tau.norm()), float(res.projected.norm())
            complement = params.subspace == "utility_complement"
            per_module[m] = {
                "n_directions": res.n_directions,
                # safety: rank of F_s (λ > 0); utility_complement: rank of F_u + βF_b (μ > 0)
                "n_positive": res.n_positive,
                "n_kept": res.n_directions - res.n_kept if complement else res.n_kept,
                **({"n_removed": res.n_kept} if complement else {}),
                "lambda_top": [float(v) for v in res.lam_desc[:SPECTRUM_TOP]],
                "lambda_sum": float(res.lam_desc.sum()),
                "damping": list(res.damping) if isinstance(res.damping, tuple) else res.damping,
                "safety_norm": norm,
                "kept_norm": kept,
                # an oblique projector can lengthen a vector, so the share may exceed 1
                "kept_norm_share": kept / norm if norm > 0 else None,
            }
        diag["modules"] = per_module
        n_mod = max(len(per_module), 1)
        # how many directions the GEVP really ranked (the rank of F_s: λ > 0) and how many the selection kept
        diag["directions_ranked_mean"] = sum(v["n_positive"] for v in per_module.values()) / n_mod
        diag["directions_kept_mean"] = sum(v["n_kept"] for v in per_module.values()) / n_mod
        if params.subspace == "utility_complement":
            diag["directions_removed_mean"] = sum(v["n_removed"] for v in per_module.values()) / n_mod
        diag["modules_keeping_whole_range"] = len(whole_range)
        kind = get_approximation(params.fisher)
        # scale of each Fisher relative to F_u (sum of traces over modules): β in units of tr F_u / tr F_b
        tr_u = sum(kind.trace(stats["utility"][m]) for m in tau_s)
        diag["trace_relative_to_F_u"] = {
            name: sum(kind.trace(stats[name][m]) for m in tau_s) / tr_u if tr_u > 0 else None
            for name in stats
            if name != "utility"
        }
        total = math.sqrt(sum(v["safety_norm"] ** 2 for v in per_module.values()))
        kept = math.sqrt(sum(v["kept_norm"] ** 2 for v in per_module.values()))
        diag["kept_norm_share"] = kept / total if total > 0 else None
        log.info(
            "sst: kept %.3f of the %s update's norm over %d modules; directions ranked %.1f, kept %.1f (mean per "
            "module)",
            diag["kept_norm_share"] or 0.0,
            params.project,
            len(per_module),
            diag["directions_ranked_mean"],
            diag["directions_kept_mean"],
        )
        if whole_range:
            sel = params.selection().describe()
            msg = (
                f"sst: {next(iter(sel))}={next(iter(sel.values()))} keeps every direction F_s ranks on "
                f"{len(whole_range)} of {len(per_module)} modules (e.g. {whole_range[0]}: rank "
                f"{per_module[whole_range[0]]['n_positive']}), so the GEVP selects nothing there; set k below the "
                f"rank, or a threshold on λ"
            )
            if params.full_range == "error":
                raise ConfigError(msg)
            log.warning(msg)
        json.dumps(diag, allow_nan=False)  # diagnostics must be valid JSON: fail here, not when writing the output
        return projected

    def apply_safety_weight(
        self, params: dict[str, Any], weights: list[float], roles: list[str], alpha: float
    ) -> tuple[dict[str, Any], list[float]]:
        """The safety weight is α, the projected update's scale; the safety adapter's own weight stays 1."""
        return {**params, "alpha": alpha}, [1.0 if r == "safety" else w for w, r in zip(weights, roles, strict=True)]

    def configured_safety_weight(self, params: dict[str, Any]) -> float:
        """The configured α (its default where the parameters do not set it)."""
        return float(params.get("alpha", self.Params.model_fields["alpha"].default))


def _keeps_whole_range(params: SSTParams, n_kept: int, n_positive: int, p: int) -> bool:
    """Whether a k / fraction selection kept every direction with λ > 0 short of the identity (selects nothing)."""
    if params.threshold is not None or params.share is not None or params.keeps_everything or n_kept >= p:
        return False
    want = params.k if isinstance(params.k, int) else math.ceil((params.fraction or 0) * p)
    return n_positive > 0 and want >= n_positive


def _objectives(params: SSTParams) -> list[Objective]:
    """The Fisher objectives of SST from the parameters (data loaded, checked and subsampled, seeded)."""
    s_items, u_items = _load_data(params)
    n_benign = params.n_benign_safety
    benign: list[dict] = []
    if n_benign > 0 or params.beta > 0:
        need = params.benign_responses == "given" and n_benign > 0
        benign = load_items(params.benign_data or BENIGN_TRAIN_DATA, need_response=need, what="benign_data")
        benign = subsample(benign, max(n_benign, params.n_samples if params.beta > 0 else 0), params.seed + 2,
                           "benign_data")  # fmt: skip
    harmful = subsample(s_items, params.n_samples - n_benign, params.seed, "safety_data")
    if params.space == "input":
        return _input_objectives(params, harmful, u_items)
    safety_parts = [Part(tuple(harmful), "given", label="harmful→refusal")]
    if n_benign > 0:
        safety_parts.append(Part(tuple(benign[:n_benign]), params.benign_responses, label="benign→answer"))
    objectives = [
        Objective("safety", tuple(safety_parts), FISHER_DEFINITIONS["F_s"]),
        Objective(
            "utility",
            (Part(tuple(u_items), "given" if params.utility_fisher == "empirical" else "sampled", label="utility"),),
            FISHER_DEFINITIONS[f"F_u_{params.utility_fisher}"],
        ),
    ]
    if params.beta > 0:
        objectives.append(
            Objective(
                "benign_refusal",
                (
                    Part(
                        tuple(_with_refusals(benign, params.seed)),
                        "given",
                        params.benign_refusal_tokens,
                        label="benign→refusal",
                    ),
                ),  # fmt: skip
                FISHER_DEFINITIONS["F_b"],
            )
        )
    return objectives


def _input_objectives(params: SSTParams, harmful: list[dict], u_items: list[dict]) -> list[Objective]:
    """``space: input``: the module-input Grams of harmful prompts (with a refusal's first token: where the refusal is
    decided), of benign prompts with the pre-merge model's greedy answers, and of the utility items (as ``F_u``)."""
    benign = load_items(params.benign_data or BENIGN_TRAIN_DATA, need_response=False, what="benign_data")
    benign = subsample(benign, params.n_samples, params.seed + 2, "benign_data")
    u_source = "given" if params.utility_fisher == "empirical" else "sampled"
    return [
        Objective("safety", (Part(tuple(harmful), "given", 1, label="harmful→refusal[:1]"),), INPUT_DEFINITIONS["A_harmful"]),
        Objective("utility", (Part(tuple(u_items), u_source, label="utility"),), FISHER_DEFINITIONS[f"F_u_{params.utility_fisher}"]),
        Objective("benign_inputs", (Part(tuple(benign), "greedy", label="benign→answer"),), INPUT_DEFINITIONS["A_contrast"]),
    ]  # fmt: skip


def _with_refusals(items: list[dict], seed: int) -> list[dict]:
    """Pair each benign prompt with one of the project's refusal templates (chosen by the prompt and the seed)."""
    from sst_merge.tasks.safety import refusal_for

    return [{"prompt": it["prompt"], "response": refusal_for(it["prompt"], seed)} for it in items]


def _load_data(params: SSTParams) -> tuple[list[dict], list[dict]]:
    """Load the safety items and the subsampled utility items (seeded); raise on missing or malformed data."""
    if not params.safety_data:
        raise ConfigError("sst: params.safety_data is required (JSONL with prompt/response, or a named source)")
    if not params.utility_data:
        raise ConfigError("sst: params.utility_data is required (JSONL with prompt[/response], or a named source)")
    empirical = params.utility_fisher == "empirical"
    s_items = load_items(params.safety_data, need_response=True, what="safety_data")
    u_items = load_items(params.utility_data, need_response=empirical, what="utility_data")
    u_items = subsample(u_items, params.n_samples, params.seed + 1, "utility_data")
    return s_items, u_items


def _other(kind: str) -> str:
    return "empirical" if kind == "true" else "true"


class SafetySpanParams(SSTParams):
    """Parameters of ``safety_span``: ``sst``'s, with the whole ranked range kept (``share: 1``, no other selection)."""

    share: float | None = Field(1.0, description="fixed at 1: every direction F_s ranks is kept")

    @model_validator(mode="before")
    @classmethod
    def _whole_range(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [k for k in ("k", "fraction", "threshold") if data.get(k) is not None]
            if given or data.get("share", 1.0) != 1.0:
                raise ValueError(
                    f"safety_span keeps the whole range of F_s, so it takes no {(given or ['share'])[0]}; use method "
                    "sst for a k / fraction / threshold / share selection"
                )
        return data


@MERGE_METHODS.register("safety_span")
class SafetySpan(SSTMerge):
    """The oblique projection of the safety update onto the span of the safety gradients (``sst`` with ``share: 1``).

    With ``lowrank``, ``F_s`` has rank ≤ N_s, and ``P τ`` is the smallest-``B``-norm update with ``τ_safety``'s
    first-order effect on each of the N_s safety Fisher examples (design §5): no eigen-direction is ranked against
    another. Until the ``share`` rule, every default ``sst`` run with lowrank was this method.
    """

    name = "safety_span"
    Params = SafetySpanParams
    description = "Σ wᵢτᵢ(utility) + α·P(τ_safety), P the oblique projector onto the safety gradients' span"
