"""The training-form backward of reft_ext's ops: how h's gradient is produced, three ways,
interleaved in one run (common.measure_interleaved).

  sparse    the shipped rule: h's gradient is g plus a sparse row correction, summed by
            autograd, in place into g when autograd alone holds it (ops/_grad_reuse.py)
  dense     the same with REFT_EXT_SPARSE_GRAD=0 (_grad_reuse.SPARSE_GRAD = False): a dense
            (B, T, d) copy of g with dx at the edited rows
  write-g   the rule of earlier releases, kept here only to measure it: dx written into g
            itself whenever reference counts looked owned (_cpu.bwd_cpu_into on g). It was
            wrong when a hook or the caller held g (issue: gradients exact in every mode),
            so this is the cost of being exact, not an option of the library.

Modes, as in bench_op: "fwd+bwd" with an incoming gradient that autograd alone holds
(bench_op.HandOver, what training does) and "bwd" alone; also bench_op's eager references
for scale. CPU only (write-g calls the CPU kernel).

    python bench/bench_grad_reuse.py            # B=8 T=512 d=4096 r=8, P=14, fp32 + bf16
    python bench/bench_grad_reuse.py --P 512    # every token edited
    python bench/bench_grad_reuse.py --quick
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_op  # noqa: E402
import common  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext.ops import _cpu, _grad_reuse, autograd  # noqa: E402
from reft_ext.ops.reference import loreft_reference, loreft_reference_  # noqa: E402

_real_backward = autograd._backward


def _write_g_backward(ctx, grad, positions, x, x_gathered, R, W, b, index, coef=None,
                      sparse_ok=True):
    """Earlier releases' owned path: dx written into g's rows by the in-place CPU kernel."""
    need = ctx.needs_input_grad
    if (grad.device.type != "cpu" or not grad.is_contiguous() or grad.dtype != x.dtype
            or not need[0] or torch.is_grad_enabled()):
        return _real_backward(ctx, grad, positions, x, x_gathered, R, W, b, index, coef,
                              sparse_ok)
    dR, dW, db = _cpu.bwd_cpu_into(grad, positions, x, x_gathered, R, W, b, coef, index)
    two_h = len(need) == 7
    return (grad, *((None,) if two_h else ()), None, dR, dW, db, None)


def _run_with(strategy):
    """Wraps a timed callable so that it runs with the strategy's backward rule, then
    restores the shipped one."""
    def wrap(timed):
        def call(state):
            _grad_reuse.SPARSE_GRAD = strategy != "dense"
            autograd._backward = (_write_g_backward if strategy == "write-g"
                                    else _real_backward)
            try:
                return timed(state)
            finally:
                _grad_reuse.SPARSE_GRAD = True
                autograd._backward = _real_backward
        return call
    return wrap


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="8 repeats, T=128")
    ap.add_argument("--shape", default="8,512,4096,8", help="B,T,d,r")
    ap.add_argument("--P", type=int, default=14)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 8 if args.quick else args.reps
    B, T, d, r = (int(x) for x in args.shape.split(","))
    if args.quick:
        T = min(T, 128)
    env = common.environment("cpu")
    env["device"] = f"{common.cpu_model()}, {args.threads} threads"
    gen = torch.Generator().manual_seed(0)
    rows, table = [], []
    for dtype in (torch.float32, torch.bfloat16):
        case = bench_op.make_case(B, T, d, r, args.P, dtype, "cpu", gen)
        providers = {}
        for op_name, fn in (("loreft_", reft_ext.loreft_), ("loreft", reft_ext.loreft)):
            for strategy in ("sparse", "dense", "write-g"):
                providers[f"{op_name} {strategy}"] = (fn, strategy)
        providers["eager_ (reference)"] = (loreft_reference_, None)
        providers["eager (reference)"] = (loreft_reference, None)
        for mode in ("fwd+bwd", "bwd"):
            cases = {}
            for name, (fn, strategy) in providers.items():
                timed, setup = bench_op.mode_cases(fn, case)[mode]
                if strategy is not None:   # (the forward is the same for all three)
                    timed = _run_with(strategy)(timed)
                cases[name] = (timed, setup)
            res = common.measure_interleaved(cases, reps=reps, device="cpu")
            shape = f"B={B} T={T} d={d} r={r} P={args.P}"
            dt = str(dtype).replace("torch.", "")
            for name, s in res.items():
                rows.append(common.ms_row(env, s, op="loreft", provider=name, mode=mode,
                                          shape=shape, dtype=dt))
            for op_name in ("loreft_", "loreft"):
                base = res[f"{op_name} write-g"]["median"]
                for strategy in ("sparse", "dense", "write-g"):
                    s = res[f"{op_name} {strategy}"]
                    table.append([dt, mode, op_name, strategy, common.fmt_ms(s),
                                  f"{s['median'] / base:.2f}"])
                ref = res["eager_ (reference)" if op_name == "loreft_" else "eager (reference)"]
                table.append([dt, mode, op_name, "eager reference", common.fmt_ms(ref),
                              f"{ref['median'] / base:.2f}"])
            print(f"done {dt} {mode}", file=sys.stderr)
    stem = f"bench_grad_reuse-cpu-P{args.P}"
    path = common.write_rows(stem, rows)
    header = ["dtype", "mode", "op", "h's gradient", "ms (p20–p80)", "× write-g"]
    md = (f"{common.machine_line(env)} Shape B={B} T={T} d={d} r={r} P={args.P}, "
          "fp32 parameters, "
          f"median of {reps} interleaved repeats; incoming gradient held by autograd alone."
          "\n\n" + common.markdown_table(header, table) + "\n")
    (common.RESULTS / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
