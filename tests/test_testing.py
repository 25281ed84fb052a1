import socket

import pytest
import torch


def test_tiny_tokenizer_roundtrip_and_chat_template(tiny_tok):
    text = "Héllo, wörld!"
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # byte-level: one token per byte
    assert tiny_tok.decode(ids) == text
    chat = tiny_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_forward_and_generate(tiny_llama, tiny_tok):
    batch = tiny_tok(["ab", "abcd"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = tiny_llama(**batch)
    assert out.logits.shape == (2, 4, len(tiny_tok))
    gen = tiny_llama.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape == (2, 7)


def test_network_is_blocked():
    with pytest.raises(RuntimeError, match="network"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)
