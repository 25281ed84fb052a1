"""The results JSON schema (version :data:`~sst_merge.experiments.provenance.SCHEMA_VERSION`).

``results.json`` validates against :class:`Results`; ``Results.model_json_schema()`` is the JSON Schema. Every
metric carries its value, n and 95% interval; every model its spec (adapters with weights and roles, method and
parameters). Per-item records live beside it in ``records.jsonl`` (one line per model × task × item).

Version 2 (the three-way account: refusal, over-refusal, task) adds:

* per model, beside ``refusal``, ``over_refusal`` and the task metrics: ``balanced_score`` (½(refusal on harmful
  + answer rate on benign), bootstrap interval; ``f1``, ``f1_balanced`` and its interval as extra fields),
  ``benign_drift`` (mean per-token NLL increase on the reference's greedy benign answers, paired-bootstrap interval;
  ``nll_model``, ``nll_reference``), ``degenerate_harmful`` / ``degenerate_benign`` (share of empty or looping
  responses, Wilson; ``empty`` and ``repetition`` counts);
* per comparison (:class:`Comparison`; exp1, exp2, exp3): ``over_refusal_increase`` {value, ci95},
  ``over_refusal_tax`` {value, ci95, status}, ``over_refusal_ref`` / ``over_refusal_merged``, ``n_benign``,
  ``over_refusal_tax_undefined_fraction``, ``balanced_score_ref`` / ``balanced_score_merged`` and
  ``balanced_score_change`` {value, ci95};
* exp2: ``comparisons`` against each K's reference ``K=k:utility`` (the K utility adapters without safety), and
  per row ``over_refusal``, ``balanced_score``, ``benign_drift``, ``over_refusal_increase``;
* exp3: every point also holds ``over_refusal`` (``over_refusal_lookalike`` where measured), ``balanced_score``,
  ``benign_drift`` and the degenerate rates; ``over_refusal_fronts`` (refusal ↑ vs over-refusal ↓); and
  ``at_matched_safety`` (replacing ``utility_at_matched_safety``): per SST point, ``utility`` and ``over_refusal``
  maps from each baseline series to its value interpolated along its front at that refusal rate (None outside).

Version 2 documents may also carry the ceiling rows (config ``ceilings``; design §8): models ``multitask`` (one
LoRA on the safety and utility data together) and ``routing`` (a routed model: its spec's ``routes`` maps each
measurement to the model that answered it; no generation); in exp1 and exp3 a ``ceilings`` list of their points and
their comparisons, marked ``ceiling: true``; with ``multitask``, every exp3 sweep comparison's ``gap_closed``
{``balanced_score``, ``utility``: {value, status, floor, ceiling, floor_model, bound_model}} — (merge − task
arithmetic at α = 1) / (multitask − task arithmetic at α = 1), ``value: null`` when the bound is not above — its
values copied into each point, and ``gap_closed_floor`` naming the α = 1 model.

Version 1 documents (no such fields) still validate and render.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # evaluators add e.g. macro accuracy, stderr, interval kind

    value: float
    n: int
    ci95: list[float] | None


class ModelOut(_Strict):
    spec: dict[str, Any]
    cache_key: str
    metrics: dict[str, MetricOut]


class _Interval(BaseModel):
    model_config = ConfigDict(extra="allow")

    value: float | None
    ci95: list[float | None] | None


class Comparison(BaseModel):
    """One model against its reference (design §7 plus the over-refusal account, schema 2)."""

    model_config = ConfigDict(extra="allow")

    model: str
    reference: str
    safety_gain: _Interval
    utility_loss: _Interval
    safety_tax: _Interval
    over_refusal_increase: _Interval | None = None
    over_refusal_tax: _Interval | None = None
    balanced_score_change: _Interval | None = None


class Results(_Strict):
    schema_version: int
    created: str
    tool_version: str
    git_revision: str | None
    library_versions: dict[str, str | None]
    config: dict[str, Any]
    seeds: dict[str, int]
    base_model: dict[str, Any]
    adapters: dict[str, dict[str, Any]]
    models: dict[str, ModelOut]
    experiments: dict[str, dict[str, Any]]
    records: str
    cache: dict[str, int]
    diagnostics: dict[str, Any] = {}

    @field_validator("experiments")
    @classmethod
    def _valid_comparisons(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for section in v.values():
            for c in section.get("comparisons", []):
                Comparison.model_validate(c)
        return v
