"""Benchmark: refusal-evaluation throughput (generated tokens per second) at several batch sizes.

Runs the project's refusal evaluator (chat template, greedy, left-padded batches sorted by length, keyword judge) on
the same HarmBench prompts at each batch size and reports generated tokens / second (tokens up to and including
EOS; padding and post-EOS steps are not counted), plus whether every batch size produced the same responses.

Run::

    .venv/bin/python bench/generate.py --n 16 --max-new-tokens 64 --batch-sizes 1,8,16 -o bench/results/generate.json
"""

from __future__ import annotations

import argparse
import json
import time

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="HarmBench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()

    import os

    import torch

    from sst_merge.data import load_source
    from sst_merge.eval import evaluate
    from sst_merge.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    items = load_source("harmbench", limit=args.n)
    runs, responses = [], {}
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        t0 = time.perf_counter()
        res = evaluate(
            model,
            tok,
            ["refusal"],
            data={"refusal": items},
            batch_size=bs,
            max_new_tokens=args.max_new_tokens,
            show_progress=False,
        )["tasks"]["refusal"]
        secs = time.perf_counter() - t0
        tokens = sum(r["n_new_tokens"] for r in res["records"])
        responses[bs] = [r["response"] for r in res["records"]]
        runs.append(
            {
                "batch_size": bs,
                "seconds": secs,
                "generated_tokens": tokens,
                "tokens_per_second": tokens / secs,
                "refusal_rate": res["metrics"]["refusal_rate"]["value"],
            }
        )
        print(json.dumps(runs[-1]))
    first = next(iter(responses.values()))
    report = {
        "model": args.model,
        "n_prompts": len(items),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "load_average_1m_at_end": os.getloadavg()[0],
        "runs": runs,
        "same_responses_at_every_batch_size": all(r == first for r in responses.values()),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
