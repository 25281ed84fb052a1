"""`sst-merge demo`: exp1 in minimal mode on the embedded default (SmolLM2-135M), with the adapters that ship with
the project (or trained on first use with ``--retrain``, or when the shipped ones differ from today's defaults)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger("sst_merge.demo")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="exp1 (minimal) on the embedded SmolLM2-135M: merge, evaluate, report")
    p.add_argument("-o", "--output", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the two adapters (or reuse the cache) instead of using the shipped ones",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


class _Stages:
    """One log line as each stage of the demo ends, with its wall and CPU time (the CPU time of this process is the
    steadier figure on a shared machine); the times are kept for the closing summary."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.cpu_last = time.process_time()
        self.seconds: dict[str, tuple[float, float]] = {}

    def done(self, stage: str, detail: str = "") -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.seconds[stage] = (now - self.last, cpu - self.cpu_last)
        self.last, self.cpu_last = now, cpu
        log.info("demo: %s done in %.1f s (CPU %.1f s)%s", stage, *self.seconds[stage], f"; {detail}" if detail else "")

    def summary(self) -> str:
        return ", ".join(f"{k} {w:.1f} s (CPU {c:.1f} s)" for k, (w, c) in self.seconds.items())


def run(args: argparse.Namespace) -> int:
    # deferred: torch and transformers (through the library); the CLI imports every command module, so this keeps
    # `sst-merge --help` at ~0.3 s instead of ~9 s
    from sst_merge.experiments import adapters as adapter_paths
    from sst_merge.experiments import resolve_config, run_experiment
    from sst_merge.experiments.evaluation import evaluate_all
    from sst_merge.experiments.report import REPORT_NAME, comparisons_table, models_table
    from sst_merge.models import resolve_model
    from sst_merge.models.embedded import cache_dir
    from sst_merge.train.shipped import SHIPPED_ROOT

    stages = _Stages()
    data = {"experiment": "exp1", "model": "smollm2-135m", "cache_dir": str(cache_dir() / "evals")}
    overrides = [*args.overrides, *(["adapters.shipped=false"] if args.retrain else [])]
    cfg = resolve_config("minimal", data, overrides)
    out = Path(args.output)

    resolve_model(cfg.model)  # the first run converts the embedded GGUF into the cache
    stages.done("model files")
    given = [p for p in (cfg.adapters.safety, *(cfg.adapters.utility.get(t) for t in cfg.utility_tasks)) if p]
    utility = adapter_paths.utility_adapters(cfg, cfg.utility_tasks)
    safety = adapter_paths.safety_adapter(cfg)
    paths = [*utility.values(), safety]
    shipped = sum(Path(p).resolve().is_relative_to(SHIPPED_ROOT) for p in paths)
    trained = len(paths) - shipped - len(given)
    source = (
        f"adapters: {shipped} shipped with sst-merge, {len(given)} given, {trained} "
        "trained by sst-merge train (or from its cache)"
    )
    stages.done("adapters", source)
    pinned = [f"adapters.safety={safety}", *(f"adapters.utility.{t}={p}" for t, p in utility.items())]
    cfg = resolve_config("minimal", data, [*overrides, *pinned])

    evaluated = [0]

    def evaluate(model, tok, cfg_, tasks, records_path):
        evaluated[0] += 1
        # before this call: loading the base model (first model only) and building ΔW (the SST merge: its Fisher)
        stages.done(f"model {evaluated[0]}: load + ΔW")
        metrics = evaluate_all(model, tok, cfg_, tasks, records_path, show_progress=not args.quiet)
        stages.done(f"model {evaluated[0]}: evaluation")
        return metrics

    # The demo is re-runnable: evaluations are cached by model + adapter hashes + settings, so a warm run reuses them.
    doc = run_experiment(cfg, out, force=True, evaluate=evaluate, show_progress=not args.quiet)
    stages.done("report")
    print(models_table(doc))
    print()
    print(comparisons_table(doc["experiments"]["exp1"]["comparisons"]))
    total = time.perf_counter() - stages.t0
    print(f"\ndemo finished in {total:.0f} s ({source}); report: {out / REPORT_NAME}")
    log.info("demo stages: %s", stages.summary())
    return 0
