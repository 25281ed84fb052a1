"""The GPU-machine kit (scripts/device, docs/gpu.md) on the CPU: split, batch, verify, resolve, and the dry run.

No network: the wheels are fake ones built here, served to ``pip download --no-index --find-links``; the dry run
is ``run.py --cpu`` over the tiny in-process model with hand-made data, as a lent machine would run it.
Each test's docstring names the one-line bug it is there to catch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml

from sst_merge.testing import random_lora, tiny_model

DEVICE = Path(__file__).resolve().parents[1] / "scripts" / "device"
sys.path.insert(0, str(DEVICE))

import device_kit  # noqa: E402  (scripts/device is no package: the machine runs these files as scripts)
import prepare  # noqa: E402
from device_kit import KitError  # noqa: E402

RESERVE = 64 * 1024  # write_kit keeps this much of every batch for the manifest


def fake_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), payload: int = 10) -> Path:
    """Write a minimal pure-Python wheel that pip installs: a module, METADATA, WHEEL and RECORD."""
    mod = name.replace("-", "_")
    dist = f"{mod}-{version}.dist-info"
    files = {
        f"{mod}/__init__.py": f"VERSION = {version!r}\n",
        f"{mod}/data/blob.bin": "x" * payload,
        f"{dist}/METADATA": "\n".join(
            [
                "Metadata-Version: 2.1",
                f"Name: {name}",
                f"Version: {version}",
                *(f"Requires-Dist: {r}" for r in requires),
            ]
        )
        + "\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{dist}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_split_and_reassemble_round_trip(tmp_path):
    """Bug caught: a part read from the wrong offset, the parts joined out of order, or the last short part lost."""
    part = 1000
    sizes = {"empty.bin": 0, "one.bin": 1, "exact.bin": part, "long.bin": 2 * part + 500}
    files = {}
    for i, (name, size) in enumerate(sizes.items()):
        files[name] = tmp_path / "src" / name
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_bytes(bytes((i + j * 7) % 251 for j in range(size)))
    manifest = device_kit.write_kit(files, tmp_path / "kit", RESERVE + part)
    assert [len(manifest["files"][n]["parts"]) for n in sizes] == [1, 1, 1, 3]
    out = device_kit.assemble(tmp_path / "kit", tmp_path / "dest")
    assert sorted(p.name for p in out) == sorted(sizes)
    for name, src in files.items():
        assert (tmp_path / "dest" / name).read_bytes() == src.read_bytes()


def test_batches_respect_the_size_limit(tmp_path):
    """Bug caught: first-fit testing ``<`` the free room against the wrong total, so a batch overflows the call."""
    parts = [device_kit.Part(f"f{i}", 0, 0, s) for i, s in enumerate([70, 60, 40, 30, 30, 20, 10, 10, 5])]
    batches = device_kit.plan_batches(parts, 100)
    assert all(sum(p.size for p in b) <= 100 for b in batches)
    assert sorted(p.name for b in batches for p in b) == sorted(p.name for p in parts)
    assert len(batches) == 3  # 275 bytes: 70+30, 60+40, 30+20+10+10+5 (first-fit decreasing)
    with pytest.raises(KitError, match="more than a batch holds"):
        device_kit.plan_batches([device_kit.Part("big", 0, 0, 101)], 100)
    # On disk too: every batch folder, manifest included, within the capacity.
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"z" * 5000)
    capacity = RESERVE + 1200
    manifest = device_kit.write_kit({"blob.bin": blob}, tmp_path / "kit", capacity)
    assert len(manifest["batches"]) == 5
    for b in manifest["batches"]:
        assert sum(f.stat().st_size for f in (tmp_path / "kit" / b).iterdir()) <= capacity


@pytest.fixture()
def kit(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(bytes(range(256)) * 20)  # 5120 bytes: 3 batches of 2000
    device_kit.write_kit({"model.gguf": src}, tmp_path / "kit", RESERVE + 2000)
    return tmp_path / "kit"


def test_a_damaged_part_is_refused_by_name(kit, tmp_path):
    """Bug caught: only the whole file's checksum checked, so the error cannot say which part and batch to re-carry."""
    part = kit / "b2" / "model.gguf.part001"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(KitError) as err:
        device_kit.assemble(kit, tmp_path / "dest")
    assert str(part) in str(err.value) and "damaged" in str(err.value)
    assert "carry .device/b2 again" in str(err.value)
    assert not (tmp_path / "dest" / "model.gguf").exists()


def test_a_missing_or_foreign_batch_is_named(kit, tmp_path):
    """Bug caught: a missing batch read as an empty file list, or batches of two preparations mixed silently."""
    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    device_kit.write_kit({"other.bin": other}, tmp_path / "kit2", RESERVE + 2000)
    (kit / "b3" / device_kit.MANIFEST).write_text((tmp_path / "kit2" / "b1" / device_kit.MANIFEST).read_text())
    with pytest.raises(KitError, match="different preparations"):
        device_kit.assemble(kit, tmp_path / "dest")
    for f in (kit / "b3").iterdir():
        f.unlink()
    (kit / "b3").rmdir()
    with pytest.raises(KitError, match=r"batch b3 .* carry \.device/b3"):
        device_kit.assemble(kit, tmp_path / "dest")


def test_resolve_ships_only_what_the_machine_lacks(tmp_path):
    """Bug caught: a package the machine has in an accepted version shipped anyway, or a dependency not followed."""
    wheels = {
        "needed": fake_wheel(tmp_path, "needed", "2.0", ("subdep>=1", "winonly; sys_platform == 'win32'")),
        "subdep": fake_wheel(tmp_path, "subdep", "1.5"),
        "oldpin": fake_wheel(tmp_path, "oldpin", "0.21.2"),
        "vague": fake_wheel(tmp_path, "vague", "3.0", payload=2 * prepare.SMALL),
        "datapkg": fake_wheel(tmp_path, "datapkg", "0.1", ("neverfollowed",)),
    }
    asked = []

    def download(name, spec):
        asked.append(spec)
        return wheels[name]

    device = {"have": "1.2", "oldpin": "0.18.0", "vague": None, "torch": "2.11.0"}
    shipped, notes = prepare.resolve(
        ["have>=1", "needed>=2", "oldpin>=0.21,<0.22", "vague>=1", "torch>=2.1"],
        ["datapkg"],
        device,
        {"oldpin": "0.21.2"},
        prepare.marker_env("3.12"),
        download,
    )
    assert {s.name: s.version for s in shipped} == {
        "needed": "2.0",
        "oldpin": "0.21.2",
        "datapkg": "0.1",
        "subdep": "1.5",
    }
    assert "oldpin==0.21.2" in asked  # pinned to the version installed here
    assert any(n.startswith("vague: on the machine, version unknown; assumed") for n in notes)
    with pytest.raises(KitError, match="torch.*never shipped"):
        prepare.resolve(["torch>=2.1"], [], {}, {}, prepare.marker_env("3.12"), download)


@pytest.fixture(scope="module")
def dry_kit(tmp_path_factory):
    """A kit prepared offline by prepare.py from fake wheels: two requirements, one embedded package, small batches."""
    d = tmp_path_factory.mktemp("device")
    index = d / "index"
    fake_wheel(index, "kitdep", "1.0", ("kitsub>=1",))
    fake_wheel(index, "kitsub", "1.1")
    fake_wheel(index, "kitdata", "0.3", payload=150_000)  # a file cut into parts
    (d / "freeze.txt").write_text("torch==2.11.0\nnumpy==2.5.2\n")
    args = ["--device-freeze", str(d / "freeze.txt"), "--kit-dir", str(d / "kit"), "--batch-mib", str(0.125)]
    args += ["--requirement", "kitdep>=1", "--file-package", "kitdata"]
    args += ["--pip-arg=--no-index", f"--pip-arg=--find-links={index}", "--", "--experiment", "exp1"]
    assert prepare.main(args) == 0
    return d


def test_prepare_writes_batches_and_calls(dry_kit):
    """Bug caught: the printed calls carrying the wrong folder, or the last call not running the experiment."""
    manifest, missing = device_kit.read_manifest(dry_kit / "kit")
    assert missing == [] and len(manifest["batches"]) >= 2
    assert set(manifest["shipped"]) == {"kitdep", "kitsub", "kitdata"}
    calls = json.loads((dry_kit / "kit" / "calls.json").read_text())
    assert [c["carry"] for c in calls] == [[f".device/{b}"] for b in manifest["batches"]]
    assert all("--probe" in c["command"] for c in calls[:-1])
    assert calls[-1]["command"].endswith("-- --experiment exp1") and calls[-1]["timeout_s"] > 540


def _experiment(d: Path, tiny_model_dir: Path, experiment: str, alphas: list[float]) -> Path:
    """An experiment config over the tiny model with hand-made data (as tests/test_experiments_e2e.py builds one)."""

    def jsonl(name, rows):
        (d / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(d / name)

    base = tiny_model()
    adapters = {
        n: random_lora(base, str(d / n), r=2, seed=i + 1, base_model_name_or_path=str(tiny_model_dir))
        for i, n in enumerate(["arithmetic", "safety"])
    }
    data = {
        "experiment": experiment,
        "model": str(tiny_model_dir),
        "utility_tasks": ["arithmetic"],
        "adapters": {"safety": adapters["safety"], "utility": {"arithmetic": adapters["arithmetic"]}},
        "eval": {
            "harmful_source": jsonl("harmful.jsonl", [{"id": f"h{i}", "prompt": f"harm {i}"} for i in range(4)]),
            "benign_source": jsonl("benign.jsonl", [{"id": f"b{i}", "prompt": f"hello {i}"} for i in range(4)]),
            "task_data": {
                "arithmetic": jsonl(
                    "arithmetic.jsonl", [{"id": f"t{i}", "prompt": f"{i}?", "answer": "1"} for i in range(3)]
                )
            },
            "refusal_limit": None,
            "over_refusal_limit": None,
            "task_limit": None,
            "mmlu_limit": 0,
            "max_new_tokens": 2,
            "batch_size": 4,
        },
        "sweep": {"alphas": alphas, "methods": ["task_arithmetic"]},
        "bootstrap": 10,
    }
    (d / "exp.yaml").write_text(yaml.safe_dump(data))
    return d / "exp.yaml"


def _run(dry_kit: Path, out: Path, budget: float, config: Path, name: str) -> tuple[subprocess.CompletedProcess, dict]:
    cmd = [sys.executable, str(DEVICE / "run.py"), "--cpu", "--kit", str(dry_kit / "kit"), "--out", str(out)]
    cmd += ["--budget", str(budget), "--reserve", "6", "--pack-every", "2", "--name", name]
    done = subprocess.run([*cmd, "--", "--config", str(config), "--quiet"], capture_output=True, text=True, timeout=600)
    return done, json.loads((out / "status.json").read_text())


def _packed(out: Path) -> list[str]:
    with tarfile.open(out / "results.tar.gz") as tar:
        return tar.getnames()


def test_dry_run_finishes_then_a_run_cut_by_the_budget_keeps_finished_evaluations(dry_kit, tiny_model_dir, tmp_path):
    """Bugs caught: the kit's wheels not on the experiment's path (preflight fails), the final pack skipped; the
    budget never enforced (the call runs to the tool's kill and returns nothing), or the pack made before the cut
    instead of after it (finished evaluations lost).

    The cut run starts from the finished run's evaluation cache (a second call on a warm device does the same), so
    it holds finished evaluations however slow the machine is."""
    config = _experiment(tmp_path, tiny_model_dir, "exp1", alphas=[1.0])
    done, status = _run(dry_kit, tmp_path / "out", 900, config, "finish")  # no cut meant: room for a loaded machine
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert status["state"] == "finished" and status["experiment_rc"] == 0
    assert status["preflight"]["problems"] == [] and status["preflight"]["cuda"] in (True, False)
    names = _packed(tmp_path / "out")
    assert "finish/results.json" in names
    assert status["evaluations"] == sum(n.startswith("finish/cache/eval-") and n.endswith(".json") for n in names) > 0
    assert (dry_kit / "kit" / "site" / "kitdep" / "__init__.py").is_file()  # installed from the reassembled wheels
    assert "torch==" in (tmp_path / "out" / "device-freeze.txt").read_text()

    # exp3 sweeps the safety weight over 2000 points: far more than 9 s of running allows on any machine (400 tiny
    # merges finished inside 60 s on an idle one). The budget counts from the start; setup is never cut, so on a slow
    # machine the run is stopped as soon as it starts — the warm cache still holds finished evaluations.
    work = dry_kit / "kit" / "work"
    shutil.copytree(work / "finish" / "cache", work / "cut" / "cache")
    warm = len(list((work / "cut" / "cache").glob("eval-*.json")))
    config = _experiment(tmp_path, tiny_model_dir, "exp3", alphas=[round(0.001 * i, 3) for i in range(1, 2001)])
    done, status = _run(dry_kit, tmp_path / "cut-out", 15, config, "cut")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert status["state"] == "cut", status
    assert "budget spent" in done.stdout + done.stderr
    names = _packed(tmp_path / "cut-out")
    on_disk = sorted(p.name for p in (work / "cut" / "cache").glob("eval-*.json"))
    assert sorted(Path(n).name for n in names if "/cache/eval-" in n) == on_disk
    assert len(on_disk) == status["evaluations"] >= warm > 0
    assert "cut/results.json" not in names
