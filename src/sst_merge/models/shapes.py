"""The seed models' architectures as data: the public ``config.json`` fields that fix every shape.

Each entry holds the fields of the model's published ``config.json`` that decide tensor shapes, attention layout and
position encoding (hidden size, head counts with GQA, intermediate size, vocabulary, rope settings, sliding window,
biases). They serve two purposes:

* :func:`shape_config` builds a transformers config from them, optionally cut to a few layers and a smaller
  vocabulary, so a randomly initialised model with the real per-layer shapes runs every code path offline
  (tests, ``bench/shapes.py``);
* :class:`Shape` / :func:`model_shape` give :mod:`sst_merge.plan` what it estimates memory and time from, for the
  aliases of :data:`sst_merge.models.ALIASES` without a hub round-trip.

Sources (checked against the public model cards / ``config.json``): Mistral-7B-v0.1, Llama-3.1-8B(-Instruct),
Qwen2.5-14B(-Instruct); the embedded models' against their converted ``config.json``. The ``mistral-7b`` alias loads Mistral-7B-Instruct-v0.2, whose shapes are the same; v0.2
drops the sliding window and uses rope θ 1e6 — that changes neither weights nor memory at the lengths used here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sst_merge.errors import ConfigError
from sst_merge.models.bytelevel import tiny_tokenizer
from sst_merge.models.loading import DTYPES

#: alias → ``config.json`` fields (shape-relevant subset). ``source`` names the checkpoint they come from.
SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": {
        "source": "mistralai/Mistral-7B-v0.1",
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "llama-3.1-8b": {
        "source": "meta-llama/Llama-3.1-8B-Instruct",
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
    "qwen-2.5-14b": {
        "source": "Qwen/Qwen2.5-14B-Instruct",
        "model_type": "qwen2",  # Qwen2 attention: q/k/v projections carry biases, o_proj does not
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 152064,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "smollm2-135m": {
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "qwen2.5-coder-0.5b": {
        # as converted from its GGUF (sst_merge.models.embedded): the file stores the output matrix apart from the
        # embedding, so the converted model is untied, unlike the original checkpoint
        "source": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}

#: The three seed architectures the project was written for (SmolLM2 is the embedded default, Qwen2.5-Coder-0.5B
#: the opt-in embedded model).
SEED_MODELS = ("mistral-7b", "llama-3.1-8b", "qwen-2.5-14b")


def shape_fields(alias: str) -> dict[str, Any]:
    """Return a copy of the ``config.json`` fields of ``alias`` (without ``source``)."""
    if alias not in SHAPES:
        raise ConfigError(f"no shapes for model {alias!r}; known: {', '.join(SHAPES)}")
    fields = copy.deepcopy(SHAPES[alias])
    fields.pop("source")
    return fields


def shape_config(
    alias: str,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    narrow: int = 1,
    **overrides: Any,
) -> Any:
    """Return a transformers config of ``alias`` with the real per-layer shapes, cut to ``num_layers`` layers.

    Args:
        alias: a key of :data:`SHAPES`.
        num_layers: keep this many decoder layers (default: all).
        vocab_size: a smaller vocabulary (the embedding and output head shrink; every layer keeps its shapes).
        narrow: divide the hidden size, the intermediate size and both head counts by this factor (head dim, the
            query/key-value head ratio, biases, rope and window settings unchanged): the same architecture at a
            width the test-suite runs in seconds. 1 keeps the real shapes.
        overrides: other config fields (``pad_token_id``, ``eos_token_id`` …).
    """
    # deferred: transformers (seconds to import); shapes of the known models do without it
    from transformers import AutoConfig

    fields = shape_fields(alias)
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    if narrow != 1:
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
            if fields[key] % narrow:
                raise ConfigError(f"narrow={narrow} does not divide {key}={fields[key]} of {alias}")
            fields[key] //= narrow
    fields.update(overrides)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def random_model_dir(
    alias: str,
    out_dir: str | Path,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    dtype: str = "bfloat16",
    tokenizer: Any = None,
    seed: int = 0,
    narrow: int = 1,
) -> Path:
    """Save a randomly initialised model of ``alias`` (cut as :func:`shape_config`) and a tokenizer to ``out_dir``.

    Under CUDA the weights are initialised on the GPU (a full-depth 8B model initialises in seconds there).

    ``tokenizer`` defaults to the byte-level tokenizer of :mod:`sst_merge.models.bytelevel` (260 tokens, fits every
    vocabulary); the vocabulary defaults to the real one. The result is a plain model directory that ``--model``
    accepts (weights in ``dtype``, safetensors).
    """
    # deferred: transformers (seconds to import); shapes of the known models do without it
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    vocab = vocab_size or SHAPES[alias]["vocab_size"]
    if len(tokenizer) > vocab:
        raise ConfigError(f"tokenizer has {len(tokenizer)} tokens, more than the vocabulary {vocab}; raise vocab_size")
    cfg = shape_config(
        alias,
        num_layers,
        vocab,
        narrow,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype])
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- what the planner needs of a model (sst_merge.plan) -------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: Any) -> Shape:
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        )

    def modules(self) -> dict[str, tuple[int, int]]:
        """Linear modules of one layer: name → (out, in)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (q, h),
            "k_proj": (kv, h),
            "v_proj": (kv, h),
            "o_proj": (h, q),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }

    def layer_params(self) -> int:
        m = self.modules()
        bias = (m["q_proj"][0] + 2 * m["k_proj"][0]) if self.qkv_bias else 0
        return sum(o * i for o, i in m.values()) + bias + 2 * self.hidden  # + two RMSNorm weights

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden


def model_shape(model: str) -> Shape:
    """Return the shapes of ``model`` (alias, local directory or hub id) from its config only — never its weights."""
    if model in SHAPES:
        return Shape.from_config(shape_config(model))
    from transformers import AutoConfig  # deferred: transformers is heavy, and an alias needs none of it

    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model {model}: directory has no config.json; pass a Hugging Face model directory")
    try:
        return Shape.from_config(AutoConfig.from_pretrained(str(p) if p.is_dir() else model))
    except OSError as e:
        raise ConfigError(
            f"model {model}: cannot read its config.json ({e.__class__.__name__}); pass a local model directory"
        ) from e
