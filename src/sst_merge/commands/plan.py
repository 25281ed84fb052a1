"""`sst-merge plan [CONFIG.yaml] [--model M] [--set key=value ...] [--memory-gib G] [--gpu NAME] [--json OUT]`."""

from __future__ import annotations

import argparse

from sst_merge.commands.flags import add_set_flag
from sst_merge.config import load_yaml
from sst_merge.errors import ConfigError
from sst_merge.io import atomic_write_json, check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="estimate memory and time of every step from the model's config (no weights); refuse what cannot fit",
        description="Estimate the memory and time of each step of a run (an experiment or a merge config) from the "
        "model's config alone, and check them against this machine (or --memory-gib / --gpu). Exit 2 with the "
        "option that would fit when the run cannot fit.",
    )
    p.add_argument("config", nargs="?", help="experiment or merge config (YAML); default: the experiment defaults")
    p.add_argument("--model", help="model alias, directory or hub id (overrides the config's model)")
    p.add_argument("--mode", choices=["minimal", "full"], help="experiment preset (default: the config's, or minimal)")
    add_set_flag(p, help="override a config value, e.g. --set sst.fisher=kfac --set dtype=bfloat16")
    p.add_argument("--memory-gib", type=float, help="plan for this much device memory (GiB) instead of this machine's")
    p.add_argument("--host-gib", type=float, help="plan for this much host memory (GiB) instead of this machine's")
    p.add_argument("--gpu", help="plan for one GPU of the table (H100-80GB, H200-141GB), with projected rates")
    p.add_argument("--json", dest="json_out", help="also write the plan as JSON to this file")
    return p


def run(args: argparse.Namespace) -> int:
    # deferred: sst_merge.plan pulls torch; the CLI imports every command module, so this keeps `sst-merge --help` fast
    from sst_merge.plan import GIB, GPUS, Memory, available_memory, gpu_rates, settings_from_config

    data = load_yaml(args.config) if args.config else {}
    if args.model:
        data["base_model" if "base_model" in data else "model"] = args.model
    if args.mode and "base_model" not in data:
        data["mode"] = args.mode
    model, settings = settings_from_config(data, args.overrides)
    memory, rates, on_gpu = available_memory(), None, None
    if args.gpu:
        if args.gpu not in GPUS:
            raise ConfigError(f"--gpu {args.gpu!r} is not one of {', '.join(GPUS)}")
        g = GPUS[args.gpu]
        memory = Memory(device=g["memory_gib"] * GIB, host=g["host_gib"] * GIB, gpus=1, name=args.gpu)
        rates, on_gpu = gpu_rates(args.gpu), True
    if args.memory_gib is not None:  # on the CPU the device is the host: both get the given size
        gib = args.memory_gib * GIB
        memory = Memory(device=gib, host=memory.host if memory.gpus else gib, gpus=memory.gpus, name=memory.name)
    if args.host_gib is not None:
        memory = Memory(
            device=memory.device if memory.gpus else args.host_gib * GIB,
            host=args.host_gib * GIB,
            gpus=memory.gpus,
            name=memory.name,
        )
    return show_plan(model, settings, memory=memory, rates=rates, on_gpu=on_gpu, json_out=args.json_out)


def show_plan(model: str, settings, memory=None, rates=None, on_gpu=None, json_out: str | None = None) -> int:
    """Print the plan of ``model`` with ``settings`` (``sst-merge plan`` and ``--dry-run`` of ``merge`` / ``run``).

    Returns 0 when the run fits; raises ``ConfigError`` (exit 2) with the one-line fix when it does not.
    """
    from sst_merge.plan import plan_run  # deferred: pulls torch (keeps `sst-merge --help` fast)

    plan = plan_run(model, settings, memory=memory, rates=rates, on_gpu=on_gpu)
    print(plan.table())
    if json_out:
        atomic_write_json(json_out, plan.to_json())
    if plan.problem:
        raise ConfigError(f"{model}: {plan.problem}")
    return 0


def dry_run_merge(config, output: str, force: bool, allow_pickle: bool) -> int:
    """``sst-merge merge --dry-run``: every check ``merge`` makes before heavy work, then the plan; no weights."""
    # deferred: the merge and plan libraries pull torch (keeps `sst-merge --help` fast)
    from sst_merge.merge.api import prepare
    from sst_merge.plan import merge_settings

    def no_model():  # the method checks only ask whether a base model can be loaded; a dry run never loads it
        raise ConfigError("a dry run loads no model")

    check_output_dir(output, force)
    prepare(config, allow_pickle=allow_pickle, load_model=no_model, show_progress=False)
    return show_plan(*merge_settings(config))


def dry_run_experiment(cfg) -> int:
    """``sst-merge run --dry-run``: the resolved experiment config's plan; no weights, no run directory."""
    # deferred: the experiments and plan libraries pull torch (keeps `sst-merge --help` fast)
    from sst_merge.experiments.api import experiments_of
    from sst_merge.experiments.experiments import EXPERIMENTS
    from sst_merge.plan import experiment_settings

    for name in experiments_of(cfg):
        EXPERIMENTS.get(name)  # unknown names fail like the run would
    return show_plan(*experiment_settings(cfg))
