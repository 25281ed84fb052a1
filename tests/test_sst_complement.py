"""SST's ``subspace: utility_complement``: remove the top directions of (F_u + βF_b) v = μ (F_s + εI) v from τ."""

from __future__ import annotations

import pytest
import torch

from sst_merge.config import validate
from sst_merge.errors import ConfigError
from sst_merge.fisher.approximation import get_approximation
from sst_merge.fisher.gevp import Selection, dense_gevp
from sst_merge.fisher.solve import project_module
from sst_merge.merge.sst import SSTParams
from tests.test_fisher_objectives import Loader, sst_run, sst_setup  # noqa: F401  (fixture)


def _rows(seed: int):
    g = torch.Generator().manual_seed(seed)
    rs, ru, rb = (torch.randn(n, 12, generator=g, dtype=torch.float64) for n in (4, 5, 3))
    tau = torch.randn(3, 4, generator=g, dtype=torch.float64)
    return rs, ru, rb, tau


def _stats(approx, rows):
    if approx == "lowrank":
        return tuple({"rows": r} for r in rows), tuple(r.T @ r / r.shape[0] for r in rows)
    if approx == "diagonal":
        diags = tuple(r.pow(2).mean(0) for r in rows)
        return tuple({"diag": d.reshape(3, 4)} for d in diags), tuple(torch.diag(d) for d in diags)
    dense = tuple(r.T @ r / r.shape[0] for r in rows)
    return tuple({"F": f} for f in dense), dense


@pytest.mark.parametrize("approx", ["lowrank", "diagonal", "dense"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_complement_removes_the_top_cost_directions_against_a_dense_reference(approx, beta):
    rs, ru, rb, tau = _rows(3)
    st, (fs, fu, fb) = _stats(approx, (rs, ru, rb))
    eps = 1e-2
    damping = eps * float(fs.diagonal().mean())  # relative to F_s: it is the right-hand side now
    b = fs + damping * torch.eye(12, dtype=torch.float64)
    mu, V = dense_gevp(fu + beta * fb, b)  # descending μ, Vᵀ B V = I
    Vk = V[:, :2]
    ref = tau.reshape(-1) - Vk @ (Vk.T @ (b @ tau.reshape(-1)))
    res = project_module(approx, st[0], st[1], tau, eps, Selection(k=2), [(beta, st[2])], "utility_complement")
    assert res.damping == pytest.approx(damping)
    assert res.n_kept == 2  # the removed directions
    assert torch.allclose(res.projected.reshape(-1), ref, atol=1e-8)
    assert torch.allclose(res.lam_desc[:2], mu[:2], rtol=1e-6)


def test_complement_over_the_whole_range_has_no_first_order_effect_on_the_utility_examples():
    """lowrank, every ranked direction removed: G_u r ≈ 0 (up to the damping), and r is not zero."""
    rs, ru, _, tau = _rows(4)
    eps = 1e-8
    res = project_module("lowrank", {"rows": rs}, {"rows": ru}, tau, eps, Selection(fraction=0.9), None,
                         "utility_complement")  # fmt: skip
    assert res.n_kept == 5  # rank of F_u
    r = res.projected.reshape(-1)
    assert float((ru @ r).abs().max()) < 1e-5 * float((ru @ tau.reshape(-1)).abs().max())
    assert float(r.norm()) > 0.1 * float(tau.norm())
    # and the safety-direction projector of the same statistics is a different update
    keep = project_module("lowrank", {"rows": rs}, {"rows": ru}, tau, eps, Selection(fraction=0.9))
    assert not torch.allclose(keep.projected, res.projected)


def test_combine_is_the_weighted_sum_of_fishers():
    rs, ru, rb, _ = _rows(5)
    st, (_, fu, fb) = _stats("lowrank", (rs, ru, rb))
    rows = get_approximation("lowrank").combine([(1.0, st[1]), (0.3, st[2])])["rows"]
    assert torch.allclose(rows.T @ rows / rows.shape[0], fu + 0.3 * fb, atol=1e-12)
    with pytest.raises(ValueError, match="kfac cannot add Fishers"):
        get_approximation("kfac").combine([(1.0, {"A": torch.eye(2)}), (0.5, {"A": torch.eye(2)})])


def test_validation_of_the_complement_selection():
    with pytest.raises(ConfigError, match="k: all would remove all"):
        validate(SSTParams, {"k": "all", "subspace": "utility_complement"})
    with pytest.raises(ConfigError, match="subspace"):
        validate(SSTParams, {"k": 2, "subspace": "sideways"})
    assert validate(SSTParams, {"k": 0, "subspace": "utility_complement"}).keeps_everything
    assert not validate(SSTParams, {"k": 0}).keeps_everything


def test_complement_end_to_end_on_the_tiny_model(sst_setup, tmp_path):  # noqa: F811
    loader = Loader()
    keep, _ = sst_run(sst_setup, tmp_path, loader)
    comp, ctx = sst_run(sst_setup, tmp_path, loader, subspace="utility_complement")
    # the same Fisher statistics serve both subspaces: the second run loads nothing
    assert loader.calls == 1
    assert set(ctx.diagnostics["sst"]["fisher_cache"].values()) == {"hit"}
    d = ctx.diagnostics["sst"]
    assert d["subspace"] == "utility_complement" and d["directions_removed_mean"] == 3
    assert all(m["n_kept"] == m["n_directions"] - 3 for m in d["modules"].values())
    assert any(not torch.allclose(keep[m], comp[m]) for m in keep)
    # removing nothing (k = 0) is exactly task arithmetic with the safety weight α, and needs no Fisher
    ta, ctx0 = sst_run(sst_setup, tmp_path, Loader(), subspace="utility_complement", k=0, alpha=1.5)
    assert ctx0.diagnostics["sst"]["fisher"].startswith("skipped")
    for m, t in ta.items():
        want = sst_setup["utility"].delta(m) + 1.5 * sst_setup["safety"].delta(m)
        assert torch.allclose(t, want, atol=1e-6)


def test_project_utility_keeps_the_safety_adapter_and_projects_the_utility_update(sst_setup, tmp_path):  # noqa: F811
    """project: utility — α·τ_safety + P(τ_utility), P from (F_u, F_s) estimated at base + τ_safety."""
    from sst_merge.fisher.pipeline import FisherSetup, fisher_statistics
    from sst_merge.merge.sst_objectives import sst_objectives

    loader = Loader()
    keep, _ = sst_run(sst_setup, tmp_path, loader)
    out, ctx = sst_run(sst_setup, tmp_path, loader, project="utility", alpha=0.5)
    # a different pre-merge point: nothing of the safety-projection run's statistics is reused
    assert loader.calls == 2
    assert set(ctx.diagnostics["sst"]["fisher_cache"].values()) == {"computed"}
    assert ctx.diagnostics["sst"]["project"] == "utility"
    safety, utility = sst_setup["safety"], sst_setup["utility"]
    # the statistics at base + τ_safety (a cache hit proves the merge estimated them at exactly that point)
    params = validate(
        SSTParams,
        {"k": 3, "n_samples": 6, "eps": 1e-2, "batch_size": 4, "utility_fisher": "empirical",
         "safety_data": sst_setup["files"]["safety"], "utility_data": sst_setup["files"]["utility"]},
    )  # fmt: skip
    modules = sorted(set(safety.modules) | set(utility.modules))
    setup = FisherSetup(
        approximation="lowrank",
        modules=modules,
        load_model=loader,
        model_name="tiny-test",
        pre_merge={m: safety.delta(m) for m in safety.modules},
        pre_merge_key=[(safety.sha256, 1.0)],
        max_length=256,
        batch_size=4,
        max_new_tokens=64,
        cache_dir=tmp_path / "fisher-cache",
    )
    stats, _ = fisher_statistics(sst_objectives(params), setup)
    assert loader.calls == 2
    for m in modules:
        res = project_module("lowrank", stats["utility"][m], stats["safety"][m], utility.delta(m), 1e-2,
                             Selection(k=3))  # fmt: skip
        assert torch.allclose(out[m], 0.5 * safety.delta(m) + res.projected, atol=1e-6)
        assert not torch.allclose(out[m], keep[m])
    # k: all keeps the utility update whole: task arithmetic, no Fisher
    ta, ctx2 = sst_run(sst_setup, tmp_path, Loader(), project="utility", k="all", alpha=0.5)
    assert ctx2.diagnostics["sst"]["fisher"].startswith("skipped")
    for m, t in ta.items():
        assert torch.allclose(t, utility.delta(m) + 0.5 * safety.delta(m), atol=1e-6)
