"""One typed path from the experiment config to the merge: a spec carries its validated parameters to ``prepare``
(no second validation), and exp3's series say which method they sweep (no label prefixes)."""

from __future__ import annotations

import pytest

from sst_merge.errors import ConfigError
from sst_merge.experiments import resolve_config
from sst_merge.experiments.experiments import merged_spec, sweep_series
from sst_merge.experiments.runner import AdapterRef, Runner
from sst_merge.experiments.specs import ModelSpec, Series
from sst_merge.merge.api import prepare
from sst_merge.merge.sst import SSTParams
from sst_merge.merge.ties import TiesParams
from sst_merge.testing import random_lora, tiny_model


def test_sweep_series_know_their_method():
    cfg = resolve_config(
        "minimal",
        overrides=[
            "sweep.methods=[sst, ties]",
            "sweep.sst_k=[4]",
            "sweep.sst_fisher=[diagonal, lowrank]",
            "sweep.sst_params=[{name: share10, share: 0.1}]",
        ],
    )
    series = sweep_series(cfg)
    assert [s.name for s in series] == ["sst", "ties", "sst[k=4]", "sst[fisher=diagonal]", "sst[share10]"]
    assert [s.is_sst for s in series] == [True, False, True, True, True]
    assert series[2].overrides == {"k": 4} and series[-1].overrides == {"name": "share10", "share": 0.1}
    assert not Series("sst_lookalike", "ties").is_sst  # the method decides, not the name


def test_a_spec_carries_its_validated_parameters_to_prepare(tmp_path, tiny_model_dir):
    base = tiny_model()
    paths = {n: random_lora(base, str(tmp_path / n), r=2, seed=i + 1) for i, n in enumerate(["toy_a", "safety"])}
    data = {
        "model": str(tiny_model_dir),
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": paths["safety"], "utility": {"toy_a": paths["toy_a"]}},
        "sst": {"safety_data": "fs.jsonl", "utility_data": "fu.jsonl"},
    }
    runner = Runner(resolve_config("minimal", data), tmp_path / "run", load=lambda: None, show_progress=False)
    utility = [AdapterRef(paths["toy_a"], 1.0, "utility")]
    sst = merged_spec(runner, "sst", utility, paths["safety"], 0.5, k=4)
    assert isinstance(sst.merge_params, SSTParams) and sst.merge_params.alpha == 0.5 and sst.merge_params.k == 4
    assert sst.merge_params == SSTParams.model_validate(dict(sst.params))  # the same parameters the key hashes
    ties = merged_spec(runner, "ties", utility, paths["safety"], 1.0)
    assert isinstance(ties.merge_params, TiesParams)
    # the typed parameters are the spec's value-free companion: two specs that differ only there are one model
    assert ModelSpec(sst.label, sst.adapters, sst.method, sst.params) == sst
    config = {
        "base_model": str(tiny_model_dir),
        "method": "ties",
        "output": {"format": "full"},
        "adapters": [{"path": paths["toy_a"]}, {"path": paths["safety"], "role": "safety"}],
        "params": dict(ties.params),
    }
    plan = prepare(config, load_model=lambda: None, show_progress=False, params=ties.merge_params)
    assert plan.params is ties.merge_params  # used as they are: no second validation
    with pytest.raises(ConfigError, match="not TiesParams"):
        prepare(config, load_model=lambda: None, show_progress=False, params=sst.merge_params)
