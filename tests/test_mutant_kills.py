"""Hand-computed cases for the number-producing kernels, each written against a bug no other test caught.

Found by mutation testing (``scripts/mutants.sh``): every test here fails on at least one one-line change to the
module it names that the rest of the suite let through.
"""

from __future__ import annotations

import pytest

from sst_merge.eval.base import EvalSettings


# -- eval/mmlu_cloze.py, eval/mmlu.py ---------------------------------------------------------------------------
def _cloze_run(monkeypatch, evaluator_name, items, lls):
    from sst_merge.eval import get_evaluator, mmlu

    seen = {}

    def scored(model, tok, contexts, continuations, settings, desc):
        seen.update(contexts=contexts, continuations=continuations)
        return lls

    monkeypatch.setattr(mmlu, "score_choices", scored)
    res = get_evaluator(evaluator_name).run(None, None, items, EvalSettings(show_progress=False))
    return res, seen


def test_cloze_acc_norm_divides_by_the_choice_length(monkeypatch):
    item = {"id": "q0", "subject": "high_school_math", "question": " What? ", "choices": ["1", "1000", "héé"]}
    # log-likelihoods −3, −6, −6 of " 1", " 1000", " héé":
    #   acc:       argmax(−3, −6, −6) = 0
    #   acc_norm:  ÷ characters 1, 4, 3 → −3, −1.5, −2 → 1
    #   acc_bytes: ÷ UTF-8 bytes 1, 4, 5 → −3, −1.5, −1.2 → 2
    res, seen = _cloze_run(monkeypatch, "mmlu_cloze", [{**item, "answer": "B"}], [[-3.0, -6.0, -6.0]])
    assert seen["contexts"] == [
        "The following are questions (with answers) about high school math.\n\nQuestion: What?\nAnswer:"
    ]
    assert seen["continuations"] == [[" 1", " 1000", " héé"]]
    (rec,) = res["records"]
    assert (rec["pred"], rec["pred_norm"], rec["answer"]) == (0, 1, 1)
    assert (rec["score"], rec["score_norm"], rec["score_bytes"]) == (0, 1, 0)
    m = res["metrics"]
    assert (m["acc"]["value"], m["acc_norm"]["value"], m["acc_bytes"]["value"]) == (0.0, 1.0, 0.0)
    assert res["primary"] == "acc" and res["n"] == 1
    # the answer is C: only the byte-normalised choice is right
    res, _ = _cloze_run(monkeypatch, "mmlu_cloze", [{**item, "answer": 2}], [[-3.0, -6.0, -6.0]])
    assert (res["records"][0]["score"], res["records"][0]["score_norm"], res["records"][0]["score_bytes"]) == (0, 0, 1)


def test_mmlu_letter_prompt_and_first_argmax(monkeypatch):
    items = [
        {"id": "a", "subject": "law", "question": "Q1 ", "choices": ["x", "y", "z", "w"], "answer": 3},
        {"id": "b", "subject": "law", "question": "Q2", "choices": ["x", "y"], "answer": "A"},
    ]
    # item a: the largest value is at D → correct; item b: a tie between A and B → the first (A) → correct.
    res, seen = _cloze_run(monkeypatch, "mmlu", items, [[-2.0, -1.5, -3.0, -1.0], [-0.5, -0.5]])
    assert seen["contexts"][1] == (
        "The following are multiple choice questions (with answers) about law.\n\nQ2\nA. x\nB. y\nAnswer:"
    )
    assert seen["continuations"] == [[" A", " B", " C", " D"], [" A", " B"]]
    assert [r["pred"] for r in res["records"]] == [3, 0]
    assert res["metrics"]["acc"]["value"] == 1.0 and res["metrics"]["acc_macro"]["value"] == 1.0


@pytest.mark.parametrize(
    "values,first", [([1.0, 3.0, 3.0], 1), ([5.0, 1.0], 0), ([-1.0, -0.5, -2.0], 1), ([2.0, 2.0, 2.0], 0)]
)
def test_argmax_first(values, first):
    from sst_merge.eval.mmlu import argmax_first

    assert argmax_first(values) == first
