"""Check, in the environment the experiment will run in, what it needs: print one JSON line, exit 1 on a problem.

Run by ``run.py`` with the kit's site folder and ``src`` on ``PYTHONPATH``: every requirement in the kit's manifest
is installed in a version it accepts, sst-merge imports from this working tree, and (unless ``--cpu``) PyTorch
sees a GPU. Checking here costs a second; finding out after the model has loaded costs the call.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def requirement_problems(requires: list[str]) -> list[str]:
    problems = []
    for text in requires:
        req = Requirement(text)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(
                f"{req.name} is not installed (sst-merge needs {req}): ship it with scripts/device/prepare.py"
            )
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(
                f"{req.name} {have} is installed, sst-merge needs {req}: run scripts/device/prepare.py "
                "--device-freeze with this call's device-freeze.txt, and carry the new batches"
            )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, help="the kit's manifest (its requirements are checked)")
    parser.add_argument("--cpu", action="store_true", help="no GPU needed (the dry run)")
    args = parser.parse_args(argv)
    report: dict = {"python": platform.python_version(), "problems": []}
    if args.manifest:
        report["problems"] += requirement_problems(json.loads(args.manifest.read_text())["requires"])
    try:
        import sst_merge

        report["sst_merge"] = str(Path(sst_merge.__file__).parent)
    except ImportError as e:
        report["problems"].append(f"sst_merge does not import: {e}")
    import torch  # the machine's own build

    report["torch"] = torch.__version__
    report["cuda"] = torch.cuda.is_available()
    if report["cuda"]:
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = props.name
        report["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    elif not args.cpu:
        report["problems"].append("PyTorch sees no GPU (torch.cuda.is_available() is False); pass --cpu for a dry run")
    print(json.dumps(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
