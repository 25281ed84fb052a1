"""Wilson intervals, the Safety Tax and its edge cases, paired bootstrap, Pareto fronts."""

from __future__ import annotations

import numpy as np
import pytest

from sst_merge.errors import DataError
from sst_merge.eval.stats import (
    STATUS_NO_GAIN,
    aligned_scores,
    pareto_front,
    rate_metric,
    safety_tax,
    safety_tax_report,
    utility_at_safety,
    wilson_interval,
)


def test_wilson_hand_values():
    # Wilson (z = 1.96): k=5, n=10 -> centre 0.5, half-width 1.96*sqrt(.025 + .0096)/1.384 = 0.2634
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # upper bound z²/(n+z²) = 3.8415/13.8415
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.2775, abs=1e-4)


def test_n_zero_is_refused():
    with pytest.raises(DataError, match="n = 0"):
        wilson_interval(0, 0)
    with pytest.raises(DataError):
        rate_metric([])
    with pytest.raises(DataError, match="n = 0"):
        safety_tax_report([], [], [1], [1])


def test_rate_metric_fields():
    m = rate_metric([1, 0, 1, 1])
    assert m["value"] == 0.75 and m["n"] == 4 and m["interval"] == "wilson"
    assert m["stderr"] == pytest.approx(0.25)  # sample variance 0.75/3 = 0.25 -> std 0.5; 0.5 / sqrt(4)


def test_safety_tax_basic_hand_computed():
    r = safety_tax(0.10, 0.60, 0.80, 0.75)
    assert r["safety_gain"] == pytest.approx(0.5)
    assert r["utility_loss"] == pytest.approx(0.05)
    assert r["safety_tax"] == pytest.approx(0.1)
    assert r["safety_tax_status"] == "ok"


@pytest.mark.parametrize("s_m", [0.10, 0.05])  # zero gain, negative gain
def test_no_safety_gain_gives_null_with_status(s_m):
    r = safety_tax(0.10, s_m, 0.80, 0.70)
    assert r["safety_tax"] is None and r["safety_tax_status"] == STATUS_NO_GAIN
    assert r["utility_loss"] == pytest.approx(0.10)  # raw values still reported


def test_negative_loss_is_signed_and_tax_is_zero_with_status():
    r = safety_tax(0.1, 0.5, 0.70, 0.75)
    assert r["utility_loss"] == pytest.approx(-0.05)
    assert r["safety_tax"] == 0.0 and "utility improved" in r["safety_tax_status"]


def test_safety_tax_refuses_non_finite():
    with pytest.raises(DataError):
        safety_tax(float("nan"), 0.5, 0.7, 0.6)
    with pytest.raises(DataError):
        safety_tax(0.1, 0.5, None, 0.6)


def test_report_point_values_match_means_and_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    s_ref, s_m = rng.integers(0, 2, 80), rng.integers(0, 2, 80) | rng.integers(0, 2, 80)
    u_ref, u_m = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    r = safety_tax_report(s_ref, s_m, u_ref, u_m, n_boot=500, seed=3)
    assert r["safety_gain"] == pytest.approx(s_m.mean() - s_ref.mean())
    assert r["utility_loss"] == pytest.approx(u_ref.mean() - u_m.mean())
    assert r == safety_tax_report(s_ref, s_m, u_ref, u_m, n_boot=500, seed=3)
    assert r != safety_tax_report(s_ref, s_m, u_ref, u_m, n_boot=500, seed=4)
    lo, hi = r["safety_gain_ci95"]
    assert lo <= r["safety_gain"] <= hi


def test_bootstrap_is_paired():
    # Merged = reference on every item: a paired resample gives gain exactly 0 in every replicate. An unpaired
    # (independent) resample of two 50% arrays would spread the gain over roughly ±0.2.
    x = np.array([0, 1] * 50)
    r = safety_tax_report(x, x, x, x, n_boot=300, seed=0)
    assert r["safety_gain_ci95"] == [0.0, 0.0]
    assert r["utility_loss_ci95"] == [0.0, 0.0]
    assert r["safety_tax"] is None and r["tax_undefined_fraction"] == 1.0
    assert r["safety_tax_ci95"] == [None, None]


def test_tax_interval_unbounded_when_gain_often_non_positive():
    s_ref = np.array([0] * 45 + [1] * 5)
    s_m = s_ref.copy()
    s_m[0] = 1  # gain 0.02: many resamples have no gain
    u_ref, u_m = np.ones(50), np.array([1] * 45 + [0] * 5)
    r = safety_tax_report(s_ref, s_m, u_ref, u_m, n_boot=400, seed=0)
    assert r["safety_tax"] == pytest.approx(0.1 / 0.02)
    assert r["tax_undefined_fraction"] > 0.025
    assert r["safety_tax_ci95"][1] is None  # never Infinity in the JSON


def test_report_refuses_unpaired_lengths():
    with pytest.raises(DataError, match="not paired"):
        safety_tax_report([1, 0], [1], [1], [1])


def test_aligned_scores_pairs_by_id():
    a = {"y": 0, "x": 1}
    b = {"x": 1, "y": 1}
    assert aligned_scores(a, b) == ([0, 1], [1, 1])  # the reference's order (y, x), not sorted
    with pytest.raises(DataError, match="only one"):
        aligned_scores(a, {"x": 1})


def test_pareto_front_sorted_and_non_dominated():
    pts = [(0.2, 0.9), (0.5, 0.8), (0.4, 0.7), (0.9, 0.5), (0.9, 0.4), (0.1, 0.85)]
    assert pareto_front(pts) == [(0.2, 0.9), (0.5, 0.8), (0.9, 0.5)]
    dicts = [{"safety": 0.3, "utility": 0.6, "alpha": 1}, {"safety": 0.3, "utility": 0.5, "alpha": 2}]
    assert pareto_front(dicts) == [dicts[0]]
    assert pareto_front([]) == []


def test_utility_at_matched_safety_interpolates_and_never_extrapolates():
    pts = [(0.2, 0.9), (0.6, 0.7), (1.0, 0.5)]
    assert utility_at_safety(pts, 0.4)["utility"] == pytest.approx(0.8)  # halfway between 0.9 and 0.7
    assert utility_at_safety(pts, 0.6)["utility"] == pytest.approx(0.7)
    out = utility_at_safety(pts, 0.1)
    assert out["utility"] is None and "outside" in out["status"]
    # off-front point (0.6, 0.2) is ignored along the front, used without it
    pts2 = pts + [(0.5, 0.2)]
    assert utility_at_safety(pts2, 0.4)["utility"] == pytest.approx(0.8)
    assert utility_at_safety(pts2, 0.5, use_front=False)["utility"] == pytest.approx(0.2)
