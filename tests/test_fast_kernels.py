"""The selection threshold of the TIES trim and the randomised truncated SVD: exact answers and error bounds."""

from __future__ import annotations

import pytest
import torch

from sst_merge.adapters.lowrank import randomized_svd_factors, svd_factors
from sst_merge.merge.sparsify import _prime_at_least, kth_largest, magnitude_trim, sign_consensus_merge


def test_kth_largest_hand_computed():
    v = torch.tensor([0.5, 3.0, 1.0, 2.0])  # sorted descending: 3, 2, 1, 0.5
    assert [float(kth_largest(v, k)) for k in (1, 2, 3, 4)] == [3.0, 2.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="k=5"):
        kth_largest(v, 5)


@pytest.mark.parametrize("n", [50_000, 100_003])
@pytest.mark.parametrize("frac", [1e-5, 0.01, 0.5, 0.9, 1.0])
def test_kth_largest_equals_full_kthvalue_on_large_inputs(n, frac):
    # large enough to take the sampled-bracket path; every answer must equal the full selection exactly
    g = torch.Generator().manual_seed(n)
    v = torch.randn(n, generator=g).abs()
    k = max(1, int(frac * n))
    assert torch.equal(kth_largest(v, k), torch.kthvalue(v, n - k + 1).values)


def test_kth_largest_exact_when_the_sample_misses_and_with_ties():
    n = 60_000
    # the strided sample sees only the zeros at multiples of the stride; the large values lie between them
    v = torch.zeros(n)
    stride = _prime_at_least(n // 4096)
    idx = torch.arange(n)
    v[idx % stride != 0] = torch.linspace(1, 2, int((idx % stride != 0).sum()))
    for k in (1, 7, n // 2, n - 10):
        assert torch.equal(kth_largest(v, k), torch.kthvalue(v, n - k + 1).values)
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0]).repeat(5000)
    assert float(kth_largest(ties, 5000)) == 3.0 and float(kth_largest(ties, 5001)) == 2.0


def test_prime_at_least_by_hand():
    assert [_prime_at_least(m) for m in (0, 2, 14, 1024, 1031)] == [2, 2, 17, 1031, 1031]


def test_kth_largest_brackets_a_low_rank_delta_w_without_the_full_kthvalue(monkeypatch):
    """A LoRA ΔW = B·A has columns of different scale. A stride that divides the row length (4096 // 4 = 1024 here)
    samples four columns only, misses the bracket and falls back to ``kthvalue`` over all n entries (5× slower);
    the prime stride samples every column and runs ``kthvalue`` on the band only."""
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(1024, 8, generator=g) @ torch.randn(8, 4096, generator=g)
    mag = delta.reshape(-1).abs()
    n, k = mag.numel(), mag.numel() // 2
    sizes = []
    real = torch.kthvalue
    monkeypatch.setattr(torch, "kthvalue", lambda v, kk: sizes.append(v.numel()) or real(v, kk))
    got = kth_largest(mag, k)
    assert sizes and max(sizes) < n // 5  # the band only
    assert torch.equal(got, real(mag, n - k + 1).values)


def test_magnitude_trim_large_matches_topk_reference():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(300, 200, generator=g)
    out = magnitude_trim(t, 0.3)
    ref = torch.zeros(60_000)
    top = torch.topk(t.reshape(-1).abs(), 18_000).indices
    ref[top] = t.reshape(-1)[top]
    assert torch.equal(out, ref.view(300, 200))


def test_sign_consensus_negative_weight_hand_computed():
    # v = w·τ: v1 = [2, -1], v2 = -1·[1, 3] = [-1, -3]; Σ = [1, -4] → s = [+, -]
    # entry 0: only v1 agrees → 2 / 2 (w1) = 1; entry 1: v1 and v2 agree → (-1 - 3) / (2 + (-1)) = -4
    out = sign_consensus_merge([torch.tensor([1.0, -0.5]), torch.tensor([1.0, 3.0])], [2.0, -1.0])
    assert torch.allclose(out, torch.tensor([1.0, -4.0]))


def test_randomized_svd_exact_on_low_rank_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)  # rank 5
    A, B, err = randomized_svd_factors(x, rank=5, generator=torch.Generator().manual_seed(1))
    assert A.shape == (5, 200) and B.shape == (300, 5)
    assert err < 1e-5 and torch.allclose(B @ A, x, atol=1e-4)


@pytest.mark.parametrize("shape", [(400, 150), (150, 400)])
def test_randomized_svd_error_within_1e3_of_exact_on_flat_spectrum(shape):
    # a near-flat spectrum (sum of random rank-16 blocks, like a TIES merge) is the hard case for a sketch
    g = torch.Generator().manual_seed(2)
    x = sum(torch.randn(shape[0], 16, generator=g) @ torch.randn(16, shape[1], generator=g) for _ in range(3))
    _, _, exact = svd_factors(x, rank=16)
    A, B, err = randomized_svd_factors(x, rank=16, generator=torch.Generator().manual_seed(3))
    # Eckart–Young: no rank-16 factorisation beats the exact truncation; the sketch is within 1e-3 of it
    assert exact - 1e-6 <= err <= exact + 1e-3
    measured = float(torch.linalg.matrix_norm(x - B @ A) / torch.linalg.matrix_norm(x))
    assert err == pytest.approx(measured, rel=1e-5)


def test_randomized_svd_reproducible_and_falls_back_to_exact_when_narrow():
    x = torch.randn(60, 40, generator=torch.Generator().manual_seed(4))
    a1 = randomized_svd_factors(x, rank=20, generator=torch.Generator().manual_seed(5))
    a2 = randomized_svd_factors(x, rank=20, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1[0], a2[0]) and torch.equal(a1[1], a2[1])
    # rank + oversample ≥ min(shape): the exact SVD answers
    assert a1[2] == pytest.approx(svd_factors(x, rank=20)[2], abs=1e-6)


def test_gguf_parse_memo_shares_results_and_restores():
    gguf = pytest.importorskip("gguf")
    from sst_merge.models.embedded import _gguf_parsed_once

    before = (gguf.GGUFReader, gguf.get_tensor_name_map)
    arch = next(iter(gguf.MODEL_ARCH_NAMES))
    with _gguf_parsed_once():
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)  # built once
        assert gguf.GGUFReader is not before[0]
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == before
    assert gguf.get_tensor_name_map(arch, 2) is not gguf.get_tensor_name_map(arch, 2)


def test_prefetched_keeps_order_and_raises_where_the_error_happened():
    from sst_merge.merge.output import _prefetched

    assert list(_prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise ValueError("module 3 failed")

    got = []
    with pytest.raises(ValueError, match="module 3 failed"):
        for x in _prefetched(failing()):
            got.append(x)
    assert got == [1, 2]
    # the consumer stopping early does not hang the producer
    for x in _prefetched(iter(range(100)), depth=1):
        if x == 3:
            break


def test_peft_output_same_with_and_without_prefetch(tmp_path, monkeypatch):
    import json

    from sst_merge.merge import output
    from sst_merge.merge.api import merge
    from sst_merge.testing import random_lora, tiny_model

    base = tiny_model("llama")
    paths = [random_lora(base, str(tmp_path / f"a{i}"), r=4, seed=i) for i in range(2)]
    cfg = {"base_model": "tiny-llama", "method": "dare_linear", "params": {"density": 0.5, "seed": 3},
           "adapters": [{"path": p} for p in paths], "output": {"format": "peft", "rank": 2}}  # fmt: skip
    outs = []
    for pays in (True, False):
        monkeypatch.setattr(output, "_pipeline_pays", lambda pays=pays: pays)
        outs.append(merge(cfg, tmp_path / f"out{pays}", show_progress=False))
    a, b = (open(o / "adapter_model.safetensors", "rb").read() for o in outs)
    assert a == b
    meta = json.loads((outs[0] / "merge_metadata.json").read_text())
    assert meta["output"]["svd"] == "randomized"


def test_magnitude_trim_drops_entries_one_ulp_below_the_threshold():
    # the kept set is |x| >= k-th largest: entries one float step below it are dropped, entries at it kept
    n = 40_000
    thr = torch.tensor(0.75)
    below = float(torch.nextafter(thr, torch.tensor(-1.0)))
    t = torch.full((n,), below)
    t[::4] = 0.75  # 10_000 entries at the threshold, ...
    t[1::8] = -0.75  # ... 5_000 negative ones ...
    t[3::16] = 2.0  # ... and 2_500 above it
    k_kept = int((t.abs() >= 0.75).sum())
    out = magnitude_trim(t.view(200, 200), k_kept / n)
    assert int(torch.count_nonzero(out)) == k_kept
    assert torch.equal(out.reshape(-1), t * (t.abs() >= 0.75))


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.9, 0.123456])
@pytest.mark.parametrize("shape", [(7, 5), (1536, 576)])
def test_dare_drop_mask_is_the_bernoulli_draw(density, shape):
    """Same mask as ``torch.bernoulli(full(p))`` for the same generator state, and the same draws consumed."""
    from sst_merge.merge.sparsify import dare_drop

    tau = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    keep = torch.bernoulli(torch.full_like(tau, density), generator=g1)
    out = dare_drop(tau, density, g2, rescale="none")
    assert torch.equal(out, tau * keep)
    assert torch.equal(dare_drop(tau, density, g1), dare_drop(tau, density, g2))  # streams still in step
    assert torch.equal(
        dare_drop(tau, density, torch.Generator().manual_seed(4)),
        tau * torch.bernoulli(torch.full_like(tau, density), generator=torch.Generator().manual_seed(4)) / density,
    )


def _sign_consensus_reference(taus, weights, normalize):
    """mergekit's formulation, written out: v = w·τ, s = sign(Σv) (+1 at 0), m = sign(v) == s and v != 0."""
    v = torch.stack([t * w for t, w in zip(taus, weights, strict=True)])
    s = torch.where(v.sum(0) >= 0, 1.0, -1.0)
    m = ((torch.sign(v) == s) & (v != 0)).float()
    num = (v * m).sum(0)
    if not normalize:
        return num
    den = (m * torch.tensor(weights)[:, None, None]).sum(0)
    return num / torch.where(den == 0, 1.0, den)


@pytest.mark.parametrize("weights", [[1.0, 0.5, 0.5], [2.0, -1.0, 0.25], [1.0, -1.0, 1.0]])
@pytest.mark.parametrize("normalize", [True, False])
def test_sign_consensus_matches_reference(weights, normalize):
    g = torch.Generator().manual_seed(5)
    taus = [magnitude_trim(torch.randn(60, 50, generator=g), 0.4) for _ in weights]
    taus[1][:5] = -taus[0][:5] * weights[0] / weights[1]  # Σ v = 0 on whole rows where adapter 2 is zero
    taus[2][:5] = 0.0
    taus[2][5:8] = 0.0
    taus[0][5:8] = 0.0
    taus[1][5:8] = 0.0  # no adapter agrees: divisor 1, result 0
    out = sign_consensus_merge(taus, weights, normalize)
    ref = _sign_consensus_reference(taus, weights, normalize)
    assert torch.allclose(out, ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(out[5:8], torch.zeros(3, 50))
    if weights == [1.0, -1.0, 1.0] and normalize:  # divisor w1 + w2 = 0 where both agree: set to 1, as mergekit
        assert torch.isfinite(out).all()
