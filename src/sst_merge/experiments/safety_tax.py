"""Compare a merged model with its reference: Safety Gain, Utility Loss, Safety Tax (SPEC §7), with intervals."""

from __future__ import annotations

import logging
from typing import Any

from sst_merge.experiments.runner import Metric

log = logging.getLogger(__name__)


def compare(ref_s: Metric, ref_u: Metric, new_s: Metric, new_u: Metric, n_boot: int, seed: int) -> dict[str, Any]:
    """Safety gain, utility loss and tax of ``new`` against ``ref`` with paired-bootstrap 95% intervals.

    Items are paired by id (the same prompts and questions were evaluated for both models).
    """
    from sst_merge.eval.stats import safety_tax_report

    def paired(a: Metric, b: Metric) -> tuple[list[float], list[float]]:
        ids = [i for i in a.items if i in b.items]
        if len(ids) != len(a.items) or len(ids) != len(b.items):
            raise ValueError("reference and merged model were evaluated on different items; cannot pair them")
        return [a.items[i] for i in ids], [b.items[i] for i in ids]

    s_ref, s_new = paired(ref_s, new_s)
    u_ref, u_new = paired(ref_u, new_u)
    r = safety_tax_report(s_ref, s_new, u_ref, u_new, n_boot=max(n_boot, 1), seed=seed)
    return {
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


def log_comparison(label: str, ref_label: str, ref_s: Metric, ref_u: Metric, cmp: dict[str, Any]) -> None:
    """Log the lines people grep for (SPEC §8)."""
    log.info("Reference (pre-merge) model: %s", ref_label)
    log.info("Baseline (pre-merge) metrics:")
    log.info("  Baseline Safety (Refusal Rate): %.4f", ref_s.value)
    log.info("  Baseline Utility (Accuracy): %.4f", ref_u.value)
    log.info("Merged model: [%s]", label)
    log.info("Safety Gain: %s", _fmt(cmp["safety_gain"]))
    log.info("Utility Loss: %s", _fmt(cmp["utility_loss"]))
    if cmp["safety_tax"]["value"] is None:
        log.info("Safety Tax: undefined (%s)", cmp["safety_tax"]["status"])
    else:
        log.info("Safety Tax: %s", _fmt(cmp["safety_tax"]))


def _fmt(m: dict[str, Any]) -> str:
    ci = m.get("ci95")
    text = f"{m['value']:.4f}"
    if ci and ci[0] is not None and ci[1] is not None:
        text += f" (95% CI {ci[0]:.4f} to {ci[1]:.4f})"
    return text
