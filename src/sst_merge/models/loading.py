"""Resolve a model name (alias, local directory, hub id) and load it with its tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sst_merge.errors import ConfigError
from sst_merge.models.embedded import EMBEDDED, converted_dir, ensure_cached, missing_packages, provenance

log = logging.getLogger(__name__)

#: Aliases of design §3. ``smollm2-135m`` is the embedded default and ``qwen2.5-coder-0.5b`` the opt-in embedded
#: model (``scripts/setup.sh --models qwen``), both resolved by :mod:`sst_merge.models.embedded`.
ALIASES: dict[str, str] = {
    "smollm2-135m": "embedded:smollm2-135m",
    "qwen2.5-coder-0.5b": "embedded:qwen2.5-coder-0.5b",
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
            return str(ensure_cached(target.removeprefix("embedded:")))
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


def model_rows() -> list[tuple[str, str]]:
    """Return ``(alias, one line)`` per alias for ``sst-merge list``: what it loads and, for an embedded model,
    whether its packages are installed (else the command that installs them) and converted; reads no weights."""
    rows = []
    for alias, target in ALIASES.items():
        if not target.startswith("embedded:"):
            rows.append((alias, f"hub id {target} (needs hub access)"))
            continue
        name = target.removeprefix("embedded:")
        m = EMBEDDED[name]
        if missing_packages(name):
            state = f"not installed; install with: {m.install}"
        elif (converted_dir(name) / "config.json").is_file():
            state = "installed, converted"
        else:
            state = "installed, converted on first use"
        rows.append((alias, f"embedded {m.original}, GGUF {m.quantisation} de-quantised to fp32: {state}"))
    return rows


def loadable_base(name: str) -> str:
    """Return the base a plain ``from_pretrained`` opens: an alias's or a local path's absolute directory; a hub id.

    This is what a trained or merged adapter records as ``base_model_name_or_path``, so PEFT alone can load it
    here. An embedded alias gives its conversion's directory without converting (it exists once the model was
    loaded); a name that is none of these is returned as written (nothing is validated or loaded).
    """
    target = ALIASES.get(name, name)
    if target.startswith("embedded:"):
        return str(converted_dir(target.removeprefix("embedded:")).expanduser().resolve())
    p = Path(target).expanduser()
    return str(p.resolve()) if p.exists() else target


def base_identity(name: str) -> str:
    """Return one name per base model, so one base recorded as an alias, a path or another machine's path is equal.

    An embedded alias stays itself, another alias becomes its hub id. A directory ``…/models/<alias>`` of an embedded
    model is its converted copy in an sst-merge cache (this machine's or another's), so it is ``<alias>``. Another
    existing path is its absolute path; anything else (a hub id, a path not on this machine) stays as written, less
    a trailing ``/``.
    """
    if name in ALIASES:
        target = ALIASES[name]
        return name if target.startswith("embedded:") else target
    p = Path(name).expanduser()
    if p.name in EMBEDDED and p.parent.name == "models" and len(p.parts) > 2:
        return p.name
    return str(p.resolve()) if p.exists() else name.rstrip("/")


def base_provenance(name: str) -> dict[str, Any]:
    """Return what an adapter records about its base: the name given, the directory that loads, the identity and,
    for an embedded model, where its GGUF file came from."""
    identity = base_identity(name)
    embedded = provenance(identity) if identity in EMBEDDED else None
    return {"name": name, "path": loadable_base(name), "identity": identity, "embedded": embedded}


def load_model(
    name: str,
    dtype: str = "float32",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer (left padding, pad token set) in eval mode.

    Weights load from safetensors only (``use_safetensors=True``); ``trust_remote_code`` is off unless asked.
    """
    # deferred: transformers; model aliases and `sst-merge list` do without it
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
