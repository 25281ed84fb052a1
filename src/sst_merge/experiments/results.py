"""Assemble, validate and write a run's results: JSON (atomic), per-item records, then report and plots."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from sst_merge import __version__
from sst_merge.experiments.provenance import SCHEMA_VERSION, git_revision, library_versions
from sst_merge.experiments.report import write_report
from sst_merge.experiments.runner import Runner
from sst_merge.experiments.schema import Results
from sst_merge.io import atomic_write_json, atomic_write_text

RESULTS_NAME = "results.json"
RECORDS_NAME = "records.jsonl"


def build_results(runner: Runner, sections: dict[str, Any]) -> dict[str, Any]:
    """The results document of a finished run (validated against :class:`Results`)."""
    cfg = runner.cfg
    adapters = {}
    for spec in runner.specs.values():
        for a in spec.adapters:
            adapters[a.path] = {"sha256": runner.adapter(a.path).sha256, "role": a.role}
    doc = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "git_revision": git_revision(),
        "library_versions": library_versions(),
        "config": cfg.model_dump(mode="json"),
        "seeds": {"seed": cfg.seed, "bootstrap_seed": cfg.seed, "merge_seed": cfg.seed},
        "base_model": {"name": cfg.model, "resolved": str(runner.resolved), "fingerprint": runner.base_fingerprint},
        "adapters": adapters,
        "models": {
            label: {
                "spec": spec.describe(),
                "cache_key": runner.spec_key(spec),
                "metrics": {name: m.to_json() for name, m in runner.evaluated[label].items()},
            }
            for label, spec in runner.specs.items()
        },
        "experiments": sections,
        "records": RECORDS_NAME,
        "cache": {"hits": runner.cache_hits, "misses": runner.cache_misses},
        # what each merge reported about itself (SST: λ spectrum per module, kept share of the safety update, N)
        "diagnostics": {label: runner.diagnostics[label] for label in runner.specs if label in runner.diagnostics},
    }
    Results.model_validate(doc)
    return doc


def write_records(runner: Runner, run_dir: Path) -> None:
    """Gather every evaluated model's per-item records into one JSONL, each line tagged with its model."""
    lines = []
    for label, spec in runner.specs.items():
        src = runner.cache_dir / f"records-{runner.spec_key(spec)}.jsonl"
        if not src.is_file():
            continue
        for line in src.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                lines.append(json.dumps({"model": label, **rec}, ensure_ascii=False))
    atomic_write_text(run_dir / RECORDS_NAME, "\n".join(lines) + ("\n" if lines else ""))


def write_results(runner: Runner, sections: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write records, the results JSON, and the report (Markdown, CSV, plots) derived from the JSON alone."""
    doc = build_results(runner, sections)
    write_records(runner, run_dir)
    atomic_write_json(run_dir / RESULTS_NAME, doc)
    write_report(run_dir)
    return doc
