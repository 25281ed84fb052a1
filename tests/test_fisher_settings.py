"""The Fisher pass's settings: one typed block (``estimation``) shared by sst, safety_span, fisher_merge and regmean,
spelled flat or nested with the same parameters, the same written form and the same Fisher cache keys; and SST's
Fisher data loaded once per merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sst_merge.merge.sst_objectives as sst_objectives_module
from sst_merge.config import validate
from sst_merge.errors import ConfigError
from sst_merge.fisher.pipeline import FisherSetup, objective_cache_key
from sst_merge.fisher.settings import FisherSettings, flatten, fold
from sst_merge.merge import MERGE_METHODS, MergeContext
from sst_merge.merge.api import prepare, run_plan
from sst_merge.merge.sst import SSTParams
from sst_merge.merge.sst_objectives import sst_objectives
from sst_merge.testing import CountingLoader
from tests.test_fisher_objectives import sst_run, sst_setup  # noqa: F401  (sst_setup is a fixture)

FLAT = {"n_samples": 6, "batch_size": 4, "max_length": 128, "max_new_tokens": 16, "cache": False, "cache_dir": "/c"}
SELECTION = {"sst": {"share": 0.25}, "safety_span": {}, "fisher_merge": {}, "regmean": {}}


@pytest.mark.parametrize("method", sorted(SELECTION))
def test_flat_and_nested_spellings_give_equal_parameters_and_one_written_form(method):
    params = MERGE_METHODS.get(method).Params
    flat = validate(params, {**SELECTION[method], **FLAT})
    nested = validate(params, {**SELECTION[method], "estimation": FLAT})
    half = validate(
        params, {**SELECTION[method], "n_samples": 6, "estimation": {k: v for k, v in FLAT.items() if k != "n_samples"}}
    )
    assert flat == nested == half
    assert flat.estimation == FisherSettings(**FLAT) and flat.n_samples == 6 and flat.max_length == 128
    # written flat, as before the block existed (merge outputs record these parameters)
    dumped = flat.model_dump(by_alias=True)
    assert "estimation" not in dumped and {k: dumped[k] for k in FLAT} == FLAT
    assert validate(params, dumped) == flat  # and read back


def test_a_setting_given_both_ways_is_refused():
    with pytest.raises(ConfigError, match="n_samples is given twice, flat and in estimation"):
        validate(SSTParams, {"share": 0.25, "n_samples": 6, "estimation": {"n_samples": 8}})
    with pytest.raises(ConfigError, match="valid keys|unknown|extra"):
        validate(SSTParams, {"share": 0.25, "estimation": {"n_sample": 8}})
    with pytest.raises(ValueError, match="given twice"):
        flatten({"n_samples": 6, "estimation": {"n_samples": 8}})


def test_fold_and_flatten_are_inverse_on_the_settings():
    assert fold({"alpha": 1, **FLAT}) == {"alpha": 1, "estimation": FLAT}
    assert flatten(fold({"alpha": 1, **FLAT})) == {"alpha": 1, **FLAT}
    assert fold({"alpha": 1}) == {"alpha": 1} and flatten({"alpha": 1}) == {"alpha": 1}


def test_one_builder_gives_the_setup_both_spellings_key_alike(tmp_path):
    # what merge/sst.py and merge/own_data.py each built by hand before: every field from the same settings
    ctx = MergeContext([], [], [], [], base_model="tiny-test", load_model=CountingLoader(), workdir=tmp_path)
    pre = {"m": torch.zeros(2, 2)}
    want = FisherSetup(
        approximation="lowrank",
        modules=["m"],
        load_model=ctx.load_model,
        model_name="tiny-test",
        pre_merge=pre,
        pre_merge_key=[("sha", 1.0)],
        max_length=128,
        batch_size=4,
        max_new_tokens=16,
        seed=3,
        cache=False,
        cache_dir=Path("/c"),
        show_progress=True,
    )
    for spelling in ({**FLAT}, {"estimation": FLAT}):
        p = validate(SSTParams, {"share": 0.25, "seed": 3, **spelling})
        assert p.fisher_setup(ctx, "lowrank", ["m"], pre, [("sha", 1.0)]) == want
    default = validate(SSTParams, {"share": 0.25}).fisher_setup(ctx, "kfac", ["m"], pre, None)
    assert default.cache_dir == tmp_path / "fisher-cache"  # no cache_dir: the merge's workdir, as before


def test_both_spellings_give_the_same_fisher_cache_keys(sst_setup):  # noqa: F811
    files = sst_setup["files"]
    data = {"share": 0.25, "safety_data": files["safety"], "utility_data": files["utility"], "seed": 1}
    keys = []
    for spelling in ({"n_samples": 4, "max_length": 64}, {"estimation": {"n_samples": 4, "max_length": 64}}):
        p = validate(SSTParams, {**data, **spelling})
        setup = p.estimation.setup("lowrank", ["m"], CountingLoader(), "tiny", {}, None, p.seed)
        keys.append([objective_cache_key(o, setup, "fp") for o in sst_objectives(p)])
    assert keys[0] == keys[1] and len(set(keys[0])) == 2


def _counting_load_items(monkeypatch):
    calls: list[str] = []
    real = sst_objectives_module.load_items

    def counting(source, need_response, what):
        calls.append(what)
        return real(source, need_response, what)

    monkeypatch.setattr(sst_objectives_module, "load_items", counting)
    return calls


def test_check_and_merge_load_the_fisher_data_once(sst_setup, tmp_path, monkeypatch):  # noqa: F811
    calls = _counting_load_items(monkeypatch)
    loader = CountingLoader()
    sst_run(sst_setup, tmp_path, loader, benign_share=0.5)  # check, then merge, on one method instance
    assert sorted(calls) == ["benign_data", "safety_data", "utility_data"]
    assert loader.calls == 1


def test_prepare_and_run_load_the_fisher_data_once(sst_setup, tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    calls = _counting_load_items(monkeypatch)
    loader = CountingLoader()
    s = sst_setup
    cfg = {
        "base_model": str(tiny_model_dir),
        "method": "sst",
        "adapters": [
            {"path": str(s["utility"].path), "role": "utility"},
            {"path": str(s["safety"].path), "role": "safety"},
        ],
        "params": {
            "k": 3,
            "utility_fisher": "empirical",
            "safety_data": s["files"]["safety"],
            "utility_data": s["files"]["utility"],
            "estimation": {"n_samples": 6, "batch_size": 4, "cache_dir": str(tmp_path / "c")},
        },
        "output": {"format": "full"},
    }
    run_plan(prepare(cfg, load_model=loader, show_progress=False))
    assert sorted(calls) == ["safety_data", "utility_data"] and loader.calls == 1


def test_experiment_spellings_give_equal_config_and_equal_evaluation_keys(tmp_path):
    from sst_merge.experiments import resolve_config
    from sst_merge.experiments.experiments import merged_spec
    from sst_merge.experiments.runner import AdapterRef, Runner
    from sst_merge.testing import random_lora, tiny_model

    base = tiny_model()
    paths = {n: random_lora(base, str(tmp_path / n), r=2, seed=i + 1) for i, n in enumerate(["toy_a", "safety"])}
    data = {
        "model": "tiny-test",
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": paths["safety"], "utility": {"toy_a": paths["toy_a"]}},
        "sst": {"safety_data": "fs.jsonl", "utility_data": "fu.jsonl"},
    }
    flat = resolve_config(
        "minimal",
        data,
        ["sst.n_samples=8", "methods.regmean.n_samples=5", "sweep.sst_params=[{name: v, batch_size: 2}]"],
    )
    nested = resolve_config(
        "minimal",
        data,
        [
            "sst.estimation.n_samples=8",
            "methods.regmean.estimation.n_samples=5",
            "sweep.sst_params=[{name: v, estimation: {batch_size: 2}}]",
        ],
    )
    in_yaml = resolve_config(
        "minimal",
        {
            **data,
            "sst": {**data["sst"], "estimation": {"n_samples": 8}},
            "methods": {"regmean": {"estimation": {"n_samples": 5}}},
            "sweep": {"sst_params": [{"name": "v", "estimation": {"batch_size": 2}}]},
        },
    )
    assert flat == nested == in_yaml and flat.sst["n_samples"] == 8  # the preset's 16 replaced, recorded flat
    utility = [AdapterRef(paths["toy_a"], 1.0, "utility")]
    keys = []
    for cfg in (flat, nested, in_yaml):
        r = Runner(cfg, tmp_path / "run", load=lambda: None, show_progress=False)
        specs = [merged_spec(r, m, utility, paths["safety"], 1.0) for m in ("sst", "regmean")]
        specs.append(merged_spec(r, "sst", utility, paths["safety"], 1.0, name="v", batch_size=2))
        keys.append([r.spec_key(s) for s in specs])
    assert keys[0] == keys[1] == keys[2]
