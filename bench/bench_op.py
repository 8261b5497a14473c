"""Microbenchmark of the fused LoReFT op against the eager PyTorch reference.

Four providers, paired by form so each ratio compares like with like:
  fused    reft_ext.loreft   (out of place)     vs  eager    loreft_reference  (gather,
                                                     matmuls, index_put on a clone)
  fused_   reft_ext.loreft_  (in place)         vs  eager_   loreft_reference_ (index_put_)
Modes: fwd (forward with autograd recording), bwd (backward alone), fwd+bwd. h is a fresh
non-leaf tensor requiring grad each repeat (made untimed), parameters require grad, as in
training. The incoming gradient is, as in training, a fresh tensor that the layer above
hands to autograd and nobody else holds (autograd then adds reft_ext's sparse row
correction into it in place: see ops/_grad_reuse.py); the modes "bwd, caller's grad" and
"fwd+bwd, caller's grad" pass a gradient the caller keeps (out.backward(grad)), which
autograd must copy; with it, the "copy floor": the two fresh (B, T, d) copies that form
requires of any implementation. Within
each mode the providers take turns, one repeat each per round (common.measure_interleaved),
so drift of a shared machine does not tilt their ratios. Also the per-call overhead of
reft_ext.loreft on a tiny input without grad.

    python bench/bench_op.py                 # default shapes, 2 threads, ~5 min on 2 cores
    python bench/bench_op.py --quick         # fewer repeats (smoke test)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext.ops.reference import loreft_reference, loreft_reference_  # noqa: E402

PROVIDERS = {
    "fused": reft_ext.loreft,
    "eager": loreft_reference,
    "fused_": reft_ext.loreft_,
    "eager_": loreft_reference_,
}
PAIRS = [("eager", "fused"), ("eager_", "fused_"), ("eager", "fused_")]
MODES = ("fwd", "bwd", "fwd+bwd", "bwd, caller's grad", "fwd+bwd, caller's grad")


class HandOver(torch.autograd.Function):
    """A scalar whose backward returns a given tensor as the gradient of x and drops its
    own reference: the gradient a layer above produces, owned by autograd alone."""

    @staticmethod
    def forward(ctx, x, box):
        ctx.box = box
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        return ctx.box.pop(), None


def make_case(B, T, d, r, P, dtype, device, gen):
    h0 = torch.randn(B, T, d, generator=gen).to(device=device, dtype=dtype)
    pos = common.positions(B, T, P, device)  # P=14: f7+l7; P=T: every token
    R = torch.linalg.qr(torch.randn(d, r, generator=gen))[0].T.contiguous()
    params = [R, 0.1 * torch.randn(r, d, generator=gen), 0.1 * torch.randn(r, generator=gen)]
    params = [p.to(device).requires_grad_() for p in params]  # fp32 params, as in training
    grad = torch.randn(B, T, d, generator=gen).to(device=device, dtype=dtype)
    leaf = h0.clone().requires_grad_()
    return leaf, pos, params, grad


def mode_cases(fn, case, extra=()) -> dict:
    """{mode: (timed fn, untimed setup)} of provider fn(h, pos, R, W, b) on
    case = make_case(...); extra: a module provider's own parameters, whose gradients are
    cleared with the op's."""
    leaf, pos, params, grad = case

    def fresh_h():
        # A non-leaf h that requires grad, as a layer output in training. Gradients are
        # dropped first: accumulating into .grad across repeats would add a (B, T, d) sum
        # to every provider's timing that training does not pay.
        for t in (leaf, *params, *extra):
            t.grad = None
        return leaf.clone()

    def fresh_grad():
        return [grad.clone()]  # untimed; the list is the only holder until backward

    def fwd(h):
        return fn(h, pos, *params)

    def fwd_for_bwd():
        return fn(fresh_h(), pos, *params), fresh_grad()

    def bwd(state):
        out, box = state
        HandOver.apply(out, box).backward()

    def bwd_caller(state):
        state[0].backward(grad)

    def both(state):
        h, box = state
        HandOver.apply(fn(h, pos, *params), box).backward()

    def both_caller(state):
        fn(state[0], pos, *params).backward(grad)

    def h_and_grad():
        return fresh_h(), fresh_grad()

    return {"fwd": (fwd, fresh_h), "bwd": (bwd, fwd_for_bwd), "fwd+bwd": (both, h_and_grad),
            "bwd, caller's grad": (bwd_caller, fwd_for_bwd),
            "fwd+bwd, caller's grad": (both_caller, h_and_grad)}


def bench_case(B, T, d, r, P, dtype, device, reps, gen):
    case = make_case(B, T, d, r, P, dtype, device, gen)
    grad = case[3]

    def copies(state):
        # What the out-of-place contract alone costs with the caller's gradient: a new
        # (B, T, d) output and a new (B, T, d) gradient of h (grad may not be written).
        state[0].detach().clone()
        grad.clone()

    per_provider = {name: mode_cases(fn, case) for name, fn in PROVIDERS.items()}
    results = {}
    for mode in MODES:
        # Providers take turns within each mode (common.measure_interleaved).
        cases = {name: modes[mode] for name, modes in per_provider.items()}
        if mode == "fwd+bwd, caller's grad":
            cases["copy floor"] = (copies, cases["fused"][1])
        for name, stats in common.measure_interleaved(cases, reps=reps, device=device).items():
            results[(name, mode)] = stats
    return results


def tiny_overhead(reps):
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1, 4, 8, generator=gen)
    pos = torch.tensor([[1]])
    R, W, b = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(2, generator=gen)
    calls = 200

    def many():
        for _ in range(calls):
            reft_ext.loreft(h, pos, R, W, b)

    with torch.no_grad():
        s = common.measure(many, reps=reps, warmup=2)
    return {k: (v / calls if k != "n" else v) for k, v in s.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="5 repeats, smaller T")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="8,512,4096,8", help="B,T,d,r")
    ap.add_argument("--name", default=None, help="results file stem (default bench_op-<device>)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 5 if args.quick else args.reps
    B, T, d, r = (int(x) for x in args.shape.split(","))
    if args.quick:
        T = min(T, 128)
    env = common.environment(args.device)
    if args.device == "cpu":
        env["device"] = f"{common.cpu_model()}, {args.threads} threads"
    gen = torch.Generator().manual_seed(0)
    rows, table, floors = [], [], []
    for dtype in (torch.float32, torch.bfloat16):
        for P in (14, T):
            res = bench_case(B, T, d, r, P, dtype, args.device, reps, gen)
            shape = f"B={B} T={T} d={d} r={r} P={P}"
            for (prov, mode), s in res.items():
                rows.append(common.ms_row(env, s, op="loreft", provider=prov, mode=mode,
                                          shape=shape, dtype=str(dtype).replace("torch.", "")))
            floor = res[("copy floor", "fwd+bwd, caller's grad")]
            floors.append(f"{str(dtype).replace('torch.', '')} P={P}: {common.fmt_ms(floor)} ms, "
                          f"at most {res[('eager', MODES[-1])]['median'] / floor['median']:.1f}x")
            for mode in MODES:
                for base, fused in PAIRS:
                    ratio = res[(base, mode)]["median"] / res[(fused, mode)]["median"]
                    table.append([str(dtype).replace("torch.", ""), P, mode,
                                  f"{base} vs {fused}", common.fmt_ms(res[(base, mode)]),
                                  common.fmt_ms(res[(fused, mode)]), f"{ratio:.1f}x"])
            print(f"done {dtype} P={P}", file=sys.stderr)
    tiny = tiny_overhead(reps)
    rows.append(common.ms_row(env, tiny, op="loreft", provider="fused",
                              mode="call overhead (no grad)", shape="B=1 T=4 d=8 r=2 P=1",
                              dtype="float32"))
    name = args.name or f"bench_op-{args.device}"
    path = common.write_rows(name, rows)
    header = ["dtype", "P", "mode", "pair", "baseline ms (p20–p80)", "reft_ext ms (p20–p80)",
              "speed-up"]
    md = (f"{common.machine_line(env)} Shape B={B} T={T} d={d} r={r}, fp32 parameters, "
          f"median of {reps} repeats.\n\n" + common.markdown_table(header, table) +
          f"\n\nPer-call overhead of reft_ext.loreft without grad (tiny input): "
          f"{tiny['median'] * 1e6:.1f} us (p20 {tiny['p20'] * 1e6:.1f}, p80 {tiny['p80'] * 1e6:.1f}).\n"
          "\nCopy floor of the out-of-place form with the caller's gradient (a fresh copy of h "
          "for the output plus a fresh copy of grad for the gradient of h, which the contract "
          "requires of any implementation), and the largest speed-up over eager it allows: "
          + "; ".join(floors) + ".\n")
    (common.RESULTS / f"{name}.md").write_text(md)
    print(md)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
