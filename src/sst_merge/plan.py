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
Memory is then checked against the device (GPU memory, or the host's available memory on the CPU); a run that cannot
fit is refused with the option that would: ``kfac`` instead of ``lowrank``, a smaller N, ``bfloat16``,
``device_map=auto``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sst_merge.errors import ConfigError

GIB = 2**30
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
#: bytes moved (read + written) per element of the per-example gradients (B × p, fp32) after their einsum writes
#: them: the finite check reads them (``aminmax``), then ``diagonal`` squares them in place and sums over examples,
#: ``lowrank`` copies them into its rows.
PER_EXAMPLE_BYTES = 16
#: glibc's largest ``mmap`` threshold (64-bit): a host buffer at least this large is mapped fresh for every
#: allocation and freed back to the kernel, so writing it first faults in every page (:attr:`Rates.fault`). Smaller
#: temporaries are reused from the heap. Measured step on this project's machine: a fresh 31 MiB result is written at
#: 23 GB/s, a 33 MiB one at 4.2 GB/s with every page faulted (``bench/shapes.py faults``).
MMAP_THRESHOLD = 32 * 2**20
#: fresh fp64 copies of the N × p rows in lowrank's solve (``fisher/lowrank.py``): the damping's mean diagonal (the
#: copy and its square), ``lowrank_gevp``'s and ``lowrank_project``'s copies of G_s and G_u.
LOWRANK_FP64_COPIES = 6
#: fresh p-sized (fp64, fp32) buffers of one module's GEVP + projection besides the sort's own. ``diagonal``: the
#: damping's mean, F_u and F_s in fp64, F_u + ε, the ratio λ, the argsort's indices and the sorted λ; the mask in
#: ΔW's dtype and the product. ``kfac``: the λ grid, the indices, the sorted λ, the mask in fp64, ΔW in fp64, the
#: products ``G̃_u ΔW``, ``· Ã_u``, ``· X``, ``C ⊙ S``, ``Y ·``, ``· Xᵀ``; the fp32 result.
DIAGONAL_P_COPIES, KFAC_P_COPIES = (7, 2), (11, 1)
#: bytes per element of TIES' fresh buffers, per adapter (``magnitude_trim``: the magnitudes, its masks and index
#: tensors, the trimmed ΔW) and per module (``sign_consensus_merge``: the elected sign, numerator, divisor, agreeing
#: entries, and the λ-scaled result). Counted with ``getrusage`` on 4096² ΔW: 34 and 20; the whole TIES call faulted
#: 41–72 bytes per element with 2–4 adapters, depending on what the allocator already held.
TIES_FRESH_BYTES = (34, 20)
#: fresh p-sized (fp64, fp32) buffers of ``lowrank_project``: ΔW's fp64 copy, G_sᵀc, G_uᵀz, the difference, its
#: scaling; the fp32 result.
LOWRANK_P_COPIES = (5, 1)

#: Nominal rates of the GPUs in the scaling table (dense bf16 tensor-core FLOP/s, fp64 FLOP/s, HBM bytes/s), with
#: the share a run is assumed to reach (``efficiency``) — projections, not measurements. ``host_gib``: the host
#: memory assumed beside one such GPU (128 GiB, the H200 machine this project was measured on); ``--host-gib``
#: changes it.
GPUS: dict[str, dict[str, float]] = {
    "H100-80GB": {"memory_gib": 80e9 / GIB, "host_gib": 128, "matmul": 989e12, "fp64": 67e12, "bandwidth": 3.35e12},
    "H200-141GB": {"memory_gib": 141e9 / GIB, "host_gib": 128, "matmul": 989e12, "fp64": 67e12, "bandwidth": 4.8e12},
}
GPU_EFFICIENCY = {"matmul": 0.4, "bandwidth": 0.6}
#: Host rates assumed beside a GPU (a 16-core server): the GEVP's kernels (scipy's eigh, the λ sort, lowrank's passes)
#: run there. Assumptions, not measurements: this project's 2-core CPU measured (one core) fp64 ≈ 2.4e10 FLOP/s,
#: eigh ≈ 4e9 d³/s, sort ≈ 1e8 p·log2 p/s, rows ≈ 4e7 N·p/s; a server is assumed 8× (sort: 4×, rows: 5×) that.
HOST_FP64, HOST_SORT, HOST_EIGH, HOST_ROWS = 200e9, 4e8, 3e10, 2e8
#: first-touch page faults on such a host, bytes/s (per core, like this machine's 3.1e9; assumed)
HOST_FAULT = 3e9


@dataclass(frozen=True)
class Shape:
    """What the estimates need of a decoder-only transformer."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, cfg: Any) -> Shape:
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        )

    def modules(self) -> dict[str, tuple[int, int]]:
        """Linear modules of one layer: name → (out, in)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}  # fmt: skip

    def layer_params(self) -> int:
        m = self.modules()
        bias = (m["q_proj"][0] + 2 * m["k_proj"][0]) if self.qkv_bias else 0
        return sum(o * i for o, i in m.values()) + bias + 2 * self.hidden  # + two RMSNorm weights

    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params() + embed * (1 if self.tied else 2) + self.hidden


def model_shape(model: str) -> Shape:
    """Return the shapes of ``model`` (alias, local directory or hub id) from its config only — never its weights."""
    from sst_merge.models.shapes import SHAPES, shape_config

    if model in SHAPES:
        return Shape.from_config(shape_config(model))
    from transformers import AutoConfig

    p = Path(model).expanduser()
    if p.is_dir() and not (p / "config.json").is_file():
        raise ConfigError(f"model {model}: directory has no config.json; pass a Hugging Face model directory")
    try:
        return Shape.from_config(AutoConfig.from_pretrained(str(p) if p.is_dir() else model))
    except OSError as e:
        raise ConfigError(
            f"model {model}: cannot read its config.json ({e.__class__.__name__}); pass a local model directory"
        ) from e


@dataclass
class OwnPass:
    """``fisher_merge`` / ``regmean``: one statistics pass per adapter with a non-zero weight, on its own data."""

    method: str
    fisher: str  # diagonal (fisher_merge) or kfac (regmean: its A factor; the pass computes both factors)
    passes: int  # adapters with a non-zero weight
    n_samples: int = 64
    batch: int = 8
    length: int = 256
    new_tokens: int = 64  # greedy answer length for items without a response


@dataclass
class LearnedFit:
    """``learned``: Adam steps, each one forward + backward per weighted term on ``batch`` examples."""

    steps: int = 24
    batch: int = 4
    length: int = 256
    terms: int = 3  # harmful, benign, task (those with a non-zero weight)
    benign: int = 0  # benign prompts the reference model answers greedily first (0: benign weight 0)
    tokens: int = 8  # loss_tokens: the length of a reference answer


@dataclass
class Settings:
    """What the estimate depends on besides the model (experiment and merge settings)."""

    dtype: str = "float32"
    device_map: str | None = None
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_rank: int = 8
    n_adapters: int = 2
    fisher: str = "lowrank"
    n_samples: int = 32
    fisher_batch: int = 8
    fisher_length: int = 256
    eval_batch: int = 8
    prompt_tokens: int = 128
    new_tokens: int = 64
    train_batch: int = 8
    train_length: int = 256
    output: str | None = None  # "peft" / "full" for a merge; None for an experiment (no output written)
    sst: bool = True
    train: bool = False  # an experiment whose adapters are not given trains them first
    ties: bool = False  # a TIES merge (trim + sign election) is among the merges: the merge step costs its law
    objectives: int = 2  # SST's Fisher passes: F_s and F_u (space: input — harmful, benign and utility inputs: 3)
    own: list[OwnPass] = field(default_factory=list)  # fisher_merge / regmean among the merges
    learned: LearnedFit | None = None  # learned among the merges


@dataclass
class Step:
    """One step's estimate: peak bytes on the device and on the host (beyond the device's), FLOPs, seconds."""

    step: str
    device_bytes: float
    host_bytes: float
    seconds: float
    note: str = ""


@dataclass
class Rates:
    """Throughputs of the machine the plan is for (measured with :func:`measure_rates` or given).

    The last three are the rates of this project's own GEVP kernels, measured by running them on fixed calibration
    shapes (:data:`CALIBRATION`) and carried to a module's shape by the kernel's cost law (:func:`gevp_seconds`).
    They run on the host CPU whatever the device.
    """

    matmul: float  # FLOP/s, dense matmul in the run's dtype
    fp64: float  # FLOP/s, fp64 matmul on the host (kfac's projection products, lowrank's Gram products)
    bandwidth: float  # bytes/s, reading weights during generation
    sort: float = 2e8  # p·log2(p) per second of a module's λ selection (argsort, gather, mask; diagonal and kfac)
    measured: bool = True
    eigh: float = 2e9  # d³ per second of one generalized symmetric eigenproblem d×d (scipy ``eigh``, kfac)
    rows: float = 5e7  # elements (N·p) per second of lowrank's passes over its rows, fresh pages excluded
    fault: float = 3e9  # bytes/s of first writes into a fresh host buffer of ≥ MMAP_THRESHOLD (page faults)
    heap_bandwidth: float = 0.0  # bytes/s (read + write) over 16 MiB buffers, the heap's reused ones (0: bandwidth)
    ties: float = 5e7  # elements × adapters per second of TIES' module kernel (trim each ΔW, elect, disjoint mean)
    device_faults: bool = True  # the Fisher pass's temporaries fault too (CPU); a GPU's caching allocator reuses them
    matmul_curve: tuple = ()  # (rows, FLOP/s) of (rows × width) @ (width × width) in the run's dtype
    decode_curve: tuple = ()  # (rows, FLOP/s) of GEMMs with 1–32 rows over weights streamed from memory (decoding)

    def matmul_at(self, rows: int) -> float:
        """The matmul rate of a GEMM with ``rows`` rows (a Fisher batch's B·T tokens): interpolated in log(rows) on
        :attr:`matmul_curve`, clamped at its ends; :attr:`matmul` without a curve (projected rates)."""
        return _on_curve(self.matmul_curve, rows, self.matmul)

    def decode_seconds(self, params: float, batch: int, dtype_bytes: int) -> float:
        """Seconds of one decoding step of ``batch`` sequences through ``params`` weights: 2·params·batch FLOPs at
        :attr:`decode_curve`'s rate for ``batch`` rows (a GEMM with few rows over weights that do not stay in the
        cache: one thread here streamed them at 14–16 GB/s with 1 row but 5–8 GB/s with 8); without a curve
        (projected rates) the longer of one read of the weights and the FLOPs at :attr:`matmul`."""
        if not self.decode_curve:
            return max(params * dtype_bytes / self.bandwidth, 2 * params * batch / self.matmul)
        return 2 * params * batch / _on_curve(self.decode_curve, batch, self.matmul)

    def moved_seconds(self, nbytes: float, buffer: float) -> float:
        """Seconds of moving ``nbytes`` (reads + writes) through buffers of ``buffer`` bytes: below
        :data:`MMAP_THRESHOLD` at :attr:`heap_bandwidth` (reused heap memory, cache-resident here), else at
        :attr:`bandwidth`."""
        fast = self.heap_bandwidth if buffer < MMAP_THRESHOLD and self.heap_bandwidth > 0 else self.bandwidth
        return nbytes / fast

    def fresh_seconds(self, nbytes: float, device: bool = False) -> float:
        """Seconds of faulting in a fresh buffer of ``nbytes`` (0 below :data:`MMAP_THRESHOLD`; 0 on a GPU device)."""
        if nbytes < MMAP_THRESHOLD or (device and not self.device_faults):
            return 0.0
        return nbytes / self.fault


#: The calibration shapes of the GEVP kernels (none of them a seed model's module): ``eigh`` on a 768×768 pair,
#: the diagonal selection on a 1024×2048 module, lowrank's solve (N = 4) on a 256×512 module (its fp64 copies,
#: 4 MiB, stay below :data:`MMAP_THRESHOLD`: the ``rows`` rate excludes page faults, which ``fault`` prices).
CALIBRATION = {"eigh_d": 768, "module": (1024, 2048), "lowrank_n": 4, "lowrank_module": (256, 512)}
#: row counts of the short GEMMs timed for :attr:`Rates.matmul_curve` (plus 1024)
CURVE_ROWS = (64, 128, 256, 512)


def _on_curve(curve: tuple, rows: int, default: float) -> float:
    """A rate on a (rows, rate) curve, interpolated in log(rows) and clamped at its ends; ``default`` without one."""
    pts = sorted((float(m), float(r)) for m, r in curve)
    if not pts:
        return default
    if rows <= pts[0][0]:
        return pts[0][1]
    for (m0, r0), (m1, r1) in zip(pts, pts[1:], strict=False):
        if rows <= m1:
            w = math.log(rows / m0) / math.log(m1 / m0)
            return r0 + w * (r1 - r0)
    return pts[-1][1]


def _median_seconds(fn, clock, repeat: int = 3) -> float:
    fn()  # warm-up (allocations, library initialisation)
    ts = []
    for _ in range(repeat):
        t = clock()
        fn()
        ts.append(clock() - t)
    return sorted(ts)[len(ts) // 2]


def measure_rates(
    device: str = "cpu",
    dtype: str = "float32",
    size: int = 1024,
    clock=time.perf_counter,
    width: int | None = None,
    inner: int | None = None,
) -> Rates:
    """Measure the rates of :class:`Rates` on this machine (≈ 2 s on an idle core).

    A ``size``² × ``size`` matmul in ``dtype`` on ``device``, the matmul curve (:func:`measure_matmul_curve`) on a
    ``width``² weight (default ``size``; ``plan`` passes the model's hidden size), the decoding curve
    (:func:`measure_decode_curve`; ``inner``: the model's intermediate size, default 4 × width), an fp64 matmul, the copy bandwidth
    over 64 MiB and over 16 MiB buffers, the page-fault rate of a fresh 64 MiB host buffer, then the GEVP kernels
    and TIES' module kernel (:func:`measure_gevp_rates`) on the host. ``clock``: ``time.perf_counter`` (wall; what a run sees) or
    ``time.process_time`` (CPU time of this process: a benchmark on a shared machine, one thread).
    """
    import torch

    from sst_merge.models.loading import DTYPES

    def rate(dt: torch.dtype, n: int, dev: str) -> float:
        a = torch.randn(n, n, device=dev).to(dt)
        return 2 * n**3 / _median_seconds(lambda: (a @ a).sum().item(), clock)

    x = torch.randn(64 * 2**20 // 4, device=device)
    y = torch.empty_like(x)  # preallocated: a fresh buffer would time page faults, not bandwidth

    def copy() -> None:
        y.copy_(x)
        if device != "cpu":
            torch.cuda.synchronize()

    bw = 2 * x.numel() * 4 / _median_seconds(copy, clock, repeat=5)  # read + write
    x, y = x[: 16 * 2**20 // 4], y[: 16 * 2**20 // 4]
    heap_bw = 2 * x.numel() * 4 / _median_seconds(copy, clock, repeat=5)
    fp64 = rate(torch.float64, size // 2, "cpu")
    matmul = rate(DTYPES[dtype], size, device)
    curve = measure_matmul_curve(device, dtype, width or size, clock)
    decode = measure_decode_curve(device, dtype, width or size, inner or 4 * (width or size), clock)
    on_gpu = device != "cpu"
    return Rates(matmul=matmul, fp64=fp64, bandwidth=bw, heap_bandwidth=heap_bw, fault=measure_fault_rate(clock),
                 device_faults=not on_gpu, matmul_curve=curve, decode_curve=decode,
                 **measure_gevp_rates(fp64, clock))  # fmt: skip


def measure_matmul_curve(device: str, dtype: str, width: int, clock=time.perf_counter) -> tuple:
    """FLOP/s of (rows × width) @ (width × width) for rows in :data:`CURVE_ROWS` and 1024: a GEMM with few rows
    runs below the square's rate (the weight is streamed and packed once per call, whatever the row count)."""
    import torch

    from sst_merge.models.loading import DTYPES

    w = torch.randn(width, width, device=device).to(DTYPES[dtype])
    out = []
    for m in (*CURVE_ROWS, 1024):
        x = torch.randn(m, width, device=device).to(DTYPES[dtype])
        out.append((m, 2 * m * width * width / _median_seconds(lambda x=x: (x @ w).sum().item(), clock)))
    return tuple(out)


#: row counts of the decoding GEMMs timed for :attr:`Rates.decode_curve` (an evaluation or sampling batch)
DECODE_ROWS = (1, 2, 4, 8, 16, 32)


def measure_decode_curve(device: str, dtype: str, width: int, inner: int, clock=time.perf_counter) -> tuple:
    """FLOP/s of ``linear`` of (rows × width) through inner × width weights (an MLP projection's shape, most of a
    decoder's weights) for rows in :data:`DECODE_ROWS`, over a stack of distinct weights of 288 MiB in fp32 (more
    than this machine's 260 MiB last-level cache), so every weight comes from memory as in a decoding step."""
    import torch

    from sst_merge.models.loading import DTYPES

    n = max(1, 288 * 2**20 // (4 * width * inner))
    stack = torch.full((n, inner, width), 0.01, device=device, dtype=DTYPES[dtype])
    out = []
    for m in DECODE_ROWS:
        x = torch.randn(m, width, device=device).to(DTYPES[dtype])

        def step(x=x) -> None:
            for w in stack:
                y = torch.nn.functional.linear(x, w)
            float(y[0, 0])

        out.append((m, 2 * m * width * inner * n / _median_seconds(step, clock)))
    return tuple(out)


def measure_fault_rate(clock=time.perf_counter) -> float:
    """Bytes/s of first writes into fresh host pages: ``x * 2`` into a new 64 MiB result, less the same into a
    preallocated one (the difference is the page faults of the new buffer)."""
    import torch

    x = torch.randn(64 * 2**20 // 4)
    y = torch.empty_like(x)
    fresh = _median_seconds(lambda: x * 2, clock, repeat=5)
    reused = _median_seconds(lambda: torch.mul(x, 2, out=y), clock, repeat=5)
    return x.numel() * 4 / max(fresh - reused, fresh / 20)


def measure_gevp_rates(fp64: float, clock=time.perf_counter) -> dict[str, float]:
    """Time the GEVP kernels on the :data:`CALIBRATION` shapes; return ``eigh``, ``sort``, ``rows`` and ``ties``."""
    import scipy.linalg
    import torch

    from sst_merge.fisher.gevp import Selection
    from sst_merge.fisher.solve import project_module

    g = torch.Generator().manual_seed(0)
    d = CALIBRATION["eigh_d"]
    x = torch.randn(2, d, d // 4, generator=g, dtype=torch.float64)
    a, b = (m @ m.T / d + 0.1 * torch.eye(d, dtype=torch.float64) for m in x)
    eigh = d**3 / _median_seconds(lambda: scipy.linalg.eigh(a.numpy(), b.numpy()), clock)
    o, i = CALIBRATION["module"]
    p = o * i
    sel = Selection(fraction=0.1)
    tau = torch.randn(o, i, generator=g)
    ds, du = {"diag": torch.rand(o, i, generator=g)}, {"diag": torch.rand(o, i, generator=g) + 0.1}
    sort = p * math.log2(p) / _median_seconds(lambda: project_module("diagonal", ds, du, tau, 1e-3, sel), clock)
    n = CALIBRATION["lowrank_n"]
    o, i = CALIBRATION["lowrank_module"]
    p = o * i
    tau = torch.randn(o, i, generator=g)
    rs, ru = {"rows": torch.randn(n, p, generator=g)}, {"rows": torch.randn(n, p, generator=g)}
    t = _median_seconds(lambda: project_module("lowrank", rs, ru, tau, 1e-3, sel), clock, repeat=5)
    rows = n * p / max(t - lowrank_gram_flops(n, p) / fp64, t / 10)
    return {"eigh": eigh, "sort": sort, "rows": rows, "ties": measure_ties_rate(clock)}


def measure_ties_rate(clock=time.perf_counter) -> float:
    """Elements × adapters per second of ``Ties.merge_module`` on two rank-8 1024 × 2048 ΔW (density 0.5): every buffer
    below :data:`MMAP_THRESHOLD`, so its page faults are priced apart (:func:`ties_module_seconds`)."""
    import torch

    from sst_merge.merge.ties import Ties

    g = torch.Generator().manual_seed(0)
    o, i = CALIBRATION["module"]
    taus = [torch.randn(o, 8, generator=g) @ torch.randn(8, i, generator=g) for _ in range(2)]  # rank-8 ΔW, as LoRA's
    method = Ties()
    params = method.Params(density=0.5)
    t = _median_seconds(lambda: method.merge_module(taus, [0.5, 0.5], params, g), clock)
    return 2 * o * i / t


def lowrank_gram_flops(n: int, p: int) -> float:
    """FLOPs of lowrank's three N×N Gram products over p columns (``G_uG_uᵀ``, ``G_uG_sᵀ``, ``G_sG_sᵀ``)."""
    return 3 * 2 * n * n * p


def gevp_seconds(fisher: str, o: int, i: int, n: int, rates: Rates) -> float:
    """Seconds of the GEVP + projection of one out×in module (``project_module``), by the kernel's cost law.

    * ``diagonal``: the λ selection, p·log2 p (an argsort of the p ratios, a gather and a mask), and the page faults
      of its fresh p-sized buffers (:data:`DIAGONAL_P_COPIES`, each once it reaches :data:`MMAP_THRESHOLD`);
    * ``kfac``: two generalized eigenproblems (o³ + i³ at the ``eigh`` rate), the selection on the o×i λ grid, the
      projection's fp64 products ``Yᵀ G̃_u ΔW Ã_u X`` and ``Y (C ⊙ S) Xᵀ`` (2o³ + 4o²i + 6oi² FLOPs), and the page
      faults of its fresh p-sized buffers (:data:`KFAC_P_COPIES`);
    * ``lowrank``: N·p elements of each statistic's rows through a fixed number of fp64 passes (copies, products
      with ΔW and back) at the ``rows`` rate, the page faults of its fresh buffers (:data:`LOWRANK_FP64_COPIES` of
      N·p fp64 and :data:`LOWRANK_P_COPIES` of p, each once it reaches :data:`MMAP_THRESHOLD`), the three N×N Gram
      products (6N²p FLOPs) and the N×N ``eigh``.
    """
    p = o * i
    select = p * math.log2(p) / rates.sort
    if fisher == "diagonal":
        return select + _p_copies_seconds(p, DIAGONAL_P_COPIES, rates)
    if fisher == "kfac":
        products = (2 * o**3 + 4 * o * o * i + 6 * o * i * i) / rates.fp64
        return (o**3 + i**3) / rates.eigh + select + products + _p_copies_seconds(p, KFAC_P_COPIES, rates)
    if fisher == "lowrank":
        faults = LOWRANK_FP64_COPIES * rates.fresh_seconds(n * p * 8) + _p_copies_seconds(p, LOWRANK_P_COPIES, rates)
        return n * p / rates.rows + faults + lowrank_gram_flops(n, p) / rates.fp64 + n**3 / rates.eigh
    return p**3 / rates.eigh  # dense: one p×p eigenproblem


def _p_copies_seconds(p: int, copies: tuple[int, int], rates: Rates) -> float:
    """Page faults of ``copies`` = (fp64, fp32) fresh host buffers of p elements (each only at MMAP_THRESHOLD)."""
    return copies[0] * rates.fresh_seconds(p * 8) + copies[1] * rates.fresh_seconds(p * 4)


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


def gpu_rates(name: str) -> Rates:
    """Projected rates of a GPU of :data:`GPUS` (nominal × :data:`GPU_EFFICIENCY`)."""
    g = GPUS[name]
    # the eigen-solvers and the λ selection run on the host CPU (scipy), whatever the device: host rates assumed
    return Rates(**{k: g[k] * GPU_EFFICIENCY[k] for k in ("matmul", "bandwidth")}, fp64=HOST_FP64, sort=HOST_SORT,
                 eigh=HOST_EIGH, rows=HOST_ROWS, fault=HOST_FAULT, device_faults=False, measured=False)  # fmt: skip


# -- the estimate ------------------------------------------------------------------------------------------------


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
    mods = targets_of(shape, s.targets)
    p = sum(o * i for o, i in mods)
    if fisher == "diagonal":
        return p * 4 + p * 8  # F_s result (fp32) + F_u accumulator (fp64)
    if fisher == "kfac":
        f = sum(o * o + i * i for o, i in mods)
        return f * 4 + f * 8
    return 2 * n * p * 4  # lowrank: N rows of p, fp32, for both statistics


def fisher_memory(shape: Shape, s: Settings) -> tuple[float, float]:
    """Device and host bytes of a Fisher pass (``s.fisher`` over ``s.n_samples``) besides the weights.

    Device: activations of a backward, the module inputs/output-gradients captured for every target module, the
    per-example gradients of the largest module (and ``diagonal``'s sum of them). Host: both statistics, the fp32 ΔW
    map and the fp32 copy ``finish()`` makes of the largest fp64 sum while the sum is alive.
    """
    b = BYTES[s.dtype]
    mods = targets_of(shape, s.targets)
    big = max(o * i for o, i in mods)
    ftok = s.fisher_batch * s.fisher_length
    act = ftok * shape.layers * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * b
    act += ftok * shape.vocab * 4 * 3
    captured = ftok * sum(o + i for o, i in mods) * b
    per_ex = 0 if s.fisher == "kfac" else (s.fisher_batch + (s.fisher == "diagonal")) * big * 4
    largest = {"lowrank": 0, "kfac": max(max(o, i) ** 2 for o, i in mods)}.get(s.fisher, big)
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
    :func:`fisher_activation_seconds`); then per target module (out×in, B examples of T tokens): ``diagonal`` /
    ``lowrank`` — the per-example gradients' einsum (2·B·T·p FLOPs), the
    page faults of their fresh B×p fp32 buffer (``diagonal``: and of its p-sized sum and that sum's fp64 copy) and
    ``PER_EXAMPLE_BYTES`` per element moved; ``kfac`` — ``aᵀa`` and ``δᵀδ`` (2·B·T·(in² + out²) FLOPs), their fp32
    results and fp64 copies (fresh), and the fp64 accumulation. Plus Python's fixed share per batch and layer.
    """
    tok = s.fisher_batch * s.fisher_length
    mods = targets_of(shape, s.targets)
    mm = rates.matmul_at(tok)
    t = 2 * forward_flops(shape, s.fisher_batch, s.fisher_length) / mm + fisher_activation_seconds(shape, s, rates)
    t += FISHER_BATCH_OVERHEAD_S + FISHER_LAYER_OVERHEAD_S * shape.layers
    if s.fisher == "kfac":
        f = sum(o * o + i * i for o, i in mods)
        fresh = sum(rates.fresh_seconds(d * d * b, device=True) for o, i in mods for d in (o, i) for b in (4, 8))
        moved = sum(rates.moved_seconds((4 + 8 + 8 + 16) * d * d, d * d * 8) for o, i in mods for d in (o, i))
        return t + 2 * tok * f / mm + fresh + moved
    p = sum(o * i for o, i in mods)
    fresh = sum(rates.fresh_seconds(s.fisher_batch * o * i * 4, device=True) for o, i in mods)
    if s.fisher == "diagonal":  # the sum over examples (fp32) and its fp64 copy added into the statistic
        fresh += sum(rates.fresh_seconds(o * i * b, device=True) for o, i in mods for b in (4, 8))
    moved = sum(rates.moved_seconds(PER_EXAMPLE_BYTES * s.fisher_batch * o * i, s.fisher_batch * o * i * 4)
                for o, i in mods)  # fmt: skip
    return t + 2 * tok * p / mm + fresh + moved


def fisher_activation_seconds(shape: Shape, s: Settings, rates: Rates, passes: float | None = None) -> float:
    """Seconds of a Fisher batch's work besides its matmuls: ``passes`` (default ``FISHER_ACT_PASSES``) reads and
    writes of every token's activations of every layer, in the run's dtype, at the copy bandwidth."""
    passes = FISHER_ACT_PASSES if passes is None else passes
    per_token = shape.layers * (ACT_HIDDEN * shape.hidden + ACT_INTER * shape.intermediate) * BYTES[s.dtype]
    tok = s.fisher_batch * s.fisher_length
    return rates.moved_seconds(passes * tok * per_token, tok * shape.intermediate * BYTES[s.dtype])


def fisher_statistics_seconds(shape: Shape, s: Settings, rates: Rates) -> float:
    """Seconds of a Fisher pass's work on its statistics, once per pass (whatever the number of batches).

    ``diagonal`` / ``kfac``: the fp64 sums are zeroed (fresh), scaled in place, copied to fp32 (fresh) and checked
    (``aminmax``): 40 bytes moved per element. ``lowrank``: the N×p fp32 rows are zeroed (fresh) and checked: 8 bytes
    per element. On a GPU the sums are device memory (no faults), and the result is copied to the host once.
    """
    mods = targets_of(shape, s.targets)
    if s.fisher == "lowrank":
        sizes = [s.n_samples * o * i for o, i in mods]
        rows = sum(rates.fresh_seconds(n * 4, device=True) + rates.moved_seconds(8 * n, 4 * n) for n in sizes)
        return FISHER_PASS_OVERHEAD_S + rows
    sizes = [d * d for o, i in mods for d in (i, o)] if s.fisher == "kfac" else [o * i for o, i in mods]
    fresh = sum(rates.fresh_seconds(n * 8, device=True) + rates.fresh_seconds(n * 4, device=True) for n in sizes)
    to_host = 0.0 if rates.device_faults else sum(rates.fresh_seconds(n * 4) for n in sizes)
    return FISHER_PASS_OVERHEAD_S + fresh + to_host + sum(rates.moved_seconds(40 * n, 8 * n) for n in sizes)


def fisher_pass_seconds(shape: Shape, s: Settings, rates: Rates, n_examples: int | None = None) -> float:
    """Seconds of one Fisher pass over ``n_examples`` (default ``s.n_samples``): its batches and its statistics."""
    n = s.n_samples if n_examples is None else n_examples
    batches = math.ceil(n / s.fisher_batch)
    return batches * fisher_batch_seconds(shape, s, rates) + fisher_statistics_seconds(shape, s, rates)


def estimate(shape: Shape, s: Settings, rates: Rates) -> list[Step]:
    """Return the per-step estimates of a run with settings ``s`` on a machine with ``rates``."""
    b = BYTES[s.dtype]
    P = shape.params()
    W = P * b
    mods = targets_of(shape, s.targets)
    p = sum(o * i for o, i in mods)
    big = max(o * i for o, i in mods)
    L, H, I, V = shape.layers, shape.hidden, shape.intermediate, shape.vocab
    kv = shape.kv_heads * shape.head_dim
    flops_tok = 2 * (P - V * H * (0 if shape.tied else 1))  # forward FLOPs per token (the embedding is a lookup)
    steps: list[Step] = []

    steps.append(Step("load", W, 0, W / rates.bandwidth, f"{P / 1e9:.2f} B parameters × {b} bytes ({s.dtype})"))

    if s.train:
        tok = s.train_batch * s.train_length
        act = tok * L * (ACT_HIDDEN * H + ACT_INTER * I) * 4 + tok * V * 4 * 2
        lora = sum(s.lora_rank * (o + i) for o, i in mods) * 4 * 4  # weights, grads, two Adam moments
        steps.append(Step("train (one step)", P * 4 + act + lora, 0, 3 * flops_tok * tok / rates.matmul,
                          f"fp32 copy (train loads float32), batch {s.train_batch}×{s.train_length}"))  # fmt: skip

    T = s.prompt_tokens + s.new_tokens
    cache = 2 * L * kv * T * s.eval_batch * b
    logits = s.eval_batch * s.prompt_tokens * V * 4
    step_s = GEN_TOKEN_OVERHEAD_S + GEN_LAYER_OVERHEAD_S * L
    gen_s = s.new_tokens * (rates.decode_seconds(flops_tok / 2, s.eval_batch, b) + step_s)
    prefill_s = flops_tok * s.eval_batch * s.prompt_tokens / rates.matmul_at(s.eval_batch * s.prompt_tokens)
    steps.append(Step("eval (one batch)", W + cache + logits, 0, gen_s + prefill_s,
                      f"KV cache {cache / GIB:.2f} GiB at batch {s.eval_batch} × {T} tokens; "
                      f"{(gen_s / max(s.new_tokens, 1)) * 1e3:.0f} ms per new token"))  # fmt: skip

    deltas = p * 4
    saved = p * b
    merge_s = sum(merge_module_seconds(o, i, s.n_adapters, s.lora_rank, rates) + apply_module_seconds(o, i, b, rates)
                  for o, i in mods)  # fmt: skip
    if s.ties:
        merge_s += sum(ties_module_seconds(o, i, s.n_adapters, rates) for o, i in mods)
    steps.append(Step("merge (ΔW applied)", W + saved, deltas + s.n_adapters * big * 4, merge_s,
                      f"ΔW map {deltas / GIB:.2f} GiB (fp32, host); saved originals {saved / GIB:.2f} GiB"))  # fmt: skip

    for own in s.own:  # fisher_merge / regmean: the Fisher pass's law, once per adapter on its own data
        os_ = replace(s, fisher=own.fisher, n_samples=own.n_samples, fisher_batch=own.batch, fisher_length=own.length)
        dev, host = fisher_memory(shape, os_)
        # at most: every item greedy-answered (items with a response are used as they are)
        answer_s = math.ceil(own.n_samples / own.batch) * own.new_tokens * (
            rates.decode_seconds(flops_tok / 2, own.batch, b) + step_s)  # fmt: skip
        seconds = own.passes * (fisher_pass_seconds(shape, os_, rates) + answer_s)
        steps.append(Step(f"{own.method} ({own.fisher}, N={own.n_samples} × {own.passes})", W + dev, host, seconds,
                          f"one pass per adapter, greedy answers for items without a response "
                          f"(at most {own.n_samples} each)"))  # fmt: skip

    if s.learned is not None:  # the training step's law (forward + backward = 3 forwards) per term and step
        lf = s.learned
        tok = lf.batch * lf.length
        act = tok * L * (ACT_HIDDEN * H + ACT_INTER * I) * b + tok * V * 4 * 2
        factors = s.n_adapters * sum(s.lora_rank * (o + i) for o, i in mods) * 4
        fit_s = lf.steps * lf.terms * 3 * flops_tok * tok / rates.matmul
        ref_s = math.ceil(lf.benign / (2 * lf.batch)) * lf.tokens * (
            rates.decode_seconds(flops_tok / 2, 2 * lf.batch, b) + step_s)  # fmt: skip
        steps.append(Step(f"learned ({lf.steps} steps × {lf.terms})", W + act + factors, 0, fit_s + ref_s,
                          f"minibatch {lf.batch}×{lf.length} per term; {lf.benign} reference answers of "
                          f"{lf.tokens} tokens first"))  # fmt: skip

    if s.sst:
        dev, host = fisher_memory(shape, s)
        n_ex = s.objectives * s.n_samples
        sample_s = math.ceil(s.n_samples / s.fisher_batch) * s.new_tokens * (
            rates.decode_seconds(flops_tok / 2, s.fisher_batch, b) + step_s)  # fmt: skip
        fs = s.objectives * fisher_pass_seconds(shape, s, rates) + sample_s
        steps.append(Step(f"fisher ({s.fisher}, N={s.n_samples} × {s.objectives})", W + dev, host, fs,
                          f"statistics {fisher_host_bytes(shape, s) / GIB:.2f} GiB on the host; {n_ex} examples"))  # fmt: skip

        gs = sum(gevp_seconds(s.fisher, o, i, s.n_samples, rates) for o, i in mods)
        if s.fisher == "kfac":
            g_mem = max(2 * (o * o + i * i) * 8 * 3 + o * i * 8 * 4 for o, i in mods)
        elif s.fisher == "lowrank":
            g_mem = 2 * s.n_samples * big * 8 + 4 * big * 8
        else:
            g_mem = 4 * big * 8
        steps.append(Step("gevp + projection", W, host + g_mem, gs, f"{len(mods)} modules, largest {max(mods)}, "
                          "on the host CPU"))  # fmt: skip

    if s.output == "full":
        steps.append(Step("full output", 0, P * 4 + deltas, P * 4 * 3 / rates.bandwidth,
                          f"a fresh fp32 copy of the base on the host: {P * 4 / GIB:.1f} GiB"))  # fmt: skip
    return steps


# -- fitting -----------------------------------------------------------------------------------------------------


@dataclass
class Memory:
    """What the machine has: device bytes (one GPU, or the host when on the CPU), GPU count, host bytes."""

    device: float
    host: float
    gpus: int = 0
    name: str = "cpu"


def available_memory() -> Memory:
    """Return free GPU memory (per GPU) when CUDA is present, else the host's available memory, and host memory."""
    host = _mem_available()
    try:
        import torch

        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            free = min(torch.cuda.mem_get_info(i)[0] for i in range(n))
            return Memory(device=free, host=host, gpus=n, name=torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001 — a broken CUDA setup plans for the CPU, like loading would
        pass
    return Memory(device=host, host=host)


def _mem_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class Plan:
    """The estimate of every step, the peaks, the machine, and whether (and how) it fits."""

    model: str
    settings: Settings
    steps: list[Step]
    memory: Memory
    rates: Rates
    on_gpu: bool
    problem: str | None = None

    def peaks(self) -> tuple[float, float]:
        """Peak device and host bytes (on the CPU both live in host memory, so they add)."""
        dev = max(st.device_bytes for st in self.steps)
        host = max(st.host_bytes + (0 if self.on_gpu else st.device_bytes) for st in self.steps)
        return (dev if self.on_gpu else host), host

    def to_json(self) -> dict[str, Any]:
        dev, host = self.peaks()
        return {"model": self.model, "settings": asdict(self.settings), "steps": [asdict(s) for s in self.steps],
                "memory": asdict(self.memory), "rates": asdict(self.rates), "on_gpu": self.on_gpu,
                "peak_device_bytes": dev, "peak_host_bytes": host, "fits": self.problem is None,
                "problem": self.problem}  # fmt: skip

    def table(self) -> str:
        where = f"GPU ({self.memory.name}, {self.memory.gpus}×)" if self.on_gpu else "CPU (host memory)"
        lines = [f"plan for {self.model} on {where}, dtype {self.settings.dtype}"
                 + (f", SST {self.settings.fisher} N={self.settings.n_samples}" if self.settings.sst else ""),
                 f"{'step':<32} {'device GiB':>10} {'host GiB':>9} {'time':>10}  note"]  # fmt: skip
        for st in self.steps:
            host = st.host_bytes if self.on_gpu else st.host_bytes + st.device_bytes
            dev = f"{st.device_bytes / GIB:.2f}" if self.on_gpu else "-"
            lines.append(f"{st.step:<32} {dev:>10} {host / GIB:>9.2f} {_fmt_s(st.seconds):>10}  {st.note}")
        dev, host = self.peaks()
        lines.append(f"peak: device {dev / GIB:.2f} GiB of {self.memory.device / GIB:.1f} GiB available; host "
                     f"{host / GIB:.2f} GiB of {self.memory.host / GIB:.1f} GiB"
                     + ("" if self.rates.measured else " (projected rates)"))  # fmt: skip
        return "\n".join(lines)


def _fmt_s(s: float) -> str:
    return f"{s:.2f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def _fits(shape: Shape, s: Settings, memory: Memory, rates: Rates, on_gpu: bool) -> tuple[bool, float, float]:
    plan = Plan("", s, estimate(shape, s, rates), memory, rates, on_gpu)
    dev, host = plan.peaks()
    capacity = memory.device * (memory.gpus if on_gpu and s.device_map == "auto" and memory.gpus > 1 else 1)
    return dev <= capacity and host <= memory.host, dev, host


def check_fit(shape: Shape, s: Settings, memory: Memory, rates: Rates, on_gpu: bool) -> str | None:
    """Return ``None`` when the run fits, else one line: what does not fit, and the option that would."""

    ok, dev, host = _fits(shape, s, memory, rates, on_gpu)
    if ok:
        return None
    cap = memory.device / GIB
    what = (f"needs {dev / GIB:.1f} GiB on the device ({cap:.1f} GiB free) and {host / GIB:.1f} GiB of host memory "
            f"({memory.host / GIB:.1f} GiB available)")  # fmt: skip
    tries: list[tuple[str, Settings]] = []
    if s.sst and s.fisher == "lowrank":
        tries.append(("sst.fisher=kfac", replace(s, fisher="kfac")))
        for n in (16, 8, 4, 2):
            if n < s.n_samples:
                tries.append((f"sst.n_samples={n}", replace(s, n_samples=n)))
    if s.dtype == "float32":
        tries.append(("dtype=bfloat16", replace(s, dtype="bfloat16")))
    if on_gpu and memory.gpus > 1 and s.device_map != "auto":
        tries.append(("device_map=auto", replace(s, device_map="auto")))
    if s.dtype == "float32":
        tries.append(("dtype=bfloat16 and sst.fisher=kfac", replace(s, dtype="bfloat16", fisher="kfac")))
    for label, alt in tries:
        if _fits(shape, alt, memory, rates, on_gpu)[0]:
            return f"does not fit: {what}; --set {label} would fit"
    return f"does not fit: {what}; no single option fits (fewer target modules or a bigger machine)"


def plan_run(
    model: str,
    settings: Settings,
    memory: Memory | None = None,
    rates: Rates | None = None,
    on_gpu: bool | None = None,
) -> Plan:
    """Estimate every step of a run of ``model`` with ``settings`` and check it against the machine's memory."""
    shape = model_shape(model)
    memory = memory or available_memory()
    on_gpu = memory.gpus > 0 and settings.device_map != "cpu" if on_gpu is None else on_gpu
    if rates is None:
        # the GEMM and decoding curves on weights of the model's shapes (capped: ≈ 1–2 s each on one CPU core)
        rates = measure_rates("cuda" if on_gpu else "cpu", settings.dtype, width=min(shape.hidden, 4096),
                              inner=min(shape.intermediate, 16384))  # fmt: skip
    steps = estimate(shape, settings, rates)
    plan = Plan(model, settings, steps, memory, rates, on_gpu)
    plan.problem = check_fit(shape, settings, memory, rates, on_gpu)
    return plan


# -- settings from the project's configs -------------------------------------------------------------------------


def _adapter_settings(paths: list[str]) -> dict[str, Any]:
    targets: list[str] = []
    rank = 0
    for path in paths:
        cfg_path = Path(path) / "adapter_config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"adapter {path}: no adapter_config.json; pass a PEFT LoRA adapter directory")
        cfg = json.loads(cfg_path.read_text())
        mods = cfg.get("target_modules") or []
        targets += [m.rsplit(".", 1)[-1] for m in ([mods] if isinstance(mods, str) else mods)]
        rank = max(rank, int(cfg.get("r", 8)))
    return {"targets": sorted(set(targets)) or ["q_proj", "v_proj"], "lora_rank": rank or 8}


def settings_from_config(data: dict[str, Any], overrides: list[str] | None = None) -> tuple[str, Settings]:
    """Return ``(model, Settings)`` from a merge config (``base_model`` + ``method``) or an experiment config."""
    if "base_model" in data:
        from sst_merge.config import apply_overrides, validate
        from sst_merge.merge.api import MergeConfig

        return merge_settings(validate(MergeConfig, apply_overrides(dict(data), overrides), source="merge config"))
    from sst_merge.experiments.config import resolve_config

    return experiment_settings(resolve_config(data.get("mode", "minimal"), data, overrides))


def merge_settings(cfg: Any) -> tuple[str, Settings]:
    """Return ``(base model, Settings)`` of a validated ``MergeConfig``."""
    from sst_merge.config import validate

    s = Settings(n_adapters=len(cfg.adapters), output=cfg.output.format, sst=cfg.method == "sst",
                 ties=cfg.method == "ties", **_adapter_settings([a.path for a in cfg.adapters]))  # fmt: skip
    if cfg.method in ("sst", "safety_span"):
        from sst_merge.merge.sst import SafetySpanParams, SSTParams

        params = SafetySpanParams if cfg.method == "safety_span" else SSTParams
        sp = validate(params, dict(cfg.params), source="merge config params")
        s.sst = True
        s.fisher, s.n_samples, s.fisher_batch, s.fisher_length = (sp.fisher, sp.n_samples, sp.batch_size,
                                                                  sp.max_length)  # fmt: skip
        s.new_tokens, s.objectives = sp.max_new_tokens, _objectives(sp)
    passes = sum(a.weight != 0 for a in cfg.adapters)
    s.own, s.learned = _data_aware(cfg.method, dict(cfg.params), passes)
    return cfg.base_model, s


def _objectives(sp: Any) -> int:
    """SST's Fisher passes: F_s and F_u; ``space: input`` — the kfac pass over harmful, benign and utility inputs."""
    return 3 if sp.space == "input" else 2


#: the statistic each data-aware merge computes per adapter on its own data (merge/fisher_merge.py, merge/regmean.py)
OWN_FISHER = {"fisher_merge": "diagonal", "regmean": "kfac"}


def _data_aware(method: str, raw: dict[str, Any], passes: int) -> tuple[list[OwnPass], LearnedFit | None]:
    """The statistics passes of ``fisher_merge`` / ``regmean`` or the fit of ``learned`` (none for another method)."""
    from sst_merge.config import validate
    from sst_merge.merge import get_method

    if method not in (*OWN_FISHER, "learned"):
        return [], None
    p = validate(get_method(method).Params, raw, source=f"params of {method}")
    if method in OWN_FISHER:
        return [OwnPass(method, OWN_FISHER[method], passes, p.n_samples, p.batch_size, p.max_length,
                        p.max_new_tokens)], None  # fmt: skip
    from sst_merge.fisher.data import load_items

    weights = p.weights()
    benign = len(load_items(p.benign_data, need_response=False, what="benign_data")) if weights["benign"] > 0 else 0
    terms = sum(w > 0 for w in weights.values())
    return [], LearnedFit(p.steps, p.batch_size, p.max_length, terms, benign, p.loss_tokens)


def experiment_settings(cfg: Any) -> tuple[str, Settings]:
    """Return ``(model, Settings)`` of a resolved ``ExperimentConfig``."""
    from sst_merge.merge.sst import SSTParams
    from sst_merge.train.adapter import TrainConfig

    sp = SSTParams.model_validate(cfg.sst)
    paths = [p for p in [cfg.adapters.safety, *cfg.adapters.utility.values()] if p]
    train = TrainConfig()
    adapter = _adapter_settings(paths) if paths else {"targets": train.target_modules, "lora_rank": train.rank}
    s = Settings(dtype=cfg.dtype, device_map=cfg.device_map, fisher=sp.fisher, n_samples=sp.n_samples,
                 fisher_batch=sp.batch_size, fisher_length=sp.max_length, eval_batch=cfg.eval.batch_size,
                 new_tokens=cfg.eval.max_new_tokens, n_adapters=1 + max(1, len(cfg.utility_tasks)),
                 train_batch=train.batch_size, train_length=train.max_length,
                 train=not cfg.adapters.safety or not all(cfg.adapters.utility.get(t) for t in cfg.utility_tasks)
                 or ("multitask" in cfg.ceilings and not cfg.adapters.multitask),
                 ties="ties" in cfg.sweep.methods, objectives=_objectives(sp),
                 **adapter)  # fmt: skip
    for method in cfg.sweep.methods:
        own, learned = _data_aware(method, cfg.method_params(method), s.n_adapters)
        s.own += own
        s.learned = learned or s.learned
    return cfg.model, s
