"""Benchmark: greedy generation, reference decoder (``model.generate()``) vs fast decoder, at several batch sizes.

Both decoders run :func:`sst_merge.eval.generation.generate_greedy` on the same HarmBench prompts (chat template,
left-padded batches sorted by length) in one process; the 2048² float32 matmul rate is measured in the same run.
Reported per decoder and batch size:

* ``tokens_per_second`` — generated tokens (up to and including EOS; padding and post-EOS steps not counted) / s;
* ``useful_gflops`` — 2 × parameters × useful tokens / s, where the useful tokens are every prompt's tokens
  (unpadded, the shared prefix counted in every prompt) plus its generated tokens: the arithmetic an ideal
  implementation does once per token, the same count for both decoders; ``fraction_of_matmul`` divides it by the
  matmul rate;
* ``identical_responses`` — fast responses equal to the reference's at the same batch size (token ids); each
  difference is listed with the two tokens' logit gap at the first differing step (one unpadded forward of the
  prompt plus the common part of the two answers).

Run::

    .venv/bin/python bench/generate.py --n 64 --max-new-tokens 32 --batch-sizes 8,32,64 -o bench/results/generate.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from common import emit, matmul_gflops

from sst_merge.data import load_source
from sst_merge.eval.generation import generate_greedy
from sst_merge.models import load_model
from sst_merge.models.tokenize import prompt_ids


@torch.inference_mode()
def logit_gap(model, prompt: list[int], common: list[int], a: int, b: int) -> dict:
    """Logits of tokens ``a`` (reference) and ``b`` (fast) after ``prompt + common``, one unpadded forward."""
    ids = torch.tensor([prompt + common])
    logits = model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    return {"step": len(common), "ref_token": a, "fast_token": b, "logit_ref": logits[a].item(),
            "logit_fast": logits[b].item(), "gap": (logits[a] - logits[b]).item()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=64, help="HarmBench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="8,32,64")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("-o", "--out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    prompts = [it["prompt"] for it in load_source("harmbench", limit=args.n)]
    prompt_tokens = sum(len(prompt_ids(tok, p)) for p in prompts)
    for decode in ("reference", "fast"):  # warm-up: first-call costs land in no timing
        generate_greedy(model, tok, prompts[:2], batch_size=2, max_new_tokens=2, show_progress=False, decode=decode)
    matmul_before = matmul_gflops()
    runs = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        outs = {}
        for decode in ("reference", "fast"):
            t0 = time.perf_counter()
            outs[decode] = generate_greedy(
                model, tok, prompts, batch_size=bs, max_new_tokens=args.max_new_tokens, show_progress=False,
                decode=decode,
            )  # fmt: skip
            secs = time.perf_counter() - t0
            gen = sum(o["n_new_tokens"] for o in outs[decode])
            gflops = 2 * n_params * (prompt_tokens + gen) / secs / 1e9
            runs.append(
                {
                    "batch_size": bs,
                    "decode": decode,
                    "seconds": secs,
                    "generated_tokens": gen,
                    "tokens_per_second": gen / secs,
                    "useful_gflops": gflops,
                }  # fmt: skip
            )
            print(runs[-1], flush=True)
        ref, fast = outs["reference"], outs["fast"]
        diffs = []
        for i, (r, f) in enumerate(zip(ref, fast, strict=True)):
            if r["token_ids"] != f["token_ids"]:
                k = next(
                    (j for j, (x, y) in enumerate(zip(r["token_ids"], f["token_ids"], strict=False)) if x != y), None
                )
                entry = {"prompt_index": i, "ref_response": r["response"], "fast_response": f["response"]}
                if k is not None:
                    entry.update(logit_gap(model, prompt_ids(tok, prompts[i]), r["token_ids"][:k],
                                           r["token_ids"][k], f["token_ids"][k]))  # fmt: skip
                diffs.append(entry)
        runs[-1]["identical_responses"] = len(prompts) - len(diffs)
        runs[-1]["differences"] = diffs
        runs[-1]["speedup_vs_reference"] = runs[-2]["seconds"] / runs[-1]["seconds"]
    matmul_after = matmul_gflops()
    matmul = max(matmul_before, matmul_after)  # the machine is shared: the better of the two is its rate
    for r in runs:
        r["fraction_of_matmul"] = r["useful_gflops"] / matmul
    report = {
        "model": args.model,
        "parameters": n_params,
        "n_prompts": len(prompts),
        "prompt_tokens": prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "matmul_2048_fp32_gflops": matmul,
        "matmul_2048_fp32_gflops_before_after": [matmul_before, matmul_after],
        "useful_flops_counted": "2 x parameters x (unpadded prompt tokens + generated tokens up to EOS)",
        "load_average_1m_at_end": os.getloadavg()[0],
        "runs": runs,
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
