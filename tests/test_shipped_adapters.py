"""Shipped adapters: the manifest matches the files, and a shipped adapter is used only while it equals what
``sst-merge train`` would train now (settings, data, model, seed, file hashes)."""

from __future__ import annotations

import json

import pytest

from sst_merge.io import sha256_file
from sst_merge.train import shipped
from sst_merge.train.adapter import adapter_cache_path, train_config

TASK = "passage_qa"


@pytest.mark.parametrize("task", shipped.SHIPPED_TASKS)
def test_packaged_manifest_matches_its_files(task):
    path = shipped.SHIPPED_ROOT / task
    if not (path / shipped.MANIFEST).is_file():
        pytest.skip(f"no shipped {task} adapter yet: run python scripts/ship_adapters.py --tasks {task}")
    manifest = shipped.read_manifest(path)
    assert shipped.file_problems(path) == []
    for name, digest in manifest["files"].items():  # the same check, spelled out
        assert sha256_file(path / name) == digest
    assert {"adapter_config.json", "adapter_model.safetensors", "data_split.json"} <= set(manifest["files"])
    assert manifest["command"] == shipped.command(manifest["model"], task, manifest["seed"])
    assert manifest["data_split"]["task"] == task and manifest["data_split"]["seed"] == manifest["seed"]
    assert {"torch", "transformers", "peft", "sst_merge", "python"} <= set(manifest["versions"])


@pytest.mark.parametrize("task", shipped.SHIPPED_TASKS)
def test_packaged_adapters_are_what_the_defaults_train_now(task):
    # a changed default recipe (settings or data) needs a re-ship, or the demo silently trains for minutes
    if not (shipped.SHIPPED_ROOT / task / shipped.MANIFEST).is_file():
        pytest.skip(f"no shipped {task} adapter yet: run python scripts/ship_adapters.py --tasks {task}")
    path, why = shipped.shipped_adapter(shipped.SHIPPED_MODEL, task)
    assert path == shipped.SHIPPED_ROOT / task, f"{why}; run python scripts/ship_adapters.py --tasks {task}"


@pytest.fixture()
def cached_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny adapter placed where ``train_adapter`` caches the default passage_qa adapter (so nothing trains)."""
    from sst_merge.testing import random_lora, tiny_model

    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    model = str(tiny_model_dir)
    cached = adapter_cache_path(model, TASK, train_config(TASK))
    random_lora(tiny_model("llama"), str(cached), base_model_name_or_path=model)
    (cached / "data_split.json").write_text(json.dumps({"task": TASK, "seed": 0, "train": ["a"], "eval": ["b"]}))
    (cached / "train_info.json").write_text(json.dumps({"versions": {"torch": "x"}, "train_seconds": 1.0}))
    return model


def test_ship_then_use(cached_adapter, tmp_path):
    root = tmp_path / "shipped"
    dest = shipped.ship(cached_adapter, TASK, root=root, progress=False)
    manifest = shipped.read_manifest(dest)
    assert manifest["settings"] == train_config(TASK).key_settings()
    assert manifest["data_split"]["train"] == ["a"]
    assert shipped.file_problems(dest) == []
    assert shipped.shipped_adapter(cached_adapter, TASK, root=root) == (dest, "")
    # shipping again replaces the copy (no error, same files)
    assert shipped.ship(cached_adapter, TASK, root=root, progress=False) == dest


def _edit_manifest(dest, **changes):
    m = shipped.read_manifest(dest)
    for k, v in changes.items():
        if k == "settings":
            m["settings"].update(v)
        else:
            m[k] = v
    (dest / shipped.MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"settings": {"steps": 7}}, "other settings than today's defaults (steps 7 → 64)"),
        ({"settings": {"lr": 0.5}}, "lr 0.5 → 0.001"),
        ({"cache_key": "passage_qa-s0-000000000000"}, "other data"),
        ({"seed": 1}, "seed 1"),
        ({"model": "another-model"}, "for model another-model"),
    ],
)
def test_manifest_that_differs_from_todays_defaults_is_not_used(cached_adapter, tmp_path, change, reason):
    root = tmp_path / "shipped"
    dest = shipped.ship(cached_adapter, TASK, root=root, progress=False)
    _edit_manifest(dest, **change)
    path, why = shipped.shipped_adapter(cached_adapter, TASK, root=root)
    assert path is None and reason in why


def test_changed_file_is_not_used(cached_adapter, tmp_path):
    root = tmp_path / "shipped"
    dest = shipped.ship(cached_adapter, TASK, root=root, progress=False)
    with open(dest / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    path, why = shipped.shipped_adapter(cached_adapter, TASK, root=root)
    assert path is None and "adapter_model.safetensors: SHA-256 differs" in why
    assert shipped.shipped_adapter(cached_adapter, "safety", root=root)[1].startswith("no shipped safety adapter")


def test_experiment_uses_shipped_adapter_unless_retrain(cached_adapter, tmp_path, monkeypatch):
    from sst_merge.experiments import adapters, resolve_config

    root = tmp_path / "shipped"
    dest = shipped.ship(cached_adapter, TASK, root=root, progress=False)
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", root)
    trained = []

    def fake_train(model, task, **kw):
        trained.append((task, kw))
        return tmp_path / "trained"

    monkeypatch.setattr("sst_merge.train.train_adapter", fake_train)
    cfg = resolve_config("minimal", {"model": cached_adapter})
    assert adapters.utility_adapters(cfg, [TASK]) == {TASK: str(dest)} and trained == []
    retrain = resolve_config("minimal", {"model": cached_adapter}, ["adapters.shipped=false"])
    assert adapters.utility_adapters(retrain, [TASK]) == {TASK: str(tmp_path / "trained")}
    steps = resolve_config("minimal", {"model": cached_adapter}, ["adapters.train_steps=3"])
    adapters.utility_adapters(steps, [TASK])  # other steps than the shipped ones: trains
    assert [t for t, _ in trained] == [TASK, TASK] and trained[1][1]["steps"] == 3
