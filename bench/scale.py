"""Benchmark: evaluation throughput with 1 vs 2 data-parallel processes (torchrun), and on GPUs when present.

Every run is the project's refusal evaluator (chat template, greedy decoding, keyword judge) on the same N HarmBench
prompts, timed inside the worker from a barrier after model load and a warm-up batch to a barrier after the last
item (launch and load are not counted); the fastest of ``--repeats`` timings is reported. Runs on the CPU:

* ``1p x 1t``: one process, 1 torch thread;
* ``1p x 2t``: one process, 2 threads (the whole core budget in one process);
* ``2p x 1t``: ``torchrun --nproc_per_node 2``, 1 thread per rank (gloo) — each rank scores its shard of the items.

Threads are fixed per process with ``torch.set_num_threads`` and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, so the
ratios compare equal budgets: ``2p x 1t`` vs ``1p x 1t`` (per-process threads fixed: the data-parallel speed-up) and
``2p x 1t`` vs ``1p x 2t`` (same total threads: data vs intra-op parallelism). The report also says whether every
run produced identical records (it must: sharding does not change results).

GPU section: when CUDA is present, one process on GPU 0 and — with 2+ GPUs — one rank per GPU (nccl), in
``--gpu-dtype``; otherwise it is skipped and the report says so.

Run::

    .venv/bin/python bench/scale.py --items 16 --max-new-tokens 32 --repeats 3 -o bench/results/scale.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit


def worker(args: argparse.Namespace) -> None:
    """One process of a run (under torchrun: one rank); rank 0 writes the timing to ``--worker-out``."""
    import torch

    from sst_merge import distributed as ddp
    from sst_merge.data import load_source
    from sst_merge.eval import evaluate
    from sst_merge.models import load_model

    torch.set_num_threads(args.threads)
    ddp.init_from_env()
    try:
        model, tok = load_model(args.model, dtype=args.dtype, device_map=ddp.replica_device_map(args.device_map))
        items = load_source("harmbench", limit=args.n)
        kw = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, show_progress=False)
        evaluate(model, tok, ["refusal"], data={"refusal": items[: 2 * ddp.world_size()]}, **kw)  # warm-up
        times = []
        for _ in range(args.repeats):  # the fastest repeat: the machine is shared, slower ones measure the others
            ddp.barrier()
            t0 = time.perf_counter()
            res = evaluate(model, tok, ["refusal"], data={"refusal": items}, **kw)["tasks"]["refusal"]
            ddp.barrier()
            times.append(time.perf_counter() - t0)
        seconds = min(times)
        if ddp.is_main():
            records = [{k: r[k] for k in ("id", "response", "verdict", "score")} for r in res["records"]]
            out = {
                "processes": ddp.world_size(),
                "threads_per_process": args.threads,
                "device": str(next(model.parameters()).device),
                "dtype": args.dtype,
                "items": len(records),
                "seconds": seconds,
                "seconds_every_repeat": times,
                "items_per_second": len(records) / seconds,
                "generated_tokens": sum(r["n_new_tokens"] for r in res["records"]),
                "refusal_rate": res["metrics"]["refusal_rate"]["value"],
                "records_sha256": hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest(),
            }
            Path(args.worker_out).write_text(json.dumps(out))
    finally:
        ddp.shutdown()


def launch(args: argparse.Namespace, procs: int, threads: int, dtype: str, gpu: bool = False) -> dict:
    """Run :func:`worker` in ``procs`` processes (torchrun when more than one) and return rank 0's timing.

    On the GPU, one process uses GPU 0 and several use one GPU per rank (``$LOCAL_RANK``); off it, CUDA is hidden.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timing.json"
        cmd = [__file__, "--worker", "--worker-out", str(out), "--threads", str(threads), "--dtype", dtype]
        cmd += [
            "--repeats",
            str(args.repeats),
            "--model",
            args.model,
            "--items",
            str(args.n),
            "--max-new-tokens",
            str(args.max_new_tokens),
        ]
        cmd += ["--batch-size", str(args.batch_size)] + (["--device-map", "cuda:0"] if gpu and procs == 1 else [])
        if procs > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] + cmd
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        if not gpu:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU section stays on the CPU even on a GPU machine
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *cmd], env=env, check=True)
        result = json.loads(out.read_text())
        result["wall_seconds_with_launch_and_load"] = time.perf_counter() - t0
    print(json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--items", dest="n", type=int, default=24, help="HarmBench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed evaluations per run; the fastest is reported")
    ap.add_argument("--gpu-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("-o", "--out", default=None)
    # worker mode (used by the launcher above)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--device-map", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    import torch

    cpu = {
        "1p x 1t": launch(args, 1, 1, "float32"),
        "1p x 2t": launch(args, 1, 2, "float32"),
        "2p x 1t": launch(args, 2, 1, "float32"),
    }
    report: dict = {
        "model": args.model,
        "n_prompts": args.n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "cpu_ratios": {
            "2p x 1t / 1p x 1t (data-parallel speed-up, threads per process fixed)": cpu["2p x 1t"]["items_per_second"]
            / cpu["1p x 1t"]["items_per_second"],
            "2p x 1t / 1p x 2t (same total threads)": cpu["2p x 1t"]["items_per_second"]
            / cpu["1p x 2t"]["items_per_second"],
        },
        "identical_records_in_every_cpu_run": len({r["records_sha256"] for r in cpu.values()}) == 1,
    }
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        gpu = {"1 GPU": launch(args, 1, 1, args.gpu_dtype, gpu=True)}
        if gpus >= 2:
            gpu[f"{gpus} GPUs (1 rank each)"] = launch(args, gpus, 1, args.gpu_dtype, gpu=True)
            gpu["ratio"] = gpu[f"{gpus} GPUs (1 rank each)"]["items_per_second"] / gpu["1 GPU"]["items_per_second"]
        report["gpu"] = {"devices": [torch.cuda.get_device_name(i) for i in range(gpus)], **gpu}
    else:
        report["gpu"] = {"skipped": "no CUDA device on this machine; run this script on a GPU machine for this section"}
        print("GPU section skipped: no CUDA device on this machine")
    report["load_average_1m_at_end"] = os.getloadavg()[0]
    emit(report, args.out)


if __name__ == "__main__":
    main()
