"""A method maps a safety weight onto its own parameters; exp3's merges follow it with no per-method code."""

from __future__ import annotations

import pytest
from pydantic import Field

from sst_merge.experiments import experiments, resolve_config
from sst_merge.experiments.experiments import merged_spec
from sst_merge.experiments.runner import AdapterRef, Runner
from sst_merge.merge import get_method
from sst_merge.merge.base import MergeMethod, MethodParams


def test_default_hook_sets_the_safety_adapters_weight_and_sst_sets_alpha():
    roles = ["utility", "utility", "safety"]
    params, weights = get_method("ties").apply_safety_weight({"density": 0.3}, [1.0, 0.5, 1.0], roles, 0.25)
    assert params == {"density": 0.3} and weights == [1.0, 0.5, 0.25]
    params, weights = get_method("sst").apply_safety_weight({"alpha": 1.0, "k": 8}, [1.0, 0.5, 0.7], roles, 0.25)
    assert params == {"alpha": 0.25, "k": 8} and weights == [1.0, 0.5, 1.0]  # sst keeps the safety weight at 1


@pytest.fixture()
def runner(tmp_path, tiny_model_dir):
    sst = {"safety_data": "s.jsonl", "utility_data": "u.jsonl"}
    cfg = resolve_config("minimal", {"model": str(tiny_model_dir), "utility_tasks": ["passage_qa"], "sst": sst})
    return Runner(cfg, tmp_path / "run", load=lambda: None, show_progress=False)


UTILITY = [AdapterRef("u", 1.0, "utility")]


def test_exp3_specs_per_method(runner):
    ta = merged_spec(runner, "task_arithmetic", UTILITY, "s", 0.5)
    assert ta.label == "task_arithmetic(alpha=0.5)" and dict(ta.params) == {"seed": 0}
    assert [(a.path, a.weight, a.role) for a in ta.adapters] == [("u", 1.0, "utility"), ("s", 0.5, "safety")]
    ties = merged_spec(runner, "ties", UTILITY, "s", 0.5)
    assert dict(ties.params) == {"seed": 0, "density": runner.cfg.sweep.density}  # ties takes a density
    sst = merged_spec(runner, "sst", UTILITY, "s", 0.5, k=4)
    assert sst.label == "sst(alpha=0.5,k=4)" and [a.weight for a in sst.adapters] == [1.0, 1.0]
    p = dict(sst.params)
    assert p["alpha"] == 0.5 and p["k"] == 4 and "share" not in p and p["safety_data"] == "s.jsonl"
    named = merged_spec(runner, "sst", UTILITY, "s", 2.0, name="comp", k=2)
    assert named.label == "sst[comp](alpha=2)" and dict(named.params)["k"] == 2


def test_a_new_method_joins_exp3_with_no_edit_to_experiments(runner, monkeypatch):
    """A method that scales its own knob by the safety weight and takes a density: exp3 asks it, nothing else."""

    class Params(MethodParams):
        density: float = Field(1.0, gt=0, le=1)
        gain: float = 1.0

    class Scaled(MergeMethod):
        name = "scaled"

        def apply_safety_weight(self, params, weights, roles, alpha):
            return {**params, "gain": 2 * alpha}, weights

    Scaled.Params = Params
    monkeypatch.setattr(experiments, "get_method", lambda name: Scaled())
    spec = merged_spec(runner, "scaled", UTILITY, "s", 0.75)
    assert spec.label == "scaled(alpha=0.75)" and spec.method == "scaled"
    assert dict(spec.params) == {"seed": 0, "density": runner.cfg.sweep.density, "gain": 1.5}
    assert [a.weight for a in spec.adapters] == [1.0, 1.0]


def test_exp2_merges_each_method_at_its_configured_safety_weight(tmp_path, tiny_model_dir, monkeypatch):
    """exp2's merges, captured before any evaluation: sst at the config's α with its safety adapter at weight 1,
    every other method with its safety adapter at weight 1 (the specs exp2 built with a method-name branch)."""
    sst = {"safety_data": "s.jsonl", "utility_data": "u.jsonl", "alpha": 0.5}
    over = {"model": str(tiny_model_dir), "utility_tasks": ["passage_qa"], "sst": sst, "exp2_ks": [1],
            "sweep": {"methods": ["sst", "ties", "task_arithmetic"]}}  # fmt: skip
    runner = Runner(resolve_config("minimal", over), tmp_path / "run", load=lambda: None, show_progress=False)
    monkeypatch.setattr(experiments.adapter_paths, "utility_adapters", lambda cfg, tasks: {t: "u" for t in tasks})
    monkeypatch.setattr(experiments.adapter_paths, "safety_adapter", lambda cfg: "s")
    seen = []
    monkeypatch.setattr(runner, "evaluate", lambda spec: seen.append(spec) or {})

    class Built(Exception):
        pass

    monkeypatch.setattr(experiments, "add_behaviour", lambda r: (_ for _ in ()).throw(Built()))
    with pytest.raises(Built):
        experiments.exp2(runner)
    merged = {s.method: s for s in seen if s.method}
    assert [s.label for s in seen] == ["utility[passage_qa]", "K=1:utility", "K=1:sst(alpha=0.5)",
                                      "K=1:ties(alpha=1)", "K=1:task_arithmetic(alpha=1)"]  # fmt: skip
    weights = {m: [(a.path, a.weight, a.role) for a in s.adapters] for m, s in merged.items()}
    assert weights == {m: [("u", 1.0, "utility"), ("s", 1.0, "safety")] for m in ("sst", "ties", "task_arithmetic")}
    assert dict(merged["sst"].params)["alpha"] == 0.5
    assert dict(merged["ties"].params) == {"seed": 0, "density": runner.cfg.sweep.density}
    assert dict(merged["task_arithmetic"].params) == {"seed": 0}
    for m, s in merged.items():  # the same spec exp3 builds at that safety weight (cache keys unchanged)
        ref = merged_spec(runner, m, UTILITY, "s", 0.5 if m == "sst" else 1.0)
        assert (s.adapters, s.method, s.params) == (ref.adapters, ref.method, ref.params)
