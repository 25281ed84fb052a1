"""Evaluate one materialised model on everything an experiment measures, with the one harness.

Refusal on held-out harmful prompts, over-refusal on benign prompts, held-out accuracy on each utility task and
(optionally) MMLU — the same items, decoding and judge for every model of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sst_merge import distributed as ddp
from sst_merge.eval import evaluate, get_evaluator
from sst_merge.eval.harness import write_records
from sst_merge.eval.judges import get_judge
from sst_merge.experiments.config import ExperimentConfig
from sst_merge.experiments.specs import Metric
from sst_merge.tasks import get_task

#: ``eval.split: dev``: the sources of the development split (HarmBench val behaviours; 60 benign dev prompts)
DEV_SOURCES = {"refusal": "harmbench_val", "over_refusal": "benign_dev"}
#: utility-task dev items per task: the generator's next unique items after its train and eval items
TASK_DEV_ITEMS = 100


def evaluation_plan(cfg: ExperimentConfig, tasks: list[str]) -> list[tuple[str, int | None, Any]]:
    """``(task spec, limit, data)`` for every measurement of one model."""
    e = cfg.eval
    if e.split == "dev":  # development sets, disjoint from the evaluation sets: for choosing hyper-parameters
        plan: list[tuple[str, int | None, Any]] = [
            ("refusal", e.refusal_limit, DEV_SOURCES["refusal"]),
            ("over_refusal", e.over_refusal_limit, DEV_SOURCES["over_refusal"]),
        ]
        plan += [(f"task:{t}", e.task_limit, get_task(t).dev(seed=cfg.seed, n=TASK_DEV_ITEMS)) for t in tasks]
    else:
        plan = [
            ("refusal", e.refusal_limit, e.harmful_source),
            ("over_refusal", e.over_refusal_limit, e.benign_source),
        ]
        plan += [(f"task:{t}", e.task_limit, e.task_data.get(t)) for t in tasks]
    if e.phrasing:  # every item: five forms of each request are compared with each other
        plan.append(("phrasing:dev" if e.split == "dev" else "phrasing", None, e.task_data.get("phrasing")))
    if e.mmlu_limit != 0:
        plan.append(("mmlu", e.mmlu_limit, e.mmlu_source))
    return plan


def evaluate_all(
    model, tokenizer, cfg: ExperimentConfig, tasks: list[str], records_path: Path, show_progress: bool = True
) -> dict[str, Metric]:
    """Run the plan on ``model``; write per-item records to ``records_path``; return task → :class:`Metric`.

    Under torch.distributed every rank returns the same metrics (the harness gathers the shards); only rank 0
    writes the records.
    """
    results: dict[str, Any] = {}
    for task, limit, data in evaluation_plan(cfg, tasks):
        res = evaluate(
            model,
            tokenizer,
            [task],
            cfg.eval.harness_settings(),
            limit=limit,
            data={task: data} if data is not None else None,
            show_progress=show_progress,
        )
        results.update(res["tasks"])
    if ddp.is_main():
        write_records(records_path, {"tasks": results})
    return metrics_of(results)


def metrics_of(results: dict[str, Any]) -> dict[str, Metric]:
    """Task → :class:`Metric` (primary value, n, interval, per-item scores for pairing) from harness results."""
    metrics = {}
    for name, res in results.items():
        primary = res["metrics"][res["primary"]]
        others = {k: v["value"] for k, v in res["metrics"].items() if k != res["primary"]}
        metrics[name] = Metric(
            value=primary["value"],
            n=primary["n"],
            ci=tuple(primary["ci95"]) if primary.get("ci95") else None,
            items={str(r["id"]): float(r["score"]) for r in res["records"]},
            extra={"metric": res["primary"], **({"other": others} if others else {})},
        )
    return metrics


def rejudge_all(
    cfg: ExperimentConfig, metrics: dict[str, Metric], records: list[dict[str, Any]], records_path: Path
) -> dict[str, Metric]:
    """Judge the saved responses of an earlier evaluation again with ``cfg.eval.judge``; nothing is generated.

    ``metrics`` and ``records`` are that evaluation's (every task's records, each tagged with its ``task``). Judged
    tasks (refusal, over-refusal) are summarised again from the new verdicts; the others keep their metrics. The
    new records are written to ``records_path``.
    """
    judge = get_judge(cfg.eval.judge)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append({k: v for k, v in r.items() if k != "task"})
    missing = set(metrics) - set(by_task)
    if missing:
        raise ValueError(f"the saved records lack the tasks {sorted(missing)}; they cannot be judged again")
    results = {}
    for task, recs in by_task.items():
        ev = get_evaluator(task)
        if getattr(ev, "needs_judge", False):
            results[task] = ev.rejudge(recs, judge)
        else:
            results[task] = {"records": recs}
    write_records(records_path, {"tasks": results})
    out = dict(metrics)
    out.update(metrics_of({t: res for t, res in results.items() if "primary" in res}))
    return out
