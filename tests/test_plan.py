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


# -- the cost laws' machine terms: short GEMMs, fresh pages, python's share -------------------------------------


def test_matmul_at_interpolates_the_curve_in_log_rows_and_clamps_at_its_ends():
    r = Rates(matmul=5e11, fp64=1e10, bandwidth=1e10, matmul_curve=((256, 2e11), (64, 1e11)))
    assert r.matmul_at(128) == pytest.approx(1.5e11)  # halfway in log(rows) between 64 and 256
    assert r.matmul_at(64) == r.matmul_at(8) == 1e11
    assert r.matmul_at(256) == r.matmul_at(4096) == 2e11
    assert Rates(matmul=5e11, fp64=1e10, bandwidth=1e10).matmul_at(64) == 5e11  # no curve: the square's rate


def test_fresh_pages_cost_from_the_mmap_threshold_on_the_host_and_never_on_a_gpu_device():
    from sst_merge.plan import MMAP_THRESHOLD

    cpu = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, fault=2e9)
    assert cpu.fresh_seconds(MMAP_THRESHOLD - 1) == 0.0
    assert cpu.fresh_seconds(MMAP_THRESHOLD) == pytest.approx(MMAP_THRESHOLD / 2e9)
    assert cpu.fresh_seconds(MMAP_THRESHOLD, device=True) == pytest.approx(MMAP_THRESHOLD / 2e9)
    gpu = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, fault=2e9, device_faults=False)
    assert gpu.fresh_seconds(2**30, device=True) == 0.0
    assert gpu.fresh_seconds(2**30) == pytest.approx(2**30 / 2e9)  # host buffers (the GEVP) still fault


def test_lowrank_gevp_pays_page_faults_only_once_its_fp64_copies_reach_the_threshold():
    from sst_merge.plan import gevp_seconds, lowrank_gram_flops

    r = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, eigh=1e9, rows=1e8, fault=2e9)

    def base(o, i, n):
        return n * o * i / 1e8 + lowrank_gram_flops(n, o * i) / 1e10 + n**3 / 1e9

    # N·p·8 = 4 × 512 × 1024 × 8 = 16 MiB: every buffer below 32 MiB, no faults
    assert gevp_seconds("lowrank", 512, 1024, 4, r) == pytest.approx(base(512, 1024, 4))
    # N·p·8 = 64 MiB: six fp64 copies of the rows fault; the p-sized ones (16 MiB, 8 MiB) do not
    o, i, n = 1024, 2048, 4
    assert gevp_seconds("lowrank", o, i, n, r) == pytest.approx(base(o, i, n) + 6 * n * o * i * 8 / 2e9)
    # p·8 = 64 MiB: the five p-sized fp64 buffers and the fp32 result (32 MiB) fault too
    o, i = 2048, 4096
    faults = (6 * n * o * i * 8 + 5 * o * i * 8 + o * i * 4) / 2e9
    assert gevp_seconds("lowrank", o, i, n, r) == pytest.approx(base(o, i, n) + faults)


def test_fisher_batch_law_by_hand_on_a_small_layer():
    """One layer small enough that no buffer faults: 2 × forward FLOPs at the curve's rate, the activation passes,
    python's share, and per target the einsum and the bytes moved over the per-example gradients."""
    from sst_merge.plan import (
        ACT_HIDDEN,
        ACT_INTER,
        FISHER_ACT_PASSES,
        FISHER_BATCH_OVERHEAD_S,
        FISHER_LAYER_OVERHEAD_S,
        FISHER_PASS_OVERHEAD_S,
        PER_EXAMPLE_BYTES,
        fisher_batch_seconds,
        fisher_pass_seconds,
        fisher_statistics_seconds,
        forward_flops,
    )

    shape = Shape(
        hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, head_dim=16, vocab=100, tied=True, qkv_bias=False
    )
    r = Rates(matmul=9e11, fp64=1e10, bandwidth=1e10, matmul_curve=((64, 1e11), (1024, 4e11)))
    s = Settings(fisher="diagonal", n_samples=6, fisher_batch=4, fisher_length=64, targets=["q_proj", "v_proj"])
    p = 64 * 64 + 32 * 64  # q_proj 64×64, v_proj 32×64
    mm = 2.5e11  # 4 × 64 = 256 rows: halfway in log(rows) from 64 to 1024
    act = FISHER_ACT_PASSES * 256 * (ACT_HIDDEN * 64 + ACT_INTER * 128) * 4 / 1e10
    want = 2 * forward_flops(shape, 4, 64) / mm + act + FISHER_BATCH_OVERHEAD_S + FISHER_LAYER_OVERHEAD_S
    want += 2 * 256 * p / mm + PER_EXAMPLE_BYTES * 4 * p / 1e10
    assert r.matmul_at(256) == pytest.approx(mm)
    assert fisher_batch_seconds(shape, s, r) == pytest.approx(want)
    stats = FISHER_PASS_OVERHEAD_S + 40 * p / 1e10
    assert fisher_statistics_seconds(shape, s, r) == pytest.approx(stats)
    # 6 examples in batches of 4: two batches, and the statistics once
    assert fisher_pass_seconds(shape, s, r) == pytest.approx(2 * want + stats)


def test_fisher_per_example_gradients_fault_on_the_cpu_but_not_on_a_gpu():
    from sst_merge.plan import MMAP_THRESHOLD, fisher_batch_seconds

    shape = model_shape("llama-3.1-8b")
    s = Settings(fisher="lowrank", fisher_batch=8, fisher_length=64, targets=["q_proj"])
    cpu = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, fault=1e9)
    gpu = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, fault=1e9, device_faults=False)
    g = 8 * 4096 * 4096 * 4  # B × p fp32 of one q_proj: 512 MiB ≥ the threshold
    assert g >= MMAP_THRESHOLD
    extra = fisher_batch_seconds(shape, s, cpu) - fisher_batch_seconds(shape, s, gpu)
    assert extra == pytest.approx(32 * g / 1e9)  # one fresh buffer per layer's q_proj


def test_measured_rates_carry_a_matmul_curve_and_a_fault_rate():
    from sst_merge.plan import CURVE_ROWS, measure_fault_rate, measure_matmul_curve

    curve = measure_matmul_curve("cpu", "float32", 64)
    assert [m for m, _ in curve] == [*CURVE_ROWS, 1024] and all(rate > 0 for _, rate in curve)
    assert 0 < measure_fault_rate() < float("inf")


def test_merge_laws_by_hand_and_ties_only_when_a_ties_merge_runs():
    from sst_merge.plan import MMAP_THRESHOLD, merge_module_seconds, ties_module_seconds

    r = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, heap_bandwidth=2e10, fault=2e9, ties=1e8)
    # 512 × 1024, 2 adapters of rank 8: every fp32 ΔW is 2 MiB, reused heap (no faults, the heap bandwidth)
    p = 512 * 1024
    want = 2 * (2 * 8 * p / 1e11 + 16 * p / 2e10) + (4 + 12 * 2 + 8) * p / 2e10
    assert merge_module_seconds(512, 1024, 2, 8, r) == pytest.approx(want)
    assert ties_module_seconds(512, 1024, 2, r) == pytest.approx(2 * p / 1e8)
    # 4096²: a ΔW is 64 MiB, so every one of the six fp32 buffers faults and the passes run at the DRAM bandwidth
    p = 4096 * 4096
    assert 4 * p >= MMAP_THRESHOLD
    want = 2 * (2 * 8 * p / 1e11 + 2 * 4 * p / 2e9 + 16 * p / 1e10) + 2 * 4 * p / 2e9 + (4 + 24 + 8) * p / 1e10
    assert merge_module_seconds(4096, 4096, 2, 8, r) == pytest.approx(want)
    assert ties_module_seconds(4096, 4096, 2, r) == pytest.approx(2 * p / 1e8 + (2 * 34 + 20) * p / 2e9)
    shape = model_shape("llama-3.1-8b")
    merge = {st.step.split(" ")[0]: st for st in estimate(shape, Settings(sst=False), r)}["merge"]
    ties = {st.step.split(" ")[0]: st for st in estimate(shape, Settings(sst=False, ties=True), r)}["merge"]
    extra = 32 * (ties_module_seconds(4096, 4096, 2, r) + ties_module_seconds(1024, 4096, 2, r))
    assert ties.seconds - merge.seconds == pytest.approx(extra)


def test_merge_config_with_ties_plans_its_trim(tmp_path):
    from sst_merge.plan import settings_from_config

    adapters = [{"path": _adapter(tmp_path / n)} for n in ("a", "b")]
    _, ties = settings_from_config({"base_model": "llama-3.1-8b", "method": "ties", "adapters": adapters})
    _, ta = settings_from_config({"base_model": "llama-3.1-8b", "method": "task_arithmetic", "adapters": adapters})
    assert ties.ties and not ta.ties and ties.n_adapters == 2


def test_decode_step_at_the_decoding_curve_and_without_one():
    r = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10, decode_curve=((1, 1e10), (8, 4e10)))
    assert r.decode_seconds(1e8, 8, 4) == pytest.approx(2 * 1e8 * 8 / 4e10)
    assert r.decode_seconds(1e8, 2, 4) == pytest.approx(2 * 1e8 * 2 / 2e10)  # a third of the way in log(rows)
    assert r.decode_seconds(1e8, 64, 4) == pytest.approx(2 * 1e8 * 64 / 4e10)  # clamped at the curve's end
    flat = Rates(matmul=1e11, fp64=1e10, bandwidth=1e10)  # projected rates: one read of the weights, or the FLOPs
    assert flat.decode_seconds(1e8, 1, 2) == pytest.approx(1e8 * 2 / 1e10)
    assert flat.decode_seconds(1e8, 256, 2) == pytest.approx(2 * 1e8 * 256 / 1e11)


LLAMA_FWD = 2 * (8_030_261_248 - 128256 * 4096)  # forward FLOPs per token of llama-3.1-8b (untied head)


def _greedy_token_s(batch: int) -> float:
    """One greedy token of llama-3.1-8b in fp32 at RATES (no decoding curve): the longer of one read of the weights
    and the FLOPs, plus python's share per token and per layer (32 layers)."""
    from sst_merge.plan import GEN_LAYER_OVERHEAD_S, GEN_TOKEN_OVERHEAD_S

    read = max(LLAMA_FWD / 2 * 4 / 1e10, 2 * (LLAMA_FWD / 2) * batch / 1e11)
    return read + GEN_TOKEN_OVERHEAD_S + 32 * GEN_LAYER_OVERHEAD_S


def test_fisher_merge_and_regmean_plan_one_own_data_pass_per_weighted_adapter(tmp_path):
    """Each adapter with a non-zero weight costs one Fisher pass (fisher_merge: diagonal, regmean: kfac) over its
    n_samples items, after greedy answers for every item (at most); a weight-0 adapter costs nothing."""
    from dataclasses import replace

    from sst_merge.plan import fisher_memory, fisher_pass_seconds, settings_from_config

    shape = model_shape("llama-3.1-8b")
    adapters = [{"path": _adapter(tmp_path / n), "weight": w} for n, w in (("a", 1.0), ("b", 3.0), ("c", 0.0))]
    params = {"n_samples": 16, "batch_size": 4, "max_length": 128, "max_new_tokens": 32}
    kfac = 32 * (4096**2 + 4096**2 + 4096**2 + 1024**2)
    # statistics (result fp32 + accumulator fp64) + the fp32 ΔW map + the fp32 copy of the largest fp64 sum
    host = {"diagonal": LLAMA_P * (4 + 8) + LLAMA_P * 4 + 4096 * 4096 * 4, "kfac": kfac * (4 + 8) + LLAMA_P * 4 + 4096**2 * 4}  # fmt: skip
    for method, fisher in (("fisher_merge", "diagonal"), ("regmean", "kfac")):
        config = {"base_model": "llama-3.1-8b", "method": method, "adapters": adapters, "params": params}
        _, s = settings_from_config(config)
        assert not s.sst and s.learned is None
        [own] = s.own
        assert (own.method, own.fisher, own.passes, own.n_samples, own.batch) == (method, fisher, 2, 16, 4)
        one = replace(s, fisher=fisher, n_samples=16, fisher_batch=4, fisher_length=128)
        answers = 4 * 32 * _greedy_token_s(4)  # 16 items in batches of 4, 32 tokens each
        steps = {st.step.split(" ")[0]: st for st in estimate(shape, s, RATES)}
        assert "fisher" not in steps  # no SST pass
        st = steps[method]
        assert st.seconds == pytest.approx(2 * (fisher_pass_seconds(shape, one, RATES) + answers))
        assert st.host_bytes == host[fisher]
        assert st.device_bytes == 8_030_261_248 * 4 + fisher_memory(shape, one)[0]


def test_learned_plans_its_fit_at_the_training_steps_law_after_the_reference_answers(tmp_path):
    from sst_merge.plan import ACT_HIDDEN, ACT_INTER, LearnedFit, settings_from_config

    shape = model_shape("llama-3.1-8b")
    adapters = [{"path": _adapter(tmp_path / n)} for n in ("a", "b")]
    params = {"steps": 10, "batch_size": 2, "max_length": 64}
    _, s = settings_from_config({"base_model": "llama-3.1-8b", "method": "learned", "adapters": adapters,
                                 "params": params})  # fmt: skip
    assert s.learned == LearnedFit(steps=10, batch=2, length=64, terms=3, benign=60, tokens=8)  # benign_dev: 60
    st = {st.step.split(" ")[0]: st for st in estimate(shape, s, RATES)}["learned"]
    fit = 10 * 3 * 3 * LLAMA_FWD * (2 * 64) / 1e11  # steps × terms × (forward + backward = 3 forwards) × tokens
    reference = 15 * 8 * _greedy_token_s(4)  # 60 prompts in batches of 2 × batch_size, loss_tokens 8 each
    assert st.seconds == pytest.approx(fit + reference)
    act = 128 * 32 * (ACT_HIDDEN * 4096 + ACT_INTER * 14336) * 4 + 128 * 128256 * 4 * 2  # one term's minibatch
    factors = 2 * 32 * 8 * ((4096 + 4096) + (1024 + 4096)) * 4  # both adapters' A and B, fp32
    assert st.device_bytes == 8_030_261_248 * 4 + act + factors
    # a term of weight 0 is not run; without the benign term there is nothing to answer first
    params.update(benign_weight=0, task_weight=0)
    _, s = settings_from_config({"base_model": "llama-3.1-8b", "method": "learned", "adapters": adapters,
                                 "params": params})  # fmt: skip
    assert (s.learned.terms, s.learned.benign) == (1, 0)
    st = {st.step.split(" ")[0]: st for st in estimate(shape, s, RATES)}["learned"]
    assert st.seconds == pytest.approx(fit / 3)


def test_sst_input_space_plans_three_kfac_passes_and_safety_span_plans_as_sst(tmp_path):
    from sst_merge.plan import fisher_pass_seconds, settings_from_config

    shape = model_shape("llama-3.1-8b")
    adapters = [{"path": _adapter(tmp_path / n)} for n in ("a", "b")]
    config = {"base_model": "llama-3.1-8b", "method": "sst", "adapters": adapters,
              "params": {"space": "input", "fisher": "kfac", "share": 0.1, "n_samples": 16}}  # fmt: skip
    _, s = settings_from_config(config)
    assert s.sst and s.objectives == 3 and s.fisher == "kfac"
    _, g = settings_from_config(config, ["params.space=gradient"])
    assert g.objectives == 2
    fisher = {st.step.split(" ")[0] + str(st.step.endswith("× 3)")): st for x in (s, g) for st in estimate(shape, x, RATES)}  # fmt: skip
    extra = fisher["fisherTrue"].seconds - fisher["fisherFalse"].seconds
    assert extra == pytest.approx(fisher_pass_seconds(shape, s, RATES))  # the third objective: one more pass
    assert fisher["fisherTrue"].host_bytes == fisher["fisherFalse"].host_bytes
    _, span = settings_from_config({**config, "method": "safety_span", "params": {"fisher": "kfac", "n_samples": 16}})
    assert span.sst and span.objectives == 2 and span.own == [] and span.learned is None


def test_an_experiment_plans_every_data_aware_method_it_sweeps(tmp_path):
    from sst_merge.plan import OwnPass, settings_from_config

    data = {"model": "llama-3.1-8b", "sst": {"fisher": "kfac"},
            "adapters": {"safety": _adapter(tmp_path / "s"), "utility": {"passage_qa": _adapter(tmp_path / "u")}},
            "sweep": {"methods": ["sst", "fisher_merge", "regmean", "learned"]},
            "methods": {"regmean": {"n_samples": 32}, "learned": {"steps": 4}}}  # fmt: skip
    _, s = settings_from_config(data)
    assert s.own == [OwnPass("fisher_merge", "diagonal", 2), OwnPass("regmean", "kfac", 2, n_samples=32)]
    assert s.learned is not None and s.learned.steps == 4
    names = [st.step for st in estimate(model_shape("llama-3.1-8b"), s, RATES)]
    assert {"fisher_merge (diagonal, N=64 × 2)", "regmean (kfac, N=32 × 2)", "learned (4 steps × 3)"} <= set(names)
