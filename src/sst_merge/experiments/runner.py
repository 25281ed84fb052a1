"""The experiment runner: build each model as base + ΔW, evaluate it with the one harness, cache every step.

Every model in an experiment — the base, each single adapter, each merge — is the base weights plus a ΔW map,
applied for its evaluation and then restored bit for bit, so no evaluation can see a model that an earlier step
mutated (the earlier research code evaluated the same mutated object "before" and "after"). Evaluations are cached on disk, keyed by
the model's identity (base fingerprint, adapter hashes, merge method and parameters) and the evaluation settings,
so an interrupted run resumes from its finished steps and a sweep never evaluates the same model twice. Data files
named in the key enter it by their content hash, not their path, so a moved or copied cache directory still hits.
Every cached evaluation is checked when read (:func:`sst_merge.cache.check_evaluation`); a damaged one is moved
aside and evaluated again. Two runs sharing a cache compute each evaluation once (:func:`sst_merge.cache.entry_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from sst_merge import cache
from sst_merge import distributed as ddp
from sst_merge.adapters.lora import LoraAdapter
from sst_merge.data.sources import content_keyed
from sst_merge.errors import ConfigError
from sst_merge.eval.judges import KeywordJudge, judge_version
from sst_merge.experiments import evaluation
from sst_merge.experiments.config import ExperimentConfig
from sst_merge.experiments.merging import merge_for_experiment
from sst_merge.experiments.provenance import stable_hash
from sst_merge.experiments.specs import AdapterRef, Metric, ModelSpec  # noqa: F401  (AdapterRef re-exported)
from sst_merge.io import atomic_write_json, atomic_write_text, sha256_file
from sst_merge.merge import get_method
from sst_merge.models import loading
from sst_merge.models.deltas import applied_deltas

log = logging.getLogger(__name__)

#: Bump when evaluation semantics change, so cached evaluations from older code are not reused.
#: 2: a limited benign (over-refusal) set alternates look-alike and plain prompts instead of taking the first N.
#: (Data files entering the key by content hash instead of path changed only the keys that name a file, so it
#: needed no new version: every other key, and so every other cached evaluation, is unchanged.)
#: 3: ``benign`` is the set in XSTest's ten types (the first set is ``benign_v1``); partial refusals count as refusals.
EVAL_CACHE_VERSION = 3

#: Evaluation settings added after evaluations were first cached, with their defaults (left out of the key there).
LATE_EVAL_SETTINGS = {"split": "test", "phrasing": False}

#: Method parameters that say where intermediate results are kept, not what the model is: left out of the key.
LOCATION_PARAMS = frozenset({"cache", "cache_dir"})


class Runner:
    """Materialise, evaluate and cache models for one experiment run.

    Args:
        cfg: the resolved experiment config.
        run_dir: where results, records and (by default) the evaluation cache go.
        load: returns ``(model, tokenizer)`` for ``cfg.model``; injectable for tests.
        evaluate: ``evaluate(model, tokenizer, cfg, tasks, records_path) -> dict[str, Metric]``; injectable.
        show_progress: draw progress bars.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, load=None, evaluate=None, show_progress=True):

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.run_dir / "cache"
        self.records_dir = self.run_dir / "records"
        self.show_progress = show_progress
        device_map = getattr(cfg, "device_map", None)
        self._load = load or (
            lambda: loading.load_model(cfg.model, dtype=cfg.dtype, device_map=ddp.replica_device_map(device_map))
        )
        self._evaluate = evaluate or functools.partial(evaluation.evaluate_all, show_progress=show_progress)
        self._base = None
        self._tok = None
        self.resolved = loading.resolve_model(cfg.model) if load is None else cfg.model
        self.base_fingerprint = cache.model_fingerprint(self.resolved)
        self._adapters: dict[str, LoraAdapter] = {}
        self.evaluated: dict[str, dict[str, Metric]] = {}
        self.specs: dict[str, ModelSpec] = {}
        self.tasks: list[str] = list(cfg.utility_tasks)
        self.diagnostics: dict[str, dict[str, Any]] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    # -- models ------------------------------------------------------------------------------------------------
    def base(self):
        if self._base is None:
            self._base, self._tok = self._load()
        return self._base, self._tok

    def adapter(self, path: str) -> LoraAdapter:
        if path not in self._adapters:
            self._adapters[path] = LoraAdapter.load(path)
        return self._adapters[path]

    def deltas(self, spec: ModelSpec) -> dict[str, torch.Tensor]:
        """ΔW of a spec: Σ wᵢ ΔWᵢ for ``method=None``, else the registered merge method's output."""
        if spec.routes:
            raise ConfigError(f"{spec.label} is a routed model (each prompt to another model): it has no ΔW of its own")
        if spec.method is None:
            out: dict[str, torch.Tensor] = {}
            for ref in spec.adapters:
                for module, d in self.adapter(ref.path).deltas().items():
                    out[module] = out[module] + ref.weight * d if module in out else ref.weight * d
            return out
        base, tok = self.base()
        deltas, diagnostics = merge_for_experiment(spec, self.cfg.model, base, tok, self.cache_dir, self.show_progress)
        if diagnostics:
            self.diagnostics[spec.label] = diagnostics
        return deltas

    @contextlib.contextmanager
    def materialised(self, deltas: dict[str, torch.Tensor]):
        """The base model with ``deltas`` added to its weights for the duration of the block.

        The touched weights are saved before and copied back after (bit-exact, also when the block raises), so
        the next model starts from the untouched base — no copy of the whole model is needed, which keeps
        memory flat for big models spread over devices.
        """
        base, _ = self.base()
        params = dict(base.named_parameters())
        for module in deltas:
            name = f"{module}.weight"
            if name not in params:
                raise ConfigError(f"ΔW for module {module} has no matching weight {name} in model {self.cfg.model}")
        with applied_deltas(base, deltas) as model:
            model.eval()
            yield model

    # -- evaluation --------------------------------------------------------------------------------------------
    def spec_key(self, spec: ModelSpec, judge: str | None = None, judge_v: int | None = None) -> str:
        """The evaluation cache key of ``spec``; ``judge`` / ``judge_v`` give the key under another judge.

        A routed model's key is its routes' keys (each measurement → the key of the model that answers it).
        """
        if spec.routes:
            routes = [(task, self.spec_key(self.specs[src], judge, judge_v)) for task, src in spec.routes]
            return stable_hash({"v": EVAL_CACHE_VERSION, "routes": routes})
        adapters = [(self.adapter(a.path).sha256, a.weight, a.role) for a in spec.adapters]
        version = get_method(spec.method).version if spec.method else 1
        # A method's version enters the key only once it is past 1, so keys made before versions existed stay valid.
        versioned = {"method_version": version} if version != 1 else {}
        # settings added later enter the key only when not at their defaults, so keys made before they existed
        # stay valid; data files and seeded sources enter by content, not path or name
        late = {name for name, default in LATE_EVAL_SETTINGS.items() if getattr(self.cfg.eval, name) == default}
        settings = self.cfg.eval.model_dump(exclude=late)
        eval_settings = content_keyed(settings)
        if judge is not None:
            eval_settings["judge"] = judge
        if judge_v is None:
            judge_v = judge_version(eval_settings["judge"])
        if judge_v != 1:  # likewise: a judge's version enters the key once past 1
            versioned["judge_version"] = judge_v
        return stable_hash(
            {
                **versioned,
                "v": EVAL_CACHE_VERSION,
                "base": self.base_fingerprint,
                "adapters": adapters,
                "method": spec.method,
                "params": content_keyed({k: v for k, v in spec.params if k not in LOCATION_PARAMS}),
                "eval": eval_settings,
                "tasks": self.tasks,
                "seed": self.cfg.seed,
            }
        )

    def _generations_judged_otherwise(self, spec: ModelSpec) -> str | None:
        """The cache key of an evaluation of ``spec`` that differs only in its judge, if one was saved.

        Looked for: the keyword judge at each of its versions (a newer keyword judge, or another judge such as
        ``hf:MODEL``, can then re-judge the saved responses instead of generating them again).
        """
        current = (self.cfg.eval.judge, judge_version(self.cfg.eval.judge))
        for v in range(KeywordJudge.version, 0, -1):
            if ("keyword", v) == current:
                continue
            key = self.spec_key(spec, judge="keyword", judge_v=v)
            if cache.read_checked(self.cache_dir / f"eval-{key}.json", cache.check_evaluation) is not None:
                return key
        return None

    def evaluate(self, spec: ModelSpec) -> dict[str, Metric]:
        """Evaluate a spec (or read its cached evaluation); return metric name → :class:`Metric`."""
        if spec.label in self.evaluated and self.specs[spec.label] == spec:
            return self.evaluated[spec.label]
        if spec.label in self.specs and self.specs[spec.label] != spec:
            raise ConfigError(f"two different models are labelled {spec.label!r} in one run")
        key = self.spec_key(spec)
        cache_file = self.cache_dir / f"eval-{key}.json"
        # One process computes an evaluation; another run sharing the cache waits and reads it (single-process
        # runs only: under torch.distributed every rank must enter the collective evaluation together).
        lock = cache.entry_lock(cache_file) if ddp.world_size() == 1 else contextlib.nullcontext()
        with lock:
            metrics = self._evaluate_locked(spec, key, cache_file)
        self.evaluated[spec.label] = metrics
        self.specs[spec.label] = spec
        return metrics

    def route(self, spec: ModelSpec) -> dict[str, Metric]:
        """Compose a routed model (``spec.routes``: measurement → an evaluated model's label); nothing is generated.

        Each measurement's metric, per-item scores and saved records are the routed-to model's, so the composed model
        pairs with any other by item id and its balanced score and degenerate rates follow from its records.
        """
        if spec.label in self.evaluated and self.specs[spec.label] == spec:
            return self.evaluated[spec.label]
        if spec.label in self.specs:
            raise ConfigError(f"two different models are labelled {spec.label!r} in one run")
        missing = sorted({src for _, src in spec.routes if src not in self.evaluated})
        if missing:
            raise ConfigError(f"routed model {spec.label}: evaluate {', '.join(missing)} before routing to it")
        metrics = {task: dataclasses.replace(self.evaluated[src][task]) for task, src in spec.routes}
        self.specs[spec.label] = spec
        if ddp.is_main():
            lines = []
            for task, src in spec.routes:
                path = self.cache_dir / f"records-{self.spec_key(self.specs[src])}.jsonl"
                if path.is_file():
                    lines += [
                        ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["task"] == task
                    ]
            atomic_write_text(
                self.cache_dir / f"records-{self.spec_key(spec)}.jsonl", "".join(ln + "\n" for ln in lines)
            )
        self.evaluated[spec.label] = metrics
        log.info("%s: composed from %s (no generation)", spec.label, ", ".join(f"{t} ← {s}" for t, s in spec.routes))
        return metrics

    def _evaluate_locked(self, spec: ModelSpec, key: str, cache_file: Path) -> dict[str, Metric]:
        # Rank 0 decides whether the evaluation is cached and shares what it read, so every rank takes the same
        # branch (the evaluation itself is a collective) even where ranks do not share a file system.
        data = ddp.gather_checked(
            f"cache:{spec.label}",
            lambda: cache.read_checked(cache_file, cache.check_evaluation) if ddp.is_main() else None,
        )[0]
        if data is not None:
            metrics = {name: Metric.from_json(m) for name, m in data["metrics"].items()}
            if data.get("diagnostics"):
                self.diagnostics[spec.label] = data["diagnostics"]
            self.cache_hits += 1
            log.info("%s: evaluation cached (%s)", spec.label, cache_file.name)
        else:
            self.cache_misses += 1
            t0 = time.perf_counter()
            records_path = self.cache_dir / f"records-{key}.jsonl"
            other = self._generations_judged_otherwise(spec) if ddp.world_size() == 1 else None
            if other is not None:
                old = json.loads((self.cache_dir / f"eval-{other}.json").read_text())
                saved = [
                    json.loads(line) for line in (self.cache_dir / f"records-{other}.jsonl").open() if line.strip()
                ]
                old_metrics = {name: Metric.from_json(m) for name, m in old["metrics"].items()}
                metrics = evaluation.rejudge_all(self.cfg, old_metrics, saved, records_path)
                if old.get("diagnostics"):
                    self.diagnostics[spec.label] = old["diagnostics"]
                log.info("%s: saved responses (eval-%s) judged again with %s", spec.label, other, self.cfg.eval.judge)
            else:
                deltas = self.deltas(spec)
                _, tok = self.base()
                with self.materialised(deltas) as model:  # every rank gets the full metrics; rank 0 writes records
                    metrics = self._evaluate(model, tok, self.cfg, self.tasks, records_path)
                del deltas
            seconds = time.perf_counter() - t0
            if ddp.is_main():
                atomic_write_json(
                    cache_file,
                    {
                        "v": EVAL_CACHE_VERSION,
                        "spec": spec.describe(),
                        "key": key,
                        "seconds": seconds,
                        "records": records_path.name,
                        "records_sha256": sha256_file(records_path),
                        **({"rejudged_from": other} if other is not None else {}),
                        "metrics": {name: m.to_json(with_items=True) for name, m in metrics.items()},
                        "diagnostics": self.diagnostics.get(spec.label),
                    },
                )
            log.info("%s: evaluated in %.0f s", spec.label, seconds)
        return metrics
