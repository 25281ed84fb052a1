"""PEFT LoRA adapters: loading, ΔW computation, saving merged outputs."""

from sst_merge.adapters.lora import LoraAdapter, load_adapters

__all__ = ["LoraAdapter", "load_adapters"]
