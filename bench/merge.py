"""Benchmark: sst-merge's ties / dare_linear (rank-16 PEFT output) vs PEFT's ``add_weighted_adapter``
(``ties_svd`` / ``dare_linear_svd``), and a cross-check of task_arithmetic / ties full-model outputs vs mergekit.

Inputs: 3 random LoRA adapters (r=16, all 7 linear modules of 30 layers) with SmolLM2-135M shapes (hidden 576,
intermediate 1536, 9 heads / 3 kv heads: q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536), built on a
randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's config (no hub access needed).

Each tool runs in a fresh subprocess; time is the wall time of the merge call, memory is the process's peak RSS
(``VmHWM`` from ``/proc/self/status``; tracemalloc does not see torch's allocations), both whole-process and above
the RSS just before the merge call (the peak is reset through ``/proc/self/clear_refs`` where the kernel allows).

* ours: ``sst_merge.merge.api.merge`` from the adapter directories to a written rank-16 PEFT adapter (reading the
  adapters, ΔW, the method, truncated SVD per module, saving) — everything.
* PEFT: only the ``add_weighted_adapter`` call, with the base model and the three adapters already loaded.

The data-aware methods have rows of their own, timed the same way (``--methods fisher_merge regmean learned``):

* ``fisher_merge`` / ``regmean``: each adapter's statistics (diagonal Fisher / kfac input Gram) are built once on the
  random SmolLM2-shaped model saved with the project's tiny tokenizer, on ``--samples`` items of a local JSONL with
  responses, by an untimed merge in a process of its own (``statistics_seconds``); the timed merge, in a fresh
  process, then reads them from the cache (the model is never loaded: the row records the cache state) and runs the
  kernel + rank-16 SVD + save.
* ``learned`` with ``steps: 0``: the coefficients at their start (task arithmetic), no fit, no model.
* No direct comparison: FusionBench's ``fisher_merging`` / ``regmean`` and AdaMerging's code take *full* fine-tuned
  models and compute their statistics (or fit) inside the same call; a user would otherwise merge full models there.
  The dense-ΔW floor and the ties / dare_linear rows are the reference on the same adapters.

The mergekit cross-check builds full-weight "fine-tuned" models (base + ΔWᵢ, fp32) on the tiny in-process Llama,
runs ``mergekit-yaml`` from its own virtual environment (``--mergekit-venv``, default /work/venvs/mergekit), and
compares every weight of its output with ``sst-merge``'s ``full`` output from the LoRA adapters.

Usage::

    python bench/merge.py                       # everything, prints a table and ratios
    python bench/merge.py --skip-mergekit       # only the speed/memory comparison
    python bench/merge.py --skip-mergekit --methods fisher_merge regmean learned --samples 16
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This checkout's code, also in this process (the mergekit cross-check and the SVD check run here), not whichever
# sst_merge the interpreter has installed; the workers get the same through PYTHONPATH.
sys.path.insert(0, str(ROOT / "src"))

SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHTS = [1.0, 0.5, 0.5]
#: methods timed without a comparison tool (see the docstring): what a user would otherwise run needs full models
DATA_AWARE = {
    "fisher_merge": "FusionBench fisher_merging (full models; Fisher computed in the call)",
    "regmean": "FusionBench regmean (full models; Grams computed in the call)",
    "learned": "AdaMerging / FusionBench adamerging (full models; fitted in the call)",
}


# ----------------------------------------------------------------------------------------------- memory helpers


def _status(field: str) -> int:
    """Return a ``/proc/self/status`` field in bytes (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _measure(fn) -> dict:
    rss_before = _status("VmRSS")
    reset = _reset_peak()
    t0, c0 = time.perf_counter(), _cpu()
    fn()
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    hwm = _status("VmHWM")
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_bytes": hwm,
        "rss_before_bytes": rss_before,
        "peak_above_start_bytes": hwm - rss_before if reset else None,
        "peak_reset": reset,
    }


# ----------------------------------------------------------------------------------------------- inputs


def build_adapters(workdir: Path, r: int, seed: int) -> list[Path]:
    """Save 3 random r-rank LoRA adapters (all 7 linear modules) for a random SmolLM2-135M-shaped Llama."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = [workdir / f"adapter{i}" for i in range(len(WEIGHTS))]
    if all((p / "adapter_model.safetensors").is_file() for p in paths):
        return paths
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=MODULES, lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    for i, path in enumerate(paths):
        g = torch.Generator().manual_seed(seed + 1 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        peft_model.peft_config["default"].base_model_name_or_path = "smollm2-135m-shapes"
        peft_model.save_pretrained(str(path))
    return paths


# ----------------------------------------------------------------------------------------------- workers


def worker_ours(adapters: list[str], method: str, density: float, rank: int, out: str) -> dict:
    import torch

    from sst_merge.merge.api import merge

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = {
        "base_model": "smollm2-135m-shapes",
        "method": method,
        "adapters": [{"path": p, "weight": w} for p, w in zip(adapters, WEIGHTS, strict=True)],
        "params": {"density": density, "seed": 0},
        "output": {"format": "peft", "rank": rank},
    }
    result = _measure(lambda: merge(config, out, force=True, show_progress=False))
    meta = json.loads((Path(out) / "merge_metadata.json").read_text())
    result["max_rel_frobenius_error"] = meta["output"]["max_rel_frobenius_error"]
    result["mean_rel_frobenius_error"] = meta["output"]["mean_rel_frobenius_error"]
    return result


def worker_data_aware(
    adapters: list[str], method: str, model_dir: str, data: str, n: int, rank: int, out: str, build: bool = False
) -> dict:
    """Time ``method``'s merge with every adapter's statistics already cached; ``build``: only build them (untimed,
    in a process of its own, so the timed process never holds the model)."""
    import torch

    from sst_merge.merge.api import merge

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if method == "learned":
        params: dict = {"steps": 0}
    else:
        params = {"data": [data] * len(adapters), "n_samples": n, "batch_size": 8, "max_length": 64,
                  "cache_dir": str(Path(out).parent / "statistics")}  # fmt: skip
    config = {
        "base_model": model_dir,
        "method": method,
        "adapters": [{"path": p, "weight": w} for p, w in zip(adapters, WEIGHTS, strict=True)],
        "params": params,
        "output": {"format": "peft", "rank": rank},
    }
    if build:
        t0 = time.perf_counter()
        if method != "learned":
            merge(config, out, force=True, show_progress=False)  # builds (or finds) the statistics
        return {"statistics_seconds": time.perf_counter() - t0}
    result = _measure(lambda: merge(config, out, force=True, show_progress=False))
    meta = json.loads((Path(out) / "merge_metadata.json").read_text())
    result["statistics_seconds"] = 0.0  # the build call's own time replaces it (learned: nothing to build)
    result["max_rel_frobenius_error"] = meta["output"]["max_rel_frobenius_error"]
    result["mean_rel_frobenius_error"] = meta["output"]["mean_rel_frobenius_error"]
    diag = meta.get("diagnostics", {}).get(method, {})
    result["cache"] = [a.get("cache") for a in diag.get("adapters", [])] if method != "learned" else diag.get("fit")
    return result


def build_model(workdir: Path, seed: int) -> Path:
    """Save the random SmolLM2-135M-shaped Llama with the project's tiny tokenizer (its ids fit the vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sst_merge.testing import tiny_tokenizer

    path = workdir / "model"
    if not (path / "config.json").is_file():
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def build_data(workdir: Path, n: int) -> Path:
    """A JSONL of ``n`` prompt/response items (responses given: no greedy answers)."""
    path = workdir / f"data{n}.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def worker_dense(adapters: list[str]) -> dict:
    """The floor: read the three adapters and compute every module's dense ΔW (what any ΔW-space merge must do)."""
    import torch

    from sst_merge.adapters import LoraAdapter

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

    def run() -> None:
        for p in adapters:
            a = LoraAdapter.load(p)
            for m in a.modules:
                a.delta(m)

    return _measure(run)


def worker_peft(adapters: list[str], combination: str, density: float, rank: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, p in enumerate(adapters[1:], 1):
        peft_model.load_adapter(p, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    return _measure(
        lambda: peft_model.add_weighted_adapter(
            names, WEIGHTS, "merged", combination_type=combination, svd_rank=rank, density=density
        )
    )


def _run_worker(args: list[str], threads: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads), TQDM_DISABLE="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- mergekit


def mergekit_crosscheck(workdir: Path, venv: Path, density: float) -> dict:
    """Compare sst-merge's task_arithmetic and ties full outputs with mergekit's on the same deltas."""
    import torch
    from safetensors.torch import load_file

    from sst_merge.adapters import LoraAdapter
    from sst_merge.merge.api import merge
    from sst_merge.testing import random_lora, tiny_model, tiny_tokenizer

    exe = venv / "bin" / "mergekit-yaml"
    if not exe.is_file():
        return {"status": f"mergekit not installed ({exe} missing)"}
    d = workdir / "mergekit"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    base = tiny_model("llama", hidden_size=64, num_layers=2)
    base.save_pretrained(d / "base")
    tiny_tokenizer().save_pretrained(d / "base")
    adapters = []
    for i in range(3):
        path = random_lora(
            base,
            str(d / f"lora{i}"),
            r=4,
            lora_alpha=8,
            target_modules=MODULES,
            seed=10 + i,
            std=0.1,
            base_model_name_or_path=str(d / "base"),
        )
        adapters.append(path)
        # the "fine-tuned" full model: base + ΔWᵢ (fp32), for mergekit
        ft = tiny_model("llama", hidden_size=64, num_layers=2)
        with torch.no_grad():
            for module, delta in LoraAdapter.load(path).deltas().items():
                ft.get_submodule(module).weight.add_(delta)
        ft.save_pretrained(d / f"ft{i}")
        tiny_tokenizer().save_pretrained(d / f"ft{i}")
    report: dict = {"status": "ok", "model": "tiny Llama (hidden 64, 2 layers), 3 LoRA r=4 on all 7 modules"}
    version = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m;print(m.version('mergekit'), m.version('torch'))",
        ],
        capture_output=True,
        text=True,
    )
    report["mergekit_version"], report["mergekit_torch"] = version.stdout.split()
    for method, params in [("task_arithmetic", {}), ("ties", {"density": density})]:
        mk_models = [{"model": str(d / f"ft{i}"), "parameters": {"weight": w, **params}} for i, w in enumerate(WEIGHTS)]
        mk_cfg = {
            "merge_method": method,
            "base_model": str(d / "base"),
            "models": mk_models,
            "parameters": {"lambda": 1.0, **({"normalize": True} if method == "ties" else {})},
            "dtype": "float32",
        }
        (d / f"{method}.yaml").write_text(json.dumps(mk_cfg))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(exe), str(d / f"{method}.yaml"), str(d / f"mk_{method}"), "--allow-crimes"],
            capture_output=True,
            text=True,
        )
        mk_seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"status": f"mergekit-yaml failed for {method}: {proc.stderr.strip().splitlines()[-1:]}"}
        ours_cfg = {
            "base_model": str(d / "base"),
            "method": method,
            "adapters": [{"path": p, "weight": w} for p, w in zip(adapters, WEIGHTS, strict=True)],
            "params": params,
            "output": {"format": "full"},
        }
        merge(ours_cfg, d / f"ours_{method}", force=True, show_progress=False)
        theirs = {}
        for f in sorted((d / f"mk_{method}").glob("*.safetensors")):
            theirs.update(load_file(str(f)))
        ours = load_file(str(d / f"ours_{method}" / "model.safetensors"))
        common = sorted(set(ours) & set(theirs))
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in common)
        changed = [k for k in common if any(m in k for m in MODULES)]
        delta_scale = max(
            (ours[k] - load_file(str(d / "base" / "model.safetensors"))[k]).abs().max().item() for k in changed
        )
        report[method] = {
            "tensors_compared": len(common),
            "tensors_only_in_one": sorted(set(ours) ^ set(theirs)),
            "max_abs_diff": diff,
            "max_abs_merged_delta": delta_scale,
            "within_1e-5": diff <= 1e-5,
            "mergekit_seconds": mk_seconds,
        }
    return report


# ----------------------------------------------------------------------------------------------- SVD error


def svd_error_check(adapters: list[str], rank: int, density: float) -> dict:
    """Per module of real adapters' merges: relative Frobenius error of the randomised rank-``rank`` SVD (what a
    fixed-rank PEFT output records) minus the exact truncation's (the optimum, Eckart–Young)."""
    import torch

    from sst_merge.adapters.lowrank import randomized_svd_factors, svd_factors
    from sst_merge.merge.api import merge_deltas

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    report: dict = {"adapters": adapters, "rank": rank}
    for method, params in [("ties", {"density": density}), ("dare_linear", {"density": density, "seed": 0})]:
        config = {"base_model": "unused", "method": method, "params": params,
                  "adapters": [{"path": p, "weight": 1.0} for p in adapters], "output": {"rank": rank}}  # fmt: skip
        diffs, exact_errs = [], []
        for d in merge_deltas(config, show_progress=False).values():
            exact = svd_factors(d, rank=rank)[2]
            approx = randomized_svd_factors(d, rank, generator=torch.Generator().manual_seed(0))[2]
            diffs.append(approx - exact)
            exact_errs.append(exact)
        report[method] = {"modules": len(diffs), "max_error_increase": max(diffs), "min_error_increase": min(diffs),
                          "mean_exact_error": sum(exact_errs) / len(exact_errs)}  # fmt: skip
    return report


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary directory)")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--rank", type=int, default=16, help="rank of the PEFT output (and of the inputs)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    parser.add_argument("--mergekit-venv", default="/work/venvs/mergekit")
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["ties", "dare_linear", *DATA_AWARE],
        choices=["ties", "dare_linear", *DATA_AWARE],
        help="speed pairs to run, and the data-aware rows (no comparison tool)",
    )
    parser.add_argument("--samples", type=int, default=16, help="statistics items per adapter (fisher_merge, regmean)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--real-adapters",
        nargs="+",
        default=None,
        metavar="DIR",
        help="also compare the randomised with the exact rank-16 SVD on these trained adapters' ties / dare merges",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, *rest = json.loads(args.worker)
        fn = {"ours": worker_ours, "peft": worker_peft, "dense": worker_dense, "data_aware": worker_data_aware}[kind]
        print(json.dumps(fn(*rest)))
        return 0

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sst-merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in build_adapters(workdir, args.rank, seed=0)]
    results: dict = {
        "inputs": f"3 LoRA adapters, r={args.rank}, 30 layers × 7 modules, SmolLM2-135M shapes",
        "density": args.density,
        "rank": args.rank,
        "threads": args.threads,
        "cpus": os.cpu_count(),
    }
    pairs = [p for p in [("ties", "ties_svd"), ("dare_linear", "dare_linear_svd")] if p[0] in args.methods]
    mib = 1024 * 1024

    def row(label: str, r: dict) -> None:
        above = r["peak_above_start_bytes"]
        print(
            f"{label:<28}{r['seconds']:>9.2f}{r['cpu_seconds']:>9.2f}{r['peak_rss_bytes'] / mib:>14.0f}"
            f"{(above / mib if above is not None else float('nan')):>22.0f}",
            flush=True,
        )

    print(
        f"\n{results['inputs']}; density {args.density}; rank-{args.rank} PEFT output; "
        f"{args.threads} torch threads on {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(f"{'method':<28}{'time s':>9}{'CPU s':>9}{'peak RSS MiB':>14}{'peak above start MiB':>22}", flush=True)
    dense = _run_worker(["dense", paths], args.threads)
    results["dense_delta_only"] = dense
    row("(dense ΔW of 3 adapters)", dense)
    for ours_method, peft_method in pairs:
        out = str(workdir / f"out_{ours_method}")
        o = _run_worker(["ours", paths, ours_method, args.density, args.rank, out], args.threads)
        row(f"sst-merge {ours_method}", o)
        p = _run_worker(["peft", paths, peft_method, args.density, args.rank], args.threads)
        row(f"peft {peft_method}", p)
        ratios = {
            "speedup": p["seconds"] / o["seconds"],
            "cpu_speedup": p["cpu_seconds"] / o["cpu_seconds"],
            "peak_rss_ratio": o["peak_rss_bytes"] / p["peak_rss_bytes"],
        }
        if o["peak_above_start_bytes"] and p["peak_above_start_bytes"]:
            ratios["peak_above_start_ratio"] = o["peak_above_start_bytes"] / p["peak_above_start_bytes"]
        results[ours_method] = {"ours": o, f"peft_{peft_method}": p, "ratios": ratios}
        print(
            f"  → {ours_method}: {ratios['speedup']:.1f}× faster than PEFT {peft_method} (wall), "
            f"{ratios['cpu_speedup']:.1f}× less CPU time; peak RSS "
            f"{ratios['peak_rss_ratio']:.2f}× PEFT's"
            + (
                f", peak above start {ratios['peak_above_start_ratio']:.2f}× PEFT's"
                if "peak_above_start_ratio" in ratios
                else ""
            )
            + f"; our rank-{args.rank} truncation error: max {o['max_rel_frobenius_error']:.3f}, "
            f"mean {o['mean_rel_frobenius_error']:.3f} (relative Frobenius); load average now "
            f"{os.getloadavg()[0]:.1f}",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    aware = [m for m in args.methods if m in DATA_AWARE]
    if aware:
        model_dir, data = build_model(workdir, seed=0), build_data(workdir, args.samples)
        print(f"\ndata-aware merges, statistics on {args.samples} items per adapter cached first (not timed):")
    for method in aware:
        out = str(workdir / f"out_{method}")
        job = ["data_aware", paths, method, str(model_dir), str(data), args.samples, args.rank, out]
        built = _run_worker([*job, True], args.threads)  # untimed: the statistics, then the model is gone
        r = {**_run_worker(job, args.threads), **built}
        row(f"sst-merge {method}" + (" (steps 0)" if method == "learned" else ""), r)
        r["otherwise"] = DATA_AWARE[method]
        results[method] = {"ours": r, "comparison": None}
        print(f"  → {method}: statistics {r['statistics_seconds']:.1f} s untimed, cache {r['cache']}; no direct "
              f"comparison: {DATA_AWARE[method]}", flush=True)  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if args.real_adapters:
        svd = svd_error_check(args.real_adapters, args.rank, args.density)
        results["randomized_svd_vs_exact"] = svd
        print(f"\nrandomised vs exact rank-{args.rank} SVD on {', '.join(args.real_adapters)}:")
        for method in ("ties", "dare_linear"):
            r = svd[method]
            print(
                f"  {method:<12} relative Frobenius error increase over {r['modules']} modules: max "
                f"{r['max_error_increase']:.2e} (min {r['min_error_increase']:.2e}; exact error mean "
                f"{r['mean_exact_error']:.3f})"
            )
    if not args.skip_mergekit:
        mk = mergekit_crosscheck(workdir, Path(args.mergekit_venv), args.density)
        results["mergekit"] = mk
        print("\nmergekit cross-check (full-model output, same full-weight deltas):", mk["status"])
        if mk["status"] == "ok":
            print(f"  mergekit {mk['mergekit_version']} (torch {mk['mergekit_torch']}), {mk['model']}")
            for method in ("task_arithmetic", "ties"):
                m = mk[method]
                print(
                    f"  {method:<16} max |ours − mergekit| = {m['max_abs_diff']:.3g} over {m['tensors_compared']} "
                    f"tensors (max |merged ΔW| {m['max_abs_merged_delta']:.3g}); within 1e-5: {m['within_1e-5']}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
