"""Cost laws: the bytes and seconds of each step's work, from a model's :class:`~sst_merge.models.shapes.Shape`, the
:class:`~sst_merge.plan.settings.Settings` and the machine's :class:`~sst_merge.machine.Rates`.

What depends on the Fisher approximation is the approximation's own law (``host_bytes``, ``batch_seconds``,
``gevp_seconds`` … of :class:`~sst_merge.fisher.approximation.Approximation`, each in its file): these functions look
it up by name in the registry and never branch on the name, so a new approximation plans with no edit here.
"""

from __future__ import annotations

import math

from sst_merge.errors import ConfigError
from sst_merge.fisher.solve import get_approximation
from sst_merge.machine import Rates
from sst_merge.models.shapes import Shape
from sst_merge.plan.settings import Settings

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: bytes of activations kept per token and layer for a backward, in units of the model dtype: the inputs of the
#: seven projections, the MLP's gate/up outputs and SiLU, attention outputs and norms — measured on the seed
#: architectures with ``bench/shapes.py`` (≈ 6·hidden + 4·intermediate).
ACT_HIDDEN, ACT_INTER = 6, 4
#: The Fisher pass's forward + backward (frozen weights: the backward computes input gradients only) is twice the
#: forward FLOPs at the matmul rate of its batch's row count (:meth:`Rates.matmul_at`), plus what a layer does besides
#: its matmuls (norms, rope, SiLU, softmax, the capture hooks): this many passes, at the copy bandwidth, over each
#: token's activations of every layer (``ACT_HIDDEN``·hidden + ``ACT_INTER``·intermediate elements). Fitted on ONE
#: shape, a SmolLM2-135M layer at one batch (``bench/shapes.py calibrate``), and checked on the seed models' layers
#: and other batches (``bench/shapes.py measure``).
FISHER_ACT_PASSES = 30.0
#: Python's share of a Fisher batch (the model's forward, autograd's bookkeeping, the capture hooks), seconds per
#: batch and per decoder layer, and once per pass (setting up the hooks and the statistics), whatever the shapes:
#: measured on a 64-wide model here (CPU time; 1 and 4 layers, 1 and 4 batches of 8 tokens: 1.0 ms + 0.9 ms per
#: layer per batch, 0.7–1.2 ms per pass). It dominates only tiny batches of tiny layers.
FISHER_BATCH_OVERHEAD_S, FISHER_LAYER_OVERHEAD_S, FISHER_PASS_OVERHEAD_S = 1.0e-3, 0.9e-3, 1.0e-3
#: Python's share of one generated token (``generate``'s step: logits processing, the cache, every layer's module
#: calls), seconds per token and per layer: measured on a 64-wide model here (CPU time; 1, 4 and 8 layers, 16 new
#: tokens: 0.6 ms + 0.27 ms per layer per token).
GEN_TOKEN_OVERHEAD_S, GEN_LAYER_OVERHEAD_S = 0.6e-3, 0.27e-3
#: bytes per element of TIES' fresh buffers, per adapter (``magnitude_trim``: the magnitudes, its masks and index
#: tensors, the trimmed ΔW) and per module (``sign_consensus_merge``: the elected sign, numerator, divisor, agreeing
#: entries, and the λ-scaled result). Counted with ``getrusage`` on 4096² ΔW: 34 and 20; the whole TIES call faulted
#: 41–72 bytes per element with 2–4 adapters, depending on what the allocator already held.
TIES_FRESH_BYTES = (34, 20)


def targets_of(shape: Shape, targets: list[str]) -> list[tuple[int, int]]:
    """(out, in) of every target module over all layers; raises on a name the architecture does not have."""
    mods = shape.modules()
    unknown = [t for t in targets if t not in mods]
    if unknown:
        raise ConfigError(f"target module {unknown[0]!r} is not a linear module of this model; use {', '.join(mods)}")
    return [mods[t] for t in targets] * shape.layers


def fisher_host_bytes(shape: Shape, s: Settings, fisher: str | None = None, n: int | None = None) -> float:
    """Host bytes of both Fisher statistics at the end of the utility pass (F_s done, F_u accumulating)."""
    fisher, n = fisher or s.fisher, n or s.n_samples
    return get_approximation(fisher).host_bytes(targets_of(shape, s.targets), n)


def fisher_memory(shape: Shape, s: Settings) -> tuple[float, float]:
    """Device and host bytes of a Fisher pass (``s.fisher`` over ``s.n_samples``) besides the weights.

    Device: activations of a backward, the module inputs/output-gradients captured for every target module, the
    per-example gradients of the largest module (and ``diagonal``'s sum of them). Host: both statistics, the fp32 ΔW
    map and the fp32 copy ``finish()`` makes of the largest fp64 sum while the sum is alive.
    """
    b = BYTES[s.dtype]
    mods = targets_of(shape, s.targets)
    ftok = s.fisher_batch * s.fisher_length
    act = ftok * shape.layers * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * b
    act += ftok * shape.vocab * 4 * 3
    captured = ftok * sum(o + i for o, i in mods) * b
    approx = get_approximation(s.fisher)
    per_ex = approx.per_example_bytes(mods, s.fisher_batch)
    largest = approx.finish_copy_elements(mods)
    deltas = sum(o * i for o, i in mods) * 4
    return act + captured + per_ex, fisher_host_bytes(shape, s) + deltas + largest * 4


def forward_flops(shape: Shape, batch: int, length: int, response: int | None = None) -> float:
    """FLOPs of one forward of a right-padded batch (``batch`` × ``length`` tokens) in the Fisher pass.

    Every layer's linear modules (2 FLOPs per weight and token), attention scores and values (2 · 2 · T² · q-width
    per example and layer, causal but computed in full), and the output head on the ``response`` positions only
    (default: half of each example).
    """
    tok = batch * length
    q = shape.heads * shape.head_dim
    response = length // 2 if response is None else response
    linear = 2 * tok * shape.layers * sum(o * i for o, i in shape.modules().values())
    attention = 4 * batch * length * length * q * shape.layers
    return linear + attention + 2 * shape.hidden * shape.vocab * batch * response


def fisher_batch_seconds(shape: Shape, s: Settings, rates: Rates) -> float:
    """Seconds of one Fisher batch: forward + backward, then each target's statistic update.

    2 × the forward FLOPs at the matmul rate of B·T rows and ``FISHER_ACT_PASSES`` over the activations (see
    :func:`fisher_activation_seconds`), plus Python's fixed share per batch and layer; then the approximation's
    statistic update (its ``batch_seconds``: ``diagonal`` / ``lowrank`` — the per-example gradients' einsum, their
    page faults and bytes moved; ``kfac`` — ``aᵀa`` and ``δᵀδ`` and their fp64 accumulation).
    """
    tok = s.fisher_batch * s.fisher_length
    mods = targets_of(shape, s.targets)
    mm = rates.matmul_at(tok)
    t = 2 * forward_flops(shape, s.fisher_batch, s.fisher_length) / mm + fisher_activation_seconds(shape, s, rates)
    t += FISHER_BATCH_OVERHEAD_S + FISHER_LAYER_OVERHEAD_S * shape.layers
    return get_approximation(s.fisher).batch_seconds(t, mods, s.fisher_batch, tok, mm, rates)


def fisher_activation_seconds(shape: Shape, s: Settings, rates: Rates, passes: float | None = None) -> float:
    """Seconds of a Fisher batch's work besides its matmuls: ``passes`` (default ``FISHER_ACT_PASSES``) reads and
    writes of every token's activations of every layer, in the run's dtype, at the copy bandwidth."""
    passes = FISHER_ACT_PASSES if passes is None else passes
    per_token = shape.layers * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * BYTES[s.dtype]
    tok = s.fisher_batch * s.fisher_length
    return rates.moved_seconds(passes * tok * per_token, tok * shape.intermediate * BYTES[s.dtype])


def fisher_statistics_seconds(shape: Shape, s: Settings, rates: Rates) -> float:
    """Seconds of a Fisher pass's work on its statistics, once per pass (whatever the number of batches).

    ``FISHER_PASS_OVERHEAD_S`` plus the approximation's ``statistics_seconds`` (``diagonal`` / ``kfac``: the fp64
    sums are zeroed, scaled, copied to fp32 and checked; ``lowrank``: the N×p fp32 rows are zeroed and checked).
    """
    return get_approximation(s.fisher).statistics_seconds(
        FISHER_PASS_OVERHEAD_S, targets_of(shape, s.targets), s.n_samples, rates
    )


def fisher_pass_seconds(shape: Shape, s: Settings, rates: Rates, n_examples: int | None = None) -> float:
    """Seconds of one Fisher pass over ``n_examples`` (default ``s.n_samples``): its batches and its statistics."""
    n = s.n_samples if n_examples is None else n_examples
    batches = math.ceil(n / s.fisher_batch)
    return batches * fisher_batch_seconds(shape, s, rates) + fisher_statistics_seconds(shape, s, rates)


def gevp_seconds(fisher: str, o: int, i: int, n: int, rates: Rates) -> float:
    """Seconds of the GEVP + projection of one out×in module (``project_module``): the approximation's own law
    (its ``gevp_seconds``, with the kernel's cost law in its docstring)."""
    return get_approximation(fisher).gevp_seconds(o, i, n, rates)


def gevp_host_bytes(fisher: str, mods: list[tuple[int, int]], n: int) -> float:
    """Host bytes of the largest module's GEVP + projection besides the statistics (the approximation's law)."""
    return get_approximation(fisher).gevp_host_bytes(mods, n)


def merge_module_seconds(o: int, i: int, n: int, r: int, rates: Rates) -> float:
    """Seconds of one module's linear merge on the host (``task_arithmetic``; the other methods add their own passes,
    not counted): per adapter ΔW = s·B@A (a rank-r product, 2rp FLOPs, written into a fresh buffer, then scaled into
    another), then ``weighted_sum`` (a zeroed fp32 sum, one ``add_`` per adapter) times λ (fresh)."""
    p = o * i
    fresh = rates.fresh_seconds(4 * p)
    delta = n * (2 * r * p / rates.matmul + 2 * fresh + rates.moved_seconds(16 * p, 4 * p))
    return delta + 2 * fresh + rates.moved_seconds((4 + 12 * n + 8) * p, 4 * p)


def ties_module_seconds(o: int, i: int, n: int, rates: Rates) -> float:
    """Seconds of TIES' own work on one module beyond the ΔW it starts from (``Ties.merge_module``): n·p at the
    measured ``ties`` rate, plus the page faults of its fresh buffers once a ΔW reaches :data:`MMAP_THRESHOLD`
    (:data:`TIES_FRESH_BYTES`)."""
    per_adapter, per_module = TIES_FRESH_BYTES
    p = o * i  # the fault count scales with a ΔW's fp32 buffer: its faults, per byte of ΔW, times those bytes
    return n * p / rates.ties + (n * per_adapter + per_module) / 4 * rates.fresh_seconds(4 * p)


def apply_module_seconds(o: int, i: int, dtype_bytes: int, rates: Rates) -> float:
    """Seconds of adding a module's ΔW to its weight (``applied_deltas``): the original saved (a fresh copy), the
    weight in fp32 plus ΔW (two fresh fp32 buffers), back to the weight's dtype (fresh) and copied in."""
    p = o * i
    fresh = 2 * rates.fresh_seconds(p * dtype_bytes) + 2 * rates.fresh_seconds(4 * p)
    return fresh + rates.moved_seconds((2 * dtype_bytes + 8 + 12 + 4 + dtype_bytes + 2 * dtype_bytes) * p, 4 * p)
