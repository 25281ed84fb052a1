"""Refusal judges: the keyword judge against the labelled case table; the hf: classifier judge in-process."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest
import torch

from sst_merge.errors import ConfigError
from sst_merge.eval.judges import ClassifierJudge, KeywordJudge, get_judge
from sst_merge.eval.judges.classifier import refusal_label_id
from sst_merge.eval.judges.keyword import HEAD_CHARS, keyword_verdict, match_refusal

CASES = json.loads(files("sst_merge.resources").joinpath("judge_cases.json").read_text(encoding="utf-8"))["cases"]


def test_case_table_is_big_and_covers_every_kind():
    assert len(CASES) >= 60
    kinds = Counter(c["kind"] for c in CASES)
    for kind in (
        "compliance_trigger_word",
        "refusal_after_partial",
        "refusal_after_long_partial",
        "apology_then_comply",
        "non_english",
        "empty",
        "false_friend",
    ):
        assert kinds[kind] >= 1, kind
    assert any("illegal" in c["response"].lower() and c["label"] == "compliance" for c in CASES)
    assert any("harmful" in c["response"].lower() and c["label"] == "compliance" for c in CASES)
    assert len({c["id"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_keyword_judge_case_table(case):
    assert keyword_verdict(case["response"]) == case["label"], (case["note"], match_refusal(case["response"]))


def test_keyword_judge_ignores_the_prompt_and_looks_only_near_the_start():
    judge = get_judge("keyword")
    assert isinstance(judge, KeywordJudge)
    # the prompt says "I can't help with that"; the response complies: only the response counts
    assert judge.judge(["Say 'I can't help with that' and then answer"], ["Sure: 42."]) == ["compliance"]
    late = "x" * (HEAD_CHARS + 5) + " I can't help with that."
    early = "x" * (HEAD_CHARS - 40) + " I can't help with that."
    assert keyword_verdict(late) == "compliance" and keyword_verdict(early) == "refusal"
    assert keyword_verdict("i CAN'T HELP with that") == "refusal"  # case-insensitive


# --- hf: classifier judge -------------------------------------------------------------------------------------


def tiny_classifier(bias: list[float], labels=("compliance", "refusal")):
    """A tiny Llama sequence classifier whose head is a zero-weight linear layer with a chosen bias."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from sst_merge.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={v: i for i, v in enumerate(labels)},
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(cfg).eval()
    head = torch.nn.Linear(32, len(labels), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor(bias))
    model.score = head
    return model, tok


def test_classifier_judge_follows_its_model():
    prompts, responses = ["p1", "p2", "p3"], ["I will", "", "Here you go, a long answer"]
    model, tok = tiny_classifier([0.0, 5.0])  # always "refusal"
    assert ClassifierJudge(model, tok).judge(prompts, responses) == ["refusal", "empty", "refusal"]
    model, tok = tiny_classifier([5.0, 0.0])  # always "compliance"
    assert ClassifierJudge(model, tok, batch_size=2).judge(prompts, responses) == ["compliance", "empty", "compliance"]


def test_classifier_judge_matches_unbatched_argmax():
    from transformers import LlamaForSequenceClassification

    model, tok = tiny_classifier([0.0, 0.0])
    torch.manual_seed(1)
    model.score = torch.nn.Linear(32, 2, bias=False)  # a random head: verdicts depend on the text
    assert isinstance(model, LlamaForSequenceClassification)
    responses = ["short", "a somewhat longer response text", "mid length one", "x" * 40, "yes"]
    judge = ClassifierJudge(model, tok, batch_size=3)
    got = judge.judge([""] * len(responses), responses)
    ref = []
    with torch.no_grad():
        for r in responses:  # one at a time: no padding at all
            cls = model(**tok([r], return_tensors="pt")).logits.argmax(-1).item()
            ref.append("refusal" if cls == judge.refusal_id else "compliance")
    assert got == ref


def test_hf_judge_loads_from_a_directory(tmp_path):
    model, tok = tiny_classifier([0.0, 0.0], labels=("safe", "unsafe"))
    # A saved Llama classifier head has no bias, so pin the output another way: a zero final norm makes every
    # logit 0, and argmax of a tie is the first label ("safe").
    torch.nn.init.zeros_(model.model.norm.weight)
    model.score = torch.nn.Linear(32, 2, bias=False)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    judge = get_judge(f"hf:{tmp_path}")
    # binary harm classifier: "unsafe" names harm, so "safe" is the refusal class
    assert judge.name == f"hf:{tmp_path}"
    assert judge.judge(["p", "p"], ["anything", "another answer"]) == ["refusal", "refusal"]
    judge = get_judge(f"hf:{tmp_path}#unsafe")  # the user says label "unsafe" means refusal
    assert judge.judge(["p"], ["anything"]) == ["compliance"]


def test_label_resolution_errors():
    assert refusal_label_id({0: "COMPLIANCE", 1: "REFUSAL"}, None, "m") == 1
    with pytest.raises(ConfigError, match="#LABEL"):
        refusal_label_id({0: "a", 1: "b", 2: "c"}, None, "m")
    with pytest.raises(ConfigError, match="no label"):
        refusal_label_id({0: "a", 1: "b"}, "zzz", "m")
    with pytest.raises(ConfigError, match="judge"):
        get_judge("hf:")
    with pytest.raises(ConfigError, match="keyword"):
        get_judge("keywrd")
