"""SST-Merge: merge LoRA adapters for safety without losing utility, and measure the Safety Tax."""

__version__ = "0.1.0"
