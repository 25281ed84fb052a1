"""Merge methods. Importing this package registers every built-in method in :data:`MERGE_METHODS`.

A new method is one new module here plus its import line below.
"""

import sst_merge.merge.dare_linear  # noqa: F401  (each import registers its method)
import sst_merge.merge.dare_ties  # noqa: F401
import sst_merge.merge.fisher_merge  # noqa: F401
import sst_merge.merge.learned  # noqa: F401
import sst_merge.merge.linear  # noqa: F401
import sst_merge.merge.regmean  # noqa: F401
import sst_merge.merge.safety_span  # noqa: F401
import sst_merge.merge.sst  # noqa: F401
import sst_merge.merge.task_arithmetic  # noqa: F401
import sst_merge.merge.ties  # noqa: F401
from sst_merge.merge.base import MERGE_METHODS, MergeContext, MergeMethod, MethodParams


def get_method(name: str) -> MergeMethod:
    """Instantiate the registered method ``name`` (raises with the valid names if unknown)."""
    return MERGE_METHODS.get(name)()


__all__ = ["MERGE_METHODS", "MergeContext", "MergeMethod", "MethodParams", "get_method"]
