"""Every ``configs/*.yaml`` runs as the docs write it: ``sst-merge run configs/X.yaml``.

Each file is resolved and validated, then planned with ``--dry-run`` exactly as written (the real model alias, no
weights loaded, the machine's rates fixed); the demo's config also runs end to end on the tiny in-process model,
with ``--set`` overrides that swap in the tiny model, random adapters and hand-made data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sst_merge.cli import build_parser, main
from sst_merge.config import load_yaml
from sst_merge.errors import ConfigError
from sst_merge.experiments import resolve_config
from sst_merge.plan import GIB, Memory, Rates

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RATES = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8)


@pytest.fixture
def no_weights(monkeypatch):
    """Fixed rates and memory; every model loader raises (a dry run must never call one)."""
    import transformers

    import sst_merge.models
    import sst_merge.models.loading
    import sst_merge.plan
    import sst_merge.plan.plan

    def loader(*args, **kwargs):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(sst_merge.models.loading, "load_model", loader)
    monkeypatch.setattr(sst_merge.models, "load_model", loader)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loader)
    for where in (sst_merge.plan, sst_merge.plan.plan):  # the package, and where plan_run looks
        monkeypatch.setattr(where, "measure_rates", lambda *a, **k: RATES)
        monkeypatch.setattr(where, "available_memory", lambda: Memory(device=64 * GIB, host=64 * GIB))


def test_there_are_configs():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "three_way_full", "exp2_minimal", "ceiling_test_data_aware"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_resolves_and_names_its_experiment_and_mode(path):
    data = load_yaml(str(path))
    assert {"experiment", "mode"} <= set(data), f"{path.name}: say experiment and mode in the file"
    mode = data.pop("mode")
    cfg = resolve_config(mode, data)
    assert (cfg.experiment, cfg.mode) == (data["experiment"], mode)
    assert path.read_text().startswith("#"), f"{path.name}: start with a comment saying what it runs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_plans_as_written(path, no_weights, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(path), "--dry-run", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    model = load_yaml(str(path)).get("model", "smollm2-135m")  # the file's model, else the default
    assert f"plan for {model} " in printed and not out.exists()


def test_positional_config_equals_the_flag_and_flags_win_over_the_file():
    parser = build_parser()
    a = parser.parse_args(["run", "configs/three_way_full.yaml", "--set", "eval.batch_size=8"])
    b = parser.parse_args(["run", "--config", "configs/three_way_full.yaml", "--set", "eval.batch_size=8"])
    from sst_merge.commands.run import config_path

    assert config_path(a) == config_path(b) == "configs/three_way_full.yaml"
    both = parser.parse_args(["run", "configs/demo.yaml", "--config", "configs/three_way_full.yaml"])
    with pytest.raises(ConfigError, match="two configs given"):
        config_path(both)


def test_set_and_flags_override_the_file(no_weights, capsys):
    path = str(ROOT / "configs" / "three_way_full.yaml")
    # --mode on the command line wins over the file's `mode: full`; --set over both
    assert main(["run", path, "--mode", "minimal", "--set", "sweep.sst_params=[]", "--dry-run"]) == 0
    assert "SST lowrank N=16" in capsys.readouterr().out  # the minimal preset's N, so the file's mode was replaced
    assert main(["run", path, "--set", "sweep.alphas=[oops]", "--dry-run"]) == 2


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tiny_overrides(d: Path, model_dir: str) -> list[str]:
    """``--set`` overrides that run a config on the tiny model: its adapters, hand-made data, tiny limits."""
    from sst_merge.testing import random_lora, tiny_model

    base = tiny_model()
    ad = {n: random_lora(base, str(d / n), r=2, seed=i + 1, base_model_name_or_path=model_dir) for i, n in
          enumerate(["passage_qa", "safety"])}  # fmt: skip
    harmful = _jsonl(d / "h.jsonl", [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(3)])
    benign = _jsonl(d / "b.jsonl", [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(3)])
    task = _jsonl(d / "t.jsonl", [{"id": f"t{i}", "prompt": f"q {i}?", "answer": str(i)} for i in range(3)])
    fs = _jsonl(d / "fs.jsonl", [{"prompt": f"bad {i}", "response": "I cannot help with that."} for i in range(4)])
    fu = _jsonl(d / "fu.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)])
    return [
        f"model={model_dir}",
        f"adapters.safety={ad['safety']}",
        f"adapters.utility.passage_qa={ad['passage_qa']}",
        f"eval.harmful_source={harmful}",
        f"eval.benign_source={benign}",
        f"eval.task_data.passage_qa={task}",
        "eval.max_new_tokens=3",
        "eval.batch_size=4",
        "sst.fisher=diagonal",
        "sst.n_samples=4",
        "sst.batch_size=4",
        "sst.max_new_tokens=3",
        "sst.max_length=64",
        f"sst.safety_data={fs}",
        f"sst.utility_data={fu}",
        "sweep.alphas=[1.0]",
        "bootstrap=20",
    ]


def test_demo_config_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides(tmp_path, str(tiny_model_dir)) for x in ("--set", o)]
    assert main(["-q", "run", str(ROOT / "configs" / "demo.yaml"), *sets, "-o", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["experiment"] == "exp1" and doc["config"]["mode"] == "minimal"
    assert list(doc["models"]) == ["base", "utility", "safety", "sst(alpha=1)"]
    assert (out / "report.md").is_file()
