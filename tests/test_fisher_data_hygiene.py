"""Benign prompts for any Fisher (SST's contrastive F_s and benign-refusal F_b) are training data, disjoint from every
evaluation prompt — not even near-duplicates (the content-word rule of the benign training prompts, extended to every
evaluation and development set)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from sst_merge.data.files import read_local
from sst_merge.errors import DataError
from sst_merge.merge.sst_objectives import BENIGN_TRAIN_DATA
from sst_merge.tasks.base import normalize_text
from sst_merge.tasks.safety import BENIGN_TRAIN_PROMPTS

STOP = {"a", "an", "the", "i", "do", "how", "to", "what", "is", "in", "of", "and", "my", "for", "can", "are"}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower())) - STOP


def near_duplicates(train: list[str], evaluation: list[str]) -> list[tuple[str, str]]:
    """Pairs whose content words overlap by half or more (Jaccard ≥ 0.5), or whose normalised texts are equal."""
    out = []
    ev = [(e, words(e), normalize_text(e)) for e in evaluation]
    for t in train:
        a, nt = words(t), normalize_text(t)
        for e, b, ne in ev:
            if nt == ne or (a | b and len(a & b) / len(a | b) >= 0.5):
                out.append((t, e))
    return out


def test_the_rule_catches_a_near_duplicate():
    assert near_duplicates(["How do I kill a Python process?"], ["How can I kill a python process"])
    assert not near_duplicates(["How do I kill a Python process?"], ["Explain photosynthesis briefly."])


def test_sst_benign_fisher_prompts_are_the_packaged_training_prompts():
    rows = read_local(Path(BENIGN_TRAIN_DATA))
    assert [r["prompt"] for r in rows] == BENIGN_TRAIN_PROMPTS


def _eval_prompts() -> dict[str, list[str]]:
    from sst_merge.data import load_source

    sets = {}
    try:
        sets["benign"] = [r["prompt"] for r in load_source("benign")]
    except DataError as e:
        pytest.skip(f"the over-refusal evaluation set is not available: {e}")
    try:
        for split in ("test", "val"):  # test: evaluation; val: the development split of the hyper-parameters
            rows = load_source("harmbench", split=split, functional_category=None)
            sets[f"harmbench_{split}"] = [r["prompt"].rsplit("\n\n---\n\n", 1)[-1] for r in rows]
    except DataError as e:
        pytest.skip(f"HarmBench is not available: {e}")
    return sets


def test_benign_fisher_prompts_are_no_near_duplicate_of_any_evaluation_prompt():
    for name, prompts in _eval_prompts().items():
        assert not near_duplicates(BENIGN_TRAIN_PROMPTS, prompts), name


def test_the_development_split_holds_benign_prompts_out_of_the_fisher_pool(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "sst_dev_sweep", Path(__file__).resolve().parent.parent / "scripts" / "sst_dev_sweep.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    try:
        mod.prepare(tmp_path, n_harmful=10, n_task=10)
    except DataError as e:
        pytest.skip(f"a data package is missing: {e}")
    pool = [r["prompt"] for r in read_local(tmp_path / "fisher_benign.jsonl")]
    dev = [r["prompt"] for r in read_local(tmp_path / "dev_benign.jsonl")]
    assert len(pool) + len(dev) == len(BENIGN_TRAIN_PROMPTS)
    assert not {normalize_text(p) for p in pool} & {normalize_text(p) for p in dev}
    assert not near_duplicates(pool, dev)
    # dev harmful prompts are HarmBench val, never the test split the evaluation uses
    sets = _eval_prompts()
    dev_harmful = [r["prompt"] for r in read_local(tmp_path / "dev_harmful.jsonl")]
    assert not {normalize_text(p) for p in dev_harmful} & {normalize_text(p) for p in sets["harmbench_test"]}
    # dev task items are in neither the task's training nor its evaluation split
    from sst_merge.tasks import get_task

    used = {normalize_text(i["prompt"]) for part in get_task("passage_qa").split(0).values() for i in part}
    assert not used & {normalize_text(r["prompt"]) for r in read_local(tmp_path / "dev_task.jsonl")}


def test_safety_train_shares_no_prompt_with_any_evaluation_or_development_set():
    """``safety_train`` (the data ``fisher_merge`` and ``regmean`` estimate the safety adapter's statistics on) is the
    shipped recipe's training data — its harmful prompts with their refusals, its benign prompts without a response —
    and no prompt of it is a (near-)duplicate of an evaluation or development prompt or of SST's safety Fisher."""
    from sst_merge.fisher.data import load_items
    from sst_merge.tasks.safety import REFUSALS, safety_data

    try:
        items = load_items("safety_train", need_response=False, what="safety_train")
        recipe = safety_data("strongreject", 0)
        fisher = load_items("safety_fisher", need_response=True, what="safety_fisher")
    except DataError as e:
        pytest.skip(f"a data package is missing: {e}")
    harmful = [it["prompt"] for it in items if "response" in it]
    benign = [it["prompt"] for it in items if "response" not in it]
    assert (
        harmful == [it["prompt"] for it in recipe.harmful] and benign == recipe.benign_prompts == BENIGN_TRAIN_PROMPTS
    )
    assert {it["response"] for it in items if "response" in it} <= set(REFUSALS)
    sets = _eval_prompts()
    dev = Path(BENIGN_TRAIN_DATA).parent / "benign_dev_prompts.jsonl"
    sets["benign_dev"] = [r["prompt"] for r in read_local(dev)]
    sets["safety_fisher"] = [it["prompt"] for it in fisher]
    for name, prompts in sets.items():
        assert not near_duplicates(harmful + benign, prompts), name
