"""exp1 / exp2 / exp3 (SPEC §8), registered by name; each returns its section of the results JSON.

* exp1 — Safety Tax quantification: base, utility-only and safety-only models are evaluated (the measured
  baselines), the SST-Merge output is evaluated with the same harness, and SPEC §7 is computed against the
  reference (base + utility adapters by default).
* exp2 — multitask interference: K utility adapters plus the safety adapter, merged by every method; per-task
  accuracy retained relative to each single-task adapter, and safety, for each K.
* exp3 — baseline comparison: SST-Merge vs task arithmetic, TIES, DARE and linear over a safety-weight sweep;
  Pareto fronts and utility at matched safety.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sst_merge.experiments import adapters as adapter_paths
from sst_merge.experiments.runner import AdapterRef, Metric, ModelSpec, Runner
from sst_merge.experiments.safety_tax import compare, log_comparison
from sst_merge.registry import Registry

log = logging.getLogger(__name__)

EXPERIMENTS: Registry[Callable[[Runner], dict[str, Any]]] = Registry("experiment")


def utility_metric(runner: Runner, metrics: dict[str, Metric], tasks: list[str]) -> Metric:
    """The primary utility U: MMLU accuracy, or accuracy over the utility tasks' held-out items (micro)."""
    from sst_merge.eval.stats import rate_metric

    if runner.cfg.utility_metric == "mmlu":
        return metrics["mmlu"]
    items = {f"{t}/{i}": v for t in tasks for i, v in metrics[f"task:{t}"].items.items()}
    m = rate_metric(list(items.values()))
    return Metric(value=m["value"], n=m["n"], ci=tuple(m["ci95"]), items=items)


def sst_params(runner: Runner, alpha: float | None = None, **override: Any) -> tuple[tuple[str, Any], ...]:
    """The ``sst`` method's parameters from the experiment config (``alpha`` and sweep axes overridable).

    Fisher data default to the embedded splits (:func:`fisher_data`) unless the config names its own.
    """
    p = dict(runner.cfg.sst)
    if "k" in override:
        for key in ("fraction", "threshold"):
            p.pop(key, None)
    p.update(override)
    if alpha is not None:
        p["alpha"] = alpha
    p["seed"] = runner.cfg.seed
    if not p.get("safety_data") or not p.get("utility_data"):
        safety, utility = fisher_data(runner)
        p["safety_data"] = p.get("safety_data") or safety
        p["utility_data"] = p.get("utility_data") or utility
    return tuple(sorted(p.items()))


def fisher_data(runner: Runner) -> tuple[str, str]:
    """Write (once) and return the JSONL files SST's Fisher statistics are estimated on.

    Safety: the StrongREJECT prompts held out for Fisher estimation (disjoint from the safety adapter's training
    prompts and from every HarmBench evaluation prompt), each with a refusal. Utility: the utility tasks'
    *training* items (never their evaluation items).
    """
    import json

    from sst_merge.cache import move_aside
    from sst_merge.io import atomic_write_text
    from sst_merge.tasks import get_task
    from sst_merge.tasks.safety import safety_splits

    cfg = runner.cfg
    out = runner.cache_dir / "fisher-data"
    safety_path = out / f"safety-seed{cfg.seed}.jsonl"
    utility_path = out / f"utility-{'+'.join(cfg.utility_tasks)}-seed{cfg.seed}.jsonl"
    safety = safety_splits(seed=cfg.seed)["fisher"]
    utility = [it for t in cfg.utility_tasks for it in get_task(t).split(seed=cfg.seed)["train"]]
    for path, items in ((safety_path, safety), (utility_path, utility)):
        text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        # the content is determined by the seed: a file that differs (damaged, edited) is moved aside and rewritten
        if path.is_file() and path.read_bytes() != text.encode():
            move_aside(path, "differs from the Fisher data it should hold")
        if not path.is_file():
            atomic_write_text(path, text)
    return str(safety_path), str(utility_path)


def baseline_params(runner: Runner, method: str) -> tuple[tuple[str, Any], ...]:
    p: dict[str, Any] = {"seed": runner.cfg.seed}
    if method in ("ties", "dare_linear", "dare_ties"):
        p["density"] = runner.cfg.sweep.density
    return tuple(sorted(p.items()))


def merged_spec(runner: Runner, method: str, utility: list[AdapterRef], safety_path: str, alpha: float, **sst_kw):
    """A merge of the utility adapters (weight 1) and the safety adapter at weight ``alpha`` (SST: α)."""
    if method == "sst":
        refs = (*utility, AdapterRef(safety_path, 1.0, "safety"))
        params = sst_params(runner, alpha, **sst_kw)
        tag = ",".join(f"{k}={v}" for k, v in sst_kw.items())
        label = f"sst(alpha={alpha:g}{',' + tag if tag else ''})"
        return ModelSpec(label, refs, "sst", params)
    refs = (*utility, AdapterRef(safety_path, alpha, "safety"))
    return ModelSpec(f"{method}(alpha={alpha:g})", refs, method, baseline_params(runner, method))


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
    specs = [
        ModelSpec("base"),
        ModelSpec("utility", tuple(utility)),
        ModelSpec("safety", (AdapterRef(safety, 1.0, "safety"),)),
        merged_spec(runner, "sst", utility, safety, cfg.sst["alpha"]),
    ]
    metrics = {s.label: runner.evaluate(s) for s in specs}
    ref = "utility" if cfg.reference == "utility" else "base"
    merged = specs[-1].label
    ref_u = utility_metric(runner, metrics[ref], tasks)
    new_u = utility_metric(runner, metrics[merged], tasks)
    cmp = compare(metrics[ref]["refusal"], ref_u, metrics[merged]["refusal"], new_u, cfg.bootstrap, cfg.seed)
    log_comparison(merged, ref, metrics[ref]["refusal"], ref_u, cmp)
    return {
        "models": [s.label for s in specs],
        "reference": ref,
        "utility_tasks": tasks,
        "comparisons": [{"model": merged, "reference": ref, **cmp}],
    }


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
        for method in cfg.sweep.methods:
            spec = merged_spec(runner, method, utility, safety, cfg.sst["alpha"] if method == "sst" else 1.0)
            spec = ModelSpec(f"K={k}:{spec.label}", spec.adapters, spec.method, spec.params)
            m = runner.evaluate(spec)
            per_task = {}
            for t in chosen:
                acc, ref = m[f"task:{t}"].value, single[t][f"task:{t}"].value
                per_task[t] = {"accuracy": acc, "single_task": ref, "retained": acc / ref if ref > 0 else None}
            retained = [v["retained"] for v in per_task.values() if v["retained"] is not None]
            rows.append(
                {
                    "k": k,
                    "method": method,
                    "model": spec.label,
                    "safety": m["refusal"].value,
                    "mean_retained": sum(retained) / len(retained) if retained else None,
                    "per_task": per_task,
                }
            )
            log.info(
                "exp2 K=%d %-15s safety %.3f, accuracy retained %s",
                k,
                method,
                m["refusal"].value,
                f"{rows[-1]['mean_retained']:.3f}" if rows[-1]["mean_retained"] is not None else "n/a",
            )
    return {"tasks": tasks, "single_task_models": [f"utility[{t}]" for t in tasks], "rows": rows}


@EXPERIMENTS.register("exp3")
def exp3(runner: Runner) -> dict[str, Any]:
    """SST-Merge vs the baselines over a safety-weight sweep: Pareto fronts, utility at matched safety."""
    from sst_merge.eval.stats import pareto_front, utility_at_safety

    cfg = runner.cfg
    tasks, utility, safety = adapters_of(runner)
    ref_label = "utility" if cfg.reference == "utility" else "base"
    ref_spec = ModelSpec("utility", tuple(utility)) if ref_label == "utility" else ModelSpec("base")
    ref = runner.evaluate(ref_spec)
    ref_u = utility_metric(runner, ref, tasks)
    runner.evaluate(ModelSpec("base"))
    points: dict[str, list[dict[str, Any]]] = {}
    comparisons = []
    variants: list[tuple[str, dict[str, Any]]] = [(m, {}) for m in cfg.sweep.methods]
    variants += [("sst", {"k": k}) for k in cfg.sweep.sst_k]
    variants += [("sst", {"fisher": f}) for f in cfg.sweep.sst_fisher if f != cfg.sst["fisher"]]
    for method, kw in variants:
        series = method + "".join(f"[{k}={v}]" for k, v in kw.items())
        for alpha in cfg.sweep.alphas:
            spec = merged_spec(runner, method, utility, safety, alpha, **kw)
            m = runner.evaluate(spec)
            u = utility_metric(runner, m, tasks)
            cmp = compare(ref["refusal"], ref_u, m["refusal"], u, cfg.bootstrap, cfg.seed)
            comparisons.append({"model": spec.label, "reference": ref_label, **cmp})
            points.setdefault(series, []).append(
                {"alpha": alpha, "model": spec.label, "safety": m["refusal"].value, "utility": u.value}
            )
    fronts = {name: pareto_front(pts) for name, pts in points.items()}
    matched = []
    sst_series = [n for n in points if n.startswith("sst")]
    for s_name in sst_series:
        for p in points[s_name]:
            row = {"series": s_name, "model": p["model"], "safety": p["safety"], "sst_utility": p["utility"]}
            for other, pts in points.items():
                if other.startswith("sst"):
                    continue
                at = utility_at_safety(pts, p["safety"])
                row[other] = at["utility"]
            matched.append(row)
    return {
        "reference": ref_label,
        "points": points,
        "pareto_fronts": fronts,
        "utility_at_matched_safety": matched,
        "comparisons": comparisons,
    }
