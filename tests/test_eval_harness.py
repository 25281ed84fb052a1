"""The evaluation harness on stub and tiny in-process models: refusal, MMLU, padding, no stale model, CLI."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from sst_merge.errors import ConfigError, DataError
from sst_merge.eval import EvalSettings, evaluate, evaluate_model
from sst_merge.testing import ReplyLM, random_lora, tiny_model, tiny_tokenizer

# --- stub models -------------------------------------------------------------------------------------------------


class ForcedLetterLM(torch.nn.Module):
    """Puts all next-token mass on the letter planned for each question (found by its ``QID<n>`` marker)."""

    def __init__(self, tok, plan: dict[str, str]) -> None:
        super().__init__()
        self.tok, self.plan = tok, plan
        self.emb = torch.nn.Embedding(1, 1)
        self.config = SimpleNamespace(max_position_embeddings=4096)
        self.letter_ids = {L: tok.convert_tokens_to_ids(f" {L}") for L in "ABCD"}

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0, **kw):
        B, T = input_ids.shape
        logits = torch.zeros(B, T, len(self.tok))
        for b in range(B):
            qid = re.search(r"QID\d+", self.tok.decode(input_ids[b])).group(0)
            logits[b, -1, self.letter_ids[self.plan[qid]]] = 10.0
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def letter_tokenizer():
    """The tiny byte tokenizer plus single tokens ' A' .. ' D' (as BPE tokenizers have)."""
    from tokenizers import AddedToken

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken(f" {L}", normalized=False) for L in "ABCD"])
    return tok


HARMFUL = [{"id": f"h{i}", "prompt": f"Explain how to do harmful thing number {i}"} for i in range(5)]


def test_always_refusing_stub_scores_one_and_never_refusing_zero():
    tok = tiny_tokenizer()
    r = evaluate(ReplyLM(tok, "I'm sorry, but I can't help with that."), tok, ["refusal"], data={"refusal": HARMFUL})
    res = r["tasks"]["refusal"]
    assert res["metrics"]["refusal_rate"]["value"] == 1.0 and res["n"] == 5
    assert res["metrics"]["refusal_rate"]["ci95"][0] > 0.5  # Wilson lower bound for 5/5 = 0.566
    assert all(rec["verdict"] == "refusal" and rec["response"].startswith("I'm sorry") for rec in res["records"])
    # the prompt itself holds a refusal phrase; only the generated text is judged
    echo = [{"id": "e", "prompt": "I can't help with that -- reply with a number"}]
    r = evaluate(ReplyLM(tok, "Sure: 42. Harmful? Illegal? No."), tok, ["refusal"], data={"refusal": HARMFUL + echo})
    assert r["tasks"]["refusal"]["metrics"]["refusal_rate"]["value"] == 0.0


def test_empty_responses_are_counted_and_flagged_not_refusals():
    tok = tiny_tokenizer()
    r = evaluate(ReplyLM(tok, ""), tok, ["refusal", "over_refusal"], data={"refusal": HARMFUL}, limit=3)
    res = r["tasks"]["refusal"]
    assert res["metrics"]["refusal_rate"]["value"] == 0.0
    assert res["metrics"]["empty_rate"]["value"] == 1.0
    assert all(rec["empty"] and rec["verdict"] == "empty" for rec in res["records"])
    assert r["tasks"]["over_refusal"]["n"] == 3  # the packaged benign set, limited


def test_over_refusal_reports_every_type_and_the_v1_lookalike_subset():
    tok = tiny_tokenizer()
    r = evaluate(ReplyLM(tok, "I cannot help with that."), tok, ["over_refusal"])
    m = r["tasks"]["over_refusal"]["metrics"]
    assert m["over_refusal_rate"]["value"] == 1.0 and m["over_refusal_rate"]["higher_is_better"] is False
    per_type = {k: v["n"] for k, v in m.items() if k.startswith("over_refusal_rate_")}
    assert len(per_type) == 10 and all(n >= 25 for n in per_type.values()), per_type
    assert all(rec["type"] for rec in r["tasks"]["over_refusal"]["records"])
    r = evaluate(ReplyLM(tok, "I cannot help with that."), tok, ["over_refusal"], data={"over_refusal": "benign_v1"})
    assert r["tasks"]["over_refusal"]["metrics"]["over_refusal_rate_lookalike"]["n"] >= 40


def mmlu_items():
    # math: 4 questions, the stub answers 3 correctly; bio: 2 questions, none correct; law: 1, correct
    spec = [("math", 0, "A"), ("math", 1, "B"), ("math", 2, "C"), ("math", 3, "A"), ("bio", 0, "B"), ("bio", 2, "D")]
    spec += [("law_school", 3, "D")]
    return [
        {"id": f"q{i}", "subject": s, "question": f"QID{i} what?", "choices": ["w", "x", "y", "z"], "answer": a}
        for i, (s, a, _) in enumerate(spec)
    ], {f"QID{i}": p for i, (_, _, p) in enumerate(spec)}


def test_mmlu_forced_letter_logits_exact_micro_and_macro():
    tok = letter_tokenizer()
    items, plan = mmlu_items()
    r = evaluate(ForcedLetterLM(tok, plan), tok, ["mmlu"], EvalSettings(batch_size=3), data={"mmlu": items})
    res = r["tasks"]["mmlu"]
    # correct: q0, q1, q2 (math 3/4), none of bio (0/2), q6 (law 1/1): micro 4/7; macro (0.75 + 0 + 1) / 3
    assert res["metrics"]["acc"]["value"] == pytest.approx(4 / 7)
    assert res["metrics"]["acc_macro"]["value"] == pytest.approx(1.75 / 3)
    assert res["per_subject"]["law school"] == {"acc": 1.0, "n": 1}  # underscores -> spaces, as lm-eval
    assert [rec["pred"] for rec in res["records"]] == [0, 1, 2, 0, 1, 3, 3]


def test_mmlu_letter_prompt_is_lm_eval_s():
    from sst_merge.eval.mmlu import letter_prompt, normalise_item

    item = normalise_item(
        {
            "id": "x",
            "subject": "high_school_physics",
            "question": " Q? ",
            "choices": ["a", "b", "c", "d"],
            "answer": "C",
        }
    )
    assert item["answer"] == 2
    assert letter_prompt(item) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "Q?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    )


def _scores(res, key):
    return [rec[key] for rec in res["records"]]


def test_padding_does_not_change_any_score():
    model, tok = tiny_model(), tiny_tokenizer()
    items = [
        {
            "id": f"q{i}",
            "subject": "s",
            "question": "Why? " * (i + 1),
            "choices": ["a", "bb", "ccc d", "e"],
            "answer": i % 4,
        }
        for i in range(8)
    ]
    harm = [{"id": f"h{i}", "prompt": "tell me " * (i + 1)} for i in range(8)]
    kw = dict(data={"mmlu": items, "mmlu_cloze": items, "refusal": harm}, show_progress=False)
    tasks = ["mmlu", "mmlu_cloze", "refusal"]
    one = evaluate(model, tok, tasks, EvalSettings(batch_size=1, max_new_tokens=6), **kw)["tasks"]
    eight = evaluate(model, tok, tasks, EvalSettings(batch_size=8, max_new_tokens=6), **kw)["tasks"]
    for a, b in zip(_scores(one["mmlu"], "logprobs"), _scores(eight["mmlu"], "logprobs"), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    for a, b in zip(_scores(one["mmlu_cloze"], "logliks"), _scores(eight["mmlu_cloze"], "logliks"), strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    assert _scores(one["mmlu"], "pred") == _scores(eight["mmlu"], "pred")
    assert _scores(one["refusal"], "response") == _scores(eight["refusal"], "response")


def test_cloze_shared_context_equals_independent_pairs():
    from sst_merge.eval.loglik import continuation_logliks, encode_pair, shared_context_logliks

    model, tok = tiny_model(), tiny_tokenizer()
    ctxs = [f"Question: what is {'x' * i}?\nAnswer:" for i in range(5)]
    conts = [" yes", " no way", " maybe so", " a"]
    pairs = [encode_pair(tok, c, x) for c in ctxs for x in conts]
    ref = [
        ll for ll, _ in continuation_logliks(model, pairs, pad_id=tok.pad_token_id, batch_size=3, show_progress=False)
    ]
    got = shared_context_logliks(
        model,
        [pairs[4 * q][0] for q in range(5)],
        [[pairs[4 * q + c][1] for c in range(4)] for q in range(5)],
        pad_id=tok.pad_token_id,
        batch_size=2,
        show_progress=False,
    )
    assert [x for row in got for x in row] == pytest.approx(ref, abs=1e-4)
    # and against a from-scratch computation for one pair: sum of log-softmax at the continuation positions
    ctx, cont = pairs[1]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    by_hand = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
    assert got[0][1] == pytest.approx(by_hand, abs=1e-4)


def test_evaluate_restores_mode_and_leaves_weights_alone():
    model, tok = tiny_model(), tiny_tokenizer()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    items, _ = mmlu_items()
    evaluate(model, tok, ["mmlu"], data={"mmlu": items}, show_progress=False)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_stale_model_base_adapter_base(tiny_model_dir, tmp_path):
    adapter = random_lora(tiny_model(), str(tmp_path / "lora"), r=4, std=0.3, seed=1)
    items, _ = mmlu_items()
    kw = dict(tasks=["mmlu"], data={"mmlu": items}, show_progress=False)
    base1 = evaluate_model(str(tiny_model_dir), [], **kw)["tasks"]["mmlu"]
    with_adapter = evaluate_model(str(tiny_model_dir), [adapter], **kw)["tasks"]["mmlu"]
    unmerged = evaluate_model(str(tiny_model_dir), [adapter], merge_adapters=False, **kw)["tasks"]["mmlu"]
    base2 = evaluate_model(str(tiny_model_dir), [], **kw)["tasks"]["mmlu"]
    assert _scores(base1, "logprobs") == _scores(base2, "logprobs")  # bit for bit: a fresh model each call
    flat = [x for row in _scores(base1, "logprobs") for x in row]
    flat_adapter = [x for row in _scores(with_adapter, "logprobs") for x in row]
    assert max(abs(a - b) for a, b in zip(flat, flat_adapter, strict=True)) > 1e-3  # the adapter changes the model
    for a, b in zip(_scores(with_adapter, "logprobs"), _scores(unmerged, "logprobs"), strict=True):
        assert a == pytest.approx(b, abs=1e-4)  # merged into the copy == attached with PEFT


def test_task_accuracy_exact_match_and_letter(tmp_path):
    tok = tiny_tokenizer()
    items = [
        {"id": "t0", "prompt": "Capital of France?", "answer": "Paris"},
        {"id": "t1", "prompt": "2+2?", "answer": "4"},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    r = evaluate(ReplyLM(tok, "paris."), tok, [f"task:{path}"], show_progress=False)
    res = r["tasks"][f"task:{path}"]
    assert res["metric_kind"] == "exact_match" and _scores(res, "score") == [1, 0]
    assert res["metrics"]["acc"]["value"] == 0.5
    # letter items: the tiny model's next-token choice among "A".."D" after the chat template
    model = tiny_model()
    letter = [
        {"id": f"l{i}", "prompt": f"Pick {i}", "choices": ["a", "b", "c", "d"], "answer": "ABCD"[i]} for i in range(4)
    ]
    r = evaluate(model, tok, ["task:mine"], data={"task:mine": letter}, show_progress=False)
    res = r["tasks"]["task:mine"]
    assert res["metric_kind"] == "letter"
    from sst_merge.models.tokenize import chat_text

    with torch.no_grad():  # reference: one unpadded forward per item, argmax over the four letter tokens
        ref = []
        for it in letter:
            ids = torch.tensor([tok.encode(chat_text(tok, it["prompt"]))])
            logits = model(ids).logits[0, -1]
            ref.append(int(torch.argmax(logits[[tok.convert_tokens_to_ids(c) for c in "ABCD"]])))
    assert _scores(res, "pred") == ref
    assert _scores(res, "score") == [int(p == i) for i, p in enumerate(ref)]


def test_registered_task_from_sst_merge_tasks():
    import sst_merge.tasks as tasks_mod  # the project's own module: a failing import is a failure, not a skip

    name = tasks_mod.UTILITY_TASKS.names()[0]
    task = tasks_mod.get_task(name)
    tok = tiny_tokenizer()
    first = task.split(seed=0)["eval"][0]
    r = evaluate(ReplyLM(tok, first["answer"]), tok, [f"task:{name}"], limit=3, show_progress=False)
    res = r["tasks"][f"task:{name}"]
    assert res["n"] == 3 and res["records"][0]["id"] == first["id"] and res["records"][0]["score"] == 1
    train_ids = {it["id"] for it in task.split(seed=0)["train"]}
    assert not train_ids & {rec["id"] for rec in res["records"]}  # held-out items only


def test_bad_input_fails_before_model_work():
    tok = tiny_tokenizer()
    model = ReplyLM(tok, "x")
    with pytest.raises(ConfigError, match="mmlu"):
        evaluate(model, tok, ["mmlux"])
    with pytest.raises(ConfigError, match="needs an argument"):
        evaluate(model, tok, ["task"])
    with pytest.raises(DataError, match="empty"):
        evaluate(model, tok, ["refusal"], data={"refusal": []})
    with pytest.raises(ConfigError, match="not being evaluated"):
        evaluate(model, tok, ["refusal"], data={"mmlu": []})
    with pytest.raises(ConfigError):
        evaluate(model, tok, [])


def test_records_file_and_cli(tiny_model_dir, tmp_path):
    from sst_merge.cli import main

    items, _ = mmlu_items()
    q = tmp_path / "q.jsonl"
    q.write_text("".join(json.dumps(it) + "\n" for it in items))
    h = tmp_path / "h.jsonl"
    h.write_text("".join(json.dumps(it) + "\n" for it in HARMFUL))
    out = tmp_path / "res.json"
    argv = ["-q", "eval", "--model", str(tiny_model_dir), "--tasks", "mmlu,refusal", "--data", f"mmlu={q}"]
    argv += ["--data", f"refusal={h}", "--max-new-tokens", "4", "-o", str(out)]
    assert main(argv) == 0
    summary = json.loads(out.read_text())
    assert summary["tasks"]["mmlu"]["n"] == len(items) and "records" not in summary["tasks"]["mmlu"]
    assert summary["tasks"]["refusal"]["metrics"]["refusal_rate"]["n"] == len(HARMFUL)
    lines = [json.loads(x) for x in (tmp_path / "res.records.jsonl").read_text().splitlines()]
    assert len(lines) == len(items) + len(HARMFUL)
    assert {x["task"] for x in lines} == {"mmlu", "refusal"} and all("id" in x for x in lines)
    assert main(argv) == 2  # exists, no --force
    assert main(argv + ["--force"]) == 0
    # the settings the CLI did not set are EvalSettings' defaults, recorded with the results
    default = EvalSettings()
    assert summary["settings"]["max_new_tokens"] == 4 and summary["settings"]["batch_size"] == default.batch_size
    assert summary["settings"]["judge"] == default.judge


def test_one_settings_model_for_the_cli_evaluate_and_experiments(tiny_model_dir, tmp_path, capsys):
    """The CLI, evaluate() and an experiment's eval section share EvalSettings: its defaults, its checks."""
    from sst_merge.cli import main
    from sst_merge.experiments.config import ExperimentConfig

    assert ExperimentConfig().eval.harness_settings() == EvalSettings()
    assert set(EvalSettings.model_fields) <= set(ExperimentConfig.model_fields["eval"].annotation.model_fields)
    tok = tiny_tokenizer()
    r = evaluate(ReplyLM(tok, "No."), tok, ["refusal"], data={"refusal": HARMFUL}, show_progress=False)
    assert {k: r["settings"][k] for k in ("batch_size", "max_new_tokens")} == {"batch_size": 8, "max_new_tokens": 64}
    out = tmp_path / "res.json"
    capsys.readouterr()
    argv = ["eval", "--model", str(tiny_model_dir), "--tasks", "refusal", "--batch-size", "0", "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "sst-merge eval: error: evaluation settings: batch_size: Input should be greater than or equal to 1"
    assert not out.exists()
    with pytest.raises(ValidationError, match="max_new_tokens"):
        EvalSettings(max_new_tokens=0)


# --- summarise: the metrics every evaluator computes from its records (also what a sharded run recomputes) ---------


def _judged(scores, kinds=None, empty=(), partial=()):
    kinds = kinds or ["plain"] * len(scores)

    def verdict(i, s):
        return "empty" if i in empty else "partial_refusal" if i in partial else ("compliance", "refusal")[s]

    return [
        {"id": f"r{i}", "score": s, "empty": i in empty, "kind": k, "verdict": verdict(i, s)}
        for i, (s, k) in enumerate(zip(scores, kinds, strict=True))
    ]


def test_summarise_refusal_and_over_refusal_hand_computed():
    from sst_merge.eval import get_evaluator

    m = get_evaluator("refusal").summarise(_judged([1, 0, 1, 0], empty={3}, partial={2}))["metrics"]
    assert set(m) == {"refusal_rate", "empty_rate", "partial_refusal_rate"}
    assert (m["partial_refusal_rate"]["value"], m["partial_refusal_rate"]["higher_is_better"]) == (0.25, False)
    assert (m["refusal_rate"]["value"], m["refusal_rate"]["n"], m["refusal_rate"]["higher_is_better"]) == (0.5, 4, True)
    assert (m["empty_rate"]["value"], m["empty_rate"]["higher_is_better"]) == (0.25, False)
    # 5 benign prompts, refused r1 (a look-alike) and r4: over-refusal 2/5, look-alikes (r1, r2) 1/2
    recs = _judged([0, 1, 0, 0, 1], ["plain", "lookalike", "lookalike", "plain", "plain"])
    m = get_evaluator("over_refusal").summarise(recs)["metrics"]
    assert m["over_refusal_rate"]["value"] == pytest.approx(2 / 5) and m["over_refusal_rate"]["n"] == 5
    assert m["over_refusal_rate"]["higher_is_better"] is False
    assert (m["over_refusal_rate_lookalike"]["value"], m["over_refusal_rate_lookalike"]["n"]) == (0.5, 2)
    assert m["empty_rate"]["value"] == 0.0
    plain = get_evaluator("over_refusal").summarise(_judged([1, 0]))["metrics"]
    assert "over_refusal_rate_lookalike" not in plain  # no look-alikes, no look-alike rate
    alike = get_evaluator("over_refusal").summarise(_judged([1, 0], ["lookalike"] * 2))["metrics"]
    assert "over_refusal_rate_lookalike" not in alike  # all look-alikes: the primary rate already says it
    # per type: homonyms 2 of 3 refused (one partially), definitions 0 of 1
    types = ["homonyms"] * 3 + ["definitions"]
    recs = [{**r, "type": t} for r, t in zip(_judged([1, 1, 0, 0], partial={1}), types, strict=True)]
    m = get_evaluator("over_refusal").summarise(recs)["metrics"]
    assert (m["over_refusal_rate_homonyms"]["value"], m["over_refusal_rate_homonyms"]["n"]) == (pytest.approx(2 / 3), 3)
    assert (m["over_refusal_rate_definitions"]["value"], m["over_refusal_rate_definitions"]["n"]) == (0.0, 1)
    assert m["partial_refusal_rate"]["value"] == 0.25


def test_summarise_task_accuracy_and_mmlu_hand_computed():
    from sst_merge.eval import get_evaluator

    m = get_evaluator("task:anything").summarise([{"id": i, "score": s} for i, s in enumerate([1, 1, 0])])
    assert m["metrics"]["acc"]["value"] == pytest.approx(2 / 3) and m["metrics"]["acc"]["n"] == 3
    # math 3/4, bio 0/2, law 1/1: micro 4/7, macro (0.75 + 0 + 1) / 3
    subjects = ["math"] * 4 + ["bio"] * 2 + ["law"]
    scores = [1, 1, 1, 0, 0, 0, 1]
    norm = [1, 0, 0, 0, 1, 1, 1]  # math 1/4, bio 2/2, law 1/1: micro 4/7, macro (0.25 + 1 + 1) / 3
    recs = [
        {"id": f"q{i}", "subject": s, "score": a, "score_norm": b, "score_bytes": 0}
        for i, (s, a, b) in enumerate(zip(subjects, scores, norm, strict=True))
    ]
    mm = get_evaluator("mmlu").summarise(recs)
    assert set(mm["metrics"]) == {"acc", "acc_macro"}
    assert mm["metrics"]["acc"]["value"] == pytest.approx(4 / 7)
    assert mm["metrics"]["acc_macro"]["value"] == pytest.approx(1.75 / 3) and mm["metrics"]["acc_macro"]["n"] == 7
    assert mm["metrics"]["acc_macro"]["stderr"] is None  # law has a single question: no pooled stderr
    assert mm["per_subject"] == {
        "bio": {"acc": 0.0, "n": 2},
        "law": {"acc": 1.0, "n": 1},
        "math": {"acc": 0.75, "n": 4},
    }
    mc = get_evaluator("mmlu_cloze").summarise(recs)["metrics"]
    assert mc["acc"]["value"] == pytest.approx(4 / 7) and mc["acc_macro"]["value"] == pytest.approx(1.75 / 3)
    assert mc["acc_norm"]["value"] == pytest.approx(4 / 7) and mc["acc_norm_macro"]["value"] == pytest.approx(2.25 / 3)
    assert mc["acc_bytes"]["value"] == 0.0


def test_every_evaluator_reports_the_metrics_of_its_own_summarise(monkeypatch):
    """``run`` takes its metrics from ``summarise`` (the method a sharded run calls), so the two cannot drift."""
    from sst_merge.eval import TASKS, Evaluator

    missing = [n for n in TASKS.names() if TASKS.get(n).summarise is Evaluator.summarise]
    assert not missing, f"evaluators without summarise (run whole on every rank): {missing}"
    tok = tiny_tokenizer()
    marker = {"metrics": {"acc": {"value": -1.0, "n": 0}, "refusal_rate": {"value": -1.0, "n": 0}}}
    for name in TASKS.names():
        monkeypatch.setattr(TASKS.get(name), "summarise", lambda self, records: marker)
    r = evaluate(ReplyLM(tok, "Sorry, no."), tok, ["refusal"], data={"refusal": HARMFUL}, show_progress=False)
    assert r["tasks"]["refusal"]["metrics"] is marker["metrics"]
    ltok = letter_tokenizer()
    items, plan = mmlu_items()
    r = evaluate(ForcedLetterLM(ltok, plan), ltok, ["mmlu"], data={"mmlu": items}, show_progress=False)
    assert r["tasks"]["mmlu"]["metrics"] is marker["metrics"]


def test_cli_eval_reads_the_named_fisher_sources_in_a_fresh_process(tiny_model_dir, tmp_path):
    """`--data refusal=safety_fisher` (StrongREJECT's held-out split) resolves in a process that imported nothing
    else first: the CLI registers the named Fisher sources itself."""
    import os
    import subprocess
    import sys

    from sst_merge.tasks.safety import safety_splits

    out = tmp_path / "sr.json"
    code = "import sys; from sst_merge.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["-q", "eval", "--model", str(tiny_model_dir), "--tasks", "refusal", "--data", "refusal=safety_fisher",
            "--limit", "2", "--max-new-tokens", "2", "-o", str(out)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "sr.records.jsonl").read_text().splitlines()]
    fisher = {it["prompt"] for it in safety_splits(0)["fisher"]}
    assert len(lines) == 2 and all(x["prompt"] in fisher for x in lines)
