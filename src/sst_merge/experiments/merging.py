"""Merges inside an experiment: the core merge library, with the run's already-loaded base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sst_merge.experiments.specs import ModelSpec
from sst_merge.merge.api import prepare, run_plan


def merge_for_experiment(
    spec: ModelSpec, base_model: str, model: Any, tok: Any, workdir: Path, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run ``spec``'s merge on the run's loaded ``model``; return its ΔW and its diagnostics (e.g. SST's λ spectra).

    The merge method gets the run's base model; what it applies to it (the utility ΔW, to reach the pre-merge
    point for Fisher estimation) it restores exactly, which this checks on the weights' fingerprint. A failed merge
    raises; the experiment stops — no unmerged model is ever evaluated in its place. ``spec.merge_params`` (validated
    when the spec was made) go to the method as they are.
    """
    before = _checksum(model)
    config = {
        "base_model": base_model,
        "method": spec.method,
        "adapters": [{"path": a.path, "weight": a.weight, "role": a.role} for a in spec.adapters],
        "params": dict(spec.params),
        "output": {"format": "full"},
    }
    plan = prepare(config, load_model=lambda: (model, tok), show_progress=show_progress, params=spec.merge_params)
    plan.context.workdir = workdir
    try:
        deltas = run_plan(plan)
    finally:
        if _checksum(model) != before:
            raise RuntimeError(f"merge {spec.label} left the base model modified; refusing to evaluate anything else")
    return deltas, plan.context.diagnostics


def _checksum(model: Any) -> list[float]:
    """Per-parameter sums: any change to the weights changes them (used to prove the base was restored)."""
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in model.parameters()]
