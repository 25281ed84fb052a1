"""Test-suite guards: no network, offline hub, deterministic threads; shared tiny-model fixtures."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _NoNetwork(socket.socket):
    def connect(self, address):  # noqa: D401
        if isinstance(address, tuple) and address and address[0] in ("127.0.0.1", "localhost", "::1"):
            return super().connect(address)
        if self.family == socket.AF_UNIX:
            return super().connect(address)
        raise RuntimeError(f"tests must not touch the network (tried to connect to {address!r})")


socket.socket = _NoNetwork  # type: ignore[misc]

# The tiny test models are latency-bound: one thread avoids oversubscription on a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tok():
    from sst_merge.testing import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture()
def tiny_llama():
    from sst_merge.testing import tiny_model

    return tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved as a local HF model directory (safetensors)."""
    from sst_merge.testing import tiny_model, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """The tiny Qwen2 twin + its tokenizer (Qwen's chat template, EOS and padding) saved as a local HF model
    directory: what a test runs in place of ``qwen2.5-coder-0.5b``."""
    from sst_merge.testing import tiny_qwen

    d = tmp_path_factory.mktemp("tiny-qwen")
    model, tok = tiny_qwen()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
