"""Which prompts are evaluation prompts, so that nothing fitted on data (learned merge coefficients) sees them.

The evaluation sets: HarmBench test behaviours (every functional category, and a contextual behaviour's request on
its own), the over-refusal sets (``benign``, ``benign_unsafe``, ``benign_v1``), the phrasing prompts
(``resources/phrasing_prompts.jsonl``) and every generated utility task's ``eval`` items (seed 0). The development
split that may be fitted on instead: ``harmbench_val``, ``benign_dev`` and ``utility_dev:NAME``.

Prompts are compared by :func:`~sst_merge.tasks.base.normalize_text` (exact after case and whitespace folding); the
near-duplicate rule of the data hygiene tests is stricter, but it would flag every pair of a generated task's
templated prompts.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from sst_merge.data import load_source
from sst_merge.data.files import read_local
from sst_merge.errors import ConfigError, DataError
from sst_merge.tasks.base import normalize_text
from sst_merge.tasks.generated import GENERATED_TASKS
from sst_merge.tasks.sources import SEED

log = logging.getLogger(__name__)

#: Named sources that are evaluation sets (a fit must never name one).
EVALUATION_SOURCES = ("harmbench", "benign", "benign_unsafe", "benign_v1", "phrasing", "mmlu")
#: The fix named by every refusal.
DEV_FIX = "use the development split: harmbench_val / benign_dev / utility_dev:NAME"

PHRASING_FILE = Path(__file__).resolve().parent.parent / "resources" / "phrasing_prompts.jsonl"


@functools.lru_cache(maxsize=1)
def evaluation_prompts() -> dict[str, frozenset[str]]:
    """Return evaluation set name → its normalised prompts (a set whose package is missing is left out, logged)."""
    sets: dict[str, list[str]] = {}
    try:
        rows = load_source("harmbench", split="test", functional_category=None)
        sets["harmbench"] = [r["prompt"] for r in rows] + [r["prompt"].rsplit("\n\n---\n\n", 1)[-1] for r in rows]
    except DataError as e:  # the HarmBench package is optional; without it no fit can name HarmBench either
        log.info("holdout: HarmBench test prompts unavailable (%s)", e)
    for name in ("benign", "benign_unsafe", "benign_v1"):
        sets[name] = [r["prompt"] for r in load_source(name)]
    sets["phrasing"] = [r["prompt"] for r in read_local(PHRASING_FILE)]
    for task in GENERATED_TASKS:
        sets[f"{task.name} eval split"] = [it["prompt"] for it in task.split(seed=SEED)["eval"]]
    return {name: frozenset(normalize_text(p) for p in prompts) for name, prompts in sets.items()}


def check_not_evaluation_name(source: str, what: str) -> None:
    """Refuse a fit data source named as an evaluation set (before loading it: the name alone decides)."""
    if source.partition(":")[0] in EVALUATION_SOURCES or source.endswith(":eval"):
        raise ConfigError(f"{what}: {source!r} is an evaluation set, never fitted on; {DEV_FIX}")


def check_not_evaluation(source: str, prompts: list[str], what: str) -> None:
    """Refuse a fit data source that is, or shares a prompt with, an evaluation set.

    Args:
        source: the source as configured (a name or a file).
        prompts: the prompts it holds.
        what: the parameter that names it (``harmful_data`` ...), for the message.

    Raises:
        ConfigError: one line naming the source, the evaluation set and the fix.
    """
    check_not_evaluation_name(source, what)
    mine = {normalize_text(p) for p in prompts}
    for name, evaluation in evaluation_prompts().items():
        shared = mine & evaluation
        if shared:
            raise ConfigError(
                f"{what}: {source!r} shares {len(shared)} prompt(s) with the evaluation set {name} (e.g. "
                f"{sorted(shared)[0][:60]!r}); {DEV_FIX}"
            )
