"""What a machine does per second: the :class:`Rates` every cost law reads (the planner's, and the laws each Fisher
approximation and merge method carries for it), and the page-fault threshold behind them.

Layer 0 (stdlib only), so :mod:`sst_merge.fisher` and :mod:`sst_merge.merge` can price their own kernels without
importing :mod:`sst_merge.plan`; :mod:`sst_merge.plan.rates` measures the rates (or projects them for a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: glibc's largest ``mmap`` threshold (64-bit): a host buffer at least this large is mapped fresh for every
#: allocation and freed back to the kernel, so writing it first faults in every page (:attr:`Rates.fault`). Smaller
#: temporaries are reused from the heap. Measured step on this project's machine: a fresh 31 MiB result is written at
#: 23 GB/s, a 33 MiB one at 4.2 GB/s with every page faulted (``bench/shapes.py faults``).
MMAP_THRESHOLD = 32 * 2**20


@dataclass
class Rates:
    """Throughputs of the machine the plan is for (measured with :func:`sst_merge.plan.rates.measure_rates` or given).

    ``sort``, ``eigh``, ``rows`` and ``ties`` are the rates of this project's own kernels, measured by running them on
    fixed calibration shapes (:data:`sst_merge.plan.rates.CALIBRATION`) and carried to a module's shape by the
    kernel's cost law (each approximation's :meth:`~sst_merge.fisher.approximation.Approximation.gevp_seconds`).
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
        return on_curve(self.matmul_curve, rows, self.matmul)

    def decode_seconds(self, params: float, batch: int, dtype_bytes: int) -> float:
        """Seconds of one decoding step of ``batch`` sequences through ``params`` weights: 2·params·batch FLOPs at
        :attr:`decode_curve`'s rate for ``batch`` rows (a GEMM with few rows over weights that do not stay in the
        cache: one thread here streamed them at 14–16 GB/s with 1 row but 5–8 GB/s with 8); without a curve
        (projected rates) the longer of one read of the weights and the FLOPs at :attr:`matmul`."""
        if not self.decode_curve:
            return max(params * dtype_bytes / self.bandwidth, 2 * params * batch / self.matmul)
        return 2 * params * batch / on_curve(self.decode_curve, batch, self.matmul)

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


def on_curve(curve: tuple, rows: int, default: float) -> float:
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


def p_copies_seconds(p: int, copies: tuple[int, int], rates: Rates) -> float:
    """Page faults of ``copies`` = (fp64, fp32) fresh host buffers of p elements (each only at MMAP_THRESHOLD)."""
    return copies[0] * rates.fresh_seconds(p * 8) + copies[1] * rates.fresh_seconds(p * 4)
