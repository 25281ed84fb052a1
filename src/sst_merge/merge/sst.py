"""SST-Merge: ``ΔW = Σ_utility wᵢ τᵢ + α · P_k(τ_safety)`` with a Fisher-GEVP projector (design §5).

``P_k`` keeps the directions with the highest safety gain per unit of utility damage: the top generalized
eigenvectors of ``F_s v = λ (F_u + β F_b + εI) v``, as the oblique projector ``V_k V_kᵀ B``. The Fishers are estimated
at the *pre-merge point* (base + the weighted utility ΔW) w.r.t. the full weight of every module the safety adapter
changes, and cached, so α / β / k / eps sweeps re-use them; what they are: :mod:`~sst_merge.merge.sst_objectives`,
what is reported: :mod:`~sst_merge.merge.sst_diagnostics`. ``subspace: utility_complement`` removes the top
directions of ``(F_u + β F_b) v = μ (F_s + εI) v`` instead; ``project: utility`` projects the utility update, at base
+ τ_safety. A failed Fisher step raises (never an unmerged model in its place). With ``alpha = 0``, or every
direction kept (``k: all``, ``fraction: 1``), the result is task arithmetic with safety weight α, without a Fisher.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator, model_validator
from tqdm.auto import tqdm

from sst_merge.errors import AdapterError, ConfigError
from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.grads import FisherError
from sst_merge.fisher.kfac import input_project
from sst_merge.fisher.objective import Objective
from sst_merge.fisher.pipeline import fisher_statistics
from sst_merge.fisher.solve import APPROXIMATIONS, ZeroUtilityFisherError, get_approximation, project_module
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod
from sst_merge.merge.sst_diagnostics import module_row, summarise, whole_range_message
from sst_merge.merge.sst_objectives import SSTObjectiveParams, sst_objectives
from sst_merge.merge.sst_roles import sst_roles
from sst_merge.tensors import all_finite

log = logging.getLogger(__name__)

SELECTIONS = ("k", "fraction", "threshold", "share")  #: the selection rules (exactly one is set)


class SSTParams(SSTObjectiveParams):
    """Parameters of ``sst`` (YAML ``params:``): the projection's here (exactly one of ``k``, ``fraction``,
    ``threshold``, ``share``); the data's in :class:`SSTObjectiveParams`, the Fisher pass's in ``estimation``."""

    alpha: float = Field(1.0, description="scale of the projected safety update")
    fisher: str = Field("lowrank", description="Fisher approximation: dense | diagonal | kfac | lowrank")
    k: int | Literal["all"] | None = Field(None, description="top-k directions per module ('all' = identity)")
    fraction: float | None = Field(None, gt=0, le=1, description="top share of each module's directions")
    threshold: float | None = Field(None, ge=0, description="keep directions with λ > threshold")
    share: float | None = Field(
        None, gt=0, le=1, description="top share of the directions the GEVP ranks (λ > 0; with lowrank ≤ n_samples)"
    )
    eps: float = Field(1e-3, gt=0, description="damping relative to the mean diagonal of F_u")
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

    @field_validator("fisher", "k")
    @classmethod
    def _known(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "fisher" and v not in APPROXIMATIONS:
            raise ValueError(f"unknown Fisher approximation {v!r}; choose one of {', '.join(APPROXIMATIONS.names())}")
        if info.field_name == "k" and isinstance(v, int) and v < 0:
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
            raise ValueError(
                "subspace utility_complement counts removed directions: k: all would remove all of "
                "τ_safety; give a number, a fraction or a threshold"
            )
        if self.space == "input":
            other = {
                "fisher": (self.fisher, "kfac"),
                "project": (self.project, "safety"),
                "subspace": (self.subspace, "safety"),
                "beta": (self.beta, 0.0),
                "benign_share": (self.benign_share, 0.0),
            }
            bad = [f"{k}={v}" for k, (v, want) in other.items() if v != want]
            if bad:
                raise ValueError(
                    "space: input projects with kfac's input Grams: it needs fisher=kfac, project=safety, "
                    f"subspace=safety, beta=0, benign_share=0 (got {', '.join(bad)})"
                )
        return self

    @property
    def keeps_everything(self) -> bool:
        """Whether the projector is the identity by definition (``k: all``, ``fraction: 1``; complement: ``k: 0``)."""
        if self.subspace == "utility_complement":
            return self.k == 0
        return self.k == "all" or self.fraction == 1.0

    def selection(self, p: int | None = None) -> Selection:
        if self.k == "all":
            return Selection(k=p if p is not None else 2**62)
        return Selection(k=self.k, fraction=self.fraction, threshold=self.threshold, share=self.share)  # type: ignore[arg-type]

    def keeps_whole_range(self, n_kept: int, n_positive: int, p: int) -> bool:
        """Whether a k / fraction selection kept every direction with λ > 0 short of the identity (selects nothing)."""
        if self.threshold is not None or self.share is not None or self.keeps_everything or n_kept >= p:
            return False
        want = self.k if isinstance(self.k, int) else math.ceil((self.fraction or 0) * p)
        return n_positive > 0 and want >= n_positive

    def describe(self) -> dict[str, Any]:
        """The settings recorded at the head of the diagnostics."""
        out: dict[str, Any] = {
            "method": "sst",
            "approximation": self.fisher,
            "alpha": self.alpha,
            "lambda": self.lambda_,
        }
        out["selection"] = {"k": self.k} if self.k == "all" else self.selection().describe()
        out |= {n: getattr(self, n) for n in ("eps", "seed", "utility_fisher", "benign_share", "beta", "subspace")}
        out |= {"project": self.project, "space": self.space, "fisher_definitions": self.definitions()}
        if self.uses_benign:
            out.update(benign_responses=self.benign_responses, benign_refusal_tokens=self.benign_refusal_tokens)
        return out


@MERGE_METHODS.register("sst")
class SSTMerge(MergeMethod[SSTParams]):
    """SST-Merge: utility adapters plus the Fisher-GEVP projection of the safety adapter."""

    name = "sst"
    Params = SSTParams
    sst_fisher_pass = True  # the planner's law (safety_span inherits it)
    # 2: true-Fisher samples seeded per prompt (independent of batch, order and ranks); 3: F_s ends at EOS; 4: the
    # input side projects with Ã_c X_k X_kᵀ (its first form, X_k X_kᵀ Ã_c, broke the model: never reuse those results)
    version = 4
    description = "Σ wᵢτᵢ(utility) + α·P_k(τ_safety), P_k from the GEVP F_s v = λ(F_u+εI)v"
    safety_weight_param = "alpha"  # the projected update's scale; the safety adapter's own weight stays 1
    #: the objectives of the last parameters seen, so :meth:`check` and :meth:`merge` load the data once
    _built: tuple[SSTParams, list[Objective]] | None = None

    def objectives(self, params: SSTParams, ctx: MergeContext) -> list[Objective]:
        """The Fisher objectives (data loaded and checked once for these parameters); refuse a missing model."""
        if self._built is None or self._built[0] != params:
            self._built = (params, sst_objectives(params))
        if ctx.load_model is None:
            raise ConfigError("sst needs the base model for the Fisher; give the merge a base model")
        return self._built[1]

    def check(self, params: SSTParams, ctx: MergeContext) -> None:
        """Refuse bad roles, weights, targets or data before any model is loaded."""
        sst_roles(ctx)
        if (params.alpha != 0 or params.project == "utility") and not params.keeps_everything:
            self.objectives(params, ctx)  # the Fisher is needed

    def linear_coefficients(self, params: SSTParams, ctx: MergeContext) -> list[float] | None:
        if not (params.keeps_everything or (params.alpha == 0 and params.project == "safety")):
            return None
        s, _ = sst_roles(ctx)
        return [params.lambda_ * (params.alpha if i == s else w) for i, w in enumerate(ctx.weights)]

    def merge(self, params: SSTParams, ctx: MergeContext) -> dict[str, torch.Tensor]:
        s, utility = sst_roles(ctx)
        safety, lam, alpha = ctx.adapters[s], params.lambda_, params.alpha
        utility_dw = ctx.weighted_sum(utility)
        tau_s = {m: safety.delta(m) for m in safety.modules}
        for m in tau_s:
            if m in utility_dw and utility_dw[m].shape != tau_s[m].shape:
                shapes = f"{tuple(tau_s[m].shape)} vs utility ΔW {tuple(utility_dw[m].shape)}"
                raise AdapterError(f"module {m}: safety ΔW {shapes}")
        diag = ctx.diagnostics["sst"] = params.describe()
        update = tau_s if params.project == "safety" else utility_dw
        dims = [t.shape[1] if params.space == "input" else t.numel() for t in update.values()]
        all_identity = params.keeps_everything or (
            params.subspace == "safety" and isinstance(params.k, int) and all(params.k >= p for p in dims)
        )
        if params.project == "utility" and not all_identity:
            # the safety adapter whole, the utility update projected: Fishers at base + τ_safety
            stats = self._fisher(params, ctx, tau_s, [(safety.sha256, 1.0)], sorted(set(utility_dw) | set(tau_s)))
            kept_u = self._project(params, ctx, utility_dw, stats, diag)
            merged: dict[str, torch.Tensor] = {}
            for m in ctx.modules:
                if m in tau_s or m in kept_u:
                    dw = alpha * tau_s[m] if m in tau_s else torch.zeros_like(kept_u[m])
                    merged[m] = lam * (dw + kept_u[m] if m in kept_u else dw)
            return merged
        if (alpha == 0 and params.project == "safety") or all_identity:
            why = "alpha = 0" if alpha == 0 and not all_identity else "every direction kept (projector = identity)"
            log.info("sst: %s; the Fisher is not needed and was not computed", why)
            diag["fisher"] = f"skipped ({why})"
            projected = {m: t.clone() for m, t in tau_s.items()}
        else:
            pre_key = sorted((ctx.adapters[i].sha256, ctx.weights[i]) for i in utility)
            stats = self._fisher(params, ctx, utility_dw, pre_key, list(tau_s))
            projected = self._project(params, ctx, tau_s, stats, diag)
        out: dict[str, torch.Tensor] = {}
        for m in ctx.modules:
            if m in tau_s:
                out[m] = lam * (utility_dw.get(m, torch.zeros_like(tau_s[m])) + alpha * projected[m])
            elif m in utility_dw:
                out[m] = lam * utility_dw[m]
        return out

    def _fisher(
        self, params: SSTParams, ctx: MergeContext, pre_merge: dict[str, torch.Tensor], pre_key: Any, modules: list[str]
    ) -> dict[str, dict]:
        """The cached Fisher statistics at ``base + pre_merge`` over ``modules``; their info goes to the diagnostics."""
        objectives = self.objectives(params, ctx)  # the data are checked before a model is loaded
        setup = params.fisher_setup(ctx, params.fisher, modules, pre_merge, pre_key)
        stats, info = fisher_statistics(objectives, setup)
        info.update(n_safety=info["n"]["safety"], n_utility=info["n"]["utility"])
        info.update(safety_data=params.safety_data, utility_data=params.utility_data)
        if params.uses_benign:
            info["benign_data"] = params.benign_data or "packaged benign training prompts"
        ctx.diagnostics["sst"].update(info)
        return stats

    @staticmethod
    def _project(
        params: SSTParams, ctx: MergeContext, tau_s: dict[str, torch.Tensor], stats: dict[str, dict], diag: dict
    ) -> dict[str, torch.Tensor]:
        """Project each module of ``tau_s`` (the update being projected): ``params.project`` names the objective
        that ranks a direction (safety or utility), the other one is its cost, plus ``β F_b`` when β > 0."""
        num, den = ("safety", "utility") if params.project == "safety" else ("utility", "safety")
        complement, eps = params.subspace == "utility_complement", params.eps
        projected: dict[str, torch.Tensor] = {}
        per_module: dict[str, Any] = {}
        whole_range: list[str] = []
        for m in tqdm(list(tau_s), desc=f"GEVP ({params.fisher})", disable=not ctx.show_progress, leave=False):
            tau, penalties = tau_s[m], [(params.beta, stats["benign_refusal"][m])] if params.beta > 0 else None
            try:
                if params.space == "input":
                    contrast = (stats["utility"][m]["A"].double() + stats["benign_inputs"][m]["A"].double()) / 2
                    res = input_project(tau, stats["safety"][m]["A"], contrast, eps, params.selection(tau.shape[1]))
                else:
                    sel = params.selection(tau.numel())
                    res = project_module(
                        params.fisher, stats[num][m], stats[den][m], tau, eps, sel, penalties, params.subspace
                    )
            except ZeroUtilityFisherError as e:
                raise FisherError(f"module {m}: {e}; check utility_data, or use a larger n_samples") from e
            if not all_finite(res.projected):
                raise FisherError(f"module {m}: the projected safety update is not finite; raise eps")
            if not complement and params.keeps_whole_range(res.n_kept, res.n_positive, res.n_directions):
                whole_range.append(m)
            projected[m] = res.projected
            per_module[m] = module_row(res, tau, complement)
        summarise(diag, per_module, complement, len(whole_range), params.fisher, stats, params.project)
        if whole_range:
            msg = whole_range_message(params.selection().describe(), whole_range, per_module)
            if params.full_range == "error":
                raise ConfigError(msg)
            log.warning(msg)
        json.dumps(diag, allow_nan=False)  # diagnostics must be valid JSON: fail here, not when writing the output
        return projected
