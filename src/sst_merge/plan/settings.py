"""What a plan depends on besides the model — :class:`Settings` — and how the project's configs give it: a merge
config (:func:`merge_settings`) or a resolved experiment config (:func:`experiment_settings`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sst_merge.config import apply_overrides, validate
from sst_merge.errors import ConfigError
from sst_merge.experiments.config import resolve_config
from sst_merge.merge import MergeMethod, get_method
from sst_merge.merge.api import MergeConfig
from sst_merge.merge.sst import SSTParams
from sst_merge.train.adapter import TrainConfig


@dataclass
class OwnPass:
    """``fisher_merge`` / ``regmean``: one statistics pass per adapter with a non-zero weight, on its own data."""

    method: str
    fisher: str  # diagonal (fisher_merge) or kfac (regmean: its A factor; the pass computes both factors)
    passes: int  # adapters with a non-zero weight
    n_samples: int = 64
    batch: int = 8
    length: int = 256
    new_tokens: int = 64  # greedy answer length for items without a response


@dataclass
class LearnedFit:
    """``learned``: Adam steps, each one forward + backward per weighted term on ``batch`` examples."""

    steps: int = 24
    batch: int = 4
    length: int = 256
    terms: int = 3  # harmful, benign, task (those with a non-zero weight)
    benign: int = 0  # benign prompts the reference model answers greedily first (0: benign weight 0)
    tokens: int = 8  # loss_tokens: the length of a reference answer


@dataclass
class Settings:
    """What the estimate depends on besides the model (experiment and merge settings)."""

    dtype: str = "float32"
    device_map: str | None = None
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_rank: int = 8
    n_adapters: int = 2
    fisher: str = "lowrank"
    n_samples: int = 32
    fisher_batch: int = 8
    fisher_length: int = 256
    eval_batch: int = 8
    prompt_tokens: int = 128
    new_tokens: int = 64
    train_batch: int = 8
    train_length: int = 256
    output: str | None = None  # "peft" / "full" for a merge; None for an experiment (no output written)
    sst: bool = True
    train: bool = False  # an experiment whose adapters are not given trains them first
    ties: bool = False  # a TIES merge (trim + sign election) is among the merges: the merge step costs its law
    objectives: int = 2  # SST's Fisher passes: F_s and F_u (space: input — harmful, benign and utility inputs: 3)
    own: list[OwnPass] = field(default_factory=list)  # fisher_merge / regmean among the merges
    learned: LearnedFit | None = None  # learned among the merges


# -- settings from the project's configs -------------------------------------------------------------------------


def _adapter_settings(paths: list[str]) -> dict[str, Any]:
    targets: list[str] = []
    rank = 0
    for path in paths:
        cfg_path = Path(path) / "adapter_config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"adapter {path}: no adapter_config.json; pass a PEFT LoRA adapter directory")
        cfg = json.loads(cfg_path.read_text())
        mods = cfg.get("target_modules") or []
        targets += [m.rsplit(".", 1)[-1] for m in ([mods] if isinstance(mods, str) else mods)]
        rank = max(rank, int(cfg.get("r", 8)))
    return {"targets": sorted(set(targets)) or ["q_proj", "v_proj"], "lora_rank": rank or 8}


def settings_from_config(data: dict[str, Any], overrides: list[str] | None = None) -> tuple[str, Settings]:
    """Return ``(model, Settings)`` from a merge config (``base_model`` + ``method``) or an experiment config."""
    if "base_model" in data:
        return merge_settings(validate(MergeConfig, apply_overrides(dict(data), overrides), source="merge config"))
    return experiment_settings(resolve_config(data.get("mode", "minimal"), data, overrides))


def merge_settings(cfg: Any) -> tuple[str, Settings]:
    """Return ``(base model, Settings)`` of a validated ``MergeConfig``."""
    method = get_method(cfg.method)
    s = Settings(
        n_adapters=len(cfg.adapters),
        output=cfg.output.format,
        sst=method.sst_fisher_pass,
        ties=method.trims,
        **_adapter_settings([a.path for a in cfg.adapters]),
    )
    if method.sst_fisher_pass:
        sp = validate(method.Params, dict(cfg.params), source="merge config params")
        s.sst = True
        s.fisher, s.n_samples, s.fisher_batch, s.fisher_length = (sp.fisher, sp.n_samples, sp.batch_size, sp.max_length)
        s.new_tokens, s.objectives = sp.max_new_tokens, _objectives(sp)
    passes = sum(a.weight != 0 for a in cfg.adapters)
    s.own, s.learned = _data_aware(cfg.method, dict(cfg.params), passes)
    return cfg.base_model, s


def _objectives(sp: Any) -> int:
    """SST's Fisher passes: F_s and F_u; ``space: input`` — the kfac pass over harmful, benign and utility inputs."""
    return 3 if sp.space == "input" else 2


def _data_aware(method: str, raw: dict[str, Any], passes: int) -> tuple[list[OwnPass], LearnedFit | None]:
    """The statistics passes of a data-aware merge (its class's ``own_statistic``) or the fit of one that learns
    coefficients (its ``fit_plan``); none for another method. The laws live in the method's own file."""
    m = get_method(method)
    if m.own_statistic is None and type(m).fit_plan is MergeMethod.fit_plan:
        return [], None
    p = validate(m.Params, raw, source=f"params of {method}")
    if m.own_statistic is not None:
        return [
            OwnPass(method, m.own_statistic, passes, p.n_samples, p.batch_size, p.max_length, p.max_new_tokens)
        ], None
    return [], LearnedFit(**m.fit_plan(p))


def experiment_settings(cfg: Any) -> tuple[str, Settings]:
    """Return ``(model, Settings)`` of a resolved ``ExperimentConfig``."""
    sp = SSTParams.model_validate(cfg.sst)
    paths = [p for p in [cfg.adapters.safety, *cfg.adapters.utility.values()] if p]
    train = TrainConfig()
    adapter = _adapter_settings(paths) if paths else {"targets": train.target_modules, "lora_rank": train.rank}
    s = Settings(
        dtype=cfg.dtype,
        device_map=cfg.device_map,
        fisher=sp.fisher,
        n_samples=sp.n_samples,
        fisher_batch=sp.batch_size,
        fisher_length=sp.max_length,
        eval_batch=cfg.eval.batch_size,
        new_tokens=cfg.eval.max_new_tokens,
        n_adapters=1 + max(1, len(cfg.utility_tasks)),
        train_batch=train.batch_size,
        train_length=train.max_length,
        train=not cfg.adapters.safety
        or not all(cfg.adapters.utility.get(t) for t in cfg.utility_tasks)
        or ("multitask" in cfg.ceilings and not cfg.adapters.multitask),
        ties=any(get_method(m).trims for m in cfg.sweep.methods),
        objectives=_objectives(sp),
        **adapter,
    )
    for method in cfg.sweep.methods:
        own, learned = _data_aware(method, cfg.method_params(method), s.n_adapters)
        s.own += own
        s.learned = learned or s.learned
    return cfg.model, s
