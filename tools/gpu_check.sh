#!/usr/bin/env bash
# GPU check (issue 7): on a machine with one GPU and no internet, from the project root:
#     bash ../shared/tools/gpu_wheels.sh     # beforehand, on a machine with internet: fills .whl/
#     bash tools/gpu_check.sh                # on the GPU machine; about 6-8 minutes on one H100
# Installs the wheels in .whl/ into a temporary site dir, then runs, each under its own time
# limit and whatever the others do: nvidia-smi, the kernel tests on the GPU, the anchor-mix
# backend, attention and model benchmarks (each writes its section of docs/benchmarks.md).
# Logs go to $GPU_CHECK_LOGS (default: a temporary folder); docs/benchmarks.md and the logs are
# copied to $OUT when it is set. Exits non-zero when any step failed; summary.txt lists them.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
logs=${GPU_CHECK_LOGS:-$(mktemp -d)}
mkdir -p "$logs"
summary="$logs/summary.txt"
: > "$summary"
failed=0

# run_step NAME SECONDS COMMAND...: run with a time limit, log its output, record the outcome;
# returns the command's exit status
run_step() {
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=5 "$limit" "$@" > "$logs/$name.log" 2>&1
  rc=$?
  tail -n 25 "$logs/$name.log"
  if [ "$rc" -eq 0 ]; then
    echo "ok      $name $(( $(date +%s) - start ))s" | tee -a "$summary"
  else
    failed=$((failed + 1))
    echo "FAILED  $name rc=$rc$([ "$rc" -eq 124 ] && echo ' (timed out)') $(( $(date +%s) - start ))s, see $name.log" \
      | tee -a "$summary"
  fi
  return "$rc"
}

# step budgets add up to 475 s, under the 8 minutes the check may take on one H100
export PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" > /dev/null; then
  site=$(mktemp -d)
  run_step install-wheels 45 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl && export PYTHONPATH="$site:$PWD"
else
  echo "no .whl/*.whl: run 'bash ../shared/tools/gpu_wheels.sh' on a machine with internet first" | tee -a "$summary"
fi

run_step nvidia-smi 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
# the slow tests (torch.compile, sm_90 compilation without a GPU) run in CI; the anchor-mix
# benchmark times torch.compile here. Kernels that fail their tests are kept out of the numbers.
mix_backend=auto
if ! run_step kernel-tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_kernels.py; then
  mix_backend=torch
  echo "kernel tests failed: the attention and model benchmarks run the PyTorch anchor-mix path" | tee -a "$summary"
fi
run_step anchor-mix-backends 75 "$PYTHON" tools/benchmark.py anchor-mix --device cuda
run_step attention 65 "$PYTHON" tools/benchmark.py attention --device cuda --backend "$mix_backend"
run_step model-224 75 "$PYTHON" tools/benchmark.py model --device cuda --backend "$mix_backend" \
  --resolutions 224 --backbone-resolution 0 --section model-224-cuda
run_step model-384 45 "$PYTHON" tools/benchmark.py model --device cuda --backend "$mix_backend" \
  --resolutions 384 --backbone-resolution 0 --section model-384-cuda
run_step model-1024 30 "$PYTHON" tools/benchmark.py model --device cuda --backend "$mix_backend" \
  --resolutions "" --backbone-resolution 1024 --section model-1024-cuda

echo "== summary ($failed failed)"
cat "$summary"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/gpu_check_logs"
  cp "$logs"/*.log "$summary" "$OUT/gpu_check_logs/"
  [ -f docs/benchmarks.md ] && cp docs/benchmarks.md "$OUT/"
fi
exit $((failed > 0))
