"""How a prompt and a response become tokens: one rule for evaluation, Fisher statistics and training.

* **Prompt ids** — the user turn in the tokenizer's chat template with the generation prompt, encoded without added
  special tokens (the template writes them). A tokenizer without a chat template gets the raw prompt, encoded with
  its default special tokens (a BOS where it adds one), and a warning.
* **Response ids** — the response text encoded on its own without special tokens, then the EOS token (for a chat
  model its end-of-turn token) unless the response is incomplete (cut at a length cap: it must not teach the model to
  stop there). Nothing the template writes after the end-of-turn token belongs to the response: generation stops at
  EOS, and a sampled response ends there too.
* **Loss** — on the response tokens only; the prompt and the padding carry none.
* **Length** — an over-long example keeps the end of the prompt and the start of the response; the prompt keeps at
  least half of the budget when both parts are long.
* **Padding** — :func:`pad_id` (the pad token, else EOS); right padding for teacher-forced batches
  (:func:`collate`), left padding with explicit positions for generation and scoring (:func:`left_pad`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sst_merge.errors import ConfigError

log = logging.getLogger(__name__)


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return [int(i) for i in x]


def chat_text(tok: Any, prompt: str) -> str:
    """The user turn ``prompt`` wrapped in the tokenizer's chat template, ready for the assistant's answer."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    log.warning("tokenizer has no chat template; prompting with the raw text")
    return prompt


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    """Token ids of the prompt as the model sees them before its answer (:func:`chat_text`)."""
    text = chat_text(tok, prompt)
    return _ids(tok(text, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"])


def response_ids(tok: Any, response: str, complete: bool = True) -> list[int]:
    """Token ids of a response: its text, then EOS when ``complete`` (and the tokenizer has one)."""
    ids = _ids(tok(response, add_special_tokens=False)["input_ids"]) if response else []
    if complete and tok.eos_token_id is not None:
        ids.append(int(tok.eos_token_id))
    return ids


@dataclass(frozen=True)
class Example:
    """One tokenised example: the chat-formatted prompt and the response tokens that carry the loss."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def input_ids(self) -> list[int]:
        """Prompt then response, the sequence the model reads."""
        return list(self.prompt_ids + self.response_ids)


def truncate(ex: Example, max_length: int) -> Example:
    """Fit an example into ``max_length`` tokens, keeping the prompt's end and the response's start.

    The prompt keeps at least half of the budget when both parts are long; a short part leaves the rest to the other.
    """
    if len(ex.prompt_ids) + len(ex.response_ids) <= max_length:
        return ex
    n_prompt = min(len(ex.prompt_ids), max(max_length // 2, max_length - len(ex.response_ids)))
    n_resp = min(len(ex.response_ids), max_length - n_prompt)
    return Example(ex.prompt_ids[len(ex.prompt_ids) - n_prompt :], ex.response_ids[:n_resp])


def encode_example(tok: Any, prompt: str, response: str, max_length: int, complete: bool = True) -> Example:
    """Tokenise a prompt/response pair (:func:`prompt_ids`, :func:`response_ids`) and fit it into ``max_length``."""
    return truncate(Example(tuple(prompt_ids(tok, prompt)), tuple(response_ids(tok, response, complete))), max_length)


@dataclass
class Batch:
    """A right-padded batch.

    Attributes:
        input_ids: (B, T) token ids, padding filled with ``pad_id``.
        attention_mask: (B, T), 1 on real tokens.
        response_mask: (B, T), 1 on response tokens (the tokens whose log-probability is the objective).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples (positions then start at 0 for every row, as in a single-example forward)."""
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    T = max(lengths)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), T), dtype=torch.long)
    resp = torch.zeros((len(examples), T), dtype=torch.long)
    for b, e in enumerate(examples):
        n_p, n = len(e.prompt_ids), lengths[b]
        ids[b, :n] = torch.tensor(e.prompt_ids + e.response_ids, dtype=torch.long)
        att[b, :n] = 1
        resp[b, n_p:n] = 1
    return Batch(ids, att, resp)


def pad_id(tok: Any) -> int:
    """The id that fills padding: the pad token, else EOS (padding is masked out, so only its presence matters)."""
    if tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    if tok.eos_token_id is not None:
        return int(tok.eos_token_id)
    raise ConfigError("tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad token id lists into ``input_ids``, ``attention_mask`` and matching ``position_ids``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens get 0..len-1 whatever the padding
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device)}
