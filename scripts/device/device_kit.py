"""The shipping kit shared by ``prepare.py`` (here) and ``run.py`` (on a lent GPU machine): split, batch, verify.

A lent machine reaches nothing outside and takes at most 64 MiB per call (the working tree and the carried,
git-ignored paths together), so what it lacks travels as files in ``.device/b1``, ``.device/b2``, ...: each batch
fits one call, each file is cut into parts that fit a batch, and every batch holds the same ``manifest.json``
(the kit's id, every file's SHA-256 and size, every part's SHA-256 and batch). :func:`assemble` puts the files back
together on the machine and refuses a part or a file whose checksum differs, naming it and the batch to carry again.

Standard library only: the machine runs this before anything is installed. See docs/gpu.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
#: What one call of the device tool carries in all: the working tree plus the carried paths.
CALL_LIMIT = 64 * MIB
MANIFEST = "manifest.json"
KIT_VERSION = 1


class KitError(RuntimeError):
    """A kit that cannot be used as it is; the message names the file and the fix."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Part:
    """One piece of a shipped file: ``size`` bytes from ``offset``, carried in one batch."""

    file: str
    index: int
    offset: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.file}.part{self.index:03d}"


def cut(name: str, size: int, part_size: int) -> list[Part]:
    """Cut a file of ``size`` bytes into parts of at most ``part_size`` bytes (one empty part for an empty file)."""
    if part_size <= 0:
        raise KitError(f"part size must be positive, got {part_size}")
    n = max(1, -(-size // part_size))
    return [Part(name, i, i * part_size, min(part_size, size - i * part_size)) for i in range(n)]


def plan_batches(parts: list[Part], capacity: int) -> list[list[Part]]:
    """Pack parts into as few batches of at most ``capacity`` bytes as first-fit-decreasing finds.

    Raises:
        KitError: a part is larger than a batch (cut the files with ``part_size <= capacity``).
    """
    batches: list[list[Part]] = []
    used: list[int] = []
    for part in sorted(parts, key=lambda p: (-p.size, p.name)):
        if part.size > capacity:
            raise KitError(f"{part.name} has {part.size} bytes, more than a batch holds ({capacity}); cut it smaller")
        for i, u in enumerate(used):
            if u + part.size <= capacity:
                batches[i].append(part)
                used[i] += part.size
                break
        else:
            batches.append([part])
            used.append(part.size)
    return batches


def write_kit(
    files: dict[str, Path], kit_dir: Path, capacity: int, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Split ``files`` (shipped name -> local path) into batches ``kit_dir/b1 ...`` of at most ``capacity`` bytes.

    ``capacity`` counts the parts and the batch's manifest. Old batches in ``kit_dir`` are removed first, so a
    batch never mixes two preparations. Returns the manifest written into every batch.
    """
    reserve = 64 * 1024  # the manifest itself, in every batch
    if capacity <= reserve:
        raise KitError(f"a batch of {capacity} bytes leaves no room for files; give it more than {reserve}")
    entries = {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in sorted(files.items())}
    parts = [part for name, e in entries.items() for part in cut(name, e["size"], capacity - reserve)]
    batches = plan_batches(parts, capacity - reserve)
    for old in kit_dir.glob("b[0-9]*"):
        shutil.rmtree(old)
    names = [f"b{i + 1}" for i in range(len(batches))]
    for name, batch in zip(names, batches, strict=True):
        (kit_dir / name).mkdir(parents=True)
        for part in batch:
            with open(files[part.file], "rb") as src, open(kit_dir / name / part.name, "wb") as dst:
                src.seek(part.offset)
                dst.write(src.read(part.size))
            entries[part.file].setdefault("parts", []).append(
                {"name": part.name, "index": part.index, "size": part.size, "batch": name, "sha256": None}
            )
    for e in entries.values():
        e["parts"].sort(key=lambda p: p["index"])
        for p in e["parts"]:
            p["sha256"] = sha256_file(kit_dir / p["batch"] / p["name"])
    body = {"kit_version": KIT_VERSION, "batches": names, "files": entries, **(meta or {})}
    body["id"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    text = json.dumps(body, indent=1, sort_keys=True)
    if len(text) > reserve:
        raise KitError(f"the manifest has {len(text)} bytes, more than the {reserve} kept for it; ship fewer files")
    for name in names:
        (kit_dir / name / MANIFEST).write_text(text)
    return body


def read_manifest(kit_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Return the manifest of the batches present in ``kit_dir`` and the names of the batches missing.

    Raises:
        KitError: no batch is present, or two batches come from different preparations.
    """
    found = {}
    for m in sorted(kit_dir.glob(f"b[0-9]*/{MANIFEST}")):
        found[m.parent.name] = json.loads(m.read_text())
    if not found:
        raise KitError(
            f"no batch in {kit_dir}: run scripts/device/prepare.py here, then carry its folders "
            "(.device/b1, .device/b2, ...) as it prints (docs/gpu.md)"
        )
    ids = {name: m["id"] for name, m in found.items()}
    if len(set(ids.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in sorted(ids.items()))
        raise KitError(
            f"the batches in {kit_dir} come from different preparations ({listing}); "
            "carry every batch of one scripts/device/prepare.py run"
        )
    manifest = next(iter(found.values()))
    return manifest, [b for b in manifest["batches"] if b not in found]


def assemble(kit_dir: Path, dest: Path) -> list[Path]:
    """Reassemble every file of the kit into ``dest`` and check each part's and each file's SHA-256.

    A file already in ``dest`` with the manifest's checksum is kept (a warm machine's second call).

    Raises:
        KitError: a batch is missing, or a part or a reassembled file does not match its checksum; the message
            names the part and the batch to carry again.
    """
    manifest, missing = read_manifest(kit_dir)
    if missing:
        raise KitError(
            f"batch {', '.join(missing)} of kit {manifest['id']} is not on this machine (a call that carried it "
            f"ran on a machine given back since?): carry {', '.join('.device/' + b for b in missing)} in this call"
        )
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name, entry in sorted(manifest["files"].items()):
        target = dest / name
        out.append(target)
        if target.is_file() and target.stat().st_size == entry["size"] and sha256_file(target) == entry["sha256"]:
            continue
        tmp = dest / f".{name}.tmp"
        with open(tmp, "wb") as f:
            for p in entry["parts"]:
                path = kit_dir / p["batch"] / p["name"]
                if not path.is_file():
                    raise KitError(f"{path} is missing: carry .device/{p['batch']} again")
                digest = sha256_file(path)
                if digest != p["sha256"]:
                    raise KitError(
                        f"{path} is damaged (sha256 {digest[:12]}..., manifest {p['sha256'][:12]}...): "
                        f"carry .device/{p['batch']} again, or run scripts/device/prepare.py again if it is "
                        "damaged here too"
                    )
                with open(path, "rb") as src:
                    shutil.copyfileobj(src, f, MIB)
        digest = sha256_file(tmp)
        if digest != entry["sha256"]:
            tmp.unlink()
            raise KitError(
                f"{name} reassembled from {len(entry['parts'])} parts has sha256 {digest[:12]}..., the manifest "
                f"{entry['sha256'][:12]}...: run scripts/device/prepare.py again and carry every batch"
            )
        os.replace(tmp, target)
    return out
