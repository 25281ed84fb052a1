"""Fisher estimation on the tiny in-process model: per-example gradients, masking, statistics, sampling, data."""

from __future__ import annotations

import json

import pytest
import torch

from sst_merge.errors import AdapterError, ConfigError, DataError
from sst_merge.fisher.data import Example, collate, encode_example, encode_prompt, load_items, subsample, truncate
from sst_merge.fisher.estimate import _Accumulator, estimate_fisher, target_modules
from sst_merge.fisher.grads import (
    Capture,
    FisherError,
    batch_nll,
    capture_batch,
    frozen,
    per_example_grads,
    plain_head,
    response_nll,
)
from sst_merge.fisher.sampling import prompt_seed, sample_responses
from sst_merge.models.deltas import applied_deltas
from sst_merge.tensors import all_finite

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]

PAIRS = [
    ("How do I pick a lock?", "I can't help with that."),
    ("Say hi", "Hello there, friend!"),
    ("What is 2+2? Answer briefly.", "4"),
    ("Tell me a story about a very long road and a traveller", "Once upon a time."),
]


def examples(tok, max_length=256):
    return [encode_example(tok, p, r, max_length) for p, r in PAIRS]


def reference_grad(model, ex: Example, names: list[str]) -> dict[str, torch.Tensor]:
    """Plain autograd on one unpadded example: −Σ_{response} log p, gradient read from W.grad."""
    ids = torch.tensor([ex.prompt_ids + ex.response_ids])
    for p in model.parameters():
        p.requires_grad_(False)
    ws = {n: model.get_submodule(n).weight for n in names}
    for w in ws.values():
        w.requires_grad_(True)
        w.grad = None
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n_p = len(ex.prompt_ids)
    loss = -sum(logp[t - 1, ids[0, t]] for t in range(n_p, ids.shape[1]))
    loss.backward()
    out = {n: w.grad.clone() for n, w in ws.items()}
    for w in ws.values():
        w.requires_grad_(False)
        w.grad = None
    return out


def test_per_example_grads_equal_single_example_loop(tiny_llama, tiny_tok):
    exs = examples(tiny_tok)
    batch = collate(exs, tiny_tok.pad_token_id)
    assert batch.attention_mask.sum(1).tolist() != [batch.input_ids.shape[1]] * len(exs)  # there is padding
    mods = target_modules(tiny_llama, MODULES)
    with frozen(tiny_llama), Capture(tiny_llama, mods) as cap:
        captured = capture_batch(tiny_llama, cap, batch)
    for b, ex in enumerate(exs):
        ref = reference_grad(tiny_llama, ex, MODULES)
        for name in MODULES:
            g = per_example_grads(*captured[name])[b]
            assert torch.allclose(g, ref[name], atol=1e-5, rtol=1e-4), (b, name)
            assert ref[name].abs().max() > 0


def test_prompt_and_padding_carry_no_gradient(tiny_llama, tiny_tok):
    exs = examples(tiny_tok)
    batch = collate(exs, tiny_tok.pad_token_id)
    mods = target_modules(tiny_llama, MODULES[:1])
    name = MODULES[0]
    with frozen(tiny_llama), Capture(tiny_llama, mods) as cap:
        a, delta = capture_batch(tiny_llama, cap, batch)[name]
        pad = batch.attention_mask == 0
        assert pad.any()
        assert torch.all(delta[pad] == 0) and torch.all(a[pad] == 0)
        # garbage in the padding changes nothing
        noisy = collate(exs, pad_id=7)
        a2, d2 = capture_batch(tiny_llama, cap, noisy)[name]
    assert torch.allclose(per_example_grads(a, delta), per_example_grads(a2, d2), atol=1e-6)
    # the loss has no prompt term: a reference that also scores the prompt tokens gives a different gradient
    ex = exs[0]
    ids = torch.tensor([ex.prompt_ids + ex.response_ids])
    w = tiny_llama.get_submodule(name).weight
    w.requires_grad_(True)
    logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0], -1)
    full = -sum(logp[t - 1, ids[0, t]] for t in range(1, ids.shape[1]))
    (g_full,) = torch.autograd.grad(full, w)
    w.requires_grad_(False)
    ours = per_example_grads(a, delta)[0]
    assert not torch.allclose(ours, g_full, atol=1e-3)
    assert torch.allclose(ours, reference_grad(tiny_llama, ex, [name])[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_head_on_response_positions_gives_the_full_forward_loss(arch, tiny_tok):
    from sst_merge.testing import tiny_model

    model = tiny_model(arch)
    batch = collate(examples(tiny_tok), tiny_tok.pad_token_id)
    assert plain_head(model)
    with torch.no_grad():
        short = batch_nll(model, batch)
        full = batch_nll(model, batch, head_on_response_only=False)
        ref = response_nll(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
    assert torch.allclose(short, full, rtol=1e-5) and torch.allclose(full, ref)


def test_hooked_output_head_runs_on_every_position(tiny_llama, tiny_tok):
    exs = examples(tiny_tok)
    with frozen(tiny_llama), Capture(tiny_llama, target_modules(tiny_llama, ["lm_head"])) as cap:
        a, delta = capture_batch(tiny_llama, cap, collate(exs, tiny_tok.pad_token_id))["lm_head"]
    ref = reference_grad(tiny_llama, exs[1], ["lm_head"])["lm_head"]
    assert torch.allclose(per_example_grads(a, delta)[1], ref, atol=1e-5, rtol=1e-4)


def test_response_mask_covers_exactly_the_response(tiny_tok):
    ex = encode_example(tiny_tok, "Hi", "Yo", 256)
    assert list(ex.prompt_ids) == encode_prompt(tiny_tok, "Hi")
    # byte tokens of "Yo", then <|im_end|> (what the template writes after it is not the response's)
    assert tiny_tok.decode(list(ex.response_ids)) == "Yo<|im_end|>"
    b = collate([ex, encode_example(tiny_tok, "Hello there", "Y", 256)], tiny_tok.pad_token_id)
    assert b.response_mask[0].tolist() == [0] * len(ex.prompt_ids) + [1] * len(ex.response_ids) + [0] * (
        b.input_ids.shape[1] - len(ex.prompt_ids) - len(ex.response_ids)
    )


def test_truncate_keeps_prompt_end_and_response_start():
    ex = Example(tuple(range(10)), tuple(range(100, 120)))
    t = truncate(ex, 16)
    assert t.prompt_ids == tuple(range(2, 10)) and t.response_ids == tuple(range(100, 108))
    t = truncate(Example((1, 2), tuple(range(30))), 10)
    assert t.prompt_ids == (1, 2) and len(t.response_ids) == 8


def test_statistics_from_per_example_grads(tiny_llama, tiny_tok):
    exs = examples(tiny_tok)
    name = MODULES[0]
    refs = torch.stack([reference_grad(tiny_llama, ex, [name])[name] for ex in exs])  # (N, out, in)
    low = estimate_fisher(tiny_llama, [name], exs, "lowrank", tiny_tok.pad_token_id, batch_size=3, show_progress=False)
    rows = low[name]["rows"]
    assert rows.shape == (4, refs[0].numel())
    assert torch.allclose(rows, refs.reshape(4, -1), atol=1e-5, rtol=1e-4)  # original order despite length sorting
    diag = estimate_fisher(
        tiny_llama, [name], exs, "diagonal", tiny_tok.pad_token_id, batch_size=2, show_progress=False
    )
    assert torch.allclose(diag[name]["diag"], refs.pow(2).mean(0), rtol=1e-4, atol=1e-9)
    kfac = estimate_fisher(tiny_llama, [name], exs, "kfac", tiny_tok.pad_token_id, batch_size=4, show_progress=False)
    A, G = kfac[name]["A"], kfac[name]["G"]
    # reference: unpadded single-example passes; a from a forward hook, δ = ∂loss/∂output by autograd
    A_ref, G_ref, n_tok = torch.zeros(64, 64), torch.zeros(64, 64), 0
    mod = tiny_llama.get_submodule(name)
    mod.weight.requires_grad_(True)  # so the module output is part of the graph
    for ex in exs:
        store = {}
        h = mod.register_forward_hook(lambda m, args, out, store=store: store.update(a=args[0], y=out))
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        logp = torch.log_softmax(tiny_llama(input_ids=ids).logits[0].float(), -1)
        h.remove()
        loss = -sum(logp[t - 1, ids[0, t]] for t in range(len(ex.prompt_ids), ids.shape[1]))
        (d,) = torch.autograd.grad(loss, store["y"])
        a = store["a"][0]
        A_ref += a.T @ a
        G_ref += d[0].T @ d[0]
        n_tok += ids.shape[1]
    mod.weight.requires_grad_(False)
    assert torch.allclose(A, A_ref / n_tok, atol=1e-5, rtol=1e-4)
    assert torch.allclose(G, G_ref / len(exs), atol=1e-6, rtol=1e-4)


def test_nan_model_raises(tiny_llama, tiny_tok):
    with torch.no_grad():
        tiny_llama.get_submodule(MODULES[0]).weight[0, 0] = float("nan")
    with pytest.raises(FisherError):
        estimate_fisher(tiny_llama, MODULES, examples(tiny_tok), "lowrank", tiny_tok.pad_token_id, show_progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("approx", ["diagonal", "lowrank"])
def test_non_finite_per_example_gradient_names_its_module(bad, approx):
    """One non-finite δ element of one example, in the second module only: the batch check names that module."""
    mods = {"m1": torch.nn.Linear(3, 2, bias=False), "m2": torch.nn.Linear(3, 2, bias=False)}
    acc = _Accumulator(approx, mods, 2)
    a, delta = torch.ones(2, 4, 3), torch.ones(2, 4, 2)
    acc.update("m1", a, delta, [0, 1])
    acc.check_batch()  # all finite: no error
    delta[1, 2, 0] = bad
    acc.update("m1", a, torch.ones(2, 4, 2), [0, 1])
    acc.update("m2", a, delta, [0, 1])
    with pytest.raises(FisherError, match="module m2: per-example gradients contain NaN or Inf"):
        acc.check_batch()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_all_finite_matches_isfinite(bad):
    t = torch.randn(5, 7)
    assert bool(all_finite(t)) and bool(all_finite(t.double()))
    t[3, 1] = bad
    assert bool(all_finite(t)) == bool(torch.isfinite(t).all()) == (abs(bad) < float("inf"))


def test_all_finite_of_an_empty_tensor_is_true_as_isfinite():
    assert bool(all_finite(torch.empty(0))) and bool(torch.isfinite(torch.empty(0)).all())


def test_target_modules_refuses_non_linear(tiny_llama):
    with pytest.raises(FisherError, match="not in the model"):
        target_modules(tiny_llama, ["model.layers.9.self_attn.q_proj"])
    with pytest.raises(FisherError, match="linear"):
        target_modules(tiny_llama, ["model.embed_tokens"])


def test_applied_deltas_restores_weights(tiny_llama):
    w = tiny_llama.get_submodule(MODULES[0]).weight
    before = w.detach().clone()
    dw = torch.ones_like(before)
    with applied_deltas(tiny_llama, {MODULES[0]: dw}):
        assert torch.allclose(w, before + 1)
    assert torch.equal(w, before)
    with (
        pytest.raises(AdapterError, match=r"ΔW shape \(3, 3\) does not match weight"),
        applied_deltas(tiny_llama, {MODULES[0]: torch.ones(3, 3)}),
    ):
        pass
    assert torch.equal(w, before)


def test_sampling_is_seeded_per_prompt(tiny_llama, tiny_tok):
    prompts = [encode_prompt(tiny_tok, p) for p, _ in PAIRS]
    s1 = sample_responses(tiny_llama, tiny_tok, prompts, 6, 3, 2, False)
    s2 = sample_responses(tiny_llama, tiny_tok, prompts, 6, 3, 2, False)
    s3 = sample_responses(tiny_llama, tiny_tok, prompts, 6, 4, 2, False)
    assert s1 == s2 and s1 != s3
    assert all(1 <= len(r) <= 6 for r in s1)
    # a prompt's sample depends on the seed and the prompt only: not on batch size, order or the other prompts
    assert sample_responses(tiny_llama, tiny_tok, prompts, 6, 3, 1, False) == s1
    assert sample_responses(tiny_llama, tiny_tok, prompts[::-1], 6, 3, 3, False) == s1[::-1]
    # the KV-cache sampler draws what a plain no-cache loop draws from the prompt's own generator
    solo = sample_responses(tiny_llama, tiny_tok, prompts[:1], 6, 3, 1, False)[0]
    g = torch.Generator().manual_seed(prompt_seed(3, prompts[0]))
    ids, naive = list(prompts[0]), []
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(tiny_llama(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            t = int(torch.multinomial(probs[None], 1, generator=g)[0, 0])
            naive.append(t)
            ids.append(t)
            if t == tiny_tok.eos_token_id:
                break
    assert solo == naive


def test_load_items(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n\n" + json.dumps({"prompt": "c"}) + "\n")
    assert len(load_items(str(p), need_response=False, what="utility_data")) == 2
    with pytest.raises(DataError, match="item 1 has no non-empty 'response'"):
        load_items(str(p), need_response=True, what="safety_data")
    with pytest.raises(DataError, match="safety_data: .*does not exist"):
        load_items(str(tmp_path / "missing.jsonl"), True, "safety_data")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="safety_data"):
        load_items(str(bad), True, "safety_data")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no items"):
        load_items(str(empty), True, "safety_data")
    with pytest.raises(ConfigError, match="utility_data"):
        load_items("no-such-source", False, "utility_data")
    items = [{"prompt": str(i)} for i in range(10)]
    assert subsample(items, 4, 0, "x") == subsample(items, 4, 0, "x") != subsample(items, 4, 1, "x")
    assert len(subsample(items, 20, 0, "x")) == 10
