"""The GEVP solvers and projectors on random SPD pairs — no model (design §5)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from sst_merge.fisher.diagonal import diagonal_gevp, diagonal_project
from sst_merge.fisher.gevp import Selection, dense_gevp, dense_project, oblique_projector
from sst_merge.fisher.kfac import kfac_gevp, kfac_project
from sst_merge.fisher.lowrank import lowrank_gevp, lowrank_project
from sst_merge.fisher.solve import ZeroUtilityFisherError, project_module


def spd(n: int, g: torch.Generator, cond: float = 10.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    d = torch.logspace(0, np.log10(cond), n, dtype=torch.float64)
    return q @ torch.diag(d) @ q.T


def psd_lowrank(n: int, r: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(r, n, generator=g, dtype=torch.float64)
    return m.T @ m / r


def vec(x: torch.Tensor) -> torch.Tensor:
    """Column-major vec (the K-FAC convention)."""
    return x.T.reshape(-1)


def unvec(v: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return v.reshape(shape[1], shape[0]).T


# ---- dense -------------------------------------------------------------------------------------------------------


def test_dense_residual_and_b_orthonormal():
    g = torch.Generator().manual_seed(0)
    a, b = spd(12, g), spd(12, g, cond=100.0)
    lam, V = dense_gevp(a, b)
    assert torch.all(lam[:-1] >= lam[1:])  # decreasing
    resid = a @ V - (b @ V) * lam[None, :]
    assert resid.abs().max() < 1e-10 * a.abs().max()
    assert torch.allclose(V.T @ b @ V, torch.eye(12, dtype=torch.float64), atol=1e-10)


def test_dense_agrees_with_scipy_eigh_pair():
    g = torch.Generator().manual_seed(1)
    a, b = spd(9, g), spd(9, g)
    lam, _ = dense_gevp(a, b)
    ref = scipy.linalg.eigh(a.numpy(), b.numpy(), eigvals_only=True)[::-1]
    assert np.allclose(lam.numpy(), ref, rtol=1e-10)
    # not the eigenvalues of a alone, nor of the element-wise ratio diag(a)/diag(b) (the old code's "GEVP")
    assert not np.allclose(np.sort(lam.numpy()), np.sort(np.diag(a.numpy()) / np.diag(b.numpy())), rtol=1e-3)


def test_oblique_projector_is_idempotent_not_orthogonal():
    g = torch.Generator().manual_seed(2)
    a, b = spd(10, g), spd(10, g, cond=50.0)
    _, V = dense_gevp(a, b)
    P = oblique_projector(V, b, 4)
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert torch.linalg.matrix_rank(P).item() == 4
    assert not torch.allclose(P, P.T, atol=1e-3)  # oblique: B ≠ I
    # V V^T alone (the wrong projector) is not idempotent for B ≠ I
    wrong = V[:, :4] @ V[:, :4].T
    assert not torch.allclose(wrong @ wrong, wrong, atol=1e-3)


def test_identity_b_gives_orthogonal_projector():
    g = torch.Generator().manual_seed(3)
    a = spd(8, g)
    eye = torch.eye(8, dtype=torch.float64)
    _, V = dense_gevp(a, eye)
    P = oblique_projector(V, eye, 3)
    assert torch.allclose(P, P.T, atol=1e-12)
    assert torch.allclose(P @ P, P, atol=1e-12)
    # equals the orthogonal projector onto a's top-3 ordinary eigenvectors
    w, U = torch.linalg.eigh(a)
    U3 = U[:, -3:]
    assert torch.allclose(P, U3 @ U3.T, atol=1e-10)


def test_selection_rules():
    lam = torch.tensor([5.0, 3.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert Selection(k=2).count(lam, 5) == 2
    assert Selection(k=4).count(lam, 5) == 3  # never picks among the degenerate λ = 0 directions
    assert Selection(k=5).count(lam, 5) == 5  # every direction: the identity
    assert Selection(fraction=1.0).count(lam, 5) == 5
    assert Selection(fraction=0.3).count(lam, 5) == 2  # ceil(1.5)
    assert Selection(threshold=1.0).count(lam, 5) == 2  # strictly greater
    assert Selection(threshold=0.0).count(lam, 5) == 3
    for bad in ({}, {"k": 1, "fraction": 0.5}, {"fraction": 0.0}, {"threshold": -1.0}, {"k": -1}):
        with pytest.raises(ValueError):
            Selection(**bad)


def test_dense_fraction_one_keeps_null_directions():
    g = torch.Generator().manual_seed(4)
    a, b = psd_lowrank(6, 2, g), spd(6, g)  # F_s of rank 2: four λ = 0
    x = torch.randn(6, generator=g, dtype=torch.float64)
    y, lam, n = dense_project(x, a, b, Selection(fraction=1.0))
    assert n == 6 and torch.equal(y, x)
    y2, _, n2 = dense_project(x, a, b, Selection(k=5))
    assert n2 == 2  # capped at the positive eigenvalues


# ---- lowrank -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
def test_lowrank_equals_dense(k):
    g = torch.Generator().manual_seed(10 + k)
    p, n_s, n_u, damping = 30, 5, 8, 0.05
    G_s = torch.randn(n_s, p, generator=g, dtype=torch.float64)
    G_u = torch.randn(n_u, p, generator=g, dtype=torch.float64)
    F_s = G_s.T @ G_s / n_s
    B = G_u.T @ G_u / n_u + damping * torch.eye(p, dtype=torch.float64)
    sol = lowrank_gevp(G_s, G_u, damping)
    lam_dense, V = dense_gevp(F_s, B)
    assert torch.allclose(sol.lam, lam_dense[:n_s], rtol=1e-8)
    assert lam_dense[n_s:].abs().max() < 1e-8 * lam_dense[0]
    x = torch.randn(p, generator=g, dtype=torch.float64)
    y, _, n = lowrank_project(x, G_s, G_u, sol, Selection(k=k))
    assert n == k
    ref = oblique_projector(V, B, k) @ x
    assert torch.allclose(y, ref, atol=1e-9 * ref.abs().max())
    # the lowrank projector, built column by column, is idempotent
    P = torch.stack(
        [lowrank_project(e, G_s, G_u, sol, Selection(k=k))[0] for e in torch.eye(p, dtype=torch.float64)], 1
    )
    assert torch.allclose(P @ P, P, atol=1e-9)


def test_lowrank_fraction_one_is_identity_and_threshold():
    g = torch.Generator().manual_seed(20)
    G_s = torch.randn(4, 12, generator=g, dtype=torch.float64)
    G_u = torch.randn(6, 12, generator=g, dtype=torch.float64)
    sol = lowrank_gevp(G_s, G_u, 0.1)
    x = torch.randn(3, 4, generator=g, dtype=torch.float64)
    y, _, n = lowrank_project(x, G_s, G_u, sol, Selection(fraction=1.0))
    assert n == 12 and torch.equal(y, x)
    thr = float((sol.lam[1] + sol.lam[2]) / 2)
    y2, _, n2 = lowrank_project(x, G_s, G_u, sol, Selection(threshold=thr))
    y3, _, _ = lowrank_project(x, G_s, G_u, sol, Selection(k=2))
    assert n2 == 2 and torch.allclose(y2, y3)


# ---- kfac --------------------------------------------------------------------------------------------------------


def test_kfac_equals_dense_kronecker():
    g = torch.Generator().manual_seed(30)
    d_in, d_out = 4, 3
    A_s, A_u = spd(d_in, g), spd(d_in, g)
    G_s, G_u = spd(d_out, g), spd(d_out, g)
    dA, dG = 0.1, 0.2
    sol = kfac_gevp(A_s, A_u, G_s, G_u, dA, dG)
    F_s = torch.kron(A_s, G_s)
    B = torch.kron(A_u + dA * torch.eye(d_in, dtype=torch.float64), G_u + dG * torch.eye(d_out, dtype=torch.float64))
    lam_dense, V = dense_gevp(F_s, B)
    lam_k = torch.sort(sol.lam.reshape(-1), descending=True).values
    assert torch.allclose(lam_k, lam_dense, rtol=1e-9)
    x = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    for k in (1, 4, 7, 11):
        y, _, n = kfac_project(x, sol, Selection(k=k))
        ref = unvec(oblique_projector(V, B, k) @ vec(x), (d_out, d_in))
        assert n == k
        assert torch.allclose(y, ref, atol=1e-9), k
    y, _, n = kfac_project(x, sol, Selection(k=12))
    assert n == 12 and torch.equal(y, x)


def test_kfac_projection_is_idempotent():
    g = torch.Generator().manual_seed(31)
    sol = kfac_gevp(spd(5, g), spd(5, g), spd(4, g), spd(4, g), 0.01, 0.01)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y, _, _ = kfac_project(x, sol, Selection(k=6))
    yy, _, _ = kfac_project(y, sol, Selection(k=6))
    assert torch.allclose(y, yy, atol=1e-10)


# ---- diagonal, and a diagonal Fisher in every approximation -------------------------------------------------------


def test_diagonal_mask_by_hand():
    fs = torch.tensor([[4.0, 1.0], [0.0, 9.0]])
    fu = torch.tensor([[1.0, 1.0], [1.0, 2.0]])
    # λ = fs / (fu + 1) = [[2, .5], [0, 3]] → top-2 keeps (1,1) and (0,0)
    lam = diagonal_gevp(fs, fu, 1.0)
    assert torch.allclose(lam, torch.tensor([[2.0, 0.5], [0.0, 3.0]], dtype=torch.float64))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y, lam_desc, n = diagonal_project(x, lam, Selection(k=2))
    assert n == 2 and torch.equal(y, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    y, _, n = diagonal_project(x, lam, Selection(k=4))
    assert n == 4 and torch.equal(y, x)  # identity, including the λ = 0 entry


def test_diagonal_fisher_gives_diagonal_answer_everywhere():
    g = torch.Generator().manual_seed(40)
    p, damping, k = 6, 0.1, 3
    ds = torch.tensor([5.0, 0.5, 3.0, 2.0, 0.1, 4.0], dtype=torch.float64)
    du = torch.tensor([1.0, 2.0, 0.5, 4.0, 1.0, 3.0], dtype=torch.float64)
    x = torch.randn(p, generator=g, dtype=torch.float64)
    expect_lam = ds / (du + damping)
    mask = torch.zeros(p, dtype=torch.bool)
    mask[torch.argsort(expect_lam, descending=True)[:k]] = True
    expect = x * mask
    y_diag, _, _ = diagonal_project(x, diagonal_gevp(ds, du, damping), Selection(k=k))
    assert torch.allclose(y_diag, expect)
    # dense
    y_dense, lam_dense, _ = dense_project(x, torch.diag(ds), torch.diag(du + damping), Selection(k=k))
    assert torch.allclose(y_dense, expect, atol=1e-12)
    assert torch.allclose(lam_dense, torch.sort(expect_lam, descending=True).values)
    # lowrank: rows G = sqrt(N·d) e_i (N = p rows) give F = GᵀG/N = diag(d)
    G_s = torch.diag((p * ds).sqrt())
    G_u = torch.diag((p * du).sqrt())
    y_low, lam_low, _ = lowrank_project(x, G_s, G_u, lowrank_gevp(G_s, G_u, damping), Selection(k=k))
    assert torch.allclose(y_low, expect, atol=1e-10)
    assert torch.allclose(lam_low, torch.sort(expect_lam, descending=True).values)
    # kfac: diagonal factors with a 1×1 output factor; the damped product B = (A_u + ε_A)(G_u + ε_G) is diagonal
    a_s, a_u = torch.diag(ds), torch.diag(du)
    one = torch.ones(1, 1, dtype=torch.float64)
    sol = kfac_gevp(a_s, a_u, one, one, damping, 0.0)
    y_kfac, lam_kfac, _ = kfac_project(x[None, :], sol, Selection(k=k))
    assert torch.allclose(y_kfac[0], expect, atol=1e-12)
    assert torch.allclose(lam_kfac, torch.sort(expect_lam, descending=True).values)


def test_project_module_relative_eps_and_zero_utility():
    g = torch.Generator().manual_seed(50)
    rows_s = torch.randn(3, 8, generator=g)
    rows_u = torch.randn(5, 8, generator=g)
    tau = torch.randn(2, 4, generator=g)
    res = project_module("lowrank", {"rows": rows_s}, {"rows": rows_u}, tau, 1e-2, Selection(k=2))
    mean_diag = float((rows_u.double() ** 2).sum() / (5 * 8))
    assert res.damping == pytest.approx(1e-2 * mean_diag)
    assert res.n_kept == 2 and res.n_positive == 3 and res.projected.shape == tau.shape
    # the same problem through the diagonal approximation uses the same relative ε
    diag = project_module(
        "diagonal",
        {"diag": (rows_s**2).mean(0).reshape(2, 4)},
        {"diag": (rows_u**2).mean(0).reshape(2, 4)},
        tau,
        1e-2,
        Selection(k=2),
    )
    assert diag.damping == pytest.approx(1e-2 * mean_diag, rel=1e-6)
    with pytest.raises(ZeroUtilityFisherError):
        project_module("lowrank", {"rows": rows_s}, {"rows": torch.zeros(5, 8)}, tau, 1e-2, Selection(k=2))
    kf = project_module(
        "kfac",
        {"A": torch.eye(4) * 2, "G": torch.eye(2)},
        {"A": torch.eye(4) * 4, "G": torch.eye(2) * 9},
        tau,
        1e-2,
        Selection(fraction=1.0),
    )
    assert kf.damping == pytest.approx((0.1 * 4, 0.1 * 9))
    assert torch.equal(kf.projected, tau)
