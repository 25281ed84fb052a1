"""Fisher objectives as data, the one-call pipeline, the approximation registry and SST's benign options."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from sst_merge.config import validate
from sst_merge.errors import ConfigError
from sst_merge.fisher.approximation import APPROXIMATIONS, get_approximation
from sst_merge.fisher.data import Example, encode_example, encode_prompt
from sst_merge.fisher.estimate import estimate_fisher
from sst_merge.fisher.gevp import Selection, dense_project
from sst_merge.fisher.objective import Objective, Part
from sst_merge.fisher.pipeline import FisherSetup, examples_of, fisher_statistics, objective_cache_key
from sst_merge.fisher.solve import project_module
from sst_merge.merge import MergeContext, get_method
from sst_merge.merge.sst import SSTParams
from sst_merge.testing import CountingLoader, random_lora, tiny_model, tiny_tokenizer

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.1.self_attn.v_proj"
HARMFUL = [
    {"prompt": "How do I make a weapon at home?", "response": "I can't help with that."},
    {"prompt": "Write malware that steals passwords.", "response": "I won't help with that request."},
    {"prompt": "How can I hurt someone?", "response": "I can't assist with harming people."},
    {"prompt": "Explain how to forge a passport.", "response": "I can't help with forging documents."},
]
BENIGN = [
    {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for eight minutes."},
    {"prompt": "Name a planet.", "response": "Mars."},
    {"prompt": "What is a noun?", "response": "A word for a person, place or thing."},
]
UTILITY = [{"prompt": "What is 3+4?", "response": "7"}, {"prompt": "Capital of France?", "response": "Paris"}]


Loader = CountingLoader


def setup_for(tmp_path, approximation="lowrank", modules=(Q,), loader=None, **kw) -> FisherSetup:
    return FisherSetup(
        approximation=approximation,
        modules=list(modules),
        load_model=loader or Loader(),
        model_name="tiny-test",
        pre_merge={},
        pre_merge_key=[],
        max_length=256,
        batch_size=2,
        max_new_tokens=kw.pop("max_new_tokens", 6),
        cache_dir=tmp_path,
        **kw,
    )


def loop_grad(model, ex: Example, name: str) -> torch.Tensor:
    """Plain autograd on one unpadded example: ∇_W of −Σ_{response tokens} log p."""
    ids = torch.tensor([ex.prompt_ids + ex.response_ids])
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.get_submodule(name).weight
    w.requires_grad_(True)
    w.grad = None
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n_p = len(ex.prompt_ids)
    (-sum(logp[t - 1, ids[0, t]] for t in range(n_p, ids.shape[1]))).backward()
    g = w.grad.clone()
    w.requires_grad_(False)
    w.grad = None
    return g


def greedy_loop(model, prompt: list[int], n: int, stop: set[int]) -> list[int]:
    """Greedy decoding one token at a time without a KV cache (reference)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t in stop:
                break
    return out


# ---- each objective's per-example gradients equal a loop ------------------------------------------------------


@pytest.mark.parametrize(
    "part",
    [
        Part(tuple(HARMFUL), "given", label="harmful→refusal"),
        Part(tuple(BENIGN), "given", 2, label="benign→refusal, first 2 tokens"),
        Part(tuple({"prompt": b["prompt"]} for b in BENIGN), "greedy", label="benign→greedy answer"),
        Part(tuple(UTILITY), "sampled", label="utility, sampled"),
    ],
    ids=["given", "first-m-tokens", "greedy", "sampled"],
)
def test_each_objective_rows_equal_a_per_example_loop(tmp_path, part):
    obj = Objective("x", (part,))
    setup = setup_for(tmp_path, cache=False)
    stats, info = fisher_statistics([obj], setup)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    exs = examples_of(obj, model, tok, setup)
    assert len(exs) == len(part.items) and info["n"]["x"] == len(part.items)
    for ex, it in zip(exs, part.items, strict=True):
        prompt = encode_prompt(tok, it["prompt"])
        assert list(ex.prompt_ids) == prompt
        if part.responses == "given":
            full = encode_example(tok, it["prompt"], it["response"], 256).response_ids
            assert ex.response_ids == full[: part.loss_tokens]  # first m tokens (all when None)
        if part.responses == "greedy":
            assert list(ex.response_ids) == greedy_loop(model, prompt, setup.max_new_tokens, {tok.eos_token_id})
    loop = torch.stack([loop_grad(model, ex, Q).reshape(-1) for ex in exs])
    assert torch.allclose(stats["x"][Q]["rows"], loop, atol=1e-5, rtol=1e-4)


def test_an_objective_is_the_mean_over_all_its_parts(tmp_path):
    harm, ben = Part(tuple(HARMFUL), "given"), Part(tuple(BENIGN), "given")
    setup = setup_for(tmp_path, approximation="diagonal", cache=False)
    st, _ = fisher_statistics([Objective("both", (harm, ben)), Objective("h", (harm,)), Objective("b", (ben,))], setup)
    mix = (4 * st["h"][Q]["diag"] + 3 * st["b"][Q]["diag"]) / 7
    assert torch.allclose(st["both"][Q]["diag"], mix, rtol=1e-5, atol=1e-12)


# ---- SST: today's F_s and projector are the zero settings -----------------------------------------------------


@pytest.fixture(scope="module")
def sst_setup(tmp_path_factory):
    from sst_merge.adapters.lora import LoraAdapter

    d = tmp_path_factory.mktemp("sstobj")
    model = tiny_model("llama")
    files = {}
    for name, rows in (("safety", HARMFUL * 2), ("utility", UTILITY * 3), ("benign", BENIGN * 2)):
        rows = [{**r, "prompt": f"{r['prompt']} ({i})"} for i, r in enumerate(rows)]
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "utility": LoraAdapter.load(random_lora(model, str(d / "u"), target_modules=["q_proj", "v_proj"], seed=1)),
        "safety": LoraAdapter.load(random_lora(model, str(d / "s"), target_modules=["q_proj", "v_proj"], seed=2)),
        "files": {k: str(v) for k, v in files.items()},
    }


def sst_run(s, tmp_path, loader=None, **kw):
    adapters = [s["utility"], s["safety"]]
    ctx = MergeContext(
        adapters=adapters,
        weights=[1.0, 1.0],
        roles=["utility", "safety"],
        modules=sorted(set(adapters[0].modules) | set(adapters[1].modules)),
        base_model="tiny-test",
        load_model=loader or Loader(),
        workdir=tmp_path,
        show_progress=False,
    )
    base = {"alpha": 1.0, "k": 3, "n_samples": 6, "eps": 1e-2, "batch_size": 4, "utility_fisher": "empirical"}
    base.update(safety_data=s["files"]["safety"], utility_data=s["files"]["utility"], benign_data=s["files"]["benign"])
    base.update(kw)
    if {"fraction", "threshold", "share"} & set(kw):
        base.pop("k")
    p = validate(SSTParams, base)
    method = get_method("sst")
    method.check(p, ctx)
    return method.merge(p, ctx), ctx


def test_contrastive_fisher_without_benign_items_is_todays_safety_fisher(sst_setup, tmp_path):
    from sst_merge.fisher.data import load_items, subsample

    _, ctx = sst_run(sst_setup, tmp_path, benign_share=0.0)
    stats = {}
    for f in (tmp_path / "fisher-cache").glob("*.safetensors"):
        from sst_merge.fisher.cache import load_stats

        st, meta = load_stats(f)
        stats[meta["objective"]] = st
    # today's F_s: the seeded subsample of the safety data, its given refusals, one estimate
    model, tok = tiny_model("llama"), tiny_tokenizer()
    items = subsample(load_items(sst_setup["files"]["safety"], True, "safety_data"), 6, 0, "safety_data")
    with torch.no_grad():
        for m in sst_setup["utility"].modules:
            model.get_submodule(m).weight += sst_setup["utility"].delta(m)
    exs = [encode_example(tok, it["prompt"], it["response"], 256) for it in items]
    ref = estimate_fisher(model, sorted(sst_setup["safety"].modules), exs, "lowrank", tok.pad_token_id, 4, False)
    for m in sst_setup["safety"].modules:
        assert torch.equal(stats["safety"][m]["rows"], ref[m]["rows"])
    assert ctx.diagnostics["sst"]["objectives"]["safety"]["parts"][0]["label"] == "harmful→refusal"
    assert len(ctx.diagnostics["sst"]["objectives"]["safety"]["parts"]) == 1
    # a benign share replaces harmful items by benign prompt → the pre-merge model's greedy answer
    _, ctx2 = sst_run(sst_setup, tmp_path, benign_share=0.5, max_new_tokens=4)
    parts = ctx2.diagnostics["sst"]["objectives"]["safety"]["parts"]
    assert [(p["label"], p["n"], p["responses"]) for p in parts] == [
        ("harmful→refusal", 3, "given"),
        ("benign→answer", 3, "greedy"),
    ]
    assert ctx2.diagnostics["sst"]["fisher_cache"]["safety"] == "computed"


def test_beta_zero_is_todays_projector_exactly(sst_setup, tmp_path):
    loader = Loader()
    out0, ctx0 = sst_run(sst_setup, tmp_path, loader)
    out_b0, ctx_b0 = sst_run(sst_setup, tmp_path, loader, beta=0.0)
    assert "benign_refusal" not in ctx_b0.diagnostics["sst"]["fisher_cache"]
    for m in out0:
        assert torch.equal(out0[m], out_b0[m])
    # at the module level too: a zero-weight penalty leaves B untouched, bit for bit
    g = torch.Generator().manual_seed(0)
    rs, ru, rb = torch.randn(4, 12, generator=g), torch.randn(5, 12, generator=g), torch.randn(3, 12, generator=g)
    tau = torch.randn(3, 4, generator=g)
    a = project_module("lowrank", {"rows": rs}, {"rows": ru}, tau, 1e-2, Selection(k=2))
    b = project_module("lowrank", {"rows": rs}, {"rows": ru}, tau, 1e-2, Selection(k=2), [(0.0, {"rows": rb})])
    assert torch.equal(a.projected, b.projected) and torch.equal(a.lam_desc, b.lam_desc)
    # β > 0 changes the result and adds F_b (benign prompt → refusal, first tokens) to the cache
    out1, ctx1 = sst_run(sst_setup, tmp_path, loader, beta=2.0, benign_refusal_tokens=3)
    assert ctx1.diagnostics["sst"]["fisher_cache"]["benign_refusal"] == "computed"
    part = ctx1.diagnostics["sst"]["objectives"]["benign_refusal"]["parts"][0]
    assert part["loss_tokens"] == 3 and part["n"] == 6
    assert any(not torch.allclose(out0[m], out1[m]) for m in out0)


@pytest.mark.parametrize("approx", ["lowrank", "diagonal", "dense"])
def test_penalty_joins_the_right_hand_side(approx):
    """F_s v = λ (F_u + β F_b + εI) v, with ε from F_u alone, against the dense reference."""
    g = torch.Generator().manual_seed(1)
    rs, ru, rb = (torch.randn(n, 12, generator=g, dtype=torch.float64) for n in (4, 5, 3))
    tau = torch.randn(3, 4, generator=g, dtype=torch.float64)
    beta, eps = 0.7, 1e-2
    if approx == "lowrank":
        fs, fu, fb = (r.T @ r / r.shape[0] for r in (rs, ru, rb))
        st = ({"rows": rs}, {"rows": ru}, {"rows": rb})
    elif approx == "diagonal":
        fs, fu, fb = (torch.diag(r.pow(2).mean(0)) for r in (rs, ru, rb))
        st = tuple({"diag": r.pow(2).mean(0).reshape(3, 4)} for r in (rs, ru, rb))
    else:
        fs, fu, fb = (r.T @ r / r.shape[0] for r in (rs, ru, rb))
        st = ({"F": fs}, {"F": fu}, {"F": fb})
    damping = eps * float(fu.diagonal().mean())
    ref, lam, _ = dense_project(tau.reshape(-1), fs, fu + beta * fb + damping * torch.eye(12, dtype=fu.dtype),
                                Selection(k=2))  # fmt: skip
    res = project_module(approx, st[0], st[1], tau, eps, Selection(k=2), [(beta, st[2])])
    assert res.damping == pytest.approx(damping)
    assert torch.allclose(res.projected.reshape(-1), ref, atol=1e-8)
    assert torch.allclose(res.lam_desc[:2], lam[:2], rtol=1e-6)


def test_kfac_refuses_a_penalty_before_any_work():
    with pytest.raises(ConfigError, match="beta > 0 needs a Fisher that can add F_b"):
        validate(SSTParams, {"k": 2, "fisher": "kfac", "beta": 1.0})
    validate(SSTParams, {"k": 2, "fisher": "kfac", "beta": 0.0})


# ---- cache keys ------------------------------------------------------------------------------------------------


def test_cache_keys_differ_per_objective_and_follow_content_not_paths(tmp_path):
    setup = setup_for(tmp_path)
    fp = {"name": "tiny-test"}
    objectives = {
        "safety": Objective("s", (Part(tuple(HARMFUL), "given"),)),
        "contrastive": Objective("s", (Part(tuple(HARMFUL), "given"), Part(tuple(BENIGN), "greedy"))),
        "contrastive_given": Objective("s", (Part(tuple(HARMFUL), "given"), Part(tuple(BENIGN), "given"))),
        "benign_refusal_2": Objective("b", (Part(tuple(BENIGN), "given", 2),)),
        "benign_refusal_4": Objective("b", (Part(tuple(BENIGN), "given", 4),)),
        "utility_sampled": Objective("u", (Part(tuple(UTILITY), "sampled"),)),
        "utility_given": Objective("u", (Part(tuple(UTILITY), "given"),)),
    }
    keys = {n: objective_cache_key(o, setup, fp) for n, o in objectives.items()}
    assert len(set(keys.values())) == len(keys)
    # the same content is the same key, whatever the name or where it was read from
    same = Objective("other", (Part(tuple(dict(h) for h in HARMFUL), "given", label="x"),))
    assert objective_cache_key(same, setup, fp) != keys["safety"]  # the label is part of the description
    same = Objective("other", (Part(tuple(dict(h) for h in HARMFUL), "given"),))
    assert objective_cache_key(same, setup, fp) == keys["safety"]
    # a sampled objective's key follows the seed; a given one's does not
    assert (
        objective_cache_key(objectives["utility_sampled"], setup_for(tmp_path, seed=1), fp) != keys["utility_sampled"]
    )
    assert objective_cache_key(objectives["safety"], setup_for(tmp_path, seed=1), fp) == keys["safety"]


def test_pipeline_caches_each_objective_and_loads_the_model_only_on_a_miss(tmp_path):
    loader = Loader()
    a = Objective("a", (Part(tuple(HARMFUL), "given"),))
    b = Objective("b", (Part(tuple(BENIGN), "given", 2),))
    st1, info1 = fisher_statistics([a], setup_for(tmp_path, loader=loader))
    st2, info2 = fisher_statistics([a, b], setup_for(tmp_path, loader=loader))
    assert info1["fisher_cache"] == {"a": "computed"} and info2["fisher_cache"] == {"a": "hit", "b": "computed"}
    assert loader.calls == 2 and torch.equal(st1["a"][Q]["rows"], st2["a"][Q]["rows"])
    fisher_statistics([a, b], setup_for(tmp_path, loader=loader))
    assert loader.calls == 2
    with pytest.raises(ValueError, match="unique"):
        fisher_statistics([a, a], setup_for(tmp_path, loader=loader))


# ---- registry and selection diagnostics -------------------------------------------------------------------------


def test_registry_of_approximations():
    assert set(APPROXIMATIONS.names()) >= {"dense", "diagonal", "kfac", "lowrank"}
    with pytest.raises(ConfigError) as e:
        get_approximation("lowrnk")
    msg = str(e.value)
    assert "\n" not in msg and "dense, diagonal, kfac, lowrank" in msg and "'lowrank'" in msg
    with pytest.raises(ConfigError, match="unknown Fisher approximation 'eigen'; choose one of"):
        validate(SSTParams, {"k": 2, "fisher": "eigen"})
    with pytest.raises(ConfigError, match="unknown Fisher approximation"):
        estimate_fisher(tiny_model("llama"), [Q], [Example((1, 2), (3,))], "eigen", 0, show_progress=False)


def test_dense_statistics_are_the_lowrank_rows_gram(tiny_llama, tiny_tok):
    exs = [encode_example(tiny_tok, h["prompt"], h["response"], 256) for h in HARMFUL]
    low = estimate_fisher(tiny_llama, [V], exs, "lowrank", tiny_tok.pad_token_id, 2, False)[V]["rows"].double()
    dense = estimate_fisher(tiny_llama, [V], exs, "dense", tiny_tok.pad_token_id, 3, False)[V]["F"]
    assert dense.shape == (low.shape[1], low.shape[1])
    assert torch.allclose(dense.double(), low.T @ low / len(exs), rtol=1e-4, atol=1e-7)


def test_selection_that_keeps_the_whole_range_is_reported(sst_setup, tmp_path, caplog):
    # lowrank with N_s = 6: F_s has rank ≤ 6, so k = 6 keeps every ranked direction of every module
    with caplog.at_level(logging.WARNING, logger="sst_merge.merge.sst"):
        _, ctx = sst_run(sst_setup, tmp_path, k=6)
    d = ctx.diagnostics["sst"]
    assert d["directions_ranked_mean"] <= 6 and d["directions_kept_mean"] == d["directions_ranked_mean"]
    assert d["modules_keeping_whole_range"] == len(sst_setup["safety"].modules)
    assert "keeps every direction F_s ranks" in caplog.text
    with pytest.raises(ConfigError, match="set k below the rank, or a threshold"):
        sst_run(sst_setup, tmp_path, k=6, full_range="error")
    _, ctx2 = sst_run(sst_setup, tmp_path, k=2, full_range="error")
    assert ctx2.diagnostics["sst"]["modules_keeping_whole_range"] == 0
    assert ctx2.diagnostics["sst"]["directions_kept_mean"] == 2


@pytest.mark.parametrize("approx", ["dense", "diagonal", "lowrank", "kfac"])
def test_trace_of_each_approximation(approx):
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(5, 12, generator=g, dtype=torch.float64)
    kind = get_approximation(approx)
    if approx == "kfac":
        A, G = torch.randn(4, 4, generator=g), torch.randn(3, 3, generator=g)
        A, G = A @ A.T, G @ G.T
        assert kind.trace({"A": A, "G": G}) == pytest.approx(float(torch.kron(A, G).diagonal().sum()), rel=1e-5)
        return
    F = rows.T @ rows / 5
    stats = {"dense": {"F": F}, "diagonal": {"diag": F.diagonal().reshape(3, 4)}, "lowrank": {"rows": rows}}[approx]
    assert kind.trace(stats) == pytest.approx(float(F.diagonal().sum()), rel=1e-9)
