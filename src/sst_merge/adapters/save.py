"""Write a PEFT LoRA adapter directory from per-module factors (scale folded into the factors)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from sst_merge.adapters.lora import CONFIG_NAME, SAFETENSORS_NAME
from sst_merge.io import atomic_write_json


def save_lora(
    out_dir: str | Path,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    base_model: str | None,
    embedding_modules: set[str] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Save ``factors`` (module → (A, B), ``ΔW = B @ A``) as a PEFT LoRA adapter; return its config.

    Every module gets ``lora_alpha = r`` (scale 1), so the saved product is exactly ``B @ A``. The most common rank
    is the adapter's ``r``; modules with another rank get ``rank_pattern``/``alpha_pattern`` entries keyed by their
    full (regex-escaped) name. ``target_modules`` lists the full module names, so PEFT wraps exactly these modules.
    Embedding modules are stored the way PEFT stores them (``lora_embedding_A`` (r, vocab), ``lora_embedding_B``
    (dim, r), ``ΔW = (B @ A)ᵀ``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embedding_modules = embedding_modules or set()
    ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    tensors: dict[str, torch.Tensor] = {}
    for module, (A, B) in factors.items():
        prefix = f"base_model.model.{module}"
        if module in embedding_modules:
            tensors[f"{prefix}.lora_embedding_A"] = B.T.to(dtype).contiguous()  # (r, vocab)
            tensors[f"{prefix}.lora_embedding_B"] = A.T.to(dtype).contiguous()  # (dim, r)
        else:
            tensors[f"{prefix}.lora_A.weight"] = A.to(dtype).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = B.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(factors),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    save_file(tensors, str(out_dir / SAFETENSORS_NAME), metadata={"format": "pt"})
    atomic_write_json(out_dir / CONFIG_NAME, config)
    return config
