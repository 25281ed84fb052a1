"""A Fisher approximation in one file: one number per output row, ``F ≈ diag(E[Σ_in g²])`` over rows.

With a per-row diagonal the generalized eigenvalues are ``λ_r = F_s,r / (F_u,r + ε)`` and the oblique projector keeps
or zeroes whole rows of the safety update. Register it by importing this module; then SST takes ``fisher: rows``.
"""

from __future__ import annotations

import torch

from sst_merge.fisher.approximation import APPROXIMATIONS, Approximation, ModuleResult, Stats, check_mean
from sst_merge.fisher.gevp import Selection, count_positive, select_grid


@APPROXIMATIONS.register("rows")
class Rows(Approximation):
    """Stores ``{"rows": E_b[Σ_in g_b²]}`` (out,); no penalty Fisher (``combine`` of the base class)."""

    name = "rows"
    supports_penalty = False

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        return {"rows": torch.zeros(out_features, dtype=torch.float64)}

    def update(self, stats: Stats, a, delta, g: torch.Tensor | None, index: list[int]) -> None:
        assert g is not None  # per_example = True: the estimator passes the per-example gradients (B, out, in)
        stats["rows"].add_(g.double().square().sum(dim=(0, 2)).to(stats["rows"].device))

    def finish(self, stats: Stats, n: int, n_tokens: int) -> Stats:
        return {"rows": (stats["rows"] / n).float()}

    def trace(self, stats: Stats) -> float:
        return float(stats["rows"].double().sum())

    def project(
        self,
        stats_s: Stats,
        stats_u: Stats,
        tau: torch.Tensor,
        eps: float,
        selection: Selection,
        penalties: list[tuple[float, Stats]] | None = None,
    ) -> ModuleResult:
        self.combine([(1.0, stats_u)] + [(b, s) for b, s in penalties or [] if b > 0])  # refuses a real penalty
        fu = stats_u["rows"].double()
        damping = eps * check_mean(float(fu.mean()), "mean row of F_u")
        lam = stats_s["rows"].double() / (fu + damping)  # (out,)
        mask, lam_desc, n_kept = select_grid(lam, selection)
        projected = tau.clone() if mask is None else tau * mask[:, None].to(tau.dtype)
        return ModuleResult(projected, lam_desc, lam.numel(), count_positive(lam_desc), n_kept, damping)
