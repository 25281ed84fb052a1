"""`sst-merge demo` on the tiny model: a log line per stage (silent under -q) and which adapters it used."""

from __future__ import annotations

import json
import logging

import pytest

from sst_merge.cli import main
from sst_merge.testing import random_lora, tiny_model


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def demo_args(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    base = tiny_model()
    lora = {n: random_lora(base, str(tmp_path / n), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
            for i, n in enumerate(["toy_a", "safety"])}  # fmt: skip
    harmful = _jsonl(tmp_path / "h.jsonl", [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(3)])
    benign = _jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(3)])
    task = _jsonl(tmp_path / "t.jsonl", [{"id": f"t{i}", "prompt": f"t {i}?", "answer": str(i)} for i in range(3)])
    pairs = [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)]
    sets = {
        "model": str(tiny_model_dir), "utility_tasks": '["toy_a"]', "adapters.safety": lora["safety"],
        "adapters.utility.toy_a": lora["toy_a"], "eval.harmful_source": harmful, "eval.benign_source": benign,
        "eval.task_data.toy_a": task, "eval.refusal_limit": "null", "eval.over_refusal_limit": "null",
        "eval.task_limit": "null", "eval.mmlu_limit": "0", "eval.max_new_tokens": "2", "eval.batch_size": "4",
        "sst.fisher": "diagonal", "sst.n_samples": "4", "sst.batch_size": "4", "sst.max_new_tokens": "2",
        "sst.max_length": "64", "sst.safety_data": _jsonl(tmp_path / "fs.jsonl", pairs),
        "sst.utility_data": _jsonl(tmp_path / "fu.jsonl", pairs), "bootstrap": "20",
    }  # fmt: skip
    return ["demo", "-o", str(tmp_path / "run"), *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]


def test_demo_logs_each_stage_and_says_which_adapters(demo_args, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="sst_merge"):
        assert main(demo_args) == 0
    text = caplog.text
    for stage in ("model files", "adapters", "model 1: load + ΔW", "model 1: evaluation", "model 4: evaluation"):
        assert f"demo: {stage} done in " in text
    assert "adapters: 0 shipped with sst-merge, 2 given, 0 trained" in text
    assert "demo finished in" in capsys.readouterr().out
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sst_merge"):  # warm: every evaluation cached, no model stage
        assert main(demo_args) == 0
    assert "demo: model 1" not in caplog.text and "demo: report done" in caplog.text


def test_demo_quiet_prints_no_stage_lines(demo_args, capfd, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # -q sets it; restored after the test
    assert main(["-q", *demo_args]) == 0
    err = capfd.readouterr().err
    assert "demo:" not in err


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_flags_before_or_after_the_sub_command(where):
    """``-q`` / ``-v`` parse the same on either side of the sub-command (``sst-merge demo -q`` once exited 2)."""
    from sst_merge.cli import build_parser

    argv = ["-q", "-v", "list"] if where == "before" else ["list", "-q", "-v"]
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose, args.command) == (True, 1, "list")
    plain = build_parser().parse_args(["list"])
    assert (plain.quiet, plain.verbose) == (False, 0)  # an absent flag on the sub-command keeps the default
    mixed = build_parser().parse_args(["-q", "list"])
    assert mixed.quiet is True  # the sub-command's absent -q does not reset the top-level one
