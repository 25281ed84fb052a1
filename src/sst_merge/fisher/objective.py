"""Fisher objectives as data: which prompts, which responses, which response tokens carry the loss.

An :class:`Objective` is a list of :class:`Part` s; its Fisher is ``E[g gᵀ]`` over every example of every part
(``g = ∇_W log p(response | prompt)`` summed over the loss tokens). Examples:

* ``F_s`` (safety): harmful prompt → the given refusal; the *contrastive* ``F_s`` adds a part of benign prompts →
  a compliant answer (the pre-merge model's greedy answer, or given answers);
* ``F_u`` (utility): task prompts → responses sampled from the pre-merge model (true Fisher) or the given ones;
* ``F_b`` (benign refusal): benign prompts → a refusal, loss on the first few response tokens only (where a refusal
  is decided).

:meth:`Objective.key` identifies the objective by the *content* of its items (never a file path), so the cache is
keyed per objective and an α / β / k sweep re-uses the statistics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

#: Where a part's responses come from: the items' ``response`` field, sampled from the pre-merge model at
#: temperature 1 (seeded per prompt: the true Fisher), or the pre-merge model's greedy answer.
ResponseSource = Literal["given", "sampled", "greedy"]
RESPONSE_SOURCES: tuple[str, ...] = ("given", "sampled", "greedy")


@dataclass(frozen=True)
class Part:
    """One group of examples of an objective.

    Attributes:
        items: ``{"prompt"[, "response"]}`` dicts (``response`` required when ``responses == "given"``).
        responses: ``given`` | ``sampled`` | ``greedy`` (see :data:`ResponseSource`).
        loss_tokens: only the first ``loss_tokens`` response tokens carry the loss (``None``: all of them).
        label: a name for logs and diagnostics (``harmful→refusal`` ...).
    """

    items: tuple[dict[str, Any], ...]
    responses: ResponseSource = "given"
    loss_tokens: int | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.responses not in RESPONSE_SOURCES:
            raise ValueError(f"responses {self.responses!r}: choose one of {', '.join(RESPONSE_SOURCES)}")
        if self.loss_tokens is not None and self.loss_tokens < 1:
            raise ValueError(f"loss_tokens must be >= 1 (or None for every response token), got {self.loss_tokens}")
        if self.responses == "given":
            for i, it in enumerate(self.items):
                if not isinstance(it.get("response"), str) or not it["response"]:
                    raise ValueError(f"part {self.label or '?'}: item {i} has no 'response' but responses='given'")

    @property
    def uses_model_responses(self) -> bool:
        return self.responses != "given"

    def content_hash(self) -> str:
        """SHA-256 of what the Fisher reads from the items: prompts, and responses when they are given."""
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps([it["prompt"], it["response"] if self.responses == "given" else None]).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "n": len(self.items),
            "responses": self.responses,
            "loss_tokens": self.loss_tokens,
            "data": self.content_hash(),
        }


@dataclass(frozen=True)
class Objective:
    """A Fisher objective: ``E[g gᵀ]`` over the examples of all its parts, in order.

    Attributes:
        name: ``F_s``, ``F_u``, ``F_b`` ... (logs, diagnostics and cache file names).
        parts: the groups of examples.
        definition: one sentence for the diagnostics.
    """

    name: str
    parts: tuple[Part, ...]
    definition: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not any(p.items for p in self.parts):
            raise ValueError(f"objective {self.name}: no examples")

    @property
    def n(self) -> int:
        return sum(len(p.items) for p in self.parts)

    @property
    def uses_model_responses(self) -> bool:
        return any(p.uses_model_responses for p in self.parts if p.items)

    def key(self) -> dict[str, Any]:
        """What determines the statistics apart from the model and the settings (cache key material)."""
        return {"parts": [p.describe() for p in self.parts if p.items]}

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary for the diagnostics."""
        return {"n": self.n, "definition": self.definition, "parts": [p.describe() for p in self.parts if p.items]}
