"""Merge methods on small tensors: hand-computed cases (tests/data/merge_cases.yaml) and properties (design §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from sst_merge.errors import ConfigError
from sst_merge.merge import MERGE_METHODS, get_method
from sst_merge.merge.sparsify import dare_drop, magnitude_trim, sign_consensus_merge, weighted_sum

CASES = yaml.safe_load((Path(__file__).parent / "data" / "merge_cases.yaml").read_text())


def run_kernel(method: str, taus, weights, seed: int = 0, **params) -> torch.Tensor:
    m = get_method(method)
    p = m.Params.model_validate(params)
    return m.merge_module(
        [torch.as_tensor(t, dtype=torch.float32) for t in taus], weights, p, torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_hand_computed_case(case):
    out = run_kernel(case["method"], case["taus"], case["weights"], **case["params"])
    torch.testing.assert_close(out, torch.tensor(case["expected"]), rtol=1e-6, atol=1e-6)


def test_every_builtin_method_has_a_case():
    assert {"task_arithmetic", "linear", "ties", "dare_linear", "dare_ties"} <= {c["method"] for c in CASES}
    assert {"task_arithmetic", "linear", "ties", "dare_linear", "dare_ties"} <= set(MERGE_METHODS.names())


def test_magnitude_trim_keeps_top_k_not_bottom():
    t = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.05, 1.0, -2.0, 0.4, 0.01])
    # k = int(0.3 · 10) = 3: the three largest magnitudes are −5, 3, −2
    out = magnitude_trim(t, 0.3)
    torch.testing.assert_close(out, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 0, -2.0, 0, 0]))
    # max(1, ·): a tiny density still keeps one entry
    assert int((magnitude_trim(t, 0.01) != 0).sum()) == 1
    assert magnitude_trim(t, 1.0) is t
    # ties at the threshold still keep exactly k entries
    tied = torch.tensor([[2.0, -1.0, 1.0], [1.0, -1.0, 0.5]])
    out = magnitude_trim(tied, 0.5)  # k = 3: the 2 and two of the four ±1
    assert int((out != 0).sum()) == 3 and out[0, 0] == 2.0 and set(out[out != 0].abs().tolist()) == {2.0, 1.0}


def test_dare_drop_entries_are_zero_or_rescaled():
    t = torch.randn(200, 50, generator=torch.Generator().manual_seed(1))
    out = dare_drop(t, 0.3, torch.Generator().manual_seed(2))
    kept = out != 0
    torch.testing.assert_close(out[kept], t[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.02  # 10,000 Bernoulli(0.3): sd ≈ 0.0046
    l1 = dare_drop(t, 0.3, torch.Generator().manual_seed(2), rescale="l1")
    assert torch.equal(l1 != 0, kept)  # the same generator state gives the same mask
    torch.testing.assert_close(l1.abs().sum(), t.abs().sum())
    none = dare_drop(t, 0.3, torch.Generator().manual_seed(2), rescale="none")
    torch.testing.assert_close(none[kept], t[kept])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_same_seed_same_output_other_seed_differs(method):
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(8, 6, generator=g) for _ in range(3)]
    a = run_kernel(method, taus, [1.0, 0.5, 2.0], seed=7, density=0.4)
    b = run_kernel(method, taus, [1.0, 0.5, 2.0], seed=7, density=0.4)
    c = run_kernel(method, taus, [1.0, 0.5, 2.0], seed=8, density=0.4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_dare_linear_mean_over_seeds_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 5, generator=g) for _ in range(2)]
    weights = [1.0, 0.5]
    ta = run_kernel("task_arithmetic", taus, weights)
    n = 4000
    mean = sum(run_kernel("dare_linear", taus, weights, seed=s, density=0.5) for s in range(n)) / n
    # per-entry sd of one draw ≤ |Σ wᵢτᵢ|-scale ≈ 3; of the mean ≈ 3/√4000 ≈ 0.05
    torch.testing.assert_close(mean, ta, atol=0.2, rtol=0)
    assert (mean - ta).abs().mean() < 0.05


def test_density_one_makes_sparse_methods_equal_task_arithmetic():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(7, 4, generator=g) for _ in range(3)]
    weights = [0.7, 1.3, -0.4]
    ta = run_kernel("task_arithmetic", taus, weights, **{"lambda": 1.5})
    dl = run_kernel("dare_linear", taus, weights, density=1.0, **{"lambda": 1.5})
    torch.testing.assert_close(dl, ta)
    one = run_kernel("ties", taus[:1], [1.0], density=1.0)
    torch.testing.assert_close(one, taus[0])


@pytest.mark.parametrize(
    "method,params",
    [
        ("task_arithmetic", {}),
        ("linear", {}),
        ("ties", {"density": 1.0}),
        ("dare_linear", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_one_adapter_at_weight_one_returns_its_delta(method, params):
    tau = torch.randn(5, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(run_kernel(method, [tau], [1.0], **params), tau)


def test_ties_matches_reference_formula_on_random_tensors():
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(16, 12, generator=g) for _ in range(3)]
    weights = [1.0, 0.6, 0.3]
    out = run_kernel("ties", taus, weights, density=0.4)
    # Straight loop over entries, written from design §4 independently of the vectorised kernel.
    k = int(0.4 * 16 * 12)
    trimmed = []
    for t in taus:
        thr = t.abs().flatten().sort(descending=True).values[k - 1]
        trimmed.append(torch.where(t.abs() >= thr, t, torch.zeros_like(t)))
    ref = torch.zeros(16, 12)
    for i in range(16):
        for j in range(12):
            vals = [w * t[i, j].item() for w, t in zip(weights, trimmed, strict=True)]
            s = 1.0 if sum(vals) >= 0 else -1.0
            num = sum(v for v in vals if v != 0 and (v > 0) == (s > 0))
            den = sum(w for w, v in zip(weights, vals, strict=True) if v != 0 and (v > 0) == (s > 0))
            ref[i, j] = num / den if den != 0 else 0.0
    torch.testing.assert_close(out, ref)


def test_sign_consensus_and_weighted_sum_kernels():
    torch.testing.assert_close(weighted_sum([torch.ones(2), torch.full((2,), 2.0)], [1.0, -1.0]), -torch.ones(2))
    out = sign_consensus_merge([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], normalize=False)
    torch.testing.assert_close(out, torch.tensor([4.0, -2.0]))  # Σv = [4, −1] → s = [+, −]


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range_is_refused(method, density):
    from sst_merge.config import validate

    with pytest.raises(ConfigError, match="density"):
        validate(get_method(method).Params, {"density": density})


def test_unknown_method_and_param_are_refused():
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*Did you mean 'ties'"):
        get_method("tie")
    from sst_merge.config import validate

    with pytest.raises(ConfigError, match="densty: unknown key"):
        validate(get_method("ties").Params, {"densty": 0.3})
    with pytest.raises(ConfigError, match="density: Field required"):
        validate(get_method("ties").Params, {})
