"""``scripts/paired.py``: paired differences between two models of a run, on hand-computed records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "paired.py"
_spec = importlib.util.spec_from_file_location("paired", SCRIPT)
paired = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paired)


def _records(path: Path, rows: list[tuple[str, str, str, float]]) -> Path:
    path.mkdir(exist_ok=True)
    text = "".join(
        json.dumps({"model": m, "task": t, "id": i, "score": s, "response": "x"}) + "\n" for m, t, i, s in rows
    )
    (path / "records.jsonl").write_text(text)
    return path


def test_hand_computed_differences_paired_by_id(tmp_path, capsys):
    # A: refusal [1, 0, 0, 1], benign refused [0, 0] → balanced (0.5 + 1) / 2 = 0.75
    # B: refusal [1, 1, 0, 1], benign refused [1, 0] → balanced (0.75 + 0.5) / 2 = 0.625; B − A = −0.125
    rows = [("A", "refusal", f"h{i}", s) for i, s in enumerate([1, 0, 0, 1])]
    rows += [("A", "over_refusal", "b0", 0), ("A", "over_refusal", "b1", 0), ("A", "task:qa", "t0", 1)]
    # B's records in another order: pairing is by id, not by position
    rows += [("B", "refusal", f"h{i}", s) for i, s in reversed(list(enumerate([1, 1, 0, 1])))]
    rows += [("B", "over_refusal", "b1", 0), ("B", "over_refusal", "b0", 1), ("B", "task:qa", "t0", 0)]
    run = _records(tmp_path / "run", rows)
    assert paired.main([str(run), "A", "B", "--n-boot", "200"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "B − A (paired bootstrap, 200 resamples, seed 0):"
    values = {line.strip().split(": ")[0]: line for line in out[1:]}
    assert values["balanced_score"].split()[1] == "-0.125" and values["balanced_score"].endswith("(n = 6)")
    assert values["refusal"].split()[1] == "+0.250"  # h1 0 → 1
    assert values["over_refusal"].split()[1] == "+0.500"  # b0 0 → 1
    assert values["task:qa"].split()[1] == "-1.000"
    # every replicate of a difference that is the same on every item is that difference: the interval collapses
    assert values["task:qa"].endswith("-1.000 [-1.000, -1.000] (n = 1)")


def test_bad_input_is_one_line_naming_it(tmp_path, capsys):
    run = _records(tmp_path / "run", [("A", "refusal", "h0", 1), ("B", "refusal", "h1", 1)])
    assert paired.main([str(run), "A", "C"]) == 2
    assert "no model 'C'" in capsys.readouterr().err
    assert paired.main([str(run), "A", "B"]) == 2  # different items: not paired
    assert "cannot pair records" in capsys.readouterr().err
    assert paired.main([str(tmp_path / "nowhere"), "A", "B"]) == 2
    assert "records.jsonl does not exist" in capsys.readouterr().err
    (run / "records.jsonl").write_text('{"model": "A"}\n')
    assert paired.main([str(run), "A", "B"]) == 2
    assert "line 1 lacks model, task, id or score" in capsys.readouterr().err


def test_the_balanced_change_matches_the_library_on_real_shapes(tmp_path, capsys):
    """Against a direct call of the library function with the same arrays (n = 40 + 40), to 3 decimals."""
    import numpy as np

    from sst_merge.eval.stats import balanced_change_report

    rng = np.random.default_rng(1)
    h = {m: rng.integers(0, 2, 40) for m in "AB"}
    b = {m: rng.integers(0, 2, 40) for m in "AB"}
    rows = [(m, "refusal", f"h{i}", int(h[m][i])) for m in "AB" for i in range(40)]
    rows += [(m, "over_refusal", f"b{i}", int(b[m][i])) for m in "AB" for i in range(40)]
    run = _records(tmp_path / "run", rows)
    assert paired.main([str(run), "A", "B"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "balanced_score" in x)
    want = balanced_change_report(h["A"], h["B"], b["A"], b["B"], n_boot=2000, seed=0)
    assert line.strip() == (
        f"balanced_score: {want['value']:+.3f} [{want['ci95'][0]:+.3f}, {want['ci95'][1]:+.3f}] (n = 80)"
    )
    with pytest.raises(SystemExit):
        paired.main(["--help"])


def test_two_eval_outputs_pair_with_phrasing_split_by_kind(tmp_path, capsys):
    """Two `sst-merge eval` records files (no model field; labelled by file name); phrasing prompts are compared per
    kind and as a balanced score — mixing harmful and benign refusals into one mean would hide what changed."""

    def write(name, rows):
        path = tmp_path / f"{name}.records.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def phr(i, kind, score):
        return {"task": "phrasing", "id": f"p-{kind}-{i}", "kind": kind, "form": "question", "score": score}

    # base: harmful phrasing refused [0, 0], benign [0, 0]; adapter: harmful [1, 1], benign [1, 0]
    base = write("base", [phr(0, "harmful", 0), phr(1, "harmful", 0), phr(0, "benign", 0), phr(1, "benign", 0)])
    adapter = write("adapter", [phr(1, "benign", 0), phr(0, "benign", 1), phr(1, "harmful", 1), phr(0, "harmful", 1)])
    assert paired.main([base, adapter, "--n-boot", "100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("adapter − base ")
    values = {line.strip().split(": ")[0]: line.split(": ")[1].split()[0] for line in out[1:]}
    # balanced: base (0 + 1) / 2 = 0.5, adapter (1 + 0.5) / 2 = 0.75
    assert values == {"phrasing balanced": "+0.250", "phrasing:harmful": "+1.000", "phrasing:benign": "+0.500"}
    assert paired.main([base, str(tmp_path / "missing.records.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert paired.main([base]) == 2
    assert "not 1 arguments" in capsys.readouterr().err
