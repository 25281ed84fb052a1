"""Run experiments from Python: ``run_experiment(cfg, run_dir)`` — what ``sst-merge run`` calls."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sst_merge import distributed as ddp
from sst_merge.errors import OutputExistsError
from sst_merge.experiments.config import ExperimentConfig
from sst_merge.experiments.experiments import EXPERIMENTS
from sst_merge.experiments.results import RESULTS_NAME, write_results
from sst_merge.experiments.runner import Runner
from sst_merge.io import atomic_write_json
from sst_merge.tasks import UTILITY_TASKS

log = logging.getLogger(__name__)

ORDER = ("exp1", "exp2", "exp3")


def experiments_of(cfg: ExperimentConfig) -> list[str]:
    return list(ORDER) if cfg.experiment == "all" else [cfg.experiment]


def run_tasks(cfg: ExperimentConfig, experiments: list[str]) -> list[str]:
    """Utility tasks every model of the run is evaluated on (exp2 adds its K tasks)."""
    tasks = list(cfg.utility_tasks)
    if "exp2" in experiments:
        for t in cfg.exp2_tasks or _registered_tasks():
            if t not in tasks:
                tasks.append(t)
    return tasks


def _registered_tasks() -> list[str]:

    return [n for n in UTILITY_TASKS.names() if n != "safety"]


def run_experiment(
    cfg: ExperimentConfig,
    run_dir: str | Path,
    *,
    force: bool = False,
    load=None,
    evaluate=None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the configured experiment(s) into ``run_dir`` and return the results document.

    A run directory that already holds ``results.json`` is refused unless ``force``. One without it (an
    interrupted run) resumes: every evaluation finished before is read from the cache, not recomputed.
    """
    run_dir = Path(run_dir)
    # Under torchrun every rank runs this; a failure on any rank stops all of them before results are written.
    with ddp.all_or_nothing("experiment"):
        if (run_dir / RESULTS_NAME).exists() and not force:
            raise OutputExistsError(
                f"{run_dir} already holds a finished run; pass --force to run again (cached evaluations are reused) "
                "or choose another output directory"
            )
        names = experiments_of(cfg)
        for name in names:
            EXPERIMENTS.get(name)  # unknown names fail before any heavy work
        if ddp.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / "cache").is_dir() and any((run_dir / "cache").iterdir()):
                log.info("resuming in %s: finished evaluations are read from its cache", run_dir)
            atomic_write_json(run_dir / "config.resolved.json", cfg.model_dump(mode="json"))
        runner = Runner(cfg, run_dir, load=load, evaluate=evaluate, show_progress=show_progress and ddp.is_main())
        runner.tasks = run_tasks(cfg, names)
        sections: dict[str, Any] = {}
        for name in names:
            t0 = time.perf_counter()
            log.info("== %s ==", name)
            sections[name] = EXPERIMENTS.get(name)(runner)
            sections[name]["seconds"] = round(time.perf_counter() - t0, 1)
    # Every rank finished every step: rank 0 writes the results and report; the other ranks get its document.
    return ddp.gather_checked("results", lambda: write_results(runner, sections, run_dir) if ddp.is_main() else None)[0]
