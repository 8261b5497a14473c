#!/usr/bin/env bash
# Builds reft_ext wheels: a CPU-only wheel (distribution "reft_ext") and/or a CUDA wheel
# for one CUDA major (distribution "reft_ext_cu12" / "reft_ext_cu13"); all of them install
# the same import package `reft_ext`. See README "Wheels" for why (PyPI refuses +cuXY tags).
#
#   scripts/build_wheels.sh --cpu                    # CPU-only wheel
#   scripts/build_wheels.sh --cuda auto              # CUDA wheel for the nvcc on PATH
#   scripts/build_wheels.sh --cuda 12.8 --cpu        # /usr/local/cuda-12.8, plus CPU wheel
#   options: --out DIR (default dist/), --archs "80-real;90-real" (override the defaults)
#
# The architecture list for each CUDA version lives in ONE place, cmake/cuda_archs.cmake,
# which this script does not duplicate. A CUDA build uses REFT_EXT_CUDA=ON, so a missing or
# broken toolkit, or an architecture that toolkit cannot compile, fails the build loudly;
# scripts/check_wheel.py then verifies the wheel really holds those architectures.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
out="$here/dist"
want_cpu=0
cuda=""
archs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) want_cpu=1 ;;
    --cuda) cuda="${2:?--cuda needs a version (12.x, 13.x) or auto}"; shift ;;
    --out) out="${2:?--out needs a directory}"; shift ;;
    --archs) archs="${2:?--archs needs a list}"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "build_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$want_cpu" = 0 ] && [ -z "$cuda" ]; then
  echo "build_wheels.sh: nothing to build: pass --cpu and/or --cuda VERSION|auto" >&2
  exit 2
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

find_nvcc() {  # prints the nvcc for the requested version, or fails
  local v="$1" nvcc
  if [ "$v" = auto ]; then
    nvcc=${CUDACXX:-$(command -v nvcc || true)}
    [ -n "$nvcc" ] || { echo "build_wheels.sh: --cuda auto but no nvcc on PATH" >&2; return 1; }
  else
    for nvcc in "/usr/local/cuda-$v/bin/nvcc" "${CUDACXX:-}" "$(command -v nvcc || true)"; do
      [ -n "$nvcc" ] && [ -x "$nvcc" ] && "$nvcc" --version | grep -q "release $v" && break
      nvcc=""
    done
    [ -n "$nvcc" ] || { echo "build_wheels.sh: CUDA $v requested but no nvcc of that release" \
      "was found (looked in /usr/local/cuda-$v, \$CUDACXX, PATH)" >&2; return 1; }
  fi
  echo "$nvcc"
}

# Builds one wheel from a copy of the tree whose distribution name is $1.
build_one() {
  local dist_name="$1" mode="$2" nvcc="${3:-}" src
  src=$(mktemp -d)
  trap 'rm -rf "$src"' RETURN
  # A clean copy: no build tree, no earlier wheels, no compiled module in the sources.
  tar -C "$here" --exclude=./build --exclude=./dist --exclude=./.git --exclude='./.venv*' \
      --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
  sed -i "s/^name = \"reft_ext\"/name = \"$dist_name\"/" "$src/pyproject.toml"
  local start=$(date +%s)
  local args=(-Ccmake.define.REFT_EXT_CUDA="$mode")
  [ -n "$archs" ] && args+=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$archs")
  if [ -n "$nvcc" ]; then
    CUDACXX="$nvcc" python -m pip wheel --no-deps -w "$out" "${args[@]}" "$src"
  else
    python -m pip wheel --no-deps -w "$out" "${args[@]}" "$src"
  fi
  echo "build_wheels.sh: built $dist_name ($mode) in $(( $(date +%s) - start )) s"
}

if [ -n "$cuda" ]; then
  nvcc=$(find_nvcc "$cuda")
  major=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  build_one "reft_ext_cu$major" ON "$nvcc"
fi
if [ "$want_cpu" = 1 ]; then
  build_one reft_ext OFF
fi
ls -l "$out"/*.whl
