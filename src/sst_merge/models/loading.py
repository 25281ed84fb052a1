"""Resolve a model name (alias, local directory, hub id) and load it with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sst_merge.errors import ConfigError

log = logging.getLogger(__name__)

#: Aliases of design §3. ``smollm2-135m`` is the embedded default, resolved by :mod:`sst_merge.models.embedded`.
ALIASES: dict[str, str] = {
    "smollm2-135m": "embedded:smollm2-135m",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.2",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    "qwen-2.5-14b": "Qwen/Qwen2.5-14B-Instruct",
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(name: str) -> str:
    """Return a local directory or hub id for an alias, a local path or a hub id."""
    if name in ALIASES:
        target = ALIASES[name]
        if target.startswith("embedded:"):
            from sst_merge.models import embedded

            return str(embedded.ensure_cached(target.removeprefix("embedded:")))
        return target
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"model {name}: directory has no config.json; pass a Hugging Face model directory")
        return str(p)
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id; loading it needs hub access on the user's machine
    raise ConfigError(
        f"model {name!r} is not an alias ({', '.join(ALIASES)}), an existing directory, or a hub id (owner/name)"
    )


def load_model(
    name: str,
    dtype: str = "float32",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (left padding, pad token set) in eval mode.

    Weights load from safetensors only (``use_safetensors=True``); ``trust_remote_code`` is off unless asked.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    path = resolve_model(name)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=DTYPES[dtype],
        device_map=device_map,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    return model, tok
