"""Data sources behind one loader: packaged files, local files and (where reachable) hub datasets.

>>> from sst_merge.data import load_source
>>> items = load_source("harmbench", split="test", limit=10)   # [{"id", "prompt", "category", ...}, ...]

Named sources are registered in :data:`SOURCES`; adding one is one decorated function in ``sources.py``.
"""

from sst_merge.data.files import read_local
from sst_merge.data.sources import SOURCES, load_source, package_file


def source_rows() -> list[tuple[str, str]]:
    """(name, description) of every registered data source, for ``sst-merge list`` (a seeded one says how to name
    another seed)."""
    seeded = "; NAME@seed=N for seed N"
    return [(n, SOURCES.get(n).description + (seeded if SOURCES.get(n).seeded else "")) for n in SOURCES.names()]


__all__ = ["SOURCES", "load_source", "package_file", "read_local", "source_rows"]
