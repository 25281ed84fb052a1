#!/usr/bin/env python
"""The research code's entry point, kept working with the same flags.

    python experiments/run_real_experiments.py --mode full --model mistral-7b --experiment exp1

It is ``sst-merge run`` with the same ``--mode/--model/--experiment`` (and ``--set``, ``-o``) flags.
"""

from __future__ import annotations

import sys

from sst_merge.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
