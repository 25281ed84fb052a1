"""The results JSON schema (version :data:`~sst_merge.experiments.provenance.SCHEMA_VERSION`).

``results.json`` validates against :class:`Results`; ``Results.model_json_schema()`` is the JSON Schema. Every
metric carries its value, n and 95% interval; every model its spec (adapters with weights and roles, method and
parameters). Per-item records live beside it in ``records.jsonl`` (one line per model × task × item).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


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
