"""Reports of results written before the three-way account (schema 1) still validate and render."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sst_merge.experiments.report import write_report

DOCS = Path(__file__).resolve().parent.parent / "docs" / "results"


@pytest.mark.parametrize("run", ["exp1_full", "exp3_full"])
def test_schema_1_results_render(run, tmp_path):
    src = DOCS / run
    if not (src / "results.json").is_file():
        pytest.skip(f"{src} holds no results.json")
    shutil.copy(src / "results.json", tmp_path / "results.json")
    report = write_report(tmp_path).read_text()
    # the tables of the old report come back (these results have no over-refusal account to add)
    old = (src / "report.md").read_text()
    first_table = old.split("## Every evaluated model")[1].split("##")[0]
    assert first_table in report
    assert "Over-refusal Tax" not in report
