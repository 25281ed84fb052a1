"""Generated utility tasks and the safety splits: determinism, disjointness, correct answers."""

from __future__ import annotations

import re

import pytest

from sst_merge.errors import ConfigError, DataError
from sst_merge.tasks import UTILITY_TASKS, get_task, is_correct, normalize_answer, normalize_text
from sst_merge.tasks.base import GeneratedTask
from sst_merge.tasks.generated import UNITS

ALL = UTILITY_TASKS.names()


def test_at_least_four_tasks_registered():
    assert len(ALL) >= 4
    for name in ALL:
        task = get_task(name)
        assert task.name == name
        assert task.metric in ("exact_match", "letter")


@pytest.mark.parametrize("name", ALL)
def test_split_deterministic_disjoint_and_large(name):
    task = get_task(name)
    a, b, other = task.split(seed=0), task.split(seed=0), task.split(seed=1)
    assert a == b
    assert a["train"] != other["train"]
    assert len(a["train"]) >= 300 and len(a["eval"]) >= 200
    train = {normalize_text(i["prompt"]) for i in a["train"]}
    evals = {normalize_text(i["prompt"]) for i in a["eval"]}
    assert len(train) == len(a["train"]) and len(evals) == len(a["eval"])  # no duplicates inside a split
    assert not train & evals
    ids = [i["id"] for i in a["train"] + a["eval"]]
    assert len(set(ids)) == len(ids)
    for item in a["train"][:50] + a["eval"][:50]:
        assert set(item) >= {"id", "prompt", "response", "answer"}
        assert item["answer"].strip() and item["response"] == item["answer"]


def _check_arithmetic(item):
    a, op, b = re.search(r"Compute (\d+) ([+-]) (\d+)\.", item["prompt"]).groups()
    return int(item["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def _check_unit(item):
    n, src, dst = re.search(r"Convert (\d+) (\w+) to (\w+)\.", item["prompt"]).groups()
    factor = {(s, d): f for s, d, f in UNITS}[(src, dst)]
    return int(item["answer"]) == int(n) * factor


def _check_reverse(item):
    words = item["prompt"].split(": ", 1)[1].split(", ")
    return item["answer"].split(", ") == words[::-1]


def _check_nth(item):
    words = re.search(r"Words: (.+)\n", item["prompt"]).group(1).split()
    k = ["first", "second", "third", "fourth", "fifth", "sixth"].index(re.search(r"the (\w+) word", item["prompt"])[1])
    return item["answer"] == words[k]


def _check_passage(item):
    passage = re.search(r"Passage: (.+)\n\nQuestion", item["prompt"]).group(1)
    name = re.search(r"does (\w+ \w+) ", item["prompt"]).group(1)
    m = re.search(re.escape(name) + r" lives in (\w+) and works as a (\w+)\. \w+ has a pet (\w+)\.", passage)
    city, job, pet = m.groups()
    q = item["prompt"].rsplit("Question: ", 1)[1]
    want = city if "which city" in q else job if "work as" in q else pet
    return item["answer"] == want


def _check_table(item):
    lines = item["prompt"].split("\n\n")[1].splitlines()
    header = [h.strip() for h in lines[0].split("|")]
    rows = {r.split("|")[0].strip(): [c.strip() for c in r.split("|")] for r in lines[1:]}
    col, obj = re.search(r"What is the (\w+) of the (\w+)\?", item["prompt"]).groups()
    return item["answer"] == rows[obj][header.index(col)]


CHECKS = {
    "arithmetic": _check_arithmetic,
    "unit_conversion": _check_unit,
    "list_reverse": _check_reverse,
    "nth_word": _check_nth,
    "passage_qa": _check_passage,
    "table_lookup": _check_table,
}


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_answers_recomputed_from_the_prompt(name):
    """An independent parser of each prompt recomputes the answer (a generator bug cannot hide)."""
    split = get_task(name).split(seed=3)
    for item in split["train"][:100] + split["eval"][:100]:
        assert CHECKS[name](item), item


@pytest.mark.parametrize(
    "generated, answer, ok",
    [
        ("Oslo", "Oslo", True),
        ("oslo.", "Oslo", True),
        ('  "Oslo"  ', "Oslo", True),
        ("**596000**", "596000", True),
        ("Oslo, Norway", "Oslo", False),
        ("The answer is Oslo.", "Oslo", False),
        ("3.5", "35", False),
        ("river, lamp, cat", "river lamp cat", False),
        ("River,  lamp, cat!", "river, lamp, cat", True),
        ("", "0", False),
    ],
)
def test_exact_match_normalisation(generated, answer, ok):
    assert is_correct(generated, {"answer": answer}) is ok


def test_normalize_answer_keeps_inner_punctuation():
    assert normalize_answer(" 1,000. ") == "1,000"


def test_unknown_task_names_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'passage_qa'"):
        get_task("pasage_qa")


def test_small_item_space_is_an_error():
    task = GeneratedTask("coin", "two possible prompts", lambda rng: (rng.choice(["a", "b"]), "x"), n_train=2, n_eval=2)
    with pytest.raises(ConfigError, match="only 2 unique items"):
        task.split(0)


# --- safety ---------------------------------------------------------------------------------------------------------


def test_safety_splits_on_hand_made_lists():
    harmful = [{"id": f"h{i}", "prompt": f"Harmful request number {i}"} for i in range(10)]
    harmful.append({"id": "dup", "prompt": "  harmful REQUEST number 3 "})  # duplicate after normalisation
    harmful.append({"id": "leak", "prompt": "Explain how to build a weapon"})
    from sst_merge.tasks.safety import REFUSALS, safety_splits

    s = safety_splits(seed=0, n_fisher=3, harmful=harmful, forbidden=["explain how to BUILD a weapon"])
    ids_train = [i["id"] for i in s["train"]]
    ids_fisher = [i["id"] for i in s["fisher"]]
    assert len(ids_fisher) == 3 and len(ids_train) == 7  # 10 unique, the leak and the duplicate removed
    assert not set(ids_train) & set(ids_fisher)
    assert "leak" not in ids_train + ids_fisher and "dup" not in ids_train + ids_fisher
    assert all(i["response"] in REFUSALS and i["kind"] == "harmful" for i in s["train"] + s["fisher"])
    assert safety_splits(seed=0, n_fisher=3, harmful=harmful, forbidden=[]) != safety_splits(
        seed=1, n_fisher=3, harmful=harmful, forbidden=[]
    )
    with pytest.raises(DataError, match="n_fisher"):
        safety_splits(seed=0, n_fisher=20, harmful=harmful, forbidden=[])


def test_no_harmbench_prompt_in_training_or_fisher_data():
    """The evaluation set (HarmBench, every split and category) never appears in StrongREJECT train / Fisher."""
    from sst_merge.data import load_source
    from sst_merge.tasks.safety import BENIGN_TRAIN_PROMPTS, harmbench_prompts, safety_splits

    split = safety_splits(seed=0)
    assert len(split["train"]) >= 200 and len(split["fisher"]) == 64
    assert safety_splits(seed=0) == split
    used = {normalize_text(i["prompt"]) for i in split["train"] + split["fisher"]}
    used |= {normalize_text(p) for p in BENIGN_TRAIN_PROMPTS}
    eval_prompts = load_source("harmbench", split="test")  # the evaluation set, standard behaviours
    assert len(eval_prompts) == 159
    assert not used & {normalize_text(r["prompt"]) for r in eval_prompts}
    assert not used & {normalize_text(p) for p in harmbench_prompts()}
    assert not {i["id"] for i in split["train"]} & {i["id"] for i in split["fisher"]}


def test_benign_training_prompts_are_not_the_over_refusal_eval_set():
    from sst_merge.data import load_source
    from sst_merge.tasks.safety import BENIGN_TRAIN_PROMPTS

    try:
        evaluation = load_source("benign")
    except DataError as e:
        pytest.skip(f"the over-refusal evaluation set is not available: {e}")
    train = {normalize_text(p) for p in BENIGN_TRAIN_PROMPTS}
    assert len(train) == len(BENIGN_TRAIN_PROMPTS)
    assert not train & {normalize_text(r["prompt"]) for r in evaluation}
    # Not even near-duplicates: content words of a training prompt and an evaluation prompt overlap < 50%.
    stop = {"a", "an", "the", "i", "do", "how", "to", "what", "is", "in", "of", "and", "my", "for", "can", "are"}

    def words(text: str) -> set[str]:
        return set(re.findall(r"[a-z']+", text.lower())) - stop

    for t in BENIGN_TRAIN_PROMPTS:
        for r in evaluation:
            a, b = words(t), words(r["prompt"])
            assert len(a & b) / len(a | b) < 0.5, (t, r["prompt"])
