"""The three-way account: over-refusal increase and tax, the balanced score, paired differences, interpolation."""

from __future__ import annotations

import numpy as np
import pytest

from sst_merge.errors import DataError
from sst_merge.eval.stats import (
    STATUS_NO_GAIN,
    STATUS_OK,
    STATUS_OVER_REFUSAL_FELL,
    balanced_change_report,
    balanced_score,
    balanced_score_report,
    mean_difference_report,
    over_refusal_report,
    over_refusal_tax,
    safety_tax_report,
    value_at_safety,
)


def test_over_refusal_tax_hand_computed():
    r = over_refusal_tax(0.10, 0.60, 0.05, 0.30)  # gain 0.5, increase 0.25 -> tax 0.5
    assert r["over_refusal_increase"] == pytest.approx(0.25)
    assert r["over_refusal_tax"] == pytest.approx(0.5) and r["over_refusal_tax_status"] == STATUS_OK


@pytest.mark.parametrize("s_m", [0.10, 0.0])  # no gain, negative gain
def test_over_refusal_tax_without_gain_is_undefined_never_infinite(s_m):
    r = over_refusal_tax(0.10, s_m, 0.05, 0.30)
    assert r["over_refusal_tax"] is None and r["over_refusal_tax_status"] == STATUS_NO_GAIN
    assert r["over_refusal_increase"] == pytest.approx(0.25)  # the signed increase is still reported


def test_over_refusal_falling_costs_nothing():
    r = over_refusal_tax(0.0, 0.4, 0.2, 0.1)
    assert r["over_refusal_increase"] == pytest.approx(-0.1)
    assert r["over_refusal_tax"] == 0.0 and r["over_refusal_tax_status"] == STATUS_OVER_REFUSAL_FELL


def test_over_refusal_tax_refuses_nan():
    with pytest.raises(DataError, match="or_merged"):
        over_refusal_tax(0.0, 0.5, 0.1, float("nan"))


def test_over_refusal_report_matches_the_safety_tax_on_mirrored_inputs():
    """With utility_ref = benign_merged and utility_merged = benign_ref, the utility loss IS the over-refusal
    increase, and both reports draw the same replicates from the same seed: point values and intervals agree."""
    rng = np.random.default_rng(3)
    s_ref, s_new = rng.integers(0, 2, 40), (rng.random(40) < 0.7).astype(int)
    b_ref, b_new = (rng.random(30) < 0.1).astype(int), (rng.random(30) < 0.4).astype(int)
    o = over_refusal_report(s_ref, s_new, b_ref, b_new, n_boot=300, seed=5)
    t = safety_tax_report(s_ref, s_new, b_new, b_ref, n_boot=300, seed=5)
    assert o["over_refusal_increase"] == pytest.approx(t["utility_loss"])
    assert o["over_refusal_tax"] == pytest.approx(t["safety_tax"])
    assert o["over_refusal_increase_ci95"] == pytest.approx(t["utility_loss_ci95"])
    assert o["over_refusal_tax_ci95"] == pytest.approx(t["safety_tax_ci95"])
    assert o["n_benign"] == 30 and o["over_refusal_merged"] == pytest.approx(b_new.mean())


def test_over_refusal_report_identical_models():
    s, b = [1, 0, 1, 0], [0, 1, 0]
    o = over_refusal_report(s, s, b, b, n_boot=100, seed=0)
    assert o["over_refusal_increase"] == 0 and o["over_refusal_increase_ci95"] == [0.0, 0.0]
    assert o["over_refusal_tax"] is None and o["over_refusal_tax_ci95"] == [None, None]
    assert o["over_refusal_tax_undefined_fraction"] == 1.0
    with pytest.raises(DataError, match="not paired"):
        over_refusal_report(s, s, b, b[:2])


def test_balanced_score_hand_computed():
    # harmful [1,1,1,0]: R_h = 0.75; benign [1,0]: R_b = 0.5 -> (0.75 + 0.5) / 2 = 0.625;
    # TP 3, FP 1, FN 1 -> F1 = 6 / 8; balanced F1 = 1.5 / (1 + 0.75 + 0.5) = 0.6667
    s = balanced_score([1, 1, 1, 0], [1, 0])
    assert s["balanced_accuracy"] == pytest.approx(0.625)
    assert s["f1"] == pytest.approx(0.75)
    assert s["f1_balanced"] == pytest.approx(1.5 / 2.25)


def test_balanced_score_cannot_be_won_by_refusing_everything():
    everything = balanced_score([1] * 10, [1] * 30)["balanced_accuracy"]
    nothing = balanced_score([0] * 10, [0] * 30)["balanced_accuracy"]
    ideal = balanced_score([1] * 10, [0] * 30)["balanced_accuracy"]
    assert everything == nothing == 0.5 and ideal == 1.0
    # independent of the sets' sizes (pooled F1 is not): the same rates on 10 or 100 benign items
    a = balanced_score([1, 1, 0, 0], [1] + [0] * 9)
    b = balanced_score([1, 1, 0, 0], [1] * 10 + [0] * 90)
    assert a["balanced_accuracy"] == b["balanced_accuracy"] and a["f1_balanced"] == b["f1_balanced"]
    assert a["f1"] != b["f1"]


def test_balanced_score_report_interval():
    r = balanced_score_report([1] * 8, [1] * 5, n_boot=200, seed=0)
    assert r["value"] == 0.5 and r["ci95"] == [0.5, 0.5]  # no variation in either set
    r = balanced_score_report([1, 0, 1, 1, 0, 1], [0, 0, 1, 0], n_boot=500, seed=0)
    assert r["value"] == pytest.approx((4 / 6 + 3 / 4) / 2)
    assert r["ci95"][0] < r["value"] < r["ci95"][1]
    assert r["n_harmful"] == 6 and r["n_benign"] == 4


def test_balanced_change_report():
    same = balanced_change_report([1, 0, 1], [1, 0, 1], [0, 1], [0, 1], n_boot=100)
    assert same["value"] == 0 and same["ci95"] == [0.0, 0.0]
    # refusal 1/3 -> 3/3 (+2/3), over-refusal 0 -> 1/2 (+1/2): change (2/3 - 1/2) / 2 = 1/12
    r = balanced_change_report([1, 0, 0], [1, 1, 1], [0, 0], [1, 0], n_boot=300, seed=1)
    assert r["value"] == pytest.approx(1 / 12)
    assert r["ci95"][0] <= r["value"] <= r["ci95"][1]


def test_mean_difference_report():
    r = mean_difference_report([1.0, 2.0, 3.0], [2.0, 2.0, 5.0], n_boot=400, seed=0)  # differences 1, 0, 2
    assert r["value"] == pytest.approx(1.0) and r["n"] == 3
    assert 0.0 <= r["ci95"][0] <= 1.0 <= r["ci95"][1] <= 2.0
    zero = mean_difference_report([0.5, 1.5], [0.5, 1.5])
    assert zero["value"] == 0 and zero["ci95"] == [0.0, 0.0]


def test_over_refusal_interpolated_along_the_lower_front_never_extrapolated():
    pts = [
        {"safety": 0.2, "over_refusal": 0.10},
        {"safety": 0.6, "over_refusal": 0.30},
        {"safety": 0.4, "over_refusal": 0.50},  # dominated by (0.6, 0.30): more over-refusal at less safety
    ]
    # along the front (0.2, 0.10) -> (0.6, 0.30): at 0.4 halfway, 0.20
    r = value_at_safety(pts, 0.4, "over_refusal", higher_is_better=False)
    assert r["value"] == pytest.approx(0.20) and r["status"] == STATUS_OK
    assert value_at_safety(pts, 0.6, "over_refusal", higher_is_better=False)["value"] == pytest.approx(0.30)
    out = value_at_safety(pts, 0.8, "over_refusal", higher_is_better=False)
    assert out["value"] is None and "outside" in out["status"]
    # higher-is-better axis: the utility rule (front = best utility)
    up = [{"safety": 0.0, "acc": 0.9}, {"safety": 1.0, "acc": 0.5}]
    assert value_at_safety(up, 0.25, "acc")["value"] == pytest.approx(0.8)
