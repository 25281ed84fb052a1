"""Find the adapters an experiment needs: the user's paths, the shipped ones, or adapters trained (and cached) by
``sst-merge train``."""

from __future__ import annotations

import logging

import sst_merge.train
from sst_merge.experiments.config import ExperimentConfig
from sst_merge.train.shipped import shipped_adapter

log = logging.getLogger(__name__)


def _train(cfg: ExperimentConfig, task: str, parts: int = 1) -> str:

    if cfg.adapters.shipped and cfg.adapters.train_steps is None:
        path, why = shipped_adapter(cfg.model, task, seed=cfg.seed)
        if path is not None:
            log.info("adapter for %r: the one shipped with sst-merge (%s)", task, path)
            return str(path)
        log.info("adapter for %r: not using a shipped one: %s", task, why)
    kwargs = {"seed": cfg.seed}
    if cfg.adapters.train_steps is not None:
        kwargs["steps"] = cfg.adapters.train_steps * parts  # a multi-task adapter: the step budget of its parts
    log.info("adapter for %r not given: using the cached one, or training it once", task)
    return str(sst_merge.train.train_adapter(cfg.model, task, **kwargs))


def safety_adapter(cfg: ExperimentConfig) -> str:
    """Path of the safety adapter (shipped, or trained on first use, when the config names none)."""
    return cfg.adapters.safety or _train(cfg, "safety")


def utility_adapters(cfg: ExperimentConfig, tasks: list[str]) -> dict[str, str]:
    """Path of each utility task's adapter, in ``tasks`` order (shipped, or trained on first use, when not given)."""
    out = {}
    for task in tasks:
        given = cfg.adapters.utility.get(task)
        out[task] = given or _train(cfg, task)
    return out


def multitask_adapter(cfg: ExperimentConfig, tasks: list[str]) -> str:
    """Path of the multi-task adapter: safety and ``tasks`` in one LoRA (given, or trained on first use, design §3)."""
    return cfg.adapters.multitask or _train(cfg, "+".join(["safety", *tasks]), parts=1 + len(tasks))
