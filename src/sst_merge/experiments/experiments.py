"""exp1 / exp2 / exp3 (design §8), registered by name; each returns its section of the results JSON.

* exp1 — Safety Tax quantification: base, utility-only and safety-only models are evaluated (the measured
  baselines), the SST-Merge output is evaluated with the same harness, and design §7 is computed against the
  reference (base + utility adapters by default).
* exp2 — multitask interference: K utility adapters plus the safety adapter, merged by every method; per-task
  accuracy retained relative to each single-task adapter, and safety, for each K.
* exp3 — baseline comparison: SST-Merge (and any SST variants of ``sweep.sst_params``) vs task arithmetic, TIES,
  DARE and linear over a safety-weight sweep; Pareto fronts of refusal vs task accuracy and of refusal vs
  over-refusal, and each baseline's task accuracy and over-refusal at every SST point's refusal rate.

Every comparison carries the three-way account (:mod:`~sst_merge.experiments.safety_tax`): safety gain, utility
loss and Safety Tax; over-refusal increase and tax; the balanced-score change. Every model gets the balanced score,
degenerate-response rates and drift on benign prompts (:mod:`~sst_merge.experiments.behaviour`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sst_merge.config import validate
from sst_merge.eval.stats import gap_closed_report, pareto_front, rate_metric, value_at_safety
from sst_merge.experiments import adapters as adapter_paths
from sst_merge.experiments.behaviour import add_behaviour, reference_spec
from sst_merge.experiments.config import ExperimentConfig, alphas_of, sst_variant_params, variant_name
from sst_merge.experiments.references import MULTITASK, add_ceilings, ceiling_specs
from sst_merge.experiments.runner import AdapterRef, Metric, ModelSpec, Runner
from sst_merge.experiments.safety_tax import compare, log_comparison
from sst_merge.experiments.specs import Series
from sst_merge.merge import get_method
from sst_merge.registry import Registry
from sst_merge.tasks.sources import fisher_sources

log = logging.getLogger(__name__)

EXPERIMENTS: Registry[Callable[[Runner], dict[str, Any]]] = Registry("experiment")


def utility_metric(runner: Runner, metrics: dict[str, Metric], tasks: list[str]) -> Metric:
    """The primary utility U: MMLU accuracy, or accuracy over the utility tasks' held-out items (micro)."""
    if runner.cfg.utility_metric == "mmlu":
        return metrics["mmlu"]
    items = {f"{t}/{i}": v for t in tasks for i, v in metrics[f"task:{t}"].items.items()}
    m = rate_metric(list(items.values()))
    return Metric(value=m["value"], n=m["n"], ci=tuple(m["ci95"]), items=items)


def run_params(runner: Runner, method: str, **override: Any) -> dict[str, Any]:
    """A merge method's parameters in this run: its configured ones (:meth:`ExperimentConfig.method_params`, a
    variant's ``override`` on top), the run's seed, ``sweep.density`` where the method takes a density and its block
    gives none, and the embedded Fisher data where it takes Fisher data the config does not name: the named sources
    ``safety_fisher`` and ``utility:TASK`` at the run's seed (:func:`~sst_merge.tasks.sources.fisher_sources`; in
    the cache key they stand for their content). Flat, as given: the evaluation cache key's payload."""
    fields = get_method(method).Params.model_fields
    configured = runner.cfg.method_params(method)
    p = sst_variant_params(configured, override)
    p["seed"] = runner.cfg.seed
    if "density" in fields and "density" not in configured:  # a method's own density (``methods``) wins
        p["density"] = runner.cfg.sweep.density
    if "safety_data" in fields and (not p.get("safety_data") or not p.get("utility_data")):
        safety, utility = fisher_sources(runner.cfg.utility_tasks, runner.cfg.seed)
        p["safety_data"] = p.get("safety_data") or safety
        p["utility_data"] = p.get("utility_data") or utility
    return p


def merged_spec(runner: Runner, method: str, utility: list[AdapterRef], safety_path: str, alpha: float, **variant):
    """A merge of the utility adapters (weight 1) and the safety adapter at safety weight ``alpha``.

    The method maps the safety weight onto its parameters and adapter weights
    (:meth:`~sst_merge.merge.base.MergeMethod.apply_safety_weight`: the safety adapter's weight for the ``Σ wᵢτᵢ``
    methods, ``params.alpha`` for sst). ``variant`` overrides the method's parameters; a ``name`` in it labels the
    series (``sst[NAME](alpha=1)``), else its parameters do (``sst(alpha=1,k=8)``).
    """
    name = variant.pop("name", None)
    params = run_params(runner, method, **variant)
    roles = ["utility"] * len(utility) + ["safety"]
    merger = get_method(method)
    params, weights = merger.apply_safety_weight(params, [a.weight for a in utility] + [1.0], roles, alpha)
    paths = [a.path for a in utility] + [safety_path]
    refs = tuple(AdapterRef(p, w, r) for p, w, r in zip(paths, weights, roles, strict=True))
    tag = ",".join(f"{k}={v}" for k, v in variant.items())
    label = f"{method}[{name}](alpha={alpha:g})" if name else f"{method}(alpha={alpha:g}{',' + tag if tag else ''})"
    typed = validate(merger.Params, params, source=f"params of method {method} in {label}")  # once, here
    return ModelSpec(label, refs, method, tuple(sorted(params.items())), merge_params=typed)


def comparison(runner: Runner, ref: dict[str, Metric], new: dict[str, Metric], tasks: list[str]) -> dict[str, Any]:
    """The three-way comparison of a model's metrics ``new`` with its reference's ``ref`` (utility over ``tasks``)."""
    cfg = runner.cfg
    ref_u, new_u = utility_metric(runner, ref, tasks), utility_metric(runner, new, tasks)
    return compare(
        ref["refusal"], ref_u, new["refusal"], new_u, cfg.bootstrap, cfg.seed, ref["over_refusal"], new["over_refusal"]
    )


def point_of(runner: Runner, label: str, tasks: list[str]) -> dict[str, Any]:
    """One model's coordinates for the trade-off plots and tables: refusal, utility, over-refusal and the rest."""
    m = runner.evaluated[label]
    point = {
        "model": label,
        "safety": m["refusal"].value,
        "utility": utility_metric(runner, m, tasks).value,
        "over_refusal": m["over_refusal"].value,
    }
    lookalike = m["over_refusal"].extra.get("other", {}).get("over_refusal_rate_lookalike")
    if lookalike is not None:
        point["over_refusal_lookalike"] = lookalike
    for name in ("balanced_score", "benign_drift", "degenerate_harmful", "degenerate_benign"):
        if name in m:
            point[name] = m[name].value
    return point


def adapters_of(runner: Runner) -> tuple[list[str], list[AdapterRef], str]:
    """The run's utility tasks, their adapters at weight 1, and the safety adapter's path (trained on first use)."""
    tasks = runner.cfg.utility_tasks
    paths = adapter_paths.utility_adapters(runner.cfg, tasks)
    return tasks, [AdapterRef(paths[t], 1.0, "utility") for t in tasks], adapter_paths.safety_adapter(runner.cfg)


@EXPERIMENTS.register("exp1")
def exp1(runner: Runner) -> dict[str, Any]:
    """Safety Tax of SST-Merge against measured pre-merge baselines."""
    cfg = runner.cfg
    tasks, utility, safety = adapters_of(runner)
    ceiling_models = ceiling_specs(runner, safety)  # the multi-task adapter trains here, before any evaluation
    specs = [
        ModelSpec("base"),
        ModelSpec("utility", tuple(utility)),
        ModelSpec("safety", (AdapterRef(safety, 1.0, "safety"),)),
        merged_spec(runner, "sst", utility, safety, cfg.sst["alpha"]),
    ]
    metrics = {s.label: runner.evaluate(s) for s in specs}
    ceilings = add_ceilings(runner, ceiling_models)
    add_behaviour(runner)
    ref = reference_spec(runner).label
    merged = specs[-1].label
    cmp = comparison(runner, metrics[ref], metrics[merged], tasks)
    log_comparison(merged, ref, metrics[ref]["refusal"], utility_metric(runner, metrics[ref], tasks), cmp)
    return {
        "models": [s.label for s in specs] + ceilings,
        "reference": ref,
        "utility_tasks": tasks,
        "comparisons": [{"model": merged, "reference": ref, **cmp}] + ceiling_comparisons(runner, ceilings, tasks),
        "ceilings": [point_of(runner, c, tasks) for c in ceilings],
    }


def ceiling_comparisons(runner: Runner, ceilings: list[str], tasks: list[str]) -> list[dict[str, Any]]:
    """Each ceiling row against the run's reference, marked ``ceiling: true`` (it is not a merge)."""
    ref = reference_spec(runner).label
    rows = []
    for label in ceilings:
        cmp = comparison(runner, runner.evaluated[ref], runner.evaluated[label], tasks)
        rows.append({"model": label, "reference": ref, "ceiling": True, **cmp})
    return rows


def gap_closed_of(runner: Runner, label: str, floor: str, bound: str, tasks: list[str]) -> dict[str, Any]:
    """How much of the gap from ``floor`` (task arithmetic at α = 1) to ``bound`` (the multi-task adapter) the model
    ``label`` closes, in balanced score and in utility, each with a paired-bootstrap interval over the items
    (:func:`~sst_merge.eval.stats.gap_closed_report`): 1 reaches the bound, 0 is no better than the floor, negative
    is worse, above 1 passes the bound; ``value: None`` with a status when the bound is not above the floor."""

    def groups(name: str, measures: tuple[str, ...]) -> list[list[float]]:
        m = runner.evaluated[name]
        items = [utility_metric(runner, m, tasks).items if x == "utility" else m[x].items for x in measures]
        return [[it[i] for i in sorted(it)] for it in items]  # every model holds the same item ids

    out = {}
    for key, measures, score in (
        ("balanced_score", ("refusal", "over_refusal"), lambda h, b: (h + 1 - b) / 2),
        ("utility", ("utility",), lambda u: u),
    ):
        models = [groups(x, measures) for x in (label, floor, bound)]
        r = gap_closed_report(*models, score, n_boot=max(runner.cfg.bootstrap, 1), seed=runner.cfg.seed)
        out[key] = {**r, "floor_model": floor, "bound_model": bound}
    return out


@EXPERIMENTS.register("exp2")
def exp2(runner: Runner) -> dict[str, Any]:
    """Multitask interference: K utility adapters + safety, merged by each method, vs K."""
    cfg = runner.cfg
    tasks = runner.tasks
    paths = adapter_paths.utility_adapters(cfg, tasks)
    safety = adapter_paths.safety_adapter(cfg)
    single = {t: runner.evaluate(ModelSpec(f"utility[{t}]", (AdapterRef(paths[t], 1.0, "utility"),))) for t in tasks}
    rows = []
    for k in sorted(set(min(k, len(tasks)) for k in cfg.exp2_ks)):
        if k < 1:
            continue
        chosen = tasks[:k]
        utility = [AdapterRef(paths[t], 1.0, "utility") for t in chosen]
        ref_label = f"K={k}:utility"  # the pre-merge reference of this K: the K utility adapters, no safety
        runner.evaluate(ModelSpec(ref_label, tuple(utility)))
        for method in cfg.sweep.methods:
            alpha = get_method(method).configured_safety_weight(cfg.method_params(method))  # sst: its α; others: 1
            spec = merged_spec(runner, method, utility, safety, alpha)
            spec = dataclasses.replace(spec, label=f"K={k}:{spec.label}")
            runner.evaluate(spec)
            rows.append({"k": k, "method": method, "model": spec.label, "reference": ref_label, "tasks": chosen})
    add_behaviour(runner)
    comparisons = []
    for row in rows:
        m, ref = runner.evaluated[row["model"]], runner.evaluated[row["reference"]]
        per_task = {}
        for t in row.pop("tasks"):
            acc, single_acc = m[f"task:{t}"].value, single[t][f"task:{t}"].value
            per_task[t] = {
                "accuracy": acc,
                "single_task": single_acc,
                "retained": acc / single_acc if single_acc else None,
            }
        retained = [v["retained"] for v in per_task.values() if v["retained"] is not None]
        point = point_of(runner, row["model"], list(per_task))
        cmp = comparison(runner, ref, m, list(per_task))
        comparisons.append({"model": row["model"], "reference": row["reference"], **cmp})
        row.update(
            {
                "safety": point["safety"],
                "over_refusal": point["over_refusal"],
                "balanced_score": point.get("balanced_score"),
                "benign_drift": point.get("benign_drift"),
                "over_refusal_increase": cmp["over_refusal_increase"]["value"],
                "mean_retained": sum(retained) / len(retained) if retained else None,
                "per_task": per_task,
            }
        )
        log.info(
            "exp2 K=%d %-15s safety %.3f, over-refusal %.3f (increase %+.3f), accuracy retained %s",
            row["k"],
            row["method"],
            row["safety"],
            row["over_refusal"],
            row["over_refusal_increase"],
            f"{row['mean_retained']:.3f}" if row["mean_retained"] is not None else "n/a",
        )
    return {
        "tasks": tasks,
        "single_task_models": [f"utility[{t}]" for t in tasks],
        "rows": rows,
        "comparisons": comparisons,
    }


def sweep_series(cfg: ExperimentConfig) -> list[Series]:
    """exp3's series: one per swept method, and one per SST variant (``sweep.sst_k``, ``sst_fisher``, ``sst_params``)."""
    out = [Series(m, m) for m in cfg.sweep.methods]
    out += [Series(f"sst[k={k}]", "sst", {"k": k}) for k in cfg.sweep.sst_k]
    out += [Series(f"sst[fisher={f}]", "sst", {"fisher": f}) for f in cfg.sweep.sst_fisher if f != cfg.sst["fisher"]]
    out += [Series(f"sst[{variant_name(v)}]", "sst", dict(v)) for v in cfg.sweep.sst_params]
    return out


@EXPERIMENTS.register("exp3")
def exp3(runner: Runner) -> dict[str, Any]:
    """SST-Merge vs the baselines over a safety-weight sweep: Pareto fronts, utility and over-refusal at matched
    safety."""
    cfg = runner.cfg
    tasks, utility, safety = adapters_of(runner)
    ceiling_models = ceiling_specs(runner, safety)  # the multi-task adapter trains here, before any evaluation
    ref_spec = reference_spec(runner)
    runner.evaluate(ref_spec)
    runner.evaluate(ModelSpec("base"))
    swept = sweep_series(cfg)
    labels: dict[str, list[tuple[float, str]]] = {}
    for s in swept:
        for alpha in alphas_of(cfg.sweep, s.method):
            spec = merged_spec(runner, s.method, utility, safety, alpha, **s.overrides)
            runner.evaluate(spec)
            labels.setdefault(s.name, []).append((alpha, spec.label))
    ceilings = add_ceilings(runner, ceiling_models)
    floor = None
    if MULTITASK in ceilings:  # gap closed is measured from task arithmetic at α = 1 (evaluated if not swept)
        floor = merged_spec(runner, "task_arithmetic", utility, safety, 1.0)
        runner.evaluate(floor)
    add_behaviour(runner)
    ref = runner.evaluated[ref_spec.label]
    points: dict[str, list[dict[str, Any]]] = {}
    comparisons = []
    for series, models in labels.items():
        for alpha, label in models:
            cmp = comparison(runner, ref, runner.evaluated[label], tasks)
            if floor is not None:
                cmp["gap_closed"] = gap_closed_of(runner, label, floor.label, MULTITASK, tasks)
            comparisons.append({"model": label, "reference": ref_spec.label, **cmp})
            points.setdefault(series, []).append({"alpha": alpha, **point_of(runner, label, tasks)})
            if floor is not None:
                points[series][-1]["gap_closed"] = {k: v["value"] for k, v in cmp["gap_closed"].items()}
            p = points[series][-1]
            log.info(
                "exp3 %s: refusal %.3f, over-refusal %.3f, utility %.3f, balanced score %.3f; Safety Tax %s, "
                "Over-refusal Tax %s",
                label,
                p["safety"],
                p["over_refusal"],
                p["utility"],
                cmp["balanced_score_merged"],
                _tax_text(cmp["safety_tax"]),
                _tax_text(cmp["over_refusal_tax"]),
            )
    fronts = {name: pareto_front(pts) for name, pts in points.items()}
    or_fronts = {name: over_refusal_front(pts) for name, pts in points.items()}
    matched = []
    sst_series = {s.name for s in swept if s.is_sst}
    for s_name in (n for n in points if n in sst_series):
        for p in points[s_name]:
            row: dict[str, Any] = {
                "series": s_name,
                "model": p["model"],
                "safety": p["safety"],
                "sst_utility": p["utility"],
                "sst_over_refusal": p["over_refusal"],
                "utility": {},
                "over_refusal": {},
            }
            for other, pts in points.items():
                if other in sst_series:
                    continue
                row["utility"][other] = value_at_safety(pts, p["safety"], "utility")["value"]
                row["over_refusal"][other] = value_at_safety(pts, p["safety"], "over_refusal", higher_is_better=False)[
                    "value"
                ]
            matched.append(row)
    comparisons += ceiling_comparisons(runner, ceilings, tasks)
    return {
        "reference": ref_spec.label,
        "ceilings": [point_of(runner, c, tasks) for c in ceilings],
        **({"gap_closed_floor": floor.label} if floor is not None else {}),
        "points": points,
        "pareto_fronts": fronts,
        "over_refusal_fronts": or_fronts,
        "at_matched_safety": matched,
        "comparisons": comparisons,
    }


def _tax_text(tax: dict[str, Any]) -> str:
    return f"{tax['value']:.3f}" if tax["value"] is not None else f"undefined ({tax['status']})"


def over_refusal_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points not dominated in (refusal ↑, over-refusal ↓), sorted by refusal."""
    front = pareto_front([(p["safety"], -p["over_refusal"], i) for i, p in enumerate(points)])
    return [points[i] for _, _, i in front]
