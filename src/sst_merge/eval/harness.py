"""The evaluation harness: one call evaluates a model on a list of tasks, the same way for every model.

* :func:`evaluate` takes a loaded model and tokenizer. It never changes the model's weights; it switches to eval
  mode for the run and restores the previous mode afterwards.
* :func:`evaluate_model` loads a *fresh* model for every call (adapters attached to that fresh copy), so evaluating
  base, base + adapter, then base again gives the first result again — the earlier research code wrapped one
  shared model with ``get_peft_model`` and evaluated the mutated model as "before".
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sst_merge import distributed as ddp
from sst_merge.adapters.lora import peft_quiet
from sst_merge.errors import AdapterError, ConfigError
from sst_merge.eval.base import EvalContext, EvalSettings, Evaluator, get_evaluator
from sst_merge.eval.judges import get_judge
from sst_merge.io import atomic_write_text
from sst_merge.models import load_model

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("refusal", "over_refusal", "mmlu")


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    settings: EvalSettings | None = None,
    *,
    limit: int | None = None,
    records_path: str | Path | None = None,
    show_progress: bool = True,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``tasks`` and return ``{"tasks": {name: result}, "settings": {...}}``.

    Args:
        model: a Hugging Face causal LM (optionally PEFT-wrapped).
        tokenizer: its tokenizer.
        tasks: task specs — ``refusal``, ``over_refusal``, ``mmlu``, ``mmlu_cloze``, ``task:NAME`` (see
            :data:`sst_merge.eval.TASKS`).
        settings: batch size, generation budget and judge (default: :class:`~sst_merge.eval.base.EvalSettings`'s).
        limit: at most this many items per task (deterministic: the first, or spread over MMLU subjects).
        records_path: if given, every per-item record is written there as JSONL (one line per item, with ``task``).
        show_progress: progress bars.
        data: per-task data overriding the default source: ``{task: source name | path | list of items}``.

    Each task result holds ``metrics`` (value, n, 95% interval), ``primary`` (the headline metric), ``n`` and
    ``records`` (per item: id, prompt, response or scores, verdict, ``score``).

    Raises:
        ConfigError: unknown task or judge. DataError: missing or empty data — both before any model work.
    """
    settings = settings or EvalSettings()
    evaluators, items = prepare(tasks, data, limit)
    return _run(model, tokenizer, evaluators, items, settings, data or {}, limit, records_path, show_progress)


def prepare(tasks, data, limit):
    """Check the arguments, build the evaluators and load their items — everything that can fail before the model."""
    if not tasks:
        raise ConfigError("no tasks given; choose from refusal, over_refusal, mmlu, mmlu_cloze, task:NAME")
    data = data or {}
    evaluators = [get_evaluator(t) for t in tasks]
    unknown = set(data) - {e.task_name for e in evaluators}
    if unknown:
        raise ConfigError(f"data given for task(s) not being evaluated: {', '.join(sorted(unknown))}")
    items = {e.task_name: e.load_items(data.get(e.task_name), limit) for e in evaluators}
    return evaluators, items


def _run(model, tokenizer, evaluators, items, settings: EvalSettings, data, limit, records_path, show_progress):
    judge_obj = get_judge(settings.judge) if any(e.needs_judge for e in evaluators) else None
    context = EvalContext.of(settings, judge_obj, show_progress and ddp.is_main())
    was_training = model.training
    model.eval()
    results: dict[str, Any] = {}
    try:
        for ev in evaluators:
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = _score(ev, model, tokenizer, items[ev.task_name], context)
            res["seconds"] = time.perf_counter() - t0
            res["source"] = _describe_source(ev, data.get(ev.task_name))
            results[ev.task_name] = res
            primary = res["metrics"][res["primary"]]
            log.info(
                "%s: %s = %.4f (n=%d, 95%% CI %s) in %.1f s",
                ev.task_name,
                res["primary"],
                primary["value"],
                primary["n"],
                _fmt_ci(primary.get("ci95")),
                res["seconds"],
            )
    finally:
        model.train(was_training)
    out = {
        "tasks": results,
        "settings": {
            "tasks": [e.task_name for e in evaluators],
            "limit": limit,
            "judge": judge_obj.name if judge_obj else None,
            "batch_size": settings.batch_size,
            "max_new_tokens": settings.max_new_tokens,
            "decoding": "greedy",
            "decoder": settings.decode,
        },
    }
    if records_path is not None and ddp.is_main():  # every rank holds the full records; one writes them
        write_records(records_path, out)
    return out


def _score(ev, model, tokenizer, items: list[dict[str, Any]], settings: EvalContext) -> dict[str, Any]:
    """Run one evaluator on ``items``; under ``torch.distributed`` each rank scores its round-robin shard.

    The shards' records are gathered on every rank and re-interleaved into the single-process order, and the
    metrics are recomputed from the full record list by the evaluator's own ``summarise`` (the method its ``run``
    uses), so every rank returns the single-process result. An evaluator that does not override
    :meth:`~sst_merge.eval.base.Evaluator.summarise` is run whole on every rank (correct, not faster).
    """
    if not ddp.active():
        return ev.run(model, tokenizer, items, settings)
    tag = f"eval:{ev.task_name}"
    summarise = ev.summarise if type(ev).summarise is not Evaluator.summarise else None
    if summarise is None:
        log.warning(
            "%s: no summarise(records) for sharded evaluation; every rank evaluates all %d items", tag, len(items)
        )
        box: list[dict[str, Any]] = []
        ddp.gather_checked(tag, lambda: box.append(ev.run(model, tokenizer, items, settings)))
        return box[0]
    mine = ddp.shard(items)
    parts = ddp.gather_checked(tag, lambda: ev.run(model, tokenizer, mine, settings) if mine else None)
    records = ddp.unshard([p["records"] if p else [] for p in parts], len(items))
    template = next(p for p in parts if p)  # the task's fixed fields (task, primary, judge, metric kind)
    return {**template, **summarise(records), "n": len(records), "records": records}


def _fmt_ci(ci) -> str:
    return "n/a" if not ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _describe_source(ev, data) -> str:
    if isinstance(data, list):
        return f"{len(data)} items given in code"
    return str(data or ev.default_source or ev.arg)


def write_records(path: str | Path, result: dict[str, Any]) -> None:
    """Write every task's per-item records as one JSONL file (atomically)."""
    lines = []
    for name, res in result["tasks"].items():
        for r in res["records"]:
            lines.append(json.dumps({"task": name, **r}, ensure_ascii=False, allow_nan=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def strip_records(result: dict[str, Any]) -> dict[str, Any]:
    """A copy of an :func:`evaluate` result without the per-item records (for the summary JSON)."""
    return {
        **result,
        "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "records"} for k, v in result["tasks"].items()},
    }


def load_with_adapters(
    model_name_or_path: str,
    adapters: list[str] | tuple[str, ...] = (),
    *,
    dtype: str = "float32",
    merge_adapters: bool = True,
    device_map: str | None = None,
):
    """Load a fresh base model and tokenizer and apply ``adapters`` to *this* copy only.

    With one adapter and ``merge_adapters=False`` the PEFT model is returned unmerged; otherwise each adapter is
    merged in turn (``merge_and_unload``), so several adapters add up (task arithmetic with weight 1).
    """
    for a in adapters:
        p = Path(a)
        if not (p / "adapter_config.json").is_file():
            raise AdapterError(f"adapter {a}: no adapter_config.json there; pass a PEFT LoRA adapter directory")
    model, tok = load_model(model_name_or_path, dtype=dtype, device_map=device_map)
    if adapters:
        # deferred: peft (seconds to import); only an adapter evaluation needs it
        from peft import PeftModel

        with peft_quiet():
            if len(adapters) == 1 and not merge_adapters:
                model = PeftModel.from_pretrained(model, str(adapters[0]), is_trainable=False)
            else:
                for a in adapters:
                    model = PeftModel.from_pretrained(model, str(a), is_trainable=False).merge_and_unload()
        model.eval()
    return model, tok


def evaluate_model(
    model_name_or_path: str,
    adapters: list[str] | tuple[str, ...] = (),
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    settings: EvalSettings | None = None,
    *,
    limit: int | None = None,
    records_path: str | Path | None = None,
    show_progress: bool = True,
    data: dict[str, Any] | None = None,
    dtype: str = "float32",
    merge_adapters: bool = True,
    device_map: str | None = None,
) -> dict[str, Any]:
    """Load a fresh model (plus ``adapters``), evaluate it with :func:`evaluate`, and free it.

    The evaluation arguments are :func:`evaluate`'s. The result gains a ``model`` entry naming the base model and
    adapters.
    """
    # Resolve tasks and load their items before the (slow) model load: bad names or data fail fast.
    settings = settings or EvalSettings()
    evaluators, items = prepare(list(tasks), data, limit)
    model, tok = load_with_adapters(
        model_name_or_path, adapters, dtype=dtype, merge_adapters=merge_adapters, device_map=device_map
    )
    try:
        result = _run(model, tok, evaluators, items, settings, data or {}, limit, records_path, show_progress)
    finally:
        del model
        gc.collect()
    result["model"] = {"base": model_name_or_path, "adapters": [str(a) for a in adapters], "dtype": dtype}
    return result
