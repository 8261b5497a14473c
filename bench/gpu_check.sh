#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a machine with a GPU (issue 3), in a few minutes:
#   1. build for this GPU only (CUDAARCHS, default: the first GPU's compute capability)
#      and install into a throwaway venv that sees the system torch (no network needed);
#   2. the CUDA tests (every case marked `cuda`: tests/test_cuda.py and the cuda half of the
#      shared device matrix);
#   3. compute-sanitizer memcheck, racecheck, synccheck and initcheck on a small case;
#   4. the GPU bench (bench/bench_cuda.py).
# Logs and results go to bench/results/ and, when set, to $OUT. Each step has a time
# limit, so the script always ends with a summary; it exits nonzero if any step failed.
#
#   bash bench/gpu_check.sh            # on an H200: ~6-8 minutes
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RES="$ROOT/bench/results"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
: > "$LOG"
PY_SYS=${PYTHON:-python3}
VENV=${REFT_GPU_VENV:-/tmp/reft-gpu-venv}
declare -a SUMMARY=()
FAILED=0

say() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME LIMIT_SECONDS COMMAND...: runs it, logs it, records pass/fail + time
  local name=$1 limit=$2
  shift 2
  say ""
  say "=== $name (limit ${limit}s) ==="
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local dt=$((SECONDS - t0))
  if [ "$rc" -eq 0 ]; then SUMMARY+=("PASS  $name (${dt}s)")
  else SUMMARY+=("FAIL  $name (rc=$rc, ${dt}s)"); FAILED=1; fi
  return "$rc"
}
finish() {
  say ""
  say "=== summary ==="
  for line in "${SUMMARY[@]}"; do say "$line"; done
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$LOG" "$OUT/" 2>/dev/null
    cp "$RES"/cuda.* "$RES"/sanitizer_*.txt "$RES"/pytest_cuda.xml "$OUT/" 2>/dev/null
  fi
  exit "$FAILED"
}

# --- 0. machine -------------------------------------------------------------------------
step "machine" 60 bash -c "nvidia-smi; nvcc --version; $PY_SYS -c 'import torch, sys; \
print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, \"available\", torch.cuda.is_available()); \
assert torch.cuda.is_available(), \"torch cannot see a GPU\"'" || finish

if [ -z "${CUDAARCHS:-}" ]; then
  CUDAARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')
fi
export CUDAARCHS REFT_EXT_CUDA=ON
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
say "building for CUDAARCHS=$CUDAARCHS with $CMAKE_BUILD_PARALLEL_LEVEL jobs"

# --- 1. build + install -----------------------------------------------------------------
# A venv with the system site-packages: torch, pytest, the build backend come from the
# machine (it may have no network); the project is built without isolation, no deps.
install() {
  rm -rf "$VENV" && "$PY_SYS" -m venv --system-site-packages "$VENV" || return 1
  "$VENV/bin/python" -m pip install --no-index --no-build-isolation --no-deps \
    -Cbuild-dir=/tmp/reft-gpu-build "$ROOT" && return 0
  # No scikit-build-core here: plain CMake, then the package staged on PYTHONPATH.
  echo "pip install failed; falling back to a plain CMake build"
  local stage=/tmp/reft-gpu-stage
  cmake -S "$ROOT" -B /tmp/reft-gpu-cmake -G Ninja -DREFT_EXT_CUDA=ON \
    -DPython_EXECUTABLE="$VENV/bin/python" \
    -Dpybind11_DIR="$("$VENV/bin/python" -m pybind11 --cmakedir)" &&
    cmake --build /tmp/reft-gpu-cmake || return 1
  rm -rf "$stage" && mkdir -p "$stage" && cp -r "$ROOT/python/reft_ext" "$stage/" &&
    cp /tmp/reft-gpu-cmake/_C*.so "$stage/reft_ext/" || return 1
  echo "$stage" > "$VENV/lib/$("$VENV/bin/python" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')/site-packages/reft_stage.pth"
}
step "build + install" 300 bash -c "$(declare -f install); VENV='$VENV' ROOT='$ROOT' \
PY_SYS='$PY_SYS' install" || finish
PY="$VENV/bin/python"
step "import" 60 bash -c "cd /tmp && '$PY' -c 'import json, reft_ext; \
print(reft_ext.__file__); i = reft_ext.build_info(); print(json.dumps(i, indent=1)); \
assert i[\"cuda_kernels\"] and i[\"cuda_devices\"], \"CUDA kernels not usable\"'" || finish

# --- 2. CUDA tests ----------------------------------------------------------------------
cd "$ROOT"
step "pytest -m cuda" 300 "$PY" -m pytest -q -m cuda -p no:cacheprovider \
  --junitxml="$RES/pytest_cuda.xml" tests/test_cuda.py tests/test_op.py \
  tests/test_validation.py tests/test_compile.py tests/test_bank.py \
  tests/test_autograd_modes.py

# --- 3. compute-sanitizer ---------------------------------------------------------------
SAN=$(command -v compute-sanitizer || true)
for d in "$(dirname "$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)")" \
         /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$d/compute-sanitizer" ] && SAN="$d/compute-sanitizer"
done
if [ -z "$SAN" ]; then
  SUMMARY+=("FAIL  compute-sanitizer not found")
  FAILED=1
else
  for tool in memcheck racecheck synccheck initcheck; do
    step "compute-sanitizer $tool" 100 bash -c "'$SAN' --tool $tool --error-exitcode 1 \
--print-limit 20 '$PY' bench/cuda_sanitize_case.py > '$RES/sanitizer_$tool.txt' 2>&1; \
rc=\$?; tail -n 25 '$RES/sanitizer_$tool.txt'; exit \$rc"
  done
fi

# --- 4. bench ---------------------------------------------------------------------------
step "bench_cuda.py" 240 "$PY" bench/bench_cuda.py

finish
