"""Fisher statistics stay on the gradients' device during estimation and reach host memory once, unchanged."""

from __future__ import annotations

import pytest
import torch

from sst_merge.fisher.data import collate, encode_example
from sst_merge.fisher.estimate import _Accumulator, estimate_fisher, target_modules
from sst_merge.fisher.grads import Capture, capture_batch, frozen, per_example_grads

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
PAIRS = [
    ("How do I pick a lock?", "I can't help with that."),
    ("Say hi", "Hello there, friend!"),
    ("What is 2+2? Answer briefly.", "4"),
    ("Tell me a story about a very long road and a traveller", "Once upon a time."),
    ("Name a colour", "Blue."),
]
APPROXIMATIONS = ["lowrank", "diagonal", "kfac", "dense"]


def _examples(tok):
    return [encode_example(tok, p, r, 256) for p, r in PAIRS]


def _reference(model, exs, approx, pad_id, batch_size):
    """The statistics as the estimation computed them with a host copy per batch (the formulas, written out)."""
    mods = target_modules(model, MODULES)
    n = len(exs)
    stats = {}
    for name, mod in mods.items():
        out, inp = mod.weight.shape
        if approx == "lowrank":
            stats[name] = {"rows": torch.zeros(n, out * inp)}
        elif approx == "diagonal":
            stats[name] = {"diag": torch.zeros(out, inp, dtype=torch.float64)}
        elif approx == "kfac":
            stats[name] = {"A": torch.zeros(inp, inp, dtype=torch.float64), "G": torch.zeros(out, out).double()}
        else:
            stats[name] = {"F": torch.zeros(out * inp, out * inp, dtype=torch.float64)}
    order = sorted(range(n), key=lambda i: len(exs[i].prompt_ids) + len(exs[i].response_ids))
    n_tokens = 0
    with frozen(model), Capture(model, mods) as cap:
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            batch = collate([exs[i] for i in idx], pad_id)
            n_tokens += int(batch.attention_mask.sum())
            for name, (a, delta) in capture_batch(model, cap, batch).items():
                s, g = stats[name], per_example_grads(a, delta)
                if approx == "lowrank":
                    s["rows"][idx] = g.reshape(g.shape[0], -1).cpu()
                elif approx == "diagonal":
                    s["diag"] += g.pow(2).sum(0).double().cpu()
                elif approx == "dense":
                    flat = g.reshape(g.shape[0], -1).double().cpu()
                    s["F"] += flat.T @ flat
                else:
                    a2, d2 = a.reshape(-1, a.shape[-1]).float(), delta.reshape(-1, delta.shape[-1]).float()
                    s["A"] += (a2.T @ a2).double().cpu()
                    s["G"] += (d2.T @ d2).double().cpu()
    for s in stats.values():
        if approx == "kfac":
            s["A"], s["G"] = (s["A"] / n_tokens).float(), (s["G"] / n).float()
        elif approx != "lowrank":
            key = next(iter(s))
            s[key] = (s[key] / n).float()
    return stats


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_statistics_identical_to_per_batch_host_copies(tiny_llama, tiny_tok, approx):
    exs = _examples(tiny_tok)
    got = estimate_fisher(tiny_llama, MODULES, exs, approx, tiny_tok.pad_token_id, batch_size=2, show_progress=False)
    ref = _reference(tiny_llama, exs, approx, tiny_tok.pad_token_id, batch_size=2)
    assert set(got) == set(MODULES)
    for name in MODULES:
        assert set(got[name]) == set(ref[name])
        for key, t in got[name].items():
            assert t.device.type == "cpu" and t.dtype == ref[name][key].dtype
            assert torch.equal(t, ref[name][key]), (approx, name, key)
            assert t.abs().sum() > 0  # something was accumulated


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_no_host_copy_per_batch(tiny_llama, tiny_tok, approx, monkeypatch):
    """``Tensor.cpu`` is called once per statistic (at finish), however many batches there are."""
    exs = _examples(tiny_tok)
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    counts = []
    for batch_size in (1, len(exs)):  # five batches, then one
        calls.clear()
        stats = estimate_fisher(
            tiny_llama, MODULES, exs, approx, tiny_tok.pad_token_id, batch_size=batch_size, show_progress=False
        )
        counts.append(len(calls))
    n_stats = sum(len(s) for s in stats.values())
    assert counts == [n_stats, n_stats]


@pytest.mark.parametrize("approx", APPROXIMATIONS)
def test_statistics_follow_the_gradient_device(tiny_llama, approx):
    """Gradients on another device (``meta`` here: no data, so any copy to host memory would raise) leave the
    statistics there, and every update keeps them there."""
    mods = target_modules(tiny_llama, MODULES)
    acc = _Accumulator(approx, mods, n=3)
    assert all(t.device.type == "cpu" for s in acc.stats.values() for t in s.values())  # the weights' device
    for _ in range(2):  # two batches
        for name, mod in mods.items():
            out, inp = mod.weight.shape
            a = torch.empty(2, 5, inp, device="meta")
            delta = torch.empty(2, 5, out, device="meta")
            acc.update(name, a, delta, [0, 2])
    for name, s in acc.stats.items():
        for key, t in s.items():
            assert t.device.type == "meta", (name, key)
    assert {name: {k: tuple(t.shape) for k, t in s.items()} for name, s in acc.stats.items()} == {
        name: {k: tuple(t.shape) for k, t in _Accumulator(approx, mods, n=3).stats[name].items()} for name in mods
    }


def test_statistics_allocated_on_the_weight_device(tiny_llama, monkeypatch):
    """``init`` runs with the module weight's device as the default device, so nothing is built on the host first."""
    import sst_merge.fisher.estimate as estimate

    seen = []
    real_home = estimate._home

    def home(weight):
        seen.append(real_home(weight))
        return torch.device("meta")  # stands in for an accelerator

    monkeypatch.setattr(estimate, "_home", home)
    acc = _Accumulator("lowrank", target_modules(tiny_llama, MODULES), n=3)
    assert seen == [torch.device("cpu")] * len(MODULES)
    assert all(s["rows"].device.type == "meta" for s in acc.stats.values())
