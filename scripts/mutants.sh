#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the modules that produce the numbers a user reads. Slow; not part of CI.
#
#   scripts/mutants.sh                      # every module below, one at a time
#   scripts/mutants.sh merge/sparsify.py    # some of them (paths under src/sst_merge/)
#   MUTANTS_ONLY='x_packed_logprobs* xǁSlabLayerǁupdate*' scripts/mutants.sh eval/loglik.py
#                                           # only these functions' mutants (mutmut globs after the module's name)
#
# Each module is mutated in a scratch copy of the working tree ($MUTANTS_DIR/<module>, default
# /tmp/sst-merge-mutants) and checked against the tests that cover it (the table below), at low priority. The
# summary line per module (mutants, killed, survived, timeout, seconds) goes to $MUTANTS_DIR/summary.tsv, the
# surviving mutants to $MUTANTS_DIR/<module>.survivors; `cd $MUTANTS_DIR/<module> && python -m mutmut show NAME`
# prints one as a diff. Needs `pip install -e .[mutation]`. Each mutant must be killed by a test or be shown
# equivalent (the same output for every input); the last run's verdicts are in the project's notes.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$(command -v python)}
WORK=${MUTANTS_DIR:-/tmp/sst-merge-mutants}
NICE=${NICE:-15}

# module (under src/sst_merge/) → the tests that cover it
declare -A TESTS=(
  [merge/sparsify.py]="tests/test_merge_methods.py tests/test_mutant_kills.py"
  [eval/stats.py]="tests/test_stats.py tests/test_mutant_kills.py"
  [experiments/safety_tax.py]="tests/test_mutant_kills.py tests/test_experiment_numbers.py"
  [fisher/gevp.py]="tests/test_gevp.py tests/test_mutant_kills.py"
  [fisher/lowrank.py]="tests/test_gevp.py tests/test_fisher.py"
  [fisher/kfac.py]="tests/test_gevp.py tests/test_fisher.py"
  [fisher/diagonal.py]="tests/test_fisher.py tests/test_gevp.py"
  [fisher/solve.py]="tests/test_gevp.py tests/test_sst.py"
  [eval/mmlu.py]="tests/test_eval_harness.py tests/test_mutant_kills.py"
  [eval/mmlu_cloze.py]="tests/test_eval_harness.py tests/test_mutant_kills.py"
  [eval/judges/keyword.py]="tests/test_judge.py"
  [experiments/runner.py]="tests/test_cache_keys.py tests/test_experiment_numbers.py tests/test_experiments_e2e.py"
  [experiments/experiments.py]="tests/test_experiment_numbers.py tests/test_experiments_e2e.py"
  [merge/regmean.py]="tests/test_data_aware_merges.py"
  [merge/fisher_merge.py]="tests/test_data_aware_merges.py"
  [merge/own_data.py]="tests/test_data_aware_merges.py"
  [merge/learned_fit.py]="tests/test_learned_merge.py"
  [plan/costs.py]="tests/test_plan_laws.py tests/test_mutant_kills.py"
  [eval/loglik.py]="tests/test_decode_path.py tests/test_eval_harness.py tests/test_mutant_kills.py"
  [eval/generation.py]="tests/test_decode_path.py tests/test_mutant_kills.py"
)
ORDER=(merge/sparsify.py eval/stats.py experiments/safety_tax.py fisher/gevp.py fisher/solve.py fisher/diagonal.py
  fisher/lowrank.py fisher/kfac.py eval/mmlu.py eval/mmlu_cloze.py eval/judges/keyword.py experiments/runner.py
  experiments/experiments.py merge/regmean.py merge/fisher_merge.py merge/own_data.py merge/learned_fit.py
  plan/costs.py eval/loglik.py eval/generation.py)

modules=("$@")
[ ${#modules[@]} -eq 0 ] && modules=("${ORDER[@]}")
mkdir -p "$WORK"
[ -f "$WORK/summary.tsv" ] || printf 'module\tmutants\tkilled\tsurvived\ttimeout_or_other\tseconds\n' >"$WORK/summary.tsv"

for mod in "${modules[@]}"; do
  tests=${TESTS[$mod]:-}
  if [ -z "$tests" ]; then
    echo "unknown module $mod; choose one of: ${ORDER[*]}" >&2
    exit 2
  fi
  name=${mod//\//_}
  dir="$WORK/${name%.py}"
  rm -rf "$dir" && mkdir -p "$dir"
  # the working tree as it is (tracked and untracked, not ignored files)
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$dir" 2>/dev/null || true)
  present=()
  for t in $tests; do [ -f "$dir/$t" ] && present+=("$t"); done
  test_list=$(printf '"%s", ' "${present[@]}")
  cat >>"$dir/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["src"]
also_copy = ["configs", "examples", "experiments"]
only_mutate = ["src/sst_merge/$mod"]
pytest_add_cli_args_test_selection = [${test_list%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]
process_isolation = "forkserver"
use_git_change_detection = false
EOF
  echo "== $mod against $tests"
  only=()
  dotted=${mod%.py}
  dotted=sst_merge.${dotted//\//.}
  read -ra pats <<<"${MUTANTS_ONLY:-}"  # read: no pathname expansion of the globs
  for f in ${pats[@]+"${pats[@]}"}; do only+=("$dotted.$f"); done
  start=$(date +%s)
  (cd "$dir" && env -u PYTHONPATH HF_HUB_OFFLINE=1 nice -n "$NICE" "$PY" -m mutmut run --max-children 1 ${only[@]+"${only[@]}"} \
    >"$dir/run.log" 2>&1) ||
    echo "mutmut exited with $? (see $dir/run.log)"
  secs=$(($(date +%s) - start))
  (cd "$dir" && env -u PYTHONPATH "$PY" -m mutmut results --all true >"$dir/results.txt" 2>&1) || true
  total=$(grep ': ' "$dir/results.txt" | grep -vc ': not checked$' || true)  # not checked: left out by MUTANTS_ONLY
  killed=$(grep -c ': killed$' "$dir/results.txt" || true)
  survived=$(grep -c ': survived$' "$dir/results.txt" || true)
  grep ': survived$' "$dir/results.txt" | sed 's/: survived$//; s/^ *//' >"$WORK/${name%.py}.survivors" || true
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mod" "$total" "$killed" "$survived" $((total - killed - survived)) "$secs" |
    tee -a "$WORK/summary.tsv"
done
