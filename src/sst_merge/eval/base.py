"""The evaluator interface and the task registry.

An evaluator is one class in one file, registered by name in :data:`TASKS`. The harness builds it from a task spec
(``refusal``, ``mmlu``, ``task:NAME`` — the part after the colon is the evaluator's argument), asks it for its
items *before* any model work (so a missing package or file fails fast), then runs it.

Every evaluator returns a :class:`TaskResult`-shaped dict:

``{"task", "primary", "metrics": {name: {value, n, ci95, interval, stderr, higher_is_better}}, "n", "source",
"records": [{"id", ..., "score"}]}`` — ``score`` is the per-item value of the primary metric (0/1), which the
Safety Tax bootstrap pairs across models by ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

import sst_merge.tasks  # noqa: F401  (registers the named Fisher sources: data="safety_fisher" evaluates them)
from sst_merge.data import load_source
from sst_merge.errors import ConfigError, DataError
from sst_merge.registry import Registry


class EvalSettings(BaseModel):
    """How every model is evaluated: batch size, generation budget and refusal judge, with their defaults.

    The one settings model of ``sst-merge eval``, :func:`~sst_merge.eval.evaluate` and an experiment's ``eval``
    section (:class:`~sst_merge.experiments.config.ExperimentEvalSettings` adds the data sets to it).
    """

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, description="items per forward / generate call")
    max_new_tokens: int = Field(64, ge=1, description="generation budget of the generative tasks (greedy decoding)")
    judge: str = Field("keyword", description="refusal judge: keyword or hf:MODEL[#REFUSAL_LABEL]")
    # Left out of model_dump (so out of every evaluation cache key): both decoders give the same tokens and scores.
    decode: Literal["fast", "reference"] = Field(
        "fast",
        exclude=True,
        description="fast: shared prompt prefix computed once, pre-allocated KV cache, own greedy loop; reference: "
        "model.generate() and one full forward per scored context (the same tokens and predictions, slower)",
    )


@dataclass
class EvalContext:
    """What every evaluator of one :func:`~sst_merge.eval.evaluate` call sees: the settings, the judge built once
    from them, whether to draw progress bars, and extras."""

    batch_size: int
    max_new_tokens: int
    judge: Any = None  # a sst_merge.eval.judges.Judge, built once by the harness
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    decode: str = "fast"  # EvalSettings.decode

    @classmethod
    def of(cls, settings: EvalSettings, judge: Any = None, show_progress: bool = True) -> EvalContext:
        """The context of ``settings`` with its judge object (``None`` where no task needs one)."""
        return cls(settings.batch_size, settings.max_new_tokens, judge, show_progress, decode=settings.decode)


class Evaluator:
    """Base class of the evaluators; subclasses set the class attributes, :meth:`run` and :meth:`summarise`."""

    name: ClassVar[str] = ""
    default_source: ClassVar[str | None] = None
    required_fields: ClassVar[tuple[str, ...]] = ("prompt",)
    needs_judge: ClassVar[bool] = False
    needs_arg: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, arg: str | None = None) -> None:
        if self.needs_arg and not arg:
            raise ConfigError(f"task {self.name!r} needs an argument: {self.name}:NAME")
        if arg and not self.needs_arg:
            raise ConfigError(f"task {self.name!r} takes no argument (got {self.name}:{arg})")
        self.arg = arg

    @property
    def task_name(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name

    def load_items(self, data: str | list[dict[str, Any]] | None, limit: int | None) -> list[dict[str, Any]]:
        """Return the items to evaluate: ``data`` (a source name/path or a list of items) or the default source."""
        if isinstance(data, list):
            if not data:
                raise DataError(f"task {self.task_name!r}: the given item list is empty")
            for f in self.required_fields:
                missing = [it.get("id", i) for i, it in enumerate(data) if f not in it]
                if missing:
                    raise DataError(f"task {self.task_name!r}: item {missing[0]!r} lacks the field {f!r}")
            return data[:limit] if limit else list(data)
        source = data or self.default_source
        if source is None:
            raise ConfigError(f"task {self.task_name!r} has no default data; pass data for it")

        return load_source(source, limit=limit, require=self.required_fields)

    def run(self, model, tokenizer, items: list[dict[str, Any]], settings: EvalContext) -> dict[str, Any]:
        raise NotImplementedError

    def summarise(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The task's metrics from its full per-item record list: ``{"metrics": {...}}`` plus any other summary.

        :meth:`run` computes its metrics with this method, and a sharded (``torch.distributed``) evaluation calls
        it on the records gathered from every rank, so both give the same numbers. An evaluator that does not
        override it is run whole on every rank instead.
        """
        raise NotImplementedError(f"task {self.task_name!r} has no summarise(records)")


TASKS: Registry[type[Evaluator]] = Registry("evaluation task")


def register_task(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: register an evaluator under its ``name``."""
    return TASKS.register(cls.name)(cls)


def get_evaluator(spec: str) -> Evaluator:
    """Build the evaluator for a task spec such as ``refusal`` or ``task:arith``."""
    name, _, arg = spec.partition(":")
    return TASKS.get(name)(arg or None)
