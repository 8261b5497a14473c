"""GPU benchmark of the fused LoReFT kernels (issue 3 targets), bf16, (B, T, d, r) =
(8, 4096, 4096, 8), all positions and f7+l7 (P = 14), fp32 parameters as in training.

Providers (h is a fresh non-leaf tensor requiring grad each repeat, made untimed):
  fused_    reft_ext.loreft_ (in place: what patch() uses)
  fused     reft_ext.loreft  (out of place: includes the (B, T, d) clone of h)
  eager     loreft_reference (gather, matmuls, index_put on a clone)
  compiled  torch.compile(loreft_reference)
Modes: fwd (with autograd recording), bwd (backward alone), fwd+bwd. Timing: CUDA events
on the current stream, warm-up, median and p20/p80 (bench/common.py).

Also measured in the same run: the device's copy bandwidth (device-to-device copy of
1 GiB; bytes = read + write) and one empty kernel launch. Achieved GB/s uses the issue's
byte count: forward = each selected row read once and written once, backward = g and x
read and dx written once per selected row, plus the parameters, whatever the op really
moves (the out-of-place op and every backward also copy the full (B, T, d) tensor).

    python bench/bench_cuda.py [--quick] [--out DIR]
Writes cuda.csv, cuda.md and cuda.json to bench/results/ (and to --out / $OUT if set).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext.ops.reference import loreft_reference  # noqa: E402

DEV = "cuda"


def copy_bandwidth(reps: int) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.randn(256 * 1024 * 1024, device=DEV)  # 1 GiB of float32
    dst = torch.empty_like(src)
    t = common.measure(lambda: dst.copy_(src), reps=reps, warmup=3, device=DEV)
    return 2 * src.numel() * 4 / t["median"]


def empty_launch(reps: int) -> dict:
    """One launch of a kernel with (almost) nothing to do, timed like the ops."""
    x = torch.zeros(1, device=DEV)
    return common.measure(lambda: x.add_(1), reps=reps, warmup=10, device=DEV)


def bench(B, T, d, r, P, reps, compiled_ref):
    gen = torch.Generator(device=DEV).manual_seed(0)
    leaf = torch.randn(B, T, d, device=DEV, generator=gen).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(B, T, d, device=DEV, generator=gen).to(torch.bfloat16)
    R = torch.linalg.qr(torch.randn(d, r, device=DEV, generator=gen))[0].T.contiguous()
    params = [R, 0.1 * torch.randn(r, d, device=DEV, generator=gen),
              0.1 * torch.randn(r, device=DEV, generator=gen)]
    params = [p.requires_grad_() for p in params]
    pos = common.positions(B, T, P, DEV)
    providers = {"fused_": reft_ext.loreft_, "fused": reft_ext.loreft,
                 "eager": loreft_reference, "compiled": compiled_ref}
    rows = []
    for name, fn in providers.items():
        def fwd(h, fn=fn):
            return fn(h, pos, *params)

        def run_fwd_bwd(h, fn=fn):
            fn(h, pos, *params).backward(grad)

        def bwd(out):
            out.backward(grad)

        # A new leaf per repeat, so that its gradient is stored rather than added to an
        # older one (a (B, T, d) read-modify-write that is not the op's work); the clone
        # on top makes h a non-leaf (loreft_ refuses leaves) and its backward is free.
        fresh = lambda: leaf.detach().clone().requires_grad_().clone()  # noqa: E731
        stats = {
            "fwd": common.measure(fwd, setup=fresh, reps=reps, warmup=3, device=DEV),
            "bwd": common.measure(bwd, setup=lambda fwd=fwd: fwd(fresh()), reps=reps,
                                  warmup=3, device=DEV),
            "fwd+bwd": common.measure(run_fwd_bwd, setup=fresh, reps=reps, warmup=3,
                                      device=DEV),
        }
        for mode, s in stats.items():
            rows.append({"provider": name, "mode": mode, "P": P, **s})
        for p in params:
            p.grad = None
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="also copy results here")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not reft_ext.build_info()["cuda_kernels"]:
        sys.exit(f"bench_cuda.py needs a GPU and CUDA kernels: {reft_ext.build_info()}")
    reps = 10 if args.quick else 50
    B, T, d, r = 8, 4096, 4096, 8
    env = common.environment(DEV)
    copy_bps = copy_bandwidth(reps)
    launch = empty_launch(reps * 4)
    compiled_ref = torch.compile(loreft_reference)

    rows = []
    for P in (T, 14):
        rows += bench(B, T, d, r, P, reps, compiled_ref)

    param_bytes = 3 * r * d * 4
    by_key = {(x["provider"], x["mode"], x["P"]): x for x in rows}
    records, table = [], []
    for x in rows:
        n = B * x["P"]
        moved = {"fwd": 2 * n * d * 2, "bwd": 3 * n * d * 2,
                 "fwd+bwd": 5 * n * d * 2}[x["mode"]] + param_bytes
        gbs = moved / x["median"] / 1e9
        eager = by_key[("eager", x["mode"], x["P"])]["median"]
        comp = by_key[("compiled", x["mode"], x["P"])]["median"]
        rec = {**env, "shape": f"({B},{T},{d}) r={r}", "dtype": "bfloat16", "params": "float32",
               "P": x["P"], "provider": x["provider"], "mode": x["mode"],
               "median_ms": x["median"] * 1e3, "p20_ms": x["p20"] * 1e3,
               "p80_ms": x["p80"] * 1e3, "n": x["n"], "issue_bytes": moved,
               "achieved_GBs": gbs, "pct_of_copy_bw": 100 * gbs * 1e9 / copy_bps,
               "speedup_vs_eager": eager / x["median"], "speedup_vs_compiled": comp / x["median"],
               "x_empty_launch": x["median"] / launch["median"],
               "copy_bw_GBs": copy_bps / 1e9, "empty_launch_us": launch["median"] * 1e6}
        records.append(rec)
        table.append([x["P"], x["provider"], x["mode"], common.fmt_ms(x), f"{gbs:.0f}",
                      f"{rec['pct_of_copy_bw']:.0f}%", f"{rec['speedup_vs_eager']:.2f}x",
                      f"{rec['speedup_vs_compiled']:.2f}x", f"{rec['x_empty_launch']:.1f}"])

    md = [f"# reft_ext CUDA bench — {env['device']}, {env['date']}",
          f"torch {env['torch']}, reft_ext {env['reft_ext']}, python {env['python']}; "
          f"archs {','.join(reft_ext.build_info()['cuda_archs'])}",
          f"copy bandwidth (1 GiB D2D, read+write): {copy_bps / 1e9:.0f} GB/s; "
          f"empty kernel launch: {launch['median'] * 1e6:.1f} us "
          f"(p20–p80 {launch['p20'] * 1e6:.1f}–{launch['p80'] * 1e6:.1f})",
          f"bf16 h, fp32 params, (B, T, d, r) = ({B}, {T}, {d}, {r}); P = {T} (all) and 14 "
          "(f7+l7). GB/s counts the issue's bytes (selected rows + params).", "",
          common.markdown_table(["P", "provider", "mode", "ms median (p20–p80)", "GB/s",
                                 "% copy BW", "vs eager", "vs compiled", "x empty launch"],
                                table)]
    text = "\n".join(md)
    print(text)
    path = common.write_rows("cuda", records)
    md_path = path.with_suffix(".md")
    md_path.write_text(text + "\n")
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps({"build": reft_ext.build_info(), "rows": records}, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for p in (path, md_path, json_path):
            shutil.copy(p, Path(args.out) / p.name)


if __name__ == "__main__":
    main()
