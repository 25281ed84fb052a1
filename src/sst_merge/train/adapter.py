"""Train a LoRA adapter for a task (a utility task or ``safety``) and cache it (design §9).

The output directory is a standard PEFT adapter plus what a reader needs to trust it::

    adapter_config.json, adapter_model.safetensors   # AutoPeftModelForCausalLM.from_pretrained(DIR)
    README.md                                        # model card: the base, its alias and GGUF provenance
    train_log.csv, loss.png                          # loss per step
    data_split.json                                  # ids of the training items (and the held-out ones)
    train_info.json                                  # resolved settings, seed, time, cache key, versions

Adapters are cached under ``<cache>/adapters/<model>/<task>-s<seed>-<key>`` where the key hashes the model
name, the task, every training setting and the training data, so the demo trains each adapter only once.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sst_merge import __version__
from sst_merge.adapters.lora import peft_quiet
from sst_merge.cache import check_adapter, entry_lock, read_checked
from sst_merge.errors import ConfigError
from sst_merge.eval.judges import get_judge
from sst_merge.eval.judges.base import REFUSING
from sst_merge.io import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir, json_digest
from sst_merge.models import load_model, loadable_base
from sst_merge.models.embedded import cache_dir
from sst_merge.models.tokenize import pad_id
from sst_merge.tasks import UTILITY_TASKS, safety
from sst_merge.tasks.base import GeneratedTask, Item
from sst_merge.train import answers as train_answers
from sst_merge.train.card import record_base
from sst_merge.train.loop import encode_example, train_loop

log = logging.getLogger(__name__)

SAFETY = "safety"

#: Steps and learning rate used when the caller gives none: the settings measured on SmolLM2-135M (batch 8, r=8,
#: q/v; README "The embedded default"). passage_qa and safety were measured at 64 steps, the others at 48; safety
#: at lr 2e-3 (1e-3 left it at 0.83 refusal), the others at 1e-3.
DEFAULT_STEPS = {SAFETY: 64, "passage_qa": 64}
FALLBACK_STEPS = 48
DEFAULT_LR = {SAFETY: 2e-3}
FALLBACK_LR = 1e-3
DEFAULT_RANK = 8
#: joins the parts of a multi-task adapter's name: ``safety+passage_qa``
MULTI_SEP = "+"


@dataclass(frozen=True)
class MultiTask:
    """Several tasks trained into one adapter on the union of their training items (the multi-task upper bound
    merging is compared against, design §3). Its defaults are its parts' summed: rank, steps; lr: the largest."""

    parts: tuple[GeneratedTask | str, ...]

    @property
    def name(self) -> str:
        return MULTI_SEP.join(task_name(p) for p in self.parts)


def task_name(task: GeneratedTask | MultiTask | str) -> str:
    """The name a resolved task is cached and recorded under (``safety`` stays a string)."""
    return SAFETY if task == SAFETY else task.name


class TrainConfig(BaseModel):
    """Every setting that changes the trained adapter (all of it goes into the cache key)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(FALLBACK_STEPS, ge=1)
    seed: int = 0
    rank: int = Field(8, ge=1)
    alpha: float | None = None  # default 2 * rank
    target_modules: list[str] = ["q_proj", "v_proj"]
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(256, ge=8)
    warmup: int = Field(4, ge=0)
    benign_max_new_tokens: int = Field(64, ge=1)  # safety only: length cap of the model's own benign answers
    benign_batch_size: int = Field(32, ge=1)  # safety only: generation batch of those answers
    # safety only: the training data recipe (sst_merge.tasks.safety.SAFETY_DATA)
    safety_data: str = "strongreject"
    # safety only: weight of the preference (DPO) loss; each harmful prompt's rejected response is the base model's
    # own answer, each benign prompt's a refusal (0 = plain supervised training)
    preference_weight: float = Field(0.0, ge=0)
    preference_beta: float = Field(0.1, gt=0)
    # the first head_tokens response tokens weigh head_weight in the cross-entropy (the refuse-or-answer decision)
    head_tokens: int = Field(0, ge=0)
    head_weight: float = Field(1.0, gt=0)

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def key_settings(self) -> dict[str, Any]:
        """The settings that name a cached adapter: every field, except that the safety recipe's fields join only
        when they differ from their defaults (so adapters cached before those fields existed keep their keys)."""
        dump = self.model_dump()
        for name in RECIPE_FIELDS:
            if dump[name] == TrainConfig.model_fields[name].default:
                del dump[name]
        return dump


#: Fields added after adapters were first cached and shipped; at their defaults they leave the cache key unchanged.
RECIPE_FIELDS = ("safety_data", "preference_weight", "preference_beta", "head_tokens", "head_weight")


def _task_names() -> list[str]:
    return [SAFETY, *UTILITY_TASKS.names()]


def resolve_task(task: str | GeneratedTask | MultiTask) -> GeneratedTask | MultiTask | str:
    """Return the task object for a name (``safety`` stays a string; ``A+B+...`` is a :class:`MultiTask`); unknown
    names list the valid ones."""
    if isinstance(task, (GeneratedTask, MultiTask)):
        return task
    if MULTI_SEP in task:
        names = [p.strip() for p in task.split(MULTI_SEP)]
        if len(set(names)) != len(names) or len(names) < 2 or "" in names:
            raise ConfigError(
                f"multi-task {task!r}: name two or more different tasks joined by '+', e.g. safety+passage_qa"
            )
        parts = []
        for part in names:
            try:
                parts.append(resolve_task(part))
            except ConfigError as e:
                raise ConfigError(f"in multi-task {task!r}: {e}") from e
        return MultiTask(tuple(parts))
    if task == SAFETY:
        return SAFETY

    if task not in UTILITY_TASKS:
        names = _task_names()
        close = difflib.get_close_matches(task, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown task {task!r}; choose one of: {', '.join(names)}.{hint}")
    return UTILITY_TASKS.get(task)


def _data_fingerprint(task: GeneratedTask | MultiTask | str, config: TrainConfig) -> str:
    """Hash the training data (cheap: no model needed), so a changed generator never reuses a stale adapter."""
    if isinstance(task, MultiTask):
        return json_digest([_data_fingerprint(p, config) for p in task.parts])
    if task == SAFETY:
        data = safety.safety_data(config.safety_data, config.seed)
        return json_digest([data.harmful, data.benign_prompts])
    return json_digest(task.split(config.seed)["train"])


def _model_key(model_name: str) -> str:
    p = Path(model_name).expanduser()
    return str(p.resolve()) if p.exists() else model_name


def adapter_cache_path(model_name: str, task: str | GeneratedTask | MultiTask, config: TrainConfig) -> Path:
    """Return where the adapter for (model, task, settings, seed) is cached."""
    t = resolve_task(task)
    name = task_name(t)
    key = json_digest([_model_key(model_name), name, config.key_settings(), _data_fingerprint(t, config)])[:12]
    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in _model_key(model_name)).strip("_")
    return cache_dir() / "adapters" / safe_model[-80:] / f"{name}-s{config.seed}-{key}"


def _is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def training_items(
    task: GeneratedTask | MultiTask | str, seed: int, model: Any, tokenizer: Any, model_key: str, config: TrainConfig
) -> tuple[list[Item], dict[str, Any]]:
    """Return the training items and the ids of every split (recorded beside the adapter).

    With a preference loss every safety item also gets ``rejected``: for a harmful prompt the model's own greedy
    answer (pairs whose answer the keyword judge calls a refusal, or empty, are dropped), for a benign one a refusal.
    A :class:`MultiTask` trains on the union of its parts' items, each built exactly as for that part alone; its ids
    are recorded per part (``{"parts": {name: ids}}``).
    """
    if isinstance(task, MultiTask):
        items: list[Item] = []
        parts: dict[str, Any] = {}
        for part in task.parts:
            part_items, parts[task_name(part)] = training_items(part, seed, model, tokenizer, model_key, config)
            items += part_items
        ids = [i["id"] for i in items]
        if len(set(ids)) != len(ids):  # a shared id would make data_split.json ambiguous
            raise ConfigError(f"multi-task {task.name!r}: its parts share item ids; they cannot be trained together")
        return items, {"parts": parts}
    if task == SAFETY:
        data = safety.safety_data(config.safety_data, seed)
        benign = train_answers.benign_items(
            model,
            tokenizer,
            cache_key=model_key,
            max_new_tokens=config.benign_max_new_tokens,
            batch_size=config.benign_batch_size,
            prompts=data.benign_prompts,
        )
        harmful = data.harmful
        if config.preference_weight > 0:
            harmful, benign = _with_rejected(harmful, benign, model, tokenizer, model_key, config)
        items = harmful + benign
        ids = {
            "train_harmful": [i["id"] for i in harmful],
            "train_benign": [i["id"] for i in benign],
            "fisher": [i["id"] for i in data.fisher],
        }
        return items, ids
    split = task.split(seed)
    return split["train"], {"train": [i["id"] for i in split["train"]], "eval": [i["id"] for i in split["eval"]]}


def _with_rejected(
    harmful: list[Item], benign: list[Item], model: Any, tokenizer: Any, model_key: str, config: TrainConfig
) -> tuple[list[Item], list[Item]]:
    """Give each item a rejected response: the model's own answer for harmful prompts, a refusal for benign ones."""
    answers = train_answers.model_answers(
        model,
        tokenizer,
        model_key,
        [i["prompt"] for i in harmful],
        config.benign_max_new_tokens,
        config.benign_batch_size,
        "harmful-answer",
        "harmful",
    )
    judge = get_judge("keyword")
    verdicts = judge.judge([i["prompt"] for i in harmful], [a["response"] for a in answers])
    kept = [
        {**it, "rejected": a["response"], "rejected_complete": a["complete"]}
        for it, a, v in zip(harmful, answers, verdicts, strict=True)
        if v not in REFUSING and v != "empty"
    ]
    if len(kept) < len(harmful):
        log.info(
            "preference pairs: %d of %d harmful prompts dropped (the model already refuses them)",
            len(harmful) - len(kept),
            len(harmful),
        )
    benign = [{**it, "rejected": safety.refusal_for(it["id"], config.seed), "rejected_complete": True} for it in benign]
    return kept, benign


def train_config(
    task: str,
    steps: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    lr: float | None = None,
    **settings: Any,
) -> TrainConfig:
    """Return the resolved settings ``train_adapter`` uses for ``task`` (the per-task defaults where ``None``).

    A multi-task name (``safety+passage_qa``) sums its parts' steps and ranks (64 + 64, 8 + 8) and takes the
    largest of their learning rates (design §3).
    """
    parts = task.split(MULTI_SEP)
    if steps is None:
        steps = sum(DEFAULT_STEPS.get(p, FALLBACK_STEPS) for p in parts)
    if rank is None:
        rank = DEFAULT_RANK * len(parts)
    if lr is None:
        lr = max(DEFAULT_LR.get(p, FALLBACK_LR) for p in parts)
    try:
        return TrainConfig(steps=steps, seed=seed, rank=rank, lr=lr, **settings)
    except Exception as e:  # pydantic's report → one line naming the setting
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            raise ConfigError(f"training setting {'.'.join(map(str, err['loc']))}: {err['msg']}") from e
        raise


def train_adapter(
    model_name: str,
    task: str | GeneratedTask | MultiTask,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    rank: int | None = None,
    lr: float | None = None,
    force: bool = False,
    use_cache: bool = True,
    progress: bool = True,
    **settings: Any,
) -> Path:
    """Train (or fetch from the cache) a LoRA adapter for ``task`` on ``model_name``; return its directory.

    Args:
        model_name: an alias (``smollm2-135m``), a local model directory or a hub id.
        task: ``"safety"`` or a registered utility task name (or a :class:`GeneratedTask`); ``"A+B"`` trains one
            adapter on the union of both tasks' training items (:class:`MultiTask`).
        out_dir: where to write the adapter; ``None`` writes into the cache and returns the cached path.
        steps: optimiser steps (default per task: :data:`DEFAULT_STEPS`, else :data:`FALLBACK_STEPS`).
        seed: seeds the data split, the LoRA initialisation and the batch order (same seed → same adapter).
        rank, lr: LoRA rank (default :data:`DEFAULT_RANK`, a multi-task adapter's the sum of its parts') and
            learning rate (default per task: :data:`DEFAULT_LR`, else :data:`FALLBACK_LR`; see :func:`train_config`);
            ``settings`` holds the other :class:`TrainConfig` fields.
        force: overwrite an existing ``out_dir``.
        use_cache: reuse a cached adapter with the same (model, task, settings, seed, data).
        progress: show a tqdm bar.
    """
    t = resolve_task(task)
    name = task_name(t)
    config = train_config(name, steps=steps, seed=seed, rank=rank, lr=lr, **settings)
    if out_dir is not None:
        check_output_dir(out_dir, force)  # before any heavy work
    cached = adapter_cache_path(model_name, t, config)
    with entry_lock(cached):  # a second identical train waits, then reads the first one's adapter
        if use_cache and read_checked(cached, check_adapter) is not None:  # a damaged one is moved aside, retrained
            log.info("using cached adapter %s", cached)
            record_base(cached, model_name, name)  # an entry from before adapters recorded a loadable base
            if out_dir is None:
                return cached
            with atomic_output_dir(out_dir, force=force) as tmp:
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
            return Path(out_dir)

        target = Path(out_dir) if out_dir is not None else cached
        with atomic_output_dir(target, force=force or out_dir is None) as tmp:
            _train_into(tmp, model_name, t, name, config, progress)
        if out_dir is not None and use_cache:
            with atomic_output_dir(cached, force=True) as tmp:
                shutil.copytree(target, tmp, dirs_exist_ok=True)
        return target


def _train_into(
    tmp: Path, model_name: str, task: GeneratedTask | MultiTask | str, name: str, config: TrainConfig, progress: bool
) -> None:
    # deferred: peft (seconds to import); only training needs it
    from peft import LoraConfig, get_peft_model

    device_map = "auto" if torch.cuda.is_available() else None
    model, tok = load_model(model_name, device_map=device_map)
    items, split_ids = training_items(task, config.seed, model, tok, _model_key(model_name), config)
    examples = [encode_example(tok, it, config.max_length) for it in items]
    rejected = None
    if config.preference_weight > 0:
        rejected = [
            encode_example(
                tok,
                {
                    "id": it["id"],
                    "prompt": it["prompt"],
                    "response": it["rejected"],
                    "complete": it["rejected_complete"],
                },
                config.max_length,
            )
            for it in items
        ]
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        target_modules=config.target_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    log.info(
        "training %s adapter on %s: %d examples, %d steps, r=%d",
        name,
        model_name,
        len(examples),
        config.steps,
        config.rank,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.random.fork_rng(devices=[]), peft_quiet():
        torch.manual_seed(config.seed)  # LoRA A is initialised from the global RNG
        peft_model = get_peft_model(model, lora)
        losses = train_loop(
            peft_model,
            examples,
            pad_id(tok),
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            warmup=config.warmup,
            seed=config.seed,
            progress=progress,
            rejected=rejected,
            preference_weight=config.preference_weight,
            preference_beta=config.preference_beta,
            head_tokens=config.head_tokens,
            head_weight=config.head_weight,
        )
    seconds = time.perf_counter() - start
    # CPU seconds of this process (all threads): comparable across runs on a shared, oversubscribed machine
    cpu_seconds = time.process_time() - cpu_start
    # the base that loads here (not the alias), so plain PEFT opens the adapter; the vocabulary was not resized, so
    # no embedding layer is saved (and PEFT does not look the base up on the hub to find out)
    peft_model.peft_config["default"].base_model_name_or_path = loadable_base(model_name)
    peft_model.save_pretrained(tmp, save_embedding_layers=False)
    base = record_base(tmp, model_name, name)  # the model card, with the alias and the GGUF provenance
    write_loss_log(tmp, losses)
    atomic_write_json(tmp / "data_split.json", {"task": name, "seed": config.seed, **split_ids})
    # deferred: peft (seconds to import); only training needs it
    import peft
    import transformers

    atomic_write_json(
        tmp / "train_info.json",
        {
            "model": model_name,
            "base": base,
            "task": name,
            "config": config.model_dump(),
            "lora_alpha": config.lora_alpha,
            "n_train_examples": len(examples),
            "train_seconds": round(seconds, 2),
            "seconds_per_step": round(seconds / config.steps, 3),
            "cpu_seconds": round(cpu_seconds, 2),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "device": str(next(peft_model.parameters()).device),
            "torch_threads": torch.get_num_threads(),
            "versions": {
                "sst_merge": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
        },
    )
    log.info("trained %s in %.1f s (loss %.3f → %.3f)", name, seconds, losses[0], losses[-1])


def write_loss_log(out: Path, losses: list[float]) -> None:
    """Write ``train_log.csv`` (step, loss) and ``loss.png`` (drawn from those numbers only)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["step", "loss"])
    for i, loss in enumerate(losses, 1):
        w.writerow([i, f"{loss:.6f}"])
    atomic_write_text(out / "train_log.csv", buf.getvalue())

    # deferred: matplotlib, for the loss plot only
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("response-token loss")
    ax.set_title("LoRA training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
