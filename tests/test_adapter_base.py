"""A trained adapter records a base that plain PEFT loads; merges compare bases by identity, not by spelling."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.errors import AdapterError
from sst_merge.merge.api import check_compatible
from sst_merge.models import base_identity, embedded
from sst_merge.tasks.base import GeneratedTask
from sst_merge.testing import random_lora, tiny_model
from sst_merge.train import train_adapter

ALIAS = "smollm2-135m"


def _toy(rng):
    a = rng.randint(0, 999)
    return f"echo {a}", f"{a}!"


TOY = GeneratedTask("toy_echo", "echo a number", _toy, n_train=40, n_eval=10)


@pytest.fixture()
def embedded_tiny(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny model standing in for the embedded alias: its 'conversion' is a copy in a fresh cache."""
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    converted = embedded.converted_dir(ALIAS)
    shutil.copytree(tiny_model_dir, converted)
    monkeypatch.setattr(embedded, "ensure_cached", lambda name=ALIAS: embedded.converted_dir(name))
    return converted


def test_base_identity(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "x").mkdir()
    assert base_identity(ALIAS) == ALIAS
    assert base_identity("/home/someone/.cache/sst-merge/models/smollm2-135m/") == ALIAS  # another machine's cache
    assert base_identity("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"  # a hub alias is its hub id
    assert base_identity(str(tmp_path / "x" / ".." / "m")) == str((tmp_path / "m").resolve())
    assert base_identity("/nowhere/models/other-model/") == "/nowhere/models/other-model"  # not an embedded name
    assert base_identity("other/model") == "other/model"


def test_one_base_recorded_two_ways_merges_and_two_bases_are_refused(embedded_tiny, tmp_path):
    m = tiny_model("llama")
    here = random_lora(m, str(tmp_path / "here"), seed=1, base_model_name_or_path=str(embedded_tiny))
    shipped = random_lora(m, str(tmp_path / "alias"), seed=2, base_model_name_or_path=ALIAS)
    elsewhere = random_lora(m, str(tmp_path / "far"), seed=3,
                            base_model_name_or_path="/home/someone/.cache/sst-merge/models/smollm2-135m")  # fmt: skip
    adapters = [LoraAdapter.load(p) for p in (here, shipped, elsewhere)]
    assert check_compatible(adapters) == sorted(adapters[0].modules)
    other = LoraAdapter.load(random_lora(m, str(tmp_path / "other"), seed=4, base_model_name_or_path="other/model"))
    with pytest.raises(AdapterError, match=r"\(base other/model\) were trained on different base models") as e:
        check_compatible([adapters[0], other])
    assert "\n" not in str(e.value)


def test_trained_adapter_loads_with_plain_peft_and_training_warns_nothing(embedded_tiny, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    from sst_merge.eval.harness import load_with_adapters

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train_adapter(ALIAS, TOY, out_dir=tmp_path / "a", steps=2, batch_size=4, progress=False)
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    base = str(embedded_tiny.resolve())
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    info = json.loads((out / "train_info.json").read_text())
    assert info["model"] == ALIAS and info["base"]["path"] == base and info["base"]["identity"] == ALIAS
    assert info["base"]["embedded"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    card = (out / "README.md").read_text()
    assert f"`{base}`" in card and f"sst-merge name: `{ALIAS}`" in card and "SmolLM2-135M-Instruct.Q4_1.gguf" in card
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card and "library_name: peft" in card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plain = AutoPeftModelForCausalLM.from_pretrained(out).eval()  # PEFT alone: no alias, no hub
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, _ = load_with_adapters(ALIAS, [str(out)], merge_adapters=False)  # the path `sst-merge eval` loads by
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, ours(input_ids=ids).logits
    base_logits = ours.get_base_model()
    assert torch.equal(a, b)
    with torch.no_grad(), ours.disable_adapter():
        assert not torch.equal(base_logits(input_ids=ids).logits, b)  # the adapter is applied, not ignored


def test_cached_adapter_from_before_gets_a_loadable_base(embedded_tiny, tmp_path):
    first = train_adapter(ALIAS, TOY, steps=1, batch_size=4, progress=False)  # into the cache
    config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": ALIAS}))
    (first / "README.md").unlink()
    copy = train_adapter(ALIAS, TOY, out_dir=tmp_path / "copy", steps=1, batch_size=4, progress=False)
    base = str(embedded_tiny.resolve())
    for d in (first, copy):
        assert json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] == base
        assert (d / "README.md").is_file()


def test_adapter_whose_base_is_not_on_this_machine_loads_with_the_given_model(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sst_merge.eval.harness import load_with_adapters

    far = random_lora(tiny_model("llama"), str(tmp_path / "far"), seed=5,
                      base_model_name_or_path="/home/someone/models/tiny")  # fmt: skip
    ours, _ = load_with_adapters(str(tiny_model_dir), [far], merge_adapters=False)  # sst-merge eval's loader
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), far).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_shipping_records_the_alias_not_this_machines_directory(embedded_tiny, tmp_path):
    from sst_merge.train import shipped
    from sst_merge.train.adapter import adapter_cache_path, train_config

    task = "passage_qa"
    cached = adapter_cache_path(ALIAS, task, train_config(task))  # a trained adapter, so nothing trains here
    random_lora(tiny_model("llama"), str(cached), base_model_name_or_path=str(embedded_tiny.resolve()))
    (cached / "data_split.json").write_text(json.dumps({"task": task, "seed": 0, "train": ["a"], "eval": ["b"]}))
    (cached / "train_info.json").write_text(json.dumps({"versions": {"torch": "x"}, "train_seconds": 1.0}))
    dest = shipped.ship(ALIAS, task, root=tmp_path / "shipped", progress=False)
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == ALIAS
    assert shipped.file_problems(dest) == [] and not (dest / "README.md").exists()
    assert json.loads((cached / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        embedded_tiny.resolve()
    )  # the cache keeps the directory that loads here


@pytest.mark.parametrize("task", ["passage_qa", "safety"])
def test_packaged_adapters_name_the_embedded_alias(task):
    from sst_merge.train import shipped

    config = json.loads((shipped.SHIPPED_ROOT / task / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == shipped.SHIPPED_MODEL == ALIAS  # portable: no machine's path


def test_merged_adapter_of_an_alias_loads_with_plain_peft(embedded_tiny, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    from sst_merge.merge.api import merge

    m = tiny_model("llama")
    paths = [random_lora(m, str(tmp_path / n), seed=i, base_model_name_or_path=ALIAS) for i, n in enumerate("ab")]
    adapters = [{"path": p, "weight": 1.0, "role": "utility"} for p in paths]
    config = {"base_model": ALIAS, "method": "task_arithmetic", "adapters": adapters, "output": {"format": "peft"}}
    out = tmp_path / "merged"
    merge(config, out, show_progress=False)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        embedded_tiny.resolve()
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plain = AutoPeftModelForCausalLM.from_pretrained(out).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(embedded_tiny), out).eval()
    ids = torch.tensor([[2, 7, 1, 8, 2]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, ref(input_ids=ids).logits)
