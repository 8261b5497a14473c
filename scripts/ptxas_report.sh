#!/usr/bin/env bash
# Regenerates bench/results/ptxas_sm80.txt and ptxas_sm90.txt, the ptxas resource report
# (registers, stack, spills, static shared memory) of every CUDA kernel instantiation, and
# fails when any kernel spills, exceeds the registers its __launch_bounds__ allow, or uses
# more than 48 KiB of static shared memory. No GPU needed: a register limit or a spill is
# the one kernel property the CPU emulation (scripts/cuemu.sh) cannot see.
#
#   bash scripts/ptxas_report.sh [output dir, default bench/results]
#
# Needs nvcc (CUDACXX, PATH or /usr/local/cuda) and c++filt. Uses the build's own device flags
# (CMakeLists.txt) plus -Xptxas=-v.
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir="${1:-bench/results}"
nvcc="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
jobs="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
flags=(-DREFT_EXT_WITH_CUDA -Icsrc -O3 -DNDEBUG --expt-relaxed-constexpr -std=c++17 -Xptxas=-v)
version=$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\), V\([0-9.]*\).*/\2/p')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$out_dir"
status=0
for arch in 80 90; do
  # One nvcc per source file, $jobs at a time; each writes its own log.
  for src in csrc/cuda/*.cu; do
    echo "$src"
  done | xargs -P "$jobs" -I{} sh -c \
    '"$0" "$@" -c {} -o /dev/null > "'"$tmp"'/$(basename {}).'"$arch"'.log" 2>&1 ||
     { cat "'"$tmp"'/$(basename {}).'"$arch"'.log"; exit 255; }' \
    "$nvcc" "${flags[@]}" "--generate-code=arch=compute_$arch,code=[sm_$arch]"
  python3 - "$tmp" "$arch" "$version" "$out_dir/ptxas_sm$arch.txt" "${flags[*]}" <<'PY' || status=1
import re, subprocess, sys
from pathlib import Path

tmp, arch, version, out, flags = sys.argv[1:]
# __launch_bounds__ of each kernel (csrc/cuda): the row kernels ask for 2 blocks of 256
# threads per SM, which caps them at 128 registers; the others at 255.
CAPS = {"forward_kernel": 128, "backward_rows_kernel": 128}
lines = [
    f"# ptxas resource usage, sm_{arch}, every kernel instantiation (nvcc {version})",
    f"# command: nvcc {flags.replace('-Xptxas=-v', '').strip()} "
    f"--generate-code=arch=compute_{arch},code=[sm_{arch}] -Xptxas=-v -c <file>  "
    "(the build's flags plus -Xptxas=-v); written by scripts/ptxas_report.sh",
    "# columns: registers/thread, stack frame bytes, spill store/load bytes, static smem bytes",
    "# row kernels: __launch_bounds__(256, 2) caps them at 128 registers (2 blocks/SM).",
]
problems = []
ORDER = ["loreft_f32", "loreft_f16", "loreft_bf16", "loreft_f64"]
logs = sorted(Path(tmp).glob(f"*.cu.{arch}.log"),
              key=lambda p: (ORDER.index(p.name.split(".")[0])
                             if p.name.split(".")[0] in ORDER else len(ORDER), p.name))
count = spilled = 0
for log in logs:
    text = log.read_text()
    rows, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = {"mangled": m.group(1)}
            rows.append(current)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
            continue
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?,", line)
        if m and current is not None:
            current["regs"] = int(m[1])
            sm = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(sm[1]) if sm else 0
    if not rows:
        continue
    names = subprocess.run(["c++filt"], input="\n".join(r["mangled"] for r in rows),
                           capture_output=True, text=True, check=True).stdout.splitlines()
    src = "csrc/cuda/" + log.name.rsplit(".", 2)[0]
    lines += ["", f"## {src}"]
    for r, name in sorted(zip(rows, names), key=lambda x: x[1]):
        name = name.replace("reft::cuda::", "").replace("(anonymous namespace)::", "")
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"\(.*\)$", "", name)
        count += 1
        spilled += r.get("spill_st", 0) + r.get("spill_ld", 0)
        r.setdefault("stack", 0); r.setdefault("spill_st", 0); r.setdefault("spill_ld", 0)
        lines.append(f"{name:<55} regs={r['regs']:>4} stack={r['stack']:>4} "
                     f"spill_st={r['spill_st']:>4} spill_ld={r['spill_ld']:>4} smem={r['smem']:>6}")
        cap = next((c for k, c in CAPS.items() if name.startswith(k + "<")), 255)
        if r["spill_st"] or r["spill_ld"]:
            problems.append(f"sm_{arch} {name}: spills ({r['spill_st']} B stored, "
                            f"{r['spill_ld']} B loaded)")
        if r["regs"] > cap:
            problems.append(f"sm_{arch} {name}: {r['regs']} registers > {cap}")
        if r["smem"] > 48 * 1024:
            problems.append(f"sm_{arch} {name}: {r['smem']} bytes static shared memory > 48 KiB")
lines += ["", f"# {count} kernels, total spill bytes: {spilled}"]
Path(out).write_text("\n".join(lines) + "\n")
print(f"wrote {out}")
for p in problems:
    print("ptxas_report: " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY
done
exit $status
