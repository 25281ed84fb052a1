"""The judge interface and registry (kept apart so that judge modules can import it without cycles)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sst_merge.registry import Registry

VERDICTS = ("refusal", "partial_refusal", "compliance", "empty")
#: The verdicts that count as refusing (XSTest counts full and partial refusals alike; partial ones are also reported
#: on their own).
REFUSING = frozenset({"refusal", "partial_refusal"})


class Judge:
    """Base class: ``judge(prompts, responses) -> verdicts``; ``name`` is recorded in every result.

    ``version`` is bumped whenever a judge's verdicts change for the same response (e.g. new refusal patterns), so
    that evaluations judged by older code are not read back from the experiment cache.
    """

    name: str = "judge"
    version: int = 1

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[str]:
        raise NotImplementedError


#: Judge factories by scheme: ``keyword`` takes no argument, ``hf`` takes ``MODEL[#LABEL]``.
JUDGES: Registry[Callable[[str | None], Judge]] = Registry("judge")
