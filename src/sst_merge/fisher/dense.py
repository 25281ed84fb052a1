"""The ``dense`` approximation: the full p×p empirical Fisher (small modules only; the reference the others match).

Stores ``{"F": E_b[vec g_b vec g_bᵀ]}`` (p×p, ``vec`` row-major like the lowrank rows) and solves the GEVP with
:func:`~sst_merge.fisher.gevp.dense_project`. Memory is ``4p²`` bytes per module: 64 MiB at p = 4096, so it suits
tests and tiny models, not a 576×576 projection.
"""

from __future__ import annotations

import torch

from sst_merge.fisher.approximation import (
    APPROXIMATIONS,
    Approximation,
    ModuleResult,
    Stats,
    active_penalties,
    check_mean,
    per_example_batch_seconds,
    sums_statistics_seconds,
)
from sst_merge.fisher.gevp import count_positive, dense_project
from sst_merge.machine import Rates

#: Largest module (p = out·in) the dense approximation accepts.
MAX_DENSE_P = 4096


@APPROXIMATIONS.register("dense")
class Dense(Approximation):
    """Stores ``{"F": E[vec g vec gᵀ]}``; ``B = F_u + Σ β_j F_j + εI`` with ``ε = eps · mean diag F_u``."""

    name = "dense"

    def init(self, out_features: int, in_features: int, n: int) -> Stats:
        p = out_features * in_features
        if p > MAX_DENSE_P:
            raise ValueError(
                f"fisher: dense stores a p×p matrix and a module here has p = {p} > {MAX_DENSE_P}; use lowrank"
            )
        return {"F": torch.zeros(p, p, dtype=torch.float64)}

    def update(self, stats, a, delta, g, index) -> None:
        flat = g.reshape(g.shape[0], -1).double().to(stats["F"].device)
        stats["F"] += flat.T @ flat

    def finish(self, stats: Stats, n: int, n_tokens: int) -> Stats:
        stats["F"] = (stats["F"] / n).float()
        return stats

    def trace(self, stats: Stats) -> float:
        return float(stats["F"].double().diagonal().sum())

    def combine(self, parts: list[tuple[float, Stats]]) -> Stats:
        return {"F": sum(w * st["F"].double() for w, st in parts).to(parts[0][1]["F"].dtype)}

    def project(self, stats_s, stats_u, tau, eps, selection, penalties=None) -> ModuleResult:
        fu = stats_u["F"].double()
        damping = eps * check_mean(float(fu.diagonal().mean()), "mean diagonal of F_u")
        b = fu.clone()
        for beta, st in active_penalties(penalties):
            b = b + beta * st["F"].double()
        b = b + damping * torch.eye(b.shape[0], dtype=torch.float64)
        out, lam_desc, n = dense_project(tau, stats_s["F"], b, selection)
        return ModuleResult(out, lam_desc, tau.numel(), count_positive(lam_desc), n, damping)

    # -- planner laws (sst_merge.plan; see Approximation): the p×p statistic is priced as N rows of p (lowrank's
    # law) and its solve as one p×p eigenproblem; dense only runs on modules of p ≤ MAX_DENSE_P.

    def host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        return 2 * n * sum(o * i for o, i in mods) * 4

    def per_example_bytes(self, mods: list[tuple[int, int]], batch: int) -> float:
        return batch * max(o * i for o, i in mods) * 4

    def finish_copy_elements(self, mods: list[tuple[int, int]]) -> int:
        return max(o * i for o, i in mods)

    def batch_seconds(
        self, forward_s: float, mods: list[tuple[int, int]], batch: int, tokens: int, matmul: float, rates: Rates
    ) -> float:
        return per_example_batch_seconds(forward_s, mods, batch, tokens, matmul, rates)

    def statistics_seconds(self, overhead_s: float, mods: list[tuple[int, int]], n: int, rates: Rates) -> float:
        return sums_statistics_seconds(overhead_s, [o * i for o, i in mods], rates)

    def gevp_seconds(self, o: int, i: int, n: int, rates: Rates) -> float:
        return (o * i) ** 3 / rates.eigh  # one p×p eigenproblem

    def gevp_host_bytes(self, mods: list[tuple[int, int]], n: int) -> float:
        return 4 * max(o * i for o, i in mods) * 8
