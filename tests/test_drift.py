"""Drift on benign prompts: the answers' NLL under a model, batched = one at a time; zero for the reference."""

from __future__ import annotations

import pytest
import torch

from sst_merge.eval.drift import answer_nll, per_token_nll
from sst_merge.eval.generation import generate_greedy
from sst_merge.experiments.behaviour import drift_metric
from sst_merge.models.tokenize import prompt_ids

PROMPTS = ["hello there", "what is two plus two", "tell me a story about a cat", "hi"]


def _loop_nll(model, tok, prompt: str, answer: str) -> tuple[float, int]:
    """Reference: one unpadded forward per item, summing -log p of each answer token given everything before."""
    p, a = prompt_ids(tok, prompt), tok.encode(answer, add_special_tokens=False)
    ids = torch.tensor([p + a])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # (T, V)
    return float(-sum(logp[len(p) - 1 + j, t] for j, t in enumerate(a))), len(a)


def test_batched_answer_nll_equals_a_loop(tiny_llama, tiny_tok):
    answers = ["four", "Once upon a time a cat sat.", "", "hello hello"]
    got = answer_nll(tiny_llama, tiny_tok, PROMPTS, answers, batch_size=3)
    assert got[2] == (0.0, 0)  # an empty answer has nothing to score
    for (s, n), p, a in zip(got, PROMPTS, answers, strict=True):
        if a:
            want_s, want_n = _loop_nll(tiny_llama, tiny_tok, p, a)
            assert n == want_n and s == pytest.approx(want_s, rel=1e-4, abs=1e-4)
    assert per_token_nll(got)[2] is None and per_token_nll(got)[0] == pytest.approx(got[0][0] / got[0][1])


def test_reference_has_zero_drift_and_another_model_does_not(tiny_llama, tiny_tok):
    answers = [g["response"] for g in generate_greedy(tiny_llama, tiny_tok, PROMPTS, max_new_tokens=6)]
    ids = [f"b{i}" for i in range(len(PROMPTS))]
    ref = dict(zip(ids, map(list, answer_nll(tiny_llama, tiny_tok, PROMPTS, answers)), strict=True))
    again = dict(zip(ids, map(list, answer_nll(tiny_llama, tiny_tok, PROMPTS, answers, batch_size=1)), strict=True))
    same = drift_metric(ref, ref, n_boot=50, seed=0)
    assert same.value == 0.0 and same.ci == (0.0, 0.0)
    assert abs(drift_metric(again, ref, n_boot=50, seed=0).value) < 1e-4  # batching changes only the last bits
    with torch.no_grad():
        for p in tiny_llama.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = dict(zip(ids, map(list, answer_nll(tiny_llama, tiny_tok, PROMPTS, answers)), strict=True))
    d = drift_metric(moved, ref, n_boot=50, seed=0)
    assert d.value != 0.0 and d.n == sum(1 for a in answers if tiny_tok.encode(a, add_special_tokens=False))
    assert d.extra["nll_model"] - d.extra["nll_reference"] == pytest.approx(d.value)
