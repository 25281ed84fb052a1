"""LoRA adapter training (``sst-merge train``): the loop in :mod:`.loop`, files and cache in :mod:`.adapter`."""

from sst_merge.train.adapter import DEFAULT_STEPS, TrainConfig, adapter_cache_path, train_adapter
from sst_merge.train.loop import encode_example, train_loop

__all__ = ["DEFAULT_STEPS", "TrainConfig", "adapter_cache_path", "encode_example", "train_adapter", "train_loop"]
