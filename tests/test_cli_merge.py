"""`sst-merge merge` and `sst-merge list` through the CLI entry point (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sst_merge.cli import main
from sst_merge.testing import random_lora, tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    m = tiny_model("llama")
    u = random_lora(m, str(d / "utility"), r=4, seed=1, base_model_name_or_path=str(tiny_model_dir))
    s = random_lora(m, str(d / "safety"), r=2, seed=2, base_model_name_or_path=str(tiny_model_dir))
    config = {
        "base_model": str(tiny_model_dir),
        "method": "ties",
        "adapters": [{"path": u, "weight": 1.0, "role": "utility"}, {"path": s, "weight": 0.5, "role": "safety"}],
        "params": {"density": 0.3, "lambda": 1.0, "seed": 0},
        "output": {"format": "peft", "rank": 4},
    }
    path = d / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_merge_writes_output_and_prints_path(setup, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["-q", "merge", str(setup), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["method"] == "ties" and meta["params"]["density"] == 0.3
    assert {m["rank"] for m in meta["modules"].values()} == {4}


def test_set_overrides_change_the_merge(setup, tmp_path):
    out = tmp_path / "merged"
    argv = [
        "-q",
        "merge",
        str(setup),
        "-o",
        str(out),
        "--set",
        "method=dare_ties",
        "--set",
        "params.density=0.7",
        "--set",
        "adapters.1.weight=2",
        "--set",
        "output.format=peft",
        "--set",
        "output.rank=null",
        "--set",
        "output.energy=0.95",
    ]
    assert main(argv) == 0
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["method"] == "dare_ties" and meta["params"]["density"] == 0.7
    assert meta["inputs"][1]["weight"] == 2 and meta["output"]["energy"] == 0.95


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--set", "params.density=1.5"], "density: Input should be less than or equal to 1"),
        (["--set", "method=slerp"], "unknown merge method 'slerp'"),
        (["--set", "params.alpha=0.5"], "params of method ties: alpha: unknown key"),
        (["--set", "adapters.0.path=/nonexistent/adapter"], "/nonexistent/adapter: directory not found"),
        (["--set", "output.rank=null"], "set output.rank"),
        (["--set", "adapters.5.weight=1"], "adapters.5 is not a valid list index"),
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(setup, tmp_path, capsys, extra, message):
    out = tmp_path / "merged"
    assert main(["-q", "merge", str(setup), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sst-merge merge: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_without_force(setup, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["-q", "merge", str(setup), "-o", str(out)]) == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    assert main(["-q", "merge", str(setup), "-o", str(out), "--set", "params.density=0.9"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert main(["-q", "merge", str(setup), "-o", str(out), "--set", "params.density=0.9", "--force"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before


def test_missing_and_bad_yaml(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "nope.yaml"), "-o", str(tmp_path / "o")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [ties\n")
    assert main(["merge", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "invalid YAML" in err


def test_list_prints_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("merge methods:")
    for name in ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "sst", "fisher_merge", "regmean"]:
        assert f"  {name} " in out
    # every other registry has its section: evaluation tasks, judges, data sources, utility tasks, experiments
    for name in ["refusal", "mmlu_cloze", "task:NAME", "keyword", "harmbench", "passage_qa", "exp3"]:
        assert f"  {name} " in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert lines["safety_fisher"].endswith("; NAME@seed=N for seed N")  # seeded: says how to name another seed
    assert "@seed" not in lines["harmbench"]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("merge_*.yaml")), ids=lambda p: p.name)
def test_every_example_is_valid_as_written(example, monkeypatch):
    """Each example, run from the repository root as examples/README.md says, names adapters and data that exist."""
    from sst_merge.merge.api import load_config, prepare

    monkeypatch.chdir(EXAMPLES.parent)
    config = load_config(example)
    # everything but the base model's weights: params, adapters on disk and compatible, data sources loaded
    plan = prepare(config, load_model=lambda: pytest.fail("prepare must not load the model"), show_progress=False)
    assert {a.base_model for a in plan.context.adapters} == {config.base_model}
    assert {spec.role for spec in config.adapters} == {"utility", "safety"}
    if config.method == "sst":
        from sst_merge.fisher.data import load_items

        safety = load_items(config.params["safety_data"], need_response=True, what="safety_data")
        utility = load_items(config.params["utility_data"], need_response=False, what="utility_data")
        assert len(safety) >= config.params["n_samples"] and len(utility) >= config.params["n_samples"]


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("merge_*.yaml")), ids=lambda p: p.name)
def test_every_example_merges_as_written(setup, example, tmp_path):
    """Each example, with the tiny model and adapters in place of its paths, merges with its own params and output.

    The data sources stay as written (named sources); only the Fisher's sample count is cut for the tiny model.
    """
    ex = yaml.safe_load(example.read_text())
    tiny = yaml.safe_load(setup.read_text())
    ex["base_model"] = tiny["base_model"]
    paths = {a["role"]: a["path"] for a in tiny["adapters"]}
    for a in ex["adapters"]:
        a["path"] = paths[a["role"]]
    if "n_samples" in ex["params"]:  # sst, safety_span, fisher_merge, regmean
        ex["params"].update(n_samples=4)
    if ex["method"] == "learned":  # two Adam steps; the random adapters record no task in a train_info.json
        ex["params"].update(steps=2, task_data=["utility_dev:passage_qa"])
    cfg = tmp_path / example.name
    cfg.write_text(yaml.safe_dump(ex))
    out = tmp_path / "merged"
    assert main(["-q", "merge", str(cfg), "-o", str(out)]) == 0
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["method"] == ex["method"]
    for key, value in ex["params"].items():
        assert str(meta["params"][key]).lower() == str(value).lower(), key  # YAML's `true` is the string "true"
    assert meta["output"]["format"] == ex["output"]["format"]
    if ex["method"] == "task_arithmetic":  # a sum of LoRAs: the peft output is exact, 1.0·τ_u + 0.5·τ_s
        from sst_merge.adapters.lora import LoraAdapter

        u, s = (LoraAdapter.load(paths[r]) for r in ("utility", "safety"))
        merged = LoraAdapter.load(out)
        for m in u.modules:
            torch.testing.assert_close(merged.delta(m), u.delta(m) + 0.5 * s.delta(m), rtol=1e-5, atol=1e-6)


def test_there_is_an_example_per_builtin_method():
    methods = {yaml.safe_load(p.read_text())["method"] for p in EXAMPLES.glob("merge_*.yaml")}
    builtin = "task_arithmetic linear ties dare_linear dare_ties fisher_merge regmean learned sst safety_span"
    assert set(builtin.split()) <= methods
