"""Merges inside an experiment: the core merge library, with the run's already-loaded base model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sst_merge.experiments.runner import Runner  # type only: the runner calls this module
    from sst_merge.experiments.specs import ModelSpec


def merge_for_experiment(runner: Runner, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Run ``spec``'s merge and return its ΔW. Diagnostics (e.g. SST's λ spectra) go to ``runner.diagnostics``.

    The merge method gets the run's base model; what it applies to it (the utility ΔW, to reach the pre-merge
    point for Fisher estimation) it restores exactly, which :func:`merge_for_experiment` checks on the touched
    weights' fingerprint. A failed merge raises; the experiment stops — no unmerged model is ever evaluated in
    its place.
    """
    from sst_merge.merge.api import prepare, run_plan

    base, tok = runner.base()
    before = _checksum(base)

    config = {
        "base_model": runner.cfg.model,
        "method": spec.method,
        "adapters": [{"path": a.path, "weight": a.weight, "role": a.role} for a in spec.adapters],
        "params": dict(spec.params),
        "output": {"format": "full"},
    }
    plan = prepare(config, load_model=lambda: (base, tok), show_progress=runner.show_progress)
    plan.context.workdir = runner.cache_dir
    try:
        deltas = run_plan(plan)
    finally:
        if _checksum(base) != before:
            raise RuntimeError(f"merge {spec.label} left the base model modified; refusing to evaluate anything else")
    if plan.context.diagnostics:
        runner.diagnostics[spec.label] = plan.context.diagnostics
    return deltas


def _checksum(model) -> list[float]:
    """Per-parameter sums: any change to the weights changes them (used to prove the base was restored)."""
    with torch.no_grad():
        return [float(p.detach().double().sum()) for p in model.parameters()]
