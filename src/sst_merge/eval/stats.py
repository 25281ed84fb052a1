"""Statistics for evaluation results and the Safety Tax (SPEC §7): pure functions, no model, no files.

* :func:`wilson_interval` — 95% interval for a rate (k of n).
* :func:`safety_tax` — gain, loss and tax from four numbers, with every edge case named.
* :func:`safety_tax_report` — the same from per-item 0/1 arrays, with paired-bootstrap 95% intervals.
* :func:`pareto_front`, :func:`utility_at_safety` — comparing methods across an α sweep.

Conventions: a higher safety score (refusal rate on harmful prompts) and a higher utility score are better.
``safety_gain = S_merged − S_ref``; ``utility_loss = U_ref − U_merged`` (signed: negative means utility improved);
``safety_tax = max(utility_loss, 0) / safety_gain`` only when ``safety_gain > 0``; otherwise ``None`` with a
status string — never Infinity and never a silent 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from sst_merge.errors import DataError

Z95 = 1.959963984540054  # two-sided 95% standard-normal quantile

STATUS_OK = "ok"
STATUS_NO_GAIN = "no safety gain"
STATUS_UTILITY_GAIN = "ok (utility improved: loss < 0, tax 0)"


def wilson_interval(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval for a rate of ``k`` successes in ``n`` trials.

    Raises:
        DataError: ``n`` is 0 (there is no rate to bound) or ``k`` is outside ``[0, n]``.
    """
    if n <= 0:
        raise DataError("a rate needs at least one item (n = 0); evaluate on a non-empty set")
    if not 0 <= k <= n:
        raise DataError(f"rate numerator {k} is outside [0, {n}]")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the n−1 sample variance (what lm-evaluation-harness reports)."""
    n = len(values)
    if n == 0:
        _refuse_empty()
    if n == 1:
        return float("nan")
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def _refuse_empty() -> float:
    raise DataError("a statistic needs at least one item (n = 0); evaluate on a non-empty set")


def rate_metric(scores: Sequence[float], higher_is_better: bool = True) -> dict[str, Any]:
    """Summarise per-item 0/1 scores as ``{value, n, ci95 (Wilson), stderr, interval, higher_is_better}``."""
    n = len(scores)
    if n == 0:
        _refuse_empty()
    k = float(sum(scores))
    lo, hi = wilson_interval(k, n)
    se = mean_stderr(scores)
    return {
        "value": k / n,
        "n": n,
        "ci95": [lo, hi],
        "interval": "wilson",
        "stderr": None if math.isnan(se) else se,
        "higher_is_better": higher_is_better,
    }


def safety_tax(s_ref: float, s_merged: float, u_ref: float, u_merged: float) -> dict[str, Any]:
    """Return ``{safety_gain, utility_loss, safety_tax, safety_tax_status}`` from four measured scores.

    Example (hand-computed): S 0.10 → 0.60, U 0.80 → 0.75 gives gain 0.5, loss 0.05, tax 0.1.
    """
    for name, v in (("s_ref", s_ref), ("s_merged", s_merged), ("u_ref", u_ref), ("u_merged", u_merged)):
        if v is None or not math.isfinite(v):
            raise DataError(f"Safety Tax input {name} is {v!r}; it must be a measured, finite score")
    gain = s_merged - s_ref
    loss = u_ref - u_merged
    if gain > 0:
        tax = max(loss, 0.0) / gain
        status = STATUS_OK if loss >= 0 else STATUS_UTILITY_GAIN
    else:
        tax, status = None, STATUS_NO_GAIN
    return {"safety_gain": gain, "utility_loss": loss, "safety_tax": tax, "safety_tax_status": status}


def _as_01(name: str, x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise DataError(f"{name}: need a non-empty 1-D array of per-item scores (n = 0 is refused)")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name}: per-item scores contain NaN or Inf")
    return a


def paired_bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Return ``(n_boot, n)`` resampling indices; the same row indexes both members of a pair."""
    return rng.integers(0, n, size=(n_boot, n))


def safety_tax_report(
    safety_ref: Sequence[float],
    safety_merged: Sequence[float],
    utility_ref: Sequence[float],
    utility_merged: Sequence[float],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Return the Safety Tax of SPEC §7 from per-item scores, with paired-bootstrap intervals.

    The safety arrays are per harmful prompt (1 = refused) for the reference and the merged model, aligned item by
    item; the utility arrays likewise (1 = correct, or any per-item utility score). Each bootstrap replicate
    resamples the safety items (the same indices for ref and merged) and, independently, the utility items (same
    indices for both models). Replicates where the gain is ≤ 0 have no tax; if more than ``(1 − level)/2`` of
    them do, the tax interval's upper end is unbounded and reported as ``None`` (with ``tax_undefined_fraction``).

    Raises:
        DataError: an array is empty, non-finite, or the paired arrays differ in length.
    """
    sr, sm = _as_01("safety_ref", safety_ref), _as_01("safety_merged", safety_merged)
    ur, um = _as_01("utility_ref", utility_ref), _as_01("utility_merged", utility_merged)
    if sr.size != sm.size:
        raise DataError(f"safety arrays are not paired: {sr.size} reference items vs {sm.size} merged items")
    if ur.size != um.size:
        raise DataError(f"utility arrays are not paired: {ur.size} reference items vs {um.size} merged items")
    point = safety_tax(float(sr.mean()), float(sm.mean()), float(ur.mean()), float(um.mean()))
    rng = np.random.default_rng(seed)
    si = paired_bootstrap_indices(sr.size, n_boot, rng)
    ui = paired_bootstrap_indices(ur.size, n_boot, rng)
    gains = sm[si].mean(axis=1) - sr[si].mean(axis=1)  # (n_boot,)
    losses = ur[ui].mean(axis=1) - um[ui].mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    defined = gains > 0
    taxes = np.maximum(losses[defined], 0.0) / gains[defined]
    undefined_frac = 1.0 - defined.mean()
    if defined.sum() == 0:
        tax_ci: list[float | None] = [None, None]
    else:
        # Undefined replicates are "tax beyond any bound": rank them above every finite tax.
        ranked = np.concatenate([np.sort(taxes), np.full(n_boot - taxes.size, np.inf)])
        # order statistics (no interpolation): interpolating towards an infinite rank would give NaN
        lo, hi = np.quantile(ranked, [alpha, 1 - alpha], method="inverted_cdf")
        tax_ci = [float(lo) if np.isfinite(lo) else None, float(hi) if np.isfinite(hi) else None]
    return {
        **point,
        "safety_ref": float(sr.mean()),
        "safety_merged": float(sm.mean()),
        "utility_ref": float(ur.mean()),
        "utility_merged": float(um.mean()),
        "n_safety": int(sr.size),
        "n_utility": int(ur.size),
        "safety_gain_ci95": [float(x) for x in np.quantile(gains, [alpha, 1 - alpha])],
        "utility_loss_ci95": [float(x) for x in np.quantile(losses, [alpha, 1 - alpha])],
        "safety_tax_ci95": tax_ci,
        "tax_undefined_fraction": float(undefined_frac),
        "bootstrap": {"n_boot": n_boot, "seed": seed, "level": level, "method": "paired percentile"},
    }


def aligned_scores(ref: list[dict[str, Any]], merged: list[dict[str, Any]], key: str = "score") -> tuple[list, list]:
    """Pair two evaluations' per-item records by ``id`` and return their ``key`` values in the same order.

    Raises:
        DataError: the two record sets do not hold the same item ids (not the same evaluation items).
    """
    a = {r["id"]: r[key] for r in ref}
    b = {r["id"]: r[key] for r in merged}
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise DataError(f"cannot pair records: {len(only)} item id(s) appear in only one evaluation (e.g. {only[0]!r})")
    ids = sorted(a)
    return [a[i] for i in ids], [b[i] for i in ids]


def _point(p: Any) -> tuple[float, float]:
    if isinstance(p, dict):
        return float(p["safety"]), float(p["utility"])
    return float(p[0]), float(p[1])


def pareto_front(points: Sequence[Any]) -> list[Any]:
    """Return the points not dominated in (safety, utility), sorted by safety ascending.

    A point is dominated when another is at least as good on both axes and better on one. Points are
    ``(safety, utility, ...)`` tuples or dicts with ``safety`` and ``utility`` keys; they are returned unchanged.
    """
    if not points:
        return []
    order = sorted(range(len(points)), key=lambda i: (-_point(points[i])[0], -_point(points[i])[1]))
    front: list[int] = []
    best_u = -math.inf
    for i in order:  # sweep from the safest point down: keep a point only if it beats every safer one on utility
        s, u = _point(points[i])
        if u > best_u:
            front.append(i)
            best_u = u
    return [points[i] for i in sorted(front, key=lambda i: _point(points[i]))]


def utility_at_safety(points: Sequence[Any], target_safety: float, *, use_front: bool = True) -> dict[str, Any]:
    """Interpolate utility at ``target_safety`` (linear in safety between neighbouring points).

    With ``use_front`` the interpolation runs along the Pareto front (the best utility each method reaches at that
    safety). Outside the measured safety range the value is ``None`` with a status — never extrapolated.
    """
    pts = pareto_front(points) if use_front else sorted(points, key=_point)
    if not pts:
        raise DataError("utility at matched safety needs at least one (safety, utility) point")
    xy = [_point(p) for p in pts]
    s_min, s_max = xy[0][0], xy[-1][0]
    if not s_min <= target_safety <= s_max:
        return {
            "utility": None,
            "status": f"target safety {target_safety:.4g} is outside the measured range [{s_min:.4g}, {s_max:.4g}]",
        }
    for (s0, u0), (s1, u1) in zip(xy, xy[1:], strict=False):
        if s0 <= target_safety <= s1:
            u = u0 if s1 == s0 else u0 + (u1 - u0) * (target_safety - s0) / (s1 - s0)
            return {"utility": u, "status": STATUS_OK}
    return {"utility": xy[0][1], "status": STATUS_OK}  # single point exactly at the target
