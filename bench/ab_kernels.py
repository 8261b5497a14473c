"""A/B of CPU kernel builds in one process: the native forward and backward of two or more
builds of reft_ext._C, called in turns on the same tensors (one repeat of each build per
round), so drift of a shared machine falls on every build alike. For kernel changes whose
effect is below the run-to-run spread of bench_op.py.

    # build a variant (any commit or working tree) next to the installed one:
    git worktree add /tmp/base <commit>
    cmake -S /tmp/base -B /tmp/base/build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
          -DREFT_EXT_CUDA=OFF -Dpybind11_DIR=$(python -m pybind11 --cmakedir)
    cmake --build /tmp/base/build
    python bench/ab_kernels.py base=/tmp/base/build/_C*.so new=build/.../_C*.so

Arguments are name=path of each build's _C module; the installed reft_ext marshals the
arguments, so the builds must share its native signatures (a build whose described problem
has fewer fields, e.g. one from before banks, gets the fields it lists, in its order). The native calls alone are
timed (no autograd, no allocation): forward with the saved-rows copy and coefficients, as
loreft_ with grad does, and backward from them, at B=8 T=512 d=4096 r=8, P=14 (f7+l7), float32 and
bfloat16 h with float32 parameters, on 1 and 2 threads; "cold" repeats first stream
128 MiB through the caches.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from reft_ext.ops import _marshal  # noqa: E402


def load_build(name: str, path: str):
    """Imports a build of the _C module under its own package name."""
    matches = glob.glob(path)
    if len(matches) != 1:
        raise SystemExit(f"{name}={path}: expected one file, found {matches}")
    spec = importlib.util.spec_from_file_location(f"reft_ab_{name}._C", matches[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="+", help="name=path of a _C module (glob allowed)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--P", type=int, default=14)
    args = ap.parse_args(argv)
    builds = dict(b.split("=", 1) for b in args.builds)
    libs = {name: load_build(name, path) for name, path in builds.items()}
    B, T, d, r, P = 8, 512, 4096, 8, args.P
    gen = torch.Generator().manual_seed(0)
    evict = torch.randn(32 << 20, generator=gen)  # 128 MiB
    print(f"{common.cpu_model()}; torch {torch.__version__}; B={B} T={T} d={d} r={r} P={P}; "
          f"median ms of {args.reps} rounds")
    header = ["dtype", "threads", "call"] + list(libs)
    table = []
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(B, T, d, generator=gen).to(dtype)
        g = torch.randn(B, T, d, generator=gen).to(dtype)
        R = torch.linalg.qr(torch.randn(d, r, generator=gen))[0].T.contiguous()
        W, b = 0.1 * torch.randn(r, d, generator=gen), 0.1 * torch.randn(r, generator=gen)
        pos = common.positions(B, T, P, "cpu")
        saved = h.new_empty((B, P, d))
        coef = torch.empty((B, P, r))
        grads = [torch.empty(r, d), torch.empty(r, d), torch.empty(r)]
        for threads in (1, 2):
            torch.set_num_threads(threads)
            args_p = _marshal.problem(h, pos, R, W, b)
            problems = {name: tuple(getattr(args_p, f) for f in lib.PROBLEM_FIELDS)
                        for name, lib in libs.items()}
            times = {}
            names = list(libs)
            for rep in range(args.reps):
                # Each round starts with another build: the build that runs right after
                # another's "cold" call measured up to 7% slower, whichever it was.
                for name in names[rep % len(names):] + names[:rep % len(names)]:
                    lib = libs[name]
                    for cold in (False, True):
                        if cold:
                            evict.mul_(1.0)
                        t0 = time.perf_counter()
                        prob = problems[name]
                        lib.forward_cpu(prob, _marshal.rows(h), _marshal.rows(saved),
                                        coef.data_ptr())
                        t1 = time.perf_counter()
                        if cold:
                            evict.mul_(1.0)
                        t2 = time.perf_counter()
                        lib.backward_cpu(prob, _marshal.rows(g), _marshal.rows(saved), True,
                                         coef.data_ptr(), *(t.data_ptr() for t in grads),
                                         _marshal.NO_ROWS)
                        t3 = time.perf_counter()
                        suffix = " cold" if cold else ""
                        times.setdefault(("fwd" + suffix, name), []).append(t1 - t0)
                        times.setdefault(("bwd" + suffix, name), []).append(t3 - t2)
            for call in ("fwd", "fwd cold", "bwd", "bwd cold"):
                table.append([str(dtype).replace("torch.", ""), threads, call] +
                             [f"{statistics.median(times[(call, n)]) * 1e3:.3f}" for n in libs])
    print(common.markdown_table(header, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
