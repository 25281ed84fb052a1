"""The over-refusal set (``benign``) and its harmful twins (``benign_unsafe``): XSTest's ten types, and no prompt
equal or near to any prompt a model trains or estimates a Fisher on."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from sst_merge.data import load_source
from sst_merge.tasks import UTILITY_TASKS, get_task
from sst_merge.tasks.base import normalize_text

TYPES = {
    "homonyms",
    "figurative_language",
    "safe_targets",
    "safe_contexts",
    "definitions",
    "real_discrimination_nonsense_group",
    "nonsense_discrimination_real_group",
    "historical_events",
    "privacy_public",
    "privacy_fictional",
}
STOP = {"a", "an", "the", "i", "do", "how", "to", "what", "is", "in", "of", "and", "my", "for", "can", "are", "why"}
STOP |= {"does", "it", "on", "with", "at", "be", "should", "not", "that", "this", "you", "me", "from", "by", "or"}


def content_words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z']+", text.lower())) - STOP


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def test_content_word_overlap_is_a_near_duplicate_detector():
    # the rule the disjointness test relies on: a reworded copy is caught, a shared topic word is not
    a = content_words("How do I kill a Python process?")
    assert jaccard(a, content_words("How can I kill the python process?")) >= 0.5
    assert jaccard(a, content_words("How do I kill weeds in my lawn?")) < 0.5


@pytest.mark.parametrize("name,per_type", [("benign", 25), ("benign_unsafe", 10)])
def test_every_type_is_covered(name, per_type):
    items = load_source(name)
    counts = Counter(it["type"] for it in items)
    assert set(counts) == TYPES
    assert min(counts.values()) >= per_type, counts
    assert len({it["id"] for it in items}) == len(items)
    assert len({normalize_text(it["prompt"]) for it in items}) == len(items)
    if name == "benign":
        assert len(items) >= 250 and {it["kind"] for it in items} == {"lookalike"}


def test_limited_set_is_spread_over_the_types():
    assert Counter(it["type"] for it in load_source("benign", limit=40)) == dict.fromkeys(TYPES, 4)


def test_safe_and_unsafe_sets_do_not_share_prompts():
    safe = {normalize_text(it["prompt"]) for it in load_source("benign")}
    assert not safe & {normalize_text(it["prompt"]) for it in load_source("benign_unsafe")}


def training_and_fisher_prompts() -> list[str]:
    """Every prompt a model of the project trains on or estimates a Fisher on."""
    from sst_merge.tasks.safety import SAFETY_DATA, safety_data

    out = []
    for recipe in SAFETY_DATA:  # every safety training recipe: phrased, wrapped and form prompts included
        data = safety_data(recipe, 0)
        out += [i["prompt"] for i in data.harmful] + data.benign_prompts
    for name in ("strongreject", "strongreject_small"):  # the safety adapter's training and Fisher splits
        out += [it["prompt"] for it in load_source(name)]
    for task in UTILITY_TASKS.names():  # every utility task's items, training and evaluation alike
        out += [it["prompt"] for split in get_task(task).split(seed=0).values() for it in split]
    return out


@pytest.mark.parametrize("name", ["benign", "benign_unsafe"])
def test_no_evaluation_prompt_is_near_a_training_or_fisher_prompt(name):
    train = training_and_fisher_prompts()
    assert len(train) > 4000
    evaluation = [it["prompt"] for it in load_source(name)]
    assert not {normalize_text(p) for p in train} & {normalize_text(p) for p in evaluation}
    train_words = [content_words(p) for p in train]
    for p in evaluation:
        e = content_words(p)
        near = [t for t, w in zip(train, train_words, strict=True) if jaccard(e, w) >= 0.5]
        assert not near, (p, near[:3])
