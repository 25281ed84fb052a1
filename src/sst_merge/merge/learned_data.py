"""The examples of the learned-coefficients objective (:mod:`sst_merge.merge.learned`), tokenised by the one rule.

* harmful prompt → a refusal template (:func:`~sst_merge.tasks.safety.refusal_for`), first ``loss_tokens`` tokens;
* benign prompt → the reference model's greedy answer (base + Σ_utility wᵢτᵢ), ``loss_tokens`` tokens, generated
  once per (model, utility adapters, prompts, length) and cached as ``learned-answers-KEY.json``;
* task item → its response (closed by EOS).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sst_merge.adapters.lora import LoraAdapter
from sst_merge.cache import Damaged, read_checked
from sst_merge.errors import ConfigError
from sst_merge.fisher.sampling import sample_responses
from sst_merge.io import atomic_write_json, json_digest
from sst_merge.models.deltas import applied_deltas
from sst_merge.models.tokenize import Example, encode_example, prompt_ids, truncate
from sst_merge.tasks.safety import refusal_for

log = logging.getLogger(__name__)


def default_task_data(adapters: list[LoraAdapter], roles: list[str]) -> list[str]:
    """``utility_dev:TASK`` for each utility adapter, its task read from its ``train_info.json`` (sst-merge train)."""
    out = []
    for a, role in zip(adapters, roles, strict=True):
        if role != "utility":
            continue
        info = Path(a.path) / "train_info.json"
        task = json.loads(info.read_text()).get("task") if info.is_file() else None
        if not task:
            raise ConfigError(
                f"learned: adapter {a.path} does not record its task (train_info.json 'task'); set "
                "params.task_data, e.g. utility_dev:passage_qa, or task_weight: 0"
            )
        out.append(f"utility_dev:{task}")
    if not out:
        raise ConfigError("learned: no utility adapter to take task data from; set params.task_data or task_weight: 0")
    return out


def examples(
    model: Any,
    tok: Any,
    data: dict[str, tuple[list[str], list[dict]]],
    params: Any,
    ctx: Any,
    directory: Path,
    model_fp: Any,
) -> dict[str, list[Example]]:
    """Tokenise each term's items (generating the benign answers where they are not cached)."""
    m, n = params.loss_tokens, params.max_length
    out: dict[str, list[Example]] = {}
    if "harmful" in data:
        items = data["harmful"][1]
        exs = [
            encode_example(tok, it["prompt"], refusal_for(str(it.get("id") or it["prompt"]), params.seed), n)
            for it in items
        ]
        out["harmful"] = [Example(e.prompt_ids, e.response_ids[:m]) for e in exs]
    if "task" in data:
        out["task"] = [encode_example(tok, it["prompt"], it["response"], n) for it in data["task"][1]]
    if "benign" in data:
        prompts = [it["prompt"] for it in data["benign"][1]]
        answers = reference_answers(model, tok, prompts, params, ctx, directory, model_fp)
        out["benign"] = [
            truncate(Example(tuple(p), tuple(r)), n) for p, r in zip(_prompt_ids(tok, prompts, n), answers, strict=True)
        ]
    return out


def _prompt_ids(tok: Any, prompts: list[str], max_length: int) -> list[list[int]]:
    ids = [prompt_ids(tok, p) for p in prompts]
    return [p[max(0, len(p) - (max_length - 1)) :] for p in ids]  # keep the end, as the Fisher's sampled parts do


def reference_answers(
    model: Any, tok: Any, prompts: list[str], params: Any, ctx: Any, directory: Path, model_fp: Any
) -> list[list[int]]:
    """The reference model's greedy answer token ids (``loss_tokens`` of them at most), cached by content."""
    utility = [i for i, r in enumerate(ctx.roles) if r == "utility"]
    key = json_digest(
        {
            "kind": "learned-answers",
            "model": model_fp,
            "prompts": prompts,
            "tokens": params.loss_tokens,
            "max_length": params.max_length,
            "reference": sorted([ctx.adapters[i].sha256, ctx.weights[i]] for i in utility),
        }
    )
    path = Path(directory) / f"learned-answers-{key[:32]}.json"
    hit = read_checked(path, lambda p: _check_answers(p, key, len(prompts))) if params.cache else None
    if hit is not None:
        return hit
    reference = ctx.weighted_sum(utility)
    model.eval()
    with applied_deltas(model, reference):
        answers = sample_responses(
            model,
            tok,
            _prompt_ids(tok, prompts, params.max_length),
            params.loss_tokens,
            params.seed,
            params.batch_size * 2,
            ctx.show_progress,
            greedy=True,
        )
    if params.cache:
        atomic_write_json(path, {"key": key, "answers": answers})
    log.info("learned: %d reference answers generated (%d tokens each at most)", len(answers), params.loss_tokens)
    return answers


def _check_answers(path: Path, key: str, n: int) -> list[list[int]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    answers = data.get("answers")
    if data.get("key") != key or not isinstance(answers, list) or len(answers) != n:
        raise Damaged(f"holds other answers (key {str(data.get('key'))[:32]}, want {key[:32]})")
    if not all(isinstance(a, list) and all(isinstance(t, int) for t in a) for a in answers):
        raise Damaged("answers are not lists of token ids")
    return answers
