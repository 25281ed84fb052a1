"""Run an experiment on a lent GPU machine from the carried kit, within a hard time budget (docs/gpu.md).

On the machine, in the working tree's root, with ``python3`` (the image's Python, which holds PyTorch)::

    python3 scripts/device/run.py --probe                                   # a batch-only call
    python3 scripts/device/run.py --budget 540 -- --experiment exp3 --mode full

Steps, each recorded in ``$OUT/status.json`` as it happens:

1. the machine's package list into ``$OUT/device-freeze.txt`` (for the next ``prepare.py --device-freeze``);
2. the kit's files reassembled from ``.device/b*`` and checked against their SHA-256 (``device_kit.assemble``);
3. its wheels installed offline (``pip install --no-index --no-deps --target .device/site``);
4. ``preflight.py``: every requirement satisfied, sst-merge importable, the GPU seen;
5. ``sst-merge run ARGS -o .device/work/NAME`` (``--name``, default ``run``) until it ends or the budget is spent, then SIGTERM.

The run directory holds the evaluation cache (``RUN/cache/eval-*.json``, one file per finished evaluation, written
atomically), so a cut run loses only the evaluation in flight. The tool brings back at most 8 files, so the run
directory travels as ``$OUT/results.tar.gz``, re-packed every ``--pack-every`` seconds and at the end: a call killed
at its own limit still returns the last pack. ``.device/work`` stays on a warm machine, so a second call resumes
from the cache. ``--cpu`` makes it a dry run on a machine without a GPU (tests/test_device_kit.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from device_kit import MIB, KitError, assemble, read_manifest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: Run-directory files larger than this stay on the machine (adapter weights): the tool returns 16 MiB a file.
MAX_PACKED_FILE = 4 * MIB


class Status:
    """``$OUT/status.json``, rewritten on every change so a killed call still says how far it got."""

    def __init__(self, path: Path, **fields: Any):
        self.path = path
        self.data: dict[str, Any] = dict(fields)
        self.t0 = time.monotonic()
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def say(msg: str) -> None:
    print(f"[device] {msg}", flush=True)


def pack(run_dir: Path, out: Path) -> dict[str, Any]:
    """Pack the run directory into ``out/results.tar.gz`` atomically; files over MAX_PACKED_FILE are left out."""
    tmp = out / "results.tar.gz.tmp"
    left_out = []
    n = 0
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(run_dir.rglob("*")) if run_dir.is_dir() else []:
            try:
                if not path.is_file() or path.suffix == ".lock":
                    continue
                if path.stat().st_size > MAX_PACKED_FILE:
                    left_out.append(str(path.relative_to(run_dir)))
                    continue
                tar.add(path, arcname=str(Path(run_dir.name) / path.relative_to(run_dir)))
                n += 1
            except FileNotFoundError:  # an atomic write's temporary file, renamed while we walked
                continue
    os.replace(tmp, out / "results.tar.gz")
    evaluations = len(list((run_dir / "cache").glob("eval-*.json"))) if run_dir.is_dir() else 0
    return {"packed_files": n, "left_out": left_out, "evaluations": evaluations}


def stream(proc: subprocess.Popen, log: Path) -> threading.Thread:
    """Copy the child's output to the log file and to our stdout (the tool's output_tail)."""

    def copy() -> None:
        with open(log, "ab") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                sys.stdout.buffer.write(line)
                sys.stdout.flush()

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    return t


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the child's process group, then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def device_freeze(out: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    )
    (out / "device-freeze.txt").write_text(done.stdout)


def install(kit: Path, manifest: dict[str, Any]) -> Path:
    """Reassemble and install the kit's wheels into ``kit/site`` (kept when the same kit is already there)."""
    site = kit / "site"
    stamp = site / ".kit-id"
    wheels = assemble(kit, kit / "wheelhouse")
    if stamp.is_file() and stamp.read_text() == manifest["id"]:
        return site
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--no-cache-dir", "--target", str(site), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise KitError(f"pip install of the kit's wheels failed: {done.stderr.strip()[-2000:]}")
    stamp.write_text(manifest["id"])
    return site


def preflight(env: dict[str, str], manifest_path: Path | None, cpu: bool) -> tuple[dict[str, Any], int]:
    cmd = [sys.executable, str(HERE / "preflight.py")] + (["--manifest", str(manifest_path)] if manifest_path else [])
    done = subprocess.run(cmd + (["--cpu"] if cpu else []), capture_output=True, text=True, env=env, cwd=ROOT)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1]), done.returncode
    except (json.JSONDecodeError, IndexError):
        return {"problems": [f"preflight.py crashed: {done.stderr.strip()[-2000:]}"]}, 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=540, help="seconds for the whole call, setup included")
    parser.add_argument("--reserve", type=float, default=20, help="seconds kept back for stopping and packing")
    parser.add_argument("--pack-every", type=float, default=60, help="seconds between packs of the run directory")
    parser.add_argument("--probe", action="store_true", help="no experiment: package list, batches present, GPU")
    parser.add_argument("--cpu", action="store_true", help="dry run: no GPU needed")
    parser.add_argument("--kit", type=Path, default=ROOT / ".device", help="the carried batches' folder")
    parser.add_argument("--work", type=Path, help="run directory and project cache (default: KIT/work)")
    parser.add_argument("--name", default="run", help="run directory under WORK (another one per experiment)")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="what comes back (default: $OUT)")
    parser.add_argument("run_args", nargs="*", help="after --: sst-merge run's arguments (not -o: the kit sets it)")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget - args.reserve
    if args.out is None:
        parser.error("no --out and no $OUT: where should the results go?")
    if {"-o", "--output"} & {a.split("=", 1)[0] for a in args.run_args}:
        parser.error("the kit sets sst-merge run's -o (WORK/NAME); leave it out, or pass --name")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.kit / "work"
    run_dir = work / args.name
    status = Status(args.out / "status.json", state="setup", budget_s=args.budget, run_args=args.run_args)
    device_freeze(args.out)

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["SST_MERGE_CACHE"] = str((work / "cache").resolve())
    manifest_path = None
    try:
        manifest, missing = read_manifest(args.kit)
        status.update(kit=manifest["id"], batches_missing=missing)
        if not args.probe:
            site = install(args.kit, manifest)
            manifest_path = next(args.kit.glob("b[0-9]*/manifest.json"))
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), str(ROOT / "src"), env.get("PYTHONPATH")]))
    except KitError as e:
        if not args.probe:
            status.update(state="failed", error=str(e))
            say(f"error: {e}")
            return 2
        status.update(kit_error=str(e))
    if args.probe:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    report, rc = preflight(env, manifest_path, args.cpu)
    status.update(preflight=report)
    say(f"preflight: {json.dumps(report)}")
    if args.probe:
        status.update(state="probed")
        return 0
    if rc:
        status.update(state="failed", error="; ".join(report["problems"]))
        say("error: " + "; ".join(report["problems"]))
        return 2

    cmd = [sys.executable, "-m", "sst_merge.cli", "run", *args.run_args, "-o", str(run_dir)]
    say(f"running {' '.join(cmd[2:])} until {args.budget - args.reserve:.0f} s")
    status.update(state="running")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
    )
    reader = stream(proc, args.out / "run.log")
    last_pack = time.monotonic()
    cut = False
    while proc.poll() is None:
        now = time.monotonic()
        if now >= deadline:
            cut = True
            say(f"budget spent: stopping the run ({args.reserve:.0f} s kept for packing)")
            stop(proc, grace=args.reserve / 2)
            break
        if now - last_pack >= args.pack_every:
            status.update(**pack(run_dir, args.out))
            last_pack = now
        time.sleep(0.2)
    reader.join(5)
    packed = pack(run_dir, args.out)
    finished = (run_dir / "results.json").is_file() and not cut and proc.returncode == 0
    state = "finished" if finished else "cut" if cut else "failed"
    status.update(state=state, experiment_rc=proc.returncode, **packed)
    say(f"{state}: {packed['evaluations']} evaluations, {packed['packed_files']} files in $OUT/results.tar.gz")
    return 1 if state == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
