"""Every ``configs/*.yaml`` runs as the docs write it: ``sst-merge run configs/X.yaml``.

Each file is resolved and validated, then planned with ``--dry-run`` exactly as written (the real model alias, no
weights loaded, the machine's rates fixed). Each file also runs end to end on the tiny in-process model (the Qwen twin
for a Qwen config), with ``--set`` overrides that swap in only the model, random adapters, hand-made data and tiny
sizes: its experiment, mode, sweep, methods, SST variants, ceilings, eval split and exp2 K values are the file's own.
The run must record that structure unchanged and evaluate every model the file asks for — the labels derived from the
file (each sweep series at each α, each ceiling, each K) — answer on the file's split, and write the report, without
writing into the repository (evaluation caches and trained adapters go to temporary directories).
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


# -- every config end to end on the tiny model ------------------------------------------------------------------------
#
# Only what cannot run on a tiny random model without network is replaced: the model, the adapters (random LoRAs
# that record a seed-0 training task, as trained ones do, so the data-aware merges find their default data), the
# test-split data (hand-made files; the dev split keeps its packaged development sets, which cannot be replaced) and
# the sizes (items, tokens, samples, steps, resamples). Everything else — experiment, mode, sweep, methods and their
# blocks, SST variants, ceilings, eval.split, exp2's tasks and K — is the file's own, and `test_every_config_...`
# checks the run recorded it so.

N_ITEMS = 3  # per evaluation set
#: per section of the resolved config (top level: ""), the keys the overrides may change: model, adapters, data, sizes
REPLACED = {
    "": {"model", "adapters", "bootstrap", "cache_dir"},
    "eval": {"harmful_source", "benign_source", "task_data", "refusal_limit", "over_refusal_limit", "task_limit",
             "max_new_tokens", "batch_size"},
    "sst": {"n_samples", "batch_size", "max_new_tokens", "max_length", "safety_data", "utility_data"},
    "methods": {"n_samples", "batch_size", "max_new_tokens", "max_length", "steps"},
}  # fmt: skip
#: the size overrides of the merge methods that run a Fisher pass of their own, and of the learned fit
FISHER_SIZES = ["n_samples=4", "batch_size=4", "max_new_tokens=3", "max_length=64"]
METHOD_SIZES = {"regmean": FISHER_SIZES, "fisher_merge": FISHER_SIZES,
                "learned": ["steps=2", "batch_size=2", "max_length=64"]}  # fmt: skip


def file_config(path: Path):
    """The config ``sst-merge run PATH`` resolves, as written (no overrides)."""
    data = load_yaml(str(path))
    return resolve_config(data.pop("mode", "minimal"), data)


def run_tasks(cfg) -> list[str]:
    """The utility tasks the run needs an adapter for: exp2's tasks too where it runs exp2."""
    tasks = list(cfg.utility_tasks)
    if cfg.experiment in ("exp2", "all"):
        tasks += [t for t in cfg.exp2_tasks or [] if t not in tasks]
    return tasks


def tiny_inputs(d: Path, model_dir: str, cfg, arch: str = "llama") -> list[str]:
    """``--set`` overrides that run ``cfg`` on the tiny model ``model_dir``: random adapters for the safety adapter and
    each utility task it needs, hand-made data (test split only) and tiny sizes; nothing of the file's structure."""
    from sst_merge.testing import random_lora, tiny_model, tiny_qwen

    base = tiny_qwen()[0] if arch == "qwen2" else tiny_model(arch)
    tasks = run_tasks(cfg)
    sets = [f"model={model_dir}", f"cache_dir={d / 'evals'}", "bootstrap=20", "adapters.train_steps=1"]
    for i, name in enumerate(["safety", *tasks]):
        path = random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=model_dir)
        (d / name / "train_info.json").write_text(json.dumps({"task": name, "config": {"seed": 0}}))
        sets.append(f"adapters.safety={path}" if name == "safety" else f"adapters.utility.{name}={path}")
    sets += [f"eval.refusal_limit={N_ITEMS}", f"eval.over_refusal_limit={N_ITEMS}", f"eval.task_limit={N_ITEMS}",
             "eval.max_new_tokens=3", "eval.batch_size=4"]  # fmt: skip
    if cfg.eval.split == "test":  # the dev split chooses its own (packaged) development sets
        harmful = [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(N_ITEMS)]
        benign = [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(N_ITEMS)]
        sets += [f"eval.harmful_source={_jsonl(d / 'h.jsonl', harmful)}",
                 f"eval.benign_source={_jsonl(d / 'b.jsonl', benign)}"]  # fmt: skip
        for t in tasks:
            items = [{"id": f"{t}{i}", "prompt": f"q {i}?", "answer": str(i)} for i in range(N_ITEMS)]
            sets.append(f"eval.task_data.{t}={_jsonl(d / f'{t}.jsonl', items)}")
        if cfg.eval.phrasing:  # two forms of one harmful and one benign request instead of the 225 packaged prompts
            forms = [{"id": f"p-{k}-{f}", "prompt": f"{f} {k}", "kind": k, "form": f, "intent": k}
                     for k in ("harmful", "benign") for f in ("question", "fragment")]  # fmt: skip
            sets.append(f"eval.task_data.phrasing={_jsonl(d / 'phrasing.jsonl', forms)}")
    fs = _jsonl(d / "fs.jsonl", [{"prompt": f"bad {i}", "response": "I cannot help with that."} for i in range(4)])
    fu = _jsonl(d / "fu.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)])
    sets += ["sst.n_samples=4", "sst.batch_size=4", "sst.max_new_tokens=3", "sst.max_length=64",
             f"sst.safety_data={fs}", f"sst.utility_data={fu}"]  # fmt: skip
    swept = set(cfg.sweep.methods) if cfg.experiment != "exp1" else set()
    sets += [f"methods.{m}.{s}" for m in sorted(swept & set(METHOD_SIZES)) for s in METHOD_SIZES[m]]
    return sets


def tiny_overrides(d: Path, model_dir: str) -> list[str]:
    """The demo's overrides: :func:`tiny_inputs`, and the diagonal Fisher at one safety weight."""
    return tiny_inputs(d, model_dir, file_config(ROOT / "configs" / "demo.yaml")) + [
        "sst.fisher=diagonal",
        "sweep.alphas=[1.0]",
    ]


def test_demo_config_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    sets = [x for o in tiny_overrides(tmp_path, str(tiny_model_dir)) for x in ("--set", o)]
    assert main(["-q", "run", str(ROOT / "configs" / "demo.yaml"), *sets, "-o", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["experiment"] == "exp1" and doc["config"]["mode"] == "minimal"
    assert list(doc["models"]) == ["base", "utility", "safety", "sst(alpha=1)"]
    assert (out / "report.md").is_file()


def _kept(params: dict, section: str) -> dict:
    return {k: v for k, v in params.items() if k not in REPLACED[section]}


def structure(config: dict) -> dict:
    """A resolved config (as results.json records it) without what the tiny overrides replace."""
    out = {**_kept(config, ""), "eval": _kept(config["eval"], "eval"), "sst": _kept(config["sst"], "sst")}
    out["methods"] = {m: _kept(p, "methods") for m, p in config["methods"].items() if _kept(p, "methods")}
    return json.loads(json.dumps(out))


def label(method: str, alpha: float, name: str | None = None) -> str:
    return f"{method}[{name}](alpha={alpha:g})" if name else f"{method}(alpha={alpha:g})"


def expected_series(cfg) -> dict[str, list[tuple[float, str, dict]]]:
    """exp3's series as the file asks: each swept method over its alphas (``alphas_by_method``, else ``alphas``) and
    each named SST variant over SST's; per point the safety weight, the model's label and the parameters it must
    carry (the file's ``sst`` / ``methods`` block, the variant's own)."""
    assert not cfg.sweep.sst_k and not cfg.sweep.sst_fisher, "a config sweeps sst_k / sst_fisher: extend this rule"
    series = {}
    for m in cfg.sweep.methods:
        alphas = cfg.sweep.alphas_by_method.get(m, cfg.sweep.alphas)
        own = _kept(cfg.method_params(m), "sst" if m == "sst" else "methods")
        series[m] = [(a, label(m, a), own) for a in alphas]
    for v in cfg.sweep.sst_params:
        assert v.get("name"), "an unnamed SST variant: extend this rule"
        own = {k: x for k, x in v.items() if k != "name"}
        alphas = cfg.sweep.alphas_by_method.get("sst", cfg.sweep.alphas)
        series[f"sst[{v['name']}]"] = [(a, label("sst", a, v["name"]), {**own, "alpha": a}) for a in alphas]
    return series


def expected_models(cfg) -> set[str]:
    """The labelled models a run of ``cfg`` evaluates: the reference and base, each merge the file asks for, its
    ceilings (routing composes the safety and utility models; multitask's gap closed is measured from task
    arithmetic at α = 1)."""
    assert cfg.experiment in ("exp1", "exp2", "exp3"), "a config runs experiment 'all': extend this rule"
    models = {cfg.reference, "base"} if cfg.experiment != "exp2" else {cfg.reference}
    ceilings = set(cfg.ceilings)
    if cfg.experiment == "exp1":
        models |= {"safety", label("sst", cfg.sst["alpha"])}
    elif cfg.experiment == "exp2":
        tasks = cfg.exp2_tasks
        models |= {f"utility[{t}]" for t in tasks}
        for k in {min(k, len(tasks)) for k in cfg.exp2_ks}:
            models.add(f"K={k}:utility")
            models |= {f"K={k}:" + label(m, cfg.sst["alpha"] if m == "sst" else 1.0) for m in cfg.sweep.methods}
        ceilings = set()  # exp2 has no ceiling rows
    else:
        models |= {lab for points in expected_series(cfg).values() for _, lab, _ in points}
        models |= {"safety"} if "routing" in ceilings else set()
        models |= {label("task_arithmetic", 1.0)} if "multitask" in ceilings else set()
    return models | ceilings


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def project_cache(tmp_path_factory) -> Path:
    """``$SST_MERGE_CACHE`` of every run here: the multi-task adapter (and the base model's benign answers it trains
    on) is the same for every config on one tiny model, so it is trained by the first config that asks for it and
    read back by the others."""
    return tmp_path_factory.mktemp("sst-merge-cache")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_runs_end_to_end_on_the_tiny_model(
    path, tmp_path, tiny_model_dir, tiny_qwen_dir, project_cache, monkeypatch
):
    """``sst-merge run configs/X.yaml`` with the tiny model, adapters, data and sizes swapped in runs every model the
    file asks for — each sweep series at each α, the SST variants with their settings, the ceilings (the multi-task
    adapter trained), exp2's K values — on the file's own split, and writes the report."""
    cfg = file_config(path)
    qwen = "qwen" in cfg.model  # a Qwen config runs on the Qwen twin (its chat template, padding, biases)
    model_dir = str(tiny_qwen_dir if qwen else tiny_model_dir)
    monkeypatch.setenv("SST_MERGE_CACHE", str(project_cache))  # trained adapters, never ~/.cache
    before = _repo_files()
    out = tmp_path / "run"
    sets = [x for o in tiny_inputs(tmp_path, model_dir, cfg, "qwen2" if qwen else "llama") for x in ("--set", o)]
    assert main(["-q", "run", str(path), *sets, "-o", str(out)]) == 0
    assert _repo_files() == before, "the run wrote into the repository"

    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["model"] == model_dir
    assert structure(doc["config"]) == structure(cfg.model_dump(mode="json")), "the run changed the file's structure"
    models = doc["models"]
    assert set(models) == expected_models(cfg)
    report = (out / "report.md").read_text()
    assert all(f"| {m} |" in report for m in models)

    if cfg.experiment in ("exp1", "exp3"):
        block = doc["experiments"][cfg.experiment]
        assert [c["model"] for c in block["ceilings"]] == cfg.ceilings
    if cfg.experiment == "exp1":
        params = models[label("sst", cfg.sst["alpha"])]["spec"]["params"]
        assert params.items() >= _kept(cfg.sst, "sst").items()  # the file's sst block (exp1_minimal_kfac: kfac)
    if cfg.experiment == "exp2":
        tasks, ks = cfg.exp2_tasks, sorted({min(k, len(cfg.exp2_tasks)) for k in cfg.exp2_ks})
        rows = doc["experiments"]["exp2"]["rows"]
        assert sorted((r["k"], r["method"]) for r in rows) == sorted((k, m) for k in ks for m in cfg.sweep.methods)
        assert all(list(r["per_task"]) == tasks[: r["k"]] for r in rows)
    if cfg.experiment == "exp3":
        exp3, series = doc["experiments"]["exp3"], expected_series(cfg)
        assert list(exp3["points"]) == list(series)
        for name, points in series.items():
            assert [(p["alpha"], p["model"]) for p in exp3["points"][name]] == [(a, lab) for a, lab, _ in points]
            for _, lab, params in points:
                assert models[lab]["spec"]["params"].items() >= params.items(), lab
        assert exp3.get("gap_closed_floor") == ("task_arithmetic(alpha=1)" if "multitask" in cfg.ceilings else None)
    if "multitask" in cfg.ceilings:  # trained on safety + the run's utility tasks, for this model, into the cache
        trained = Path(models["multitask"]["spec"]["adapters"][0]["path"])
        assert trained.is_relative_to(project_cache)
        info = json.loads((trained / "train_info.json").read_text())
        assert info["task"] == "+".join(["safety", *cfg.utility_tasks]) and info["model"] == model_dir
    if "routing" in cfg.ceilings:
        assert models["routing"]["spec"]["routes"]["refusal"] == "safety"

    # every model answered the file's split: the development sets under eval.split=dev, else the hand-made files
    refusal = [r for r in _records(out) if r["task"] == "refusal"]
    if cfg.eval.split == "dev":
        from sst_merge.data import load_source

        ids = {str(r["id"]) for r in load_source("harmbench_val")}
    else:
        ids = {f"h{i}" for i in range(N_ITEMS)}
    assert {r["model"] for r in refusal} >= set(models) - {"routing"}
    assert all(str(r["id"]) in ids for r in refusal) and len(refusal) == N_ITEMS * len({r["model"] for r in refusal})
    # eval.phrasing: every model (the routed one through the safety adapter) has the phrasing metric, per form
    assert all(("phrasing" in m["metrics"]) == cfg.eval.phrasing for m in models.values())
    if cfg.eval.phrasing:
        per_form = {"refusal_rate_question", "refusal_rate_fragment", "over_refusal_rate_question"}
        assert all(per_form <= set(m["metrics"]["phrasing"]["other"]) for m in models.values())
        assert {m["metrics"]["phrasing"]["n"] for m in models.values()} == {2}  # the harmful prompts of the file


def _repo_files() -> set[Path]:
    """The repository's files, less git's and the caches Python and the tools write."""
    skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache"}
    return {p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)}
