"""`sst-merge eval`: evaluate a base model (plus adapters, or a merged directory) on safety and utility tasks.

Example::

    sst-merge eval --model smollm2-135m --adapter out/safety --tasks refusal,over_refusal,mmlu --limit 100 -o res.json

writes ``res.json`` (metrics with n and 95% intervals, settings, model) and ``res.records.jsonl`` beside it (one line
per item: id, prompt, response or scores, verdict).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sst_merge.commands.flags import device_map_arg
from sst_merge.config import validate
from sst_merge.errors import ConfigError, OutputExistsError
from sst_merge.io import atomic_write_json

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="evaluate a model (+ adapters) on refusal, over-refusal, MMLU and task accuracy",
        description="Evaluate a model with the project's harness (design §6); every model is evaluated the same way.",
    )
    p.add_argument("--model", required=True, help="alias (smollm2-135m, ...), local model directory or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR", help="PEFT LoRA adapter (repeatable)")
    p.add_argument(
        "--tasks",
        default="refusal,over_refusal,mmlu",
        help="comma-separated: refusal, over_refusal, mmlu, mmlu_cloze, task:NAME (default: %(default)s)",
    )
    p.add_argument("--limit", type=int, default=None, help="at most N items per task")
    # evaluation settings: None leaves the value to sst_merge.eval.EvalSettings, where every default is written
    p.add_argument("--judge", default=None, help="keyword (the default) or hf:MODEL[#REFUSAL_LABEL]")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="TASK=SOURCE",
        help="data for a task: a source name (harmbench, strongreject, benign, mmlu) or a local file (repeatable)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="items per forward / generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget of the generative tasks")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--device-map",
        default=None,
        type=device_map_arg,
        metavar="auto|cpu|cuda[:N]",
        help="auto: spread a big model over the GPUs (model parallel); cpu / cuda:N: that device; "
        "default: the GPU when CUDA is present (one per torchrun rank), else the CPU",
    )
    p.add_argument("-o", "--output", required=True, help="results JSON; per-item records go to OUT.records.jsonl")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    return p


def records_path_for(output: Path) -> Path:
    """``res.json`` → ``res.records.jsonl`` (beside the JSON)."""
    return output.with_name(output.name.removesuffix(".json") + ".records.jsonl")


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge import distributed as ddp
    from sst_merge.eval import EvalSettings, evaluate_model, strip_records

    out = Path(args.output)
    records = records_path_for(out)
    for p in (out, records):
        if p.exists() and not args.force:
            raise OutputExistsError(f"output {p} already exists; pass --force to overwrite it or choose another -o")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data = {}
    for d in args.data:
        task, sep, source = d.partition("=")
        if not sep or not task or not source:
            raise ConfigError(f"--data {d!r}: expected TASK=SOURCE, e.g. refusal=strongreject_small")
        data[task] = source
    given = {"batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "judge": args.judge}
    settings = validate(EvalSettings, {k: v for k, v in given.items() if v is not None}, source="evaluation settings")
    # Under torchrun / accelerate launch each rank scores its shard of every task; rank 0 writes the output.
    ddp.init_from_env()
    result = evaluate_model(
        args.model,
        args.adapter,
        tasks,
        settings,
        dtype=args.dtype,
        device_map=ddp.replica_device_map(getattr(args, "device_map", None)),
        limit=args.limit,
        records_path=records,
        show_progress=not args.quiet,
        data=data or None,
    )
    if not ddp.is_main():
        return 0
    summary = strip_records(result)
    summary["records_file"] = records.name
    atomic_write_json(out, summary)
    for name, res in result["tasks"].items():
        m = res["metrics"][res["primary"]]
        ci = m.get("ci95")
        ci_s = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
        print(f"{name:<16} {res['primary']:<18} {m['value']:.4f}  n={m['n']}{ci_s}")
    print(f"wrote {out} and {records}")
    return 0
