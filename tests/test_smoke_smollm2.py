"""Smoke test: the real SmolLM2-135M from its PyPI package loads (converting once) and generates."""

from __future__ import annotations

import time

import pytest
import torch


@pytest.mark.smoke
def test_smollm2_loads_from_package_and_generates():
    from sst_merge.models import load_model

    start = time.perf_counter()
    model, tok = load_model("smollm2-135m")  # first run converts the GGUF into the cache (≈ 20 s on 2 cores)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert time.perf_counter() - start < 60
    # the second load reads the fp32 safetensors cache
    start = time.perf_counter()
    load_model("smollm2-135m")
    assert time.perf_counter() - start < 5  # < 1 s on an idle machine; slack for a busy CI runner
