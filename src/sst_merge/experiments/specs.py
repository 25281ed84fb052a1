"""What an experiment measures and on which models: adapter references, model specs and metrics (plain data).

Kept apart from the runner so that the modules the runner calls (evaluation, merging, the Safety Tax) can use them
without importing the runner back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sst_merge.merge.base import MethodParams


@dataclass(frozen=True)
class AdapterRef:
    """An adapter used in an experiment: its path, weight and role."""

    path: str
    weight: float
    role: str  # "utility" or "safety"


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: the base plus the ΔW of ``adapters`` combined by ``method``.

    ``method=None`` means the plain sum Σ wᵢ ΔWᵢ (a single adapter at weight 1 is exactly that adapter).
    ``routes`` (measurement → label of an evaluated model) makes a *routed* model: no ΔW of its own, every
    measurement is that model's (the routing oracle, :mod:`~sst_merge.experiments.references`); ``adapters`` then
    lists the routed-to models' adapters, for provenance only.
    """

    label: str
    adapters: tuple[AdapterRef, ...] = ()
    method: str | None = None
    #: the parameters as given (flat, sorted): what the evaluation cache key and the results record
    params: tuple[tuple[str, Any], ...] = ()
    routes: tuple[tuple[str, str], ...] = ()
    #: the same parameters validated by the method (once, where the spec is made); ``None``: validated by the merge
    merge_params: MethodParams | None = field(default=None, compare=False, repr=False)

    def describe(self) -> dict[str, Any]:
        out = {
            "label": self.label,
            "method": self.method,
            "adapters": [{"path": a.path, "weight": a.weight, "role": a.role} for a in self.adapters],
            "params": dict(self.params),
        }
        if self.routes:
            out["routes"] = dict(self.routes)
        return out


@dataclass(frozen=True)
class Series:
    """One series of a safety-weight sweep: a method, and the parameters its points override (``name`` labels it)."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sst(self) -> bool:
        """Whether the series is SST-Merge (its own or a variant): the ones compared at matched safety."""
        return self.method == "sst"


@dataclass
class Metric:
    """A measured metric: value, n, 95% interval, and per-item scores (for paired statistics)."""

    value: float
    n: int
    ci: tuple[float, float] | None
    items: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self, with_items: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "n": self.n, "ci95": list(self.ci) if self.ci else None}
        out.update(self.extra)
        if with_items:
            out["items"] = self.items
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Metric:
        extra = {k: v for k, v in d.items() if k not in ("value", "n", "ci95", "items")}
        ci = tuple(d["ci95"]) if d.get("ci95") else None
        return cls(value=d["value"], n=d["n"], ci=ci, items=d.get("items", {}), extra=extra)
