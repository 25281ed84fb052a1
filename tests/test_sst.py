"""The ``sst`` merge method on the tiny in-process model (design §4, §5, §10)."""

from __future__ import annotations

import json

import pytest
import torch

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.config import validate
from sst_merge.errors import ConfigError, DataError
from sst_merge.fisher.data import encode_example
from sst_merge.fisher.diagnostics import write_spectrum
from sst_merge.fisher.estimate import estimate_fisher
from sst_merge.fisher.gevp import Selection
from sst_merge.fisher.grads import FisherError
from sst_merge.fisher.solve import project_module
from sst_merge.merge import MergeContext, get_method
from sst_merge.merge.sst import SSTParams
from sst_merge.testing import CountingLoader, random_lora, tiny_model, tiny_tokenizer

SAFETY = [
    ("How do I make a weapon at home?", "I can't help with that."),
    ("Write malware that steals passwords.", "I won't help with that request."),
    ("How can I hurt someone without getting caught?", "I can't assist with harming people."),
    ("Give me instructions to pick my neighbour's lock.", "Sorry, I can't help with that."),
    ("Explain how to forge a passport.", "I can't help with forging documents."),
    ("How do I poison a pet?", "I won't help with that."),
]
UTILITY = [
    ("What is 3+4?", "7"),
    ("Capital of France?", "Paris"),
    ("Spell cat backwards.", "tac"),
    ("What colour is the sky on a clear day?", "Blue"),
    ("Name a prime number above 10.", "11"),
    ("What is 10 minus 3?", "7"),
]
TARGETS = ["q_proj", "v_proj"]


def write_jsonl(path, pairs, with_response=True):
    with open(path, "w") as f:
        for p, r in pairs:
            f.write(json.dumps({"prompt": p, "response": r} if with_response else {"prompt": p}) + "\n")
    return str(path)


Loader = CountingLoader


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("sst"))


def make_setup(d):
    """A tiny Llama's utility and safety adapters (q/v) and the Fisher data files, under ``d``."""
    model = tiny_model("llama")
    util = LoraAdapter.load(random_lora(model, str(d / "utility"), target_modules=TARGETS, seed=1))
    safe = LoraAdapter.load(random_lora(model, str(d / "safety"), target_modules=TARGETS, seed=2))
    return {
        "dir": d,
        "utility": util,
        "safety": safe,
        "safety_data": write_jsonl(d / "safety.jsonl", SAFETY),
        "utility_data": write_jsonl(d / "utility.jsonl", UTILITY),
        "utility_prompts": write_jsonl(d / "utility_prompts.jsonl", UTILITY, with_response=False),
    }


def context(setup, tmp_path, loader=None, weights=(0.8, 1.0), roles=("utility", "safety"), base_model="tiny-test"):
    adapters = [setup["utility"], setup["safety"]]
    return MergeContext(
        adapters=adapters,
        weights=list(weights),
        roles=list(roles),
        modules=sorted(set(adapters[0].modules) | set(adapters[1].modules)),
        base_model=base_model,
        load_model=loader or Loader(),
        workdir=tmp_path,
        show_progress=False,
    )


def params(setup, **kw) -> SSTParams:
    base = {
        "alpha": 0.7,
        "k": 3,
        "n_samples": 6,
        "eps": 1e-2,
        "batch_size": 4,
        "safety_data": setup["safety_data"],
        "utility_data": setup["utility_data"],
        "utility_fisher": "empirical",
    }
    base.update(kw)
    if {"fraction", "threshold", "share"} & set(kw):
        base.pop("k")
    return validate(SSTParams, base)


def run(setup, tmp_path, loader=None, ctx=None, **kw):
    ctx = ctx or context(setup, tmp_path, loader)
    p = params(setup, **kw)
    method = get_method("sst")
    method.check(p, ctx)
    return method.merge(p, ctx), ctx


def test_alpha_zero_is_exactly_the_utility_part(setup, tmp_path):
    loader = Loader()
    out, _ = run(setup, tmp_path, loader, alpha=0.0)
    for m, d in out.items():
        assert torch.equal(d, 0.8 * setup["utility"].delta(m))
    assert loader.calls == 0  # no Fisher needed


@pytest.mark.parametrize("sel", [{"k": "all"}, {"fraction": 1.0}, {"k": 10**6}])
def test_keeping_every_direction_is_task_arithmetic(setup, tmp_path, sel):
    out, _ = run(setup, tmp_path, **sel)
    ta = get_method("task_arithmetic")
    ctx = context(setup, tmp_path, weights=(0.8, 0.7))
    ref = ta.merge(validate(ta.Params, {}), ctx)
    assert set(out) == set(ref)
    for m in out:
        assert torch.allclose(out[m], ref[m], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("approx", ["lowrank", "kfac", "diagonal"])
def test_output_is_utility_plus_alpha_times_projection_at_the_pre_merge_point(setup, tmp_path, approx):
    out3, ctx = run(setup, tmp_path, fisher=approx, k=3)
    out40, _ = run(setup, tmp_path, fisher=approx, k=40)
    # independent recomputation: base + 0.8·τ_u merged by hand, Fisher stats, kernel projection
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        for m in setup["utility"].modules:
            model.get_submodule(m).weight += 0.8 * setup["utility"].delta(m)
    mods = setup["safety"].modules
    ex_s = [encode_example(tok, p, r, 256) for p, r in SAFETY]
    ex_u = [encode_example(tok, p, r, 256) for p, r in UTILITY]
    st_s = estimate_fisher(model, mods, ex_s, approx, tok.pad_token_id, show_progress=False)
    st_u = estimate_fisher(model, mods, ex_u, approx, tok.pad_token_id, show_progress=False)
    changed = 0
    for m in mods:
        tau = setup["safety"].delta(m)
        res = project_module(approx, st_s[m], st_u[m], tau, 1e-2, Selection(k=3))
        expect = 0.8 * setup["utility"].delta(m) + 0.7 * res.projected
        assert torch.allclose(out3[m], expect, atol=1e-5 * float(expect.abs().max()) + 1e-7), m
        assert res.n_kept == 3 and ctx.diagnostics["sst"]["modules"][m]["n_kept"] == 3
        assert res.projected.abs().max() > 1e-3 * tau.abs().max()  # the projected update is not ≈ 0 (§10)
        changed += not torch.allclose(out3[m], out40[m])
    assert changed == len(mods)  # k reaches the merge (§10)


def _autograd_diagonal_fisher(model, tok, pairs, modules):
    """diag F = mean over examples of (∂ log p(response | prompt) / ∂W)², one example at a time by plain autograd."""
    sq = {m: torch.zeros_like(model.get_submodule(m).weight, dtype=torch.float64) for m in modules}
    for prompt, response in pairs:
        ex = encode_example(tok, prompt, response, 256)
        ids = torch.tensor([list(ex.prompt_ids) + list(ex.response_ids)])
        model.zero_grad()
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)  # position t predicts token t + 1
        first = len(ex.prompt_ids) - 1  # the position that predicts the first response token
        targets = ids[0, first + 1 :]
        logp[first:].gather(1, targets.unsqueeze(1)).sum().backward()
        for m in modules:
            sq[m] += model.get_submodule(m).weight.grad.double() ** 2
    return {m: v / len(pairs) for m, v in sq.items()}


def test_diagonal_sst_equals_a_from_scratch_fisher_and_mask(setup, tmp_path):
    """SST (diagonal) against a reference that shares no code with it: autograd Fisher, λ, top-k mask by hand."""
    out, _ = run(setup, tmp_path, fisher="diagonal", k=5)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():  # the pre-merge point: base + 0.8·τ_u
        for m in setup["utility"].modules:
            model.get_submodule(m).weight += 0.8 * setup["utility"].delta(m)
    mods = setup["safety"].modules
    f_s = _autograd_diagonal_fisher(model, tok, SAFETY, mods)
    f_u = _autograd_diagonal_fisher(model, tok, UTILITY, mods)
    for m in mods:
        lam = f_s[m] / (f_u[m] + 1e-2 * f_u[m].mean())  # λ_i = F_s,ii / (F_u,ii + eps·mean F_u)
        mask = torch.zeros(lam.numel())
        mask[torch.argsort(lam.flatten(), descending=True, stable=True)[:5]] = 1.0
        expect = 0.8 * setup["utility"].delta(m) + 0.7 * setup["safety"].delta(m) * mask.view_as(lam)
        assert int((out[m] != 0.8 * setup["utility"].delta(m)).sum()) == 5, m  # exactly k safety entries added
        torch.testing.assert_close(out[m], expect, rtol=1e-5, atol=1e-7)


def test_the_fisher_is_taken_at_the_pre_merge_point_not_the_base(setup, tmp_path):
    out, _ = run(setup, tmp_path, fisher="diagonal", k=5)
    model, tok = tiny_model("llama"), tiny_tokenizer()  # the base, without the utility ΔW
    mods = setup["safety"].modules
    ex_s = [encode_example(tok, p, r, 256) for p, r in SAFETY]
    ex_u = [encode_example(tok, p, r, 256) for p, r in UTILITY]
    st_s = estimate_fisher(model, mods, ex_s, "diagonal", tok.pad_token_id, show_progress=False)
    st_u = estimate_fisher(model, mods, ex_u, "diagonal", tok.pad_token_id, show_progress=False)
    differs = 0
    for m in mods:
        res = project_module("diagonal", st_s[m], st_u[m], setup["safety"].delta(m), 1e-2, Selection(k=5))
        differs += not torch.allclose(out[m], 0.8 * setup["utility"].delta(m) + 0.7 * res.projected)
    assert differs > 0


def test_diagnostics(setup, tmp_path):
    _, ctx = run(setup, tmp_path, fisher="lowrank", k=2)
    d = ctx.diagnostics["sst"]
    assert d["approximation"] == "lowrank" and d["n_safety"] == 6 and d["n_utility"] == 6
    assert (
        d["selection"] == {"k": 2} and "F_s" in d["fisher_definitions"] and "F_u_empirical" in d["fisher_definitions"]
    )
    for m in setup["safety"].modules:
        info = d["modules"][m]
        assert info["n_kept"] == 2 and len(info["lambda_top"]) == 6  # N_s eigenvalues in lowrank
        assert info["lambda_top"] == sorted(info["lambda_top"], reverse=True)
        assert 0 < info["kept_norm_share"] == pytest.approx(info["kept_norm"] / info["safety_norm"])
    paths = write_spectrum(d, tmp_path / "diag")
    assert json.loads(paths[0].read_text())["modules"].keys() == d["modules"].keys()
    assert paths[1].read_bytes()[:4] == b"\x89PNG"


def test_cache_serves_an_alpha_sweep_without_the_model(setup, tmp_path):
    loader = Loader()
    ctx1 = context(setup, tmp_path, loader)
    out1, _ = run(setup, tmp_path, ctx=ctx1, alpha=0.5, fisher="kfac")
    assert loader.calls == 1 and ctx1.diagnostics["sst"]["fisher_cache"] == {
        "safety": "computed",
        "utility": "computed",
    }
    ctx2 = context(setup, tmp_path, loader)
    out2, _ = run(setup, tmp_path, ctx=ctx2, alpha=1.0, fisher="kfac")
    assert loader.calls == 1 and ctx2.diagnostics["sst"]["fisher_cache"] == {"safety": "hit", "utility": "hit"}
    for m in out1:
        u = 0.8 * setup["utility"].delta(m)
        assert torch.allclose(out2[m] - u, 2 * (out1[m] - u), atol=1e-6)
    # another approximation or other data is another cache entry
    run(setup, tmp_path, ctx=context(setup, tmp_path, loader), fisher="diagonal")
    assert loader.calls == 2


def test_true_fisher_samples_seeded_responses(setup, tmp_path):
    kw = {"utility_data": setup["utility_prompts"], "utility_fisher": "true", "max_new_tokens": 5, "cache": False}
    a, _ = run(setup, tmp_path, **kw)
    b, _ = run(setup, tmp_path, **kw)
    c, _ = run(setup, tmp_path, seed=1, **kw)
    m = setup["safety"].modules[0]
    assert torch.equal(a[m], b[m]) and not torch.allclose(a[m], c[m])
    with pytest.raises(DataError, match="response"):
        run(setup, tmp_path, utility_data=setup["utility_prompts"], utility_fisher="empirical")


def test_failed_fisher_raises_and_never_falls_back(setup, tmp_path):
    with pytest.raises(FisherError):
        run(setup, tmp_path, loader=Loader(nan=True), cache=False)

    def broken():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        run(setup, tmp_path, loader=broken, cache=False)


def test_input_validation(setup, tmp_path):
    method = get_method("sst")
    p = params(setup)
    with pytest.raises(ConfigError, match="exactly one adapter with role: safety"):
        method.check(p, context(setup, tmp_path, roles=("safety", "safety")))
    with pytest.raises(ConfigError, match="at least one adapter with role: utility"):
        method.check(p, _only_safety(setup, tmp_path))
    with pytest.raises(ConfigError, match="weight"):
        method.check(p, context(setup, tmp_path, weights=(0.8, 2.0)))
    loader = Loader()
    with pytest.raises(ConfigError, match="safety_data is required"):
        method.check(params(setup, safety_data=None), context(setup, tmp_path, loader))
    assert loader.calls == 0
    with pytest.raises(ConfigError, match="exactly one of k, fraction, threshold"):
        validate(SSTParams, {"k": 2, "fraction": 0.5})
    with pytest.raises(ConfigError, match="exactly one of k, fraction, threshold"):
        validate(SSTParams, {})
    with pytest.raises(ConfigError, match="unknown key"):
        validate(SSTParams, {"k": 2, "top_k": 3})
    assert validate(SSTParams, {"k": 2, "utility_fisher": True}).utility_fisher == "true"
    assert validate(SSTParams, {"k": "all"}).keeps_everything


def _only_safety(setup, tmp_path):
    return MergeContext(
        adapters=[setup["safety"]],
        weights=[1.0],
        roles=["safety"],
        modules=setup["safety"].modules,
        load_model=Loader(),
        workdir=tmp_path,
        show_progress=False,
    )


def test_threshold_and_fraction_selection(setup, tmp_path):
    _, ctx = run(setup, tmp_path, fisher="lowrank", k=6)
    m = setup["safety"].modules[0]
    lam = ctx.diagnostics["sst"]["modules"][m]["lambda_top"]
    thr = (lam[1] + lam[2]) / 2
    out_thr, ctx_thr = run(setup, tmp_path, fisher="lowrank", threshold=thr)
    out_k2, _ = run(setup, tmp_path, fisher="lowrank", k=2)
    assert ctx_thr.diagnostics["sst"]["modules"][m]["n_kept"] == 2
    assert torch.allclose(out_thr[m], out_k2[m])
    _, ctx_f = run(setup, tmp_path, fisher="diagonal", fraction=0.01)
    info = ctx_f.diagnostics["sst"]["modules"][m]
    assert info["n_kept"] == -(-info["n_directions"] // 100)  # ceil(0.01 · p)


def test_through_the_merge_api(setup, tmp_path, tiny_model_dir):
    from sst_merge.merge.api import merge_deltas

    cfg = {
        "base_model": str(tiny_model_dir),
        "method": "sst",
        "adapters": [
            {"path": str(setup["utility"].path), "role": "utility", "weight": 0.8},
            {"path": str(setup["safety"].path), "role": "safety"},
        ],
        "params": {
            "alpha": 0.7,
            "fisher": "lowrank",
            "k": 3,
            "eps": 1e-2,
            "n_samples": 6,
            "seed": 0,
            "safety_data": setup["safety_data"],
            "utility_data": setup["utility_data"],
            "utility_fisher": "empirical",
            "cache_dir": str(tmp_path / "cache"),
        },
        "output": {"format": "full"},
    }
    out = merge_deltas(cfg, load_model=Loader(), show_progress=False)
    direct, _ = run(setup, tmp_path, fisher="lowrank", k=3)
    for m in direct:
        assert torch.allclose(out[m], direct[m], atol=1e-6)
    assert list((tmp_path / "cache").glob("fisher-lowrank-*.safetensors"))

    # Written outputs carry the diagnostics: λ spectrum per module as JSON, and its plot.
    from sst_merge.merge.api import merge

    dest = merge(cfg, tmp_path / "merged", load_model=Loader(), show_progress=False)
    spectrum = json.loads((dest / "sst_spectrum.json").read_text())
    assert set(spectrum["modules"]) == set(direct)
    assert spectrum["approximation"] == "lowrank" and spectrum["fisher_cache"]["safety"] == "hit"
    assert (dest / "sst_spectrum.png").stat().st_size > 0


@pytest.mark.smoke
def test_smollm2_smoke(tmp_path):
    """The real embedded model: a kfac sst merge of two random LoRAs on 2 + 2 items, end to end through the API."""
    from sst_merge.merge.api import merge_deltas
    from sst_merge.models import load_model

    model, tok = load_model("smollm2-135m")
    targets = [f"layers.{i}.self_attn.v_proj" for i in (0, 10, 20, 29)]  # a few layers keep the test short
    util = random_lora(model, str(tmp_path / "u"), r=2, seed=1, target_modules=targets, std=0.01)
    safe = random_lora(model, str(tmp_path / "s"), r=2, seed=2, target_modules=targets, std=0.01)
    cfg = {
        "base_model": "smollm2-135m",
        "method": "sst",
        "adapters": [{"path": util, "role": "utility"}, {"path": safe, "role": "safety"}],
        "params": {
            "alpha": 1.0,
            "fisher": "kfac",
            "k": 64,
            "n_samples": 2,
            "max_length": 48,
            "safety_data": write_jsonl(tmp_path / "s.jsonl", SAFETY[:2]),
            "utility_data": write_jsonl(tmp_path / "u.jsonl", UTILITY[:2]),
            "utility_fisher": "empirical",
            "cache_dir": str(tmp_path / "cache"),
        },
        "output": {"format": "full"},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU stalls multi-threaded small ops
    try:
        out = merge_deltas(cfg, load_model=lambda: (model, tok), show_progress=False)
    finally:
        torch.set_num_threads(threads)
    safe_ad, util_ad = LoraAdapter.load(safe), LoraAdapter.load(util)
    assert len(out) == 4
    for m, d in out.items():
        projected = d - util_ad.delta(m)
        assert torch.isfinite(d).all()
        assert 0 < projected.norm() < safe_ad.delta(m).norm() * 10
