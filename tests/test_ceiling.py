"""The ceiling rows: the multi-task adapter (one LoRA on the union of two tasks' data) and the routing oracle."""

from __future__ import annotations

import json

import pytest

from sst_merge.errors import ConfigError
from sst_merge.tasks.base import GeneratedTask
from sst_merge.train import adapter as adapter_mod
from sst_merge.train import train_adapter
from sst_merge.train.adapter import MultiTask, TrainConfig, adapter_cache_path, train_config, training_items


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))


def _echo(rng):
    a = rng.randint(0, 999)
    return f"echo {a}", f"{a}!"


def _double(rng):
    a = rng.randint(0, 999)
    return f"double {a}", str(2 * a)


ECHO = GeneratedTask("toy_echo", "echo a number", _echo, n_train=40, n_eval=10)
DOUBLE = GeneratedTask("toy_double", "double a number", _double, n_train=30, n_eval=10)


def test_multi_task_defaults_are_the_parts_summed():
    # safety: 64 steps, lr 2e-3; passage_qa: 64 steps, lr 1e-3; each rank 8 → 128 steps, rank 16, the larger lr
    c = train_config("safety+passage_qa")
    assert (c.steps, c.rank, c.lr, c.lora_alpha) == (128, 16, 2e-3, 32.0)
    assert c.target_modules == train_config("safety").target_modules == train_config("passage_qa").target_modules
    # three parts: 64 + 64 + 48 (arithmetic's fallback), rank 24; a given value wins
    c3 = train_config("safety+passage_qa+arithmetic")
    assert (c3.steps, c3.rank) == (176, 24)
    assert (train_config("safety+passage_qa", steps=5, rank=4, lr=1e-4).steps, train_config("safety").rank) == (5, 8)


def test_unknown_or_repeated_part_fails_naming_it():
    with pytest.raises(ConfigError, match=r"in multi-task 'safety\+pasage_qa': unknown task 'pasage_qa'.*passage_qa"):
        adapter_mod.resolve_task("safety+pasage_qa")
    with pytest.raises(ConfigError, match="two or more different tasks"):
        adapter_mod.resolve_task("safety+safety")
    with pytest.raises(ConfigError, match="two or more different tasks"):
        adapter_mod.resolve_task("safety+")
    assert adapter_mod.resolve_task("safety+passage_qa").name == "safety+passage_qa"


def test_training_items_are_exactly_the_union(tiny_llama, tiny_tok):
    cfg = TrainConfig(benign_max_new_tokens=2)
    alone = {}
    for part in ("safety", ECHO):
        items, ids = training_items(part, 0, tiny_llama, tiny_tok, "tiny", cfg)
        alone[adapter_mod.task_name(part)] = (items, ids)
    items, ids = training_items(MultiTask(("safety", ECHO)), 0, tiny_llama, tiny_tok, "tiny", cfg)
    # the same items, in part order, each as its own adapter trains on them (benign answers included)
    assert items == alone["safety"][0] + alone["toy_echo"][0]
    assert ids == {"parts": {"safety": alone["safety"][1], "toy_echo": alone["toy_echo"][1]}}
    assert len(items) == len(alone["safety"][0]) + 40


def test_cache_key_is_its_own_and_follows_both_parts_data(tiny_model_dir, monkeypatch):
    model = str(tiny_model_dir)
    cfg = TrainConfig(steps=2)
    both = adapter_cache_path(model, MultiTask((ECHO, DOUBLE)), cfg)
    assert both.name.startswith("toy_echo+toy_double-s0-")
    assert both != adapter_cache_path(model, ECHO, cfg) and both != adapter_cache_path(model, DOUBLE, cfg)
    # either part's data changes → another key (same names, same settings)
    echo2 = GeneratedTask("toy_echo", "echo a number", _echo, n_train=41, n_eval=9)
    double2 = GeneratedTask("toy_double", "double a number", _double, n_train=29, n_eval=11)
    assert adapter_cache_path(model, MultiTask((echo2, DOUBLE)), cfg) != both
    assert adapter_cache_path(model, MultiTask((ECHO, double2)), cfg) != both
    # the safety part's data enter too
    from sst_merge.tasks import safety

    before = adapter_cache_path(model, "safety+passage_qa", cfg)
    real = safety.safety_data

    def fewer(name, seed):
        data = real(name, seed)
        return type(data)(**{**data.__dict__, "harmful": data.harmful[1:]})

    monkeypatch.setattr(safety, "safety_data", fewer)
    assert adapter_cache_path(model, "safety+passage_qa", cfg) != before


def test_multi_task_adapter_trains_with_summed_rank_and_records_both_splits(tiny_model_dir):
    out = train_adapter(str(tiny_model_dir), MultiTask((ECHO, DOUBLE)), steps=2, batch_size=4, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    split = json.loads((out / "data_split.json").read_text())
    assert split["task"] == "toy_echo+toy_double"
    assert split["parts"]["toy_echo"]["train"] == [i["id"] for i in ECHO.split(0)["train"]]
    assert split["parts"]["toy_double"]["train"] == [i["id"] for i in DOUBLE.split(0)["train"]]
    info = json.loads((out / "train_info.json").read_text())
    assert info["n_train_examples"] == 40 + 30 and info["config"]["steps"] == 2
    assert "multi-task adapter" in (out / "README.md").read_text()
    assert out == adapter_cache_path(str(tiny_model_dir), MultiTask((ECHO, DOUBLE)), TrainConfig(steps=2, rank=16,
                                                                                                 batch_size=4))  # fmt: skip
