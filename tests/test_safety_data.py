"""The safety adapter's training data: harmful prompts in several forms, benign prompts in the same forms."""

from __future__ import annotations

from collections import Counter

import pytest

from sst_merge.errors import DataError
from sst_merge.tasks import normalize_text
from sst_merge.tasks.safety import (
    BENIGN_FORM_ROWS,
    BENIGN_TRAIN_ROWS,
    REFUSALS,
    TRAIN_FORMS,
    WRAPPERS,
    harmful_train_items,
    phrase_intent,
    phrased_intents,
    safety_splits,
)

HARMFUL = [{"id": f"h{i}", "prompt": f"Harmful request number {i}."} for i in range(40)]
INTENTS = [{"id": f"i{i}", "intent": f"do bad thing {i}"} for i in range(10)]


def _split(seed=0):
    return safety_splits(seed=seed, n_fisher=8, harmful=HARMFUL, forbidden=[])


def test_phrase_intent_fills_the_template_cyclically():
    first = TRAIN_FORMS["fragment"][0]
    assert phrase_intent("bake bread", "fragment", 0) == first.format(vp="bake bread")
    assert phrase_intent("bake bread", "fragment", len(TRAIN_FORMS["fragment"])) == first.format(vp="bake bread")


def test_phrased_intents_distinct_forms_per_intent_and_seeded():
    items = phrased_intents(INTENTS, seed=0, forms_per_intent=3)
    assert len(items) == 30
    for intent in INTENTS:
        forms = [it["form"] for it in items if it["intent"] == intent["id"]]
        assert len(forms) == len(set(forms)) == 3
    for it in items:  # every prompt is one of its form's templates around the intent
        vp = next(r["intent"] for r in INTENTS if r["id"] == it["intent"])
        assert it["prompt"] in {t.format(vp=vp) for t in TRAIN_FORMS[it["form"]]}
    assert phrased_intents(INTENTS, seed=0, forms_per_intent=3) == items
    assert phrased_intents(INTENTS, seed=1, forms_per_intent=3) != items
    assert {it["form"] for it in phrased_intents(INTENTS, 0, forms_per_intent=5)} == set(TRAIN_FORMS)
    with pytest.raises(DataError, match="forms_per_intent"):
        phrased_intents(INTENTS, seed=0, forms_per_intent=6)


def test_harmful_train_items_forms_share_and_hygiene():
    split = _split()
    items = harmful_train_items(0, split, wrap_share=0.5, forms_per_intent=2, intents=INTENTS)
    forms = Counter(it["form"] for it in items)
    assert forms["original"] == len(split["train"]) == 32
    originals = {it["id"]: it["prompt"] for it in split["train"]}
    wrapped = [it for it in items if it["form"] != "original" and it["id"].rsplit("-", 1)[0] in originals]
    assert 8 <= len(wrapped) <= 24  # about half of 32 (binomial, p = 0.5: 16 ± 8 is > 99.5%)
    assert len(items) == 32 + len(wrapped) + 20  # + 10 intents x 2 forms
    for it in wrapped:  # a wrapped prompt is a training prompt inside one of its form's wrappers
        source = originals[it["id"].rsplit("-", 1)[0]]
        assert it["prompt"] in {w.format(p=source) for w in WRAPPERS[it["form"]]}
    fisher = {normalize_text(it["prompt"]) for it in split["fisher"]}
    assert not any(normalize_text(f) in normalize_text(it["prompt"]) for it in items for f in fisher)
    assert all(
        it["kind"] == "harmful" and it["response"] in REFUSALS and it["answer"] == it["response"] for it in items
    )
    assert len({it["id"] for it in items}) == len(items)
    assert harmful_train_items(0, split, 0.5, 2, INTENTS) == items
    assert harmful_train_items(0, _split(), 0.0, 2, INTENTS) != items
    assert len(harmful_train_items(0, split, 0.0, 1, INTENTS)) == 32 + 10
    assert len(harmful_train_items(0, split, 1.0, 1, INTENTS)) == 32 + 32 + 10
    with pytest.raises(DataError, match="wrap_share"):
        harmful_train_items(0, split, wrap_share=1.5, intents=INTENTS)


def test_packaged_training_data_has_every_form_for_both_kinds():
    """Neither kind owns a form: harmful and benign training prompts both come in every training form."""
    harmful = Counter(it["form"] for it in harmful_train_items(0))
    benign = Counter(r["form"] for r in BENIGN_FORM_ROWS)
    for form in TRAIN_FORMS:
        assert harmful[form] >= 20 and benign[form] >= 15, (form, harmful[form], benign[form])
    assert harmful["original"] >= 200
    rows = BENIGN_TRAIN_ROWS + BENIGN_FORM_ROWS
    n_harmful, n_benign = sum(harmful.values()), len(rows)
    assert 0.4 <= n_benign / (n_harmful + n_benign) <= 0.6  # neither kind dominates the mix
    assert len({normalize_text(r["prompt"]) for r in rows}) == len(rows)


def test_benign_form_rows_are_not_near_duplicates_of_the_over_refusal_set():
    from sst_merge.data import load_source
    from tests.test_phrasing import near_duplicates

    dups = near_duplicates([r["prompt"] for r in BENIGN_FORM_ROWS], [r["prompt"] for r in load_source("benign")])
    assert not dups, dups[:3]


def test_forms_recipe_puts_every_wrapper_and_template_on_both_sides():
    """No wrapper predicts a refusal: each appears around harmful and benign prompts alike, at a similar share."""
    from sst_merge.tasks.safety import WRAPPERS, safety_data

    data = safety_data("forms", 0)
    default = safety_data("strongreject", 0)
    assert set(default.benign_prompts) < set(data.benign_prompts)
    assert {i["id"] for i in default.harmful} < {i["id"] for i in data.harmful}
    harmful = [i["prompt"] for i in data.harmful]
    for template in (t for ts in WRAPPERS.values() for t in ts):
        pre, post = template.split("{p}")
        n_h = sum(p.startswith(pre) and p.endswith(post) for p in harmful)
        n_b = sum(p.startswith(pre) and p.endswith(post) for p in data.benign_prompts)
        assert n_h > 10 and n_b > 10, (template, n_h, n_b)
    share_b = sum(any(p.startswith(t.split("{p}")[0]) for ts in WRAPPERS.values() for t in ts)
                  for p in data.benign_prompts) / len(data.benign_prompts)  # fmt: skip
    assert 0.25 < share_b < 0.4  # half of the unwrapped benign prompts again, wrapped: 1/3 of the total
    assert safety_data("forms", 0) == data and safety_data("forms", 1) != data
