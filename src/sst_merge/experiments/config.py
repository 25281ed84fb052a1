"""Experiment configuration: mode presets → YAML → dotted overrides → a validated model.

``minimal`` is sized for a laptop CPU (the demo); ``full`` evaluates every held-out item and sweeps more points.
Every resolved value is stored with the results.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sst_merge.config import DEVICE_MAP_PATTERN, apply_overrides, validate
from sst_merge.errors import ConfigError
from sst_merge.eval.base import EvalSettings
from sst_merge.fisher.settings import flatten as flatten_settings
from sst_merge.merge import MERGE_METHODS
from sst_merge.merge.sst import SELECTIONS, SSTParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExperimentEvalSettings(EvalSettings):
    """What every model in an experiment is evaluated on; one harness, the same items and settings for all.

    Batch size, generation budget and judge (and their defaults) are the harness's :class:`EvalSettings`.
    """

    harmful_source: str = Field("harmbench", description="held-out harmful prompts (refusal rate)")
    benign_source: str = Field("benign", description="benign prompts incl. safe look-alikes (over-refusal)")
    refusal_limit: int | None = Field(None, ge=1, description="first N harmful prompts (None: all)")
    over_refusal_limit: int | None = Field(None, ge=1)
    task_limit: int | None = Field(None, ge=1, description="held-out items per utility task")
    mmlu_limit: int | None = Field(None, ge=0, description="MMLU questions (0 disables MMLU)")
    mmlu_source: str = "mmlu"
    task_data: dict[str, str] = Field(
        default_factory=dict, description="task name → local file of eval items (default: the task's generated split)"
    )
    phrasing: bool = Field(
        False,
        description="also evaluate every model on the phrasing prompts (the same requests as a question, an "
        "imperative, a polite request, a role-play and a fragment; eval/phrasing.py): refusal and over-refusal per "
        "form; the dev split's prompts under split=dev; task_data.phrasing names a local file instead",
    )
    split: Literal["test", "dev"] = Field(
        "test",
        description="test: the evaluation sets; dev: the development sets for choosing hyper-parameters — HarmBench "
        "val (harmbench_val), the benign dev prompts (benign_dev) and each utility task's dev items",
    )

    def harness_settings(self) -> EvalSettings:
        """The harness's part of these settings."""
        return EvalSettings(**{name: getattr(self, name) for name in EvalSettings.model_fields})

    @model_validator(mode="after")
    def _dev_sets_are_fixed(self) -> ExperimentEvalSettings:
        if self.split == "dev":
            fields = type(self).model_fields
            custom = [n for n in ("harmful_source", "benign_source") if getattr(self, n) != fields[n].default]
            custom += ["task_data"] if self.task_data else []
            if custom:
                raise ValueError(
                    f"eval.split=dev chooses its own development sets; remove eval.{', eval.'.join(custom)} "
                    "or use eval.split=test"
                )
        return self


#: Defaults of the ``sst`` method inside experiments (design §5); Fisher data default to the embedded splits.
#: ``share: 0.25`` was chosen on the development split by a rule written before its numbers (docs/results/ceiling:
#: at α = 2, share 0.1 / 0.25 / 0.5 refused 0.951 / 0.927 / 0.707 of HarmBench val and over-refused 0.917 / 0.817 /
#: 0.850 of the benign dev prompts, task 0.980 / 0.970 / 0.970: the lowest over-refusal at refusal ≥ 0.85).
SST_DEFAULTS: dict[str, Any] = {"alpha": 1.0, "fisher": "lowrank", "share": 0.25, "n_samples": 32}


class SweepSettings(_Strict):
    """exp3's sweep: the safety weight α for every method, plus SST's own axes."""

    methods: list[str] = ["sst", "task_arithmetic", "ties", "dare_linear", "linear"]
    alphas: list[float] = [0.25, 0.5, 1.0]
    alphas_by_method: dict[str, list[float]] = Field(
        default_factory=dict,
        description="a method's own safety weights, e.g. {regmean: [1, 3, 6, 12]}; the others sweep `alphas` "
        "(sst's apply to its variants too)",
    )
    density: float = Field(0.5, gt=0, le=1, description="density for ties / dare")
    sst_k: list[int] = []
    sst_fisher: list[str] = []
    sst_params: list[dict[str, Any]] = Field(
        default_factory=list,
        description="SST variants, each swept over α as its own series: a dict of sst parameters overriding `sst` "
        "(e.g. {name: contrastive, fisher_objective: contrastive}); the optional `name` labels the series",
    )

    @field_validator("sst_params")
    @classmethod
    def _flat_variants(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [flatten_settings(variant) for variant in v]  # keyed, labelled and recorded flat, as `sst`


class AdapterSettings(_Strict):
    """Adapters used by the experiment. Empty paths are trained with ``sst-merge train`` (cached)."""

    safety: str | None = None
    utility: dict[str, str | None] = {}
    #: the multi-task adapter of the ``multitask`` ceiling (safety + the utility tasks' data in one LoRA); empty:
    #: trained on first use (``sst-merge train --task safety+TASK``, cached)
    multitask: str | None = None
    train_steps: int | None = None
    #: use the adapters that ship with the project when they equal what training would give (``sst-merge demo
    #: --retrain`` sets false: train, or reuse the cache, as ``sst-merge train`` does)
    shipped: bool = True


class ExperimentConfig(_Strict):
    experiment: Literal["exp1", "exp2", "exp3", "all"] = "exp1"
    model: str = "smollm2-135m"
    mode: Literal["minimal", "full"] = "minimal"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = Field(
        None,
        pattern=rf"^(?:{DEVICE_MAP_PATTERN})$",
        description="auto: spread the model over the GPUs (model parallel); cpu / cuda:N: that device; default: the "
        "GPU when CUDA is present (one per torchrun rank), else the CPU",
    )
    seed: int = 0
    reference: Literal["utility", "base"] = "utility"
    utility_metric: Literal["task", "mmlu"] = "task"
    utility_tasks: list[str] = Field(default_factory=lambda: ["passage_qa"])
    exp2_ks: list[int] = Field(default_factory=lambda: [2, 4])
    exp2_tasks: list[str] | None = Field(None, description="utility tasks for exp2 (default: every registered task)")
    adapters: AdapterSettings = AdapterSettings()
    eval: ExperimentEvalSettings = ExperimentEvalSettings()
    sst: dict[str, Any] = Field(
        default_factory=lambda: dict(SST_DEFAULTS),
        description="parameters of the sst merge method (validated by its Params); alpha is swept in exp3",
    )
    methods: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="parameters of the other merge methods, per method, validated by each one's Params (e.g. "
        "{regmean: {reduce_non_diagonal: 0.9}}); the run adds its seed, sweep.density where the method takes a "
        "density and none is given, and the embedded Fisher data where it takes Fisher data and none is named",
    )
    sweep: SweepSettings = SweepSettings()
    ceilings: list[Literal["multitask", "routing"]] = Field(
        default_factory=list,
        description="upper-bound rows of exp1 and exp3 (design §8): multitask — one LoRA trained on the safety and "
        "utility data together (trained on first use); routing — each prompt answered by the adapter that owns it, "
        "composed from the safety and utility models' evaluations (no generation)",
    )
    bootstrap: int = Field(1000, ge=0, description="paired-bootstrap resamples for intervals")
    cache_dir: str | None = Field(None, description="evaluation cache shared across runs (default: RUN_DIR/cache)")

    def method_params(self, method: str) -> dict[str, Any]:
        """The configured parameters of a merge method: the ``sst`` section for sst, ``methods[method]`` for the
        others (empty when not given)."""
        return dict(self.sst) if method == "sst" else dict(self.methods.get(method, {}))

    @field_validator("methods")
    @classmethod
    def _valid_methods(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:

        v = {name: flatten_settings(params) for name, params in v.items()}  # keyed and recorded flat, as sst's
        for name, params in v.items():
            if name == "sst":
                raise ValueError("methods.sst: SST's parameters live in the `sst` section; move them there")
            try:
                method = MERGE_METHODS.get(name)
            except ConfigError as e:  # pydantic reports ValueErrors only
                raise ValueError(f"methods.{name}: {e}") from e
            problems = params_problems(method.Params, params)
            if problems:
                raise ValueError(f"methods.{name}: " + "; ".join(problems))
        return v

    @field_validator("sst")
    @classmethod
    def _valid_sst(cls, v: dict[str, Any]) -> dict[str, Any]:
        v = flatten_settings(v)  # `estimation: {n_samples: 16}` is `n_samples: 16`: keyed and recorded flat
        merged = with_selection(SST_DEFAULTS, v)  # the user's selection replaces the default's
        SSTParams.model_validate(merged)  # raises ValueError naming the bad key; wrapped by validate()
        return merged

    @model_validator(mode="after")
    def _alphas_of_swept_methods(self) -> ExperimentConfig:
        for name, alphas in self.sweep.alphas_by_method.items():
            if name not in self.sweep.methods:
                raise ValueError(
                    f"sweep.alphas_by_method.{name}: {name} is not swept; add it to sweep.methods "
                    f"({', '.join(self.sweep.methods)}) or remove its alphas"
                )
            if not alphas:
                raise ValueError(f"sweep.alphas_by_method.{name}: give at least one safety weight")
        return self

    @model_validator(mode="after")
    def _valid_sst_variants(self) -> ExperimentConfig:
        names = set()
        for i, variant in enumerate(self.sweep.sst_params):
            params = sst_variant_params(self.sst, variant)
            try:
                SSTParams.model_validate(params)
            except ValueError as e:  # pydantic's ValidationError is a ValueError
                raise ValueError(f"sweep.sst_params[{i}] is not a valid sst variant: {e}") from e
            name = variant_name(variant)
            if name in names:
                raise ValueError(f"sweep.sst_params[{i}]: two variants are named {name!r}; give each its own name")
            names.add(name)
        return self


def alphas_of(sweep: SweepSettings, method: str) -> list[float]:
    """The safety weights ``method`` is swept over: ``sweep.alphas_by_method[method]``, else ``sweep.alphas``."""
    return list(sweep.alphas_by_method.get(method, sweep.alphas))


def params_problems(params_model: type[BaseModel], params: dict[str, Any]) -> list[str]:
    """What is wrong with a (partial) parameter block for ``params_model``: unknown keys (with the valid ones) and
    bad values. Missing required fields are not problems here: the run fills some (density, Fisher data) later."""
    try:
        params_model.model_validate(params)
    except ValidationError as e:
        valid = sorted(f.alias or n for n, f in params_model.model_fields.items())
        out = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                out.append(f"unknown key {key!r}; valid keys: {', '.join(valid)}")
            elif err["type"] != "missing":
                out.append(f"{key}: {err['msg']}")
        return out
    return []


def with_selection(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` sst parameters updated by ``override``, whose selection key (k, fraction, ...) replaces the base's."""
    p = {k: v for k, v in base.items() if not (k in SELECTIONS and any(s in override for s in SELECTIONS))}
    return {**p, **override}


def sst_variant_params(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` sst parameters with a variant's ``override`` (its ``name`` labels the series, not a parameter)."""
    return with_selection(base, {k: v for k, v in override.items() if k != "name"})


def variant_name(variant: dict[str, Any]) -> str:
    """A variant's series label: its ``name``, or its parameters as ``k=v`` pairs."""
    if variant.get("name"):
        return str(variant["name"])
    return ",".join(f"{k}={v}" for k, v in variant.items() if k != "name")


PRESETS: dict[str, dict[str, Any]] = {
    "minimal": {
        "eval": {
            "refusal_limit": 40,
            "over_refusal_limit": 40,
            "task_limit": 60,
            "mmlu_limit": 0,
            "max_new_tokens": 32,
        },
        "sst": {"n_samples": 16},
        "sweep": {"alphas": [0.5, 1.0], "methods": ["sst", "task_arithmetic", "ties"]},
        "exp2_ks": [2],
        "bootstrap": 500,
    },
    "full": {
        "eval": {"mmlu_limit": 500, "max_new_tokens": 64},
        "sst": {"n_samples": 64},
        "sweep": {"alphas": [0.25, 0.5, 0.75, 1.0, 1.5], "sst_k": [], "sst_fisher": ["diagonal", "lowrank"]},
        "ceilings": ["multitask", "routing"],
        "bootstrap": 1000,
    },
}


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def _flat_settings(data: dict[str, Any], nested_wins: bool = False) -> dict[str, Any]:
    """``data`` with the Fisher settings of ``sst`` and ``methods.*`` flat (:func:`sst_merge.fisher.settings.flatten`),
    in place, so a later layer's nested setting meets an earlier layer's flat one under one name."""
    sections = [("sst", data, "sst")] if isinstance(data.get("sst"), dict) else []
    methods = data.get("methods") if isinstance(data.get("methods"), dict) else {}
    sections += [(f"methods.{name}", methods, name) for name, block in methods.items() if isinstance(block, dict)]
    for where, parent, name in sections:
        try:
            parent[name] = flatten_settings(parent[name], nested_wins)
        except ValueError as e:
            raise ConfigError(f"experiment config: {where}: {e}") from e
    return data


def resolve_config(
    mode: str = "minimal", data: dict[str, Any] | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Build the resolved config: the mode's preset, then ``data`` (e.g. from YAML), then ``key=value`` overrides."""
    import copy

    merged: dict[str, Any] = {"mode": mode}
    _deep_update(merged, copy.deepcopy(PRESETS.get(mode, {})))
    _deep_update(merged, _flat_settings(copy.deepcopy(data or {})))
    for item in overrides or []:  # one at a time: `sst.estimation.n_samples=8` replaces the preset's n_samples
        _flat_settings(apply_overrides(merged, [item]), nested_wins=True)
    if merged.get("mode") != mode and merged.get("mode") in PRESETS:  # a YAML/--set that changes the mode
        return resolve_config(merged["mode"], data, overrides)
    return validate(ExperimentConfig, merged, source="experiment config")
