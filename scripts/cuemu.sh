#!/usr/bin/env bash
# Builds the real CUDA kernels (csrc/cuda) against the CPU emulation (tests/cuemu) and runs
# their tests (tests/test_cuda_emu.py) with it: no GPU needed.
#
#   bash scripts/cuemu.sh plain|asan|tsan [pytest arguments...]
#
#   plain  -O2
#   asan   AddressSanitizer + UndefinedBehaviorSanitizer (-O1, abort on the first report)
#   tsan   ThreadSanitizer (-O1, abort on the first report)
#
# The module goes to build/cuemu-<mode> (tests/test_cuda_emu.py looks in build/cuemu-plain
# unless REFT_CUEMU_DIR says otherwise); CUEMU_BUILD_ONLY=1 builds without running. Run it in the venv reft_ext is installed in (the
# tests take their float64 reference and argument marshalling from it); it needs pybind11,
# CMake, ninja and the CUDA headers (nvcc on PATH, or CUDAToolkit_ROOT).
#
# The sanitizer runtime is preloaded into Python (LD_PRELOAD: it must come first, and the
# interpreter is not built with it), with libstdc++ (ASan intercepts C++ throws only when
# libstdc++ is there at start-up, and torch throws while importing). The interpreter drops
# LD_PRELOAD from its environment at once, so that its children (an editable install's
# rebuild, compilers) run without the runtime: cmake hangs under a preloaded TSan.
# --capture=sys: pytest leaves file descriptor 2 alone, so a sanitizer's or the emulation's
# report (written just before it aborts the process) reaches the log. reft_ext is imported
# before pytest starts capturing: an editable install rebuilds on import, and its build
# subprocess needs a real stderr.
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# OMP_NUM_THREADS=1 under TSan: torch's OpenMP runtime is not built for TSan, and its
# worker threads (the tests' reference computations) made the process abort after a few
# tests; the emulated GPU threads are the ones TSan is here for.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:?usage: scripts/cuemu.sh plain|asan|tsan [pytest args...]}"
shift
case "$mode" in
  plain) sanitize=none ;;
  asan) sanitize=address ;;
  tsan) sanitize=thread ;;
  *) echo "unknown mode '$mode' (plain, asan or tsan)" >&2; exit 2 ;;
esac

build="build/cuemu-$mode"
python=$(command -v python)
cmake -S tests/cuemu -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=None \
  -DCUEMU_SANITIZE="$sanitize" -DPython_EXECUTABLE="$python" \
  -Dpybind11_DIR="$("$python" -m pybind11 --cmakedir)" >/dev/null
start=$(date +%s)
cmake --build "$build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
echo "cuemu[$mode]: build took $(( $(date +%s) - start )) s"
[ -n "${CUEMU_BUILD_ONLY:-}" ] && exit 0

preload=()
case "$mode" in
  asan)
    preload=(env "LD_PRELOAD=$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
             "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1"
             "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1") ;;
  tsan)
    preload=(env "LD_PRELOAD=$(gcc -print-file-name=libtsan.so) $(gcc -print-file-name=libstdc++.so)"
             "TSAN_OPTIONS=halt_on_error=1:abort_on_error=1:report_signal_unsafe=0"
             OMP_NUM_THREADS=1) ;;
esac

start=$(date +%s)
REFT_CUEMU_DIR="$build" REFT_CUEMU_REQUIRE=1 "${preload[@]}" \
  "$python" -c 'import os, sys; os.environ.pop("LD_PRELOAD", None); import reft_ext, pytest
sys.exit(pytest.main(sys.argv[1:]))' -q --capture=sys -p no:cacheprovider tests/test_cuda_emu.py "$@"
echo "cuemu[$mode]: tests took $(( $(date +%s) - start )) s"
