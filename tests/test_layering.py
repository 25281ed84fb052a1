"""Imports point down (docs/design.md §2): no library module imports the CLI, no layer imports a higher one, and no
two modules import each other (no import cycle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "sst_merge"

#: The layers of docs/design.md §2 (a module may import its own layer or a lower one).
LAYERS = {
    "__init__": 0, "errors": 0, "io": 0, "config": 0, "registry": 0, "cache": 0, "distributed": 0, "tensors": 0, "machine": 0,
    "adapters": 1, "models": 1, "data": 1, "tasks": 1,
    "merge": 2, "fisher": 2, "eval": 2, "train": 2,
    "experiments": 3, "plan": 3, "rehearsal": 3, "testing": 3,
    "commands": 4, "cli": 4, "__main__": 4,
}  # fmt: skip

#: Known upward edges, each to be moved down (not to be added to).
KNOWN: set[tuple[str, str]] = set()


def _edges() -> list[tuple[str, str, str, str]]:
    out = []
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        top = rel.split("/")[0].removesuffix(".py")
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sst_merge."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("sst_merge.")]
            else:
                continue
            out += [(rel, top, name, name.split(".")[1]) for name in names]
    return out


def test_every_top_level_module_has_a_layer():
    tops = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert tops <= set(LAYERS), sorted(tops - set(LAYERS))


def test_no_library_module_imports_the_cli():
    bad = [(rel, name) for rel, top, name, dep in _edges() if dep in ("commands", "cli") and LAYERS[top] < 4]
    assert not bad


def test_imports_point_down():
    up = {(rel, name) for rel, top, name, dep in _edges() if LAYERS[dep] > LAYERS[top]}
    assert up == KNOWN, sorted(up ^ KNOWN)


def _module_of(name: str) -> str | None:
    """The file of module ``sst_merge.a.b`` relative to the package (``a/b.py`` or ``a/b/__init__.py``)."""
    parts = name.split(".")[1:]
    for rel in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
        if (ROOT / rel).is_file():
            return rel
    return None


def _import_graph() -> dict[str, set[str]]:
    """Module → modules it imports: at top level, in a function, or under ``if TYPE_CHECKING:`` (an annotation's
    import is a dependency too: two modules that name each other's types are one concept split in two).
    ``from pkg import name`` points at ``pkg/name`` when that is a module."""
    graph: dict[str, set[str]] = {}
    for f in sorted(ROOT.rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sst_merge"):
                targets = [_module_of(f"{node.module}.{a.name}") or _module_of(node.module) for a in node.names]
                deps |= {t for t in targets if t}
            elif isinstance(node, ast.Import):
                deps |= {m for a in node.names if a.name.startswith("sst_merge.") and (m := _module_of(a.name))}
        graph[rel] = deps - {rel}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    graph = {"a.py": {"b.py"}, "b.py": {"c.py"}, "c.py": {"a.py"}, "d.py": {"a.py"}}
    assert _cycles(graph) == [["a.py", "b.py", "c.py"]]
    assert _cycles({"a.py": {"b.py"}, "b.py": set()}) == []


def test_no_two_modules_import_each_other():
    graph = _import_graph()
    assert "experiments/specs.py" in graph["experiments/evaluation.py"]  # the graph sees imports at all
    assert _cycles(graph) == []


def test_type_checking_imports_count(tmp_path, monkeypatch):
    # a cycle closed only by an annotation's import is still a cycle
    (tmp_path / "a.py").write_text("from sst_merge.b import B\n")
    (tmp_path / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from sst_merge.a import A\n"
    )
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert _cycles(_import_graph()) == [["a.py", "b.py"]]
