"""The machine's rates: measured here (:func:`measure_rates`, ≈ 2 s on an idle core) or projected for a GPU of the
scaling table (:func:`gpu_rates`). :class:`~sst_merge.machine.Rates` itself lives in :mod:`sst_merge.machine`, where
the cost laws of the Fisher approximations and merge methods can read it.
"""

from __future__ import annotations

import math
import time

import scipy.linalg
import torch

from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.lowrank import lowrank_gram_flops
from sst_merge.fisher.solve import project_module
from sst_merge.machine import MMAP_THRESHOLD, Rates
from sst_merge.merge.ties import Ties
from sst_merge.models.loading import DTYPES

__all__ = ["MMAP_THRESHOLD", "Rates"]  # re-exported; the rest is this module's own

GIB = 2**30
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


#: The calibration shapes of the GEVP kernels (none of them a seed model's module): ``eigh`` on a 768×768 pair,
#: the diagonal selection on a 1024×2048 module, lowrank's solve (N = 4) on a 256×512 module (its fp64 copies,
#: 4 MiB, stay below :data:`MMAP_THRESHOLD`: the ``rows`` rate excludes page faults, which ``fault`` prices).
CALIBRATION = {"eigh_d": 768, "module": (1024, 2048), "lowrank_n": 4, "lowrank_module": (256, 512)}
#: row counts of the short GEMMs timed for :attr:`Rates.matmul_curve` (plus 1024)
CURVE_ROWS = (64, 128, 256, 512)


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
    return Rates(
        matmul=matmul,
        fp64=fp64,
        bandwidth=bw,
        heap_bandwidth=heap_bw,
        fault=measure_fault_rate(clock),
        device_faults=not on_gpu,
        matmul_curve=curve,
        decode_curve=decode,
        **measure_gevp_rates(fp64, clock),
    )


def measure_matmul_curve(device: str, dtype: str, width: int, clock=time.perf_counter) -> tuple:
    """FLOP/s of (rows × width) @ (width × width) for rows in :data:`CURVE_ROWS` and 1024: a GEMM with few rows
    runs below the square's rate (the weight is streamed and packed once per call, whatever the row count)."""
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
    x = torch.randn(64 * 2**20 // 4)
    y = torch.empty_like(x)
    fresh = _median_seconds(lambda: x * 2, clock, repeat=5)
    reused = _median_seconds(lambda: torch.mul(x, 2, out=y), clock, repeat=5)
    return x.numel() * 4 / max(fresh - reused, fresh / 20)


def measure_gevp_rates(fp64: float, clock=time.perf_counter) -> dict[str, float]:
    """Time the GEVP kernels on the :data:`CALIBRATION` shapes; return ``eigh``, ``sort``, ``rows`` and ``ties``."""
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
    g = torch.Generator().manual_seed(0)
    o, i = CALIBRATION["module"]
    taus = [torch.randn(o, 8, generator=g) @ torch.randn(8, i, generator=g) for _ in range(2)]  # rank-8 ΔW, as LoRA's
    method = Ties()
    params = method.Params(density=0.5)
    t = _median_seconds(lambda: method.merge_module(taus, [0.5, 0.5], params, g), clock)
    return 2 * o * i / t


def gpu_rates(name: str) -> Rates:
    """Projected rates of a GPU of :data:`GPUS` (nominal × :data:`GPU_EFFICIENCY`)."""
    g = GPUS[name]
    # the eigen-solvers and the λ selection run on the host CPU (scipy), whatever the device: host rates assumed
    return Rates(
        **{k: g[k] * GPU_EFFICIENCY[k] for k in ("matmul", "bandwidth")},
        fp64=HOST_FP64,
        sort=HOST_SORT,
        eigh=HOST_EIGH,
        rows=HOST_ROWS,
        fault=HOST_FAULT,
        device_faults=False,
        measured=False,
    )
