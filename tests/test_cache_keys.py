"""The evaluation cache key: whatever changes a model or how it is evaluated changes the key; nothing else does.

A key that misses an input silently reuses one model's evaluation for another (an exp3 sweep of identical rows);
a key that depends on something irrelevant (where an adapter file lies) re-evaluates for nothing.
"""

from __future__ import annotations

import shutil

import pytest

from sst_merge.experiments import resolve_config
from sst_merge.experiments.config import ExperimentEvalSettings
from sst_merge.experiments.experiments import merged_spec
from sst_merge.experiments.runner import AdapterRef, ModelSpec, Runner
from sst_merge.testing import random_lora, tiny_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("keys")
    base = tiny_model()
    paths = {
        name: random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
        for i, name in enumerate(["toy_a", "toy_b", "safety"])
    }
    fs, fu = d / "fs.jsonl", d / "fu.jsonl"
    fs.write_text('{"prompt": "bad", "response": "I cannot help with that."}\n')
    fu.write_text('{"prompt": "q", "response": "a"}\n')
    data = {
        "model": str(tiny_model_dir),
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": paths["safety"], "utility": {"toy_a": paths["toy_a"], "toy_b": paths["toy_b"]}},
        "eval": {"harmful_source": "h.jsonl", "benign_source": "b.jsonl", "task_data": {"toy_a": "a.jsonl"}},
        "sst": {"safety_data": str(fs), "utility_data": str(fu)},
    }
    return d, data, paths


def _runner(data, tmp_path, **changes):
    cfg = resolve_config("minimal", {**data, **changes})
    return Runner(cfg, tmp_path / "run", load=lambda: None, show_progress=False)


def _sst(runner, paths, alpha=1.0, **kw):
    return merged_spec(runner, "sst", [AdapterRef(paths["toy_a"], 1.0, "utility")], paths["safety"], alpha, **kw)


def test_alpha_k_and_method_change_the_key(setup, tmp_path):
    _, data, paths = setup
    r = _runner(data, tmp_path)
    utility = [AdapterRef(paths["toy_a"], 1.0, "utility")]
    specs = [
        _sst(r, paths, 1.0),
        _sst(r, paths, 0.5),  # α of SST is a parameter, not an adapter weight: only `params` tells these apart
        _sst(r, paths, 1.0, k=4),
        _sst(r, paths, 1.0, k=8),
        _sst(r, paths, 1.0, fisher="diagonal"),
        merged_spec(r, "task_arithmetic", utility, paths["safety"], 1.0),
        merged_spec(r, "task_arithmetic", utility, paths["safety"], 0.5),
        merged_spec(r, "ties", utility, paths["safety"], 1.0),
        merged_spec(r, "linear", utility, paths["safety"], 1.0),
        ModelSpec("utility", tuple(utility)),
        ModelSpec("base"),
    ]
    keys = [r.spec_key(s) for s in specs]
    assert len(set(keys)) == len(specs)
    # the label is a name, not part of the model: relabelled, the same model keeps its key
    s = specs[0]
    assert r.spec_key(ModelSpec("another name", s.adapters, s.method, s.params)) == keys[0]


def test_the_sst_sweep_density_and_lambda_change_the_key(setup, tmp_path):
    _, data, paths = setup
    r = _runner(data, tmp_path)
    utility = [AdapterRef(paths["toy_a"], 1.0, "utility")]
    ties = merged_spec(r, "ties", utility, paths["safety"], 1.0)
    denser = _runner(data, tmp_path, sweep={"density": 0.9})
    assert r.spec_key(ties) != denser.spec_key(merged_spec(denser, "ties", utility, paths["safety"], 1.0))
    other_lambda = _runner(data, tmp_path, sst={**data["sst"], "lambda": 0.5})
    assert r.spec_key(_sst(r, paths)) != other_lambda.spec_key(_sst(other_lambda, paths))


def _changed(value):
    """A different value of the same kind, for any evaluation setting."""
    if value is None:
        return 3
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "toy_b": "other.jsonl"}
    raise AssertionError(f"no changed value for {value!r}: extend _changed for the new setting")


def test_every_evaluation_setting_changes_the_key(setup, tmp_path):
    _, data, paths = setup
    spec = ModelSpec("utility", (AdapterRef(paths["toy_a"], 1.0, "utility"),))
    r = _runner(data, tmp_path)
    key = r.spec_key(spec)
    current = r.cfg.eval.model_dump()
    fields = ExperimentEvalSettings.model_fields
    # a field excluded from the dump (eval.decode: both decoders give the same tokens) must leave the key alone
    neutral = {name for name, f in fields.items() if f.exclude}
    assert neutral == {"decode"}
    assert set(current) == set(fields) - neutral
    assert _runner(data, tmp_path, eval={**data["eval"], "decode": "reference"}).spec_key(spec) == key
    for name, value in current.items():
        if name in ("judge", "split"):
            continue  # below: a judge must name a registered one; the split takes only test or dev
        changed = _runner(data, tmp_path, eval={**data["eval"], name: _changed(value)})
        assert changed.cfg.eval.model_dump()[name] != value, name
        assert changed.spec_key(spec) != key, f"eval.{name} does not enter the cache key"
    other_judge = _runner(data, tmp_path, eval={**data["eval"], "judge": "hf:some/classifier"})
    assert other_judge.spec_key(spec) != key
    assert r.spec_key(spec, judge="hf:some/classifier") == other_judge.spec_key(spec)


def test_the_dev_split_changes_the_key(setup, tmp_path):
    _, data, paths = setup
    # the dev split refuses custom prompt sources, so this config keeps the packaged ones
    custom = ("harmful_source", "benign_source", "task_data")
    plain = {**data, "eval": {k: v for k, v in data["eval"].items() if k not in custom}}
    spec = ModelSpec("utility", (AdapterRef(paths["toy_a"], 1.0, "utility"),))
    test_key = _runner(plain, tmp_path).spec_key(spec)
    assert _runner(plain, tmp_path, eval={**plain["eval"], "split": "test"}).spec_key(spec) == test_key
    assert _runner(plain, tmp_path, eval={**plain["eval"], "split": "dev"}).spec_key(spec) != test_key


def test_seed_tasks_and_base_change_the_key(setup, tmp_path):
    _, data, paths = setup
    spec = ModelSpec("utility", (AdapterRef(paths["toy_a"], 1.0, "utility"),))
    r = _runner(data, tmp_path)
    key = r.spec_key(spec)
    assert _runner(data, tmp_path, seed=1).spec_key(spec) != key
    assert _runner(data, tmp_path, utility_tasks=["toy_a", "toy_b"]).spec_key(spec) != key
    moved = _runner(data, tmp_path)
    moved.base_fingerprint = "another base model"
    assert moved.spec_key(spec) != key


def test_one_byte_of_an_adapter_changes_the_key_but_its_location_does_not(setup, tmp_path):
    _, data, paths = setup
    r = _runner(data, tmp_path)
    copy = shutil.copytree(paths["safety"], tmp_path / "copy")
    flipped = shutil.copytree(paths["safety"], tmp_path / "flipped")
    weights = flipped / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the last tensor: still a valid file, one weight a hair different
    weights.write_bytes(bytes(raw))

    def spec(path):
        return ModelSpec("s", (AdapterRef(str(path), 1.0, "safety"),))

    key = r.spec_key(spec(paths["safety"]))
    assert r.spec_key(spec(copy)) == key  # the same bytes elsewhere: the same model
    assert r.spec_key(spec(flipped)) != key
    # the weight and the role of an adapter are part of the model too
    assert r.spec_key(ModelSpec("s", (AdapterRef(paths["safety"], 0.5, "safety"),))) != key
    assert r.spec_key(ModelSpec("s", (AdapterRef(paths["safety"], 1.0, "utility"),))) != key


@pytest.mark.parametrize("seed", [0, 3])
def test_the_default_fisher_data_are_named_sources_with_the_key_of_the_files_they_replace(setup, tmp_path, seed):
    """A config that names no Fisher data gets the seeded sources at the run's seed; the key is the one the
    experiments made when they wrote the same items to JSONL files in the cache (so cached evaluations still hit),
    and nothing is written."""
    import dataclasses
    import json

    from sst_merge.io import atomic_write_text
    from sst_merge.tasks import get_task
    from sst_merge.tasks.safety import safety_splits

    _, data, paths = setup
    data = {k: v for k, v in data.items() if k != "sst"}
    r = _runner(data, tmp_path, utility_tasks=["passage_qa", "arithmetic"], seed=seed)
    spec = _sst(r, paths)
    params = dict(spec.params)
    at = f"@seed={seed}" if seed else ""
    assert params["safety_data"] == f"safety_fisher{at}"
    assert params["utility_data"] == f"utility:passage_qa{at}+utility:arithmetic{at}"
    old = {"safety_data": safety_splits(seed=seed)["fisher"]}
    old["utility_data"] = [it for t in ("passage_qa", "arithmetic") for it in get_task(t).split(seed=seed)["train"]]
    files = {}
    for name, items in old.items():  # what experiments.fisher_data wrote before
        files[name] = str(tmp_path / "fisher-data" / f"{name}.jsonl")
        atomic_write_text(files[name], "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    with_files = dataclasses.replace(spec, params=tuple(sorted({**params, **files}.items())))
    assert r.spec_key(spec) == r.spec_key(with_files)
    other_seed = _sst(_runner(data, tmp_path, utility_tasks=["passage_qa", "arithmetic"], seed=seed + 1), paths)
    assert r.spec_key(other_seed) != r.spec_key(spec)  # the seed's own key entry aside, the data differ
    assert not (tmp_path / "run" / "fisher-data").exists()
