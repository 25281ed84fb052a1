"""The seed architectures (Mistral-7B, Llama-3.1-8B, Qwen2.5-14B) as configs, rehearsed end to end at cut depth.

The fast rehearsals keep each architecture's own features — model type, head dim, the query/key-value head ratio,
Qwen2's q/k/v biases, Llama 3.1's rope scaling, Mistral's sliding window — at 1/8 of the width, one layer and a
512-token vocabulary, so they run in seconds. The same rehearsal at the real width (one layer of 218–275 M weights)
runs with ``SST_MERGE_HEAVY_TESTS=1`` (minutes each; see ``bench/shapes.py`` for the measured costs).
"""

from __future__ import annotations

import os

import pytest
import torch

from sst_merge.models.shapes import SEED_MODELS, SHAPES, random_model_dir, shape_config
from sst_merge.plan import Shape

heavy = pytest.mark.skipif(not os.environ.get("SST_MERGE_HEAVY_TESTS"), reason="set SST_MERGE_HEAVY_TESTS=1")

# Parameter counts published with the checkpoints (model cards / safetensors index), full depth and vocabulary.
PUBLIC_PARAMS = {"mistral-7b": 7_241_732_096, "llama-3.1-8b": 8_030_261_248, "qwen-2.5-14b": 14_770_033_664}


@pytest.mark.parametrize("alias", SEED_MODELS)
def test_full_depth_config_has_the_published_parameter_count(alias):
    from transformers import AutoModelForCausalLM

    cfg = shape_config(alias)
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == PUBLIC_PARAMS[alias] == Shape.from_config(cfg).params()


def test_architecture_specific_settings_reach_the_config():
    mistral, llama, qwen = (shape_config(a) for a in SEED_MODELS)
    assert type(mistral).__name__ == "MistralConfig" and mistral.sliding_window == 4096
    assert mistral.rope_parameters["rope_theta"] == 10000.0
    rope = llama.rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]) == ("llama3", 8, 1, 4)
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == 500000.0
    assert (llama.vocab_size, llama.num_attention_heads, llama.num_key_value_heads) == (128256, 32, 8)
    assert type(qwen).__name__ == "Qwen2Config" and qwen.num_hidden_layers == 48
    assert (qwen.hidden_size, qwen.intermediate_size, qwen.num_attention_heads, qwen.num_key_value_heads) == (
        5120,
        13824,
        40,
        8,
    )
    assert qwen.rope_parameters["rope_theta"] == 1e6 and qwen.vocab_size == 152064


def test_qwen2_projections_carry_biases_and_gqa_shapes():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config("qwen-2.5-14b", num_layers=1))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    assert tuple(attn.q_proj.weight.shape) == (5120, 5120) and tuple(attn.v_proj.weight.shape) == (1024, 5120)


def test_narrow_keeps_head_dim_and_head_ratio():
    cfg = shape_config("qwen-2.5-14b", num_layers=1, narrow=8)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (640, 5, 1, 128)
    with pytest.raises(Exception, match="narrow=3"):
        shape_config("llama-3.1-8b", narrow=3)


def test_unknown_alias_names_the_known_ones():
    from sst_merge.errors import ConfigError

    with pytest.raises(ConfigError, match="llama-3.1-8b"):
        shape_config("llama-9b")


def _check_rehearsal(res: dict) -> None:
    from sst_merge.merge.base import MERGE_METHODS

    merged = {k.split(":", 1)[1] for k in res if k.startswith("merge:")}
    assert merged == (
        {m for m in MERGE_METHODS if m not in ("sst", "safety_span")} | {"sst-kfac", "sst-diagonal", "sst-lowrank"}
    )
    assert {"full:task_arithmetic", "full:sst-kfac", "train:utility", "train:safety"} <= set(res)
    assert res["eval"]["n"] == {"refusal": 2, "over_refusal": 2, "mmlu": 2, "mmlu_cloze": 2, "task:passage_qa": 2}
    resumed = res["exp1:resumed"]
    assert resumed["models"] == ["base", "utility", "safety", "sst(alpha=1)"]
    assert resumed["cache"] == {"hits": 1, "misses": 3}  # the interrupted run's first evaluation was reused


def _rehearse(alias: str, tmp_path, **shape) -> dict:
    from sst_merge.rehearsal import rehearse

    model_dir = random_model_dir(alias, tmp_path / "model", num_layers=1, vocab_size=512, dtype="float32", **shape)
    res = rehearse(model_dir, tmp_path / "work")
    _check_rehearsal(res)
    for method in ("task_arithmetic", "sst-kfac"):  # a full output loads like the base and has its architecture
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(tmp_path / "work" / "merged" / f"{method}-full")
        assert cfg.model_type == SHAPES[alias]["model_type"] and cfg.num_hidden_layers == 1
    return res


@pytest.mark.parametrize("alias", SEED_MODELS)
def test_rehearsal_at_cut_depth(alias, tmp_path, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))  # the adapters it trains stay out of the user's
    _rehearse(alias, tmp_path, narrow=8)


@heavy
@pytest.mark.parametrize("alias", SEED_MODELS)
def test_rehearsal_at_real_width(alias, tmp_path, monkeypatch):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    _rehearse(alias, tmp_path)
