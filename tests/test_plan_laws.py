"""The planner's laws live with what they price (issue 26, item 6): every number identical to the golden, a new
approximation plans with no edit of ``plan/``, and no module outside ``fisher/`` branches on an approximation's name.

The golden (``tests/data/plan_golden.json``) was written by ``plan.py`` before it became a package, from the cases
below with fixed rates and memory; regenerate it only on a deliberate change of a law:
``PYTHONPATH=src python tests/test_plan_laws.py --write``.
"""

from __future__ import annotations

import ast
import json
import sys
import tempfile
from pathlib import Path

import pytest

from sst_merge.config import load_yaml
from sst_merge.experiments import resolve_config
from sst_merge.fisher.approximation import APPROXIMATIONS, Approximation
from sst_merge.fisher.solve import get_approximation
from sst_merge.plan import (
    GIB,
    LearnedFit,
    Memory,
    OwnPass,
    Rates,
    Settings,
    check_fit,
    estimate,
    experiment_settings,
    fisher_batch_seconds,
    fisher_host_bytes,
    fisher_memory,
    fisher_pass_seconds,
    fisher_statistics_seconds,
    gevp_seconds,
    gpu_rates,
    model_shape,
    plan_run,
    settings_from_config,
)

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "plan_golden.json"
FISHERS = ("lowrank", "kfac", "diagonal", "dense")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: measured-like rates: curves, a heap bandwidth, page faults priced on the device (every law's branch is taken)
CPU = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8, eigh=2e9, rows=5e7, fault=3e9, heap_bandwidth=3e10,
            ties=5e7, matmul_curve=((64, 3e10), (256, 6e10), (1024, 1e11)),
            decode_curve=((1, 1e10), (8, 4e10), (32, 6e10)))  # fmt: skip
FLAT = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8)  # the other tests' rates


def _plan(model: str, s: Settings, memory: Memory, rates: Rates, on_gpu: bool) -> dict:
    p = plan_run(model, s, memory=memory, rates=rates, on_gpu=on_gpu)
    return {"json": p.to_json(), "table": p.table()}


def _adapter(path: Path) -> str:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    return str(path)


def golden_cases() -> dict[str, object]:
    """Every number the planner gives for a fixed set of inputs (JSON-ready)."""
    out: dict[str, object] = {}
    small_cpu = Memory(device=4 * GIB, host=4 * GIB)
    cpu16 = Memory(device=16 * GIB, host=16 * GIB)
    h100 = Memory(device=80e9, host=128 * GIB, gpus=1, name="H100-80GB")
    for fisher in FISHERS:
        for n in (4, 32):
            s = Settings(fisher=fisher, n_samples=n)
            out[f"smollm2/{fisher}/N={n}"] = _plan("smollm2-135m", s, cpu16, CPU, False)
        s = Settings(fisher=fisher, dtype="bfloat16", targets=ALL, output="full", ties=True, train=True,
                     own=[OwnPass("fisher_merge", "diagonal", 2), OwnPass("regmean", "kfac", 3, n_samples=16)],
                     learned=LearnedFit(benign=60))  # fmt: skip
        out[f"smollm2/{fisher}/everything"] = _plan("smollm2-135m", s, cpu16, CPU, False)
        out[f"smollm2/{fisher}/gpu"] = _plan("smollm2-135m", s, h100, gpu_rates("H100-80GB"), True)
        q = Settings(fisher=fisher, dtype="float32", targets=ALL, n_samples=64, objectives=3)
        out[f"qwen/{fisher}/small"] = _plan("qwen2.5-coder-0.5b", q, small_cpu, CPU, False)
        out[f"qwen/{fisher}/two-gpus"] = _plan(
            "qwen2.5-coder-0.5b", q, Memory(device=1 * GIB, host=3 * GIB, gpus=2, name="x"), CPU, True
        )
        if fisher != "dense":
            ll = Settings(fisher=fisher, dtype="bfloat16", n_samples=32)
            out[f"llama/{fisher}/h100"] = _plan("llama-3.1-8b", ll, h100, gpu_rates("H100-80GB"), True)
            out[f"llama/{fisher}/60gib"] = _plan("llama-3.1-8b", ll, Memory(80 * GIB, 60 * GIB, gpus=1), FLAT, True)

    laws = {}
    for model in ("smollm2-135m", "qwen2.5-coder-0.5b", "llama-3.1-8b"):
        shape = model_shape(model)
        for fisher in FISHERS:
            for rates_name, rates in (("cpu", CPU), ("gpu", gpu_rates("H200-141GB"))):
                s = Settings(fisher=fisher, n_samples=16, targets=ALL, fisher_batch=4, fisher_length=128)
                laws[f"{model}/{fisher}/{rates_name}"] = {
                    "host": fisher_host_bytes(shape, s),
                    "host_n2": fisher_host_bytes(shape, s, n=2),
                    "memory": list(fisher_memory(shape, s)),
                    "batch": fisher_batch_seconds(shape, s, rates),
                    "statistics": fisher_statistics_seconds(shape, s, rates),
                    "pass": fisher_pass_seconds(shape, s, rates),
                    "pass_100": fisher_pass_seconds(shape, s, rates, n_examples=100),
                    "steps": [
                        [st.step, st.device_bytes, st.host_bytes, st.seconds] for st in estimate(shape, s, rates)
                    ],
                }
    for fisher in FISHERS:
        for o, i in ((576, 576), (192, 576), (1536, 576), (4096, 4096), (1024, 4096), (14336, 4096)):
            for n in (4, 64):
                laws[f"gevp/{fisher}/{o}x{i}/N={n}"] = [gevp_seconds(fisher, o, i, n, r) for r in (CPU, FLAT)]
    out["laws"] = laws

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        data = load_yaml(str(path))
        model, s = experiment_settings(resolve_config(data.pop("mode"), data))
        out[f"config/{path.stem}"] = _plan(model, s, Memory(device=64 * GIB, host=64 * GIB), CPU, False)

    with tempfile.TemporaryDirectory() as tmp:
        adapters = [{"path": _adapter(Path(tmp) / n), "weight": w} for n, w in (("a", 1.0), ("b", 2.0), ("c", 0.0))]
        merges = {
            "sst": {"fisher": "lowrank", "n_samples": 16, "fraction": 0.1},
            "sst-input": {"space": "input", "fisher": "kfac", "share": 0.1, "n_samples": 16},
            "safety_span": {"fisher": "kfac", "n_samples": 16},
            "ties": {},
            "task_arithmetic": {},
            "fisher_merge": {"n_samples": 16, "batch_size": 4, "max_length": 128, "max_new_tokens": 32},
            "regmean": {"n_samples": 8},
            "learned": {"steps": 10, "batch_size": 2, "max_length": 64},
        }
        for name, params in merges.items():
            cfg = {"base_model": "smollm2-135m", "method": name.split("-")[0], "adapters": adapters, "params": params,
                   "output": {"format": "full" if name == "ties" else "peft"}}  # fmt: skip
            model, s = settings_from_config(cfg)
            out[f"merge/{name}"] = _plan(model, s, cpu16, CPU, False)
    return json.loads(json.dumps(out))


def test_every_number_equals_the_golden():
    golden = json.loads(GOLDEN.read_text())
    now = golden_cases()
    assert sorted(now) == sorted(golden)
    for key in golden:
        assert now[key] == golden[key], key


class Toy(Approximation):
    """An approximation the planner has never heard of: one number per module, a cubic solve, alternatives."""

    name = "toy"
    plan_alternatives = ("diagonal",)
    memory_grows_with_n = True

    def host_bytes(self, mods, n):
        return 1000 * n * len(mods)

    def per_example_bytes(self, mods, batch):
        return 7 * batch

    def finish_copy_elements(self, mods):
        return 3

    def batch_seconds(self, forward_s, mods, batch, tokens, matmul, rates):
        return forward_s + 0.5

    def statistics_seconds(self, overhead_s, mods, n, rates):
        return overhead_s + 0.25 * n

    def gevp_seconds(self, o, i, n, rates):
        return 1e-6 * (o + i)

    def gevp_host_bytes(self, mods, n):
        return 11


@pytest.fixture
def toy(monkeypatch):
    # registered for this test only (monkeypatch removes it again; the registry refuses a name registered twice)
    monkeypatch.setitem(APPROXIMATIONS._items, "toy", Toy)
    return Toy()


def test_a_new_approximation_plans_with_its_own_laws_and_no_edit_of_plan(toy):
    shape = model_shape("smollm2-135m")
    mods = [(576, 576), (192, 576)] * shape.layers  # q_proj and v_proj of every layer
    s = Settings(fisher="toy", n_samples=4)
    steps = {st.step: st for st in estimate(shape, s, FLAT)}
    fisher, gevp = steps["fisher (toy, N=4 × 2)"], steps["gevp + projection"]
    assert fisher_host_bytes(shape, s) == 1000 * 4 * len(mods)
    host = 1000 * 4 * len(mods) + sum(o * i for o, i in mods) * 4 + 3 * 4  # statistics + ΔW map + finish()'s copy
    assert fisher.host_bytes == host and fisher_memory(shape, s)[1] == host
    assert gevp.host_bytes == host + 11
    assert gevp.seconds == pytest.approx(sum(1e-6 * (o + i) for o, i in mods))
    assert gevp_seconds("toy", 576, 576, 4, FLAT) == pytest.approx(1152e-6)
    assert fisher_statistics_seconds(shape, s, FLAT) == pytest.approx(1e-3 + 0.25 * 4)  # the pass's overhead + law
    # its alternatives, then a smaller N: a plan that does not fit suggests what the toy's laws say would
    huge = Settings(fisher="toy", n_samples=10**6)
    memory = Memory(device=16 * GIB, host=16 * GIB)
    assert check_fit(shape, huge, memory, FLAT, on_gpu=False).endswith("--set sst.fisher=diagonal would fit")
    plan = plan_run("smollm2-135m", huge, memory=memory, rates=FLAT, on_gpu=False)
    assert "SST toy N=1000000" in plan.table()


def test_an_approximation_without_a_law_says_which_one_it_lacks(monkeypatch):
    class Bare(Approximation):
        name = "bare"

    monkeypatch.setitem(APPROXIMATIONS._items, "bare", Bare)
    with pytest.raises(NotImplementedError, match="fisher bare: no planner law host_bytes"):
        fisher_host_bytes(model_shape("smollm2-135m"), Settings(fisher="bare"))


def test_every_registered_approximation_has_every_law():
    laws = [n for n, v in vars(Approximation).items() if callable(v) and n not in vars(object)]
    laws = laws[laws.index("host_bytes") :]  # the planner's laws close the base class
    assert laws == ["host_bytes", "per_example_bytes", "finish_copy_elements", "batch_seconds",
                    "statistics_seconds", "gevp_seconds", "gevp_host_bytes"]  # fmt: skip
    for name in APPROXIMATIONS.names():
        cls = type(get_approximation(name))
        if not cls.__module__.startswith("sst_merge.fisher."):
            continue  # registered by a test (docs/extending.md's example plans nothing and says so)
        missing = [law for law in laws if getattr(cls, law) is getattr(Approximation, law)]
        assert not missing, f"{name} lacks {missing}"


APPROX_NAMES = {"kfac", "lowrank", "diagonal", "dense"}


def _name_branches(tree: ast.AST) -> list[tuple[int, str]]:
    """Comparisons (``==``, ``!=``, ``in``, ``not in``, …) with an approximation's name as a string constant on
    either side (also inside a tuple, list or set), and dicts keyed by those names (a dispatch on the name)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Dict):
            operands = [k for k in node.keys if k is not None]
        else:
            continue
        for operand in operands:
            if any(isinstance(c, ast.Constant) and c.value in APPROX_NAMES for c in ast.walk(operand)):
                out.append((node.lineno, ast.unparse(node)[:80]))
                break
    return out


def test_the_name_check_sees_a_branch():
    code = 'a = x == "kfac"\nb = "lowrank" != y\nc = f in ("diagonal", "x")\nd = {"dense": 1}.get(f)\ne = "kfac"\n'
    assert [line for line, _ in _name_branches(ast.parse(code))] == [1, 2, 3, 4]


def test_no_branch_on_an_approximation_name_outside_fisher():
    src = ROOT / "src" / "sst_merge"
    found = [
        f"{f.relative_to(src)}:{line}: {text}"
        for f in sorted(src.rglob("*.py"))
        if f.relative_to(src).parts[0] != "fisher"
        for line, text in _name_branches(ast.parse(f.read_text()))
    ]
    assert not found, "a Fisher approximation's law belongs in its own file under fisher/: " + "; ".join(found)


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(golden_cases(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")


def test_a_new_merge_method_plans_from_its_own_class(monkeypatch):
    """A merge method's cost facts come from its class through the registry (no method name in plan/). Bugs caught:
    the planner keyed by name again (the toy's own-data pass or its trim would be missed)."""
    from sst_merge.merge import MERGE_METHODS
    from sst_merge.merge.regmean import RegMean
    from sst_merge.plan.settings import _data_aware, experiment_settings

    class Toy(RegMean):
        name = "toy_stat"
        own_statistic = "diagonal"
        trims = True

    monkeypatch.setitem(MERGE_METHODS._items, "toy_stat", Toy)
    own, fit = _data_aware("toy_stat", {}, passes=2)
    assert fit is None and [(o.method, o.fisher, o.passes) for o in own] == [("toy_stat", "diagonal", 2)]
    assert _data_aware("task_arithmetic", {}, passes=2) == ([], None)
    cfg = resolve_config("minimal", {"sweep": {"methods": ["toy_stat"]}})
    assert experiment_settings(cfg)[1].ties  # the toy trims, so the plan prices TIES' step
