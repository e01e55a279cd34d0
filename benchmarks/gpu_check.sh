#!/usr/bin/env bash
# One script for a fresh H100/H200 machine (torch + triton preinstalled, no internet):
#   1. installs fastllama from this working tree without downloading anything;
#   2. runs the test suite on CUDA (the CPU suite's tests, then the benchmarks, then the cuda_only
#      shape matrix in the time left);
#   3. runs the training, op, decode benchmarks in --quick mode and the memory report;
# all within about 8 minutes, everything under ONE output folder:
#
#   bash benchmarks/gpu_check.sh [OUT]        (default: $OUT, else ./gpu_check_out)
#
#   OUT/summary.md            stage, status (ok / FAILED / TIMEOUT), seconds; then every table
#   OUT/env.txt               nvidia-smi, python, package versions, missing packages
#   OUT/pytest.log, pytest-junit.xml (suite), pytest-matrix.log, pytest-matrix-junit.xml (cuda_only
#                             shape matrix, as far as the budget allowed), pytest-benchmark.json
#   OUT/<stage>.log           the output of each benchmark
#   OUT/results/<device>/     the results files (JSON + markdown + PNG): commit them with
#                             cp -r OUT/results/* benchmarks/results/ && git add benchmarks/results
#
# Python packages the suite needs but the machine lacks (transformers, pytest ...) can't be
# downloaded here: put their wheels in a folder and set WHEELS=/that/folder (installed with
# --no-index). Stage time limits add up to the 8-minute budget (GPU_CHECK_BUDGET_S, default 470 s);
# a stage that runs out is marked TIMEOUT and the next one starts. GPU_CHECK_STAGES (names from
# summary.md: pytest bench-train bench-ops bench-decode pytest-benchmark bench-memory pytest-matrix)
# runs a subset, in the order given.
set -uo pipefail
OUT=${1:-${OUT:-}}
case $OUT in
  "") ;;
  /*) ;;
  *) OUT="$PWD/$OUT" ;;  # relative to where the script was started, not to the repository root
esac
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SUMMARY="$OUT/summary.md"
# FASTLLAMA_GIT_COMMIT: the commit the tree is, when its .git is missing or stale (a copied tree);
# the results files record it too (fastllama.bench.common.environment)
COMMIT=${FASTLLAMA_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}
echo "# gpu_check $(date -u +%FT%TZ) (commit $COMMIT)" > "$SUMMARY"
echo "" >> "$SUMMARY"
echo "| stage | status | seconds |" >> "$SUMMARY"
echo "|---|---|---|" >> "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP_SECONDS COMMAND...: runs with a limit of min(CAP, time left), logs to OUT/NAME.log.
stage() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(left)
  (( limit > cap )) && limit=$cap
  if (( limit < 10 )); then
    echo "| $name | SKIPPED (no time left) | 0 |" >> "$SUMMARY"; return
  fi
  echo "=== $name (limit ${limit}s): $*"
  local t0; t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT after ${limit}s"; elif (( rc != 0 )); then status="FAILED (exit $rc)"; fi
  echo "| $name | $status | $dt |" >> "$SUMMARY"
  tail -n 3 "$OUT/$name.log"
}

# --- 0. what is here ------------------------------------------------------------------------
{
  nvidia-smi || echo "nvidia-smi not found"
  "$PY" --version
  "$PY" - <<'EOF'
import importlib
for name in ["torch", "triton", "transformers", "safetensors", "sentencepiece", "tqdm", "pytest",
             "pytest_benchmark", "matplotlib", "liger_kernel", "flash_attn", "setuptools", "wheel"]:
    try:
        m = importlib.import_module(name)
        print(f"{name:18s} {getattr(m, '__version__', 'installed')}")
    except Exception as e:  # noqa: BLE001
        print(f"{name:18s} MISSING ({type(e).__name__})")
import torch
print("cuda available:", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- 1. install from the working tree, downloading nothing ---------------------------------
install() {
  if [ -n "${WHEELS:-}" ]; then
    # (a failure here must not skip the editable install and the kernels link below)
    "$PY" -m pip install --no-deps --no-index --find-links "$WHEELS" "$WHEELS"/*.whl \
      || echo "installing the wheels in $WHEELS failed: going on without them"
  fi
  # editable, no dependencies, no isolated build env (it would fetch setuptools), no index
  "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . \
    || echo "pip install failed: running from the working tree"
  # Every command below runs in the repository root, which python puts first on sys.path, so
  # `fastllama` is the working tree's folder; on the H200 image (setuptools 81) the editable
  # install's mapping of fastllama.kernels -> kernels/ then did not apply. Link it where the
  # installed package has it whenever that import fails.
  "$PY" -c "import fastllama.kernels" 2>/dev/null && return 0
  echo "fastllama.kernels not importable from the working tree: linking fastllama/kernels -> ../kernels"
  [ -e fastllama/kernels ] || ln -s ../kernels fastllama/kernels
  "$PY" -c "import fastllama.kernels"
}
if [ -z "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  # (a shell function: run here, not through `timeout`, which only runs programs)
  T0=$(date +%s)
  if install > "$OUT/install.log" 2>&1; then STATUS=ok; else STATUS="FAILED (see install.log)"; fi
  echo "| install | $STATUS | $(( $(date +%s) - T0 )) |" >> "$SUMMARY"
  tail -n 3 "$OUT/install.log"
fi
"$PY" -c "import fastllama, fastllama.kernels; print('fastllama', fastllama.__version__, 'from', fastllama.__file__)" | tee -a "$OUT/env.txt"

DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu-interpreter')")
export FASTLLAMA_RESULTS_DIR="$OUT/results/$DEVICE_NAME"
mkdir -p "$FASTLLAMA_RESULTS_DIR"
FL=("$PY" -m fastllama.cli)

# --- 2-4. the stages ------------------------------------------------------------------------
# pytest: the test suite on CUDA, the CPU suite's tests (every path a CPU-only CI cannot run: CUDA
#   graphs, the GPU tiles, compiled kernels). FASTLLAMA_AUTOTUNE=0: no autotuning per new test
#   shape; test_every_autotune_candidate_of_this_gpu forces every candidate tile in turn, and the
#   benchmarks autotune.
# bench-*: the benchmarks, --quick. Each script writes the rows it has when a time limit
#   interrupts it (SIGINT).
# pytest-matrix: the full shape matrix (`cuda_only`, ~1200 cases, each new shape a Triton JIT
#   compile), last, in the time left.
# Caps (seconds) add up to the default budget; GPU_CHECK_STAGES="bench-train bench-ops ..." runs
# only those stages, IN THAT ORDER (a short GPU slot measures what is still missing first).
run_stage() {
  case $1 in
    pytest) [ -n "${GPU_CHECK_SKIP_TESTS:-}" ] || stage pytest "${TESTS_CAP_S:-100}" env FASTLLAMA_AUTOTUNE=0 \
      "$PY" -m pytest -q -p no:cacheprovider tests -m "not cuda_only" --durations=25 \
      --junitxml="$OUT/pytest-junit.xml" -o junit_family=xunit2 ;;
    bench-train) stage bench-train "${TRAIN_CAP_S:-150}" "${FL[@]}" bench train --quick --profile --no-progress ;;
    bench-ops) stage bench-ops "${OPS_CAP_S:-90}" "${FL[@]}" bench ops --quick ;;
    bench-decode) stage bench-decode "${DECODE_CAP_S:-100}" "${FL[@]}" bench decode --quick ;;
    pytest-benchmark) stage pytest-benchmark 30 env FASTLLAMA_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider benchmarks \
      --benchmark-only --benchmark-json="$OUT/pytest-benchmark.json" ;;
    # device-independent (its results are committed from CPU runs): only when time is left
    bench-memory) stage bench-memory 30 "${FL[@]}" bench memory --no-progress ;;
    pytest-matrix) [ -n "${GPU_CHECK_SKIP_TESTS:-}" ] || stage pytest-matrix 600 env FASTLLAMA_AUTOTUNE=0 \
      "$PY" -m pytest -q -p no:cacheprovider tests -m cuda_only --durations=25 \
      --junitxml="$OUT/pytest-matrix-junit.xml" -o junit_family=xunit2 ;;
    *) echo "| $1 | unknown stage | 0 |" >> "$SUMMARY" ;;
  esac
}
ALL_STAGES="pytest bench-train bench-ops bench-decode pytest-benchmark bench-memory pytest-matrix"
SELECTED=${GPU_CHECK_STAGES:-$ALL_STAGES}
for name in $SELECTED; do
  run_stage "$name"
done
for name in $ALL_STAGES; do
  [[ " $SELECTED " == *" $name "* ]] || echo "| $name | not selected (GPU_CHECK_STAGES) | 0 |" >> "$SUMMARY"
done

# --- summary ------------------------------------------------------------------------------
{
  echo ""
  echo "total $(( $(date +%s) - START )) s (budget ${BUDGET} s)"
  echo ""
  for log in "$OUT/pytest.log" "$OUT/pytest-matrix.log"; do
    [ -e "$log" ] && echo "$(basename "$log"): $(grep -E "passed|failed|error" "$log" | tail -n 1)"
  done
  for md in "$FASTLLAMA_RESULTS_DIR"/*.md; do
    [ -e "$md" ] || continue
    echo ""
    cat "$md"
  done
} >> "$SUMMARY"
echo "=== done: $SUMMARY"
cat "$SUMMARY" | head -n 20
