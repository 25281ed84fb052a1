"""SST's selection that always selects (``share``), the named whole-range method (``safety_span``) and SST on the
input side (``space: input``), on hand cases and the tiny model (design §5)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from sst_merge.config import validate
from sst_merge.errors import ConfigError
from sst_merge.experiments.config import resolve_config
from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.kfac import input_project
from sst_merge.fisher.lowrank import lowrank_gevp, lowrank_project
from sst_merge.merge import get_method
from sst_merge.merge.safety_span import SafetySpanParams
from sst_merge.merge.sst import SSTParams
from tests.test_sst import Loader, context, make_setup, params


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("sst_selection"))


# ---- the share rule ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("share", "lam", "p", "want"),
    [
        (0.5, [5.0, 3.0, 2.0, 0.0, 0.0], 5, 2),  # ceil(0.5 · 3 ranked)
        (0.1, [5.0, 3.0, 2.0, 0.0, 0.0], 5, 1),  # never empty
        (1.0, [5.0, 3.0, 2.0, 0.0, 0.0], 5, 3),  # the whole ranked range, not the identity
        (1.0, [5.0, 3.0, 2.0, 1.0], 4, 4),  # every direction ranked: the identity
        (0.25, [4.0, 3.0, 2.0, 1.0] + [0.0] * 60, 64, 1),  # lowrank-like: a share of 4, not of p = 64
    ],
)
def test_share_counts_the_ranked_directions(share, lam, p, want):
    assert Selection(share=share).count(torch.tensor(lam, dtype=torch.float64), p) == want


def test_fraction_of_p_keeps_the_whole_lowrank_range_and_share_does_not():
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # N_s = 4 ranked of p = 1000
    assert Selection(fraction=0.1).count(lam, 1000) == 4  # ceil(100) capped at the rank: selects nothing
    assert Selection(share=0.5).count(lam, 1000) == 2


def test_share_one_is_the_safety_span_projection():
    """share 1 with lowrank: G_s P x = G_s x for every safety example (the first-order effect kept), and P x lies in
    the span of B⁻¹ G_sᵀ (checked by solving for its coefficients)."""
    g = torch.Generator().manual_seed(0)
    G_s, G_u = (
        torch.randn(4, 30, generator=g, dtype=torch.float64),
        torch.randn(6, 30, generator=g, dtype=torch.float64),
    )
    x = torch.randn(30, generator=g, dtype=torch.float64)
    damping = 0.1
    sol = lowrank_gevp(G_s, G_u, damping)
    y, _, n = lowrank_project(x, G_s, G_u, sol, Selection(share=1.0))
    assert n == 4
    torch.testing.assert_close(G_s @ y, G_s @ x)
    B = G_u.T @ G_u / 6 + damping * torch.eye(30, dtype=torch.float64)
    span = torch.linalg.solve(B, G_s.T)  # (30, 4)
    coef = torch.linalg.lstsq(span, y[:, None]).solution
    torch.testing.assert_close(span @ coef, y[:, None])
    half, _, n2 = lowrank_project(x, G_s, G_u, sol, Selection(share=0.5))
    assert n2 == 2 and not torch.allclose(G_s @ half, G_s @ x)


# ---- the default configuration selects ------------------------------------------------------------------------


def test_the_default_sst_selection_is_a_share_below_one():
    for mode in ("minimal", "full"):
        sst = resolve_config(mode).sst
        assert "share" in sst and 0 < sst["share"] < 1
        assert not {"k", "fraction", "threshold"} & set(sst)


def test_the_demo_configuration_selects_a_strict_nonempty_subset_on_every_module(setup, tmp_path, caplog):
    """exp1 minimal's sst parameters (the demo), on the tiny model with its 6 Fisher examples: every module keeps
    more than none and fewer than all of the directions F_s ranks, and nothing warns about the whole range."""
    demo = resolve_config("minimal").sst
    p = params(setup, **{k: v for k, v in demo.items() if k not in ("n_samples",)})
    assert p.share == demo["share"] and p.k is None  # the default's selection, not the test's
    ctx = context(setup, tmp_path)
    with caplog.at_level(logging.WARNING):
        get_method("sst").merge(p, ctx)
    modules = ctx.diagnostics["sst"]["modules"]
    assert modules and all(0 < v["n_kept"] < v["n_positive"] for v in modules.values()), modules
    assert all(v["n_kept"] == math.ceil(demo["share"] * v["n_positive"]) for v in modules.values())
    assert ctx.diagnostics["sst"]["modules_keeping_whole_range"] == 0
    assert "keeps every direction" not in caplog.text


# ---- safety_span ------------------------------------------------------------------------------------------------


def test_safety_span_is_sst_with_share_one(setup, tmp_path):
    kw = {k: v for k, v in params(setup).model_dump(by_alias=True).items() if k != "k" and v is not None}
    span = validate(SafetySpanParams, kw)
    ctx1, ctx2 = context(setup, tmp_path), context(setup, tmp_path)
    a = get_method("safety_span").merge(span, ctx1)
    b = get_method("sst").merge(validate(SSTParams, {**kw, "share": 1.0}), ctx2)
    assert a.keys() == b.keys()
    for m in a:
        torch.testing.assert_close(a[m], b[m])
    # the whole ranked range is kept: n_kept = rank of F_s on every module
    assert all(v["n_kept"] == v["n_positive"] for v in ctx1.diagnostics["sst"]["modules"].values())


def test_safety_span_refuses_a_selection(setup):
    with pytest.raises(ConfigError, match="safety_span keeps the whole range of F_s, so it takes no k"):
        validate(SafetySpanParams, {"k": 3, "safety_data": "x", "utility_data": "y"})


# ---- the input side ---------------------------------------------------------------------------------------------


def test_input_project_hand_case():
    """A_s = diag(4, 1), A_c = I: μ = (4, 1)/(1 + ε); top 1 keeps τ's first input column, zeroes the second."""
    tau = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    res = input_project(tau, torch.diag(torch.tensor([4.0, 1.0])), torch.eye(2), 1e-3, Selection(k=1))
    torch.testing.assert_close(res.projected, torch.tensor([[1.0, 0.0], [3.0, 0.0], [5.0, 0.0]]))
    torch.testing.assert_close(res.lam_desc, torch.tensor([4.0, 1.0], dtype=torch.float64) / 1.001)
    assert (res.n_directions, res.n_positive, res.n_kept) == (2, 2, 1)
    assert res.damping == pytest.approx(1e-3)


def test_input_project_keeps_the_harmful_components_and_kills_the_contrast_ones():
    """Over contrast inputs (A_c) every functional x_iᵀa has unit variance, over harmful ones μᵢ; an input is
    Σ (Ã_c x_i) s_i. The projected update acts on Ã_c x_j exactly like τ for a selected j and not at all otherwise;
    its output energy on contrast inputs is τ's on the selected components only. (The first form, τ X_k X_kᵀ Ã_c,
    fails both.)"""
    g = torch.Generator().manual_seed(1)
    X1 = torch.randn(50, 6, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([3.0, 1, 1, 1, 0.5, 1]).double()
    )
    X2 = torch.randn(80, 6, generator=g, dtype=torch.float64)
    A_s, A_c = X1.T @ X1 / 50, X2.T @ X2 / 80
    tau = torch.randn(5, 6, generator=g, dtype=torch.float64)
    eps = 1e-3
    res = input_project(tau, A_s, A_c, eps, Selection(k=2))
    Ad = A_c + eps * float(A_c.diagonal().mean()) * torch.eye(6, dtype=torch.float64)
    Li = torch.linalg.inv(torch.linalg.cholesky(Ad))  # reference: the Cholesky reduction, decreasing μ
    mu, W = torch.linalg.eigh(Li @ A_s @ Li.T)
    X = (Li.T @ W).flip(1)
    torch.testing.assert_close(X.T @ Ad @ X, torch.eye(6, dtype=torch.float64))
    patterns = Ad @ X  # column j: the input pattern of component j
    out = res.projected
    torch.testing.assert_close(out @ patterns[:, :2], tau @ patterns[:, :2])  # kept
    torch.testing.assert_close(out @ patterns[:, 2:], torch.zeros(5, 4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(res.lam_desc, mu.flip(0).clamp_min(0))
    again = input_project(out, A_s, A_c, eps, Selection(k=2)).projected  # P² = P
    torch.testing.assert_close(again, out)


def test_space_input_needs_kfac_and_the_safety_projector(setup):
    with pytest.raises(ConfigError, match="space: input .* it needs fisher=kfac.*got fisher=lowrank"):
        params(setup, space="input")
    with pytest.raises(ConfigError, match="got subspace=utility_complement"):
        params(setup, space="input", fisher="kfac", subspace="utility_complement")


def test_sst_on_the_input_side_end_to_end(setup, tmp_path):
    loader = Loader()
    p = params(setup, space="input", fisher="kfac", k=2)
    ctx = context(setup, tmp_path, loader)
    merged = get_method("sst").merge(p, ctx)
    diag = ctx.diagnostics["sst"]
    assert diag["space"] == "input" and set(diag["fisher_definitions"]) == {"A_harmful", "A_contrast", "projector"}
    assert diag["fisher_cache"] == {"safety": "computed", "utility": "computed", "benign_inputs": "computed"}
    util, safe = setup["utility"], setup["safety"]
    for m in safe.modules:
        added = (merged[m] - 0.8 * util.delta(m)) / p.alpha  # α τ M with M of rank k = 2 on the input side
        assert torch.linalg.matrix_rank(added.double(), rtol=1e-6) <= 2
        assert diag["modules"][m]["n_directions"] == safe.delta(m).shape[1]
        assert diag["modules"][m]["n_kept"] == 2
    # an α sweep reads the Grams from the cache: the model is loaded once
    get_method("sst").merge(
        params(setup, space="input", fisher="kfac", k=2, alpha=2.0), context(setup, tmp_path, loader)
    )
    assert loader.calls == 1
