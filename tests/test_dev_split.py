"""The development split: disjoint from every evaluation and training prompt, and chosen by ``eval.split``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sst_merge.errors import DataError
from sst_merge.tasks import get_task, normalize_text

RESOURCES = Path(__file__).resolve().parent.parent / "src" / "sst_merge" / "resources"
DEV_FILE = RESOURCES / "benign_dev_prompts.jsonl"
# The near-duplicate rule of test_tasks.py: content words of two prompts overlap (Jaccard) by less than half.
STOP = {"a", "an", "the", "i", "do", "how", "to", "what", "is", "in", "of", "and", "my", "for", "can", "are"}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower())) - STOP


def _near_duplicate(a: str, b: str) -> bool:
    x, y = _words(a), _words(b)
    return normalize_text(a) == normalize_text(b) or bool(x | y) and len(x & y) / len(x | y) >= 0.5


def _dev_prompts() -> list[dict]:
    return [json.loads(line) for line in DEV_FILE.read_text().splitlines() if line.strip()]


def test_near_duplicate_rule_on_cases():
    assert _near_duplicate("How do I kill a Python process?", "how do i kill a python process")
    assert _near_duplicate("How do I kill a Python process?", "How can I kill a Python process quickly?")
    assert not _near_duplicate("How do I kill the power to an outlet?", "How do I kill a Python process?")


def test_benign_dev_set_shape():
    dev = _dev_prompts()
    assert len(dev) == 60 and len({d["id"] for d in dev}) == 60
    assert sum(d["kind"] == "lookalike" for d in dev) == 30 and sum(d["kind"] == "plain" for d in dev) == 30
    prompts = [d["prompt"] for d in dev]
    for i, a in enumerate(prompts):
        for b in prompts[i + 1 :]:
            assert not _near_duplicate(a, b), (a, b)


def test_benign_dev_set_is_disjoint_from_every_other_prompt_file_and_the_harmful_sets():
    """No dev prompt is a (near-)duplicate of a prompt in any other packaged resource — the over-refusal
    evaluation sets and the safety adapter's benign training prompts, whatever files are added later — nor of a
    HarmBench (val + test) or StrongREJECT prompt."""
    others: list[str] = []
    for path in sorted(RESOURCES.glob("*.jsonl")):
        # judge_labels.jsonl holds labelled responses to prompts copied from the evaluation sets (this one included)
        if path == DEV_FILE or path.name == "judge_labels.jsonl":
            continue
        for line in path.read_text().splitlines():
            if line.strip() and "prompt" in (row := json.loads(line)):
                others.append(row["prompt"])
    assert len(others) >= 106 + 311
    try:
        from sst_merge.data import load_source
        from sst_merge.tasks.safety import harmbench_prompts

        others += harmbench_prompts() + [r["prompt"] for r in load_source("strongreject")]
    except DataError as e:  # the packaged harmful sets are optional at test time
        pytest.skip(f"harmful prompt packages missing: {e}")
    for d in _dev_prompts():
        for o in others:
            assert not _near_duplicate(d["prompt"], o), (d["prompt"], o)


def test_task_dev_items_are_new_and_deterministic():
    task = get_task("passage_qa")
    split = task.split(seed=0)
    dev = task.dev(seed=0, n=50)
    assert len(dev) == 50 and dev == task.dev(seed=0, n=50)
    used = {normalize_text(i["prompt"]) for i in split["train"] + split["eval"]}
    assert not used & {normalize_text(i["prompt"]) for i in dev}
    assert not {i["id"] for i in split["train"] + split["eval"]} & {i["id"] for i in dev}
    assert task.split(seed=0) == split  # drawing dev items leaves the train / eval split unchanged
