"""Adapters that ship with the project: the demo's ``safety`` and ``passage_qa`` adapters on the embedded default.

Each lives in ``resources/adapters/<task>/``: the files ``sst-merge train`` wrote (a PEFT adapter, its data split,
training log and info) plus ``manifest.json``::

    command, model, task, seed     # the `sst-merge train` call that made it
    settings, cache_key            # its resolved TrainConfig and adapter-cache key (which also hashes the data)
    data_split                     # the ids of the training items (and the held-out ones)
    versions                       # sst-merge, torch, transformers, peft, python
    files                          # SHA-256 of every other file in the directory

``adapter_config.json`` records the model as it was named (the alias ``smollm2-135m``), not the directory it was
trained from, which exists only on that machine: a shipped adapter loads through sst-merge, or with plain PEFT once
the base is named (README "Loading an adapter with plain PEFT").

A shipped adapter stands in for training only while it is what ``train_adapter`` would train now: same model,
seed, settings and data (equal cache key), and files matching their SHA-256. Anything else falls back to training,
with the reason logged. :func:`ship` (``scripts/ship_adapters.py``) trains, or takes from the cache, and copies.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
from pathlib import Path
from typing import Any

from sst_merge.io import atomic_output_dir, atomic_write_json, sha256_file
from sst_merge.train.adapter import adapter_cache_path, train_adapter, train_config

log = logging.getLogger(__name__)

#: Where the shipped adapters live (package data).
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "resources" / "adapters"
MANIFEST = "manifest.json"
#: The files of a trained adapter directory that ship (all small: the safetensors of r=8 q/v is ~1.8 MB).
SHIP_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "data_split.json",
    "train_info.json",
    "train_log.csv",
    "loss.png",
)
#: The model and tasks the demo uses.
SHIPPED_MODEL = "smollm2-135m"
SHIPPED_TASKS = ("passage_qa", "safety")


def command(model: str, task: str, seed: int) -> str:
    """The command line that trains (or returns from the cache) the adapter of ``(model, task, seed)``."""
    return f"sst-merge train --model {model} --task {task} --seed {seed}"


def ship(model: str, task: str, seed: int = 0, root: Path | None = None, progress: bool = True) -> Path:
    """Train (or take from the cache) the default adapter of ``task`` and copy it into ``root/task`` with a manifest.

    The previous shipped copy is replaced atomically. ``root`` defaults to :data:`SHIPPED_ROOT`. Returns the
    shipped directory.
    """
    trained = train_adapter(model, task, seed=seed, progress=progress)
    config = train_config(task, seed=seed)
    info = json.loads((trained / "train_info.json").read_text())
    dest = (Path(root) if root is not None else SHIPPED_ROOT) / task
    with atomic_output_dir(dest, force=True) as tmp:
        for name in SHIP_FILES:
            if (trained / name).is_file():
                shutil.copy2(trained / name, tmp / name)
        # the trained copy names the base's directory on this machine; a shipped copy names the model portably
        lora = json.loads((tmp / "adapter_config.json").read_text())
        atomic_write_json(tmp / "adapter_config.json", {**lora, "base_model_name_or_path": model})
        manifest = {
            "command": command(model, task, seed),
            "model": model,
            "task": task,
            "seed": seed,
            "settings": config.key_settings(),
            "cache_key": adapter_cache_path(model, task, config).name,
            "data_split": json.loads((trained / "data_split.json").read_text()),
            "versions": {**info.get("versions", {}), "python": platform.python_version()},
            "train_seconds": info.get("train_seconds"),
            "loss": [info.get("first_loss"), info.get("last_loss")],
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    log.info("shipped %s adapter (%s) to %s", task, manifest["cache_key"], dest)
    return dest


def read_manifest(path: Path) -> dict[str, Any]:
    """Return the manifest of a shipped adapter directory."""
    return json.loads((Path(path) / MANIFEST).read_text())


def file_problems(path: Path) -> list[str]:
    """Return what does not match between a shipped directory and its manifest (empty when every file matches)."""
    path = Path(path)
    files = read_manifest(path)["files"]
    problems = [f"{name}: missing" for name in files if not (path / name).is_file()]
    problems += [
        f"{name}: SHA-256 differs"
        for name, digest in files.items()
        if (path / name).is_file() and sha256_file(path / name) != digest
    ]
    extra = {p.name for p in path.iterdir() if p.is_file()} - set(files) - {MANIFEST}
    problems += [f"{name}: not in the manifest" for name in sorted(extra)]
    return problems


def shipped_adapter(model: str, task: str, seed: int = 0, root: Path | None = None) -> tuple[Path | None, str]:
    """Return ``(directory, "")`` of the shipped adapter that equals what ``train_adapter(model, task, seed=seed)``
    would train now, or ``(None, reason)`` when there is none or it differs (settings, data, model, seed, files).

    ``root`` defaults to :data:`SHIPPED_ROOT`."""
    root = Path(root) if root is not None else SHIPPED_ROOT
    path = root / task
    if not (path / MANIFEST).is_file():
        return None, f"no shipped {task} adapter in {root}"
    manifest = read_manifest(path)
    if manifest.get("model") != model or manifest.get("seed") != seed:
        return None, (
            f"the shipped {task} adapter is for model {manifest.get('model')} seed {manifest.get('seed')}, "
            f"not {model} seed {seed}"
        )
    config = train_config(task, seed=seed)
    now, then = config.key_settings(), manifest.get("settings", {})
    changed = sorted(k for k in set(now) | set(then) if now.get(k, "—") != then.get(k, "—"))
    if changed:
        diffs = ", ".join(f"{k} {then.get(k, '—')} → {now.get(k, '—')}" for k in changed)
        return None, f"the shipped {task} adapter was trained with other settings than today's defaults ({diffs})"
    if manifest.get("cache_key") != adapter_cache_path(model, task, config).name:
        return None, f"the shipped {task} adapter was trained on other data than today's (its cache key differs)"
    problems = file_problems(path)
    if problems:
        return None, f"the shipped {task} adapter's files do not match its manifest ({'; '.join(problems)})"
    return path, ""
