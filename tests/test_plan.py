"""``sst-merge plan``: estimates from the config alone, checked by hand and against measured memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sst_merge.cli import main
from sst_merge.plan import GIB, Memory, Rates, Settings, Shape, estimate, fisher_host_bytes, model_shape, plan_run

RATES = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, sort=1e8)  # fixed: no measurement in the tests
LLAMA_P = 32 * (4096 * 4096 + 1024 * 4096)  # q_proj + v_proj weights over 32 layers = 671 088 640


def test_llama_targets_and_statistics_by_hand():
    shape = model_shape("llama-3.1-8b")
    assert shape.params() == 8_030_261_248
    s = Settings(fisher="lowrank", n_samples=16)
    assert fisher_host_bytes(shape, s) == 2 * 16 * LLAMA_P * 4  # 80 GiB: N rows of p fp32, F_s and F_u
    kfac = 32 * (4096**2 + 4096**2 + 4096**2 + 1024**2)  # A and G of q (4096², 4096²) and v (4096², 1024²)
    assert fisher_host_bytes(shape, Settings(fisher="kfac")) == kfac * (4 + 8)
    assert fisher_host_bytes(shape, Settings(fisher="diagonal")) == LLAMA_P * (4 + 8)
    steps = {st.step.split(" ")[0]: st for st in estimate(shape, Settings(dtype="bfloat16"), RATES)}
    assert steps["load"].device_bytes == 8_030_261_248 * 2
    assert steps["merge"].host_bytes >= LLAMA_P * 4  # the fp32 ΔW map
    kv = 2 * 32 * 8 * 128 * (128 + 64) * 8 * 2  # K and V × layers × kv heads × head dim × tokens × batch × bf16
    assert steps["eval"].note.startswith(f"KV cache {kv / GIB:.2f} GiB")


def test_plan_of_a_local_directory_reads_its_config(tiny_model_dir):
    from sst_merge.testing import tiny_model

    shape = model_shape(str(tiny_model_dir))
    assert shape.params() == sum(p.numel() for p in tiny_model().parameters())


def test_cli_refuses_lowrank_on_an_80gb_gpu_and_names_kfac(capsys):
    # lowrank N=64 on q,v of all 32 layers: 2 × 64 × 671 088 640 × 4 bytes = 320 GiB of statistics > 128 GiB host
    rc = main(["plan", "--model", "llama-3.1-8b", "--mode", "full", "--set", "dtype=bfloat16", "--gpu", "H100-80GB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "does not fit" in err[0] and "--set sst.fisher=kfac would fit" in err[0]


def test_cli_accepts_kfac_on_an_80gb_gpu(capsys, tmp_path):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--model", "llama-3.1-8b", "--mode", "full", "--set", "dtype=bfloat16", "--set",
               "sst.fisher=kfac", "--gpu", "H100-80GB", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert "fisher (kfac, N=64" in capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["fits"] and doc["peak_device_bytes"] < 80e9 and doc["rates"]["measured"] is False


def _adapter(path: Path) -> str:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj", "v_proj"]}))
    return str(path)


def test_float32_that_does_not_fit_suggests_bfloat16(tmp_path):
    from sst_merge.plan import settings_from_config

    data = {"model": "llama-3.1-8b", "dtype": "float32", "sst": {"fisher": "kfac"},
            "adapters": {"safety": _adapter(tmp_path / "s"), "utility": {"passage_qa": _adapter(tmp_path / "u")}}}  # fmt: skip
    model, s = settings_from_config(data)
    assert not s.train and s.targets == ["q_proj", "v_proj"]
    cpu = Memory(device=64 * GIB, host=64 * GIB)  # on the CPU, weights, activations and statistics share the host
    plan = plan_run(model, s, memory=cpu, rates=RATES, on_gpu=False)
    assert plan.problem is not None and plan.problem.endswith("--set dtype=bfloat16 would fit")
    s.dtype = "bfloat16"
    assert plan_run(model, s, memory=cpu, rates=RATES, on_gpu=False).problem is None


def test_lowrank_that_does_not_fit_suggests_kfac_first_then_a_smaller_n():
    shape = model_shape("llama-3.1-8b")
    s = Settings(dtype="bfloat16", fisher="lowrank", n_samples=32)
    big_host = Memory(device=80 * GIB, host=1000 * GIB, gpus=1)
    assert plan_run("llama-3.1-8b", s, memory=big_host, rates=RATES, on_gpu=True).problem is None
    # 60 GiB of host memory: kfac (≈ 21 GiB of statistics) fits, lowrank N=32 (160 GiB) does not
    plan = plan_run("llama-3.1-8b", s, memory=Memory(80 * GIB, 60 * GIB, gpus=1), rates=RATES, on_gpu=True)
    assert plan.problem.endswith("--set sst.fisher=kfac would fit")
    assert fisher_host_bytes(shape, s, n=2) < 60 * GIB


_PEAK_CHILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from sst_merge.fisher.data import Example
from sst_merge.fisher.estimate import estimate_fisher
from sst_merge.models.shapes import shape_config
from sst_merge.rehearsal import _rss_peak, _rss_peak_reset

cfg = shape_config("llama-3.1-8b", num_layers=1, vocab_size=512, narrow=8, pad_token_id=0, eos_token_id=1)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
g = torch.Generator().manual_seed(0)
exs = [Example(tuple(torch.randint(4, 512, (32,), generator=g).tolist()),
               tuple(torch.randint(4, 512, (32,), generator=g).tolist())) for _ in range(96)]
names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
estimate_fisher(model, names, exs[:8], "lowrank", 0, batch_size=8, show_progress=False)  # warm-up allocations
before = int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1]) * 1024
_rss_peak_reset()
stats = estimate_fisher(model, names, exs, "lowrank", 0, batch_size=8, show_progress=False)
print(json.dumps({"measured": _rss_peak() - before,
                  "stat_bytes": sum(t.nbytes for st in stats.values() for t in st.values())}))
"""


def test_estimate_vs_measured_peak_memory_of_the_fisher_pass():
    """The plan's Fisher step (activations, captured inputs, per-example gradients, one statistic) vs the measured
    peak resident memory of one ``estimate_fisher`` call on a narrow Llama layer; tolerance ±35%.

    Measured in a fresh process: in the test-suite's own process, memory freed by earlier tests is reused and the
    resident-memory growth under-counts the pass."""
    import json
    import os
    import subprocess
    import sys

    from sst_merge.models.shapes import shape_config
    from sst_merge.rehearsal import _rss_peak_reset

    if not _rss_peak_reset():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident memory")
    cfg = shape_config("llama-3.1-8b", num_layers=1, vocab_size=512, narrow=8, pad_token_id=0, eos_token_id=1)
    shape = Shape.from_config(cfg)
    n, length = 96, 64
    s = Settings(fisher="lowrank", n_samples=n, fisher_batch=8, fisher_length=length, new_tokens=0)
    fisher = next(st for st in estimate(shape, s, RATES) if st.step.startswith("fisher"))
    # one statistic here (the plan's host part holds two, and the ΔW map of the targets)
    planned = fisher.device_bytes - shape.params() * 4 + fisher.host_bytes - fisher_host_bytes(shape, s) / 2
    planned -= sum(o * i for o, i in (shape.modules()["q_proj"], shape.modules()["v_proj"])) * 4

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # the statistic itself is exactly what the plan counts: N rows of p fp32
    assert out["stat_bytes"] == fisher_host_bytes(shape, s) / 2
    measured = out["measured"]
    assert 0.65 * planned <= measured <= 1.35 * planned, (measured / 2**20, planned / 2**20)


def test_cli_plans_a_merge_config_from_its_adapters(tiny_model_dir, tmp_path, capsys):
    import yaml

    from sst_merge.testing import random_lora, tiny_model

    base = tiny_model()
    targets = ["q_proj", "v_proj", "down_proj"]
    adapters = [random_lora(base, str(tmp_path / n), r=4, target_modules=targets, seed=i) for i, n in enumerate("us")]
    cfg = {"base_model": str(tiny_model_dir), "method": "sst", "output": {"format": "full"},
           "adapters": [{"path": adapters[0], "role": "utility"}, {"path": adapters[1], "role": "safety"}],
           "params": {"fisher": "kfac", "n_samples": 8, "fraction": 0.1}}  # fmt: skip
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["targets"] == sorted(targets) and doc["settings"]["lora_rank"] == 4
    steps = [s["step"] for s in doc["steps"]]
    assert "fisher (kfac, N=8 × 2)" in steps and "full output" in steps and not any("train" in s for s in steps)
    assert "plan for " in capsys.readouterr().out
    cfg["params"].pop("fraction")  # SST's own validation, as one line before anything is estimated
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path)]) == 2
    assert "k, fraction, threshold" in capsys.readouterr().err


def test_forward_flops_match_a_flop_count_of_the_fisher_forward_on_the_tiny_model():
    """The Fisher cost law's forward FLOPs (linears, head on the response positions) vs PyTorch's own count of the
    FLOPs ``batch_nll`` runs on the tiny model — a count, not a timing. The counter does not see the CPU attention
    kernel, so the law's attention term (4·B·T²·q-width per layer) is taken off by hand."""
    from torch.utils.flop_counter import FlopCounterMode

    from sst_merge.fisher.data import Example, collate
    from sst_merge.fisher.grads import batch_nll
    from sst_merge.plan import forward_flops
    from sst_merge.testing import tiny_model

    model = tiny_model()
    shape = Shape.from_config(model.config)
    g = torch.Generator().manual_seed(0)
    exs = [Example(tuple(torch.randint(4, 200, (8,), generator=g).tolist()),
                   tuple(torch.randint(4, 200, (8,), generator=g).tolist())) for _ in range(3)]  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        batch_nll(model, collate(exs, 0))
    attention = 4 * 3 * 16 * 16 * (4 * 16) * 2  # batch 3, 16 tokens, 4 heads × 16, 2 layers
    assert counter.get_total_flops() == forward_flops(shape, batch=3, length=16, response=8) - attention


def test_plan_memory_of_the_tiny_model_weights_and_kv_cache_by_measurement(tiny_model_dir):
    """``load``'s bytes are the loaded weights' bytes, and the evaluation's KV cache is the one ``generate`` builds
    (which holds every position but the last generated one), on the tiny model."""
    from sst_merge.testing import tiny_model

    model = tiny_model()
    shape = model_shape(str(tiny_model_dir))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    batch, prompt, new = 3, 10, 5
    s = Settings(eval_batch=batch, prompt_tokens=prompt, new_tokens=new, sst=False)
    steps = {st.step.split(" ")[0]: st for st in estimate(shape, s, RATES)}
    assert steps["load"].device_bytes == weights
    ids = torch.randint(4, 200, (batch, prompt), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True)  # fmt: skip
    cache = sum(
        t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
    )
    planned = steps["eval"].device_bytes - weights - batch * prompt * shape.vocab * 4  # minus the prompt logits
    assert cache * (prompt + new) == planned * (prompt + new - 1)
