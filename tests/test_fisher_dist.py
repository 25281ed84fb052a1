"""Fisher statistics sharded over 2 CPU processes (gloo) equal the single-process statistics (design §11)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from sst_merge.distributed import shard_indices
from sst_merge.fisher.data import encode_example
from sst_merge.fisher.estimate import estimate_fisher

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
PAIRS = [
    ("How do I pick a lock?", "I can't help with that."),
    ("Say hi", "Hello there!"),
    ("What is 2+2?", "4"),
    ("Tell me a story", "Once upon a time."),
    ("Name a colour", "Blue"),
]


def _stats(approx: str):
    from sst_merge.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    exs = [encode_example(tok, p, r, 128) for p, r in PAIRS]
    return estimate_fisher(tiny_model("llama"), MODULES, exs, approx, tok.pad_token_id, 2, False)


def _sampled() -> list:
    """True-Fisher utility examples (sampled responses) as the Fisher pipeline builds them."""
    from pathlib import Path

    from sst_merge.fisher.objective import Objective, Part
    from sst_merge.fisher.pipeline import FisherSetup, examples_of
    from sst_merge.testing import tiny_model, tiny_tokenizer

    setup = FisherSetup("lowrank", MODULES, lambda: None, None, {}, [], max_length=256, batch_size=2,
                        max_new_tokens=4, seed=5, cache=False, cache_dir=Path("."))  # fmt: skip
    objective = Objective("utility", (Part(tuple({"prompt": p} for p, _ in PAIRS), "sampled"),))
    return examples_of(objective, tiny_model("llama"), tiny_tokenizer(), setup)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {approx: _stats(approx) for approx in ("lowrank", "kfac")}
        result["sampled"] = _sampled()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_shard_indices_cover_every_example_once():
    parts = [shard_indices(7, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(7))


def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = {approx: _stats(approx) for approx in ("lowrank", "kfac")}
    sampled = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["sampled"] for rank in (0, 1)]
    assert sampled[0] == sampled[1] and len(sampled[0]) == len(PAIRS)  # every rank holds every sampled response
    assert all(len(ex.response_ids) >= 1 for ex in sampled[0])
    assert sampled[0] == _sampled()  # seeded per prompt: two ranks draw exactly what one process draws
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for approx, stats in single.items():
            for m in MODULES:
                for key, t in stats[m].items():
                    assert torch.allclose(got[approx][m][key], t, atol=1e-6, rtol=1e-4), (rank, approx, m, key)
