"""The task interface: a named, seeded generator of disjoint train / eval items.

An item is a dict ``{"id", "prompt", "response", "answer"}`` (letter tasks add ``"choices"``): ``prompt`` is the
user turn, ``response`` the assistant turn a LoRA is trained on, ``answer`` what the evaluator compares the
model's generated text with (exact match after :func:`normalize_answer`).
"""

from __future__ import annotations

import random
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sst_merge.errors import ConfigError

Item = dict[str, Any]


def normalize_text(text: str) -> str:
    """Lower-case, NFKC, collapse whitespace: the key used to prove train / eval / Fisher prompts disjoint."""
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


_EDGE_PUNCT = re.compile(r"^[\s\"'`*.,;:!?]+|[\s\"'`*.,;:!?]+$")


def normalize_answer(text: str) -> str:
    """Normalise a generated or reference answer for exact match.

    Lower-case, collapse whitespace, strip quotes / markdown stars / punctuation at both ends ("Oslo." == "oslo").
    Inner punctuation is kept: "3.5" and "river, lamp, cat" stay distinct from "35" and "river lamp cat".
    """
    return _EDGE_PUNCT.sub("", normalize_text(text))


def is_correct(generated: str, item: Item) -> bool:
    """Return whether a generated response matches the item's answer exactly after normalisation."""
    return normalize_answer(generated) == normalize_answer(str(item["answer"]))


@dataclass(frozen=True)
class GeneratedTask:
    """A task whose items come from a seeded generator ``make(rng) -> (prompt, answer)``.

    ``split(seed)`` draws unique items (by normalised prompt) from ``random.Random(f"{name}:{seed}")`` and cuts
    them into ``n_train`` training and ``n_eval`` evaluation items, so the two never share a prompt.
    """

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    metric: str = "exact_match"
    n_train: int = 600
    n_eval: int = 300
    max_new_tokens: int = 16
    #: How often the generator may repeat a prompt before we decide its item space is too small.
    max_draws_factor: int = 50
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, seed: int = 0) -> dict[str, list[Item]]:
        """Return ``{"train": [...], "eval": [...]}``: deterministic for a seed, disjoint by normalised prompt."""
        items = self._draw(seed, self.n_train + self.n_eval)
        return {"train": items[: self.n_train], "eval": items[self.n_train :]}

    def dev(self, seed: int = 0, n: int = 100) -> list[Item]:
        """Return ``n`` development items: the generator's next unique prompts after the train and eval items.

        Drawn from the same seeded stream as :meth:`split`, so they are disjoint from both (by normalised prompt)
        and the train / eval split does not change; for choosing hyper-parameters off the evaluation items.
        """
        return self._draw(seed, self.n_train + self.n_eval + n)[self.n_train + self.n_eval :]

    def _draw(self, seed: int, need: int) -> list[Item]:
        rng = random.Random(f"{self.name}:{seed}")
        seen: set[str] = set()
        items: list[Item] = []
        draws = 0
        while len(items) < need:
            draws += 1
            if draws > need * self.max_draws_factor:
                raise ConfigError(f"task {self.name}: only {len(items)} unique items; lower n_train / n_eval")
            prompt, answer = self.make(rng)
            key = normalize_text(prompt)
            if key in seen:
                continue
            seen.add(key)
            items.append(
                {"id": f"{self.name}-{seed}-{len(items):05d}", "prompt": prompt, "response": answer, "answer": answer}
            )
        return items

    def is_correct(self, generated: str, item: Item) -> bool:
        """Judge one generated response (exact match after :func:`normalize_answer`)."""
        return is_correct(generated, item)
