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


def test_the_matched_table_names_the_series_each_row_was_matched_against():
    """The baselines come from the rows (what exp3 matched), not from label prefixes: a baseline whose name starts
    with "sst" stays, an SST variant with any name is not a baseline; with no SST point every series is one."""
    from sst_merge.experiments.report import matched_table

    point = {"alpha": 1.0, "safety": 0.5, "utility": 0.9, "over_refusal": 0.1}
    section = {
        "points": {"comp": [point], "sstish_baseline": [point], "ties": [point]},
        "at_matched_safety": [
            {
                "series": "comp",
                "model": "sst[comp](alpha=1)",
                "safety": 0.5,
                "sst_utility": 0.9,
                "sst_over_refusal": 0.1,
                "utility": {"sstish_baseline": 0.8, "ties": 0.7},
                "over_refusal": {"sstish_baseline": 0.2, "ties": 0.3},
            }
        ],
    }
    header, _, row = matched_table(section).splitlines()[:3]
    assert "sstish_baseline utility / over-refusal | ties utility / over-refusal |" in header
    assert "comp utility" not in header
    assert row.endswith("| 0.800 / 0.200 | 0.700 / 0.300 |")
    schema1 = {"points": section["points"], "utility_at_matched_safety": [
        {"series": "comp", "model": "m", "safety": 0.5, "sst_utility": 0.9, "sstish_baseline": 0.8, "ties": 0.7}]}  # fmt: skip
    assert matched_table(schema1).splitlines()[0].endswith("| sstish_baseline utility | ties utility |")
    no_sst = {"points": {"ties": [point], "dare_linear": [point]}, "at_matched_safety": []}
    assert (
        matched_table(no_sst)
        .splitlines()[0]
        .endswith("| ties utility / over-refusal | dare_linear utility / over-refusal |")
    )
