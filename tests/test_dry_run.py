"""``--dry-run`` of ``sst-merge merge`` and ``sst-merge run``: validate, print ``plan``'s estimate, load no weights."""

from __future__ import annotations

import pytest
import yaml

from sst_merge.cli import main
from sst_merge.plan import GIB, Memory, Rates, Settings, plan_run

RATES = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8)  # fixed, so two printed plans can be compared


@pytest.fixture
def no_weights(monkeypatch):
    """Fixed rates and host memory; every model loader raises (a dry run must never call one)."""
    import transformers

    import sst_merge.models
    import sst_merge.models.loading
    import sst_merge.plan
    import sst_merge.plan.plan

    calls: list[str] = []

    def loader(*args, **kwargs):
        calls.append(str(args[:1]))
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr(sst_merge.models.loading, "load_model", loader)
    monkeypatch.setattr(sst_merge.models, "load_model", loader)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loader)
    for where in (sst_merge.plan, sst_merge.plan.plan):  # the package, and where plan_run looks
        monkeypatch.setattr(where, "measure_rates", lambda *a, **k: RATES)
    memory = {"m": Memory(device=20 * GIB, host=20 * GIB)}
    for where in (sst_merge.plan, sst_merge.plan.plan):  # the package, and where plan_run looks
        monkeypatch.setattr(where, "available_memory", lambda: memory["m"])
    return calls, memory


def _merge_config(tmp_path, model_dir, fisher="kfac", n=8):
    from sst_merge.testing import random_lora, tiny_model

    base = tiny_model()
    adapters = [random_lora(base, str(tmp_path / name), r=4, seed=i) for i, name in enumerate("us")]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(f'{{"prompt": "question {i}", "response": "answer {i}"}}\n' for i in range(64)))
    cfg = {"base_model": str(model_dir), "method": "sst", "output": {"format": "full"},
           "adapters": [{"path": adapters[0], "role": "utility"}, {"path": adapters[1], "role": "safety"}],
           "params": {"fisher": fisher, "n_samples": n, "fraction": 0.1, "safety_data": str(data),
                      "utility_data": str(data)}}  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_merge_dry_run_prints_the_plan_of_that_config_and_loads_nothing(no_weights, tiny_model_dir, tmp_path, capsys):
    calls, _ = no_weights
    path = _merge_config(tmp_path, tiny_model_dir)
    out = tmp_path / "merged"
    assert main(["merge", str(path), "-o", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "fisher (kfac, N=8 × 2)" in printed and "full output" in printed
    assert not out.exists() and calls == []
    # the same code path as `sst-merge plan` on the same config: the same table, line for line
    assert main(["plan", str(path)]) == 0
    assert capsys.readouterr().out == printed
    # an override reaches the plan exactly as it would reach the merge
    assert main(["merge", str(path), "-o", str(out), "--dry-run", "--set", "params.n_samples=4"]) == 0
    assert "fisher (kfac, N=4 × 2)" in capsys.readouterr().out


def test_merge_dry_run_refuses_what_merge_would_refuse_before_planning(no_weights, tiny_model_dir, tmp_path, capsys):
    path = _merge_config(tmp_path, tiny_model_dir)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "x").write_text("kept")
    assert main(["merge", str(path), "-o", str(out), "--dry-run"]) == 2  # existing output, no --force
    err = capsys.readouterr()
    assert "--force" in err.err and "plan for" not in err.out
    assert main(["merge", str(path), "-o", str(tmp_path / "o2"), "--dry-run", "--set", "params.fisher=nonsense"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_merge_dry_run_exits_2_with_the_one_line_fix_when_it_cannot_fit(no_weights, tiny_model_dir, tmp_path, capsys):
    """Host memory between kfac's and lowrank's peak: the dry run refuses lowrank and names kfac, like plan."""
    calls, memory = no_weights
    path = _merge_config(tmp_path, tiny_model_dir, fisher="lowrank", n=64)
    from sst_merge.config import load_yaml
    from sst_merge.plan import settings_from_config

    model, s = settings_from_config(load_yaml(path))
    big = Memory(device=100 * GIB, host=100 * GIB)
    peak = {f: plan_run(model, Settings(**{**s.__dict__, "fisher": f}), big, RATES, False).peaks()[1]
            for f in ("kfac", "lowrank")}  # fmt: skip
    assert peak["kfac"] < peak["lowrank"]
    mid = (peak["kfac"] + peak["lowrank"]) / 2
    memory["m"] = Memory(device=mid, host=mid)
    assert main(["merge", str(path), "-o", str(tmp_path / "m"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("--set sst.fisher=kfac would fit") and "does not fit" in err[0]
    assert main(["plan", str(path)]) == 2
    assert capsys.readouterr().err.strip().split(": error: ", 1)[1] == err[0].split(": error: ", 1)[1]
    assert calls == []


def test_run_dry_run_plans_the_resolved_experiment_without_a_run_directory(
    no_weights, tiny_model_dir, tmp_path, capsys
):
    calls, _ = no_weights
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_model_dir), "-o", str(out), "--dry-run"]
    assert main([*args, "--set", "sst.fisher=diagonal", "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    # no adapters given: the run trains them first, and the flags reach the plan
    assert "train (one step)" in printed and "dtype bfloat16, SST diagonal" in printed
    assert not out.exists() and calls == []
    assert main([*args, "--set", "sst.fisher=nonsense"]) == 2  # validation, one line, before any estimate
    err = capsys.readouterr()
    assert len(err.err.strip().splitlines()) == 1 and "plan for" not in err.out
