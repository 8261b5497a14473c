"""Intervention banks on the CPU: what untied interventions and a bank of N entries cost,
against the tied op on the same rows, in one interleaved run (common.measure_interleaved).

Providers, all on the same (B, P) edited rows of h (fp32 parameters, as in training):
  tied            loreft_ with one (R, W, b): today's op, N = 1, no index
  untied (bank)   loreft_ with R, W (2, r, d), b (2, r) and an index: the first half of
                  each row's slots uses entry 0, the second half entry 1 (patch(tied=False))
  untied (2 calls) the same edit as two calls of the plain op, one per half of the slots
                  (what an untied layer costs without a bank: pyvene's two interventions)
  bank N=8        loreft_ with 8 entries, slot j of every row using entry j % 8, so that
                  neighbouring slots always differ (the kernels group rows by entry)

Modes as in bench_op: "fwd" (in place, no autograd), "bwd" (the backward of a training
step, incoming gradient owned by autograd), "fwd+bwd".

    python bench/bench_bank.py              # B=8 T=512 d=4096 r=8, P=14 (f7+l7) and 512 (all)
    python bench/bench_bank.py --quick
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

MODES = ["fwd", "bwd", "fwd+bwd"]


def bank_params(N, r, d, gen):
    R = torch.stack([torch.linalg.qr(torch.randn(d, r, generator=gen))[0].T
                     for _ in range(N)]).contiguous()
    W = 0.1 * torch.randn(N, r, d, generator=gen)
    b = 0.1 * torch.randn(N, r, generator=gen)
    return [t.requires_grad_() for t in (R, W, b)]


def providers(B, P, r, d, gen):
    """{name: (fn(h, pos, *unused), parameters)}: each provider edits the rows of the case's
    pos with its own parameters (the case's are unused)."""
    half = P // 2
    group = (torch.arange(P) >= half).to(torch.int32).expand(B, P).contiguous()
    spread = (torch.arange(P) % 8).to(torch.int32).expand(B, P).contiguous()
    p1 = bank_params(1, r, d, gen)
    p2 = bank_params(2, r, d, gen)
    p8 = bank_params(8, r, d, gen)

    def tied(h, pos, *_):
        return reft_ext.loreft_(h, pos, p1[0][0], p1[1][0], p1[2][0])

    def untied_bank(h, pos, *_):
        return reft_ext.loreft_(h, pos, *p2, index=group)

    def untied_two_calls(h, pos, *_):
        h = reft_ext.loreft_(h, pos[:, :half], p2[0][0], p2[1][0], p2[2][0])
        return reft_ext.loreft_(h, pos[:, half:], p2[0][1], p2[1][1], p2[2][1])

    def bank8(h, pos, *_):
        return reft_ext.loreft_(h, pos, *p8, index=spread)

    return {"tied": (tied, p1), "untied (bank)": (untied_bank, p2),
            "untied (2 calls)": (untied_two_calls, p2), "bank N=8": (bank8, p8)}


def run(B, T, d, r, P, dtype, reps, gen):
    case = bench_op.make_case(B, T, d, r, P, dtype, "cpu", gen)
    provs = providers(B, P, r, d, gen)
    per = {name: bench_op.mode_cases(fn, case, extra=params)
           for name, (fn, params) in provs.items()}
    out = {}
    for mode in MODES:
        cases = {name: modes[mode] for name, modes in per.items()}
        for name, stats in common.measure_interleaved(cases, reps=reps).items():
            out[(name, mode)] = stats
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="bench_bank-cpu")
    args = ap.parse_args(argv)
    B, T, d, r = (2, 64, 256, 4) if args.quick else (8, 512, 4096, 8)
    reps = 5 if args.quick else args.reps
    env = common.environment()
    gen = torch.Generator().manual_seed(0)
    rows, lines = [], [common.machine_line(env), ""]
    for P in (14, T):
        for dtype in (torch.float32, torch.bfloat16):
            res = run(B, T, d, r, P, dtype, reps, gen)
            shape = f"B={B} T={T} d={d} r={r} P={P}"
            dt = str(dtype).removeprefix("torch.")
            lines += [f"### {shape}, h {dt}, fp32 parameters", ""]
            table = []
            for name in ("tied", "untied (bank)", "untied (2 calls)", "bank N=8"):
                cells = [name]
                for mode in MODES:
                    s = res[(name, mode)]
                    ratio = s["median"] / res[("tied", mode)]["median"]
                    cells.append(f"{common.fmt_ms(s)} ({ratio:.2f}x)")
                    rows.append(common.ms_row(env, s, op="loreft_", provider=name, mode=mode,
                                              shape=shape, dtype=dt, vs_tied=ratio))
                table.append(cells)
            lines += [common.markdown_table(["provider"] + [f"{m} ms (vs tied)" for m in MODES],
                                            table), ""]
            two, bank = res[("untied (2 calls)", "fwd+bwd")], res[("untied (bank)", "fwd+bwd")]
            lines += [f"untied: 2 calls / bank (fwd+bwd) = "
                      f"{two['median'] / bank['median']:.2f}x", ""]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        common.write_rows(args.out, rows)
        (common.RESULTS / f"{args.out}.md").write_text(
            "# bench_bank: untied interventions and banks vs the tied op (CPU)\n\n"
            "Median (p20–p80) of interleaved repeats; ratios against `tied` in the same run.\n"
            "`python bench/bench_bank.py`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
