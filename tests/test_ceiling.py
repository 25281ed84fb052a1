"""The ceiling rows: the multi-task adapter (one LoRA on the union of two tasks' data) and the routing oracle."""

from __future__ import annotations

import json
import math
import re

import pytest

from sst_merge.errors import ConfigError, DataError
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


# -- the ceiling rows in exp1 / exp3, on a scripted model ------------------------------------------------------------
#
# DeltaReplyLM (sst_merge.testing) measures how much of each ΔW it holds — a (toy_a utility adapter), s (safety), m
# (the multi-task adapter) — and answers by this script (⌊x⌋ after adding 1e-6):
#   harmful [hJ] refused iff J < 2 + ⌊6s⌋ + ⌊8m⌋;  benign [oJ] refused iff J < ⌊4s⌋ + ⌊m⌋;
#   toy_a [aJ] correct iff J < ⌊8a − 4s + 7m⌋            (J = 0..9, ten items each)
#   phrasing, form F = FORMS[J % 5] (ten harmful [pJ], ten benign [qJ]): harmful refused iff J % 5 < ⌊3s⌋ + ⌊2m⌋,
#   benign refused iff J % 5 < ⌊s⌋
REFUSE = "I cannot help with that."


def _fl(x: float) -> int:
    return math.floor(x + 1e-6)


def _script(text: str, c: dict[str, float]) -> str:
    kind, j = re.search(r"\[([hoapq])(\d+)\]", text).groups()
    j, a, s, m = int(j), c["a"], c["s"], c["m"]
    if kind == "p":
        return REFUSE if j % 5 < _fl(3 * s) + _fl(2 * m) else "Sure, here it is."
    if kind == "q":
        return REFUSE if j % 5 < _fl(s) else "Sure, here it is."
    if kind == "h":
        return REFUSE if j < 2 + _fl(6 * s) + _fl(8 * m) else "Sure, here it is."
    if kind == "o":
        return REFUSE if j < _fl(4 * s) + _fl(m) else "Sure, here it is."
    return f"ans{j}" if j < _fl(8 * a - 4 * s + 7 * m) else "no idea"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, tiny_model_dir):
    from sst_merge.adapters.lora import LoraAdapter
    from sst_merge.testing import DeltaReplyLM, random_lora, tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("ceiling")
    base = tiny_model()
    paths = {
        name: random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
        for i, name in enumerate(["toy_a", "safety", "multitask"])
    }
    directions = {key: LoraAdapter.load(paths[name]).deltas() for key, name in zip("asm", paths, strict=True)}
    tok = tiny_tokenizer()

    def load():
        return DeltaReplyLM(tok, _script, directions), tok

    data = {
        "model": str(tiny_model_dir),
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": paths["safety"], "utility": {"toy_a": paths["toy_a"]}, "multitask": paths["multitask"]},
        "eval": {
            "harmful_source": _jsonl(d / "h.jsonl", [{"id": f"h{j}", "prompt": f"[h{j}] do harm"} for j in range(10)]),
            "benign_source": _jsonl(d / "o.jsonl", [{"id": f"o{j}", "prompt": f"[o{j}] be kind"} for j in range(10)]),
            "task_data": {
                "toy_a": _jsonl(
                    d / "a.jsonl", [{"id": f"a{j}", "prompt": f"[a{j}] ?", "answer": f"ans{j}"} for j in range(10)]
                )
            },
            "refusal_limit": None,
            "over_refusal_limit": None,
            "task_limit": None,
            "mmlu_limit": 0,
            "batch_size": 5,
        },
        "sst": {
            "k": "all",
            "alpha": 1.0,
            "safety_data": _jsonl(d / "fs.jsonl", [{"prompt": "[h0] bad", "response": REFUSE}]),
            "utility_data": _jsonl(d / "fu.jsonl", [{"prompt": "[a0] ?", "response": "ans0"}]),
        },
        "sweep": {"alphas": [0.5, 1.0], "methods": ["task_arithmetic", "linear"]},
        "ceilings": ["multitask", "routing"],
        "bootstrap": 200,
    }
    return data, load, paths


def _run(scripted, tmp_path, experiment, **extra):
    from sst_merge.experiments import resolve_config, run_experiment

    data, load, _ = scripted
    cfg = resolve_config("minimal", {**data, "experiment": experiment, **extra})
    return run_experiment(cfg, tmp_path / "run", load=load, show_progress=False)


def _values(doc, label):
    m = doc["models"][label]["metrics"]
    return tuple(round(m[k]["value"], 9) for k in ("refusal", "over_refusal", "task:toy_a", "balanced_score"))


def test_exp1_ceiling_rows_by_hand(scripted, tmp_path):
    doc = _run(scripted, tmp_path, "exp1")
    exp1 = doc["experiments"]["exp1"]
    # safety (s=1): refusal 0.8, over-refusal 0.4, toy_a ⌊−4⌋ → 0; utility (a=1): 0.2, 0, 0.8.
    # multitask (m=1): refusal (2+8)/10 = 1.0, over-refusal ⌊1⌋/10 = 0.1, toy_a 0.7; balanced ½(1.0 + 0.9) = 0.95.
    # routing: harmful and benign from safety (0.8, 0.4), toy_a from utility (0.8); balanced ½(0.8 + 0.6) = 0.7.
    assert _values(doc, "multitask") == (1.0, 0.1, 0.7, 0.95)
    assert _values(doc, "routing") == (0.8, 0.4, 0.8, 0.7)
    assert [p["model"] for p in exp1["ceilings"]] == ["multitask", "routing"]
    assert exp1["models"][-2:] == ["multitask", "routing"]
    # routing answers no prompt itself: its per-item scores and records are the owners', id for id
    routing, safety, utility = (doc["models"][k]["spec"] for k in ("routing", "safety", "utility"))
    assert routing["routes"] == {"refusal": "safety", "over_refusal": "safety", "task:toy_a": "utility"}
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    by = {(r["model"], r["task"], r["id"]): r["response"] for r in records}
    routed = {(t, i): resp for (mdl, t, i), resp in by.items() if mdl == "routing"}
    assert len(routed) == 30
    assert all(resp == by[("safety" if t != "task:toy_a" else "utility", t, i)] for (t, i), resp in routed.items())
    assert doc["models"]["routing"]["metrics"]["degenerate_benign"]["value"] == 0.0
    # its drift is the safety adapter's: the benign answers are the safety adapter's
    m = doc["models"]
    assert m["routing"]["metrics"]["benign_drift"]["value"] == m["safety"]["metrics"]["benign_drift"]["value"]
    # against the utility reference (S 0.2, U 0.8, OR 0): multitask gain 0.8, loss 0.1, tax 0.125, OR +0.1;
    # routing gain 0.6, loss 0, tax 0, OR +0.4
    cmps = {c["model"]: c for c in exp1["comparisons"]}
    assert cmps["multitask"]["ceiling"] and cmps["routing"]["ceiling"] and "ceiling" not in cmps["sst(alpha=1)"]
    mt, rt = cmps["multitask"], cmps["routing"]
    assert (mt["safety_gain"]["value"], mt["utility_loss"]["value"], mt["safety_tax"]["value"]) == pytest.approx(
        (0.8, 0.1, 0.125)
    )
    assert mt["over_refusal_increase"]["value"] == pytest.approx(0.1)
    assert (rt["safety_gain"]["value"], rt["utility_loss"]["value"], rt["safety_tax"]["value"]) == pytest.approx(
        (0.6, 0.0, 0.0)
    )
    # the report and the CSV carry both rows
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| multitask (ceiling) | utility |" in report and "| routing (ceiling) | utility |" in report
    csv_models = [line.split(",")[0] for line in (tmp_path / "run" / "summary.csv").read_text().splitlines()]
    assert {"multitask", "routing"} <= set(csv_models)


def test_exp3_gap_closed_by_hand(scripted, tmp_path):
    doc = _run(scripted, tmp_path, "exp3")
    exp3 = doc["experiments"]["exp3"]
    # floor: task arithmetic at α=1 (a=1, s=1): refusal 0.8, over-refusal 0.4 → balanced 0.7; toy_a 0.4.
    # bound: multitask, balanced 0.95, toy_a 0.7 → gaps 0.25 and 0.3.
    #   ta(0.5) (s=0.5): refusal 0.5, OR 0.2 → 0.65, toy_a 0.6 → (−0.05/0.25, 0.2/0.3) = (−0.2, 2/3)
    #   ta(1): (0, 0)
    #   linear(0.5) (a=2/3, s=1/3): refusal 0.4, OR 0.1 → 0.65, toy_a ⌊4⌋ = 0.4 → (−0.2, 0)
    #   linear(1) (a=s=1/2): refusal 0.5, OR 0.2 → 0.65, toy_a 0.2 → (−0.2, −2/3)
    expect = {
        "task_arithmetic(alpha=0.5)": (-0.2, 2 / 3),
        "task_arithmetic(alpha=1)": (0.0, 0.0),
        "linear(alpha=0.5)": (-0.2, 0.0),
        "linear(alpha=1)": (-0.2, -2 / 3),
    }
    cmps = {c["model"]: c for c in exp3["comparisons"]}
    for label, (bal, util) in expect.items():
        g = cmps[label]["gap_closed"]
        assert (g["balanced_score"]["value"], g["utility"]["value"]) == pytest.approx((bal, util), abs=1e-9), label
        assert (g["balanced_score"]["floor"], g["balanced_score"]["bound"]) == pytest.approx((0.7, 0.95)), label
        lo, hi = g["utility"]["ci95"]
        assert lo <= util + 1e-9 and util - 1e-9 <= hi, label
    pts = {p["model"]: p for series in exp3["points"].values() for p in series}
    assert pts["linear(alpha=1)"]["gap_closed"]["utility"] == pytest.approx(-2 / 3)
    assert exp3["gap_closed_floor"] == "task_arithmetic(alpha=1)"
    assert [p["model"] for p in exp3["ceilings"]] == ["multitask", "routing"]
    # one evaluation per model: utility, base, 2 methods × 2 α, multitask, safety (routing generates nothing)
    assert doc["cache"] == {"hits": 0, "misses": 8}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| multitask | — | 1.000 | 0.100 |" in report and "gap closed" in report
    import csv

    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "run" / "summary.csv").open())}
    assert float(rows["linear(alpha=1)"]["gap_closed_utility"]) == pytest.approx(-2 / 3)
    assert rows["multitask"]["gap_closed_utility"] == ""


def test_gap_closed_report_by_hand():
    from sst_merge.eval.stats import gap_closed_report

    # accuracy: floor 2/5, bound 4/5, merged 3/5 → (0.6 − 0.4) / (0.8 − 0.4) = 0.5
    floor, bound, merged = [[1, 1, 0, 0, 0]], [[1, 1, 1, 1, 0]], [[1, 1, 1, 0, 0]]
    r = gap_closed_report(merged, floor, bound, lambda u: u, n_boot=500, seed=0)
    assert (r["value"], r["floor"], r["bound"], r["status"]) == pytest.approx((0.5, 0.4, 0.8, "ok"))
    # the bound beats the floor on items 2-3 only: a replicate without them has no gap and is left out
    assert 0 < r["undefined_fraction"] < 1 and r["ci95"][0] <= 0.5 <= r["ci95"][1]
    assert r["ci95"][0] >= 0 and r["ci95"][1] <= 1  # merged lies between floor and bound on every item
    # balanced: h = refusal on harmful, b = on benign; floor ½(0.5 + 1 − 0.5) = 0.5, bound ½(1 + 1 − 0) = 1,
    # merged ½(1 + 1 − 0.5) = 0.75 → 0.5
    bal = gap_closed_report([[1, 1], [1, 0]], [[1, 0], [1, 0]], [[1, 1], [0, 0]], lambda h, b: (h + 1 - b) / 2,
                            n_boot=200, seed=0)  # fmt: skip
    assert bal["value"] == pytest.approx(0.5)
    # no gap: the bound equals the floor → null with a status, never a division by zero
    none = gap_closed_report(merged, floor, floor, lambda u: u, n_boot=50, seed=0)
    assert none["value"] is None and none["ci95"] is None and none["status"] == "bound not above the floor"
    assert none["undefined_fraction"] == 1.0
    with pytest.raises(DataError, match="not paired"):
        gap_closed_report([[1, 0]], [[1, 0, 1]], [[1, 1]], lambda u: u)


def test_gap_closed_is_null_when_the_bound_is_not_above_task_arithmetic(scripted, tmp_path):
    # the toy_a adapter as "multi-task" (a=1): balanced ½(0.2 + 1) = 0.6 < 0.7 → null; toy_a 0.8 > 0.4 → defined
    data, _, paths = scripted
    doc = _run(scripted, tmp_path, "exp3", adapters={**data["adapters"], "multitask": paths["toy_a"]},
               ceilings=["multitask"])  # fmt: skip
    g = {c["model"]: c.get("gap_closed") for c in doc["experiments"]["exp3"]["comparisons"]}[
        "task_arithmetic(alpha=0.5)"
    ]
    assert g["balanced_score"]["value"] is None and g["balanced_score"]["status"] == "bound not above the floor"
    assert g["utility"]["value"] == pytest.approx((0.6 - 0.4) / (0.8 - 0.4))
    assert "routing" not in doc["models"]


def test_ceilings_default_on_in_full_mode_off_in_minimal():
    from sst_merge.experiments import resolve_config

    assert resolve_config("full").ceilings == ["multitask", "routing"]
    assert resolve_config("minimal").ceilings == []
    assert resolve_config("minimal", overrides=["ceilings=[routing]"]).ceilings == ["routing"]
    with pytest.raises(ConfigError, match="ceilings"):
        resolve_config("minimal", overrides=["ceilings=[oracle]"])


# -- per-method parameters and safety weights (config `methods`, `sweep.alphas_by_method`) ---------------------------


def test_method_blocks_are_checked_against_each_methods_params():
    from sst_merge.experiments import resolve_config

    cfg = resolve_config("minimal", {"methods": {"ties": {"density": 0.3}, "linear": {"lambda": 2}}})
    assert cfg.method_params("ties") == {"density": 0.3} and cfg.method_params("task_arithmetic") == {}
    assert cfg.method_params("sst") == cfg.sst  # sst keeps its own section
    with pytest.raises(
        ConfigError, match=r"methods\.tiez: unknown merge method 'tiez'; choose one of: .*Did you mean 'ties'"
    ):
        resolve_config("minimal", overrides=["methods.tiez.density=0.3"])
    with pytest.raises(ConfigError, match=r"methods\.ties: unknown key 'densty'; valid keys: density, lambda, seed"):
        resolve_config("minimal", overrides=["methods.ties.densty=0.3"])
    with pytest.raises(ConfigError, match=r"methods\.ties: density: Input should be less than or equal to 1"):
        resolve_config("minimal", overrides=["methods.ties.density=2"])
    with pytest.raises(ConfigError, match="methods.sst: .* `sst` section"):
        resolve_config("minimal", overrides=["methods.sst.alpha=2"])
    # the data-aware methods' own blocks: {regmean: {reduce_non_diagonal: 0.9}}, and its range checked (r ≤ 1)
    assert resolve_config("minimal", overrides=["methods.regmean.reduce_non_diagonal=0.9"]).method_params(
        "regmean"
    ) == {"reduce_non_diagonal": 0.9}
    with pytest.raises(ConfigError, match=r"methods\.regmean: reduce_non_diagonal: Input should be less than or eq"):
        resolve_config("minimal", overrides=["methods.regmean.reduce_non_diagonal=1.5"])
    # ties requires a density, which the run fills from sweep.density: a block without one is valid
    assert resolve_config("minimal", overrides=["methods.ties.lambda=0.5"]).methods == {"ties": {"lambda": 0.5}}


def test_alphas_by_method_fall_back_to_alphas_and_name_only_swept_methods():
    from sst_merge.experiments import resolve_config
    from sst_merge.experiments.config import alphas_of

    cfg = resolve_config("minimal", overrides=["sweep.alphas_by_method.ties=[1, 3, 6]"])
    assert alphas_of(cfg.sweep, "ties") == [1, 3, 6] and alphas_of(cfg.sweep, "sst") == cfg.sweep.alphas == [0.5, 1.0]
    with pytest.raises(ConfigError, match=r"sweep\.alphas_by_method\.linear: linear is not swept; add it"):
        resolve_config("minimal", overrides=["sweep.alphas_by_method.linear=[2]"])
    with pytest.raises(ConfigError, match="at least one safety weight"):
        resolve_config("minimal", overrides=["sweep.alphas_by_method.ties=[]"])


def test_a_methods_block_and_its_alphas_reach_the_merge(scripted, tmp_path):
    # linear at λ = 2 and α = 1 is 2·(τ_a + τ_s)/2 = τ_a + τ_s: task arithmetic at α = 1 (refusal 0.8, toy_a 0.4);
    # without the block it would be (τ_a + τ_s)/2 (refusal 0.5, toy_a 0.2). Only α = 1 is swept for linear.
    # ties takes its density from its block (0.3), not from sweep.density (0.5)
    doc = _run(scripted, tmp_path, "exp3", ceilings=[], methods={"linear": {"lambda": 2}, "ties": {"density": 0.3}},
               sweep={"alphas": [0.5, 1.0], "methods": ["task_arithmetic", "linear", "ties"],
                      "alphas_by_method": {"linear": [1.0], "ties": [2.0]}})  # fmt: skip
    assert doc["models"]["ties(alpha=2)"]["spec"]["params"]["density"] == 0.3
    assert [p["alpha"] for p in doc["experiments"]["exp3"]["points"]["ties"]] == [2.0]
    pts = doc["experiments"]["exp3"]["points"]
    assert [(p["alpha"], p["safety"], p["utility"]) for p in pts["linear"]] == [(1.0, 0.8, pytest.approx(0.4))]
    assert [p["alpha"] for p in pts["task_arithmetic"]] == [0.5, 1.0]
    assert doc["models"]["linear(alpha=1)"]["spec"]["params"]["lambda"] == 2


def test_phrasing_forms_are_evaluated_routed_and_reported(scripted, tmp_path):
    from sst_merge.eval.phrasing import FORMS

    data = scripted[0]
    rows = [{"id": f"{k}{j}", "prompt": f"[{k}{j}] request", "kind": kind, "form": FORMS[j % 5]}
            for k, kind in (("p", "harmful"), ("q", "benign")) for j in range(10)]  # fmt: skip
    phrasing = _jsonl(tmp_path / "phrasing.jsonl", rows)
    ev = {**data["eval"], "phrasing": True, "task_data": {**data["eval"]["task_data"], "phrasing": phrasing}}
    doc = _run(scripted, tmp_path, "exp1", eval=ev)
    # safety (s=1): harmful forms 0-2 (question, imperative, polite) refused → 1, 1, 1, 0, 0, overall 0.6; benign
    # form 0 (question) refused → over-refusal 1, 0, 0, 0, 0. utility (s=0): nothing refused. multitask (m=1): forms
    # 0-1 refused → 1, 1, 0, 0, 0, overall 0.4. routing: the safety adapter's.
    expect = {"safety": ((1, 1, 1, 0, 0), (1, 0, 0, 0, 0), 0.6), "utility": ((0,) * 5, (0,) * 5, 0.0),
              "multitask": ((1, 1, 0, 0, 0), (0,) * 5, 0.4), "routing": ((1, 1, 1, 0, 0), (1, 0, 0, 0, 0), 0.6)}  # fmt: skip
    for label, (refusal, over, overall) in expect.items():
        m = doc["models"][label]["metrics"]["phrasing"]
        assert tuple(m["other"][f"refusal_rate_{f}"] for f in FORMS) == refusal, label
        assert tuple(m["other"][f"over_refusal_rate_{f}"] for f in FORMS) == over, label
        assert m["value"] == pytest.approx(overall) and m["n"] == 10, label
    assert doc["models"]["routing"]["spec"]["routes"]["phrasing"] == "safety"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Refusal by phrasing form" in report
    assert "| safety | 1.000 | 1.000 | 1.000 | 0.000 | 0.000 | 1.000 | 0.000 | 0.000 | 0.000 | 0.000 |" in report


def test_phrasing_off_leaves_every_cache_key_as_it_was(scripted, tmp_path, monkeypatch):
    from sst_merge.experiments import resolve_config
    from sst_merge.experiments import runner as runner_mod

    data, load, _ = scripted
    hashed = []
    real = runner_mod.stable_hash
    monkeypatch.setattr(runner_mod, "stable_hash", lambda payload: hashed.append(payload) or real(payload))
    off = runner_mod.Runner(resolve_config("minimal", data), tmp_path, load=load)
    on = runner_mod.Runner(resolve_config("minimal", {**data, "eval": {**data["eval"], "phrasing": True}}), tmp_path,
                           load=load)  # fmt: skip
    spec = runner_mod.ModelSpec("base")
    assert off.spec_key(spec) != on.spec_key(spec)
    # off: the evaluation settings hashed are the ones that existed before the field (so cached evaluations stay
    # valid); on: the field joins them
    assert "phrasing" not in hashed[0]["eval"] and "split" not in hashed[0]["eval"]
    assert hashed[1]["eval"]["phrasing"] is True
    assert set(hashed[0]["eval"]) == set(hashed[1]["eval"]) - {"phrasing"}


def test_the_multitask_adapter_is_trained_on_first_use_before_any_evaluation(scripted, tmp_path, monkeypatch):
    import sst_merge.train as train_pkg
    from sst_merge.experiments import resolve_config, run_experiment

    data, load, paths = scripted
    loaded, calls = [], []

    def fake_train(model, task, **kw):
        calls.append((task, kw, bool(loaded)))
        return paths["multitask"]

    monkeypatch.setattr(train_pkg, "train_adapter", fake_train)
    cfg = resolve_config("minimal", {**data, "experiment": "exp1", "ceilings": ["multitask"],
                                     "adapters": {**data["adapters"], "multitask": None, "train_steps": 3}})  # fmt: skip
    doc = run_experiment(cfg, tmp_path / "run", load=lambda: loaded.append(1) or load(), show_progress=False)
    # safety + the run's one utility task, at the step budget of both (3 + 3), before the model was loaded
    assert calls == [("safety+toy_a", {"seed": 0, "steps": 6}, False)]
    assert doc["models"]["multitask"]["spec"]["adapters"][0]["path"] == paths["multitask"]
