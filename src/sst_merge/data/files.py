"""Read local data files (JSONL, JSON, CSV, parquet) into lists of dicts."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sst_merge.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_local(path: str | Path) -> list[dict[str, Any]]:
    """Return the rows of a local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file as dicts.

    A ``.json`` file holds a list of objects, or an object with one list-valued key (``{"data": [...]}``).
    Missing ``id`` fields are filled with ``<file stem>-<row index>`` so that records can be paired later.

    Raises:
        DataError: the file is missing, of an unknown type, or malformed.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {p} does not exist; pass an existing .jsonl/.json/.csv/.parquet file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(p)
    elif suffix == ".json":
        rows = _read_json(p)
    elif suffix == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif suffix == ".parquet":
        rows = _read_parquet(p)
    else:
        raise DataError(f"data file {p}: unknown type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"data file {p}: row {i} is a {type(row).__name__}, not an object")
        row.setdefault("id", f"{p.stem}-{i}")
    return rows


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    rows = []
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"data file {p}: line {lineno} is not valid JSON ({e.msg}); fix or remove it") from e
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"data file {p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"data file {p}: expected a list of objects or an object with exactly one list value")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"data file {p}: expected a list of objects")
    return data


def _read_parquet(p: Path) -> list[dict[str, Any]]:
    try:
        # deferred: pyarrow, only for parquet files
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"reading {p} needs pyarrow; install it with: pip install pyarrow") from e
    return pq.read_table(p).to_pylist()
