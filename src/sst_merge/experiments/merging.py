"""Merges inside an experiment: the core merge library, with the run's already-loaded base model."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sst_merge.experiments.runner import ModelSpec, Runner


def merge_for_experiment(runner: Runner, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Run ``spec``'s merge and return its ΔW. Diagnostics (e.g. SST's λ spectra) go to ``runner.diagnostics``.

    The merge method gets a *copy* of the base model, so nothing it does (e.g. applying the utility ΔW to reach
    the pre-merge point for Fisher estimation) can leak into another evaluation. A failed merge raises; the
    experiment stops — no unmerged model is ever evaluated in its place.
    """
    from sst_merge.merge.api import prepare, run_plan

    def load():
        base, tok = runner.base()
        return copy.deepcopy(base), tok

    config = {
        "base_model": runner.cfg.model,
        "method": spec.method,
        "adapters": [{"path": a.path, "weight": a.weight, "role": a.role} for a in spec.adapters],
        "params": dict(spec.params),
        "output": {"format": "full"},
    }
    plan = prepare(config, load_model=load, show_progress=runner.show_progress)
    plan.context.workdir = runner.cache_dir
    deltas = run_plan(plan)
    if plan.context.diagnostics:
        runner.diagnostics[spec.label] = plan.context.diagnostics
    return deltas
