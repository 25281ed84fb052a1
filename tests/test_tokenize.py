"""One tokenisation rule: evaluation, the Fisher and training turn a (prompt, response) pair into the same tokens."""

from __future__ import annotations

import pytest
import torch

from sst_merge.errors import ConfigError
from sst_merge.eval.generation import generate_greedy
from sst_merge.fisher.objective import Objective, Part
from sst_merge.fisher.pipeline import FisherSetup, examples_of
from sst_merge.models.tokenize import (
    Example,
    collate,
    encode_example,
    left_pad,
    pad_id,
    prompt_ids,
    response_ids,
    truncate,
)
from sst_merge.testing import tiny_model, tiny_tokenizer
from sst_merge.train.loop import IGNORE, labels_of
from sst_merge.train.loop import encode_example as train_example

PAIRS = [
    ("How do I make a weapon at home?", "I can't help with that."),
    ("What is 3+4?", "7"),
    ("Write a haiku\nabout rain.", "Rain on the window,\nsoft."),
]


def _setup(**kw) -> FisherSetup:
    return FisherSetup(approximation="diagonal", modules=[], load_model=lambda: None, model_name="t", pre_merge={},
                       pre_merge_key=[], cache=False, show_progress=False, **kw)  # fmt: skip


def test_eval_fisher_and_training_give_identical_tokens(monkeypatch):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    seen: list[list[int]] = []
    generate = model.generate

    def recording(input_ids, attention_mask, **kw):  # what evaluation feeds the model, padding removed
        seen.extend(row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask, strict=True))
        return generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "generate", recording)
    for p, _ in PAIRS:  # one at a time: generate_greedy sorts a batch by length
        generate_greedy(model, tok, [p], max_new_tokens=2, show_progress=False, decode="reference")
    items = tuple({"prompt": p, "response": r} for p, r in PAIRS)
    fisher = examples_of(Objective("safety", (Part(items, "given"),)), model, tok, _setup())
    for (p, r), eval_prompt, f in zip(PAIRS, seen, fisher, strict=True):
        t = train_example(tok, {"id": "x", "prompt": p, "response": r})
        assert eval_prompt == list(f.prompt_ids) == list(t.prompt_ids)
        assert f.response_ids == t.response_ids
        # the rule by hand: the template's user turn + generation prompt; the response's bytes, then <|im_end|> only
        assert tok.decode(eval_prompt) == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        assert tok.decode(list(f.response_ids)) == r + "<|im_end|>"
        # the loss sits on the same positions in the Fisher batch and the training labels
        b = collate([f], pad_id(tok))
        labels = labels_of(collate([t], pad_id(tok)))
        assert torch.equal(labels != IGNORE, b.response_mask.bool())
        assert labels[labels != IGNORE].tolist() == list(f.response_ids)


def test_sampled_responses_end_like_given_ones():
    """A greedy response the Fisher samples ends at EOS, as a given response does; it equals evaluation's answer."""
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    prompts = [p for p, _ in PAIRS]
    setup = _setup(max_new_tokens=8)
    greedy = examples_of(Objective("u", (Part(tuple({"prompt": p} for p in prompts), "greedy"),)), model, tok, setup)
    answers = generate_greedy(model, tok, prompts, max_new_tokens=8, show_progress=False)
    for ex, a in zip(greedy, answers, strict=True):
        ids = list(ex.response_ids)
        assert len(ids) == a["n_new_tokens"]
        assert (ids[-1] == tok.eos_token_id) == a["stopped"]


def test_incomplete_response_has_no_eos_and_truncation_keeps_prompt_end_and_response_start():
    tok = tiny_tokenizer()
    assert response_ids(tok, "ab", complete=False) == tok.encode("ab", add_special_tokens=False)
    assert response_ids(tok, "ab") == tok.encode("ab", add_special_tokens=False) + [tok.eos_token_id]
    ex = encode_example(tok, "p" * 300, "abc", 32)  # a short response leaves the rest of the budget to the prompt
    assert len(ex.input_ids) == 32 and tok.decode(list(ex.response_ids)) == "abc<|im_end|>"
    assert ex.prompt_ids == tuple(prompt_ids(tok, "p" * 300)[-28:])
    both_long = truncate(Example(tuple(range(40)), tuple(range(100, 140))), 16)  # both long: half each
    assert both_long == Example(tuple(range(32, 40)), tuple(range(100, 108)))


def test_pad_id_falls_back_to_eos_then_refuses():
    tok = tiny_tokenizer()
    assert pad_id(tok) == tok.pad_token_id
    tok.pad_token = None
    assert pad_id(tok) == tok.eos_token_id
    tok.eos_token = None
    with pytest.raises(ConfigError, match="set tokenizer.pad_token"):
        pad_id(tok)


def test_left_pad_positions_start_at_zero_per_row():
    b = left_pad([[5, 6, 7], [9]], 0, torch.device("cpu"))
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
