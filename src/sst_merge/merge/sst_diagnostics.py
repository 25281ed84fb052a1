"""What SST-Merge reports about its projection: per module, the directions the GEVP ranked and kept, the top of the
λ spectrum and the share of the update's norm kept; over modules, their means and each Fisher's scale.

Everything here reads results; nothing changes the merge. The diagnostics must be valid JSON (checked where the
merge records them).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from sst_merge.fisher.approximation import ModuleResult
from sst_merge.fisher.solve import get_approximation

#: How many of the largest λ per module go into the diagnostics (a kfac/diagonal spectrum has p = out·in values).
SPECTRUM_TOP = 256

log = logging.getLogger(__name__)


def module_row(res: ModuleResult, tau: torch.Tensor, complement: bool) -> dict[str, Any]:
    """One module's row: directions (``complement``: ``n_kept`` counts what the removal left), spectrum, norms."""
    norm, kept = float(tau.norm()), float(res.projected.norm())
    return {
        "n_directions": res.n_directions,
        # safety: rank of F_s (λ > 0); utility_complement: rank of F_u + βF_b (μ > 0)
        "n_positive": res.n_positive,
        "n_kept": res.n_directions - res.n_kept if complement else res.n_kept,
        **({"n_removed": res.n_kept} if complement else {}),
        "lambda_top": [float(v) for v in res.lam_desc[:SPECTRUM_TOP]],
        "lambda_sum": float(res.lam_desc.sum()),
        "damping": list(res.damping) if isinstance(res.damping, tuple) else res.damping,
        "safety_norm": norm,
        "kept_norm": kept,
        # an oblique projector can lengthen a vector, so the share may exceed 1
        "kept_norm_share": kept / norm if norm > 0 else None,
    }


def summarise(
    diag: dict[str, Any],
    per_module: dict[str, dict[str, Any]],
    complement: bool,
    n_whole_range: int,
    approximation: str,
    stats: dict[str, dict],
    projected: str,
) -> None:
    """Add the per-module rows and their summary to ``diag``: mean directions ranked / kept (/ removed), the modules
    whose selection kept the whole ranked range, each Fisher's trace relative to ``F_u`` and the kept norm share
    (``projected``: which update, for the log line)."""
    diag["modules"] = per_module
    n_mod = max(len(per_module), 1)
    # how many directions the GEVP really ranked (the rank of F_s: λ > 0) and how many the selection kept
    diag["directions_ranked_mean"] = sum(v["n_positive"] for v in per_module.values()) / n_mod
    diag["directions_kept_mean"] = sum(v["n_kept"] for v in per_module.values()) / n_mod
    if complement:
        diag["directions_removed_mean"] = sum(v["n_removed"] for v in per_module.values()) / n_mod
    diag["modules_keeping_whole_range"] = n_whole_range
    kind = get_approximation(approximation)
    # scale of each Fisher relative to F_u (sum of traces over modules): β in units of tr F_u / tr F_b
    tr_u = sum(kind.trace(stats["utility"][m]) for m in per_module)
    diag["trace_relative_to_F_u"] = {
        name: sum(kind.trace(stats[name][m]) for m in per_module) / tr_u if tr_u > 0 else None
        for name in stats
        if name != "utility"
    }
    total = math.sqrt(sum(v["safety_norm"] ** 2 for v in per_module.values()))
    kept = math.sqrt(sum(v["kept_norm"] ** 2 for v in per_module.values()))
    diag["kept_norm_share"] = kept / total if total > 0 else None
    log.info(
        "sst: kept %.3f of the %s update's norm over %d modules; directions ranked %.1f, kept %.1f (mean per module)",
        diag["kept_norm_share"] or 0.0,
        projected,
        len(per_module),
        diag["directions_ranked_mean"],
        diag["directions_kept_mean"],
    )


def whole_range_message(selection: dict[str, Any], whole_range: list[str], per_module: dict[str, Any]) -> str:
    """The warning for a k / fraction that kept every direction ``F_s`` ranks on the ``whole_range`` modules."""
    (name, value), first = next(iter(selection.items())), whole_range[0]
    return (
        f"sst: {name}={value} keeps every direction F_s ranks on {len(whole_range)} of {len(per_module)} modules "
        f"(e.g. {first}: rank {per_module[first]['n_positive']}), so the GEVP selects nothing there; set k below the "
        "rank, or a threshold on λ"
    )
