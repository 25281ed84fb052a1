"""`sst-merge list`: print what is registered — merge methods, evaluation tasks, judges, data sources, utility
tasks, experiments and model aliases (one line per registry in SECTIONS)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from sst_merge.data import source_rows
from sst_merge.tasks import UTILITY_TASKS  # importing tasks registers the named Fisher sources


def _models() -> list[tuple[str, str]]:
    # deferred: torch (through the library); keeps `sst-merge --help` fast
    from sst_merge.models.loading import model_rows

    return model_rows()


def _merge_methods() -> list[tuple[str, str]]:
    # deferred: torch (through the library); keeps `sst-merge --help` fast
    from sst_merge.merge import MERGE_METHODS

    return [(name, MERGE_METHODS.get(name).description) for name in MERGE_METHODS.names()]


def _eval_tasks() -> list[tuple[str, str]]:
    # deferred: torch (through the library); keeps `sst-merge --help` fast
    from sst_merge.eval import task_rows

    return task_rows()


def _judges() -> list[tuple[str, str]]:
    # deferred: torch (through the library); keeps `sst-merge --help` fast
    from sst_merge.eval import judge_rows

    return judge_rows()


def _sources() -> list[tuple[str, str]]:
    return source_rows()


def _utility_tasks() -> list[tuple[str, str]]:
    return [(name, f"generated task, metric {UTILITY_TASKS.get(name).metric}") for name in UTILITY_TASKS.names()]


def _experiments() -> list[tuple[str, str]]:
    # deferred: torch (through the library); keeps `sst-merge --help` fast
    from sst_merge.experiments.experiments import EXPERIMENTS

    return [(name, (EXPERIMENTS.get(name).__doc__ or "").strip().splitlines()[0]) for name in EXPERIMENTS.names()]


#: (title, function returning (name, one-line description) rows). Other registries add a line here.
SECTIONS: list[tuple[str, Callable[[], list[tuple[str, str]]]]] = [
    ("merge methods", _merge_methods),
    ("evaluation tasks (sst-merge eval --tasks)", _eval_tasks),
    ("refusal judges (--judge)", _judges),
    ("data sources", _sources),
    ("utility tasks (sst-merge train --task; task:NAME)", _utility_tasks),
    ("experiments (sst-merge run --experiment)", _experiments),
    ("models (--model: an alias, a local model directory or a hub id)", _models),
]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return sub.add_parser(
        "list", help="list models, merge methods, evaluation tasks, judges, data sources, tasks, experiments"
    )


def run(args: argparse.Namespace) -> int:
    for i, (title, rows_fn) in enumerate(SECTIONS):
        rows = rows_fn()
        if i:
            print()
        print(f"{title}:")
        width = max((len(name) for name, _ in rows), default=0)
        for name, desc in rows:
            print(f"  {name.ljust(width)}  {desc}".rstrip())
    return 0
