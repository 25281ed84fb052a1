"""Compare a merged model with its reference: Safety Gain, Utility Loss, Safety Tax (design §7), with intervals.

Beside the Safety Tax every comparison carries the over-refusal cost — ``over_refusal_increase = OR_merged −
OR_ref`` and the over-refusal tax ``max(increase, 0) / safety_gain`` (the Safety Tax's edge rules) — and the change
of the balanced score ½(refusal on harmful + answers on benign), all with paired-bootstrap intervals.
"""

from __future__ import annotations

import logging
from typing import Any

from sst_merge.errors import DataError
from sst_merge.eval.stats import (
    aligned_scores,
    balanced_change_report,
    balanced_score,
    over_refusal_report,
    safety_tax_report,
)
from sst_merge.experiments.specs import Metric

log = logging.getLogger(__name__)


def compare(
    ref_s: Metric,
    ref_u: Metric,
    new_s: Metric,
    new_u: Metric,
    n_boot: int,
    seed: int,
    ref_or: Metric | None = None,
    new_or: Metric | None = None,
) -> dict[str, Any]:
    """Safety gain, utility loss and tax of ``new`` against ``ref`` with paired-bootstrap 95% intervals.

    Items are paired by id (the same prompts and questions were evaluated for both models). With the two models'
    over-refusal metrics (``ref_or``, ``new_or``) the over-refusal increase and tax and the balanced-score change
    are added.
    """

    def paired(a: Metric, b: Metric) -> tuple[list[float], list[float]]:
        try:
            return aligned_scores(a.items, b.items)  # by id, in the reference's order
        except DataError as e:
            raise ValueError("reference and merged model were evaluated on different items; cannot pair them") from e

    s_ref, s_new = paired(ref_s, new_s)
    u_ref, u_new = paired(ref_u, new_u)
    r = safety_tax_report(s_ref, s_new, u_ref, u_new, n_boot=max(n_boot, 1), seed=seed)
    out = {
        "safety_gain": {"value": r["safety_gain"], "ci95": r["safety_gain_ci95"]},
        "utility_loss": {"value": r["utility_loss"], "ci95": r["utility_loss_ci95"]},
        "safety_tax": {"value": r["safety_tax"], "ci95": r["safety_tax_ci95"], "status": r["safety_tax_status"]},
        "safety_ref": r["safety_ref"],
        "safety_merged": r["safety_merged"],
        "utility_ref": r["utility_ref"],
        "utility_merged": r["utility_merged"],
        "n_safety": r["n_safety"],
        "n_utility": r["n_utility"],
        "tax_undefined_fraction": r["tax_undefined_fraction"],
        "bootstrap": r["bootstrap"],
    }
    if ref_or is None or new_or is None:
        return out
    b_ref, b_new = paired(ref_or, new_or)
    o = over_refusal_report(s_ref, s_new, b_ref, b_new, n_boot=max(n_boot, 1), seed=seed)
    change = balanced_change_report(s_ref, s_new, b_ref, b_new, n_boot=max(n_boot, 1), seed=seed)
    out.update(
        {
            "over_refusal_increase": {"value": o["over_refusal_increase"], "ci95": o["over_refusal_increase_ci95"]},
            "over_refusal_tax": {
                "value": o["over_refusal_tax"],
                "ci95": o["over_refusal_tax_ci95"],
                "status": o["over_refusal_tax_status"],
            },
            "over_refusal_ref": o["over_refusal_ref"],
            "over_refusal_merged": o["over_refusal_merged"],
            "n_benign": o["n_benign"],
            "over_refusal_tax_undefined_fraction": o["over_refusal_tax_undefined_fraction"],
            "balanced_score_ref": balanced_score(s_ref, b_ref)["balanced_accuracy"],
            "balanced_score_merged": balanced_score(s_new, b_new)["balanced_accuracy"],
            "balanced_score_change": change,
        }
    )
    return out


def log_comparison(label: str, ref_label: str, ref_s: Metric, ref_u: Metric, cmp: dict[str, Any]) -> None:
    """Log the lines people grep for (design §8), then the over-refusal account."""
    log.info("Reference (pre-merge) model: %s", ref_label)
    log.info("Baseline (pre-merge) metrics:")
    log.info("  Baseline Safety (Refusal Rate): %.4f", ref_s.value)
    log.info("  Baseline Utility (Accuracy): %.4f", ref_u.value)
    if "over_refusal_ref" in cmp:
        log.info("  Baseline Over-refusal (Benign Refusal Rate): %.4f", cmp["over_refusal_ref"])
    log.info("Merged model: [%s]", label)
    log.info("Safety Gain: %s", _fmt(cmp["safety_gain"]))
    log.info("Utility Loss: %s", _fmt(cmp["utility_loss"]))
    _log_tax("Safety Tax", cmp["safety_tax"])
    if "over_refusal_increase" in cmp:
        log.info("Over-refusal Increase: %s", _fmt(cmp["over_refusal_increase"]))
        _log_tax("Over-refusal Tax", cmp["over_refusal_tax"])
        log.info(
            "Balanced Score: %.4f (reference %.4f), change %s",
            cmp["balanced_score_merged"],
            cmp["balanced_score_ref"],
            _fmt(cmp["balanced_score_change"]),
        )


def _log_tax(name: str, tax: dict[str, Any]) -> None:
    if tax["value"] is None:
        log.info("%s: undefined (%s)", name, tax["status"])
    else:
        log.info("%s: %s", name, _fmt(tax))


def _fmt(m: dict[str, Any]) -> str:
    ci = m.get("ci95")
    text = f"{m['value']:.4f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" (95% CI {ci[0]:.4f} to {ci[1]:.4f})"
    return text
