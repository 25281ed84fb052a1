"""The ceiling rows every merge is compared against (design §8), switched on by ``ceilings`` in the config.

* ``multitask`` — one LoRA trained on the safety adapter's and the utility adapters' data together
  (``sst-merge train --task safety+TASK``, design §3), evaluated like any model: the upper bound merging papers
  report.
* ``routing`` — the routing oracle: every prompt answered by the adapter that owns it — the safety adapter on the
  harmful and benign prompts (and the phrasing forms), the utility adapters on everything else: their task items
  and, when evaluated, MMLU (general knowledge, which neither adapter was trained on; it goes with the model that
  answers non-safety prompts). Nothing is generated: its metrics and records are the two models' (a routed
  :class:`~sst_merge.experiments.specs.ModelSpec`), so it pairs with every model by item id, and its balanced score,
  drift and degenerate rates follow from them. It is what a merge would reach if merging cost neither adapter
  anything: the safety adapter's separation of harmful from benign at the utility adapters' task accuracy. A static
  merge answers every prompt with one model, so it reaches this only if the two updates do not interfere (it is a
  reference point, not a proven bound: a merge could in principle separate better than the safety adapter alone).

exp3's *gap closed* (:func:`~sst_merge.experiments.experiments.gap_closed_of`) reads a merge against the
multi-task bound: the share of the way from task arithmetic at α = 1 to the bound that the merge covers.
"""

from __future__ import annotations

from sst_merge.experiments import adapters as adapter_paths
from sst_merge.experiments.behaviour import utility_spec
from sst_merge.experiments.evaluation import evaluation_plan
from sst_merge.experiments.runner import AdapterRef, ModelSpec, Runner

#: measurements the safety adapter owns in the routing oracle; every other one goes to the utility adapters
SAFETY_OWNED = frozenset({"refusal", "over_refusal", "phrasing"})
MULTITASK = "multitask"
ROUTING = "routing"


def multitask_spec(runner: Runner) -> ModelSpec:
    """The multi-task adapter (safety + the run's utility tasks in one LoRA), at weight 1."""
    path = adapter_paths.multitask_adapter(runner.cfg, runner.cfg.utility_tasks)
    return ModelSpec(MULTITASK, (AdapterRef(path, 1.0, "multitask"),))


def routing_spec(runner: Runner, safety: ModelSpec, utility: ModelSpec) -> ModelSpec:
    """The routing oracle over the evaluated ``safety`` and ``utility`` models (see the module docstring)."""
    routes = tuple(
        (task, safety.label if task.split(":")[0] in SAFETY_OWNED else utility.label)
        for task, _, _ in evaluation_plan(runner.cfg, runner.tasks)
    )
    return ModelSpec(ROUTING, safety.adapters + utility.adapters, routes=routes)


def ceiling_specs(runner: Runner, safety_path: str) -> list[ModelSpec]:
    """The configured ceiling rows' models, in config order; the multi-task adapter is found or trained here, so an
    experiment does it before its evaluations rather than after them. ``routing`` stands for its two sources (the
    safety adapter, the utility adapters alone): :func:`add_ceilings` evaluates them and composes the oracle."""
    specs = []
    for kind in runner.cfg.ceilings:
        if kind == MULTITASK:
            specs.append(multitask_spec(runner))
        else:
            specs += [ModelSpec("safety", (AdapterRef(safety_path, 1.0, "safety"),)), utility_spec(runner)]
    return specs


def add_ceilings(runner: Runner, specs: list[ModelSpec]) -> list[str]:
    """Evaluate :func:`ceiling_specs`' models (each once; the run may have evaluated some already) and compose the
    routing oracle from its two; return the ceiling rows' labels in config order."""
    for spec in specs:
        runner.evaluate(spec)
    labels = []
    for kind in runner.cfg.ceilings:
        if kind == MULTITASK:
            labels.append(MULTITASK)
        else:
            by_label = {s.label: s for s in specs}
            spec = routing_spec(runner, by_label["safety"], by_label["utility"])
            runner.route(spec)
            labels.append(spec.label)
    return labels
