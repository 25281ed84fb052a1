"""The plan: every step's estimate (:func:`estimate`), checked against the machine's memory (:func:`check_fit`), with
the one option that would fit when the run does not (:func:`plan_run`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sst_merge.fisher.solve import get_approximation
from sst_merge.machine import Rates
from sst_merge.models.shapes import Shape, model_shape
from sst_merge.plan.costs import (
    ACT_HIDDEN,
    ACT_INTER,
    BYTES,
    GEN_LAYER_OVERHEAD_S,
    GEN_TOKEN_OVERHEAD_S,
    apply_module_seconds,
    fisher_host_bytes,
    fisher_memory,
    fisher_pass_seconds,
    gevp_host_bytes,
    gevp_seconds,
    merge_module_seconds,
    targets_of,
    ties_module_seconds,
)
from sst_merge.plan.rates import GIB, measure_rates
from sst_merge.plan.settings import Settings

#: the approximation with the smallest statistics at scale (two d×d factors per module): with ``bfloat16``, the
#: planner's last suggestion whatever the run's approximation
LEAN_FISHER = "kfac"


@dataclass
class Step:
    """One step's estimate: peak bytes on the device and on the host (beyond the device's), FLOPs, seconds."""

    step: str
    device_bytes: float
    host_bytes: float
    seconds: float
    note: str = ""


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
        steps.append(
            Step(
                "train (one step)",
                P * 4 + act + lora,
                0,
                3 * flops_tok * tok / rates.matmul,
                f"fp32 copy (train loads float32), batch {s.train_batch}×{s.train_length}",
            )
        )

    T = s.prompt_tokens + s.new_tokens
    cache = 2 * L * kv * T * s.eval_batch * b
    logits = s.eval_batch * s.prompt_tokens * V * 4
    step_s = GEN_TOKEN_OVERHEAD_S + GEN_LAYER_OVERHEAD_S * L
    gen_s = s.new_tokens * (rates.decode_seconds(flops_tok / 2, s.eval_batch, b) + step_s)
    prefill_s = flops_tok * s.eval_batch * s.prompt_tokens / rates.matmul_at(s.eval_batch * s.prompt_tokens)
    steps.append(
        Step(
            "eval (one batch)",
            W + cache + logits,
            0,
            gen_s + prefill_s,
            f"KV cache {cache / GIB:.2f} GiB at batch {s.eval_batch} × {T} tokens; "
            f"{(gen_s / max(s.new_tokens, 1)) * 1e3:.0f} ms per new token",
        )
    )

    deltas = p * 4
    saved = p * b
    merge_s = sum(
        merge_module_seconds(o, i, s.n_adapters, s.lora_rank, rates) + apply_module_seconds(o, i, b, rates)
        for o, i in mods
    )
    if s.ties:
        merge_s += sum(ties_module_seconds(o, i, s.n_adapters, rates) for o, i in mods)
    steps.append(
        Step(
            "merge (ΔW applied)",
            W + saved,
            deltas + s.n_adapters * big * 4,
            merge_s,
            f"ΔW map {deltas / GIB:.2f} GiB (fp32, host); saved originals {saved / GIB:.2f} GiB",
        )
    )

    for own in s.own:  # fisher_merge / regmean: the Fisher pass's law, once per adapter on its own data
        os_ = replace(s, fisher=own.fisher, n_samples=own.n_samples, fisher_batch=own.batch, fisher_length=own.length)
        dev, host = fisher_memory(shape, os_)
        # at most: every item greedy-answered (items with a response are used as they are)
        answer_s = (
            math.ceil(own.n_samples / own.batch)
            * own.new_tokens
            * (rates.decode_seconds(flops_tok / 2, own.batch, b) + step_s)
        )
        seconds = own.passes * (fisher_pass_seconds(shape, os_, rates) + answer_s)
        steps.append(
            Step(
                f"{own.method} ({own.fisher}, N={own.n_samples} × {own.passes})",
                W + dev,
                host,
                seconds,
                f"one pass per adapter, greedy answers for items without a response (at most {own.n_samples} each)",
            )
        )

    if s.learned is not None:  # the training step's law (forward + backward = 3 forwards) per term and step
        lf = s.learned
        tok = lf.batch * lf.length
        act = tok * L * (ACT_HIDDEN * H + ACT_INTER * I) * b + tok * V * 4 * 2
        factors = s.n_adapters * sum(s.lora_rank * (o + i) for o, i in mods) * 4
        fit_s = lf.steps * lf.terms * 3 * flops_tok * tok / rates.matmul
        ref_s = (
            math.ceil(lf.benign / (2 * lf.batch))
            * lf.tokens
            * (rates.decode_seconds(flops_tok / 2, 2 * lf.batch, b) + step_s)
        )
        steps.append(
            Step(
                f"learned ({lf.steps} steps × {lf.terms})",
                W + act + factors,
                0,
                fit_s + ref_s,
                f"minibatch {lf.batch}×{lf.length} per term; {lf.benign} reference answers of {lf.tokens} tokens first",
            )
        )

    if s.sst:
        dev, host = fisher_memory(shape, s)
        n_ex = s.objectives * s.n_samples
        sample_s = (
            math.ceil(s.n_samples / s.fisher_batch)
            * s.new_tokens
            * (rates.decode_seconds(flops_tok / 2, s.fisher_batch, b) + step_s)
        )
        fs = s.objectives * fisher_pass_seconds(shape, s, rates) + sample_s
        steps.append(
            Step(
                f"fisher ({s.fisher}, N={s.n_samples} × {s.objectives})",
                W + dev,
                host,
                fs,
                f"statistics {fisher_host_bytes(shape, s) / GIB:.2f} GiB on the host; {n_ex} examples",
            )
        )

        gs = sum(gevp_seconds(s.fisher, o, i, s.n_samples, rates) for o, i in mods)
        g_mem = gevp_host_bytes(s.fisher, mods, s.n_samples)
        steps.append(
            Step("gevp + projection", W, host + g_mem, gs, f"{len(mods)} modules, largest {max(mods)}, on the host CPU")
        )

    if s.output == "full":
        steps.append(
            Step(
                "full output",
                0,
                P * 4 + deltas,
                P * 4 * 3 / rates.bandwidth,
                f"a fresh fp32 copy of the base on the host: {P * 4 / GIB:.1f} GiB",
            )
        )
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
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "steps": [asdict(s) for s in self.steps],
            "memory": asdict(self.memory),
            "rates": asdict(self.rates),
            "on_gpu": self.on_gpu,
            "peak_device_bytes": dev,
            "peak_host_bytes": host,
            "fits": self.problem is None,
            "problem": self.problem,
        }

    def table(self) -> str:
        where = f"GPU ({self.memory.name}, {self.memory.gpus}×)" if self.on_gpu else "CPU (host memory)"
        lines = [
            f"plan for {self.model} on {where}, dtype {self.settings.dtype}"
            + (f", SST {self.settings.fisher} N={self.settings.n_samples}" if self.settings.sst else ""),
            f"{'step':<32} {'device GiB':>10} {'host GiB':>9} {'time':>10}  note",
        ]
        for st in self.steps:
            host = st.host_bytes if self.on_gpu else st.host_bytes + st.device_bytes
            dev = f"{st.device_bytes / GIB:.2f}" if self.on_gpu else "-"
            lines.append(f"{st.step:<32} {dev:>10} {host / GIB:>9.2f} {_fmt_s(st.seconds):>10}  {st.note}")
        dev, host = self.peaks()
        lines.append(
            f"peak: device {dev / GIB:.2f} GiB of {self.memory.device / GIB:.1f} GiB available; host "
            f"{host / GIB:.2f} GiB of {self.memory.host / GIB:.1f} GiB"
            + ("" if self.rates.measured else " (projected rates)")
        )
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
    what = (
        f"needs {dev / GIB:.1f} GiB on the device ({cap:.1f} GiB free) and {host / GIB:.1f} GiB of host memory "
        f"({memory.host / GIB:.1f} GiB available)"
    )
    tries: list[tuple[str, Settings]] = []
    approx = get_approximation(s.fisher)
    if s.sst:  # the approximation's own alternatives, then a smaller N where its statistics grow with N
        tries += [(f"sst.fisher={alt}", replace(s, fisher=alt)) for alt in approx.plan_alternatives]
        if approx.memory_grows_with_n:
            tries += [(f"sst.n_samples={n}", replace(s, n_samples=n)) for n in (16, 8, 4, 2) if n < s.n_samples]
    if s.dtype == "float32":
        tries.append(("dtype=bfloat16", replace(s, dtype="bfloat16")))
    if on_gpu and memory.gpus > 1 and s.device_map != "auto":
        tries.append(("device_map=auto", replace(s, device_map="auto")))
    if s.dtype == "float32":
        tries.append((f"dtype=bfloat16 and sst.fisher={LEAN_FISHER}", replace(s, dtype="bfloat16", fisher=LEAN_FISHER)))
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
        rates = measure_rates(
            "cuda" if on_gpu else "cpu",
            settings.dtype,
            width=min(shape.hidden, 4096),
            inner=min(shape.intermediate, 16384),
        )
    steps = estimate(shape, settings, rates)
    plan = Plan(model, settings, steps, memory, rates, on_gpu)
    plan.problem = check_fit(shape, settings, memory, rates, on_gpu)
    return plan
