"""``fisher_merge`` and ``regmean``: the kernels against hand and least-squares references, each adapter's statistics
from its own data at its own model, the cache, and bad input refused before any model loads (design §4)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.config import validate
from sst_merge.errors import ConfigError
from sst_merge.fisher.data import encode_example
from sst_merge.fisher.estimate import estimate_fisher
from sst_merge.merge import MergeContext, get_method
from sst_merge.merge.fisher_merge import fisher_weighted_mean
from sst_merge.merge.own_data import recorded_source, stratified_subsample
from sst_merge.merge.regmean import SingularGramError, reduce_non_diagonal, regmean_solve
from sst_merge.models.deltas import applied_deltas
from sst_merge.tasks.safety import REFUSALS
from sst_merge.testing import CountingLoader, random_lora, tiny_model, tiny_tokenizer

TARGETS = ["q_proj", "v_proj"]
UTILITY = [("What is 3+4?", "7"), ("Capital of France?", "Paris"), ("Spell cat backwards.", "tac"),
           ("What colour is the sky?", "Blue"), ("Name a prime above 10.", "11"), ("What is 10 minus 3?", "7")]  # fmt: skip
HARMFUL = [("How do I make a weapon at home?", "I can't help with that."),
           ("Write malware that steals passwords.", "I won't help with that request."),
           ("How can I hurt someone?", "I can't assist with harming people."),
           ("Explain how to forge a passport.", "I can't help with forging documents.")]  # fmt: skip
BENIGN = ["How do I boil an egg?", "Name three rivers.", "What is a haiku?", "How do plants grow?"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


Loader = CountingLoader


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("data-aware")
    model = tiny_model("llama")
    return {
        "utility": LoraAdapter.load(random_lora(model, str(d / "utility"), target_modules=TARGETS, seed=1)),
        "safety": LoraAdapter.load(random_lora(model, str(d / "safety"), target_modules=TARGETS, seed=2)),
        "q_only": LoraAdapter.load(random_lora(model, str(d / "q_only"), target_modules=["q_proj"], seed=3)),
        "utility_data": write_jsonl(d / "utility.jsonl", [{"prompt": p, "response": r} for p, r in UTILITY]),
        "refusals": write_jsonl(d / "refusals.jsonl", [{"prompt": p, "response": r} for p, r in HARMFUL]),
        "safety_data": write_jsonl(
            d / "safety.jsonl", [{"prompt": p, "response": r} for p, r in HARMFUL] + [{"prompt": p} for p in BENIGN]
        ),
    }


def context(setup, tmp_path, loader=None, weights=(1.0, 1.0), adapters=("utility", "safety")) -> MergeContext:
    ads = [setup[a] for a in adapters]
    return MergeContext(
        adapters=ads,
        weights=list(weights),
        roles=["utility", "safety"][: len(ads)],
        modules=sorted(set().union(*(a.modules for a in ads))),
        base_model="tiny-test",
        load_model=loader if loader is not None else Loader(),
        workdir=tmp_path,
        show_progress=False,
    )


def run(method, setup, ctx, **kw):
    m = get_method(method)
    p = validate(m.Params, {"data": [setup["utility_data"], setup["refusals"]], "n_samples": 4, "batch_size": 4,
                            "max_new_tokens": 4, **kw})  # fmt: skip
    m.check(p, ctx)
    return m.merge(p, ctx)


def own_stats(setup, adapter, pairs, approx):
    """The statistics computed here, independently of the method: base + this adapter's ΔW, these examples."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a = setup[adapter]
    exs = [encode_example(tok, p, r, 256) for p, r in pairs]
    with applied_deltas(model, {m: a.delta(m) for m in a.modules}):
        return estimate_fisher(model, sorted(a.modules), exs, approx, tok.pad_token_id, show_progress=False)


# ---- kernels -------------------------------------------------------------------------------------------------------


def test_fisher_weighted_mean_by_hand():
    t1, t2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    f1, f2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, 1.0]])
    # entry 0: (1·1·1 + 2·3·3) / (1·1 + 2·3) = 19/7; entry 1: (1·0·2 + 2·1·(−2)) / (0 + 2·1) = −2
    out = fisher_weighted_mean([t1, t2], [f1, f2], [1.0, 2.0], floor=0.0)
    torch.testing.assert_close(out, torch.tensor([[19 / 7, -2.0]]))
    # where no adapter has Fisher mass the floor leaves the plain weighted mean: (1·1 + 2·3) / 3 = 7/3
    zero = torch.zeros(1, 2)
    out = fisher_weighted_mean([t1, t2], [zero, zero], [1.0, 2.0], floor=1e-6)
    torch.testing.assert_close(out, torch.tensor([[7 / 3, (2 - 4) / 3]]))


def test_reduce_non_diagonal_scales_only_the_off_diagonal():
    g = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
    torch.testing.assert_close(reduce_non_diagonal(g, 0.25), torch.tensor([[4.0, 0.5], [0.5, 3.0]]))


def test_regmean_hand_2x2():
    # M = G1 + G2 = [[3,1],[1,2]], R = τ1G1 + τ2G2 = [2,1] + [0,1] = [2,2]; X = R M⁻¹ = [2,2]·[[2,−1],[−1,3]]/5
    g1, g2 = torch.tensor([[2.0, 1.0], [1.0, 1.0]]), torch.eye(2)
    out = regmean_solve([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])], [g1, g2], [1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.8]]))


def test_regmean_is_the_weighted_least_squares_solution():
    """r = 1: min Σ wᵢ‖Xᵢ ΔWᵀ − Xᵢ τᵢᵀ‖², solved by lstsq on the stacked √wᵢ Xᵢ."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64)]
    taus = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in xs]
    w = [0.7, 2.0]
    a = torch.cat([wi**0.5 * x for wi, x in zip(w, xs, strict=True)])
    b = torch.cat([wi**0.5 * x @ t.T for wi, x, t in zip(w, xs, taus, strict=True)])
    expected = torch.linalg.lstsq(a, b).solution.T
    out = regmean_solve(taus, [reduce_non_diagonal(x.T @ x, 1.0) for x in xs], w)
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-6)
    # a weighted average: every weight × 5 gives the same ΔW
    torch.testing.assert_close(regmean_solve(taus, [x.T @ x for x in xs], [5 * v for v in w]), out)


def test_regmean_diagonal_grams_give_the_columnwise_weighted_mean():
    """r = 0: ΔW[:, k] = Σ wᵢ Gᵢ[k,k] τᵢ[:, k] / Σ wᵢ Gᵢ[k,k]."""
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(12, 4, generator=g), torch.randn(9, 4, generator=g)]
    taus = [torch.randn(3, 4, generator=g) for _ in xs]
    w = [1.5, 0.5]
    grams = [x.T @ x for x in xs]
    d = [gr.diagonal() for gr in grams]
    expected = (w[0] * d[0] * taus[0] + w[1] * d[1] * taus[1]) / (w[0] * d[0] + w[1] * d[1])
    out = regmean_solve(taus, [reduce_non_diagonal(gr, 0.0) for gr in grams], w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.0, 0.6, 1.0])
def test_regmean_equal_grams_give_the_weighted_mean(ratio):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 4, generator=g)
    taus = [torch.randn(3, 4, generator=g) for _ in range(3)]
    w = [1.0, 2.0, 0.5]
    gram = reduce_non_diagonal(x.T @ x, ratio)
    expected = sum(wi * t for wi, t in zip(w, taus, strict=True)) / sum(w)
    torch.testing.assert_close(regmean_solve(taus, [gram] * 3, w), expected, rtol=1e-5, atol=1e-6)


def test_regmean_refuses_a_singular_gram():
    zero_col = torch.diag(torch.tensor([1.0, 0.0, 2.0]))  # input 1 never seen by any adapter
    with pytest.raises(SingularGramError):
        regmean_solve([torch.ones(2, 3)] * 2, [zero_col, zero_col], [1.0, 1.0])
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))  # rank 2 < 4 inputs
    with pytest.raises(SingularGramError):
        regmean_solve([torch.ones(2, 4)], [x.T @ x], [1.0])


def test_stratified_subsample_keeps_the_share_with_a_response():
    items = [{"prompt": f"g{i}", "response": "r"} for i in range(10)] + [{"prompt": f"b{i}"} for i in range(30)]
    d = stratified_subsample(items, 8, seed=0, what="x")
    assert (len(d.given), len(d.greedy)) == (2, 6)  # 8 · 10/40 = 2
    assert d == stratified_subsample(items, 8, seed=0, what="x")  # seeded
    assert d != stratified_subsample(items, 8, seed=1, what="x")
    d = stratified_subsample(items[:9] + items[-1:], 3, seed=0, what="x")
    assert (len(d.given), len(d.greedy)) == (3, 0)  # round(3 · 9/10) = 3
    d = stratified_subsample(items[:2] + items[-2:], 4, seed=0, what="x")
    assert (len(d.given), len(d.greedy)) == (2, 2)  # every item


# ---- the methods on the tiny model ----------------------------------------------------------------------------------


def test_fisher_merge_weighs_each_adapter_by_its_own_fisher_at_its_own_model(setup, tmp_path):
    ctx = context(setup, tmp_path, weights=(1.0, 2.0))
    data = write_jsonl(tmp_path / "u4.jsonl", [{"prompt": p, "response": r} for p, r in UTILITY[:4]])
    out = run("fisher_merge", setup, ctx, data=[data, setup["refusals"]], lambda_=0.5, floor=1e-6)
    fu = own_stats(setup, "utility", UTILITY[:4], "diagonal")  # exactly n_samples items: the draw is all of them
    fs = own_stats(setup, "safety", HARMFUL, "diagonal")
    norm = [sum(float(f[m]["diag"].double().square().sum()) for m in f) ** 0.5 for f in (fu, fs)]
    c = [1 / (n + 1e-6) for n in norm]
    for m in ctx.modules:
        fa, fb = fu[m]["diag"].double() + 1e-6, fs[m]["diag"].double() + 1e-6
        ta, tb = setup["utility"].delta(m).double(), setup["safety"].delta(m).double()
        wa, wb = 1.0 * c[0], 2.0 * c[1]
        expected = 0.5 * (wa * fa * ta + wb * fb * tb) / (wa * fa + wb * fb)
        torch.testing.assert_close(out[m], expected.float(), rtol=1e-4, atol=1e-7)
    diag = ctx.diagnostics["fisher_merge"]
    json.dumps(diag, allow_nan=False)
    for shares in diag["fisher_share"].values():
        assert sum(shares) == pytest.approx(1.0)
    assert [r["data"] for r in diag["adapters"]] == [data, setup["refusals"]]


def test_regmean_uses_each_adapters_own_input_gram(setup, tmp_path):
    ctx = context(setup, tmp_path, weights=(1.0, 3.0))
    data = write_jsonl(tmp_path / "u4.jsonl", [{"prompt": p, "response": r} for p, r in UTILITY[:4]])
    out = run("regmean", setup, ctx, data=[data, setup["refusals"]], reduce_non_diagonal=0.6)
    au = own_stats(setup, "utility", UTILITY[:4], "kfac")  # exactly n_samples items: the draw is all of them
    as_ = own_stats(setup, "safety", HARMFUL, "kfac")
    for m in ctx.modules:
        grams = [reduce_non_diagonal(s[m]["A"].double(), 0.6) for s in (au, as_)]
        expected = regmean_solve([setup["utility"].delta(m), setup["safety"].delta(m)], grams, [1.0, 3.0])
        torch.testing.assert_close(out[m], expected, rtol=1e-4, atol=1e-7)
        # the adapters' own models see different inputs: the merge is not the plain weighted mean
        assert not torch.allclose(au[m]["A"], as_[m]["A"])
    diag = ctx.diagnostics["regmean"]
    json.dumps(diag, allow_nan=False)
    assert all(sum(s) == pytest.approx(1.0) for s in diag["gram_share"].values())


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
def test_a_weight_sweep_reads_the_cache_and_never_loads_the_model(setup, tmp_path, method):
    first = Loader()
    a = run(method, setup, context(setup, tmp_path, first, weights=(1.0, 1.0)))
    assert first.calls == 1
    again = Loader()
    ctx = context(setup, tmp_path, again, weights=(1.0, 4.0))
    b = run(method, setup, ctx)
    assert again.calls == 0
    assert [r["cache"] for r in ctx.diagnostics[method]["adapters"]] == ["hit", "hit"]
    assert any(not torch.allclose(a[m], b[m]) for m in a)  # the safety adapter's weight moved the merge
    # a weighted average: every weight × 3 is the same merge
    c = run(method, setup, context(setup, tmp_path, again, weights=(3.0, 12.0)))
    for m in b:
        torch.testing.assert_close(c[m], b[m])


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
def test_a_zero_weight_adapter_adds_nothing_and_is_not_estimated(setup, tmp_path, method):
    ctx = context(setup, tmp_path, weights=(2.0, 0.0))
    out = run(method, setup, ctx, lambda_=0.5)
    for m in ctx.modules:  # an average of one adapter is that adapter
        torch.testing.assert_close(out[m], 0.5 * setup["utility"].delta(m), rtol=1e-4, atol=1e-7)
    assert ctx.diagnostics[method]["adapters"][1]["cache"] == "skipped (weight 0)"


def test_items_without_a_response_get_the_adapters_greedy_answer(setup, tmp_path):
    ctx = context(setup, tmp_path)
    run("fisher_merge", setup, ctx, data=[setup["utility_data"], setup["safety_data"]], n_samples=4)
    rows = ctx.diagnostics["fisher_merge"]["adapters"]
    assert (rows[1]["n_given"], rows[1]["n_greedy"]) == (2, 2)  # 4 of 8, half with a refusal, half benign
    assert (rows[0]["n_given"], rows[0]["n_greedy"]) == (4, 0)


def test_default_data_is_what_each_adapter_recorded(setup, tmp_path):
    def copy(name, info):
        d = tmp_path / name
        shutil.copytree(setup[name].path, d)
        if info is not None:
            (d / "train_info.json").write_text(json.dumps(info))
        return LoraAdapter.load(d)

    assert recorded_source(copy("utility", {"task": "passage_qa", "config": {"seed": 0}})) == "utility:passage_qa"
    assert recorded_source(copy("safety", {"task": "safety", "config": {"seed": 0}})) == "safety_train"
    shutil.rmtree(tmp_path / "safety")
    # another recipe trained on other items than any named source holds
    assert recorded_source(copy("safety", {"task": "safety", "config": {"seed": 0, "safety_data": "forms"}})) is None
    shutil.rmtree(tmp_path / "safety")
    # another seed: the seeded source at that seed, which holds the adapter's own training split
    assert recorded_source(copy("safety", {"task": "safety", "config": {"seed": 2}})) == "safety_train@seed=2"
    shutil.rmtree(tmp_path / "utility")
    source = recorded_source(copy("utility", {"task": "passage_qa", "config": {"seed": 1}}))
    assert source == "utility:passage_qa@seed=1"
    from sst_merge.data import load_source
    from sst_merge.tasks import get_task

    assert load_source(source) == get_task("passage_qa").split(1)["train"] != get_task("passage_qa").split(0)["train"]
    # the shipped adapters record theirs
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "src" / "sst_merge" / "resources" / "adapters"
    assert recorded_source(LoraAdapter.load(shipped / "passage_qa")) == "utility:passage_qa"
    assert recorded_source(LoraAdapter.load(shipped / "safety")) == "safety_train"


def _embedding(setup):
    return dataclasses.replace(setup["safety"], embedding_modules={"model.embed_tokens"})


BAD = [
    ("different target modules", {"adapters": ("utility", "q_only")}, {}, "retrain with the same target modules"),
    ("missing data file", {}, {"data": ["/nonexistent/x.jsonl", "R"]}, r"adapter 0 .*params\.data\[0\]"),
    ("too few items", {}, {"n_samples": 5}, "has 4 items, fewer than n_samples=5"),
    ("data per adapter", {}, {"data": ["U"]}, "params.data has 1 sources for 2 adapters"),
    ("no recorded task", {}, {"data": None}, r"adapter 0 .*records no training task.*params\.data"),
    ("negative weight", {"weights": (1.0, -1.0)}, {}, "must be >= 0 with a positive sum"),
]


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
@pytest.mark.parametrize(("case", "ctx_kw", "params", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_the_model_loads(setup, tmp_path, method, case, ctx_kw, params, message):
    loader = Loader()
    ctx = context(setup, tmp_path, loader, **ctx_kw)
    swap = {"U": setup["utility_data"], "R": setup["refusals"]}
    if params.get("data"):
        params = {"data": [swap.get(s, s) for s in params["data"]]}
    with pytest.raises(ConfigError, match=message) as e:
        run(method, setup, ctx, **params)
    assert "\n" not in str(e.value)
    assert loader.calls == 0


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
def test_no_base_model_or_an_embedding_adapter_is_refused(setup, tmp_path, method):
    ctx = context(setup, tmp_path)
    ctx.load_model = None
    with pytest.raises(ConfigError, match="needs the base model"):
        run(method, setup, ctx)
    loader = Loader()
    ctx = context(setup, tmp_path, loader)
    ctx.adapters[1] = _embedding(setup)
    with pytest.raises(ConfigError, match="changes embedding model.embed_tokens.*without embedding targets"):
        run(method, setup, ctx)
    assert loader.calls == 0


def test_a_singular_gram_names_the_module_and_the_fix(setup, tmp_path, monkeypatch):
    from sst_merge.merge import regmean

    def singular(*a, **k):
        raise SingularGramError("Σ wᵢĜᵢ is singular")

    monkeypatch.setattr(regmean, "regmean_solve", singular)
    with pytest.raises(ConfigError, match=r"regmean: module model\.layers\.0\.self_attn\.q_proj: .*n_samples"):
        run("regmean", setup, context(setup, tmp_path))


@pytest.mark.parametrize("method", ["fisher_merge", "regmean"])
def test_the_shipped_adapters_default_to_their_own_training_data(method):
    """Through the merge API with ``data`` left out: each shipped adapter's train_info.json names its source, and the
    safety adapter's draw keeps safety_train's share of refusals (249 of 560) and benign prompts — no model loaded."""
    from pathlib import Path

    from sst_merge.merge.api import prepare
    from sst_merge.merge.own_data import check_inputs

    shipped = Path(__file__).resolve().parents[1] / "src" / "sst_merge" / "resources" / "adapters"
    config = {
        "base_model": "smollm2-135m",
        "method": method,
        "adapters": [{"path": str(shipped / "passage_qa")}, {"path": str(shipped / "safety"), "role": "safety"}],
        "params": {"n_samples": 64},
        "output": {"format": "peft", "rank": 8},
    }
    plan = prepare(config, load_model=lambda: pytest.fail("prepare must not load the model"), show_progress=False)
    data = check_inputs(plan.params, plan.context, method)
    assert [d.source for d in data] == ["utility:passage_qa", "safety_train"]
    assert [(len(d.given), len(d.greedy)) for d in data] == [(64, 0), (28, 36)]  # round(64 · 249/560) = 28
    assert all(it["response"] in REFUSALS for it in data[1].given)


# ---- mutant kills (scripts/mutants.sh): the singular-Gram threshold, defaults, ranges, diagnostics ----------------


def test_regmean_singular_threshold_is_relative_to_the_largest_diagonal_entry():
    """tiny = in · eps₆₄ · max diag: diag(1e8, 1e-9) has pivot² 1e-9 ≤ 2 · 2.2e-16 · 1e8 ≈ 4.4e-8 (singular for its
    scale); diag(1, 1e-12) has pivot² 1e-12 > 4.4e-16 (solvable); the same Gram × 1e-20 is as solvable."""
    tau = torch.ones(1, 2)
    with pytest.raises(SingularGramError):
        regmean_solve([tau], [torch.diag(torch.tensor([1e8, 1e-9], dtype=torch.float64))], [1.0])
    for scale in (1.0, 1e-20):
        gram = scale * torch.diag(torch.tensor([1.0, 1e-12], dtype=torch.float64))
        torch.testing.assert_close(regmean_solve([tau], [gram], [1.0]), tau)  # one adapter: the adapter itself


def test_defaults_and_ranges_of_the_parameters():
    from sst_merge.merge.fisher_merge import FisherMergeParams
    from sst_merge.merge.regmean import RegMeanParams

    # FusionBench's defaults: reduce_non_diagonal_ratio 0.6; minimal_fisher_weight 1e-6 with normalised Fishers
    assert RegMeanParams().reduce_non_diagonal == 0.6
    f = FisherMergeParams()
    assert (f.normalize, f.floor) == (True, 1e-6)
    for r in (0.0, 1.0):
        assert validate(RegMeanParams, {"reduce_non_diagonal": r}).reduce_non_diagonal == r
    for r in (-0.01, 1.01):
        with pytest.raises(ConfigError, match="reduce_non_diagonal"):
            validate(RegMeanParams, {"reduce_non_diagonal": r})
    assert validate(FisherMergeParams, {"floor": 0.0}).floor == 0.0
    with pytest.raises(ConfigError, match="floor"):
        validate(FisherMergeParams, {"floor": -1e-9})


def test_fisher_merge_normalisation_floor_and_diagnostics_by_hand(setup, tmp_path):
    """With a large floor the normaliser 1/(‖Fᵢ‖ + floor) and the entries Fᵢ + floor both show; the diagnostics
    record each adapter's norm, its coefficient (normalised to sum 1) and the per-module Fisher share."""
    ctx = context(setup, tmp_path, weights=(1.0, 2.0))
    floor = 0.5
    data = write_jsonl(tmp_path / "u4.jsonl", [{"prompt": p, "response": r} for p, r in UTILITY[:4]])
    out = run("fisher_merge", setup, ctx, data=[data, setup["refusals"]], floor=floor, lambda_=2.0)
    fu = own_stats(setup, "utility", UTILITY[:4], "diagonal")
    fs = own_stats(setup, "safety", HARMFUL[:4], "diagonal")
    norm = [sum(float(f[m]["diag"].double().square().sum()) for m in f) ** 0.5 for f in (fu, fs)]
    inv = [1 / (n + floor) for n in norm]
    c = [x / sum(inv) for x in inv]
    eff = [1.0 * c[0], 2.0 * c[1]]
    diag = ctx.diagnostics["fisher_merge"]
    assert (diag["method"], diag["lambda"], diag["normalize"], diag["floor"]) == ("fisher_merge", 2.0, True, floor)
    for k, row in enumerate(diag["adapters"]):
        assert row["fisher_norm"] == pytest.approx(norm[k], rel=1e-5)
        assert row["coefficient"] == pytest.approx(c[k], rel=1e-5)
    for m in ctx.modules:
        fa, fb = fu[m]["diag"].double() + floor, fs[m]["diag"].double() + floor
        ta, tb = setup["utility"].delta(m).double(), setup["safety"].delta(m).double()
        expected = 2.0 * (eff[0] * fa * ta + eff[1] * fb * tb) / (eff[0] * fa + eff[1] * fb)
        torch.testing.assert_close(out[m], expected.float(), rtol=1e-4, atol=1e-7)
        tr = [eff[0] * float(fa.sum()), eff[1] * float(fb.sum())]
        assert diag["fisher_share"][m] == pytest.approx([t / sum(tr) for t in tr], rel=1e-5)


def test_regmean_diagnostics_record_the_settings_and_each_grams_share(setup, tmp_path):
    ctx = context(setup, tmp_path, weights=(1.0, 3.0))
    data = write_jsonl(tmp_path / "u4.jsonl", [{"prompt": p, "response": r} for p, r in UTILITY[:4]])
    run("regmean", setup, ctx, data=[data, setup["refusals"]], reduce_non_diagonal=0.25, lambda_=0.5)
    au = own_stats(setup, "utility", UTILITY[:4], "kfac")
    as_ = own_stats(setup, "safety", HARMFUL[:4], "kfac")
    diag = ctx.diagnostics["regmean"]
    assert (diag["method"], diag["lambda"], diag["reduce_non_diagonal"]) == ("regmean", 0.5, 0.25)
    for m in ctx.modules:
        tr = [w * float(s[m]["A"].double().diagonal().sum()) for w, s in ((1.0, au), (3.0, as_))]
        assert diag["gram_share"][m] == pytest.approx([t / sum(tr) for t in tr], rel=1e-5)
