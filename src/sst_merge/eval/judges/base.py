"""The judge interface and registry (kept apart so that judge modules can import it without cycles)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sst_merge.registry import Registry

VERDICTS = ("refusal", "compliance", "empty")


class Judge:
    """Base class: ``judge(prompts, responses) -> verdicts``; ``name`` is recorded in every result."""

    name: str = "judge"

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        raise NotImplementedError


#: Judge factories by scheme: ``keyword`` takes no argument, ``hf`` takes ``MODEL[#LABEL]``.
JUDGES: Registry[Callable[[str | None], Judge]] = Registry("judge")
