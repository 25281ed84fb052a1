"""Adapters in ΔW space: loading, scale (rslora), factor concatenation, truncated SVD, saving (design §3)."""

from __future__ import annotations

import math

import pytest
import torch

from sst_merge.adapters import LoraAdapter
from sst_merge.adapters.lora import normalise_module_name
from sst_merge.adapters.lowrank import concat_factors, svd_factors
from sst_merge.adapters.save import save_lora
from sst_merge.testing import random_lora, tiny_model


def test_normalise_module_name():
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert normalise_module_name(key) == "model.layers.0.self_attn.q_proj"
    assert normalise_module_name("base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight") == (
        "model.layers.3.mlp.down_proj"
    )


@pytest.mark.parametrize("rslora", [False, True])
def test_delta_is_scale_b_at_a(tmp_path, rslora):
    path = random_lora(tiny_model("llama"), str(tmp_path / "a"), r=4, lora_alpha=8, use_rslora=rslora)
    a = LoraAdapter.load(path)
    m = "model.layers.1.self_attn.v_proj"
    A, B = a.factors[m]
    scale = 8 / math.sqrt(4) if rslora else 8 / 4  # 4.0 with rslora, 2.0 without
    assert a.scale(m) == scale
    torch.testing.assert_close(a.delta(m), scale * B @ A)
    assert a.delta(m).shape == (32, 64)  # v_proj: (kv heads · head dim, hidden) = (2·16, 64)
    assert a.delta(m).dtype == torch.float32


def test_concat_factors_is_exact_for_mixed_ranks():
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(r, 5, generator=g), torch.randn(7, r, generator=g)) for r in (1, 3, 2)]
    coeffs = [0.5, -2.0, 1.5]
    A, B = concat_factors(pairs, coeffs)
    assert A.shape == (6, 5) and B.shape == (7, 6)
    torch.testing.assert_close(B @ A, sum(c * b @ a for (a, b), c in zip(pairs, coeffs, strict=True)))


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_svd_factors_match_torch_svd(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    A, B, err = svd_factors(x, rank=4)
    U, S, Vh = torch.linalg.svd(x.double(), full_matrices=False)
    best = (U[:, :4] * S[:4]) @ Vh[:4]  # Eckart–Young: the best rank-4 approximation
    torch.testing.assert_close((B @ A).double(), best, rtol=1e-5, atol=1e-5)
    assert abs(err - (S[4:].square().sum() / S.square().sum()).sqrt().item()) < 1e-5
    # singular values split evenly: ‖B[:, i]‖ = ‖A[i]‖ = √σᵢ
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1))
    A, B, err = svd_factors(x, rank=100)  # clipped to min(shape): exact
    assert A.shape[0] == 12 and err < 1e-6


def test_svd_factors_energy_and_low_rank_input():
    lowrank = torch.randn(30, 3) @ torch.randn(3, 20)
    A, B, err = svd_factors(lowrank, energy=0.999999)
    assert A.shape[0] == 3 and err < 1e-5
    A, B, err = svd_factors(lowrank, rank=10)  # more than the true rank: the extra directions are zero
    assert torch.isfinite(A).all() and err < 1e-5
    A, B, err = svd_factors(torch.zeros(4, 3), rank=2)
    assert err == 0.0 and torch.count_nonzero(B @ A) == 0
    with pytest.raises(ValueError):
        svd_factors(lowrank)


def test_save_lora_round_trip_with_rank_pattern(tmp_path):
    g = torch.Generator().manual_seed(2)
    factors = {
        "model.layers.0.self_attn.q_proj": (torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)),
        "model.layers.1.self_attn.q_proj": (torch.randn(3, 64, generator=g), torch.randn(64, 3, generator=g)),
        "model.layers.1.mlp.down_proj": (torch.randn(5, 128, generator=g), torch.randn(64, 5, generator=g)),
    }
    conf = save_lora(tmp_path / "out", factors, base_model="tiny")
    assert conf["r"] == 3 and conf["lora_alpha"] == 3 and list(conf["rank_pattern"].values()) == [5]
    back = LoraAdapter.load(tmp_path / "out")
    assert back.base_model == "tiny"
    for m, (A, B) in factors.items():
        assert back.scale(m) == 1.0
        torch.testing.assert_close(back.delta(m), B @ A)


def test_peft_loads_saved_adapter_with_rank_pattern(tmp_path):
    from peft import PeftModel

    g = torch.Generator().manual_seed(3)
    factors = {
        "model.layers.0.self_attn.q_proj": (torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)),
        "model.layers.1.mlp.down_proj": (torch.randn(6, 128, generator=g), torch.randn(64, 6, generator=g)),
    }
    save_lora(tmp_path / "out", factors, base_model="tiny")
    ids = torch.tensor([[3, 9, 27, 81]])
    peft = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "out")).eval()
    ref = tiny_model("llama")
    with torch.no_grad():
        for m, (A, B) in factors.items():
            ref.get_submodule(m).weight.add_(B @ A)
        torch.testing.assert_close(peft(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
