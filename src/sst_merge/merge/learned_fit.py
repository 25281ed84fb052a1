"""The fit of learned merge coefficients (:mod:`sst_merge.merge.learned`): LoRA hooks, the objective, Adam.

The base model stays frozen. Each target linear module gets a forward hook that adds the merged LoRA update through
the adapters' factors, ``λ Σᵢ c_{i,g} sᵢ (x Aᵢᵀ) Bᵢᵀ`` (two thin GEMMs, never a full ΔW), so the only parameters
with a gradient are the coefficients ``c`` (adapters × groups). The objective is a weighted sum of terms, each the
mean next-token NLL over its examples' response tokens (:func:`sst_merge.train.loop.token_nll`, the training rule).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.errors import SSTMergeError
from sst_merge.fisher.grads import frozen
from sst_merge.models.tokenize import Example, collate
from sst_merge.train.loop import labels_of, token_nll

log = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def coefficient_groups(modules: list[str], granularity: str) -> tuple[dict[str, int], list[str]]:
    """Map each module to its coefficient group; return ``(module → group index, group names)``.

    ``module``: one group per module. ``layer``: one group per decoder layer (``…layers.N.…``); a module outside
    every layer (``lm_head``) is a group of its own.
    """
    names: list[str] = []
    index: dict[str, int] = {}
    for m in modules:
        hit = _LAYER.search(m) if granularity == "layer" else None
        name = f"layers.{hit.group(1)}" if hit else m
        if name not in names:
            names.append(name)
        index[m] = names.index(name)
    return index, names


@dataclass(frozen=True)
class ModuleFactors:
    """Every adapter's LoRA factors of one module, stacked so one pair of GEMMs applies them all.

    Attributes:
        A: (Σr, in) the adapters' A factors, one above the other.
        B: (out, Σr) the adapters' ``scale · B`` factors, side by side.
        ranks: each adapter's rank here (its share of Σr).
        group: the module's coefficient group.
    """

    A: torch.Tensor
    B: torch.Tensor
    ranks: tuple[int, ...]
    group: int


def module_factors(adapters: list[LoraAdapter], groups: dict[str, int]) -> dict[str, ModuleFactors]:
    """Stack the adapters' fp32 factors per module (every adapter must target every module of ``groups``)."""
    out = {}
    for m, g in groups.items():
        pairs = [a.factors[m] for a in adapters]
        out[m] = ModuleFactors(
            A=torch.cat([A.float() for A, _ in pairs]),
            B=torch.cat([a.scale(m) * B.float() for a, (_, B) in zip(adapters, pairs, strict=True)], dim=1),
            ranks=tuple(A.shape[0] for A, _ in pairs),
            group=g,
        )
    return out


@contextlib.contextmanager
def coefficient_hooks(
    model: nn.Module, factors: dict[str, ModuleFactors], coeffs: torch.Tensor, lam: float
) -> Iterator[None]:
    """Add ``λ Σᵢ c[i, g] sᵢ (x Aᵢᵀ) Bᵢᵀ`` to each target module's output while the block runs (fp32 inside).

    ``coeffs`` (adapters × groups) is read at every forward, so an optimiser may update it in place between them.
    """
    handles = []
    try:
        for name, f in factors.items():
            mod = model.get_submodule(name)
            dev = mod.weight.device
            A, B = f.A.to(dev), f.B.to(dev)
            sizes = torch.tensor(f.ranks, device=dev)

            def hook(_mod, inputs, output, A=A, B=B, sizes=sizes, g=f.group):
                scale = lam * coeffs[:, g].to(device=A.device, dtype=torch.float32).repeat_interleave(sizes)  # (Σr,)
                h = inputs[0].float() @ A.T  # (B, T, Σr)
                return output + ((h * scale) @ B.T).to(output.dtype)  # (B, T, out)

            handles.append(mod.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def objective(
    model: nn.Module, examples: list[Example], terms: list[int], weights: list[float], pad_id: int
) -> tuple[torch.Tensor, list[float | None]]:
    """Return ``Σ_t w_t · mean response-token NLL of term t`` over one batch, and each term's mean (None if absent).

    Args:
        examples: the batch (any mix of terms).
        terms: each example's term index.
        weights: each term's weight.
    """
    batch = collate(examples, pad_id)
    dev = model.get_input_embeddings().weight.device
    logits = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev)).logits
    nll, mask = token_nll(logits, labels_of(batch).to(dev))  # (B, T-1) each
    row_sum, row_n = (nll * mask).sum(-1), mask.sum(-1)  # (B,)
    term_of = torch.tensor(terms, device=dev)
    total = logits.new_zeros((), dtype=torch.float32)
    means: list[float | None] = []
    for t, w in enumerate(weights):
        rows = term_of == t
        n = row_n[rows].sum()
        if not bool(rows.any()) or float(n) == 0:
            means.append(None)
            continue
        mean = row_sum[rows].sum() / n
        total = total + w * mean
        means.append(float(mean.detach()))
    return total, means


@dataclass
class FitSettings:
    """How the coefficients are fitted (see :class:`sst_merge.merge.learned.LearnedParams`)."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    lam: float
    clamp: tuple[float, float]
    show_progress: bool = False


@dataclass
class FitResult:
    """The fitted coefficients (adapters × groups, float64), the loss at every step and the seconds it took."""

    coeffs: torch.Tensor
    curve: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Cycler:
    """Seeded minibatches of one term: a fresh random order of its examples each time it runs out."""

    def __init__(self, n: int, gen: torch.Generator) -> None:
        self.n, self.gen, self.order = n, gen, []

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out


def fit(
    model: nn.Module,
    terms: list[tuple[str, float, list[Example]]],
    factors: dict[str, ModuleFactors],
    coeffs0: torch.Tensor,
    pad_id: int,
    s: FitSettings,
) -> FitResult:
    """Fit the coefficients with Adam, starting from ``coeffs0``; the model is frozen and left unchanged.

    Args:
        terms: ``(name, weight, examples)`` per term; each step takes ``batch_size`` examples of every term with a
            weight above 0 (one forward and backward per term; their gradients add up).
        coeffs0: (adapters × groups) starting coefficients.

    Each step: the minibatch objective, its gradient w.r.t. ``c``, one Adam step, then ``c`` projected onto
    ``[clamp]`` (AdaMerging clamps in the forward instead, which leaves a coefficient past a bound with no gradient).
    """
    gen = torch.Generator().manual_seed(s.seed)
    active = [(i, name, w, exs) for i, (name, w, exs) in enumerate(terms) if w > 0 and exs]
    cyclers = {i: _Cycler(len(exs), gen) for i, _, _, exs in active}
    coeffs = coeffs0.clone().to(torch.float64).requires_grad_(True)
    opt = torch.optim.Adam([coeffs], lr=s.lr)
    weights = [w for _, w, _ in terms]
    curve: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with frozen(model), coefficient_hooks(model, factors, coeffs, s.lam):
        for step in tqdm(range(s.steps), desc="learned coefficients", disable=not s.show_progress, leave=False):
            opt.zero_grad()
            loss, means = 0.0, {}
            for i, name, _, exs in active:  # one forward per term: a short harmful prompt is not padded to a task's
                batch = [exs[j] for j in cyclers[i].take(s.batch_size)]
                part, term_means = objective(model, batch, [i] * len(batch), weights, pad_id)
                if not torch.isfinite(part):
                    raise SSTMergeError(f"learned: the {name} term is not finite at step {step}; lower params.lr")
                part.backward()  # gradients add up over the terms: the gradient of the sum
                loss, means[name] = loss + float(part.detach()), term_means[i]
            opt.step()
            with torch.no_grad():
                coeffs.clamp_(*s.clamp)
            curve.append({"step": step, "loss": loss, **means})
            log.debug("learned step %d: loss %.4f", step, curve[-1]["loss"])
    return FitResult(coeffs.detach().clone(), curve, round(time.perf_counter() - t0, 3))
