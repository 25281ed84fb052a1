"""Read PEFT LoRA adapter directories and compute per-module ΔW in fp32.

Module names are normalised to the base model's own parameter prefix, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` → ``model.layers.0.self_attn.q_proj``; the
delta for that module is added to ``model.layers.0.self_attn.q_proj.weight``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sst_merge.errors import AdapterError
from sst_merge.io import sha256_file
from sst_merge.tensors import all_finite

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")

_LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$"
)


def normalise_module_name(key: str) -> str:
    """Strip PEFT's ``base_model.model.`` prefix and the LoRA suffix from a saved tensor name."""
    m = _LORA_KEY.match(key)
    if m:
        return m.group("module")
    return key.removeprefix("base_model.model.")


@dataclass
class LoraAdapter:
    """One PEFT LoRA adapter: its config, factors and content hash.

    Attributes:
        path: the adapter directory.
        r: LoRA rank from the config (``rank_pattern`` overrides are applied per module when present).
        lora_alpha: LoRA alpha from the config.
        use_rslora: whether the scale is ``alpha/sqrt(r)`` instead of ``alpha/r``.
        base_model: ``base_model_name_or_path`` from the config.
        target_modules: module names (normalised) that carry LoRA factors.
        factors: module → (A, B), A of shape (r, in), B of shape (out, r), as stored (dtype preserved).
        extra: non-LoRA tensors (``modules_to_save`` copies), name → tensor.
        sha256: hash of the weights file.
    """

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    base_model: str | None
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    sha256: str = ""
    embedding_modules: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: str | Path, allow_pickle: bool = False) -> LoraAdapter:
        """Load an adapter directory; raise :class:`AdapterError` with the fix on anything missing or corrupt."""
        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"adapter {path}: directory not found; pass the path of a PEFT LoRA adapter directory")
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise AdapterError(f"adapter {path}: {CONFIG_NAME} is missing; is this a PEFT adapter directory?")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"adapter {path}: {CONFIG_NAME} is not valid JSON ({e}); re-save the adapter") from e
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterError(f"adapter {path}: peft_type is {peft_type}, only LORA adapters can be merged")
        for key in ("r", "lora_alpha"):
            if key not in config:
                raise AdapterError(f"adapter {path}: {CONFIG_NAME} has no {key!r}; re-save the adapter with PEFT")
        weights_path = path / SAFETENSORS_NAME
        if weights_path.is_file():
            try:
                tensors = load_file(str(weights_path))
            except (SafetensorError, OSError, ValueError) as e:
                raise AdapterError(f"adapter {path}: {SAFETENSORS_NAME} is corrupt ({e}); re-save the adapter") from e
        else:
            pickled = [path / n for n in PICKLE_NAMES if (path / n).is_file()]
            if not pickled:
                raise AdapterError(f"adapter {path}: {SAFETENSORS_NAME} is missing; save the adapter with PEFT")
            if not allow_pickle:
                raise AdapterError(
                    f"adapter {path}: weights are a pickle checkpoint ({pickled[0].name}), which can run arbitrary "
                    "code; convert it to safetensors, or pass --allow-pickle if you trust it"
                )
            weights_path = pickled[0]
            try:
                tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for a bad pickle; report it as a bad adapter
                raise AdapterError(f"adapter {path}: {weights_path.name} could not be read ({e})") from e
        return cls._from_tensors(path, config, tensors, sha256_file(weights_path))

    @classmethod
    def _from_tensors(cls, path: Path, config: dict, tensors: dict[str, torch.Tensor], sha: str) -> LoraAdapter:
        a: dict[str, torch.Tensor] = {}
        b: dict[str, torch.Tensor] = {}
        emb: set[str] = set()
        extra: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            m = _LORA_KEY.match(key)
            if not m:
                extra[key.removeprefix("base_model.model.")] = t
                continue
            module, kind = m.group("module"), m.group("kind")
            if kind.startswith("lora_embedding"):
                emb.add(module)
            (a if kind.endswith("A") else b)[module] = t
            if not all_finite(t):
                raise AdapterError(f"adapter {path}: tensor {key} contains NaN or Inf; the adapter is corrupt")
        if set(a) != set(b):
            missing = sorted(set(a) ^ set(b))
            raise AdapterError(f"adapter {path}: LoRA A/B factors are unpaired for {missing[:3]}; re-save the adapter")
        if not a:
            raise AdapterError(f"adapter {path}: no LoRA factors found in the weights file")
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in sorted(a):
            A, B = a[module], b[module]
            if module in emb:  # PEFT stores embedding LoRA as A: (r, vocab), B: (dim, r); ΔW = (B @ A).T
                A, B = B.T.contiguous(), A.T.contiguous()  # now ΔW = B' @ A' with B' (vocab, r), A' (r, dim)
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"adapter {path}: module {module} has factor shapes A{tuple(A.shape)} B{tuple(B.shape)} "
                    "that do not multiply; only linear/embedding LoRA is supported"
                )
            factors[module] = (A, B)
        return cls(
            path=path,
            r=int(config["r"]),
            lora_alpha=float(config["lora_alpha"]),
            use_rslora=bool(config.get("use_rslora", False)),
            base_model=config.get("base_model_name_or_path"),
            config=config,
            factors=factors,
            extra=extra,
            sha256=sha,
            embedding_modules=emb,
        )

    @property
    def modules(self) -> list[str]:
        """Normalised names of the modules this adapter changes (LoRA factors only)."""
        return list(self.factors)

    def scale(self, module: str | None = None) -> float:
        """Return ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rslora) for a module."""
        r, alpha = self.r, self.lora_alpha
        if module is not None:
            r = self.factors[module][0].shape[0]
            for pattern, value in (self.config.get("alpha_pattern") or {}).items():
                if re.search(rf"(^|\.){re.escape(pattern)}$", module) or re.fullmatch(pattern, module):
                    alpha = float(value)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def delta(self, module: str) -> torch.Tensor:
        """Return ΔW = scale · B @ A for one module, fp32, shape (out, in) (embedding: (vocab, dim))."""
        A, B = self.factors[module]
        return self.scale(module) * (B.float() @ A.float())

    def deltas(self) -> dict[str, torch.Tensor]:
        """Return ΔW for every LoRA module."""
        return {m: self.delta(m) for m in self.factors}

    def check_extra(self) -> None:
        """Refuse non-LoRA tensors: ``modules_to_save`` copies and saved base layers are absolute weights, not
        deltas, and summing them over adapters would add the base several times."""
        base_copies = sorted(k for k in self.extra if ".base_layer." in k)
        if base_copies:
            raise AdapterError(
                f"adapter {self.path}: carries a copy of base layer {base_copies[0]} (PEFT save_embedding_layers), "
                "an absolute weight that may differ from the base model (resized vocabulary); re-save the adapter "
                "with save_embedding_layers=False if the vocabulary is unchanged"
            )
        if self.extra:
            names = sorted(self.extra)[:3]
            raise AdapterError(
                f"adapter {self.path}: carries full-weight copies {names} (modules_to_save); merging them would sum "
                "absolute weights. Retrain without modules_to_save, or remove those tensors from the adapter"
            )


def load_adapters(paths: list[str | Path], allow_pickle: bool = False) -> list[LoraAdapter]:
    """Load several adapters."""
    return [LoraAdapter.load(p, allow_pickle=allow_pickle) for p in paths]


@contextlib.contextmanager
def peft_quiet() -> Iterator[None]:
    """Silence the one deprecation PEFT triggers inside transformers (it asks the model the deprecated
    ``is_gradient_checkpointing``; nothing outside PEFT can ask it otherwise) while wrapping, loading or training."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module="transformers.modeling_utils",
        )
        yield
