"""Fisher statistics of target linear modules, per approximation, from batched per-example gradients.

What is stored per module (``out×in`` weight, N examples):

* ``diagonal``: ``{"diag": E_b[g_b²]}`` (out×in) — the diagonal of the empirical Fisher of the sampled responses;
* ``kfac``: ``{"A": Σ_{b,t} a aᵀ / n_tokens, "G": Σ_{b,t} δ δᵀ / N}`` — ``A`` averages over every non-padding token
  (prompt and response: prompt positions carry activation gradients because response tokens attend to them), ``G``
  sums over the tokens of an example and averages over examples, so ``A ⊗ G`` has the scale of the per-example
  Fisher ``E_b[vec g_b vec g_bᵀ]`` when token contributions are independent;
* ``lowrank``: ``{"rows": G}`` (N×p, row b = the row-major flattened ``g_b``), so ``F = GᵀG/N`` exactly;
* ``dense``: ``{"F": E_b[vec g_b vec g_bᵀ]}`` (p×p; small modules only).

Each approximation is a registered class (:mod:`sst_merge.fisher.approximation`); this module only drives them.

The pass runs in eval mode with every parameter frozen; the model is not changed (see :func:`sst_merge.models.deltas.applied_deltas` for the
pre-merge point, which restores the original weights afterwards).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from sst_merge import distributed as ddp
from sst_merge.distributed import shard_indices
from sst_merge.fisher.data import Example, collate
from sst_merge.fisher.grads import Capture, FisherError, capture_batch, frozen, per_example_grads
from sst_merge.fisher.solve import get_approximation
from sst_merge.tensors import all_finite

log = logging.getLogger(__name__)


def target_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """Look up the linear modules by name; raise ``FisherError`` naming a missing or non-linear one."""
    out = {}
    for name in names:
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise FisherError(f"module {name} is not in the model; do the adapters belong to this base model?") from e
        if not isinstance(mod, nn.Linear):
            raise FisherError(f"module {name} is a {type(mod).__name__}; SST-Merge projects linear layers only")
        out[name] = mod
    return out


class _Accumulator:
    """Sums of one approximation's statistics over every target module (the registry says what is stored).

    The statistics live on the device of the gradients they sum (a GPU model's rows, factors and sums stay on the
    GPU, with no copy per batch) and are copied to host memory once, by :meth:`finish`.
    """

    def __init__(self, approx: str, modules: dict[str, nn.Linear], n: int) -> None:
        self.kind = get_approximation(approx)
        self.n = n
        self.n_tokens = 0
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        for name, mod in modules.items():
            with torch.device(_home(mod.weight)):  # allocated where the module's gradients will be
                self.stats[name] = self.kind.init(*mod.weight.shape, n)
        self._finite: list[tuple[str, torch.Tensor]] = []

    def update(self, name: str, a: torch.Tensor, delta: torch.Tensor, index: list[int]) -> None:
        stats = self.stats[name]
        if any(t.device != a.device for t in stats.values()):  # once: a module computing elsewhere (offloaded)
            stats.update({key: t.to(a.device) for key, t in stats.items()})
        g = None
        if self.kind.per_example:
            g = per_example_grads(a, delta)  # (B, out, in)
            self._finite.append((name, all_finite(g)))
        self.kind.update(stats, a, delta, g, index)

    def check_batch(self) -> None:
        """Raise if a per-example gradient of this batch was not finite (one device-to-host sync per batch)."""
        names, flags = zip(*self._finite, strict=True) if self._finite else ((), ())
        self._finite.clear()
        if flags and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
            bad = next(n for n, f in zip(names, flags, strict=True) if not bool(f))
            raise FisherError(f"module {bad}: per-example gradients contain NaN or Inf")

    def finish(self) -> dict[str, dict[str, torch.Tensor]]:
        for name, s in self.stats.items():
            self.kind.finish(s, self.n, self.n_tokens)
            for key, t in s.items():
                if not all_finite(t):
                    raise FisherError(f"module {name}: Fisher statistic {key} contains NaN or Inf")
                s[key] = t.cpu()  # the one copy to host memory
        return self.stats


def _home(weight: torch.Tensor) -> torch.device:
    """Where a module's statistics start: its weight's device (host memory for a weight not materialised)."""
    return weight.device if weight.device.type != "meta" else torch.device("cpu")


def estimate_fisher(
    model: nn.Module,
    modules: list[str],
    examples: list[Example],
    approx: str,
    pad_id: int,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "Fisher",
) -> dict[str, dict[str, torch.Tensor]]:
    """Return the Fisher statistics of ``approx`` for each module over ``examples`` (one backward per batch).

    Examples are batched in order of length (less padding); statistics do not depend on the order, and ``lowrank``
    rows are stored in the examples' original order.

    Under ``torch.distributed`` (initialised by the caller, e.g. ``torchrun`` or ``accelerate launch``) every rank
    passes the same ``examples``, processes the ones with ``index % world_size == rank``, and the sums are
    all-reduced, so every rank returns the statistics of all examples.
    """
    if not examples:
        raise FisherError("no examples for the Fisher estimate")
    mods = target_modules(model, modules)
    acc = _Accumulator(approx, mods, len(examples))
    mine = shard_indices(len(examples), ddp.rank(), ddp.world_size()) if ddp.active() else range(len(examples))
    order = sorted(mine, key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))

    def accumulate() -> None:
        with frozen(model), Capture(model, mods) as cap:
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not show_progress, leave=False):
                idx = order[start : start + batch_size]
                batch = collate([examples[i] for i in idx], pad_id)
                acc.n_tokens += int(batch.attention_mask.sum())
                for name, (a, delta) in capture_batch(model, cap, batch).items():
                    acc.update(name, a, delta, idx)
                acc.check_batch()

    # A rank that fails here tells the others before the all-reduce, so no rank waits on it forever.
    ddp.gather_checked(desc, accumulate)
    if ddp.active():
        _all_reduce(acc)
    return acc.finish()


def _all_reduce(acc: _Accumulator) -> None:
    """Sum every statistic (and the token count) over ranks; ``lowrank`` rows are disjoint, so the sum gathers them."""
    acc.stats = ddp.all_reduce_tensors(acc.stats)
    n_tok = ddp.all_reduce_tensors({"n": torch.tensor([acc.n_tokens], dtype=torch.float64)})["n"]
    acc.n_tokens = int(n_tok.item())
