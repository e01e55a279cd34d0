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
#   GPU_CHECK_BUNDLE=FILE     also all of OUT in one archive FILE (.tar.gz), rewritten after every stage
#
# Through the device tool (8 files at most come back, none more than 2 folders below $OUT, so
# the results folder would not): bundle, and keep OUT itself outside $OUT:
#   GPU_CHECK_BUNDLE=$OUT/gc.tar.gz bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/summary.md $OUT/
# For a 15-minute device slot (a command may run 10 minutes; the machine's start counts too), with
# the Liger wheel fetched here first (pip download liger-kernel==0.8.5 --no-deps -d gpu_wheels):
#   FASTLLAMA_GIT_COMMIT=<hash> WHEELS=gpu_wheels GPU_CHECK_BUDGET_S=540 GPU_CHECK_BUNDLE=$OUT/gc.tar.gz \
#   GPU_CHECK_STAGES="pytest-candidates bench-attention bench-train bench-ops bench-decode pytest" \
#   bash benchmarks/gpu_check.sh /tmp/gc; cp /tmp/gc/summary.md $OUT/
#
# Python packages the suite needs but the machine lacks (transformers, pytest ...) can't be
# downloaded here: put their wheels in a folder and set WHEELS=/that/folder (installed with
# --no-index). Each stage has a time limit, min(its cap, what is left of the 8-minute budget
# (GPU_CHECK_BUDGET_S, default 470 s)): the caps add up to more, so the stages late in the order
# get what is left; a stage that runs out is marked TIMEOUT and the next one starts. GPU_CHECK_STAGES (names from
# summary.md: pytest-candidates pytest bench-train bench-attention bench-ops bench-decode
# pytest-benchmark bench-memory pytest-matrix)
# runs a subset, in the order given. Each stage's limit leaves GPU_CHECK_RESERVE_S (default 20 s)
# of the budget unspent: a stage that ignores its SIGINT is killed 15 s later, and the summary
# must still be written inside the budget.
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
RESERVE=${GPU_CHECK_RESERVE_S:-20}

bundle() {  # GPU_CHECK_BUNDLE: OUT as one archive, made anew after each stage (a cut-off run keeps it)
  [ -n "${GPU_CHECK_BUNDLE:-}" ] || return 0
  tar -czf "$GPU_CHECK_BUNDLE.tmp" -C "$(dirname "$OUT")" "$(basename "$OUT")" \
    && mv -f "$GPU_CHECK_BUNDLE.tmp" "$GPU_CHECK_BUNDLE"
}

# stage NAME CAP_SECONDS COMMAND...: runs with a limit of min(CAP, time left - RESERVE), logs to OUT/NAME.log.
stage() {
  local name=$1 cap=$2; shift 2
  local limit; limit=$(( $(left) - RESERVE ))
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
  bundle
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
      || { echo "installing the wheels in $WHEELS failed: going on without them"; WHEELS_FAILED=1; }
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
  WHEELS_FAILED=
  # (not in a subshell: WHEELS_FAILED must reach this shell)
  if install > "$OUT/install.log" 2>&1; then STATUS=ok; else STATUS="FAILED (see install.log)"; fi
  [ -n "$WHEELS_FAILED" ] && STATUS="$STATUS (wheels in $WHEELS FAILED: see install.log)"
  echo "| install | $STATUS | $(( $(date +%s) - T0 )) |" >> "$SUMMARY"
  tail -n 3 "$OUT/install.log"
fi
"$PY" -c "import fastllama, fastllama.kernels; print('fastllama', fastllama.__version__, 'from', fastllama.__file__)" | tee -a "$OUT/env.txt"
# (env.txt's package list was taken before the install: what the wheels added)
"$PY" -c "
import importlib
for name in ('liger_kernel', 'flash_attn'):
    try:
        m = importlib.import_module(name)
        print(f'after install: {name:18s} {getattr(m, \"__version__\", \"installed\")}')
    except Exception as e:  # noqa: BLE001
        print(f'after install: {name:18s} MISSING ({type(e).__name__})')
" | tee -a "$OUT/env.txt"

DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu-interpreter')")
export FASTLLAMA_RESULTS_DIR="$OUT/results/$DEVICE_NAME"
mkdir -p "$FASTLLAMA_RESULTS_DIR"
FL=("$PY" -m fastllama.cli)

# --- 2-4. the stages ------------------------------------------------------------------------
# pytest: the test suite on CUDA, the CPU suite's tests (every path a CPU-only CI cannot run: CUDA
#   graphs, the GPU tiles, compiled kernels), the files whose tests need a GPU most first (the
#   parity of every autotune candidate tile, CUDA graphs, the decode kernel, torch.compile), and
#   without the build report's tests (compiling for GPUs on the CPU: CPU CI runs them).
#   FASTLLAMA_AUTOTUNE=0: no autotuning per new test shape; test_every_autotune_candidate_of_this_gpu
#   forces every candidate tile in turn, and the benchmarks autotune.
# bench-*: the benchmarks, --quick. Each script writes the rows it has when a time limit
#   interrupts it (SIGINT). bench-train runs the configurations the targets name (TRAIN_CONFIGS;
#   hf-compile, 1.00x hf-sdpa on the H200, compiles for minutes), bench-attention the attention
#   script alone (it autotunes every kernel per head dim: with the other op scripts after it, it
#   left them no time), bench-ops the other op scripts.
# pytest-matrix: the full shape matrix (`cuda_only`, ~1200 cases, each new shape a Triton JIT
#   compile), last, in the time left.
# The caps (seconds) add up to more than the budget: the stages run in order until it is spent
# (the benchmarks first, then the suite); GPU_CHECK_STAGES="bench-train bench-ops ..." runs only
# those stages, IN THAT ORDER (a short GPU slot measures what is still missing first).
run_stage() {
  case $1 in
    pytest) skipped_tests pytest || stage pytest "${TESTS_CAP_S:-100}" env FASTLLAMA_AUTOTUNE=0 \
      "$PY" -m pytest -q -p no:cacheprovider "${TEST_FILES[@]}" -m "not cuda_only" --durations=25 \
      -k "$NOT_CANDIDATES" --junitxml="$OUT/pytest-junit.xml" -o junit_family=xunit2 ;;
    # every autotune candidate tile of this GPU, forced in turn, against the parity rule (the
    # autotuner may pick any; only a GPU runs them): ~60 compiles, which the attention benchmark's
    # autotuning then finds in Triton's cache
    pytest-candidates) skipped_tests pytest-candidates || stage pytest-candidates "${CANDIDATES_CAP_S:-90}" \
      "$PY" -m pytest -q -p no:cacheprovider tests/test_flash_attention.py -k "$CANDIDATES" --durations=5 \
      --junitxml="$OUT/pytest-candidates-junit.xml" -o junit_family=xunit2 ;;
    bench-train) stage bench-train "${TRAIN_CAP_S:-150}" "${FL[@]}" bench train --quick --profile --no-progress \
      --configs ${TRAIN_CONFIGS:-hf-sdpa hf+fastllama hf+fastllama-atomic hf+fastllama-recompute hf-liger} ;;
    bench-attention) stage bench-attention "${ATTENTION_CAP_S:-110}" "${FL[@]}" bench ops --quick --only bench_attention ;;
    # (cross-entropy last: its 32k-token rows, the chunked schedule, are the ones a tight limit cuts)
    bench-ops) stage bench-ops "${OPS_CAP_S:-75}" "${FL[@]}" bench ops --quick \
      --only bench_norm_rope_swiglu bench_moe bench_latent_decode bench_cross_entropy ;;
    bench-decode) stage bench-decode "${DECODE_CAP_S:-90}" "${FL[@]}" bench decode --quick ;;
    pytest-benchmark) stage pytest-benchmark 30 env FASTLLAMA_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider benchmarks \
      --benchmark-only --benchmark-json="$OUT/pytest-benchmark.json" ;;
    # device-independent (its results are committed from CPU runs): only when time is left
    bench-memory) stage bench-memory 30 "${FL[@]}" bench memory --no-progress ;;
    pytest-matrix) skipped_tests pytest-matrix || stage pytest-matrix 600 env FASTLLAMA_AUTOTUNE=0 \
      "$PY" -m pytest -q -p no:cacheprovider tests -m cuda_only --durations=25 \
      --junitxml="$OUT/pytest-matrix-junit.xml" -o junit_family=xunit2 ;;
    *) echo "| $1 | unknown stage | 0 |" >> "$SUMMARY" ;;
  esac
}
skipped_tests() {  # GPU_CHECK_SKIP_TESTS=1: the test stage is not run, and the summary says so
  [ -n "${GPU_CHECK_SKIP_TESTS:-}" ] || return 1
  echo "| $1 | skipped (GPU_CHECK_SKIP_TESTS) | 0 |" >> "$SUMMARY"
}
TEST_FIRST=(tests/test_flash_attention.py tests/test_generate.py tests/test_fused_decode.py tests/test_decode_attention.py
  tests/test_compile.py)
TEST_FILES=("${TEST_FIRST[@]}")
for f in tests/test_*.py; do
  [[ " ${TEST_FIRST[*]} tests/test_build_report.py " == *" $f "* ]] || TEST_FILES+=("$f")
done
ALL_STAGES="pytest-candidates bench-attention bench-train bench-ops bench-decode pytest pytest-benchmark bench-memory
pytest-matrix"
SELECTED=$(echo ${GPU_CHECK_STAGES:-$ALL_STAGES})  # (one line)
CANDIDATES=test_every_autotune_candidate_of_this_gpu
NOT_CANDIDATES=""  # the pytest stage runs the candidates unless their own stage does
[[ " $SELECTED " == *" pytest-candidates "* ]] && NOT_CANDIDATES="not $CANDIDATES"
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
bundle
echo "=== done: $SUMMARY"
cat "$SUMMARY" | head -n 20
