"""Ship the demo's adapters: train them with ``sst-merge train``'s defaults (seed 0), or take them from the cache,
and copy them with a manifest into ``src/sst_merge/resources/adapters/<task>/``.

Run it after a change to a default training recipe (settings or data) so the demo uses the new adapters again
instead of training its own::

    python scripts/ship_adapters.py                  # both: passage_qa and safety
    python scripts/ship_adapters.py --tasks safety   # only one

The demo uses a shipped adapter only while its manifest's settings and cache key equal what ``sst-merge train``
would train now; otherwise it trains (and logs why). See ``sst_merge.train.shipped``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sst_merge.train.shipped import SHIPPED_MODEL, SHIPPED_ROOT, SHIPPED_TASKS, file_problems, ship


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(SHIPPED_TASKS), choices=SHIPPED_TASKS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for task in args.tasks:
        path = ship(SHIPPED_MODEL, task, seed=args.seed, root=SHIPPED_ROOT, progress=not args.quiet)
        problems = file_problems(path)
        if problems:
            raise SystemExit(f"{path}: the shipped files do not match the manifest: {'; '.join(problems)}")
        print(f"shipped {task}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
