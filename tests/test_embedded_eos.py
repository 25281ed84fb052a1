"""The embedded model's end-of-turn token is pinned at conversion, whatever the transformers version reads from GGUF."""

import pytest

from sst_merge.errors import ConfigError
from sst_merge.models.embedded import EMBEDDED, pin_end_of_turn
from sst_merge.testing import tiny_model, tiny_tokenizer


def test_pin_end_of_turn_sets_tokenizer_config_and_generation_config():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    # what an older transformers reads from the GGUF: the document end as EOS
    tok.eos_token = "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|endoftext|>")
    pin_end_of_turn(model, tok, "<|im_end|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == im_end
    assert model.config.eos_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_pin_end_of_turn_refuses_a_token_the_vocabulary_lacks():
    tok = tiny_tokenizer()
    with pytest.raises(ConfigError, match="no '<\\|eot_id\\|>' token"):
        pin_end_of_turn(tiny_model(vocab_size=len(tok)), tok, "<|eot_id|>")


def test_smollm2_end_of_turn_is_its_chat_templates():
    # SmolLM2-Instruct's chat template closes every turn with <|im_end|>.
    assert EMBEDDED["smollm2-135m"].end_of_turn == "<|im_end|>"
