"""A data source in one file: a loader function registered by name with ``@source``.

After importing this module, ``greetings`` is a source name anywhere a data source is accepted: an evaluator's
``--data TASK=greetings``, an experiment's ``eval.benign_source``, SST's ``utility_data``, ``load_source``.
"""

from __future__ import annotations

from typing import Any

from sst_merge.data.sources import source

GREETINGS = ["Hello!", "Good morning.", "How are you today?", "Nice to meet you.", "Hi there, what's new?"]


@source("greetings", "five short greetings (an example source)", splits=("train", "eval"))
def greetings(split: str | None) -> list[dict[str, Any]]:
    """Return the items of ``split`` (``None``: all): ``id`` and ``prompt``, plus a ``response`` for Fisher data."""
    items = [{"id": f"greet-{i}", "prompt": p, "response": "Hello."} for i, p in enumerate(GREETINGS)]
    if split == "train":
        return items[:3]
    if split == "eval":
        return items[3:]
    return items
