"""Per-example gradients of linear layers from one batched forward/backward.

For a linear layer ``y_t = W a_t`` the gradient of example b's loss with respect to ``W`` is
``g_b = Σ_t δ_bt a_btᵀ`` (out×in), where ``a_bt`` is the layer's input at token t and ``δ_bt = ∂ℓ_b/∂y_bt``. Because the
examples of a batch do not interact, one backward pass of the *summed* loss gives every ``δ_bt`` at once, and the
per-example gradients are one ``einsum`` per module — no loop over examples, no ``B×`` copies of the model.

Forward hooks record ``a`` (B, T, in) and register a tensor hook on the layer output that records ``δ`` (B, T, out).
No parameter gradient is computed: every parameter is frozen during the pass and the embedding output is made the
autograd leaf, so the backward only computes activation gradients.

The loss of example b is ``ℓ_b = −log p(response_b | prompt_b) = −Σ_{t ∈ response} log p(x_t | x_<t)``: a sum over the
response tokens only (prompt and padding tokens have no loss term). Batches are right-padded, so positions start at 0
in every row, and padding never influences a real token (causal attention with the padding mask); the captured
inputs and output gradients are multiplied by the attention mask anyway, so padding contributes exactly zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sst_merge.fisher.data import Batch


class FisherError(RuntimeError):
    """The Fisher estimation failed (non-finite loss or gradients, a hook that never fired, ...)."""


def response_nll(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Return ``Σ_b −log p(response_b | prompt_b)`` (a scalar): logits at t predict token t+1, response targets only."""
    target_mask = batch.response_mask[:, 1:].bool().to(logits.device)  # (B, T-1)
    picked = logits[:, :-1][target_mask]  # (n_response_tokens, V)
    targets = batch.input_ids[:, 1:].to(logits.device)[target_mask]
    return F.cross_entropy(picked.float(), targets, reduction="sum")


#: Architectures whose logits are exactly ``lm_head(final hidden state)`` (no soft-capping or scaling after the head),
#: so the head can be applied to the response positions only. Others run the model's own forward.
PLAIN_HEAD_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral", "mixtral", "phi3", "olmo", "olmo2", "smollm3"})


def plain_head(model: nn.Module) -> bool:
    """Whether :func:`batch_nll` may apply the output head to the response positions only."""
    cfg = getattr(model, "config", None)
    return (
        getattr(cfg, "model_type", None) in PLAIN_HEAD_TYPES
        and getattr(cfg, "final_logit_softcapping", None) is None
        and hasattr(model, "get_decoder")
        and model.get_output_embeddings() is not None
    )


def batch_nll(model: nn.Module, batch: Batch, head_on_response_only: bool = True) -> torch.Tensor:
    """Return ``Σ_b −log p(response_b | prompt_b)`` for a right-padded batch.

    For plain-head architectures (and ``head_on_response_only``) the output head runs on the response positions
    only: the prompt positions' logits (B·T·V floats, most of a batch for long prompts and large vocabularies) are
    never formed; the value is the same.
    """
    device = model.get_input_embeddings().weight.device
    ids, att = batch.input_ids.to(device), batch.attention_mask.to(device)
    if not (head_on_response_only and plain_head(model)):
        return response_nll(model(input_ids=ids, attention_mask=att, use_cache=False).logits, batch)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=att, use_cache=False).last_hidden_state  # (B, T, H)
    target_mask = batch.response_mask[:, 1:].bool().to(device)  # (B, T-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][target_mask])  # (n_response_tokens, V)
    return F.cross_entropy(logits.float(), ids[:, 1:][target_mask], reduction="sum")


class Capture:
    """Hooks that record each target module's input ``a`` and output gradient ``δ`` for one forward/backward."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in self.inputs:
                raise FisherError(f"module {name} ran twice in one forward; shared modules are not supported")
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: self.grads.__setitem__(name, g.detach()))

        return hook

    @staticmethod
    def _leaf_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # The embedding output becomes the autograd leaf: activation gradients flow, no parameter gradient is built.
        return output.detach().requires_grad_(True)

    def __enter__(self) -> Capture:
        self._handles.append(self.model.get_input_embeddings().register_forward_hook(self._leaf_hook))
        for name, mod in self.modules.items():
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Set ``requires_grad=False`` on every parameter and eval mode; restore both afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def capture_batch(model: nn.Module, cap: Capture, batch: Batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run one forward and one backward of the summed response loss; return ``{module: (a, δ)}``, padding zeroed.

    ``a`` is (B, T, in) and ``δ`` is (B, T, out), in the model's dtype and device. Raises :class:`FisherError` on a
    non-finite loss or a module that received no gradient.
    """
    cap.clear()
    # a hooked output head must see (B, T, H) inputs, so it then runs on every position
    head_hooked = any(mod is model.get_output_embeddings() for mod in cap.modules.values())
    with torch.enable_grad():
        loss = batch_nll(model, batch, head_on_response_only=not head_hooked)
        if not torch.isfinite(loss):
            raise FisherError(f"the Fisher loss is {loss.item()} (not finite); check the model weights and the data")
        loss.backward()
    result = {}
    for name in cap.modules:
        if name not in cap.inputs or name not in cap.grads:
            raise FisherError(f"module {name} received no gradient; is it on the path from the input to the loss?")
        mask = batch.attention_mask.to(cap.inputs[name].device, cap.inputs[name].dtype)[:, :, None]
        result[name] = (cap.inputs[name] * mask, cap.grads[name] * mask)
    cap.clear()
    return result


def per_example_grads(a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Return ``g_b = Σ_t δ_bt a_btᵀ`` for every example: (B, out, in), fp32."""
    return torch.einsum("bto,bti->boi", delta.float(), a.float())
