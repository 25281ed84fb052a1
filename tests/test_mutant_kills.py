"""Hand-computed cases for the number-producing kernels, each written against a bug no other test caught.

Found by mutation testing (``scripts/mutants.sh``): every test here fails on at least one one-line change to the
module it names that the rest of the suite let through.
"""

from __future__ import annotations

import pytest

from sst_merge.eval.base import EvalContext, EvalSettings


# -- eval/mmlu_cloze.py, eval/mmlu.py ---------------------------------------------------------------------------
def _cloze_run(monkeypatch, evaluator_name, items, lls):
    from sst_merge.eval import get_evaluator, mmlu

    seen = {}

    def scored(model, tok, contexts, continuations, settings, desc):
        seen.update(contexts=contexts, continuations=continuations)
        return lls

    monkeypatch.setattr(mmlu, "score_choices", scored)
    res = get_evaluator(evaluator_name).run(None, None, items, EvalContext.of(EvalSettings(), show_progress=False))
    return res, seen


def test_cloze_acc_norm_divides_by_the_choice_length(monkeypatch):
    item = {"id": "q0", "subject": "high_school_math", "question": " What? ", "choices": ["1", "1000", "héé"]}
    # log-likelihoods −3, −6, −6 of " 1", " 1000", " héé":
    #   acc:       argmax(−3, −6, −6) = 0
    #   acc_norm:  ÷ characters 1, 4, 3 → −3, −1.5, −2 → 1
    #   acc_bytes: ÷ UTF-8 bytes 1, 4, 5 → −3, −1.5, −1.2 → 2
    res, seen = _cloze_run(monkeypatch, "mmlu_cloze", [{**item, "answer": "B"}], [[-3.0, -6.0, -6.0]])
    assert seen["contexts"] == [
        "The following are questions (with answers) about high school math.\n\nQuestion: What?\nAnswer:"
    ]
    assert seen["continuations"] == [[" 1", " 1000", " héé"]]
    (rec,) = res["records"]
    assert (rec["pred"], rec["pred_norm"], rec["answer"]) == (0, 1, 1)
    assert (rec["score"], rec["score_norm"], rec["score_bytes"]) == (0, 1, 0)
    m = res["metrics"]
    assert (m["acc"]["value"], m["acc_norm"]["value"], m["acc_bytes"]["value"]) == (0.0, 1.0, 0.0)
    assert res["primary"] == "acc" and res["n"] == 1
    # the answer is C: only the byte-normalised choice is right
    res, _ = _cloze_run(monkeypatch, "mmlu_cloze", [{**item, "answer": 2}], [[-3.0, -6.0, -6.0]])
    assert (res["records"][0]["score"], res["records"][0]["score_norm"], res["records"][0]["score_bytes"]) == (0, 0, 1)


def test_mmlu_letter_prompt_and_first_argmax(monkeypatch):
    items = [
        {"id": "a", "subject": "law", "question": "Q1 ", "choices": ["x", "y", "z", "w"], "answer": 3},
        {"id": "b", "subject": "law", "question": "Q2", "choices": ["x", "y"], "answer": "A"},
    ]
    # item a: the largest value is at D → correct; item b: a tie between A and B → the first (A) → correct.
    res, seen = _cloze_run(monkeypatch, "mmlu", items, [[-2.0, -1.5, -3.0, -1.0], [-0.5, -0.5]])
    assert seen["contexts"][1] == (
        "The following are multiple choice questions (with answers) about law.\n\nQ2\nA. x\nB. y\nAnswer:"
    )
    assert seen["continuations"] == [[" A", " B", " C", " D"], [" A", " B"]]
    assert [r["pred"] for r in res["records"]] == [3, 0]
    assert res["metrics"]["acc"]["value"] == 1.0 and res["metrics"]["acc_macro"]["value"] == 1.0


@pytest.mark.parametrize(
    "values,first", [([1.0, 3.0, 3.0], 1), ([5.0, 1.0], 0), ([-1.0, -0.5, -2.0], 1), ([2.0, 2.0, 2.0], 0)]
)
def test_argmax_first(values, first):
    from sst_merge.eval.mmlu import argmax_first

    assert argmax_first(values) == first


# -- experiments/safety_tax.py ------------------------------------------------------------------------------------
def _metric(items):
    from sst_merge.experiments.runner import Metric

    return Metric(value=sum(items.values()) / len(items), n=len(items), ci=None, items=items)


def test_compare_pairs_items_by_id_and_signs_every_number():
    from sst_merge.eval.stats import safety_tax_report
    from sst_merge.experiments.safety_tax import compare

    ref_s = _metric({"h0": 0, "h1": 1, "h2": 0, "h3": 0})
    new_s = _metric({"h3": 0, "h2": 1, "h1": 1, "h0": 1})  # another order: pairing must go by id
    ref_u = _metric({"a0": 1, "a1": 1, "a2": 1})
    new_u = _metric({"a2": 0, "a0": 1, "a1": 1})
    cmp = compare(ref_s, ref_u, new_s, new_u, n_boot=300, seed=3)
    # S 1/4 → 3/4: gain 0.5; U 1 → 2/3: loss 1/3; tax (1/3) / 0.5 = 2/3.
    assert cmp["safety_gain"]["value"] == pytest.approx(0.5)
    assert cmp["utility_loss"]["value"] == pytest.approx(1 / 3)
    assert cmp["safety_tax"]["value"] == pytest.approx(2 / 3) and cmp["safety_tax"]["status"] == "ok"
    assert (cmp["safety_ref"], cmp["safety_merged"]) == (0.25, 0.75)
    assert (cmp["utility_ref"], cmp["utility_merged"]) == (1.0, pytest.approx(2 / 3))
    assert (cmp["n_safety"], cmp["n_utility"]) == (4, 3)
    ref = safety_tax_report([0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1], [1, 1, 0], n_boot=300, seed=3)
    assert cmp["safety_gain"]["ci95"] == ref["safety_gain_ci95"]  # the bootstrap saw the id-paired items
    assert cmp["utility_loss"]["ci95"] == ref["utility_loss_ci95"]
    assert cmp["safety_tax"]["ci95"] == ref["safety_tax_ci95"]
    assert cmp["tax_undefined_fraction"] == ref["tax_undefined_fraction"]
    assert cmp["bootstrap"] == {"n_boot": 300, "seed": 3, "level": 0.95, "method": "paired percentile"}
    assert compare(ref_s, ref_u, new_s, new_u, n_boot=0, seed=3)["bootstrap"]["n_boot"] == 1  # at least one


@pytest.mark.parametrize("which", ["safety", "utility"])
def test_compare_refuses_items_that_do_not_pair(which):
    from sst_merge.experiments.safety_tax import compare

    s, u = _metric({"h0": 0, "h1": 1}), _metric({"a0": 1})
    other_s = _metric({"h0": 0, "h9": 1}) if which == "safety" else s
    other_u = _metric({"a0": 1, "a1": 0}) if which == "utility" else u
    with pytest.raises(
        ValueError, match=r"^reference and merged model were evaluated on different items; cannot pair them$"
    ):
        compare(s, u, other_s, other_u, n_boot=10, seed=0)


def test_log_comparison_lines(caplog):
    import logging

    from sst_merge.experiments.safety_tax import log_comparison

    cmp = {
        "safety_gain": {"value": 0.5, "ci95": [0.25, 0.75]},
        "utility_loss": {"value": -0.125, "ci95": [None, 0.5]},
        "safety_tax": {"value": 0.0, "ci95": None, "status": "ok"},
    }
    with caplog.at_level(logging.INFO, logger="sst_merge.experiments.safety_tax"):
        log_comparison("sst(alpha=1)", "utility", _metric({"h0": 1, "h1": 0}), _metric({"a0": 1}), cmp)
        log_comparison("m", "base", _metric({"h0": 1}), _metric({"a0": 1}), {**cmp, "safety_tax": {
            "value": None, "ci95": [None, None], "status": "no safety gain"}})  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:7] == [
        "Reference (pre-merge) model: utility",
        "Baseline (pre-merge) metrics:",
        "  Baseline Safety (Refusal Rate): 0.5000",
        "  Baseline Utility (Accuracy): 1.0000",
        "Merged model: [sst(alpha=1)]",
        "Safety Gain: 0.5000 (95% CI 0.2500 to 0.7500)",
        "Utility Loss: -0.1250",  # an open interval is not printed as a number
    ]
    assert lines[7] == "Safety Tax: 0.0000"
    assert lines[-1] == "Safety Tax: undefined (no safety gain)"


# -- merge/sparsify.py --------------------------------------------------------------------------------------------
def test_weighted_sum_accumulates_in_fp32_and_refuses_unpaired_weights():
    import torch

    from sst_merge.merge.sparsify import sign_consensus_merge, weighted_sum

    taus = [torch.full((3,), 1.0, dtype=torch.bfloat16), torch.full((3,), 2.0**-9, dtype=torch.bfloat16)]
    out = weighted_sum(taus, [1.0, 1.0])
    assert out.dtype == torch.float32
    assert out.tolist() == [1 + 2.0**-9] * 3  # in bf16 (8 bits of mantissa) 1 + 2⁻⁹ would round back to 1
    for kernel in (weighted_sum, sign_consensus_merge):
        with pytest.raises(ValueError):  # zip(strict=True): a missing weight is an error, not a dropped adapter
            kernel(taus, [1.0])


def test_magnitude_trim_keeps_all_but_one():
    import torch

    from sst_merge.merge.sparsify import magnitude_trim

    tau = torch.tensor([0.4, -0.1, 0.3, -0.2])
    # density 0.8 of 4 entries: k = int(3.2) = 3, the 3 largest magnitudes stay; the k-th largest is the 2nd smallest
    assert magnitude_trim(tau, 0.8).tolist() == pytest.approx([0.4, 0.0, 0.3, -0.2])
    assert magnitude_trim(tau, 0.3).tolist() == pytest.approx([0.4, 0.0, 0.0, 0.0])  # k = max(1, int(1.2)) = 1


def test_dare_drop_at_density_one_draws_no_random_numbers():
    import torch

    from sst_merge.merge.sparsify import dare_drop

    g = torch.Generator().manual_seed(5)
    tau = torch.randn(10)
    assert dare_drop(tau, 1.0, g) is tau
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))


def test_dare_mask_does_not_depend_on_the_input_dtype():
    import torch

    from sst_merge.merge.sparsify import dare_drop

    tau = torch.randn(200, dtype=torch.float64)
    a = dare_drop(tau, 0.3, torch.Generator().manual_seed(1), rescale="none")
    b = dare_drop(tau.float(), 0.3, torch.Generator().manual_seed(1), rescale="none")
    assert torch.equal(a != 0, b != 0)  # the Bernoulli draws are fp32 whatever τ's dtype (fp32 inside)


def _seed_with_mask(p, want):
    import torch

    for seed in range(10_000):
        mask = torch.bernoulli(torch.full((len(want),), p), generator=torch.Generator().manual_seed(seed))
        if mask.tolist() == want:
            return seed
    raise AssertionError("no seed gives the wanted mask")


def test_dare_l1_rescale_small_norms_and_all_dropped():
    import torch

    from sst_merge.merge.sparsify import dare_drop

    # L1 below 1 is still rescaled: τ = (0.25, −0.25, 0.5), drop the second → L1 1.0 before, 0.75 after, × 4/3
    tau = torch.tensor([0.25, -0.25, 0.5])
    seed = _seed_with_mask(0.5, [1.0, 0.0, 1.0])
    out = dare_drop(tau, 0.5, torch.Generator().manual_seed(seed), rescale="l1")
    assert out.tolist() == pytest.approx([0.25 * 4 / 3, 0.0, 0.5 * 4 / 3])
    tiny = tau * 4e-7  # L1 4e-7 before, 3e-7 after: both above mergekit's 1e-7, still rescaled
    out = dare_drop(tiny, 0.5, torch.Generator().manual_seed(seed), rescale="l1")
    assert out.tolist() == pytest.approx([1e-7 * 4 / 3, 0.0, 2e-7 * 4 / 3], rel=1e-5)
    # everything dropped: after = 0 < 1e-7, nothing to rescale — zeros, never NaN or inf
    seed = _seed_with_mask(0.5, [0.0, 0.0, 0.0])
    assert dare_drop(tau, 0.5, torch.Generator().manual_seed(seed), rescale="l1").tolist() == [0.0, 0.0, 0.0]
    # at the tolerance exactly (after = 1e-7 in fp32) the kept entries are still rescaled: 1e-7 × (2e-7 / 1e-7)
    tau = torch.tensor([1e-7, 1e-7])
    seed = _seed_with_mask(0.5, [1.0, 0.0])
    out = dare_drop(tau, 0.5, torch.Generator().manual_seed(seed), rescale="l1")
    assert out.tolist() == pytest.approx([2e-7, 0.0], rel=1e-6)


# -- eval/stats.py ------------------------------------------------------------------------------------------------
def test_mean_stderr_and_rate_metric_by_hand():
    import math

    import numpy as np

    from sst_merge.eval.stats import mean_stderr, rate_metric

    assert mean_stderr([0, 1]) == pytest.approx(0.5)  # sample sd √0.5, ÷ √2
    assert math.isnan(mean_stderr([1]))  # one item: no spread to estimate
    x = np.array([0.1, 0.2, 0.7], dtype=np.float32)
    exact = float(np.std(x.astype(np.float64), ddof=1) / math.sqrt(3))
    assert mean_stderr(x) == exact  # computed in float64 even for float32 scores
    m = rate_metric([1, 0, 1, 1])
    assert m["higher_is_better"] is True and m["interval"] == "wilson"
    assert m["value"] == 0.75 and m["stderr"] == pytest.approx(0.25)  # sd 0.5, ÷ √4
    assert rate_metric([1])["stderr"] is None
    assert rate_metric([0, 1], higher_is_better=False)["higher_is_better"] is False


@pytest.mark.parametrize("call", ["rate_metric", "mean_stderr"])
def test_empty_statistics_say_why(call):
    from sst_merge.errors import DataError
    from sst_merge.eval import stats

    with pytest.raises(
        DataError, match=r"^a statistic needs at least one item \(n = 0\); evaluate on a non-empty set$"
    ):
        getattr(stats, call)([])


def test_aligned_scores_names_an_unpaired_id():
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import aligned_scores

    with pytest.raises(DataError, match=r"1 item id\(s\) appear in only one evaluation \(e\.g\. 'y'\)"):
        aligned_scores({"x": 1, "y": 0}, {"x": 1})


def test_pareto_front_ties_and_order():
    from sst_merge.eval.stats import pareto_front

    # the same utility at less safety is dominated; the front comes back sorted by safety whatever the input order
    pts = [(0.9, 0.5), (0.8, 0.6), (0.5, 0.6), (0.2, 0.9)]
    assert pareto_front(pts) == [(0.2, 0.9), (0.8, 0.6), (0.9, 0.5)]


def test_utility_at_safety_edges():
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import utility_at_safety

    pts = [(0.2, 0.9), (0.6, 0.7), (1.0, 0.5)]
    assert utility_at_safety(pts, 0.2) == {"utility": 0.9, "status": "ok"}  # both ends are inside the range
    assert utility_at_safety(pts, 1.0) == {"utility": 0.5, "status": "ok"}
    assert utility_at_safety(pts, 0.8) == {"utility": pytest.approx(0.6), "status": "ok"}  # in the last segment
    assert utility_at_safety(pts, 0.9)["utility"] == pytest.approx(0.55)
    assert utility_at_safety(pts, 1.01)["utility"] is None
    assert utility_at_safety([(0.5, 0.7)], 0.5) == {"utility": 0.7, "status": "ok"}  # one point, at the target
    assert utility_at_safety([(0.5, 0.7)], 0.6)["utility"] is None
    # without the front: dict points sorted by safety, equal safeties take the first without dividing by zero
    dicts = [{"safety": 0.9, "utility": 0.1}, {"safety": 0.5, "utility": 0.2}, {"safety": 0.5, "utility": 0.4}]
    assert utility_at_safety(dicts, 0.5, use_front=False) == {"utility": 0.2, "status": "ok"}
    assert utility_at_safety(dicts, 0.7, use_front=False)["utility"] == pytest.approx(0.25)  # (0.4 → 0.1) halfway
    with pytest.raises(DataError, match=r"^utility at matched safety needs at least one \(safety, utility\) point$"):
        utility_at_safety([], 0.5)


def test_rate_metric_interval_and_wilson_messages():
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import rate_metric, wilson_interval

    assert rate_metric([1, 0, 1, 1])["ci95"] == list(wilson_interval(3, 4))
    with pytest.raises(DataError, match=r"^a rate needs at least one item \(n = 0\); evaluate on a non-empty set$"):
        wilson_interval(0, 0)
    with pytest.raises(DataError, match=r"^rate numerator 5 is outside \[0, 4\]$"):
        wilson_interval(5, 4)
    with pytest.raises(DataError, match=r"^rate numerator -1 is outside \[0, 4\]$"):
        wilson_interval(-1, 4)


def test_wilson_upper_end_is_capped_at_one():
    from sst_merge.eval.stats import wilson_interval

    # at k = n the upper end is 1 exactly in exact arithmetic; in floating point it rounds above 1 for n = 16
    assert wilson_interval(16, 16)[1] == 1.0
    assert wilson_interval(0, 16)[0] == 0.0


@pytest.mark.parametrize("position", ["safety_ref", "safety_merged", "utility_ref", "utility_merged"])
def test_safety_tax_report_names_the_bad_array(position):
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import safety_tax_report

    arrays = {"safety_ref": [1, 0], "safety_merged": [1, 1], "utility_ref": [1, 1], "utility_merged": [0, 1]}
    with pytest.raises(DataError, match=rf"^{position}: need a non-empty 1-D array"):
        safety_tax_report(**{**arrays, position: []})
    with pytest.raises(DataError, match=rf"^{position}: per-item scores contain NaN or Inf$"):
        safety_tax_report(**{**arrays, position: [1.0, float("nan")]})


def test_safety_tax_report_defaults_float64_and_every_index():
    import numpy as np

    from sst_merge.eval.stats import paired_bootstrap_indices, safety_tax_report

    u = np.array([0.1, 0.2, 0.7, 0.3, 0.9], dtype=np.float32)
    r = safety_tax_report([0, 0, 1], [1, 0, 1], u, u[::-1].copy())
    assert r["bootstrap"] == {"n_boot": 2000, "seed": 0, "level": 0.95, "method": "paired percentile"}
    assert r["utility_ref"] == float(u.astype(np.float64).mean())  # float64 inside (the float32 mean differs)
    idx = paired_bootstrap_indices(2, 200, np.random.default_rng(0))
    assert idx.shape == (200, 2) and set(np.unique(idx)) == {0, 1}  # both items drawn, index 0 included


def _reference_report(sr, sm, ur, um, n_boot, seed, level):
    """design §7's paired bootstrap written out with loops (only the documented draw order is shared with the code)."""
    import math

    import numpy as np

    rng = np.random.default_rng(seed)
    si = rng.integers(0, len(sr), size=(n_boot, len(sr)))
    ui = rng.integers(0, len(ur), size=(n_boot, len(ur)))

    def mean(xs):
        return sum(xs) / len(xs)

    gains = [mean([sm[i] for i in row]) - mean([sr[i] for i in row]) for row in si]
    losses = [mean([ur[i] for i in row]) - mean([um[i] for i in row]) for row in ui]
    a = (1 - level) / 2

    def linear(values, q):  # numpy's default quantile: linear between order statistics
        s = sorted(values)
        h = (len(s) - 1) * q
        lo = math.floor(h)
        return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])

    def order_stat(values, q):  # inverted CDF: the smallest value whose empirical CDF reaches q
        s = sorted(values)
        return s[max(0, math.ceil(q * len(s) - 1e-12) - 1)]

    taxes = [max(loss, 0.0) / g for g, loss in zip(gains, losses, strict=True) if g > 0]
    ranked = taxes + [math.inf] * (n_boot - len(taxes))
    tax_ci = [order_stat(ranked, a), order_stat(ranked, 1 - a)] if taxes else [None, None]
    return {
        "safety_gain_ci95": [linear(gains, a), linear(gains, 1 - a)],
        "utility_loss_ci95": [linear(losses, a), linear(losses, 1 - a)],
        "safety_tax_ci95": [None if t is None or math.isinf(t) else t for t in tax_ci],
        "tax_undefined_fraction": 1 - len(taxes) / n_boot,
    }


@pytest.mark.parametrize(
    "sr,sm,ur,um,level",
    [
        ([0, 0, 0, 1, 0, 0, 1, 0], [1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 1], 0.95),
        ([0, 0, 0, 1, 0, 0, 1, 0], [1, 1, 0, 1, 1, 0, 1, 1], [1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 1, 1], 0.8),
        ([0, 1, 0, 1], [1, 1, 0, 0], [1, 0, 1], [0, 0, 1], 0.95),  # no gain: most replicates have no tax
        ([0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 1], [1, 1], [1, 0], 0.95),  # some replicates without a tax
        ([1] * 5 + [0], [0] * 5 + [1], [1, 1], [1, 0], 0.95),  # 98.5% without a tax: both ends unbounded
    ],
)
def test_safety_tax_report_intervals_against_a_loop_reference(sr, sm, ur, um, level):
    from sst_merge.eval.stats import safety_tax_report

    got = safety_tax_report(sr, sm, ur, um, n_boot=400, seed=11, level=level)
    ref = _reference_report(sr, sm, ur, um, 400, 11, level)
    for key in ("safety_gain_ci95", "utility_loss_ci95"):
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key
    assert got["tax_undefined_fraction"] == pytest.approx(ref["tax_undefined_fraction"], abs=1e-12)
    assert [None if v is None else pytest.approx(v, abs=1e-12) for v in ref["safety_tax_ci95"]] == got[
        "safety_tax_ci95"
    ]


def test_unpaired_utility_arrays_say_so():
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import safety_tax_report

    with pytest.raises(DataError, match=r"^utility arrays are not paired: 3 reference items vs 2 merged items$"):
        safety_tax_report([1], [1], [1, 0, 1], [1, 0])


@pytest.mark.parametrize("position", range(4))
def test_safety_tax_names_the_non_finite_input(position):
    from sst_merge.errors import DataError
    from sst_merge.eval.stats import safety_tax

    args = [0.1, 0.6, 0.8, 0.75]
    args[position] = float("nan")
    name = ["s_ref", "s_merged", "u_ref", "u_merged"][position]
    with pytest.raises(DataError, match=rf"^Safety Tax input {name} is nan; it must be a measured, finite score$"):
        safety_tax(*args)


def test_no_utility_change_is_a_zero_tax_with_status_ok():
    from sst_merge.eval.stats import safety_tax

    r = safety_tax(0.25, 0.75, 0.5, 0.5)  # gain 0.5, loss exactly 0: tax 0, and not "utility improved"
    assert r == {"safety_gain": 0.5, "utility_loss": 0.0, "safety_tax": 0.0, "safety_tax_status": "ok"}


def test_tax_interval_order_statistics_on_many_distinct_taxes():
    """Order statistics, not interpolation: with 40 items the bootstrap taxes are nearly all distinct."""
    import numpy as np

    from sst_merge.eval.stats import safety_tax_report

    g = np.random.default_rng(4)
    sr, ur = (g.random(40) < 0.3).astype(int).tolist(), (g.random(40) < 0.8).astype(int).tolist()
    sm, um = (g.random(40) < 0.7).astype(int).tolist(), (g.random(40) < 0.6).astype(int).tolist()
    for level in (0.95, 0.8):
        got = safety_tax_report(sr, sm, ur, um, n_boot=300, seed=2, level=level)
        ref = _reference_report(sr, sm, ur, um, 300, 2, level)
        assert got["safety_tax_ci95"] == pytest.approx(ref["safety_tax_ci95"], abs=1e-12)


def test_tax_interval_with_a_single_defined_replicate():
    """One replicate of 20 has a gain: its tax is the lower end (the 0.5-th of 20 order statistics), the upper None."""
    from sst_merge.eval.stats import safety_tax_report

    sr, sm, ur, um = [1] * 5 + [0], [0] * 5 + [1], [1, 1, 0], [1, 0, 0]
    seed = next(
        s for s in range(1000) if _reference_report(sr, sm, ur, um, 20, s, 0.95)["tax_undefined_fraction"] == 0.95
    )
    got = safety_tax_report(sr, sm, ur, um, n_boot=20, seed=seed)
    ref = _reference_report(sr, sm, ur, um, 20, seed, 0.95)
    assert ref["safety_tax_ci95"][0] is not None and ref["safety_tax_ci95"][1] is None
    assert got["safety_tax_ci95"] == pytest.approx(ref["safety_tax_ci95"], abs=1e-12)


# -- fisher/gevp.py -----------------------------------------------------------------------------------------------
def test_selection_bounds_and_messages():
    from sst_merge.fisher.gevp import Selection

    with pytest.raises(ValueError, match=r"^exactly one of k, fraction, threshold, share must be set$"):
        Selection()
    with pytest.raises(ValueError, match=r"^share must be in \(0, 1\]$"):
        Selection(share=0.0)
    with pytest.raises(ValueError, match=r"^share must be in \(0, 1\]$"):
        Selection(share=1.01)
    with pytest.raises(ValueError, match=r"^k must be >= 0$"):
        Selection(k=-1)
    with pytest.raises(ValueError, match=r"^fraction must be in \(0, 1\]$"):
        Selection(fraction=1.5)
    with pytest.raises(ValueError, match=r"^threshold must be >= 0$"):
        Selection(threshold=-0.1)
    import torch

    lam = torch.tensor([3.0, 2.0, 0.0])
    assert Selection(k=0).count(lam, 3) == 0  # k = 0 is allowed: nothing kept
    assert Selection(threshold=0.0).count(torch.zeros(3), 3) == 0  # nothing positive: nothing above any threshold


def test_count_positive_edges():
    import torch

    from sst_merge.fisher.gevp import count_positive

    assert count_positive(torch.tensor([])) == 0
    assert count_positive(torch.tensor([0.0, -1.0])) == 0
    assert count_positive(torch.tensor([0.5, 0.25, 0.0])) == 2  # below 1 is still positive
    assert count_positive(torch.tensor([1.0, 1e-9])) == 1  # exactly POSITIVE_RTOL·λ_max is round-off
    assert count_positive(torch.tensor([2.0, 1e-9])) == 1  # relative to λ_max = 2: 1e-9 < 2e-9


def test_select_grid_breaks_ties_by_index_and_returns_a_bool_mask():
    import torch

    from sst_merge.fisher.gevp import Selection, select_grid

    lam = torch.ones(4000)
    lam[3000:] = 2.0
    mask, lam_desc, n = select_grid(lam.reshape(40, 100), Selection(k=1010))
    assert mask.dtype == torch.bool and n == 1010
    expect = torch.zeros(4000, dtype=torch.bool)
    expect[3000:] = True
    expect[:10] = True  # the 10 extra among the 3000 tied ones: the first by index
    assert torch.equal(mask.reshape(-1), expect)


def test_dense_gevp_ties_keep_the_solver_order_and_project_keeps_the_dtype():
    import torch

    from sst_merge.fisher.gevp import Selection, dense_gevp, dense_project

    a = torch.eye(6, dtype=torch.float64)
    lam, V = dense_gevp(a, torch.eye(6, dtype=torch.float64))
    assert lam.tolist() == [1.0] * 6
    import scipy.linalg

    _, ref = scipy.linalg.eigh(a.numpy(), torch.eye(6, dtype=torch.float64).numpy())
    assert torch.equal(V, torch.from_numpy(ref))  # a stable sort leaves tied eigenvectors in the solver's order
    x = torch.randn(2, 3)
    a2 = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5]))
    y, _, n = dense_project(x, a2, torch.eye(6), Selection(k=2))
    assert y.dtype == torch.float32 and n == 2


# -- plan/costs.py ------------------------------------------------------------------------------------------------
def _tiny_shape():
    from sst_merge.models.shapes import Shape

    # q 64×64, k and v 32×64, o 64×64, gate and up 128×64, down 64×128: 36864 weights per layer
    return Shape(
        hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=100, tied=True, qkv_bias=False
    )


def test_forward_flops_odd_length_and_an_explicit_response():
    from sst_merge.plan import forward_flops

    shape = _tiny_shape()
    linear = 2 * 10 * 36864  # batch 2 × length 5 tokens, 2 FLOPs per weight
    attention = 4 * 2 * 5 * 5 * 64  # 4 · B · T² · q-width, one layer
    # the head on length // 2 = 2 positions per example (not 2.5), or on the response positions asked for
    assert forward_flops(shape, 2, 5) == linear + attention + 2 * 64 * 100 * 2 * 2 == 801280
    assert forward_flops(shape, 2, 5, response=3) == linear + attention + 2 * 64 * 100 * 2 * 3 == 826880


def test_fisher_activation_seconds_takes_the_passes_asked_for():
    from sst_merge.plan import FISHER_ACT_PASSES, Rates, Settings, fisher_activation_seconds

    shape, rates = _tiny_shape(), Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8)
    s = Settings(fisher_batch=2, fisher_length=8)
    one = 16 * (6 * 64 + 4 * 128) * 4 / 1e10  # 16 tokens × (6·hidden + 4·intermediate) fp32 elements, once
    assert fisher_activation_seconds(shape, s, rates, passes=1.0) == pytest.approx(one, rel=1e-12)
    assert fisher_activation_seconds(shape, s, rates) == pytest.approx(FISHER_ACT_PASSES * one, rel=1e-12)


def test_merge_and_ties_laws_just_under_the_mmap_threshold():
    """2048 × 3584: a fp32 ΔW (4p bytes, 28 MiB) stays under the 32 MiB threshold, so no faults and the heap
    bandwidth — though 5p bytes would cross it."""
    from sst_merge.plan import MMAP_THRESHOLD, Rates, apply_module_seconds, merge_module_seconds, ties_module_seconds

    r = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, heap_bandwidth=2e10, fault=2e9, ties=1e8)
    p = 2048 * 3584
    assert 4 * p < MMAP_THRESHOLD <= 5 * p
    want = 2 * (2 * 8 * p / 1e11 + 16 * p / 2e10) + (4 + 12 * 2 + 8) * p / 2e10
    assert merge_module_seconds(2048, 3584, 2, 8, r) == pytest.approx(want, rel=1e-12)
    assert ties_module_seconds(2048, 3584, 2, r) == pytest.approx(2 * p / 1e8, rel=1e-12)
    # bf16 weight: 2 + 2 (saved, to fp32) + 8 + 12 (fp32 weight + ΔW) + 4 + 2 (back) + 2 · 2 (copied in) bytes per weight
    assert apply_module_seconds(2048, 3584, 2, r) == pytest.approx(34 * p / 2e10, rel=1e-12)


def test_ties_law_above_the_mmap_threshold():
    """4096², three adapters: n·p at the TIES rate, plus the faults of (3 · 34 + 20) bytes per element of fresh
    buffers, priced per fp32 ΔW (4p bytes, 64 MiB) at the fault rate."""
    from sst_merge.plan import Rates, ties_module_seconds

    r = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, heap_bandwidth=2e10, fault=2e9, ties=1e8)
    p = 4096 * 4096
    want = 3 * p / 1e8 + (3 * 34 + 20) / 4 * (4 * p / 2e9)
    assert ties_module_seconds(4096, 4096, 3, r) == pytest.approx(want, rel=1e-12)


def test_unknown_target_module_is_named_with_the_choices():
    from sst_merge.errors import ConfigError
    from sst_merge.plan.costs import targets_of

    shape = _tiny_shape()
    assert targets_of(shape, ["v_proj", "down_proj"]) == [(32, 64), (64, 128)]
    want = (
        "target module 'qproj' is not a linear module of this model; "
        "use q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    )
    with pytest.raises(ConfigError) as err:
        targets_of(shape, ["v_proj", "qproj", "vproj"])
    assert str(err.value) == want


# -- eval/loglik.py -----------------------------------------------------------------------------------------------
def test_root_leaves_every_member_a_token_and_common_prefix_by_hand():
    from sst_merge.eval.loglik import _packed_length, _root_length, common_prefix

    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 5]]) == 1
    assert common_prefix([[1, 2], [1, 2, 3]]) == 2 and common_prefix([[7, 8, 9]]) == 3
    assert common_prefix([[1, 2], [3, 2]]) == 0
    # [1, 2, 3] is a prefix of the other: the root stops one token short of it, so it keeps [3] as its branch
    assert _root_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert _packed_length([[1, 2, 3], [1, 2, 3, 4]]) == 2 + 1 + 2
    assert _packed_length([[1, 2], [3, 4, 5]]) == 5


def test_prefix_groups_bounds():
    from sst_merge.eval.loglik import prefix_groups

    # ten contexts sharing a root: groups of at most eight (max_group), in sorted order
    ten = [[9] * 20 + [i] for i in range(10)]
    assert prefix_groups(ten) == [list(range(8)), [8, 9]]
    # interleaved subjects: sorted by tokens first, so each subject's contexts meet
    a, b = [1] * 10, [2] * 10
    assert prefix_groups([a + [3], b + [3], a + [4], b + [4]]) == [[0, 2], [1, 3]]
    # nothing shared: packing would not be shorter, so no group
    assert prefix_groups([[1, 2], [3, 4]]) == [[0], [1]]
    # a packed row of exactly max_tokens (2048) is allowed, one more token is not
    root = [5] * 1000
    assert prefix_groups([root + [6] * 500, root + [7] * 548]) == [[0, 1]]
    assert prefix_groups([root + [6] * 500, root + [7] * 549]) == [[0], [1]]


def test_packed_row_positions_are_integers_restarting_after_the_root():
    """Row ``root + branch_1 + branch_2``: each branch's positions restart after the root, as long integers (models
    with learned position tables index them). Bug caught: the positions built as floats."""
    import torch

    from sst_merge.eval.loglik import packed_logprobs
    from sst_merge.testing import tiny_model

    model = tiny_model("llama", seed=3)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"]), with_kwargs=True)
    try:
        (lp,) = packed_logprobs(model, [([1, 2, 3], [[4], [5, 6]])], [[2, 3, 5]], pad_id=0)
    finally:
        handle.remove()
    (pos,) = seen
    assert pos.dtype == torch.long and pos.tolist() == [[0, 1, 2, 3, 3, 4]]
    assert lp.shape == (3, model.config.vocab_size)
    # wanted positions in any order come back in that order
    (shuffled,) = packed_logprobs(model, [([1, 2, 3], [[4], [5, 6]])], [[5, 2, 3]], pad_id=0)
    assert torch.equal(shuffled, lp[[2, 0, 1]])


def test_token_batches_edges():
    from sst_merge.eval.loglik import token_batches

    assert token_batches([], 3) == []
    # a row of exactly fill × the batch's longest joins it
    assert token_batches([10, 9], 2) == [[0, 1]]
    # never more than batch_size rows, in a later batch either
    assert token_batches([100, 50, 50, 50, 50], 3) == [[0], [1, 2, 3], [4]]


def test_slab_layer_returns_the_rows_written_and_names_an_overflow():
    """A batch-1 write (the shared prefix) fills every row but returns one; a write past the slab is refused with
    its numbers; a prefix from a model with another layer count is refused (strict zip)."""
    from types import SimpleNamespace

    import torch

    from sst_merge.eval.loglik import SlabLayer, slab_cache

    layer = SlabLayer(batch=3, max_len=4)
    k, v = torch.randn(1, 2, 2, 5), torch.randn(1, 2, 2, 5)
    keys, values = layer.update(k, v)
    assert keys.shape == (1, 2, 2, 5) and torch.equal(values, v)
    assert torch.equal(layer.keys[:, :, :2], k.expand(3, -1, -1, -1)) and layer.get_seq_length() == 2
    keys, _ = layer.update(torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5))
    assert keys.shape == (3, 2, 3, 5)
    with pytest.raises(ValueError, match="^KV slab overflow: 5 positions in a slab of 4$"):
        layer.update(torch.randn(3, 2, 2, 5), torch.randn(3, 2, 2, 5))
    one = slab_cache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=1)), 1, 2)
    one.layers[0].update(torch.randn(1, 2, 2, 5), torch.randn(1, 2, 2, 5))
    with pytest.raises(ValueError):
        slab_cache(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=2)), 2, 4, prefix=one)
