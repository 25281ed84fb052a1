"""Experiments exp1–exp3: config, runner (materialise → evaluate → cache), Safety Tax, results, report."""

from sst_merge.experiments.api import run_experiment
from sst_merge.experiments.config import ExperimentConfig, resolve_config

__all__ = ["ExperimentConfig", "resolve_config", "run_experiment"]
