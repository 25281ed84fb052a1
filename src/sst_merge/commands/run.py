"""`sst-merge run`: run exp1 / exp2 / exp3 (or all) and write results, report and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from sst_merge.commands.flags import add_dry_run_flag, add_output_flags, add_set_flag, device_map_arg
from sst_merge.commands.plan import dry_run_experiment
from sst_merge.config import load_yaml
from sst_merge.errors import ConfigError


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    """The flags shared by ``sst-merge run`` and ``experiments/run_real_experiments.py``."""
    # No defaults here: a flag given on the command line wins over the config file, the file over the defaults
    # (exp1, smollm2-135m, minimal), so `sst-merge run configs/X.yaml` runs what the file says.
    p.add_argument("--experiment", choices=["exp1", "exp2", "exp3", "all"], help="default: the config's, else exp1")
    p.add_argument("--model", help="alias, local model directory or hub id (default: the config's, else smollm2-135m)")
    p.add_argument("--mode", choices=["minimal", "full"], help="preset (default: the config's, else minimal)")
    p.add_argument("--config", help="YAML experiment config (applied over the mode's preset); same as CONFIG")
    add_set_flag(p, help="dotted override, e.g. --set sst.fisher=lowrank --set eval.refusal_limit=100")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (same as --set dtype=)")
    p.add_argument(
        "--device-map",
        type=device_map_arg,
        metavar="auto|cpu|cuda[:N]",
        help="auto: spread a big model over the GPUs (model parallel); cpu / cuda:N: that device; "
        "default: the GPU when CUDA is present (one per torchrun rank), else the CPU",
    )
    add_output_flags(
        p,
        help="run directory (default: runs/<experiment>-<model>-<mode>)",
        force_help="run again into a directory that holds a finished run",
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run experiments exp1|exp2|exp3|all and write results, report and plots")
    p.add_argument(
        "config_file",
        nargs="?",
        metavar="CONFIG",
        help="YAML experiment config, e.g. configs/three_way_full.yaml (the same as --config CONFIG)",
    )
    add_experiment_args(p)
    add_dry_run_flag(p)
    return p


def config_path(args: argparse.Namespace) -> str | None:
    """The experiment config named positionally (``sst-merge run CONFIG``) or with ``--config``; not both."""
    positional, flag = getattr(args, "config_file", None), getattr(args, "config", None)
    if positional and flag and positional != flag:
        raise ConfigError(f"two configs given ({positional} and --config {flag}); name one")
    return positional or flag


def default_run_dir(experiment: str, model: str, mode: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in Path(model).name or model)
    return Path("runs") / f"{experiment}-{safe}-{mode}"


def run(args: argparse.Namespace) -> int:
    # deferred: the experiments library and sst_merge.distributed pull torch; the CLI imports every command module,
    # so this keeps `sst-merge --help` fast
    from sst_merge import distributed as ddp
    from sst_merge.experiments import resolve_config, run_experiment
    from sst_merge.experiments.report import REPORT_NAME, comparisons_table, models_table

    path = config_path(args)
    data = load_yaml(path) if path else {}
    for key in ("experiment", "model", "dtype", "device_map"):  # explicit flags win over the YAML (like --set)
        if getattr(args, key, None):
            data[key] = getattr(args, key)
    mode = args.mode or data.pop("mode", "minimal")
    data.pop("mode", None)
    cfg = resolve_config(mode, data, args.overrides)
    if args.dry_run:
        return dry_run_experiment(cfg)
    out = Path(args.output) if args.output else default_run_dir(cfg.experiment, cfg.model, cfg.mode)
    ddp.init_from_env()  # torchrun / accelerate launch: every rank runs the experiment on its shard of the items
    doc = run_experiment(cfg, out, force=args.force, show_progress=not args.quiet)
    if not ddp.is_main():
        return 0
    print(models_table(doc))
    for name, section in doc["experiments"].items():
        if section.get("comparisons"):
            print(f"\n{name}:")
            print(comparisons_table(section["comparisons"]))
    print(f"\nreport: {out / REPORT_NAME}")
    return 0
