"""Plan a run before loading anything heavy: memory and time per step, from the model's config alone.

:func:`plan_run` reads the model's shapes (:mod:`sst_merge.models.shapes` for the aliases, else ``config.json`` via
``AutoConfig`` — no weights), the adapters' ``adapter_config.json`` (target modules, rank) and the settings, and
estimates for every step what the code of this project allocates:

* ``load`` — the weights in the chosen dtype (on the device);
* ``train`` — ``sst-merge train`` loads the model in fp32, plus activations of one batch;
* ``eval`` — generation: weights + KV cache (2 · layers · kv-heads · head-dim · (prompt + new) · batch) + the last
  position's logits; log-likelihood scoring (MMLU cloze): the logits of every position;
* ``fisher`` — device: weights + activations of a backward + the module inputs/output-gradients captured for every
  target module + the per-example gradients of the largest module (``diagonal``/``lowrank``); host: the statistics
  (``diagonal`` p·8 accumulating + p·4 result, ``kfac`` Σ(in²+out²)·(8 + 4), ``lowrank`` N·p·4 per statistic, both
  held) — they are moved to the host after every batch;
* ``gevp`` — per module: ``kfac`` two dense fp64 eigenproblems (in×in, out×out), ``lowrank`` N×N plus N·p products,
  ``diagonal`` elementwise; the selection sorts the module's p values (fp64 + int64);
* ``statistics`` (``fisher_merge``: ``diagonal``, ``regmean``: ``kfac``) — the Fisher pass's memory and time, once
  per adapter with a non-zero weight, each on its own data at its own model, after greedy answers for its items
  without a response (planned as if none had one);
* ``learned`` — the fit: per step one forward + backward (the training step's law) per weighted term on a minibatch,
  after the reference model's greedy answers (``loss_tokens`` each) to the benign prompts;
* ``merge`` — the merged ΔW map (fp32, p·4) and the touched weights saved while it is applied;
* ``full`` — the ``full`` output loads a fresh fp32 copy of the base on the host (P·4) and adds ΔW.

Times come from cost laws and measured (or given) rates (:class:`Rates`): a ``matmul`` rate for the Fisher pass and
the merge, a memory ``bandwidth`` for generation (one read of the weights per new token), and the rates of the GEVP
kernels themselves, timed on fixed calibration shapes and carried to each module by its law (:func:`gevp_seconds`).
Every law that depends on the Fisher approximation is the approximation's own (its ``host_bytes``,
``batch_seconds``, ``statistics_seconds``, ``gevp_seconds`` … in its file under :mod:`sst_merge.fisher`), reached
through the registry: a new approximation plans with no edit here.
Memory is then checked against the device (GPU memory, or the host's available memory on the CPU); a run that cannot
fit is refused with the option that would: ``kfac`` instead of ``lowrank`` (lowrank's ``plan_alternatives``), a
smaller N, ``bfloat16``, ``device_map=auto``.

The package: :mod:`.rates` (measure the machine, or project a GPU's rates), :mod:`.costs` (the cost laws),
:mod:`.plan` (the steps, the fit check, :func:`plan_run`), :mod:`.settings` (:class:`Settings` and the configs'
adapters). Model shapes are :mod:`sst_merge.models.shapes`'; :class:`Rates` is :mod:`sst_merge.machine`'s.
"""

from __future__ import annotations

from sst_merge.fisher.approximation import PER_EXAMPLE_BYTES
from sst_merge.fisher.diagonal import DIAGONAL_P_COPIES
from sst_merge.fisher.kfac import KFAC_P_COPIES
from sst_merge.fisher.lowrank import LOWRANK_FP64_COPIES, LOWRANK_P_COPIES, lowrank_gram_flops
from sst_merge.machine import MMAP_THRESHOLD, Rates
from sst_merge.models.shapes import Shape, model_shape
from sst_merge.plan.costs import (
    ACT_HIDDEN,
    ACT_INTER,
    BYTES,
    FISHER_ACT_PASSES,
    FISHER_BATCH_OVERHEAD_S,
    FISHER_LAYER_OVERHEAD_S,
    FISHER_PASS_OVERHEAD_S,
    GEN_LAYER_OVERHEAD_S,
    GEN_TOKEN_OVERHEAD_S,
    TIES_FRESH_BYTES,
    apply_module_seconds,
    fisher_activation_seconds,
    fisher_batch_seconds,
    fisher_host_bytes,
    fisher_memory,
    fisher_pass_seconds,
    fisher_statistics_seconds,
    forward_flops,
    gevp_host_bytes,
    gevp_seconds,
    merge_module_seconds,
    targets_of,
    ties_module_seconds,
)
from sst_merge.plan.plan import LEAN_FISHER, Memory, Plan, Step, available_memory, check_fit, estimate, plan_run
from sst_merge.plan.rates import (
    CALIBRATION,
    CURVE_ROWS,
    DECODE_ROWS,
    GIB,
    GPU_EFFICIENCY,
    GPUS,
    HOST_EIGH,
    HOST_FAULT,
    HOST_FP64,
    HOST_ROWS,
    HOST_SORT,
    gpu_rates,
    measure_decode_curve,
    measure_fault_rate,
    measure_gevp_rates,
    measure_matmul_curve,
    measure_rates,
    measure_ties_rate,
)
from sst_merge.plan.settings import (
    LearnedFit,
    OwnPass,
    Settings,
    experiment_settings,
    merge_settings,
    settings_from_config,
)

__all__ = [
    "ACT_HIDDEN",
    "ACT_INTER",
    "BYTES",
    "CALIBRATION",
    "CURVE_ROWS",
    "DECODE_ROWS",
    "DIAGONAL_P_COPIES",
    "FISHER_ACT_PASSES",
    "FISHER_BATCH_OVERHEAD_S",
    "FISHER_LAYER_OVERHEAD_S",
    "FISHER_PASS_OVERHEAD_S",
    "GEN_LAYER_OVERHEAD_S",
    "GEN_TOKEN_OVERHEAD_S",
    "GIB",
    "GPUS",
    "GPU_EFFICIENCY",
    "HOST_EIGH",
    "HOST_FAULT",
    "HOST_FP64",
    "HOST_ROWS",
    "HOST_SORT",
    "KFAC_P_COPIES",
    "LEAN_FISHER",
    "LOWRANK_FP64_COPIES",
    "LOWRANK_P_COPIES",
    "LearnedFit",
    "MMAP_THRESHOLD",
    "Memory",
    "OwnPass",
    "PER_EXAMPLE_BYTES",
    "Plan",
    "Rates",
    "Settings",
    "Shape",
    "Step",
    "TIES_FRESH_BYTES",
    "apply_module_seconds",
    "available_memory",
    "check_fit",
    "estimate",
    "experiment_settings",
    "fisher_activation_seconds",
    "fisher_batch_seconds",
    "fisher_host_bytes",
    "fisher_memory",
    "fisher_pass_seconds",
    "fisher_statistics_seconds",
    "forward_flops",
    "gevp_host_bytes",
    "gevp_seconds",
    "gpu_rates",
    "lowrank_gram_flops",
    "measure_decode_curve",
    "measure_fault_rate",
    "measure_gevp_rates",
    "measure_matmul_curve",
    "measure_rates",
    "measure_ties_rate",
    "merge_module_seconds",
    "merge_settings",
    "model_shape",
    "plan_run",
    "settings_from_config",
    "targets_of",
    "ties_module_seconds",
]
