"""The fast decoder (shared prefix once, slab KV cache, own greedy loop) gives generate()'s tokens, and the shared
prefix really is computed once.

Each test names the one-line bug it catches.
"""

from __future__ import annotations

import os

import pytest
import torch

from sst_merge.eval.generation import _greedy_fast, _greedy_reference, _shared_prefix, generate_greedy
from sst_merge.models.tokenize import pad_id, prompt_ids
from sst_merge.testing import ReplyLM, tiny_model, tiny_tokenizer

# a shared start beyond the chat template, and lengths from 1 to ~60 characters (byte-level: tokens ≈ characters)
PROMPTS = [
    "Please answer: hi",
    "Please answer: what is two plus two, and why is it not five?",
    "Please answer: x",
    "Please answer: tell me a story about a cat",
    "Please answer: ok",
    "Please answer: a much longer prompt with many words in it to pad the batch",
    "Please answer: why",
    "Please answer: name three colours",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param, seed=3)


def both(model, tok, prompts=PROMPTS, **kw):
    kw = {"show_progress": False, **kw}
    ref = generate_greedy(model, tok, prompts, decode="reference", **kw)
    fast = generate_greedy(model, tok, prompts, decode="fast", **kw)
    return ref, fast


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_fast_equals_reference(model, tok, batch_size):
    """Bugs caught: the suffix's positions or the decode position off by one relative to the prompt (RoPE sees the
    distance), the padding slots left visible in the mask, a row reading another row's prefix copy."""
    ref, fast = both(model, tok, batch_size=batch_size, max_new_tokens=10)
    assert fast == ref
    assert len({r["response"] for r in ref}) > 1  # the model says different things: the comparison means something


def _eos_mid_sequence(model, tok) -> int:
    """A token the reference writes after step 0 in some rows but not in all: EOS that stops rows at different steps."""
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    new = _greedy_reference(model, seqs, [], pad_id(tok), 10)
    counts: dict[int, int] = {}
    for row in new.tolist():
        for t in set(row[1:]):
            counts[t] = counts.get(t, 0) + 1
    return max((t for t, c in counts.items() if c < len(seqs)), key=lambda t: counts[t])


def test_raw_tokens_equal_past_eos(model, tok):
    """Token for token, the padding after EOS included (rows stop at different steps, the batch runs on). Bug
    caught: a finished row keeps writing tokens instead of padding."""
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    pid, eos = pad_id(tok), [_eos_mid_sequence(model, tok)]
    ref = _greedy_reference(model, seqs, eos, pid, 10)
    got = _greedy_fast(model, seqs, _shared_prefix(model, seqs), eos, pid, 10)
    assert torch.equal(got, ref)
    assert (got == pid).any() and got.shape[1] == 10


@pytest.mark.parametrize("batch_size", [3, 8])
def test_eos_early_stop(model, tok, batch_size):
    """Rows stop at EOS at different steps. Bug caught: a row that wrote EOS keeps generating (its later tokens are
    cut anyway, but the EOS check on the padding it should write would then stop it wrongly), or the loop stops at
    the first row's EOS instead of the last."""
    model.generation_config.eos_token_id = _eos_mid_sequence(model, tok)
    try:
        ref, fast = both(model, tok, batch_size=batch_size, max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert fast == ref
    assert any(r["stopped"] for r in ref) and not all(r["stopped"] for r in ref)


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_max_new_tokens_cut(model, tok, max_new_tokens):
    """Bug caught: the loop writes one token too many or too few (range off by one)."""
    ref, fast = both(model, tok, batch_size=8, max_new_tokens=max_new_tokens)
    assert fast == ref
    assert all(r["n_new_tokens"] <= max_new_tokens for r in fast)
    assert any(r["n_new_tokens"] == max_new_tokens for r in fast)


def _record_calls(model):
    calls = []

    def hook(module, args, kwargs):
        calls.append({"ids": kwargs["input_ids"].clone(), "pos": kwargs["position_ids"].clone()})

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_shared_prefix_runs_once(tok):
    """The prefix (chat template + "Please answer: ") runs once, at batch 1, for all batches; later forwards embed
    only the suffixes. Bug caught: prefix recomputed per batch, or the prefix length not subtracted from the rows."""
    model = tiny_model("llama", seed=3)
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    shared = os.path.commonprefix(seqs)  # chat template + "Please answer: ", as tokens
    calls, handle = _record_calls(model)
    try:
        generate_greedy(model, tok, PROMPTS, batch_size=3, max_new_tokens=4, show_progress=False)
    finally:
        handle.remove()
    prefix_calls = [c for c in calls if c["ids"].shape[0] == 1 and c["ids"].shape[1] > 1]
    assert len(prefix_calls) == 1
    prefix = prefix_calls[0]["ids"][0].tolist()
    assert prefix == shared and len(shared) > len(prompt_ids(tok, "")) // 2
    prefill = [c for c in calls if c["ids"].shape[0] > 1 and c["ids"].shape[1] > 1]
    assert len(prefill) == 3  # one suffix prefill per batch (8 prompts, batch 3)
    longest = max(len(s) for s in seqs)
    assert all(c["ids"].shape[1] <= longest - len(prefix) for c in prefill)
    processed = sum(c["ids"].numel() for c in prefix_calls + prefill)
    assert processed < sum(len(s) for s in seqs)  # fewer prompt tokens than the reference's unpadded total


def test_positions_are_absolute(tok):
    """Every real token gets the position a plain unpadded forward gives it: 0, 1, 2, ... across the prefix, the
    suffix and the generated tokens. RoPE is blind to a uniform shift, so token equality cannot see this one; bug
    caught: ``P + k + 1`` (or ``P + k - 1``) for the suffix and decode positions alike."""
    model = tiny_model("qwen2", seed=3)
    prompts = PROMPTS[:3]
    seqs = [prompt_ids(tok, p) for p in prompts]
    calls, handle = _record_calls(model)
    try:
        generate_greedy(model, tok, prompts, batch_size=3, max_new_tokens=5, show_progress=False)
    finally:
        handle.remove()
    prefix, prefill, *steps = calls
    n_prefix = prefix["ids"].shape[1]
    assert prefix["pos"][0].tolist() == list(range(n_prefix))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for row, i in enumerate(order):
        n = len(seqs[i])
        real = prefill["pos"][row, prefill["ids"].shape[1] - (n - n_prefix) :].tolist()
        assert real == list(range(n_prefix, n))
        assert [s["pos"][row, 0].item() for s in steps] == list(range(n, n + len(steps)))


def test_all_rows_stop_at_eos_ends_the_loop(tok):
    """When every row's first token is EOS, no decode step runs. Bug caught: the loop ignores ``done.all()``."""
    model = tiny_model("llama", seed=3)
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    first = _greedy_reference(model, seqs, [], pad_id(tok), 1)[:, 0].tolist()
    prefix = _shared_prefix(model, seqs)
    calls, handle = _record_calls(model)
    try:
        got = _greedy_fast(model, seqs, prefix, sorted(set(first)), pad_id(tok), 20)
    finally:
        handle.remove()
    assert got[:, 0].tolist() == first and (got[:, 1:] == pad_id(tok)).all()
    assert len(calls) == 1  # the suffix prefill only (the prefix was computed before the hook)


def test_eager_attention_takes_an_additive_mask(tok):
    """The eager kernel adds its mask: a boolean one would be added as 0/1. Bug caught: the bool mask passed as is."""
    model = tiny_model("llama", seed=3)
    model.set_attn_implementation("eager")
    ref, fast = both(model, tok, batch_size=8, max_new_tokens=6)
    assert fast == ref


def test_stub_models_take_the_reference_path(tok):
    """A model without the HF cache interface (the test stubs) is decoded by its generate()."""
    out = generate_greedy(ReplyLM(tok, "no."), tok, ["a", "bb"], show_progress=False, decode="fast")
    assert [o["response"] for o in out] == ["no.", "no."]


def test_unknown_decode_is_refused(tok):
    with pytest.raises(ValueError, match="fast' or 'reference"):
        generate_greedy(ReplyLM(tok, "x"), tok, ["a"], decode="quick")


def test_decode_setting_stays_out_of_cache_keys():
    """Both decoders give the same tokens, so the setting must not split the evaluation cache: it is left out of
    ``model_dump`` (what the experiment runner hashes). Bug caught: ``exclude=True`` dropped from the field."""
    from sst_merge.eval import EvalSettings
    from sst_merge.experiments.config import ExperimentEvalSettings

    assert EvalSettings(decode="reference").model_dump() == EvalSettings().model_dump()
    assert "decode" not in ExperimentEvalSettings(decode="reference").model_dump()
    assert ExperimentEvalSettings(decode="reference").harness_settings().decode == "reference"


def test_harness_decoders_agree(tok):
    """The harness passes the setting down (refusal through generate_greedy) and both decoders agree."""
    from sst_merge.eval import EvalSettings, evaluate

    model = tiny_model("qwen2", seed=3)
    items = [{"id": str(i), "prompt": p} for i, p in enumerate(PROMPTS)]
    res = {
        d: evaluate(
            model,
            tok,
            ["refusal"],
            EvalSettings(batch_size=3, max_new_tokens=6, decode=d),
            data={"refusal": items},
            show_progress=False,
        )
        for d in ("fast", "reference")
    }
    assert res["fast"]["settings"]["decoder"] == "fast" and res["reference"]["settings"]["decoder"] == "reference"
    assert res["fast"]["tasks"]["refusal"]["records"] == res["reference"]["tasks"]["refusal"]["records"]


# --- log-likelihood scoring: packed rows (shared root computed once) vs one full forward per context -------------


def _contexts(tok):
    # two "subjects" whose contexts share a description, one context alone, lengths 1 to ~50 tokens
    heads = ["The following are about cats.\n\n", "The following are about dogs.\n\n"]
    bodies = ["Q: why?\nAnswer:", "Q: what is a much longer question here?\nAnswer:", "Q: x\nAnswer:"]
    ctx = [tok.encode(h + b, add_special_tokens=False) for h in heads for b in bodies]
    return ctx + [tok.encode("Alone:", add_special_tokens=False), [65]]


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_packed_next_token_equals_reference(model, tok, batch_size):
    """Bugs caught: a branch attending to another branch (the mask's ``key == query`` term), branch positions
    continuing after the previous branch instead of restarting after the root, the wrong index scored."""
    from sst_merge.eval.loglik import next_token_logprobs, packed_next_token_logprobs

    ctx, cands = _contexts(tok), [65, 66, 67, tok.eos_token_id]
    kw = {"pad_id": pad_id(tok), "batch_size": batch_size, "show_progress": False}
    ref = next_token_logprobs(model, ctx, cands, **kw)
    got = packed_next_token_logprobs(model, ctx, cands, **kw)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_packing_shares_the_root(tok):
    """Contexts with a common description are packed into one row, the description computed once. Bug caught: the
    grouping never groups (every context its own row) or drops a context."""
    from sst_merge.eval.loglik import prefix_groups

    ctx = _contexts(tok)
    groups = prefix_groups(ctx)
    assert sorted(i for g in groups for i in g) == list(range(len(ctx)))
    assert any({0, 1, 2} <= set(g) for g in groups) and any({3, 4, 5} <= set(g) for g in groups)
    assert not any(6 in g or 7 in g for g in groups if len(g) > 1)  # nothing shared: packing would not pay
    model = tiny_model("llama", seed=3)
    calls, handle = _record_calls(model)
    try:
        from sst_merge.eval.loglik import packed_next_token_logprobs

        packed_next_token_logprobs(model, ctx, [65], pad_id=pad_id(tok), batch_size=8, show_progress=False)
    finally:
        handle.remove()
    assert sum((c["ids"] != pad_id(tok)).sum() for c in calls) < sum(map(len, ctx))  # fewer than the contexts hold


@pytest.mark.parametrize("batch_size", [1, 3])
def test_packed_continuations_equal_reference(model, tok, batch_size):
    """Cloze: every continuation of every context, one token to many. Bugs caught: a continuation's first token
    read from its own branch instead of the root's last position, an off-by-one in the branch offsets."""
    from sst_merge.eval.loglik import continuation_logliks, packed_continuation_logliks

    ctx = _contexts(tok)
    conts = [[tok.encode(" " + w, add_special_tokens=False) for w in ("a", "bb cc", "a long answer here", "d")]] * len(
        ctx
    )
    kw = {"pad_id": pad_id(tok), "batch_size": batch_size, "show_progress": False}
    got = packed_continuation_logliks(model, ctx, conts, **kw)
    flat = continuation_logliks(model, [(c, x) for c, xs in zip(ctx, conts, strict=True) for x in xs], **kw)
    ref = [[flat[q * 4 + k][0] for k in range(4)] for q in range(len(ctx))]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=0)


def test_mmlu_fast_and_reference_agree(tok):
    """Both MMLU formats give the same predictions (and log-likelihoods within float error) under either scorer."""
    from sst_merge.eval import EvalSettings, evaluate

    model = tiny_model("qwen2", seed=3)
    subjects = ["abstract_algebra", "anatomy"]
    items = [
        {
            "id": f"{s}{i}",
            "subject": s,
            "question": f"Question {i} {'is long ' * i}?",
            "choices": ["w", "x y", "z", "v"],
            "answer": i % 4,
        }  # fmt: skip
        for s in subjects
        for i in range(4)
    ]
    for task, key in (("mmlu", "logprobs"), ("mmlu_cloze", "logliks")):
        res = {
            d: evaluate(
                model, tok, [task], EvalSettings(batch_size=3, decode=d), data={task: items}, show_progress=False
            )["tasks"][task]["records"]  # fmt: skip
            for d in ("fast", "reference")
        }
        assert [r["pred"] for r in res["fast"]] == [r["pred"] for r in res["reference"]]
        torch.testing.assert_close(
            torch.tensor([r[key] for r in res["fast"]]), torch.tensor([r[key] for r in res["reference"]]), atol=1e-4,
            rtol=0,
        )  # fmt: skip


def test_token_batches_bound_padding():
    """Packed rows of very different lengths are batched longest first with little padding. Bug caught: the fill
    test dropped (a 10-token row padded to 100)."""
    from sst_merge.eval.loglik import token_batches

    lengths = [100, 95, 10, 92, 11, 50, 9]
    batches = token_batches(lengths, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) <= 3 and min(lengths[i] for i in b) >= 0.9 * lengths[b[0]] for b in batches)
    assert batches[0] == [0, 1, 3]


# --- found by mutation testing (scripts/mutants.sh eval/generation.py) ------------------------------------------


def test_no_prompts_give_no_records(tok):
    assert generate_greedy(tiny_model("llama", seed=3), tok, [], show_progress=False) == []


def test_eos_falls_back_to_the_tokenizers(tok):
    """A generation config without EOS stops at the tokenizer's EOS. Bug caught: the fallback inverted (EOS None)."""
    model = ReplyLM(tok, "no.")
    model.generation_config.eos_token_id = None
    (out,) = generate_greedy(model, tok, ["a"], max_new_tokens=8, show_progress=False)
    assert out["stopped"] and out["token_ids"][-1] == tok.eos_token_id
    assert out["n_new_tokens"] == len(out["token_ids"]) == len(tok.encode("no.", add_special_tokens=False)) + 1


def test_decode_steps_are_max_new_tokens_minus_one(tok):
    """Without EOS, the prefill gives the first token and each of max_new - 1 steps one more: no forward whose token
    is thrown away. Bug caught: the last-step check off by one (one wasted forward per batch)."""
    model = tiny_model("llama", seed=3)
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    prefix = _shared_prefix(model, seqs)
    calls, handle = _record_calls(model)
    try:
        got = _greedy_fast(model, seqs, prefix, [], pad_id(tok), 5)
    finally:
        handle.remove()
    assert got.shape == (len(seqs), 5) and len(calls) == 5


def test_processor_fields_take_the_reference_path(tok):
    """A generation config that changes the logits (a repetition penalty) is decoded by generate(). Bug caught: the
    model's config not read (every field compared as None)."""
    from sst_merge.eval.generation import fast_decodable

    model = tiny_model("llama", seed=3)
    assert fast_decodable(model)
    model.generation_config.repetition_penalty = 1.3
    assert not fast_decodable(model)


def test_reference_is_greedy_whatever_the_generation_config(tok):
    """A model whose generation config samples (an instruct model's do_sample, high temperature) is still decoded
    greedily by reference. Bug caught: ``do_sample=False`` dropped or None (generate falls back to the config)."""
    model = tiny_model("llama", seed=3)
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    want = _greedy_fast(model, seqs, _shared_prefix(model, seqs), [], pad_id(tok), 8)
    model.generation_config.do_sample, model.generation_config.temperature = True, 5.0
    torch.manual_seed(0)
    assert torch.equal(_greedy_reference(model, seqs, [], pad_id(tok), 8), want)


def test_reference_pads_with_the_pad_id_after_eos(tok):
    """Rows past EOS hold the pad id we pass, not the model's configured one. Bug caught: ``pad_token_id`` dropped."""
    model = tiny_model("llama", seed=3)
    seqs = [prompt_ids(tok, p) for p in PROMPTS]
    pid, eos = pad_id(tok), _eos_mid_sequence(model, tok)
    model.generation_config.pad_token_id = 0
    got = _greedy_reference(model, seqs, [eos], pid, 10)
    for row in got.tolist():
        if eos in row:
            assert set(row[row.index(eos) + 1 :]) <= {pid}
    assert (got == pid).any()


def test_reference_inputs_go_to_the_models_device(tok):
    """The batch is built on the device of the model's input embeddings. Bug caught: left on the host (no device)."""

    class OnMeta(ReplyLM):
        def __init__(self, tok):
            super().__init__(tok, "x")
            self.emb = torch.nn.Embedding(1, 1, device="meta")
            self.seen = []

        def generate(self, input_ids, **kwargs):
            self.seen.append(input_ids.device.type)
            return torch.zeros((input_ids.shape[0], input_ids.shape[1] + 2), dtype=torch.long)

    model = OnMeta(tok)
    assert _greedy_reference(model, [[1, 2], [3]], [0], 0, 2).shape == (2, 2)
    assert model.seen == ["meta"]


def test_shared_prefix_length_by_hand(tok, caplog):
    """The prefix is the common prefix but for one token of each prompt: identical prompts (or a single one) keep
    their last token out, one shared token is still a prefix, none gives no prefix (and no forward). Bugs caught: the
    margin off by one, the empty-prefix test off by one, the prefix read from a second prompt that is not there."""
    model = tiny_model("llama", seed=3)
    same = prompt_ids(tok, "hi")
    with caplog.at_level("DEBUG", logger="sst_merge.eval.generation"):
        assert _shared_prefix(model, [same, list(same)]).ids == same[:-1]
    assert f"shared prompt prefix: {len(same) - 1} tokens, computed once for 2 prompts" in caplog.messages
    assert _shared_prefix(model, [same]).ids == same[:-1]
    assert _shared_prefix(model, [[5, 1, 2], [5, 3, 4]]).ids == [5]
    none = _shared_prefix(model, [[1, 2], [3, 4]])
    assert none.ids == [] and none.cache is None
    ref, fast = both(model, tok, prompts=["hi", "hi", "hi there"], batch_size=3, max_new_tokens=4)
    assert fast == ref


def test_shared_prefix_runs_on_the_models_device(tok):
    """The prefix's tokens go to the model's device (shapes only: the model on the meta device). Bug caught: the
    prefix built on the host."""
    model = tiny_model("llama", seed=3).to("meta")
    prefix = _shared_prefix(model, [prompt_ids(tok, p) for p in PROMPTS[:2]])
    assert prefix.cache.layers[0].keys.device.type == "meta"
