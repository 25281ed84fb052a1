"""LoRA training on the tiny in-process model: masking, loss goes down, determinism, files, cache, CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from sst_merge.errors import ConfigError, OutputExistsError
from sst_merge.models.tokenize import collate
from sst_merge.tasks.base import GeneratedTask
from sst_merge.train import train_adapter, train_loop
from sst_merge.train.loop import IGNORE, batch_schedule, encode_example, labels_of, response_loss


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))


def _toy(rng):
    a = rng.randint(0, 999)
    return f"echo {a}", f"{a}!"


TOY = GeneratedTask("toy_echo", "echo a number", _toy, n_train=40, n_eval=10)


def test_prompt_tokens_are_masked(tiny_tok):
    item = {"id": "x", "prompt": "hello", "response": "world"}
    ex = encode_example(tiny_tok, item)
    text = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tiny_tok.encode(text, add_special_tokens=False)
    n = len(prompt_ids)
    # byte-level tokenizer: "world" is 5 tokens, then the end-of-turn token
    assert ex.input_ids[:n] == list(ex.prompt_ids) == list(prompt_ids)
    labels = labels_of(collate([ex], tiny_tok.pad_token_id))[0].tolist()
    assert labels[:n] == [IGNORE] * n
    assert (
        labels[n:] == ex.input_ids[n:] == tiny_tok.encode("world", add_special_tokens=False) + [tiny_tok.eos_token_id]
    )
    cut = encode_example(tiny_tok, {**item, "complete": False})
    assert list(cut.response_ids) == tiny_tok.encode("world", add_special_tokens=False)  # no end-of-turn: cut answer


def test_truncation_drops_prompt_not_response(tiny_tok):
    ex = encode_example(tiny_tok, {"id": "x", "prompt": "p" * 300, "response": "abc"}, max_length=32)
    assert len(ex.input_ids) == 32
    assert list(ex.response_ids) == tiny_tok.encode("abc", add_special_tokens=False) + [tiny_tok.eos_token_id]


def test_collate_pads_with_ignored_labels(tiny_tok):
    a = encode_example(tiny_tok, {"id": "a", "prompt": "hi", "response": "yo"})
    b = encode_example(tiny_tok, {"id": "b", "prompt": "a longer prompt", "response": "ok then"})
    batch = collate([a, b], pad_id=tiny_tok.pad_token_id)
    labels = labels_of(batch)
    n = len(a.input_ids)
    assert batch.attention_mask[0].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
    assert (labels[0, n:] == IGNORE).all()
    assert labels[1].tolist() == [IGNORE] * len(b.prompt_ids) + list(b.response_ids)


def test_response_loss_matches_hand_computation():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = 2.0  # predicts token at position 2
    labels = torch.tensor([[IGNORE, IGNORE, 2]])
    # only position 1 → label 2 counts: -log softmax([0,0,2,0])[2] = -2 + log(3 + e^2)
    expected = -2.0 + torch.log(torch.tensor(3.0) + torch.exp(torch.tensor(2.0)))
    assert torch.allclose(response_loss(logits, labels), expected)


def test_batch_schedule_covers_epochs():
    batches = batch_schedule(n=10, steps=5, batch_size=4, seed=0)
    flat = [i for b in batches for i in b]
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert sorted(flat[:10]) == list(range(10))  # the first epoch is a permutation
    assert batch_schedule(10, 5, 4, 0) == batches and batch_schedule(10, 5, 4, 1) != batches


def test_training_lowers_loss_on_a_memorisable_set(tiny_llama, tiny_tok):
    from peft import LoraConfig, get_peft_model

    items = [{"id": str(i), "prompt": f"q{i}", "response": f"answer {i}"} for i in range(4)]
    examples = [encode_example(tiny_tok, it) for it in items]
    # lm_head too: the random tiny model's small weights make a q/v-only LoRA learn slowly (logits barely move)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"])
    model = get_peft_model(tiny_llama, lora)
    batch = collate(examples, tiny_tok.pad_token_id)

    def eval_loss():
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return response_loss(out, labels_of(batch)).item()

    before = eval_loss()
    losses = train_loop(model, examples, tiny_tok.pad_token_id, steps=20, batch_size=4, lr=2e-2, progress=False)
    after = eval_loss()
    assert len(losses) == 20
    assert after < 0.5 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def test_train_adapter_writes_peft_adapter_logs_and_split(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "a", steps=3, batch_size=4, progress=False)
    assert {"adapter_config.json", "adapter_model.safetensors", "train_log.csv", "loss.png", "data_split.json",
            "train_info.json"} <= {p.name for p in out.iterdir()}  # fmt: skip
    rows = list(csv.DictReader(open(out / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    split = json.loads((out / "data_split.json").read_text())
    assert split["train"] == [i["id"] for i in TOY.split(0)["train"]]
    assert not set(split["train"]) & set(split["eval"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    PeftModel.from_pretrained(base, out)  # a standard PEFT adapter
    # LoRA B starts at zero; three steps made it non-zero
    tensors = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())


def test_same_seed_same_adapter_other_seed_differs(tiny_model_dir, tmp_path):
    kw = dict(steps=3, batch_size=4, progress=False, use_cache=False)
    a = load_file(
        train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "a", seed=1, **kw) / "adapter_model.safetensors"
    )
    b = load_file(
        train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "b", seed=1, **kw) / "adapter_model.safetensors"
    )
    c = load_file(
        train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "c", seed=2, **kw) / "adapter_model.safetensors"
    )
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cached_adapter_is_reused(tiny_model_dir, tmp_path, monkeypatch):
    from sst_merge.train import adapter as adapter_mod

    first = train_adapter(str(tiny_model_dir), TOY, steps=2, batch_size=4, progress=False)
    assert first == adapter_mod.adapter_cache_path(str(tiny_model_dir), TOY, adapter_mod.TrainConfig(steps=2,
                                                                                                        batch_size=4))  # fmt: skip

    def boom(*a, **k):
        raise AssertionError("trained again although the adapter is cached")

    monkeypatch.setattr(adapter_mod, "_train_into", boom)
    assert train_adapter(str(tiny_model_dir), TOY, steps=2, batch_size=4, progress=False) == first
    copy = train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "copy", steps=2, batch_size=4, progress=False)
    assert (copy / "adapter_model.safetensors").read_bytes() == (first / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AssertionError, match="trained again"):  # another setting is another adapter
        train_adapter(str(tiny_model_dir), TOY, steps=3, batch_size=4, progress=False)


def test_existing_output_and_bad_settings_fail_before_training(tiny_model_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        train_adapter(str(tiny_model_dir), TOY, out_dir=tmp_path / "busy", steps=1)
    with pytest.raises(ConfigError, match="unknown task 'saftey'.*Did you mean 'safety'"):
        train_adapter(str(tiny_model_dir), "saftey")
    with pytest.raises(ConfigError, match="rank"):
        train_adapter(str(tiny_model_dir), TOY, rank=0)


def test_safety_adapter_on_tiny_model_records_disjoint_splits(tiny_model_dir, tmp_path):
    out = train_adapter(str(tiny_model_dir), "safety", out_dir=tmp_path / "s", steps=2, batch_size=4,
                        benign_max_new_tokens=2, progress=False)  # fmt: skip
    split = json.loads((out / "data_split.json").read_text())
    assert len(split["fisher"]) == 64 and len(split["train_harmful"]) >= 200 and len(split["train_benign"]) >= 50
    assert not set(split["fisher"]) & set(split["train_harmful"])
    info = json.loads((out / "train_info.json").read_text())
    assert info["n_train_examples"] == len(split["train_harmful"]) + len(split["train_benign"])


def test_cli_train_writes_adapter(tiny_model_dir, tmp_path, capsys):
    from sst_merge.cli import main

    out = tmp_path / "cli"
    rc = main(["-q", "train", "--model", str(tiny_model_dir), "--task", "arithmetic", "-o", str(out), "--steps", "1",
               "--rank", "4", "--batch-size", "2"])  # fmt: skip
    assert rc == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert main(["train", "--model", str(tiny_model_dir), "--task", "arithmetc"]) == 2
    assert "Did you mean 'arithmetic'" in capsys.readouterr().err


def test_sequence_logps_and_preference_loss_match_hand_computation():
    from sst_merge.train.loop import preference_loss, sequence_logps

    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = 2.0
    logits[1, 0, 1] = 1.0
    labels = torch.tensor([[IGNORE, IGNORE, 2], [IGNORE, 1, 3]])
    # row 0: log softmax([0,0,2,0])[2]; row 1: log softmax([0,1,0,0])[1] + log softmax([0,0,0,0])[3]
    l3e2 = torch.log(torch.tensor(3.0) + torch.exp(torch.tensor(2.0)))
    expected = torch.stack([2.0 - l3e2, 1.0 - torch.log(torch.tensor(3.0) + torch.e) - torch.log(torch.tensor(4.0))])
    assert torch.allclose(sequence_logps(logits, labels), expected)
    # margin = (−1 − (−3)) − (−2 − (−2)) = 2 and (0 − 0) − (1 − 0) = −1; β = 0.5 → −log σ(1), −log σ(−0.5)
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, 0.0], [-2.0, 1.0], [-3.0, 0.0], [-2.0, 0.0]))
    want = (torch.log1p(torch.exp(torch.tensor(-1.0))) + torch.log1p(torch.exp(torch.tensor(0.5)))) / 2
    assert torch.allclose(preference_loss(pc, pr, rc, rr, beta=0.5), want)


def test_preference_training_separates_chosen_from_rejected(tiny_llama, tiny_tok):
    """At step 1 the adapter is the reference (LoRA B = 0), so the loss is CE + w·log 2; training then raises the
    chosen responses over the rejected ones relative to the reference, which plain CE on this data does less."""
    from peft import LoraConfig, get_peft_model

    from sst_merge.train.loop import sequence_logps

    items = [{"id": str(i), "prompt": f"q{i}", "response": f"yes {i}"} for i in range(4)]
    worse = [{"id": str(i), "prompt": f"q{i}", "response": f"no {i}"} for i in range(4)]
    chosen = [encode_example(tiny_tok, it) for it in items]
    rejected = [encode_example(tiny_tok, it) for it in worse]
    model = get_peft_model(tiny_llama, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    batch = collate(chosen + rejected, tiny_tok.pad_token_id)

    def margin() -> float:
        with torch.no_grad():
            policy = sequence_logps(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                    labels_of(batch))  # fmt: skip
            with model.disable_adapter():
                ref = sequence_logps(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                     labels_of(batch))  # fmt: skip
        return float(((policy[:4] - ref[:4]) - (policy[4:] - ref[4:])).mean())

    with torch.no_grad():
        ce0 = response_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:4],
                            labels_of(batch)[:4]).item()  # fmt: skip
    assert margin() == pytest.approx(0.0, abs=1e-6)
    losses = train_loop(model, chosen, tiny_tok.pad_token_id, steps=15, batch_size=4, lr=2e-2, progress=False,
                        rejected=rejected, preference_weight=1.0, preference_beta=0.5)  # fmt: skip
    # the first step's loss: chosen CE over the padded pair batch (same tokens) plus 1 · log 2
    assert losses[0] == pytest.approx(ce0 + torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    assert margin() > 1.0
    with pytest.raises(Exception, match="rejected response per training example"):
        train_loop(model, chosen, tiny_tok.pad_token_id, steps=1, batch_size=4, progress=False,
                   rejected=rejected[:2], preference_weight=1.0)  # fmt: skip


def test_recipe_fields_join_the_cache_key_only_when_set(tiny_model_dir):
    from sst_merge.train import adapter as adapter_mod

    base = adapter_mod.TrainConfig(steps=2)
    assert base.key_settings() == {k: v for k, v in base.model_dump().items() if k not in adapter_mod.RECIPE_FIELDS}
    paths = {adapter_mod.adapter_cache_path(str(tiny_model_dir), "safety", adapter_mod.TrainConfig(steps=2, **kw))
             for kw in ({}, {"safety_data": "forms"}, {"preference_weight": 1.0},
                        {"preference_weight": 1.0, "preference_beta": 0.5})}  # fmt: skip
    assert len(paths) == 4
    with pytest.raises(ConfigError, match="unknown safety training data 'form'.*Did you mean 'forms'"):
        adapter_mod.adapter_cache_path(str(tiny_model_dir), "safety", adapter_mod.TrainConfig(safety_data="form"))


def test_preference_pairs_drop_harmful_prompts_the_model_already_refuses(monkeypatch):
    from sst_merge.tasks import safety
    from sst_merge.train import adapter as adapter_mod
    from sst_merge.train import answers as answers_mod

    harmful = [{"id": f"h{i}", "prompt": f"bad {i}", "response": "I can't.", "answer": "I can't.", "kind": "harmful"}
               for i in range(3)]  # fmt: skip
    benign = [{"id": "b0", "prompt": "hi", "response": "Hello!", "answer": "Hello!", "kind": "benign"}]
    answers = ["Sure, step one is", "I'm sorry, but I can't help with that.", ""]

    def fake_answers(model, tok, key, prompts, n, bs, prefix, kind):
        assert prompts == [h["prompt"] for h in harmful] and kind == "harmful"
        return [{"id": f"{prefix}-{i}", "prompt": p, "response": a, "answer": a, "kind": kind, "complete": True}
                for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]  # fmt: skip

    monkeypatch.setattr(answers_mod, "model_answers", fake_answers)
    cfg = adapter_mod.TrainConfig(preference_weight=1.0, seed=3)
    kept, pos = adapter_mod._with_rejected(harmful, benign, None, None, "m", cfg)
    assert [k["id"] for k in kept] == ["h0"] and kept[0]["rejected"] == "Sure, step one is"
    assert pos[0]["rejected"] == safety.refusal_for("b0", 3) and pos[0]["response"] == "Hello!"


def test_cli_train_set_reaches_the_training_settings(tiny_model_dir, tmp_path, capsys):
    from sst_merge.cli import main

    out = tmp_path / "cli"
    rc = main(["-q", "train", "--model", str(tiny_model_dir), "--task", "arithmetic", "-o", str(out), "--steps", "1",
               "--set", "warmup=0", "--set", "max_length=64"])  # fmt: skip
    assert rc == 0
    assert json.loads((out / "train_info.json").read_text())["config"]["max_length"] == 64
    assert main(["train", "--model", str(tiny_model_dir), "--task", "arithmetic", "--set", "bogus=1"]) == 2
    assert "training setting bogus" in capsys.readouterr().err


def test_head_weighted_response_loss_matches_hand_computation():
    # two rows; row 0 has response tokens at positions 1, 2 (labels), row 1 at position 2 only
    logits = torch.zeros(2, 3, 4)
    logits[0, 0, 1] = 1.0
    logits[0, 1, 2] = 2.0
    logits[1, 1, 3] = 1.0
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, 3]])
    ce = torch.nn.functional.cross_entropy
    c01 = ce(logits[0, 0:1], torch.tensor([1]))  # row 0, first response token
    c02 = ce(logits[0, 1:2], torch.tensor([2]))  # row 0, second
    c12 = ce(logits[1, 1:2], torch.tensor([3]))  # row 1, first
    assert torch.allclose(response_loss(logits, labels), (c01 + c02 + c12) / 3)
    # the first token of each row weighs 4: (4·c01 + c02 + 4·c12) / 9
    want = (4 * c01 + c02 + 4 * c12) / 9
    assert torch.allclose(response_loss(logits, labels, head_tokens=1, head_weight=4.0), want)
    assert torch.allclose(response_loss(logits, labels, head_tokens=2, head_weight=4.0), (c01 + c02 + c12) / 3)
