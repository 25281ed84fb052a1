"""Bad state, not bad arguments: damaged caches, moved directories, umask, kill -9, two runs on one cache.

Each test is a row of the README's fault-injection table: it breaks something on the tiny in-process model (a
truncated file, a process killed at a chosen write, a second process on the same cache) and checks what the tool
did and that nothing was lost. Processes are killed with ``SST_MERGE_KILL_AT`` (see :mod:`sst_merge.io`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from sst_merge import cache
from sst_merge import io as sst_io
from sst_merge.cli import main
from sst_merge.experiments import resolve_config, run_experiment
from sst_merge.testing import random_lora, tiny_model

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the interruption tests fork processes (POSIX)")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def exp(tmp_path_factory, tiny_model_dir):
    """Adapters, data files and an exp1 config (SST with a diagonal Fisher) on the tiny model."""
    d = tmp_path_factory.mktemp("faults")
    base = tiny_model()
    adapters = {
        name: random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
        for i, name in enumerate(["toy_a", "safety"])
    }
    data = d / "data"
    data.mkdir()
    harmful = _jsonl(data / "harmful.jsonl", [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(4)])
    benign = _jsonl(data / "benign.jsonl", [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(4)])
    task = _jsonl(data / "toy_a.jsonl", [{"id": f"t{i}", "prompt": f"t {i}?", "answer": str(i)} for i in range(4)])
    fs = _jsonl(data / "fs.jsonl", [{"prompt": f"bad {i}", "response": "I cannot help with that."} for i in range(4)])
    fu = _jsonl(data / "fu.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)])
    cfg = {
        "model": str(tiny_model_dir),
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": adapters["safety"], "utility": {"toy_a": adapters["toy_a"]}},
        "eval": {
            "harmful_source": harmful,
            "benign_source": benign,
            "task_data": {"toy_a": task},
            "refusal_limit": None,
            "over_refusal_limit": None,
            "task_limit": None,
            "mmlu_limit": 0,
            "max_new_tokens": 3,
            "batch_size": 4,
        },
        "sst": {
            "fisher": "diagonal",
            "n_samples": 4,
            "batch_size": 4,
            "max_new_tokens": 3,
            "max_length": 64,
            "safety_data": fs,
            "utility_data": fu,
        },
        "sweep": {"alphas": [1.0], "methods": ["sst"]},
        "bootstrap": 20,
    }
    return d, cfg


def _metrics(doc: dict) -> dict:
    return {m: {k: (v["value"], v["n"]) for k, v in e["metrics"].items()} for m, e in doc["models"].items()}


@pytest.fixture(scope="module")
def reference(exp, tmp_path_factory):
    """The uninterrupted run: its results and its cache directory."""
    d, cfg = exp
    out = tmp_path_factory.mktemp("reference") / "run"
    doc = run_experiment(resolve_config("minimal", cfg), out, show_progress=False)
    return doc, out / "cache"


# ---- damaged entries are moved aside and recomputed -------------------------------------------------------------


def _evals(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("eval-*.json"))


@pytest.mark.parametrize("damage", ["truncate", "records", "wrong-key"])
def test_damaged_evaluation_is_moved_aside_and_recomputed(exp, reference, tmp_path, caplog, damage):
    d, cfg = exp
    ref_doc, ref_cache = reference
    run_cache = tmp_path / "cache"
    shutil.copytree(ref_cache, run_cache)
    victim = _evals(run_cache)[0]
    key = victim.stem.removeprefix("eval-")
    if damage == "truncate":  # what `head -c 300` (a full disk, a killed copy) leaves
        victim.write_bytes(victim.read_bytes()[:300])
    elif damage == "records":  # the evaluation is whole, its per-item records are not
        rec = run_cache / f"records-{key}.jsonl"
        rec.write_bytes(rec.read_bytes()[:-40])
    else:  # a whole evaluation under another evaluation's name
        victim.write_text(_evals(run_cache)[1].read_text())
    with caplog.at_level(logging.WARNING, logger="sst_merge"):
        doc = run_experiment(resolve_config("minimal", {**cfg, "cache_dir": str(run_cache)}), tmp_path / "run",
                             show_progress=False)  # fmt: skip
    assert _metrics(doc) == _metrics(ref_doc)
    assert doc["cache"] == {"hits": len(_evals(ref_cache)) - 1, "misses": 1}  # only the damaged one was redone
    lines = [r.getMessage() for r in caplog.records if "damaged cache entry" in r.getMessage()]
    assert lines and str(victim) in lines[0] and "\n" not in lines[0]
    aside = list(run_cache.glob(f"eval-{key}.json.damaged-*"))
    assert len(aside) == 1  # kept, not deleted
    if damage == "records":
        assert list(run_cache.glob(f"records-{key}.jsonl.damaged-*"))
    assert cache.verify(run_cache) == []  # what was recomputed is whole


def test_damaged_fisher_statistics_are_recomputed(exp, tmp_path, caplog):
    from sst_merge.fisher import cache as fcache

    d, cfg = exp
    stats = {"m": {"diag": torch.arange(6.0).reshape(2, 3)}}
    path = tmp_path / "fisher-diagonal-abc.safetensors"
    fcache.save_stats(path, stats, {"n": "4", "key": "abc123"})
    got, meta = fcache.load_stats(path)
    assert torch.equal(got["m"]["diag"], stats["m"]["diag"]) and meta["cache_version"] == str(fcache.CACHE_VERSION)
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    with caplog.at_level(logging.WARNING, logger="sst_merge"):
        assert fcache.load_stats(path) is None
    assert not path.exists() and len(list(tmp_path.glob("*.damaged-*"))) == 1
    assert sum("damaged cache entry" in r.getMessage() for r in caplog.records) == 1
    # NaN statistics parse but are not trusted
    fcache.save_stats(path, {"m": {"diag": torch.tensor([1.0, float("nan")])}}, {"key": "abc"})
    assert fcache.load_stats(path) is None


def test_damaged_adapter_is_retrained(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from sst_merge.train.adapter import train_adapter

    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "c"))
    first = train_adapter(str(tiny_model_dir), "passage_qa", steps=1, batch_size=2, progress=False)
    weights = (first / "adapter_model.safetensors").read_bytes()
    (first / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with caplog.at_level(logging.WARNING, logger="sst_merge"):
        again = train_adapter(str(tiny_model_dir), "passage_qa", steps=1, batch_size=2, progress=False)
    assert again == first and (again / "adapter_model.safetensors").read_bytes() == weights  # same seed, same bytes
    assert len(list(first.parent.glob(f"{first.name}.damaged-*"))) == 1
    assert any(str(first) in r.getMessage() for r in caplog.records)


def test_damaged_benign_answers_are_regenerated(tmp_path, monkeypatch, tiny_tok):
    from sst_merge.testing import ReplyLM
    from sst_merge.train.answers import benign_items

    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path))
    model = ReplyLM(tiny_tok, "Sure.")
    prompts = ["one?", "two?"]
    first = benign_items(model, tiny_tok, cache_key="m", max_new_tokens=4, prompts=prompts)
    (path,) = (tmp_path / "benign-answers").glob("*.json")
    path.write_text(json.dumps(first[:1]))  # one answer lost: parses, but not one per prompt
    assert benign_items(model, tiny_tok, cache_key="m", max_new_tokens=4, prompts=prompts) == first
    assert json.loads(path.read_text()) == first and len(list(path.parent.glob("*.damaged-*"))) == 1


def test_damaged_converted_model_is_moved_aside(tmp_path, tiny_model_dir):
    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    assert cache.read_checked(model, cache.check_model) == model
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    assert cache.read_checked(model, cache.check_model) is None  # ensure_cached then converts again
    assert not model.exists() and len(list(model.parent.glob("tiny.damaged-*"))) == 1


def test_fisher_data_files_of_older_versions_are_verified_and_prunable(tmp_path):
    """Older versions copied the embedded Fisher data into ``CACHE/fisher-data/``; runs now name the seeded sources
    (same key values), so such a file is recognised (verify: not unknown) and listed by prune."""
    old = tmp_path / "fisher-data" / "safety-seed0.jsonl"
    old.parent.mkdir()
    old.write_text('{"prompt": "p", "response": "r"}\n')
    (entry,) = cache.scan(tmp_path)
    assert entry.kind.name == "fisher-data" and cache.read_checked(old, cache.check_fisher_data) is not None
    assert [(e.path, why) for e, why in cache.prunable(tmp_path, {})] == [
        (old, "Fisher data copied by an older version; runs now read the named source")
    ]


# ---- sst-merge cache verify / info / prune ----------------------------------------------------------------------


def test_cache_verify_fix_info_prune_cli(reference, tmp_path, capsys):
    _, ref_cache = reference
    c = tmp_path / "cache"
    shutil.copytree(ref_cache, c)
    assert main(["cache", "verify", str(c)]) == 0
    victim = _evals(c)[0]
    victim.write_bytes(victim.read_bytes()[:50])
    fisher = sorted(c.rglob("fisher-*.safetensors"))[0]
    fisher.write_bytes(fisher.read_bytes()[:-4])
    capsys.readouterr()
    assert main(["cache", "verify", str(c)]) == 1  # found, not touched
    out = capsys.readouterr().out
    assert f"damaged: {victim} (" in out and f"damaged: {fisher} (" in out and "2 damaged entries" in out
    assert victim.exists() and fisher.exists()
    assert main(["cache", "verify", "--fix", str(c)]) == 0
    assert not victim.exists() and not fisher.exists() and cache.verify(c) == []
    capsys.readouterr()

    assert main(["cache", "info", str(c)]) == 0
    out = capsys.readouterr().out
    n_eval = len(_evals(c))
    assert any(line.split()[:2] == ["evaluation", str(n_eval)] for line in out.splitlines())
    rows = cache.info(c)
    assert rows["damaged"][0] == 2 and rows["fisher"][0] == len(list(c.rglob("fisher-*.safetensors")))
    assert rows["evaluation"][1] == sum(p.stat().st_size for p in _evals(c))

    # prune: lists by default, deletes only with --yes; keeps what a current key can reach
    leftover = c / ".eval-x.json.abc.tmp"
    leftover.write_text("{")
    os.utime(leftover, (1, 1))  # a killed writer's temporary, long ago
    fresh = c / ".eval-y.json.abc.tmp"
    fresh.write_text("{")  # may belong to a run in progress
    orphan = c / "records-0123456789abcdef.jsonl"
    orphan.write_text("{}\n")
    os.utime(orphan, (1, 1))
    old_eval = c / "eval-00000000000000ff.json"
    doc = json.loads(_evals(c)[0].read_text())
    old_eval.write_text(json.dumps({**doc, "v": 1, "key": "00000000000000ff"}))
    capsys.readouterr()
    assert main(["cache", "prune", str(c)]) == 0
    out = capsys.readouterr().out
    for p in (leftover, orphan, old_eval):
        assert f"would delete: {p} " in out and p.exists()
    assert ".damaged-" in out and str(fresh) not in out and "pass --yes to delete" in out
    assert main(["cache", "prune", "--yes", str(c)]) == 0
    assert not any(p.exists() for p in (leftover, orphan, old_eval)) and fresh.exists()
    assert "damaged" not in cache.info(c) and cache.verify(c) == []
    assert len(_evals(c)) == n_eval  # every current evaluation kept


def test_cache_command_refuses_a_missing_directory(tmp_path, capsys):
    assert main(["cache", "info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope does not exist" in err


# ---- keys from content, umask --------------------------------------------------------------------------------------


def test_moved_cache_directory_is_a_full_hit(exp, reference, tmp_path):
    """Copy the cache and its data files elsewhere, point the config there: every evaluation is read back."""
    d, cfg = exp
    ref_doc, ref_cache = reference
    moved = tmp_path / "elsewhere"
    shutil.copytree(ref_cache, moved / "cache")
    shutil.copytree(d / "data", moved / "data")
    relocated = json.loads(json.dumps(cfg).replace(str(d / "data"), str(moved / "data")))
    assert relocated != cfg
    calls = []
    doc = run_experiment(resolve_config("minimal", {**relocated, "cache_dir": str(moved / "cache")}),
                         tmp_path / "run", show_progress=False, evaluate=lambda *a: calls.append(a))  # fmt: skip
    assert calls == [] and doc["cache"] == {"hits": len(ref_doc["models"]), "misses": 0}
    assert _metrics(doc) == _metrics(ref_doc)
    # an edited data file is another key: only the models it feeds (the SST merge) are evaluated again
    fs = moved / "data" / "fs.jsonl"
    fs.write_text(fs.read_text().replace("bad 0", "bad zero"))
    doc = run_experiment(resolve_config("minimal", {**relocated, "cache_dir": str(moved / "cache")}),
                         tmp_path / "run2", show_progress=False)  # fmt: skip
    assert doc["cache"] == {"hits": len(ref_doc["models"]) - 1, "misses": 1}


def test_keys_without_data_files_are_unchanged(exp, tmp_path):
    """Content keys change only keys that name a file: other cached evaluations stay valid (no version bump)."""
    from sst_merge.experiments.provenance import stable_hash
    from sst_merge.experiments.runner import EVAL_CACHE_VERSION, ModelSpec, Runner, judge_version

    d, cfg = exp
    plain = {**cfg, "eval": {**cfg["eval"], "harmful_source": "harmbench", "benign_source": "xstest"}}
    plain["eval"].pop("task_data")
    runner = Runner(resolve_config("minimal", plain), tmp_path, load=lambda: None)
    spec = ModelSpec("base", (), None, (("seed", 0),))
    # the key as it was built before data files were hashed (runner.spec_key, EVAL_CACHE_VERSION 2)
    # a judge past version 1 enters the key, as it did before content keys
    versioned = {"judge_version": v} if (v := judge_version(runner.cfg.eval.judge)) != 1 else {}
    before = stable_hash({**versioned, "v": EVAL_CACHE_VERSION, "base": runner.base_fingerprint, "adapters": [], "method": None,
                          "params": {"seed": 0}, "eval": runner.cfg.eval.model_dump(exclude={"split", "phrasing"}), "tasks": runner.tasks,
                          "seed": runner.cfg.seed})  # fmt: skip
    assert runner.spec_key(spec) == before
    # where a method keeps its intermediate results is not part of what the model is
    elsewhere = ModelSpec("base", (), None, (("cache_dir", str(tmp_path)), ("seed", 0)))
    assert runner.spec_key(elsewhere) == before
    with_file = ModelSpec("x", (), None, (("safety_data", cfg["sst"]["safety_data"]),))
    expected = {"sha256": cache.content_digest(cfg["sst"]["safety_data"])}
    assert cache.content_keyed(dict(with_file.params)) == {"safety_data": expected}


def test_written_files_follow_the_umask(tmp_path):
    from sst_merge.fisher.cache import save_stats
    from sst_merge.io import atomic_output_dir, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        save_stats(tmp_path / "f.safetensors", {"m": {"d": torch.ones(2)}}, {})
        with atomic_output_dir(tmp_path / "dir") as t:
            (t / "inner.txt").write_text("x")
        os.umask(0o077)
        atomic_write_json(tmp_path / "private.json", {"x": 1})
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert (mode("a.json"), mode("f.safetensors"), mode("dir")) == (0o644, 0o644, 0o755)
    assert mode("private.json") == 0o600


# ---- kill -9 at chosen points, then rerun ------------------------------------------------------------------------


def _start(args: list[str], tmp_path: Path, kill_at: str | None = None) -> int:
    """Fork a process that runs ``sst-merge -q ARGS`` (nothing to import again: seconds, not minutes); its pid."""
    pid = os.fork()
    if pid == 0:  # the child: the CLI, then exit without running the parent's test machinery
        code = 1
        try:
            os.environ["SST_MERGE_CACHE"] = str(tmp_path / "project-cache")
            os.environ.pop("SST_MERGE_KILL_AT", None)
            if kill_at:
                os.environ["SST_MERGE_KILL_AT"] = kill_at
            sst_io._fault_counts.clear()
            code = main(["-q", *args])
        finally:
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    """Exit status of a forked process: its code, or minus the signal that ended it."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _cli(args: list[str], tmp_path: Path, kill_at: str | None = None) -> int:
    return _wait(_start(args, tmp_path, kill_at))


KILLED = -signal.SIGKILL


@needs_fork
def test_run_killed_at_several_points_resumes_to_the_same_result(exp, reference, tmp_path):
    d, cfg = exp
    ref_doc, ref_cache = reference
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    args = ["run", "--config", str(cfg_path), "-o", str(out)]
    # Writes of one process: config.resolved.json, then per model its records and its evaluation; the SST merge
    # writes F_s and F_u first. Killed (1) after the base model's records, before its evaluation; (2) with the
    # base evaluation complete under its temporary name, before the rename; (3) after the base, utility and safety
    # evaluations and the merge's F_s, before F_u.
    for point, fisher_files in (("after-write:2", 0), ("before-rename:3", 0), ("after-write:8", 1)):
        assert _cli(args, tmp_path, point) == KILLED
        assert not (out / "results.json").exists()
        assert cache.verify(out / "cache") == []  # nothing partial is visible under a final name
        assert len(list((out / "cache").rglob("fisher-*.safetensors"))) == fisher_files
    finished = len(_evals(out / "cache"))
    assert finished == 3 == len(ref_doc["models"]) - 1
    assert _cli(args, tmp_path) == 0
    doc = json.loads((out / "results.json").read_text())
    assert _metrics(doc) == _metrics(ref_doc)
    assert doc["cache"] == {"hits": finished, "misses": len(ref_doc["models"]) - finished}


@needs_fork
def test_merge_killed_between_fisher_statistics_resumes_to_the_same_model(exp, tmp_path):
    d, cfg = exp
    config = {
        "base_model": cfg["model"],
        "method": "sst",
        "adapters": [
            {"path": cfg["adapters"]["utility"]["toy_a"], "role": "utility", "weight": 1.0},
            {"path": cfg["adapters"]["safety"], "role": "safety"},
        ],
        "params": {
            "alpha": 1.0,
            "fisher": "diagonal",
            "k": 2,
            "n_samples": 4,
            "batch_size": 4,
            "max_new_tokens": 3,
            "max_length": 64,
            "cache_dir": str(tmp_path / "fisher"),
            "safety_data": cfg["sst"]["safety_data"],
            "utility_data": cfg["sst"]["utility_data"],
        },
        "output": {"format": "full"},
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    ref = ["merge", str(path), "-o", str(tmp_path / "ref"), "--set", f"params.cache_dir={tmp_path / 'f0'}"]
    assert _cli(ref, tmp_path) == 0
    args = ["merge", str(path), "-o", str(tmp_path / "out")]
    assert _cli(args, tmp_path, "after-write:1") == KILLED
    assert len(list((tmp_path / "fisher").glob("fisher-*"))) == 1  # F_s written, F_u not
    assert not (tmp_path / "out").exists()
    assert _cli(args, tmp_path, "before-rename:2") == KILLED
    assert not (tmp_path / "out").exists()
    assert _cli(args, tmp_path) == 0
    for f in sorted(p.name for p in (tmp_path / "ref").iterdir() if p.suffix == ".safetensors"):
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()
    assert cache.verify(tmp_path / "fisher") == []


@needs_fork
def test_train_killed_before_its_adapter_is_in_place_retrains_the_same_adapter(tmp_path, tiny_model_dir):
    args = ["train", "--model", str(tiny_model_dir), "--task", "passage_qa", "--steps", "2", "--batch-size", "2"]
    assert _cli([*args, "-o", str(tmp_path / "ref")], tmp_path / "elsewhere") == 0
    root = tmp_path / "project-cache"

    def adapters() -> list[Path]:  # adapters under a final name (a temporary name starts with a dot)
        return [p.parent for p in root.rglob("adapter_config.json") if not p.parent.name.startswith(".")]

    # the 2nd write is inside the temporary adapter directory; the 4th rename puts the directory in place
    for point in ("after-write:2", "before-rename:4"):
        assert _cli(args, tmp_path, point) == KILLED
        assert adapters() == []  # nothing half-written under the name a later train would trust
    assert _cli(args, tmp_path) == 0
    (cached,) = adapters()
    name = "adapter_model.safetensors"
    assert (cached / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()


# ---- two runs on one cache at once -------------------------------------------------------------------------------


@needs_fork
def test_two_runs_sharing_a_cache_compute_each_evaluation_once(exp, reference, tmp_path):
    d, cfg = exp
    ref_doc, _ = reference
    shared = tmp_path / "shared-cache"
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(yaml.safe_dump({**cfg, "cache_dir": str(shared)}))
    pids = [_start(["run", "--config", str(cfg_path), "-o", str(tmp_path / f"run{i}")], tmp_path) for i in (1, 2)]
    assert [_wait(pid) for pid in pids] == [0, 0]
    docs = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in (1, 2)]
    assert _metrics(docs[0]) == _metrics(docs[1]) == _metrics(ref_doc)
    n = len(ref_doc["models"])
    # every evaluation was computed by exactly one of the two processes; the other read it
    assert docs[0]["cache"]["misses"] + docs[1]["cache"]["misses"] == n
    assert docs[0]["cache"]["hits"] + docs[1]["cache"]["hits"] == n
    assert cache.verify(shared) == [] and not list(shared.glob(".*.tmp"))


@needs_fork
def test_two_identical_trains_on_one_cache_train_once(tmp_path, tiny_model_dir, monkeypatch):
    from sst_merge.train import adapter as train_mod

    trained = tmp_path / "trained.log"
    real = train_mod._train_into

    def counting(*args, **kwargs):  # the forked processes inherit it; each training appends a line
        with open(trained, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_train_into", counting)
    args = ["train", "--model", str(tiny_model_dir), "--task", "passage_qa", "--steps", "2", "--batch-size", "2"]
    pids = [_start(args, tmp_path) for _ in range(2)]
    assert [_wait(pid) for pid in pids] == [0, 0]
    assert len(trained.read_text().splitlines()) == 1  # the other process waited and reused the adapter
    adapters = [p for p in (tmp_path / "project-cache").rglob("adapter_config.json") if "/." not in str(p)]
    assert len(adapters) == 1 and cache.verify(tmp_path / "project-cache") == []
