"""The docs run as written: every ``sst-merge`` command in README.md and docs/*.md parses with the real parser, no
command spans three lines, every relative link resolves, and each extension example of docs/extending.md works on
the tiny in-process model."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

from sst_merge.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")


def commands(text: str) -> list[tuple[str, int]]:
    """Every command line in ``text`` as ``(command, lines it spans)``: fenced lines (joined over ``\\``) and inline
    code spans that start with ``sst-merge``."""
    out = []
    for block in FENCE.findall(text):
        lines, cur, n = [], "", 0
        for line in block.splitlines():
            cur, n = cur + " " + line.rstrip("\\").strip(), n + 1
            if not line.rstrip().endswith("\\"):
                lines.append((cur.strip(), n))
                cur, n = "", 0
        out += lines
    for span in INLINE.findall(FENCE.sub("", text)):
        if span.startswith("sst-merge "):
            out.append((" ".join(span.split()), span.count("\n") + 1))
    return out


def argv_of(command: str) -> list[str]:
    """The arguments of a documented ``sst-merge`` command, with the docs' notation read: ``[...]`` optional parts
    are kept, ``a|b`` alternatives take the first, ``...`` / ``…`` are dropped, a trailing comment is cut."""
    command = command.split("  #")[0].split(" # ")[0]
    args = []
    for tok in shlex.split(command.replace("[", " ").replace("]", " "))[1:]:
        if tok in ("...", "…"):
            continue
        if "|" in tok and not tok.startswith("hf:"):
            tok = tok.split("|")[0]
        args.append(tok)
    return args


def is_invocation(command: str) -> bool:
    """Whether an ``sst-merge …`` span is a command to run, not a mention (``sst-merge train``), a placeholder
    (``sst-merge COMMAND --help``) or a quoted message (``sst-merge plan: error: …``)."""
    words = command.split()
    return len(words) > 2 and words[1].islower() and not words[1].endswith(":")


DOC_COMMANDS = [
    (doc.relative_to(ROOT).as_posix(), cmd)
    for doc in DOCS
    for cmd, _ in commands(doc.read_text())
    if cmd.startswith("sst-merge ") and is_invocation(cmd)
]


def test_docs_show_commands():
    assert len(DOC_COMMANDS) > 20
    assert any("configs/three_way_full.yaml" in c for _, c in DOC_COMMANDS)


#: a placeholder in a documented command (``DIR``, ``--steps S``, ``…``): its values are not real, so only the
#: sub-command and the flag names are checked
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*\b|…|\.\.\.")


def options_of(argv: list[str]) -> tuple[list[str], set[str]] | None:
    """The sub-command path of ``argv`` (``["cache", "verify"]``) and every option string it accepts (its own and
    the global ones), or ``None`` when the real parser has no such sub-command."""
    parser = build_parser()
    accepted = {o for a in parser._actions for o in a.option_strings}
    path = []
    for word in argv:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            break
        if word not in subs[0].choices:
            return None
        parser = subs[0].choices[word]
        path.append(word)
        accepted |= {o for a in parser._actions for o in a.option_strings}
    return path, accepted


@pytest.mark.parametrize("doc,command", DOC_COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in DOC_COMMANDS])
def test_documented_command_names_a_real_subcommand_and_real_flags(doc, command):
    argv = argv_of(command)
    found = options_of(argv)
    assert found is not None, f"{doc}: `{command}`: the parser has no such sub-command"
    path, accepted = found
    flags = [t.split("=")[0] for t in argv[len(path) :] if t.startswith("-") and not t[1:2].isdigit()]
    unknown = [f for f in flags if f not in accepted]
    assert not unknown, f"{doc}: `{command}`: sst-merge {' '.join(path)} has no {', '.join(unknown)}"
    if not PLACEHOLDER.search(command):  # a concrete command: the whole line parses
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:  # argparse exits 2 on a bad value or a missing required argument
            pytest.fail(f"{doc}: `{command}` does not parse (exit {e.code})")
    for value in argv[1:]:
        if value.startswith(("configs/", "examples/")) and value.endswith(".yaml") and not PLACEHOLDER.search(value):
            assert (ROOT / value).is_file(), f"{doc}: `{command}` names {value}, which does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_no_command_spans_three_lines(doc):
    long = [c for c, n in commands(doc.read_text()) if n >= 3]
    assert not long, f"{doc.name}: put these in a config file (configs/) or on two lines: {long}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text())
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        path = target.split("#")[0]
        if path and not (doc.parent / path).exists():
            missing.append(target)
    assert not missing, f"{doc.name}: links to missing files: {missing}"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "bash scripts/setup.sh && .venv/bin/sst-merge demo" in text
    for page in ("docs/results.md", "docs/usage.md", "docs/design.md", "docs/embedded_default.md", "docs/extending.md"):
        assert f"]({page}" in text and (ROOT / page).is_file()


# -- docs/extending.md: each example, imported and run ------------------------------------------------------------


@pytest.fixture(scope="module")
def extending():
    sys.path.insert(0, str(ROOT / "examples" / "extending"))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "examples" / "extending"))


def test_example_merge_method_merges_two_adapters(extending, tiny_model_dir, tmp_path):
    extending("max_magnitude")
    from sst_merge.adapters.lora import LoraAdapter
    from sst_merge.merge import MERGE_METHODS
    from sst_merge.merge.api import merge_deltas
    from sst_merge.testing import random_lora, tiny_model

    assert "max_magnitude" in MERGE_METHODS.names()
    base = tiny_model()
    paths = [random_lora(base, str(tmp_path / n), r=2, seed=i + 1) for i, n in enumerate("ab")]
    cfg = {"base_model": str(tiny_model_dir), "method": "max_magnitude", "output": {"format": "full"},
           "adapters": [{"path": paths[0], "weight": 1.0}, {"path": paths[1], "weight": 0.5}],
           "params": {"lambda": 2.0}}  # fmt: skip
    out = merge_deltas(cfg, show_progress=False)
    a, b = (LoraAdapter.load(p) for p in paths)
    m = next(iter(out))
    ta, tb = a.delta(m), 0.5 * b.delta(m)
    expected = 2.0 * torch.where(ta.abs() >= tb.abs(), ta, tb)  # argmax takes the first on a tie
    assert torch.allclose(out[m], expected)


def test_example_evaluator_runs_on_the_tiny_model(extending, tiny_llama, tiny_tok):
    extending("answer_rate")
    from sst_merge.eval import EvalSettings, evaluate

    items = [{"id": f"p{i}", "prompt": f"hello {i}"} for i in range(3)]
    res = evaluate(tiny_llama, tiny_tok, ["answer_rate"], EvalSettings(batch_size=3, max_new_tokens=2),
                   data={"answer_rate": items}, show_progress=False)  # fmt: skip
    metric = res["tasks"]["answer_rate"]["metrics"]["answer_rate"]
    assert metric["n"] == 3 and 0.0 <= metric["value"] <= 1.0


def test_example_data_source_loads_by_name(extending):
    extending("greetings_source")
    from sst_merge.data.sources import load_source

    assert [it["id"] for it in load_source("greetings", split="eval")] == ["greet-3", "greet-4"]
    assert len(load_source("greetings", limit=2)) == 2


def test_example_fisher_approximation_keeps_the_rows_safety_ranks_first(extending):
    extending("rows_fisher")
    from sst_merge.fisher.approximation import get_approximation
    from sst_merge.fisher.gevp import Selection

    rows = get_approximation("rows")
    # F_s concentrates on rows 0 and 2, F_u is flat: λ = (4, 1, 9, 1) / (1 + ε·1) ranks rows 2, 0 first.
    g_s = torch.tensor([2.0, 1.0, 3.0, 1.0])[None, :, None].expand(1, 4, 1)
    g_u = torch.ones(1, 4, 1)
    fs, fu = rows.init(4, 1, 1), rows.init(4, 1, 1)
    rows.update(fs, None, None, g_s, [0])
    rows.update(fu, None, None, g_u, [0])
    fs, fu = rows.finish(fs, 1, 1), rows.finish(fu, 1, 1)
    tau = torch.arange(8.0).reshape(4, 2)
    res = rows.project(fs, fu, tau, eps=1e-3, selection=Selection(k=2))
    assert res.n_kept == 2 and res.n_directions == 4
    assert torch.equal(res.projected, torch.tensor([[0.0, 1.0], [0.0, 0.0], [4.0, 5.0], [0.0, 0.0]]))
