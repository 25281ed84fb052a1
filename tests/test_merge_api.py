"""The merge library call on a tiny in-process Llama: ΔW semantics, peft/full outputs, refusals (design §3–4)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sst_merge.adapters import LoraAdapter
from sst_merge.errors import AdapterError, ConfigError, OutputExistsError
from sst_merge.merge.api import MergeConfig, merge, merge_deltas
from sst_merge.testing import random_lora, tiny_model

IDS = torch.tensor([[5, 17, 99, 200, 42, 7, 130, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Four adapters on the tiny Llama: ranks 4/2/4/8, partly overlapping targets, one rslora."""
    d = tmp_path_factory.mktemp("adapters")
    base = str(tiny_model_dir)
    m = tiny_model("llama")
    return {
        "u1": Path(random_lora(m, str(d / "u1"), r=4, lora_alpha=8, seed=1, base_model_name_or_path=base)),
        "u2": Path(
            random_lora(
                m,
                str(d / "u2"),
                r=2,
                lora_alpha=4,
                seed=2,
                target_modules=["q_proj", "k_proj", "down_proj"],
                base_model_name_or_path=base,
            )
        ),
        "u3": Path(random_lora(m, str(d / "u3"), r=4, lora_alpha=8, seed=4, base_model_name_or_path=base)),
        "s": Path(
            random_lora(
                m,
                str(d / "s"),
                r=8,
                lora_alpha=8,
                seed=3,
                use_rslora=True,
                target_modules=["q_proj", "v_proj", "gate_proj"],
                base_model_name_or_path=base,
            )
        ),
    }


def cfg(base, adapters, method="task_arithmetic", weights=None, params=None, output=None) -> dict:
    weights = weights or [1.0] * len(adapters)
    return {
        "base_model": str(base),
        "method": method,
        "adapters": [{"path": str(p), "weight": w, "role": "utility"} for p, w in zip(adapters, weights, strict=True)],
        "params": params or {},
        "output": output or {"format": "peft"},
    }


def logits_with_deltas(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tiny_model("llama")
    with torch.no_grad():
        for name, d in deltas.items():
            model.get_submodule(name).weight.add_(d)
        return model(IDS).logits


def peft_logits(path: Path) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model("llama"), str(path)).eval()
    with torch.no_grad():
        return model(IDS).logits


def by_hand(adapters: dict[str, Path], names: list[str], coeffs: list[float]) -> dict[str, torch.Tensor]:
    """Σ cᵢ · scaleᵢ · Bᵢ @ Aᵢ from the raw safetensors, independently of LoraAdapter."""
    out: dict[str, torch.Tensor] = {}
    for name, c in zip(names, coeffs, strict=True):
        conf = json.loads((adapters[name] / "adapter_config.json").read_text())
        scale = conf["lora_alpha"] / (math.sqrt(conf["r"]) if conf.get("use_rslora") else conf["r"])
        t = load_file(str(adapters[name] / "adapter_model.safetensors"))
        for key, a in t.items():
            if ".lora_A." in key:
                module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                b = t[key.replace("lora_A", "lora_B")]
                out[module] = out.get(module, 0) + c * scale * (b @ a)
    return out


def test_one_adapter_at_weight_one_returns_its_delta(tiny_model_dir, adapters):
    d = merge_deltas(cfg(tiny_model_dir, [adapters["s"]]), show_progress=False)
    ref = by_hand(adapters, ["s"], [1.0])
    assert set(d) == set(ref)
    for m in ref:
        torch.testing.assert_close(d[m], ref[m])  # rslora scale alpha/√r = 8/√8 is applied


def test_task_arithmetic_across_ranks_and_partial_overlap(tiny_model_dir, adapters):
    names = ["u1", "u2", "s"]
    d = merge_deltas(
        cfg(tiny_model_dir, [adapters[n] for n in names], weights=[1.0, 0.5, -2.0], params={"lambda": 0.8}),
        show_progress=False,
    )
    ref = by_hand(adapters, names, [0.8, 0.4, -1.6])
    assert set(d) == set(ref)
    for m in ref:
        torch.testing.assert_close(d[m], ref[m])


def test_a_and_b_are_never_averaged_separately(tiny_model_dir, adapters):
    d = merge_deltas(cfg(tiny_model_dir, [adapters["u1"], adapters["u3"]], method="linear"), show_progress=False)
    m = "model.layers.0.self_attn.q_proj"
    a1, a3 = LoraAdapter.load(adapters["u1"]), LoraAdapter.load(adapters["u3"])
    torch.testing.assert_close(d[m], (a1.delta(m) + a3.delta(m)) / 2)
    # The wrong way, averaging the factors and multiplying, adds cross terms B1@A3 + B3@A1 and is far from it.
    (A1, B1), (A3, B3) = a1.factors[m], a3.factors[m]
    wrong = a1.scale(m) * ((B1 + B3) / 2) @ ((A1 + A3) / 2)
    assert (d[m] - wrong).norm() > 0.3 * d[m].norm()


def test_peft_output_exact_gives_same_logits_as_delta_by_hand(tiny_model_dir, adapters, tmp_path):
    names = ["u1", "u2", "s"]
    c = cfg(tiny_model_dir, [adapters[n] for n in names], weights=[1.0, 0.5, 0.7])
    out = merge(c, tmp_path / "out", show_progress=False)
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == str(tiny_model_dir)
    ranks = {m: int(s["rank"]) for m, s in json.loads((out / "merge_metadata.json").read_text())["modules"].items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == 4 + 2 + 8  # Σ rᵢ where all three adapters act
    assert ranks["model.layers.1.self_attn.v_proj"] == 4 + 8
    torch.testing.assert_close(
        peft_logits(out), logits_with_deltas(by_hand(adapters, names, [1.0, 0.5, 0.7])), rtol=1e-5, atol=1e-5
    )
    # untouched modules (o_proj, up_proj) are not wrapped
    assert not any("o_proj" in m or "up_proj" in m for m in conf["target_modules"])


@pytest.mark.parametrize(
    "method,params",
    [("ties", {"density": 0.4}), ("dare_ties", {"density": 0.5, "seed": 3}), ("dare_linear", {"density": 0.6})],
)
def test_peft_output_svd_full_rank_matches_merged_delta(tiny_model_dir, adapters, tmp_path, method, params):
    c = cfg(
        tiny_model_dir,
        [adapters["u1"], adapters["s"]],
        method=method,
        weights=[1.0, 0.5],
        params=params,
        output={"format": "peft", "rank": 128},
    )  # ≥ min(out, in): the truncation keeps everything
    deltas = merge_deltas(c, show_progress=False)
    out = merge(c, tmp_path / "out", show_progress=False)
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["output"]["max_rel_frobenius_error"] < 1e-5
    torch.testing.assert_close(peft_logits(out), logits_with_deltas(deltas), rtol=1e-4, atol=1e-4)


def test_peft_output_svd_rank_reports_true_error(tiny_model_dir, adapters, tmp_path):
    c = cfg(
        tiny_model_dir,
        [adapters["u1"], adapters["s"]],
        method="ties",
        params={"density": 0.3},
        output={"format": "peft", "rank": 3},
    )
    deltas = merge_deltas(c, show_progress=False)
    out = merge(c, tmp_path / "out", show_progress=False)
    meta = json.loads((out / "merge_metadata.json").read_text())
    saved = LoraAdapter.load(out)
    for m, stats in meta["modules"].items():
        assert stats["rank"] == 3
        err = (deltas[m] - saved.delta(m)).norm() / deltas[m].norm()
        assert abs(stats["rel_frobenius_error"] - err.item()) < 1e-5
        assert stats["rel_frobenius_error"] > 0.01  # rank 3 < the ties result's rank: a real truncation


def test_peft_output_energy(tiny_model_dir, adapters, tmp_path):
    c = cfg(
        tiny_model_dir,
        [adapters["u1"], adapters["s"]],
        method="ties",
        params={"density": 0.5},
        output={"format": "peft", "energy": 0.9},
    )
    deltas = merge_deltas(c, show_progress=False)
    meta = json.loads((merge(c, tmp_path / "out", show_progress=False) / "merge_metadata.json").read_text())
    for m, stats in meta["modules"].items():
        s2 = torch.linalg.svdvals(deltas[m].double()) ** 2
        k = stats["rank"]
        assert s2[:k].sum() / s2.sum() >= 0.9 - 1e-9
        assert s2[: k - 1].sum() / s2.sum() < 0.9  # the smallest such rank
        assert abs(stats["rel_frobenius_error"] - math.sqrt(s2[k:].sum() / s2.sum())) < 1e-4
    assert len({s["rank"] for s in meta["modules"].values()}) > 1  # ranks differ per module: rank_pattern is used
    torch.testing.assert_close(
        peft_logits(tmp_path / "out"),
        logits_with_deltas({m: LoraAdapter.load(tmp_path / "out").delta(m) for m in deltas}),
        rtol=1e-5,
        atol=1e-5,
    )  # per-module ranks (rank_pattern) load correctly in PEFT


def test_full_output_logits_and_model_card(tiny_model_dir, adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    c = cfg(
        tiny_model_dir,
        [adapters["u1"], adapters["u2"]],
        method="ties",
        weights=[1.0, 1.0],
        params={"density": 0.5, "lambda": 1.2},
        output={"format": "full"},
    )
    deltas = merge_deltas(c, show_progress=False)
    out = merge(c, tmp_path / "full", show_progress=False)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.dtype == torch.float32  # auto = the base's dtype
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, logits_with_deltas(deltas), rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    a1 = LoraAdapter.load(adapters["u1"])
    assert "ties" in card and a1.sha256 in card and '"density": 0.5' in card and "sst-merge 0.1.0" in card
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["params"] == {"lambda": 1.2, "seed": 0, "density": 0.5}
    # the resolved config is stored and re-runnable
    assert MergeConfig.model_validate(json.loads((out / "merge_config.json").read_text())).method == "ties"


def test_full_output_dtype_cast(tiny_model_dir, adapters, tmp_path):
    from safetensors import safe_open

    c = cfg(tiny_model_dir, [adapters["u1"]], output={"format": "full", "dtype": "bfloat16"})
    out = merge(c, tmp_path / "bf16", show_progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.bfloat16


def test_existing_output_needs_force(tiny_model_dir, adapters, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    c = cfg(tiny_model_dir, [adapters["u1"]])
    with pytest.raises(OutputExistsError, match="--force"):
        merge(c, out, show_progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    merge(c, out, force=True, show_progress=False)
    assert (out / "adapter_model.safetensors").is_file() and not (out / "keep.txt").exists()


# ---------------------------------------------------------------- refusals: one line, nothing written


def _bad_adapter(tmp_path: Path, src: Path, name: str, edit) -> Path:
    import shutil

    dst = tmp_path / name
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _set_config(key, value):
    def edit(d: Path):
        conf = json.loads((d / "adapter_config.json").read_text())
        conf[key] = value
        (d / "adapter_config.json").write_text(json.dumps(conf))

    return edit


def _nan(d: Path):
    t = load_file(str(d / "adapter_model.safetensors"))
    key = sorted(t)[0]
    t[key][0, 0] = float("nan")
    save_file(t, str(d / "adapter_model.safetensors"))


def _modules_to_save(d: Path):
    t = load_file(str(d / "adapter_model.safetensors"))
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(3, 3)
    save_file(t, str(d / "adapter_model.safetensors"))


def _pickle(d: Path):
    t = load_file(str(d / "adapter_model.safetensors"))
    (d / "adapter_model.safetensors").unlink()
    torch.save(t, d / "adapter_model.bin")


BAD_ADAPTERS = [
    ("missing dir", lambda d: __import__("shutil").rmtree(d), AdapterError, "directory not found"),
    ("missing config", lambda d: (d / "adapter_config.json").unlink(), AdapterError, "adapter_config.json is missing"),
    ("corrupt config", lambda d: (d / "adapter_config.json").write_text("{oops"), AdapterError, "not valid JSON"),
    ("missing weights", lambda d: (d / "adapter_model.safetensors").unlink(), AdapterError, "safetensors is missing"),
    (
        "corrupt weights",
        lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x10garbage"),
        AdapterError,
        "corrupt",
    ),
    ("nan weights", _nan, AdapterError, "NaN or Inf"),
    (
        "other base model",
        _set_config("base_model_name_or_path", "other/model"),
        AdapterError,
        r"\(base .*tiny-llama.*\) and .*bad \(base other/model\) .*different base models",
    ),
    ("modules_to_save", _modules_to_save, AdapterError, "modules_to_save"),
    ("pickle", _pickle, AdapterError, "--allow-pickle"),
]


@pytest.mark.parametrize("name,edit,exc,match", BAD_ADAPTERS, ids=[b[0] for b in BAD_ADAPTERS])
def test_bad_adapter_is_refused_and_nothing_written(tiny_model_dir, adapters, tmp_path, name, edit, exc, match):
    bad = _bad_adapter(tmp_path, adapters["u2"], "bad", edit)
    out = tmp_path / "out"
    with pytest.raises(exc, match=match) as e:
        merge(cfg(tiny_model_dir, [adapters["u1"], bad]), out, show_progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad"] or name == "missing dir"  # no temp dir left behind


def test_pickle_accepted_with_allow_pickle(tiny_model_dir, adapters, tmp_path):
    bad = _bad_adapter(tmp_path, adapters["u2"], "pkl", _pickle)
    d = merge_deltas(cfg(tiny_model_dir, [bad]), allow_pickle=True, show_progress=False)
    ref = by_hand(adapters, ["u2"], [1.0])
    for m in ref:
        torch.testing.assert_close(d[m], ref[m])


def test_non_overlapping_targets_refused(tiny_model_dir, tmp_path):
    m = tiny_model("llama")
    a = random_lora(m, str(tmp_path / "a"), target_modules=["q_proj"], base_model_name_or_path=str(tiny_model_dir))
    b = random_lora(m, str(tmp_path / "b"), target_modules=["o_proj"], base_model_name_or_path=str(tiny_model_dir))
    with pytest.raises(AdapterError, match=r"a \(2 modules: q_proj\) and .*b \(2 modules: o_proj\) share no target"):
        merge(cfg(tiny_model_dir, [a, b]), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_refused(tiny_model_dir, adapters, tmp_path):
    small = tiny_model("llama", hidden_size=32)
    b = random_lora(small, str(tmp_path / "b"), base_model_name_or_path=str(tiny_model_dir))
    with pytest.raises(AdapterError, match=r"q_proj: ΔW shape \(64, 64\) in .*u1 but \(32, 32\) in .*b"):
        merge(cfg(tiny_model_dir, [adapters["u1"], b]), tmp_path / "out", show_progress=False)
    # a full output also checks against the base model (built on the meta device)
    with pytest.raises(AdapterError, match=r"has ΔW shape \(32, 32\) but base model .* has \(64, 64\)"):
        merge(cfg(tiny_model_dir, [b], output={"format": "full"}), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(method="tiess"), "unknown merge method 'tiess'"),
        (lambda c: c.update(method="ties", params={"density": 0.3, "k": 1}), "params of method ties: k: unknown key"),
        (lambda c: c.update(method="ties", params={"density": 0}), "density: Input should be greater than 0"),
        (lambda c: c.update(method="dare_linear", params={"density": 1.01}), "density: Input should be less than"),
        (lambda c: c.update(method="ties", params={"density": 0.5}), "output.rank .* or output.energy"),
        (lambda c: c.update(output={"format": "peft", "rank": 4, "energy": 0.9}), "not both"),
        (lambda c: c.update(output={"format": "full", "rank": 4}), "apply only to format: peft"),
        (lambda c: c.update(output={"format": "gguf"}), "output.format"),
        (lambda c: c.update(adapters=[]), "adapters: List should have at least 1 item"),
        (lambda c: c["adapters"][0].update(role="attacker"), "adapters.0.role"),
        (lambda c: c.update(merge_method="ties"), "merge_method: unknown key"),
        (
            lambda c: c.update(method="linear", adapters=[{"path": c["adapters"][0]["path"], "weight": 0.0}]),
            "sum of adapter weights, which is 0",
        ),
    ],
)
def test_bad_config_is_refused_before_work(tiny_model_dir, adapters, tmp_path, edit, match):
    c = cfg(tiny_model_dir, [adapters["u1"]])
    edit(c)
    with pytest.raises(ConfigError, match=match):
        merge(c, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_module_missing_from_base_is_refused_for_full_output(tiny_model_dir, adapters, tmp_path):
    def rename(d: Path):
        t = load_file(str(d / "adapter_model.safetensors"))
        t = {k.replace("layers.1.", "layers.7."): v for k, v in t.items()}
        save_file(t, str(d / "adapter_model.safetensors"))

    bad = _bad_adapter(tmp_path, adapters["u1"], "bad", rename)
    with pytest.raises(AdapterError, match=r"model.layers.7.* does not exist in base model"):
        merge(cfg(tiny_model_dir, [bad], output={"format": "full"}), tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_method_context_loads_base_model_lazily(tiny_model_dir, adapters):
    from sst_merge.merge.api import prepare

    plan = prepare(cfg(tiny_model_dir, [adapters["u1"]]))
    model, tok = plan.context.load_model()
    assert plan.context.load_model()[0] is model  # loaded once
    assert tok.pad_token is not None and model.config.hidden_size == 64


def test_embedding_lora_merges_in_delta_space(tiny_model_dir, tmp_path):
    m = tiny_model("llama")
    targets = ["embed_tokens", "q_proj"]
    a = random_lora(m, str(tmp_path / "a"), r=2, seed=5, target_modules=targets, std=0.2)
    b = random_lora(m, str(tmp_path / "b"), r=3, seed=6, target_modules=targets, std=0.2)
    # PEFT also saved the base embedding itself (save_embedding_layers="auto"): refused, then stripped.
    with pytest.raises(AdapterError, match="copy of base layer model.embed_tokens.base_layer.weight"):
        merge_deltas(cfg(tiny_model_dir, [a, b]), show_progress=False)
    for path in (a, b):
        t = load_file(f"{path}/adapter_model.safetensors")
        save_file({k: v for k, v in t.items() if ".base_layer." not in k}, f"{path}/adapter_model.safetensors")
    c = cfg(tiny_model_dir, [a, b], weights=[1.0, -0.5])
    d = merge_deltas(c, show_progress=False)
    assert d["model.embed_tokens"].shape == (m.config.vocab_size, 64)  # same layout as the embedding weight
    out = merge(c, tmp_path / "out", show_progress=False)
    torch.testing.assert_close(peft_logits(out), logits_with_deltas(d), rtol=1e-5, atol=1e-5)
    full = merge({**c, "output": {"format": "full"}}, tmp_path / "full", show_progress=False)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(full).eval()(IDS).logits
    torch.testing.assert_close(got, logits_with_deltas(d), rtol=1e-5, atol=1e-5)


def test_method_diagnostics_are_written_as_strict_json(tiny_model_dir, adapters, tmp_path, monkeypatch):
    from sst_merge.merge.ties import Ties

    def merge_with_diag(self, params, ctx):  # a method that overrides merge() and reports diagnostics
        ctx.diagnostics["spectrum"] = {"q": torch.tensor([1.0, float("nan")]), 3: (float("inf"), 2)}
        return dict(self.stream_modules(params, ctx))

    monkeypatch.setattr(Ties, "merge", merge_with_diag)
    c = cfg(tiny_model_dir, [adapters["u1"]], method="ties", params={"density": 0.5}, output={"format": "full"})
    out = merge(c, tmp_path / "o", show_progress=False)
    meta = json.loads((out / "merge_metadata.json").read_text())
    assert meta["diagnostics"] == {"spectrum": {"q": [1.0, None], "3": [None, 2]}}
