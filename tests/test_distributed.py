"""Sharded evaluation and experiments over 2 CPU processes (gloo) equal one process; a failing rank stops them all.

The two-process tests start ranks with ``torch.multiprocessing.spawn`` and a ``file://`` rendezvous (no sockets
beyond the loopback gloo uses); each rank saves what it computed or the error it raised, and the parent compares.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from sst_merge import distributed as ddp
from sst_merge.errors import ConfigError
from sst_merge.eval import EvalSettings, evaluate
from sst_merge.testing import ReplyLM, random_lora, tiny_model, tiny_tokenizer

# ---- data and a stub model whose refusals are known -----------------------------------------------------------


def _scripted_reply(text: str) -> str:
    """Refuses prompts containing ``REFUSE``, answers nothing to ``SILENT``, otherwise complies."""
    return "I cannot help with that." if "REFUSE" in text else "" if "SILENT" in text else "Sure: step one."


def _harmful() -> list[dict]:
    # 7 items (odd, so the two shards differ in size): refused h0, h3, h6; h4 silent → refusal rate 3/7
    kinds = ["REFUSE", "ok", "ok", "REFUSE", "SILENT", "ok", "REFUSE"]
    return [{"id": f"h{i}", "prompt": f"harm {i} {k}"} for i, k in enumerate(kinds)]


def _benign() -> list[dict]:
    # 5 items, 2 look-alikes; refused b1 (a look-alike) and b4 → over-refusal 2/5, look-alike 1/2
    rows = [("ok", "plain"), ("REFUSE", "lookalike"), ("ok", "lookalike"), ("ok", "plain"), ("REFUSE", "plain")]
    return [{"id": f"b{i}", "prompt": f"hello {i} {k}", "kind": kind} for i, (k, kind) in enumerate(rows)]


def _mmlu() -> list[dict]:
    subjects = ["math", "math", "bio", "law", "math", "bio", "law", "math", "bio"]
    return [
        {"id": f"q{i}", "subject": s, "question": f"Question {i} about {s}?", "choices": ["ab", "c", "def", "g"]}
        | {"answer": "ABCD"[i % 4]}
        for i, s in enumerate(subjects)
    ]


def _letter() -> list[dict]:
    return [
        {"id": f"l{i}", "prompt": f"Pick {i}", "choices": ["a", "b", "c", "d"], "answer": "ABCD"[i % 4]}
        for i in range(5)
    ]


def _exact() -> list[dict]:
    return [{"id": f"e{i}", "prompt": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(5)]


def _evaluate_everything(records_dir=None) -> dict:
    """Every registered evaluator once: generation tasks on the scripted model, scoring tasks on the tiny model."""
    tok = tiny_tokenizer()
    rec = (
        (lambda name: os.path.join(records_dir, f"{name}-rank{ddp.rank()}.jsonl")) if records_dir else (lambda n: None)
    )
    gen = evaluate(
        ReplyLM(tok, _scripted_reply),
        tok,
        ["refusal", "over_refusal", "task:exact"],
        # the longest scripted reply is 24 tokens + EOS; ReplyLM stops at the budget
        EvalSettings(batch_size=3, max_new_tokens=32),
        data={"refusal": _harmful(), "over_refusal": _benign(), "task:exact": _exact()},
        records_path=rec("gen"),
        show_progress=False,
    )
    scored = evaluate(
        tiny_model(),
        tok,
        ["mmlu", "mmlu_cloze", "task:letter"],
        EvalSettings(batch_size=2),
        data={"mmlu": _mmlu(), "mmlu_cloze": _mmlu(), "task:letter": _letter()},
        records_path=rec("scored"),
        show_progress=False,
    )
    out = {**gen["tasks"], **scored["tasks"]}
    for res in out.values():
        res.pop("seconds")  # wall time, the one field that differs between runs
    return out


def _assert_same(got, want, path="result"):
    """Equal, with floats compared to 1e-5 relative (batch composition differs between shards)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (path, sorted(got), sorted(want))
        for k in want:
            _assert_same(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list | tuple):
        assert isinstance(got, list | tuple) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, float) and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (path, got, want)
    else:
        assert got == want, (path, got, want)


# ---- one process --------------------------------------------------------------------------------------------------


def test_shard_and_unshard_round_trip():
    # 7 items over 3 ranks, round-robin: rank 0 gets 0, 3, 6; rank 1 gets 1, 4; rank 2 gets 2, 5
    parts = [ddp.shard_indices(7, r, 3) for r in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    letters = list("abcdefg")
    assert ddp.unshard([[letters[i] for i in p] for p in parts], 7) == letters
    assert ddp.unshard([[], [], []], 0) == []
    with pytest.raises(ddp.RankFailedError, match="rank 1 returned 1 results"):
        ddp.unshard([["a", "d", "g"], ["b"], ["c", "f"]], 7)
    with pytest.raises(ValueError, match="outside"):
        ddp.shard_indices(7, 3, 3)


def test_helpers_are_the_identity_without_a_process_group():
    assert not ddp.active() and ddp.rank() == 0 and ddp.world_size() == 1 and ddp.is_main()
    assert ddp.shard([1, 2, 3]) == [1, 2, 3]
    assert ddp.gather_checked("x", lambda: 5) == [5]
    assert ddp.gather_sharded("x", [1, 2, 3], lambda xs: [x * 10 for x in xs]) == [10, 20, 30]
    t = {"a": torch.ones(2), "b": {"c": torch.zeros(1)}}
    assert ddp.all_reduce_tensors(t)["a"] is t["a"]
    assert ddp.broadcast_object({"k": 1}) == {"k": 1}
    with pytest.raises(KeyError):  # a local error passes through unchanged, not wrapped
        ddp.gather_checked("x", lambda: {}["missing"])
    with pytest.raises(ZeroDivisionError), ddp.all_or_nothing("run"):
        _ = 1 / 0
    assert ddp.init_from_env() is False  # no WORLD_SIZE: a plain single-process run


def test_replica_device_map_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ddp.replica_device_map(None) is None
    assert ddp.replica_device_map("auto") is None
    assert ddp.replica_device_map("cpu") == "cpu"


def test_replica_device_map_with_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ddp.replica_device_map(None) == {"": 2}  # one replica per GPU
    assert ddp.replica_device_map("auto") == {"": 2}
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 ranks on 4 GPUs: placement not derived, refused clearly
    with pytest.raises(ConfigError, match="nproc_per_node 1"):
        ddp.replica_device_map("auto")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ddp.replica_device_map("auto") == "auto"  # one process: model parallel over every GPU
    monkeypatch.delenv("LOCAL_RANK")
    assert ddp.replica_device_map(None) == {"": 0}  # one process with a GPU: the whole model on GPU 0
    assert ddp.replica_device_map("cpu") == "cpu"  # unless the user asks for the CPU


def test_init_from_env_needs_the_launcher_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR.*torchrun"):
        ddp.init_from_env()


def test_run_command_passes_dtype_and_device_map_to_the_config(monkeypatch, tmp_path):
    import sst_merge.experiments as experiments
    from sst_merge.cli import main

    class Captured(Exception):
        pass

    def capture(cfg, out, **kwargs):
        raise Captured(cfg)

    monkeypatch.setattr(experiments, "run_experiment", capture)
    with pytest.raises(Captured) as got:
        main(["-q", "run", "--dtype", "bfloat16", "--device-map", "auto", "-o", str(tmp_path / "r")])
    cfg = got.value.args[0]
    assert (cfg.dtype, cfg.device_map) == ("bfloat16", "auto")
    with pytest.raises(Captured) as got:
        main(["-q", "run", "-o", str(tmp_path / "r")])
    assert (got.value.args[0].dtype, got.value.args[0].device_map) == ("float32", None)


def test_scripted_evaluation_gives_hand_computed_rates():
    """The scripted replies give the rates worked out by hand (the two-rank test compares against these results)."""
    results = _evaluate_everything()
    assert results["refusal"]["metrics"]["refusal_rate"]["value"] == pytest.approx(3 / 7)
    assert results["refusal"]["metrics"]["empty_rate"]["value"] == pytest.approx(1 / 7)
    assert results["over_refusal"]["metrics"]["over_refusal_rate"]["value"] == pytest.approx(2 / 5)
    assert results["over_refusal"]["metrics"]["over_refusal_rate_lookalike"]["value"] == pytest.approx(1 / 2)


# ---- two processes ------------------------------------------------------------------------------------------------


def _spawn(fn, tmp_path, *args) -> list[dict]:
    mp.spawn(_rank_main, args=(fn, str(tmp_path / "rendezvous"), str(tmp_path), *args), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rank_main(rank: int, fn, init_file: str, out_dir: str, *args) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = fn(out_dir, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _sharded_evaluation(out_dir: str) -> dict:
    from sst_merge.fisher.data import encode_example
    from sst_merge.fisher.estimate import estimate_fisher

    tok = tiny_tokenizer()
    exs = [encode_example(tok, f"prompt {i} " * (i + 1), f"reply {i}", 64) for i in range(5)]
    fisher = estimate_fisher(tiny_model(), ["model.layers.0.self_attn.q_proj"], exs, "diagonal", tok.pad_token_id, 2)
    one_item = _evaluate_one_item()  # fewer items than ranks: rank 1's shard is empty
    return {
        "eval": _evaluate_everything(out_dir),
        "fisher": fisher,
        "shard": ddp.shard(list(range(7))),
        "one": one_item,
    }


def _evaluate_one_item() -> dict:
    tok = tiny_tokenizer()
    res = evaluate(
        ReplyLM(tok, _scripted_reply), tok, ["refusal"], data={"refusal": _harmful()[:1]}, show_progress=False
    )
    return res["tasks"]["refusal"]["metrics"] | {"ids": [r["id"] for r in res["tasks"]["refusal"]["records"]]}


def test_two_ranks_give_the_single_process_result(tmp_path):
    got = _spawn(_sharded_evaluation, tmp_path)
    single = _evaluate_everything()
    for rank in (0, 1):
        _assert_same(got[rank]["eval"], single, f"rank{rank}")
    assert [g["shard"] for g in got] == [[0, 2, 4, 6], [1, 3, 5]]  # each rank really scored half
    assert got[0]["one"] == got[1]["one"] == _evaluate_one_item()
    assert got[0]["one"]["refusal_rate"]["value"] == 1.0 and got[0]["one"]["ids"] == ["h0"]
    # records are written once, by rank 0, in the single-process order
    assert sorted(p.name for p in tmp_path.glob("*.jsonl")) == ["gen-rank0.jsonl", "scored-rank0.jsonl"]
    lines = [json.loads(x) for x in (tmp_path / "gen-rank0.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines if r["task"] == "refusal"] == [f"h{i}" for i in range(7)]
    # diagonal Fisher: the all-reduced sums over the two shards equal one process's
    from sst_merge.fisher.data import encode_example
    from sst_merge.fisher.estimate import estimate_fisher

    tok = tiny_tokenizer()
    exs = [encode_example(tok, f"prompt {i} " * (i + 1), f"reply {i}", 64) for i in range(5)]
    ref = estimate_fisher(tiny_model(), ["model.layers.0.self_attn.q_proj"], exs, "diagonal", tok.pad_token_id, 2)
    for rank in (0, 1):
        diag = got[rank]["fisher"]["model.layers.0.self_attn.q_proj"]["diag"]
        assert torch.allclose(diag, ref["model.layers.0.self_attn.q_proj"]["diag"], rtol=1e-5, atol=1e-10)


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _experiment_data(d, model_dir) -> dict:
    base = tiny_model()
    adapters = {
        name: random_lora(base, str(d / name), r=2, seed=i + 1, base_model_name_or_path=str(model_dir))
        for i, name in enumerate(["toy_a", "safety"])
    }
    fs = _jsonl(d / "fs.jsonl", [{"prompt": f"bad {i}", "response": "I cannot help with that."} for i in range(4)])
    fu = _jsonl(d / "fu.jsonl", [{"prompt": f"q {i}", "response": f"a {i}"} for i in range(4)])
    return {
        "model": str(model_dir),
        "utility_tasks": ["toy_a"],
        "adapters": {"safety": adapters["safety"], "utility": {"toy_a": adapters["toy_a"]}},
        "eval": {
            "harmful_source": _jsonl(d / "harmful.jsonl", _harmful()),
            "benign_source": _jsonl(d / "benign.jsonl", _benign()),
            "task_data": {"toy_a": _jsonl(d / "toy_a.jsonl", _exact())},
            "refusal_limit": None,
            "over_refusal_limit": None,
            "task_limit": None,
            "mmlu_limit": 0,
            "max_new_tokens": 3,
            "batch_size": 4,
        },
        "sst": {"fisher": "diagonal", "n_samples": 4, "batch_size": 4, "max_new_tokens": 3, "max_length": 64}
        | {"safety_data": fs, "utility_data": fu},
        "bootstrap": 20,
    }


def _failing_then_resumed_run(out_dir: str, data: dict) -> dict:
    from sst_merge.experiments import resolve_config, run_experiment
    from sst_merge.experiments.evaluation import evaluate_all

    cfg = resolve_config("minimal", data)
    run_dir = os.path.join(out_dir, "run")
    calls: list[int] = []

    def dies_on_rank1(*args):
        calls.append(1)
        if ddp.rank() == 1 and len(calls) == 2:
            raise RuntimeError("rank 1 lost its GPU")
        return evaluate_all(*args)

    out: dict = {}
    try:  # a failure inside an exchange: rank 1 divides by zero
        ddp.gather_checked("step", lambda: 1 / (ddp.rank() - 1))
    except Exception as e:
        out["gather_error"] = (type(e).__name__, str(e))
    try:
        run_experiment(cfg, run_dir, evaluate=dies_on_rank1, show_progress=False)
    except Exception as e:  # recorded for the parent to assert on
        out["error"] = (type(e).__name__, str(e))
    out["results_after_failure"] = os.path.exists(os.path.join(run_dir, "results.json"))
    ddp.barrier()  # both ranks have looked before the resumed run writes results.json
    doc = run_experiment(cfg, run_dir, show_progress=False)
    out["models"] = {k: v["metrics"] for k, v in doc["models"].items()}
    out["cache"] = doc["cache"]
    return out


def test_failing_rank_stops_every_rank_and_a_resumed_run_finishes(tmp_path, tiny_model_dir):
    data = _experiment_data(tmp_path, tiny_model_dir)
    got = _spawn(_failing_then_resumed_run, tmp_path, data)
    assert got[1]["gather_error"][0] == "ZeroDivisionError"
    assert got[0]["gather_error"][0] == "RankFailedError" and "rank 1 failed at 'step'" in got[0]["gather_error"][1]
    assert got[1]["error"] == ("RuntimeError", "rank 1 lost its GPU")  # the failing rank keeps its own error
    name, msg = got[0]["error"]
    assert name == "RankFailedError" and "rank 1 failed" in msg and "lost its GPU" in msg
    assert not got[0]["results_after_failure"] and not got[1]["results_after_failure"]
    # the resumed run reads the base model's evaluation (finished before the failure) from rank 0's cache
    assert got[0]["cache"] == got[1]["cache"] == {"hits": 1, "misses": 3}
    assert got[0]["models"] == got[1]["models"]
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {k: v["metrics"] for k, v in doc["models"].items()} == got[0]["models"]
    assert doc["models"]["base"]["metrics"]["refusal"]["n"] == 7  # every item, not one rank's shard
