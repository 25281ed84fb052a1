"""exp1–exp3 end to end on the tiny in-process model, with hand-made data files (no packages, no network)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml

from sst_merge.cli import main
from sst_merge.experiments import resolve_config, run_experiment
from sst_merge.experiments.report import write_report
from sst_merge.experiments.runner import AdapterRef, ModelSpec, Runner
from sst_merge.experiments.schema import Results
from sst_merge.testing import random_lora, tiny_model


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("exp")
    base = tiny_model()
    adapters = {
        name: random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
        for i, name in enumerate(["toy_a", "toy_b", "safety"])
    }
    harmful = _jsonl(d / "harmful.jsonl", [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(5)])
    benign = _jsonl(d / "benign.jsonl", [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(5)])
    tasks = {
        t: _jsonl(d / f"{t}.jsonl", [{"id": f"{t}{i}", "prompt": f"{t} {i}?", "answer": str(i)} for i in range(4)])
        for t in ("toy_a", "toy_b")
    }
    fs = _jsonl(d / "fs.jsonl", [{"prompt": f"bad {i}", "response": "I cannot help with that."} for i in range(4)])
    fu = _jsonl(d / "fu.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)])
    data = {
        "model": str(tiny_model_dir),
        "utility_tasks": ["toy_a"],
        "exp2_tasks": ["toy_a", "toy_b"],
        "exp2_ks": [1, 2],
        "adapters": {"safety": adapters["safety"], "utility": {"toy_a": adapters["toy_a"], "toy_b": adapters["toy_b"]}},
        "eval": {
            "harmful_source": harmful,
            "benign_source": benign,
            "task_data": tasks,
            "refusal_limit": None,
            "over_refusal_limit": None,
            "task_limit": None,
            "mmlu_limit": 0,
            "max_new_tokens": 3,
            "batch_size": 4,
        },
        "sst": {
            "fisher": "diagonal",
            "n_samples": 4,
            "batch_size": 4,
            "max_new_tokens": 3,
            "max_length": 64,
            "safety_data": fs,
            "utility_data": fu,
        },
        "sweep": {"alphas": [0.5, 1.0], "methods": ["sst", "task_arithmetic", "ties"]},
        "bootstrap": 50,
    }
    return d, data


def test_exp1_cli_end_to_end(setup, tmp_path, caplog):
    d, data = setup
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        assert main(["run", "--experiment", "exp1", "--config", str(cfg_path), "-o", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    Results.model_validate(doc)
    assert list(doc["models"]) == ["base", "utility", "safety", "sst(alpha=1)"]
    sst_spec = doc["models"]["sst(alpha=1)"]["spec"]
    assert sst_spec["method"] == "sst" and sst_spec["params"]["fisher"] == "diagonal"
    diag = doc["diagnostics"]["sst(alpha=1)"]["sst"]
    assert diag["approximation"] == "diagonal" and diag["n_safety"] == 4 and diag["n_utility"] == 4
    assert "## SST-Merge diagnostics" in (out / "report.md").read_text()
    cmp = doc["experiments"]["exp1"]["comparisons"][0]
    assert cmp["reference"] == "utility"
    # The tiny random model never refuses, so there is no safety gain and the tax is undefined (never 0 or inf).
    assert cmp["safety_gain"]["value"] <= 0
    assert cmp["safety_tax"]["value"] is None and cmp["safety_tax"]["status"] == "no safety gain"
    text = caplog.text
    for line in (
        "Baseline (pre-merge) metrics:",
        "  Baseline Safety (Refusal Rate): ",
        "  Baseline Utility (Accuracy): ",
    ):
        assert line in text
    assert "Safety Tax: undefined (no safety gain)" in text
    assert "  Baseline Over-refusal (Benign Refusal Rate): " in text and "Over-refusal Increase: " in text
    assert "Over-refusal Tax: undefined (no safety gain)" in text and "Balanced Score: " in text
    assert cmp["over_refusal_tax"] == {"value": None, "ci95": [None, None], "status": "no safety gain"}
    # One record per model × item: 5 harmful + 5 benign + 4 task items.
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 4 * (5 + 5 + 4)
    assert {json.loads(r)["model"] for r in records} == set(doc["models"])
    for metric in doc["models"]["base"]["metrics"].values():
        assert metric["n"] > 0 and metric["ci95"] is not None
    assert (out / "exp1_safety_utility.png").stat().st_size > 0


def test_report_regenerates_identical_tables(setup, tmp_path):
    d, data = setup
    out = tmp_path / "run"
    run_experiment(resolve_config("minimal", data), out, show_progress=False)
    before = {n: (out / n).read_text() for n in ("report.md", "summary.csv")}
    (out / "report.md").unlink()
    write_report(out)
    assert {n: (out / n).read_text() for n in before} == before


def test_finished_run_is_not_overwritten(setup, tmp_path):
    d, data = setup
    out = tmp_path / "run"
    run_experiment(resolve_config("minimal", data), out, show_progress=False)
    assert main(["run", "--config", str(_yaml(tmp_path, data)), "-o", str(out)]) == 2


def _yaml(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_interrupted_run_resumes_without_recomputing(setup, tmp_path):
    from sst_merge.experiments.evaluation import evaluate_all

    d, data = setup
    cfg = resolve_config("minimal", data)
    out = tmp_path / "run"
    calls = []

    def dies_after_first(*args):
        if calls:
            raise KeyboardInterrupt  # the run is killed during its second evaluation
        calls.append(1)
        return evaluate_all(*args)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, evaluate=dies_after_first, show_progress=False)
    assert not (out / "results.json").exists()

    counted = []

    def counting(*args):
        counted.append(1)
        return evaluate_all(*args)

    doc = run_experiment(cfg, out, evaluate=counting, show_progress=False)
    assert len(doc["models"]) == 4
    assert len(counted) == 3  # the base model's finished evaluation was read back, not recomputed
    assert doc["cache"] == {"hits": 1, "misses": 3}


def test_failed_merge_aborts_the_experiment(setup, tmp_path, monkeypatch):
    from sst_merge.fisher.grads import FisherError
    from sst_merge.merge.sst import SSTMerge

    d, data = setup
    evaluated = []

    def boom(self, params, ctx):
        raise FisherError("simulated failure of the Fisher step")

    monkeypatch.setattr(SSTMerge, "merge", boom)
    from sst_merge.experiments.evaluation import evaluate_all

    def spy(model, tok, cfg, tasks, path):
        evaluated.append(path)
        return evaluate_all(model, tok, cfg, tasks, path)

    out = tmp_path / "run"
    with pytest.raises(FisherError, match="simulated"):
        run_experiment(resolve_config("minimal", data), out, evaluate=spy, show_progress=False)
    assert not (out / "results.json").exists()
    assert len(evaluated) == 3  # base, utility, safety — no stand-in model was evaluated as the merge


def test_each_model_is_evaluated_from_the_untouched_base(setup, tmp_path):
    d, data = setup
    runner = Runner(resolve_config("minimal", data), tmp_path / "run", show_progress=False)
    base, _ = runner.base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    spec = ModelSpec("utility", (AdapterRef(data["adapters"]["utility"]["toy_a"], 1.0, "utility"),))
    with runner.materialised(runner.deltas(spec)) as model:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    with pytest.raises(RuntimeError, match="inside"):
        with runner.materialised(runner.deltas(spec)):
            raise RuntimeError("an evaluation failing inside")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # restored bit for bit
    # base → utility → base: the second base evaluation equals the first (no stale, mutated model).
    first = runner._evaluate(base, runner.base()[1], runner.cfg, ["toy_a"], tmp_path / "r1.jsonl")
    with runner.materialised(runner.deltas(spec)) as model:
        runner._evaluate(model, runner.base()[1], runner.cfg, ["toy_a"], tmp_path / "r2.jsonl")
    again = runner._evaluate(base, runner.base()[1], runner.cfg, ["toy_a"], tmp_path / "r3.jsonl")
    assert (tmp_path / "r1.jsonl").read_text() == (tmp_path / "r3.jsonl").read_text()
    assert {k: m.items for k, m in first.items()} == {k: m.items for k, m in again.items()}


def test_exp2_and_exp3_end_to_end(setup, tmp_path):
    d, data = setup
    out = tmp_path / "run"
    cfg = resolve_config("minimal", {**data, "experiment": "all"})
    doc = run_experiment(cfg, out, show_progress=False)
    Results.model_validate(doc)
    exp2 = doc["experiments"]["exp2"]
    assert sorted({(r["k"], r["method"]) for r in exp2["rows"]}) == sorted(
        (k, m) for k in (1, 2) for m in ("sst", "task_arithmetic", "ties")
    )
    for r in exp2["rows"]:
        assert set(r["per_task"]) == ({"toy_a"} if r["k"] == 1 else {"toy_a", "toy_b"})
    exp3 = doc["experiments"]["exp3"]
    assert set(exp3["points"]) == {"sst", "task_arithmetic", "ties"}
    assert all(len(p) == 2 for p in exp3["points"].values())  # two alphas each
    assert len(exp3["at_matched_safety"]) == 2
    assert set(exp3["at_matched_safety"][0]["over_refusal"]) == {"task_arithmetic", "ties"}
    assert set(exp3["over_refusal_fronts"]) == set(exp3["points"])
    assert len(exp3["comparisons"]) == 6
    for c in exp3["comparisons"] + exp2["comparisons"]:
        assert c["over_refusal_tax"]["status"] and "ci95" in c["over_refusal_increase"]
        assert c["balanced_score_change"]["ci95"] is not None
    assert {c["reference"] for c in exp2["comparisons"]} == {"K=1:utility", "K=2:utility"}
    for name in ("exp2_retained.png", "exp3_pareto.png", "exp3_over_refusal.png", "report.md", "summary.csv"):
        assert (out / name).stat().st_size > 0
    # every model carries the behaviour measures; the reference does not drift from itself, exactly
    for model in doc["models"].values():
        assert {"balanced_score", "benign_drift", "degenerate_harmful", "degenerate_benign"} <= set(model["metrics"])
    assert doc["models"]["utility"]["metrics"]["benign_drift"]["value"] == 0.0
    assert doc["models"]["utility"]["metrics"]["benign_drift"]["ci95"] == [0.0, 0.0]
    assert doc["models"]["ties(alpha=1)"]["metrics"]["benign_drift"]["value"] != 0.0
    report = (out / "report.md").read_text()
    assert "Over-refusal Tax" in report and "benign drift" in report
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"balanced_score", "benign_drift", "over_refusal_increase", "over_refusal_tax"} <= set(header)
    # Models shared between experiments (the utility reference of exp1 and exp3, the K=1 single-task adapter) are
    # evaluated once: one evaluation per distinct model, however many labels it has.
    keys = {m["cache_key"] for m in doc["models"].values()}
    assert doc["cache"]["misses"] == len(keys) < len(doc["models"])


def test_exp3_sweeps_named_sst_variants_as_their_own_series(setup, tmp_path):
    d, data = setup
    variants = [{"name": "eps-big", "eps": 0.1}, {"k": 2}]
    cfg = resolve_config(
        "minimal",
        {**data, "experiment": "exp3", "sweep": {"alphas": [1.0], "methods": ["sst"], "sst_params": variants}},
    )
    doc = run_experiment(cfg, tmp_path / "run", show_progress=False)
    exp3 = doc["experiments"]["exp3"]
    assert set(exp3["points"]) == {"sst", "sst[eps-big]", "sst[k=2]"}
    models = {p["model"] for pts in exp3["points"].values() for p in pts}
    assert models == {"sst(alpha=1)", "sst[eps-big](alpha=1)", "sst(alpha=1,k=2)"}
    assert doc["models"]["sst[eps-big](alpha=1)"]["spec"]["params"]["eps"] == 0.1
    params = doc["models"]["sst(alpha=1,k=2)"]["spec"]["params"]
    assert params["k"] == 2 and "share" not in params  # a variant's selection replaces the default one
    assert len(exp3["at_matched_safety"]) == 3  # one row per SST point, whatever its variant


def test_sst_variants_and_dev_split_are_validated(setup):
    from sst_merge.errors import ConfigError

    d, data = setup
    with pytest.raises(ConfigError, match=r"sweep.sst_params\[0\]"):
        resolve_config("minimal", {**data, "sweep": {"sst_params": [{"no_such_param": 1}]}})
    with pytest.raises(ConfigError, match="named 'x'"):
        resolve_config("minimal", {**data, "sweep": {"sst_params": [{"name": "x", "k": 2}, {"name": "x", "k": 4}]}})
    with pytest.raises(ConfigError, match="eval.split=dev chooses its own development sets"):
        resolve_config("minimal", {**data, "eval": {**data["eval"], "split": "dev"}})


def test_dev_split_plan_uses_development_sets_only():
    from sst_merge.data import load_source
    from sst_merge.errors import DataError
    from sst_merge.experiments.evaluation import evaluation_plan
    from sst_merge.tasks import get_task, normalize_text

    test_plan = evaluation_plan(resolve_config("full"), ["passage_qa"])
    dev_plan = evaluation_plan(resolve_config("full", {"eval": {"split": "dev"}}), ["passage_qa"])
    assert [t for t, _, _ in dev_plan] == [t for t, _, _ in test_plan]
    sources = {t: src for t, _, src in dev_plan}
    assert sources["refusal"] == "harmbench_val" and sources["over_refusal"] == "benign_dev"
    dev_tasks = {normalize_text(i["prompt"]) for i in sources["task:passage_qa"]}
    assert len(dev_tasks) == 100
    assert not dev_tasks & {normalize_text(i["prompt"]) for i in get_task("passage_qa").split(0)["eval"]}
    try:
        val, test = load_source("harmbench_val"), load_source("harmbench")
    except DataError as e:  # the HarmBench package is optional at test time
        pytest.skip(f"HarmBench not installed: {e}")
    assert len(val) == 41 and not {r["id"] for r in val} & {r["id"] for r in test}
    assert len(load_source("benign_dev")) == 60


def test_legacy_entry_point_accepts_research_flags():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "experiments/run_real_experiments.py", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for flag in ("--mode", "--model", "--experiment"):
        assert flag in r.stdout


def test_cache_key_changes_with_the_merge_method_version(setup, tmp_path, monkeypatch):
    from sst_merge.merge.sst import SSTMerge

    d, data = setup
    runner = Runner(resolve_config("minimal", data), tmp_path / "run", show_progress=False)
    refs = (AdapterRef(data["adapters"]["utility"]["toy_a"], 1.0, "utility"),)
    spec = ModelSpec("m", refs + (AdapterRef(data["adapters"]["safety"], 1.0, "safety"),), "sst", (("alpha", 1.0),))
    plain = ModelSpec("u", refs)
    before, plain_before = runner.spec_key(spec), runner.spec_key(plain)
    monkeypatch.setattr(SSTMerge, "version", SSTMerge.version + 1)
    assert runner.spec_key(spec) != before  # an sst evaluation from older method code is not reused
    assert runner.spec_key(plain) == plain_before  # models without a merge method keep their cache


def test_cache_key_changes_with_the_judge_version(setup, tmp_path, monkeypatch):
    from sst_merge.eval.judges import KeywordJudge

    d, data = setup
    runner = Runner(resolve_config("minimal", data), tmp_path / "run", show_progress=False)
    plain = ModelSpec("u", (AdapterRef(data["adapters"]["utility"]["toy_a"], 1.0, "utility"),))
    before = runner.spec_key(plain)
    monkeypatch.setattr(KeywordJudge, "version", KeywordJudge.version + 1)
    assert runner.spec_key(plain) != before  # verdicts of an older keyword judge are not reused


def test_a_new_judge_rejudges_saved_responses_without_generating(setup, tmp_path, monkeypatch):
    """Bumping the judge re-judges the cached responses: no model is merged or run, and the numbers follow the judge."""
    from sst_merge.eval.judges import KeywordJudge
    from sst_merge.experiments import evaluation

    d, data = setup
    cfg = resolve_config("minimal", {**data, "cache_dir": str(tmp_path / "cache")})
    first = run_experiment(cfg, tmp_path / "a", show_progress=False)

    def no_generation(*a, **k):
        raise AssertionError("a re-judged evaluation must not generate")

    monkeypatch.setattr(evaluation, "evaluate_all", no_generation)
    monkeypatch.setattr(Runner, "deltas", no_generation)
    monkeypatch.setattr(KeywordJudge, "version", KeywordJudge.version + 1)
    monkeypatch.setattr(KeywordJudge, "judge", lambda self, prompts, responses: ["refusal"] * len(responses))
    second = run_experiment(cfg, tmp_path / "b", show_progress=False)

    assert set(second["models"]) == set(first["models"])
    for label, model in second["models"].items():
        m = model["metrics"]
        assert m["refusal"]["value"] == 1.0 and m["over_refusal"]["value"] == 1.0  # the new judge's verdicts
        assert m["task:toy_a"] == first["models"][label]["metrics"]["task:toy_a"]  # untouched by the judge
        assert model["cache_key"] != first["models"][label]["cache_key"]
    records = [json.loads(line) for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    assert {r["verdict"] for r in records if r["task"] in ("refusal", "over_refusal")} == {"refusal"}
    # the responses are the saved ones, word for word
    old = {(r["model"], r["task"], r["id"]): r.get("response") for r in
           map(json.loads, (tmp_path / "a" / "records.jsonl").read_text().splitlines())}  # fmt: skip
    assert all(old[(r["model"], r["task"], r["id"])] == r.get("response") for r in records)


def test_the_bumped_keyword_judge_rejudges_responses_saved_under_the_previous_version(setup, tmp_path, monkeypatch):
    """Responses cached under keyword v(N-1) are judged again by the real keyword judge vN, not generated again."""
    from sst_merge.eval.judges import KeywordJudge
    from sst_merge.eval.judges.keyword import keyword_verdict
    from sst_merge.experiments import evaluation

    assert KeywordJudge.version >= 2
    d, data = setup
    cfg = resolve_config("minimal", {**data, "cache_dir": str(tmp_path / "cache")})
    with monkeypatch.context() as m:  # the previous judge: an older version that called everything a refusal
        m.setattr(KeywordJudge, "version", KeywordJudge.version - 1)
        m.setattr(KeywordJudge, "judge", lambda self, prompts, responses: ["refusal"] * len(responses))
        first = run_experiment(cfg, tmp_path / "a", show_progress=False)
    assert all(model["metrics"]["refusal"]["value"] == 1.0 for model in first["models"].values())

    def no_generation(*a, **k):
        raise AssertionError("a re-judged evaluation must not generate")

    monkeypatch.setattr(evaluation, "evaluate_all", no_generation)
    monkeypatch.setattr(Runner, "deltas", no_generation)
    second = run_experiment(cfg, tmp_path / "b", show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    judged = [r for r in records if r["task"] in ("refusal", "over_refusal")]
    assert judged and all(r["verdict"] == keyword_verdict(r["response"]) for r in judged)
    for label, model in second["models"].items():
        mine = [r["score"] for r in judged if r["model"] == label and r["task"] == "refusal"]
        assert model["metrics"]["refusal"]["value"] == pytest.approx(sum(mine) / len(mine))
    cached = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("eval-*.json")]
    assert sum("rejudged_from" in c for c in cached) == len(second["models"])
