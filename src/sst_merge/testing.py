"""A tiny random-initialised causal LM and a byte-level tokenizer, built in-process.

Used by the test-suite (and handy for examples): no files, no network, milliseconds per forward. The model has the
module names of a real Llama / Qwen2 (``model.layers.N.self_attn.q_proj`` ...), so LoRA adapters, ΔW maps and
Fisher statistics built on it have the same structure as on SmolLM2.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from sst_merge.models.bytelevel import tiny_tokenizer  # noqa: F401  (part of this module's test kit)


def tiny_model(
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    vocab_size: int | None = None,
) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """Return a random-initialised tiny Llama or Qwen2 causal LM in eval mode, matching :func:`tiny_tokenizer`."""
    tok = tiny_tokenizer()
    kwargs = dict(
        vocab_size=vocab_size or len(tok),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        if arch == "llama":
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
        elif arch == "qwen2":
            model = Qwen2ForCausalLM(Qwen2Config(**kwargs))
        else:
            raise ValueError(f"unknown tiny architecture {arch!r}; use 'llama' or 'qwen2'")
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


#: Qwen2.5-Instruct's default system prompt, which its chat template writes when a conversation has none.
QWEN_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

#: What Qwen2.5-Instruct's chat template writes for plain system/user/assistant turns (no tools): a default system
#: turn first when the conversation has none, then ChatML. ``tests/test_qwen_model.py`` checks it against the real
#: template where the converted ``qwen2.5-coder-0.5b`` is in the cache.
QWEN_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + QWEN_SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Return :func:`tiny_tokenizer` with Qwen2.5-Instruct's conventions: its chat template (a default system turn),
    EOS ``<|im_end|>`` and padding ``<|endoftext|>``."""
    tok = tiny_tokenizer()
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def tiny_qwen(
    seed: int = 0, hidden_size: int = 64, num_layers: int = 2
) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Return a tiny random-initialised Qwen2 (q/k/v biases, 4 query heads sharing 2 key-value heads) and
    :func:`tiny_qwen_tokenizer`, its padding id set in the model's configs: the twin of ``qwen2.5-coder-0.5b``."""
    tok = tiny_qwen_tokenizer()
    model = tiny_model("qwen2", hidden_size, num_layers, seed)
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id = tok.pad_token_id
    return model, tok


LINEAR_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_lora(
    model: torch.nn.Module,
    out_dir: str,
    r: int = 4,
    lora_alpha: int = 8,
    target_modules: list[str] | None = None,
    seed: int = 0,
    std: float = 0.05,
    use_rslora: bool = False,
    base_model_name_or_path: str = "tiny-llama",
) -> str:
    """Save a PEFT LoRA adapter with random (non-zero) A and B factors for ``model`` to ``out_dir``.

    The model itself is not modified (a deep copy is wrapped).
    """
    # deferred: peft (seconds to import); only tests that build an adapter need it
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=target_modules or ["q_proj", "v_proj"],
        lora_dropout=0.0,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    peft_model.save_pretrained(out_dir)
    return out_dir


class ReplyLM(torch.nn.Module):
    """A stub generating model whose answers are known: ``reply`` (then EOS) to every prompt.

    ``reply`` is a fixed text, or a function of the decoded input row (chat template and padding included) that
    returns the text — a model that refuses exactly the prompts a test marks. Like ``generate`` it stops after
    ``max_new_tokens`` and pads shorter answers with the pad token; it has no weights worth the name.
    """

    def __init__(self, tok: PreTrainedTokenizerFast, reply: str | Callable[[str], str]) -> None:
        super().__init__()
        self.tok = tok
        self.reply = reply
        self.emb = torch.nn.Embedding(1, 1)  # model_device() reads the input embeddings' device
        self.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id)
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.emb

    def forward(self, input_ids, attention_mask=None, logits_to_keep: int = 0, **kwargs) -> SimpleNamespace:
        """Uniform next-token logits (zeros): every model built on this stub scores any text alike, so the drift
        between two of them is 0 (log-likelihoods are tested on real tiny models)."""
        keep = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=torch.zeros(input_ids.shape[0], keep, len(self.tok)))  # (B, keep, V)

    def reply_to(self, text: str) -> str:
        """The answer to one decoded input row."""
        return self.reply if isinstance(self.reply, str) else self.reply(text)

    def generate(self, input_ids, attention_mask=None, max_new_tokens=64, pad_token_id=None, **kwargs):
        rows = []
        for ids in input_ids:
            text = self.reply_to(self.tok.decode(ids))
            rows.append((self.tok.encode(text, add_special_tokens=False) + [self.tok.eos_token_id])[:max_new_tokens])
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id if pad_token_id is None else pad_token_id
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
        return torch.cat([input_ids, new], dim=1)


class DeltaReplyLM(ReplyLM):
    """A scripted model whose answers depend on the ΔW applied to its weights: merges behave as a test says.

    It carries the layers of a tiny Llama (``model.layers.N.self_attn.q_proj`` ...), so adapters made with
    :func:`random_lora` on :func:`tiny_model` can be added to its weights and removed again. Before answering it
    measures how much of each named ΔW map in ``directions`` its weights hold now — the least-squares coefficients
    ``c`` of ``W − W₀ ≈ Σ cᵢ Dᵢ`` (exact when the applied ΔW is a linear combination of the maps, as task
    arithmetic, linear and SST with ``k: all`` produce) — and calls ``reply(text, c)`` with ``c`` as
    ``{name: coefficient}``. A test can then script, say, "refuses more harmful prompts the more safety ΔW it
    holds" and compute every experiment number by hand.
    """

    def __init__(
        self,
        tok: PreTrainedTokenizerFast,
        reply: Callable[[str, dict[str, float]], str],
        directions: dict[str, dict[str, torch.Tensor]],
        seed: int = 0,
    ) -> None:
        super().__init__(tok, "")
        self.model = tiny_model(seed=seed).model  # only the weights the ΔW is added to; never run
        self.script = reply
        self.names = list(directions)
        self.modules = sorted({m for d in directions.values() for m in d})
        self._w0 = {n: p.detach().clone() for n, p in self.model.named_parameters(prefix="model")}
        self._basis = torch.stack([self._flat(d) for d in directions.values()], dim=1)  # (P, n_directions)

    def _flat(self, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        for m in self.modules:
            w0 = self._w0[f"{m}.weight"]
            parts.append((deltas[m] if m in deltas else torch.zeros_like(w0)).double().flatten())
        return torch.cat(parts)

    def coefficients(self) -> dict[str, float]:
        """How much of each direction the weights hold now (least squares over the directions' modules)."""
        params = dict(self.model.named_parameters(prefix="model"))
        now = {m: params[f"{m}.weight"].detach().double() - self._w0[f"{m}.weight"].double() for m in self.modules}
        c = torch.linalg.lstsq(self._basis, self._flat(now).unsqueeze(1)).solution.squeeze(1)
        return {n: float(v) for n, v in zip(self.names, c, strict=True)}

    def generate(self, input_ids, attention_mask=None, max_new_tokens=64, pad_token_id=None, **kwargs):
        c = self.coefficients()
        self.reply = lambda text: self.script(text, c)
        return super().generate(input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs)


class CountingLoader:
    """A ``load_model`` for merge tests that counts its calls: each returns a fresh tiny model and the tokenizer.

    Args:
        arch: the tiny model's architecture (:func:`tiny_model`).
        nan: fill layer 0's ``q_proj`` weight with NaN (a model whose Fisher pass must fail).
    """

    def __init__(self, arch: str = "llama", nan: bool = False) -> None:
        self.calls = 0
        self.arch = arch
        self.nan = nan

    def __call__(self):
        self.calls += 1
        model = tiny_model(self.arch)
        if self.nan:
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
        return model, tiny_tokenizer()
