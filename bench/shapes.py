"""Benchmark: per-layer costs of the seed architectures at cut depth, extrapolated to full depth, vs ``sst-merge plan``.

Timings are CPU seconds of this process (``time.process_time``) with one thread, rates included: on a shared machine
the wall clock measures the other jobs, the CPU time measures the work.

``calibrate`` — fits ``plan.FISHER_ACT_PASSES`` (the Fisher pass's work besides its matmuls) on ONE shape: a
SmolLM2-135M layer, one Fisher batch of 8 × 64 tokens (``diagonal``). The GEVP kernels need no fit:
``plan.measure_rates`` times them on fixed calibration shapes (``plan.CALIBRATION``: a 768² eigenproblem, a
1024×2048 and a 256×512 module) and their cost laws carry them to any module.

``measure`` (default) — the check, on other shapes: for each architecture a randomly initialised model with the real
per-layer shapes, one decoder layer and a 512-token vocabulary (fp32):

* Fisher per approximation (diagonal, kfac, lowrank) over q_proj and v_proj, one ``estimate_fisher`` call of one
  batch (``--fisher-batches``, default 1, 2 and 8 examples × 64 tokens): CPU time (median of 3) and peak memory
  above the loaded model (resident-set high-water mark);
* GEVP + projection per module (q_proj, v_proj) at the module's real dims, per approximation (lowrank N = 4, and
  N = 16 where N·p ≤ 20 M), with random statistics of the real sizes (kfac skipped above ``--kfac-max-dim``);
* (``--steps merge,gen``) merge per module and generation per new token.

Each is compared with :mod:`sst_merge.plan`'s estimate for the same shapes and settings, using the rates measured at
the start of the same run, and extrapolated to full depth (× layers). GPU figures in the JSON are projections from
nominal rates (``plan.GPUS``), marked ``projected``.

``full`` — the laws at full depth on the embedded default loaded for real (SmolLM2-135M: Fisher passes over q and
v of all 30 layers, one evaluation batch of greedy generation).

``faults`` — the page-fault step behind ``plan.MMAP_THRESHOLD``: an elementwise op into a fresh result vs a
preallocated one, 8–128 MiB.

``rehearse`` — the whole toolkit on one architecture (``sst_merge.rehearsal``), e.g. a full-depth random-init
Llama-3.1-8B on a GPU, printing each step's time and peak GPU memory::

    PYTHONPATH=src python bench/shapes.py rehearse --arch llama-3.1-8b --dtype bfloat16 --synthetic \\
        --steps eval,exp1 --adapter-layers 30,31 -o bench/results/rehearse_llama8b_gpu.json

Usage::

    export PYTHONPATH=src OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    python bench/shapes.py calibrate
    python bench/shapes.py measure -o bench/results/shapes.json     # ≈ 10 min of one idle core
    python bench/shapes.py faults -o bench/results/faults.json
    python bench/shapes.py full -o bench/results/shapes_full_smollm2.json   # ≈ 2 min
    python bench/shapes.py table
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import emit  # noqa: E402

from sst_merge.models.shapes import SEED_MODELS, SHAPES, random_model_dir, shape_config  # noqa: E402
from sst_merge.plan import (  # noqa: E402
    CALIBRATION,
    FISHER_ACT_PASSES,
    GIB,
    GPUS,
    PER_EXAMPLE_BYTES,
    Rates,
    Settings,
    Shape,
    estimate,
    gpu_rates,
    measure_decode_curve,
    measure_matmul_curve,
    measure_rates,
)
from sst_merge.rehearsal import _rss_peak, _rss_peak_reset  # noqa: E402

VOCAB = 512
CALIBRATION_ARCH = "smollm2-135m"  # the Fisher constant is fitted on this layer only; the others check it
TARGETS = ["q_proj", "v_proj"]


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def timed(fn, repeat: int = 1) -> tuple[float, int, object]:
    """Median CPU seconds of this process over ``repeat`` runs (one thread: the work, not the machine's load) and
    the peak resident memory above the start (bytes)."""
    times, peak, out = [], 0, None
    for _ in range(repeat):
        base = _rss()
        _rss_peak_reset()
        t = time.process_time()
        out = fn()
        times.append(time.process_time() - t)
        peak = max(peak, (_rss_peak() or 0) - base)
    return sorted(times)[len(times) // 2], peak, out


def examples(tok_len: int, n: int) -> list:
    from sst_merge.fisher.data import Example

    g = torch.Generator().manual_seed(0)
    half = tok_len // 2
    return [
        Example(tuple(torch.randint(4, VOCAB, (half,), generator=g).tolist()),
                tuple(torch.randint(4, VOCAB, (half,), generator=g).tolist()))
        for _ in range(n)
    ]  # fmt: skip


def cut_model(alias: str):
    from transformers import AutoModelForCausalLM

    cfg = shape_config(alias, num_layers=1, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    return model, Shape.from_config(cfg)


def fisher_rows(alias: str, rates, approximations=("diagonal", "kfac", "lowrank"), batch=2, length=64, repeat=3):
    """Fisher pass of one batch (``batch`` × ``length`` tokens) over q_proj and v_proj of a one-layer model: measured
    CPU seconds and peak memory of one ``estimate_fisher`` call (one batch and the pass's work on its statistics),
    and the plan's ``fisher_pass_seconds`` and memory for the same settings."""
    from sst_merge.fisher.estimate import estimate_fisher
    from sst_merge.plan import fisher_host_bytes, fisher_pass_seconds

    model, shape = cut_model(alias)
    # the short-GEMM curve on this architecture's width, as ``plan`` measures it for this model
    rates = replace(rates, matmul_curve=measure_matmul_curve("cpu", "float32", min(shape.hidden, 4096),
                                                             clock=time.process_time))  # fmt: skip
    names = [f"model.layers.0.self_attn.{t}" for t in TARGETS]
    mods = shape.modules()
    rows = []
    exs = examples(length, batch)
    for approx in approximations:
        s = Settings(fisher=approx, n_samples=batch, fisher_batch=batch, fisher_length=length, targets=TARGETS,
                     new_tokens=0)  # fmt: skip
        st = {x.step.split(" ")[0]: x for x in estimate(shape, s, rates)}["fisher"]
        # plan's device part minus the loaded weights + the host statistics of ONE Fisher (F_s), as measured here
        est_b = st.device_bytes - shape.params() * 4 + st.host_bytes - fisher_host_bytes(shape, s) / 2
        est_b -= sum(mods[t][0] * mods[t][1] for t in TARGETS) * 4
        sec, peak, _ = timed(lambda approx=approx: estimate_fisher(
            model, names, exs, approx, 0, batch_size=batch, show_progress=False), repeat=repeat)  # fmt: skip
        rows.append(_row(f"fisher {approx} (q,v; batch {batch}×{length})", sec, peak,
                         fisher_pass_seconds(shape, s, rates, batch), est_b))  # fmt: skip
    return rows, model, shape


def _row(step: str, seconds: float, peak: int, est_s: float, est_b: float) -> dict:
    r = {"step": step, "measured_s": round(seconds, 4), "measured_peak_bytes": peak, "plan_s": round(est_s, 4),
         "plan_bytes": int(est_b), "time_ratio": round(seconds / est_s, 3) if est_s else None,
         "memory_ratio": round(peak / est_b, 3) if est_b else None}  # fmt: skip
    print(f"  {step}: {seconds:.3f} CPU s (plan {est_s:.3f}, ×{r['time_ratio']}), peak +{peak / 2**20:.0f} MiB "
          f"(plan {est_b / 2**20:.0f})", file=sys.stderr, flush=True)  # fmt: skip
    return r


def measure_arch(
    alias: str,
    rates,
    gen_tokens: int = 8,
    kfac_max_dim: int = 4096,
    steps=("gevp", "merge", "gen"),
    batches=((2, 64),),
) -> dict:
    from sst_merge.fisher.gevp import Selection
    from sst_merge.fisher.solve import project_module
    from sst_merge.plan import merge_module_seconds, ties_module_seconds

    full = Shape.from_config(shape_config(alias))
    rows, model, shape = [], None, None
    for b, t in batches:
        more, model, shape = fisher_rows(alias, rates, batch=b, length=t)
        rows += more
    mods = shape.modules()
    out: dict = {"alias": alias, "source": SHAPES[alias]["source"], "layers_measured": 1, "vocab_measured": VOCAB,
                 "full_layers": full.layers, "rows": rows}  # fmt: skip

    # -- GEVP + projection per module shape, at the module's real dims ---------------------------------------------
    g = torch.Generator().manual_seed(1)
    one = Shape(**{**shape.__dict__, "layers": 1})
    for t in TARGETS if "gevp" in steps else []:
        o, i = mods[t]
        tau = torch.randn(o, i, generator=g) * 1e-3
        # lowrank at N = 4 and, where its rows stay small (N·p ≤ 20 M), N = 16
        cases = [("diagonal", 4), ("kfac", 4), ("lowrank", 4)] + ([("lowrank", 16)] if 16 * o * i <= 20e6 else [])
        for approx, n in cases:
            if approx == "kfac" and max(o, i) > kfac_max_dim:
                continue
            s = Settings(fisher=approx, n_samples=n, targets=[t])
            st = {x.step.split(" ")[0]: x for x in estimate(one, s, rates)}["gevp"]
            if approx == "diagonal":
                ss, su = {"diag": torch.rand(o, i, generator=g)}, {"diag": torch.rand(o, i, generator=g) + 0.1}
            elif approx == "kfac":

                def spd(d):
                    x = torch.randn(d, d // 4, generator=g)
                    return x @ x.T / d + 0.1 * torch.eye(d)

                ss, su = {"A": spd(i), "G": spd(o)}, {"A": spd(i), "G": spd(o)}
            else:
                ss, su = {"rows": torch.randn(n, o * i, generator=g)}, {"rows": torch.randn(n, o * i, generator=g)}
            sec, peak, _ = timed(lambda a=approx, ss=ss, su=su, tau=tau: project_module(
                a, ss, su, tau, 1e-3, Selection(fraction=0.1)), repeat=3)  # fmt: skip
            # the plan's gevp host bytes hold the statistics and the ΔW map too; those are this call's inputs
            work = st.host_bytes - fisher_stats_bytes(one, s, t) - o * i * 4
            label = f"gevp {approx} {t} {o}x{i}" + (f" (N = {n})" if approx == "lowrank" else "")
            out["rows"].append(_row(label, sec, peak, st.seconds, work))
            del ss, su

    if "merge" not in steps:
        return _full_depth(out, full, rates)
    # -- merge per module, in a fresh process: a long-lived one may serve the big matrices from heap freed by the
    # rows above, without the page faults the law counts (a merge command's own process has no such heap) --------
    o, i = mods["q_proj"]
    s = Settings(targets=["q_proj"], n_adapters=2, sst=False)
    st = {x.step.split(" ")[0]: x for x in estimate(one, s, rates)}["merge"]
    m = _merge_in_fresh_process(o, i)
    out["rows"].append(_row(f"merge task_arithmetic q_proj {o}x{i} (2 adapters, rank 8)", *m["task_arithmetic"],
                            merge_module_seconds(o, i, 2, 8, rates), st.host_bytes - o * i * 4 * 2))  # fmt: skip
    out["rows"].append(_row(f"merge ties q_proj {o}x{i} (2 adapters, density 0.5; from their ΔW)", *m["ties"],
                            ties_module_seconds(o, i, 2, rates), 0))  # fmt: skip

    # -- generation per token -----------------------------------------------------------------------------------
    ids = torch.randint(4, VOCAB, (1, 32), generator=g)
    s = Settings(eval_batch=1, prompt_tokens=32, new_tokens=gen_tokens, sst=False)
    decode = measure_decode_curve("cpu", "float32", min(shape.hidden, 4096), min(shape.intermediate, 16384),
                                  clock=time.process_time)  # as plan measures it for this model  # fmt: skip
    st = {x.step.split(" ")[0]: x for x in estimate(shape, s, replace(rates, decode_curve=decode))}["eval"]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

        def gen(n):
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        t1, _, _ = timed(lambda: gen(1), repeat=3)
        tn, peak, _ = timed(lambda: gen(gen_tokens + 1), repeat=3)
    per_tok = (tn - t1) / gen_tokens
    prefill = 2 * (shape.params() - VOCAB * shape.hidden) * 32 / rates.matmul
    out["rows"].append(_row("generation per new token (batch 1)", per_tok, peak, (st.seconds - prefill) / gen_tokens,
                            0))  # fmt: skip
    _full_depth(out, full, rates)
    # generation at full depth: plus the real output head (one hidden×vocab read per token)
    head = full.vocab * full.hidden * 4 / rates.bandwidth
    out["rows"][-1]["full_depth_s"] = round(per_tok * full.layers + head, 3)
    out["rows"][-1]["full_depth_plan_s"] = round((st.seconds - prefill) / gen_tokens * full.layers + head, 3)
    return out


_MERGE_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
from shapes import timed
from sst_merge.merge.sparsify import weighted_sum
from sst_merge.merge.ties import Ties
o, i = {o}, {i}
# a real run loads a model first, which frees buffers near glibc's 32 MiB cap and so raises its mmap and trim
# thresholds: smaller buffers are then reused from the heap. A fresh interpreter starts at 128 KiB.
torch.empty(31 * 2**20 // 4).fill_(0)
g = torch.Generator().manual_seed(1)
factors = [(torch.randn(o, 8, generator=g), torch.randn(8, i, generator=g)) for _ in range(2)]
# what task_arithmetic does per module: ΔW_i = s·B_i@A_i (LoraAdapter.delta), then weighted_sum × λ
merge = lambda: weighted_sum([1.0 * (b @ a) for b, a in factors], [0.5, 0.5]) * 1.0
merge()  # warm-up: a merge over many modules reuses its heap for buffers below the mmap threshold
ta = timed(merge, repeat=3)
taus = [b @ a for b, a in factors]
method = Ties()
params = method.Params(density=0.5)
method.merge_module(taus, [0.5, 0.5], params, g)
ties = timed(lambda: method.merge_module(taus, [0.5, 0.5], params, g), repeat=3)
print(json.dumps({{"task_arithmetic": ta[:2], "ties": ties[:2]}}))
"""


def _merge_in_fresh_process(o: int, i: int) -> dict:
    """CPU seconds and peak memory of one module's task-arithmetic and TIES merge, timed in a fresh process."""
    import json
    import subprocess

    code = _MERGE_CHILD.format(bench=str(Path(__file__).resolve().parent), o=o, i=i)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _full_depth(out: dict, full: Shape, rates) -> dict:
    for r in out["rows"]:  # full depth: per layer × layers (GEVP and merge: per module, × layers as well)
        r["full_depth_s"] = round(r["measured_s"] * full.layers, 2)
        r["full_depth_plan_s"] = round(r["plan_s"] * full.layers, 2)
    return out


def fisher_stats_bytes(shape: Shape, s: Settings, t: str) -> float:
    """The statistics handed to the GEVP (inputs of the measured call, allocated before it): not part of its peak."""
    from sst_merge.plan import fisher_host_bytes

    one = Shape(**{**shape.__dict__, "layers": 1})
    return fisher_host_bytes(one, Settings(fisher=s.fisher, n_samples=s.n_samples, targets=[t])) + 0


def projections(rates) -> dict:
    """Full-depth plans of the three seed models on this CPU (measured rates) and on the GPUs (projected)."""
    out = {}
    for alias in SEED_MODELS:
        full = Shape.from_config(shape_config(alias))
        out[alias] = {"params": full.params()}
        for fisher in ("diagonal", "kfac", "lowrank"):
            for where, r, dtype in [("cpu", rates, "float32"), *[(g, gpu_rates(g), "bfloat16") for g in GPUS]]:
                s = Settings(dtype=dtype, fisher=fisher, n_samples=64 if fisher != "lowrank" else 16,
                             eval_batch=16, prompt_tokens=128, new_tokens=64, output="full")  # fmt: skip
                steps = estimate(full, s, r)
                out[alias][f"{where}/{fisher}"] = {
                    "projected": where != "cpu",
                    "steps": {st.step: {"device_gib": round(st.device_bytes / GIB, 2),
                                        "host_gib": round(st.host_bytes / GIB, 2),
                                        "seconds": round(st.seconds, 2)} for st in steps},
                }  # fmt: skip
    return out


def cmd_measure(args) -> dict:
    load = os.getloadavg()
    rates = measure_rates("cpu", "float32", clock=time.process_time)
    print(f"load {load}, rates (CPU time, {torch.get_num_threads()} thread): {_rates_text(rates)}", file=sys.stderr)
    report = {
        "machine": {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "loadavg_start": load, "torch": torch.__version__, "clock": "process_time"},
        "constants": {"FISHER_ACT_PASSES": FISHER_ACT_PASSES, "PER_EXAMPLE_BYTES": PER_EXAMPLE_BYTES,
                      "CALIBRATION": CALIBRATION},
        "rates": {k: v for k, v in rates.__dict__.items()},
        "archs": [measure_arch(a, rates, kfac_max_dim=args.kfac_max_dim, steps=args.steps.split(","),
                               batches=[tuple(map(int, x.split("x"))) for x in args.fisher_batches.split(",")])
                  for a in args.archs.split(",")],
        "gpu_rates_projected": {g: {k: v for k, v in gpu_rates(g).__dict__.items()} for g in GPUS},
    }  # fmt: skip
    report["projections"] = projections(rates)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["rates_end"] = {k: v for k, v in measure_rates("cpu", "float32", clock=time.process_time).__dict__.items()}
    return report


def _rates_text(r) -> str:
    return (f"matmul {r.matmul / 1e9:.1f} GFLOP/s, fp64 {r.fp64 / 1e9:.1f} GFLOP/s, bandwidth {r.bandwidth / 1e9:.1f} "
            f"GB/s, eigh {r.eigh:.3g} d³/s, sort {r.sort:.3g} p·log2p/s, rows {r.rows:.3g} N·p/s")  # fmt: skip


def cmd_calibrate(args) -> dict:
    """Fit ``plan.FISHER_ACT_PASSES`` on ONE shape: a SmolLM2-135M layer, one batch of 8 × 64 tokens (diagonal)."""
    from sst_merge.plan import fisher_activation_seconds

    rates = measure_rates("cpu", "float32", clock=time.process_time)
    batch, length = 8, 64
    rows, _, shape = fisher_rows(CALIBRATION_ARCH, rates, ("diagonal",), batch=batch, length=length, repeat=5)
    s = Settings(fisher="diagonal", n_samples=batch, fisher_batch=batch, fisher_length=length, targets=TARGETS)
    one = fisher_activation_seconds(shape, s, rates, passes=1.0)
    rest = rows[0]["plan_s"] - FISHER_ACT_PASSES * one  # the plan without its activation passes
    fitted = (rows[0]["measured_s"] - rest) / one
    print(f"FISHER_ACT_PASSES = {fitted:.1f} (now {FISHER_ACT_PASSES})", file=sys.stderr)
    return {"arch": CALIBRATION_ARCH, "batch": [batch, length], "rates": dict(rates.__dict__), "row": rows[0],
            "FISHER_ACT_PASSES": round(fitted, 1)}  # fmt: skip


def cmd_full(args) -> dict:
    """The laws at full depth on the embedded default, loaded for real: SmolLM2-135M (30 layers, its 49 152-token
    head), Fisher passes over q and v of every layer and one evaluation batch of greedy generation, against the plan
    with rates measured in the same process."""
    from sst_merge.fisher.data import Example
    from sst_merge.fisher.estimate import estimate_fisher
    from sst_merge.models.loading import load_model
    from sst_merge.plan import fisher_pass_seconds, model_shape

    model, _ = load_model(args.model)
    model.eval()
    shape = model_shape(args.model)
    rates = measure_rates("cpu", "float32", clock=time.process_time, width=min(shape.hidden, 4096),
                          inner=min(shape.intermediate, 16384))  # fmt: skip
    names = [f"model.layers.{i}.self_attn.{t}" for i in range(shape.layers) for t in TARGETS]
    g = torch.Generator().manual_seed(0)
    rows = []
    for approx, n, b, length in [("diagonal", 16, 8, 128), ("kfac", 16, 8, 128), ("lowrank", 16, 8, 128),
                                 ("diagonal", 8, 2, 64)]:  # fmt: skip
        exs = [Example(*(tuple(torch.randint(4, shape.vocab, (length // 2,), generator=g).tolist()) for _ in "pr"))
               for _ in range(n)]  # fmt: skip
        estimate_fisher(model, names, exs[:b], approx, 0, batch_size=b, show_progress=False)  # warm-up
        sec, peak, _ = timed(lambda exs=exs, approx=approx, b=b: estimate_fisher(
            model, names, exs, approx, 0, batch_size=b, show_progress=False))  # fmt: skip
        s = Settings(fisher=approx, n_samples=n, fisher_batch=b, fisher_length=length, targets=TARGETS)
        rows.append(_row(f"fisher {approx} (q,v of {shape.layers} layers; N = {n}, batch {b}×{length})", sec, peak,
                         fisher_pass_seconds(shape, s, rates), 0))  # fmt: skip
    batch, prompt, new = 8, 64, 32
    ids = torch.randint(4, shape.vocab, (batch, prompt), generator=g)
    s = Settings(eval_batch=batch, prompt_tokens=prompt, new_tokens=new, sst=False)
    st = {x.step.split(" ")[0]: x for x in estimate(shape, s, rates)}["eval"]
    with torch.no_grad():
        gen = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,  # noqa: E731
                                     min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
        gen()
        sec, peak, _ = timed(gen)
    rows.append(_row(f"eval batch ({batch} × {prompt} prompt tokens, {new} new, greedy)", sec, peak, st.seconds, 0))
    return {"model": args.model, "clock": "process_time", "threads": torch.get_num_threads(),
            "rates": dict(rates.__dict__), "rows": rows}  # fmt: skip


def cmd_faults(args) -> dict:
    """The page-fault step behind ``plan.MMAP_THRESHOLD``: ``x * 2`` into a fresh result vs a preallocated one, per
    size, with the minor page faults per call (``getrusage``)."""
    import resource

    rows = []
    for mib in (8, 16, 24, 31, 33, 48, 64, 128):
        x = torch.randn(mib * 2**20 // 4)
        y = torch.empty_like(x)

        def med(fn):
            fn()
            ts = []
            for _ in range(7):
                t = time.process_time()
                fn()
                ts.append(time.process_time() - t)
            return sorted(ts)[3]

        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fresh = med(lambda x=x: x * 2)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 8
        reused = med(lambda x=x, y=y: torch.mul(x, 2, out=y))
        rows.append({"mib": mib, "fresh_gb_s": round(2 * x.numel() * 4 / fresh / 1e9, 1),
                     "preallocated_gb_s": round(2 * x.numel() * 4 / reused / 1e9, 1), "faults_per_call": faults})  # fmt: skip
        print(f"{mib} MiB: fresh {rows[-1]['fresh_gb_s']} GB/s, preallocated {rows[-1]['preallocated_gb_s']} GB/s, "
              f"{faults:.0f} page faults per call", file=sys.stderr)  # fmt: skip
    return {"clock": "process_time", "threads": torch.get_num_threads(), "rows": rows}


def cmd_rehearse(args) -> dict:
    from sst_merge.rehearsal import rehearse

    work = Path(args.work or tempfile.mkdtemp(prefix="sst-rehearse-"))
    t = time.perf_counter()
    model_dir = random_model_dir(args.arch, work / "model", num_layers=args.layers, vocab_size=args.vocab,
                                 dtype=args.dtype)  # fmt: skip
    build = time.perf_counter() - t
    layers = [int(x) for x in args.adapter_layers.split(",")] if args.adapter_layers else None
    steps = tuple(args.steps.split(","))
    t = time.perf_counter()
    res = rehearse(model_dir, work / "run", synthetic=args.synthetic, steps=steps, dtype=args.dtype,
                   adapter_layers=layers, exp1_fisher=args.fisher, n_items=args.items)  # fmt: skip
    total = time.perf_counter() - t
    report = {"arch": args.arch, "layers": args.layers or SHAPES[args.arch]["num_hidden_layers"], "dtype": args.dtype,
              "build_model_s": round(build, 1), "rehearsal_s": round(total, 1), "steps": res,
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "peak_cuda_gib": max((r.get("peak_cuda_bytes") or 0) for r in res.values()) / GIB,
              "peak_rss_gib": max((r.get("peak_rss_bytes") or 0) for r in res.values()) / GIB}  # fmt: skip
    for name, r in res.items():
        cuda = f", peak GPU {r['peak_cuda_bytes'] / GIB:.2f} GiB" if "peak_cuda_bytes" in r else ""
        print(f"{name}: {r['seconds']:.1f} s, peak RSS {(r.get('peak_rss_bytes') or 0) / GIB:.2f} GiB{cuda}",
              file=sys.stderr)  # fmt: skip
    return report


def cmd_table(args) -> str:
    """Markdown tables for docs/scaling.md from a ``measure`` JSON (measured rows) and the plan (fits per machine)."""
    import json

    from sst_merge.plan import Memory, check_fit

    doc = json.loads(Path(args.input).read_text())
    lines = ["| architecture | step (one layer, cut depth) | measured (CPU s) | plan | measured / plan | within 25% "
             "| measured × layers | plan × layers |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arch in doc["archs"]:
        for r in arch["rows"]:
            mem = f", +{r['measured_peak_bytes'] / 2**20:.0f} MiB" if r["measured_peak_bytes"] > 2**20 else ""
            pmem = f", {r['plan_bytes'] / 2**20:.0f} MiB" if r["plan_bytes"] > 2**20 else ""
            ratio = r["time_ratio"]
            ok = "—" if ratio is None else ("yes" if 0.75 <= ratio <= 1.25 else "**no**")
            name = arch["alias"] + (" (calibration)" if arch["alias"] == CALIBRATION_ARCH else "")
            lines.append(f"| {name} | {r['step']} | {r['measured_s']:.3g} s{mem} | {r['plan_s']:.3g} s{pmem} "
                         f"| {ratio} | {ok} | {_fmt(r.get('full_depth_s'))} | {_fmt(r.get('full_depth_plan_s'))} |")  # fmt: skip
    lines += ["", "| architecture | machine | Fisher | weights | peak device GiB | peak host GiB | Fisher pass | GEVP "
              "| eval batch (16 × 64 new tokens) | fits |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    cpu_rates = Rates(**doc["rates"])
    machines = [("this CPU (24 GiB)", Memory(24 * GIB, 24 * GIB), cpu_rates, "float32", False)]
    machines += [(f"{g} (projected)", Memory(GPUS[g]["memory_gib"] * GIB, GPUS[g]["host_gib"] * GIB, 1, g),
                  gpu_rates(g), "bfloat16", True) for g in GPUS]  # fmt: skip
    for alias in SEED_MODELS:
        full = Shape.from_config(shape_config(alias))
        for name, mem, rates, dtype, on_gpu in machines:
            for fisher in ("diagonal", "kfac", "lowrank"):
                s = Settings(dtype=dtype, fisher=fisher, n_samples=64 if fisher != "lowrank" else 16, eval_batch=16,
                             prompt_tokens=128, new_tokens=64)  # fmt: skip
                steps = {st.step.split(" ")[0]: st for st in estimate(full, s, rates)}
                from sst_merge.plan import Plan

                plan = Plan(alias, s, list(steps.values()), mem, rates, on_gpu)
                dev, host = plan.peaks()
                problem = check_fit(full, s, mem, rates, on_gpu)
                fits = (
                    "yes" if problem is None else "no" + (f": {problem.split('; ')[-1]}" if "--set" in problem else "")
                )
                lines.append(f"| {alias} | {name} | {fisher}{' N=16' if fisher == 'lowrank' else ' N=64'} | {dtype} "
                             f"| {dev / GIB:.1f} | {host / GIB:.1f} | {_fmt(steps['fisher'].seconds)} "
                             f"| {_fmt(steps['gevp'].seconds)} | {_fmt(steps['eval'].seconds)} | {fits} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    return text


def _fmt(sec: float | None) -> str:
    if sec is None:
        return "—"
    return f"{sec:.2g} s" if sec < 120 else (f"{sec / 60:.1f} min" if sec < 7200 else f"{sec / 3600:.1f} h")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    m = sub.add_parser("measure")
    m.add_argument("--archs", default=",".join((CALIBRATION_ARCH, "llama-3.1-8b", "qwen-2.5-14b")))
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--steps", default="gevp,merge,gen", help="besides the Fisher pass: gevp, merge, gen")
    m.add_argument("--fisher-batches", default="1x64,2x64,8x64", help="Fisher batches B×T to time (comma-separated)")
    m.add_argument("--kfac-max-dim", type=int, default=4096, help="skip kfac's GEVP of modules with a larger dim")
    m.add_argument("-o", "--output")
    c = sub.add_parser("calibrate")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("-o", "--output")
    r = sub.add_parser("rehearse")
    r.add_argument("--arch", default="llama-3.1-8b", choices=list(SHAPES))
    r.add_argument("--layers", type=int, help="decoder layers (default: all)")
    r.add_argument("--vocab", type=int, help="vocabulary (default: the real one)")
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    r.add_argument("--steps", default="train,merge,eval,exp1")
    r.add_argument("--fisher", default="kfac", choices=["kfac", "diagonal", "lowrank"], help="SST's Fisher in exp1")
    r.add_argument("--adapter-layers", help="comma-separated layers of the random adapters (without the train step)")
    r.add_argument("--items", type=int, default=2)
    r.add_argument("--synthetic", action="store_true", help="small generated prompt files instead of the packages")
    r.add_argument("--work", help="working directory (default: a new temporary one)")
    r.add_argument("--threads", type=int)
    r.add_argument("-o", "--output")
    fu = sub.add_parser("full")
    fu.add_argument("--model", default="smollm2-135m")
    fu.add_argument("--threads", type=int, default=1)
    fu.add_argument("-o", "--output")
    f = sub.add_parser("faults")
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("-o", "--output")
    t = sub.add_parser("table")
    t.add_argument("input", nargs="?", default="bench/results/shapes.json")
    args = ap.parse_args(sys.argv[1:] if len(sys.argv) > 1 and sys.argv[1] in ("measure", "calibrate", "rehearse", "table", "faults", "full")
                         else ["measure", *sys.argv[1:]])  # fmt: skip
    if args.cmd == "table":
        cmd_table(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    emit({"measure": cmd_measure, "calibrate": cmd_calibrate, "rehearse": cmd_rehearse, "faults": cmd_faults,
          "full": cmd_full}[args.cmd](args),
         args.output)  # fmt: skip


if __name__ == "__main__":
    main()
