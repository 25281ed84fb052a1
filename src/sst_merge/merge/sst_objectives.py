"""What SST-Merge estimates: its Fisher objectives, built from its data parameters (design §5).

* ``F_s``: per-example gradients of ``log p(refusal | harmful prompt)`` on ``safety_data``; response tokens only.
  With ``benign_share > 0`` that share of the ``n_samples`` examples are benign prompts → a compliant answer (the
  pre-merge model's greedy answer, or ``benign_data``'s given responses): the *contrastive* ``F_s`` of the safety
  adapter's own objective (refuse harmful requests, keep answering benign ones).
* ``F_u``: per-example gradients of ``log p(y | x)`` on ``utility_data``; ``y`` sampled from the pre-merge model with
  a seeded generator (``utility_fisher: true``, the default: the true Fisher) or the dataset's responses
  (``empirical``).
* ``F_b`` (``beta > 0``): the Fisher of a refusal's first ``benign_refusal_tokens`` tokens on benign prompts (where a
  refusal is decided), so directions that make benign prompts refuse cost utility.
* ``space: input``: module-input Grams instead (kfac's ``A`` factor) of harmful prompts, benign prompts and the
  utility items.

:func:`sst_objectives` loads, checks and subsamples the data (seeded) and returns the objectives as data
(:mod:`sst_merge.fisher.objective`); the estimation itself is :func:`sst_merge.fisher.pipeline.fisher_statistics`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from sst_merge.errors import ConfigError
from sst_merge.fisher.data import load_items, subsample
from sst_merge.fisher.objective import Objective, Part
from sst_merge.merge.fisher_params import FisherMethodParams
from sst_merge.tasks.safety import refusal_for

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

#: The packaged benign training prompts (written for the project, disjoint from every evaluation prompt).
BENIGN_TRAIN_DATA = str(Path(__file__).resolve().parent.parent / "resources" / "benign_train_prompts.jsonl")


class SSTObjectiveParams(FisherMethodParams):
    """The parameters that decide which statistics SST estimates, on which data (YAML ``params:``, flat)."""

    space: Literal["gradient", "input"] = Field(
        "gradient",
        description="gradient: the GEVP of per-example-gradient Fishers (F_s vs F_u); input: the GEVP of module-input "
        "Grams (harmful prompts vs benign prompts and task items, kfac's A factors), applied on τ's input side",
    )
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

    @field_validator("utility_fisher", mode="before")
    @classmethod
    def _yaml_bool(cls, v: Any) -> Any:
        # YAML reads `utility_fisher: true` as a boolean.
        return {True: "true", False: "empirical"}.get(v, v) if isinstance(v, bool) else v

    @property
    def n_benign_safety(self) -> int:
        """Benign examples in F_s (the rest of n_samples are harmful → refusal)."""
        return round(self.benign_share * self.estimation.n_samples)

    @property
    def uses_benign(self) -> bool:
        """Whether benign prompts enter a statistic (contrastive F_s, or F_b)."""
        return self.benign_share > 0 or self.beta > 0

    def definitions(self) -> dict[str, str]:
        """The definitions of the statistics these parameters estimate (recorded in the diagnostics)."""
        if self.space == "input":
            return dict(INPUT_DEFINITIONS)
        other = "F_u_empirical" if self.utility_fisher == "true" else "F_u_true"
        return {k: v for k, v in FISHER_DEFINITIONS.items() if k != other and (k != "F_b" or self.beta > 0)}


def sst_objectives(params: SSTObjectiveParams) -> list[Objective]:
    """The Fisher objectives of SST (data loaded, checked and subsampled, seeded); raise on missing or bad data."""
    n, seed = params.estimation.n_samples, params.seed
    s_items, u_items = _load_data(params)
    n_benign = params.n_benign_safety
    benign: list[dict] = []
    if params.space == "input" or n_benign > 0 or params.beta > 0:
        need = params.benign_responses == "given" and n_benign > 0
        benign = load_items(params.benign_data or BENIGN_TRAIN_DATA, need_response=need, what="benign_data")
        want = n if params.space == "input" or params.beta > 0 else 0
        benign = subsample(benign, max(n_benign, want), seed + 2, "benign_data")
    harmful = subsample(s_items, n - n_benign, seed, "safety_data")
    u_source = "given" if params.utility_fisher == "empirical" else "sampled"
    utility = Objective(
        "utility",
        (Part(tuple(u_items), u_source, label="utility"),),
        FISHER_DEFINITIONS[f"F_u_{params.utility_fisher}"],
    )
    if params.space == "input":  # where a refusal is decided: the harmful prompts with a refusal's first token
        return [
            Objective(
                "safety",
                (Part(tuple(harmful), "given", 1, label="harmful→refusal[:1]"),),
                INPUT_DEFINITIONS["A_harmful"],
            ),
            utility,
            Objective(
                "benign_inputs",
                (Part(tuple(benign), "greedy", label="benign→answer"),),
                INPUT_DEFINITIONS["A_contrast"],
            ),
        ]
    safety_parts = [Part(tuple(harmful), "given", label="harmful→refusal")]
    if n_benign > 0:
        safety_parts.append(Part(tuple(benign[:n_benign]), params.benign_responses, label="benign→answer"))
    objectives = [Objective("safety", tuple(safety_parts), FISHER_DEFINITIONS["F_s"]), utility]
    if params.beta > 0:
        refusals = tuple({"prompt": it["prompt"], "response": refusal_for(it["prompt"], seed)} for it in benign)
        part = Part(refusals, "given", params.benign_refusal_tokens, label="benign→refusal")
        objectives.append(Objective("benign_refusal", (part,), FISHER_DEFINITIONS["F_b"]))
    return objectives


def _load_data(params: SSTObjectiveParams) -> tuple[list[dict], list[dict]]:
    """Load the safety items and the subsampled utility items (seeded); raise on missing or malformed data."""
    if not params.safety_data:
        raise ConfigError("sst: params.safety_data is required (JSONL with prompt/response, or a named source)")
    if not params.utility_data:
        raise ConfigError("sst: params.utility_data is required (JSONL with prompt[/response], or a named source)")
    empirical = params.utility_fisher == "empirical"
    s_items = load_items(params.safety_data, need_response=True, what="safety_data")
    u_items = load_items(params.utility_data, need_response=empirical, what="utility_data")
    u_items = subsample(u_items, params.estimation.n_samples, params.seed + 1, "utility_data")
    return s_items, u_items
