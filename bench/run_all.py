"""Every benchmark in one run: one CSV of measurements and a rendered report (issue 7).

    python bench/run_all.py                 # full run, ~10-15 min on 2 CPU cores
    python bench/run_all.py --quick         # smoke run: tiny shapes, few repeats, bfloat16
                                            # and torch.compile at one shape; ~1 min; into a
                                            # temporary directory
    python bench/run_all.py --device cuda   # the same on a GPU (bigger training step)

Writes <out>/<machine>-<YYYY-MM-DD>.csv (columns: common.COLUMNS, one measurement per row;
machine is a slug of the CPU/GPU name) and renders <out>/README.md with tables and PNG plots
(report.py; matplotlib optional). <out> is bench/results unless --out or --quick.

Parts (--only op,orth,e2e,cuda to run some):
  op    LoReFT alone, providers side by side (report.LEGEND): fused_/fused (reft_ext),
        eager_/eager (reft_ext.ops.reference), compiled_/compiled (the reference under
        torch.compile, default inductor, warmed up so compile time is excluded; a failure
        becomes an error row), pyreft-style (bench_e2e.PyreftStyleLoReFT), pyreft (when
        importable, else a skipped row). B=8 T=512 d=4096 r=8, float32 and bfloat16 h with
        fp32 parameters; fwd, bwd and fwd+bwd at P = 14 (f7+l7) and P = T; fwd+bwd at
        P = 1, 64, 256 and at d = 512, 1024, 2048 (P = 14). Repeats adapt to a time budget
        per measurement (at least 5). The backward's incoming gradient is owned by
        autograd alone, as in training (bench_op's training form). CPU: the per-call
        overhead without grad (bench_op.tiny_overhead). CUDA: peak memory of one fwd+bwd
        per provider.
  orth  reft_ext's QR map vs parametrizations.orthogonal for R (bench_orth.run; CPU only).
  e2e   the training step of bench_e2e.run: floor, fused, eager-qr, pyreft-style, pyreft,
        LoRA (peft) at a matched parameter budget, with peak memory per provider.
  cuda  bench/bench_cuda.py in a subprocess (--device cuda only; its own cuda.* files).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_e2e  # noqa: E402
import bench_op  # noqa: E402
import bench_orth  # noqa: E402
import common  # noqa: E402
import report  # noqa: E402

import reft_ext  # noqa: E402
from reft_ext.ops.reference import loreft_reference, loreft_reference_  # noqa: E402

ALL_MODES = ("fwd", "bwd", "fwd+bwd")


def op_providers(d: int, r: int, device, compiled: dict) -> tuple[dict, dict]:
    """({name: fn(h, pos, R, W, b) -> (B, T, d)}, {name: why it cannot run}). The module
    providers keep their own parameters (R is materialised from the parametrisation inside
    the call, as in pyreft); their gradients are cleared with the op's."""
    fns = {"fused_": reft_ext.loreft_, "fused": reft_ext.loreft,
           "compiled_": compiled["compiled_"], "compiled": compiled["compiled"],
           "eager_": loreft_reference_, "eager": loreft_reference}
    missing = {}
    for name, cls in (("pyreft-style", bench_e2e.PyreftStyleLoReFT),
                      ("pyreft", bench_e2e.PyreftLoReFT)):
        why = bench_e2e.unavailable(name)
        if why:
            missing[name] = f"skipped: {why}"
            continue
        mod = cls(d, r, device=device)
        fns[name] = lambda h, pos, *_, mod=mod: mod(h, pos)
        fns[name].params = list(mod.parameters())
    return fns, missing


def time_op(fn, mode: str, case: tuple, cfg) -> tuple[dict, float | None]:
    """Times one provider in one mode: a probe sizes the repeats to cfg.budget seconds
    (between cfg.min_reps and cfg.reps). The backward gets its gradient as in training: a
    fresh tensor that autograd alone holds (bench_op.HandOver; reft_ext may then write dx
    into it). Returns (measure() stats, peak memory growth of one call in bytes on CUDA,
    else None)."""
    run, setup = bench_op.mode_cases(fn, case, getattr(fn, "params", []))[mode]
    probe = common.measure(run, setup=setup, reps=1, warmup=cfg.warmup, device=cfg.device)
    n = int(min(cfg.reps, max(cfg.min_reps, cfg.budget / max(probe["median"], 1e-9))))
    stats = common.measure(run, setup=setup, reps=n, warmup=0, device=cfg.device)
    peak = None
    if torch.device(cfg.device).type == "cuda":
        arg = setup()
        token = common.peak_memory_start(cfg.device)
        run(arg)
        del arg
        peak = common.peak_memory_growth(token, cfg.device)
    return stats, peak


def run_op(cfg, env: dict, log) -> list[dict]:
    """The op part (module docstring): report rows, op "loreft"."""
    B, T, d0, r = cfg.B, cfg.T, cfg.d, cfg.r
    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dname = str(dtype).replace("torch.", "")
        # fresh dynamo caches per dtype: the sweeps then stay within its recompile limit
        torch._dynamo.reset()
        compiled = {"compiled": torch.compile(loreft_reference),
                    "compiled_": torch.compile(loreft_reference_)}
        failed = {}
        cases = [(P, d0, ALL_MODES if P in (14, T) else ("fwd+bwd",))
                 for P in sorted({p for p in (1, 14, 64, 256, T) if p <= T})]
        cases += [(14, d, ("fwd+bwd",)) for d in cfg.d_sweep if d < d0]
        if dname not in cfg.sweep_dtypes:       # --quick: one case, one compile
            cases = [c for c in cases if c[:2] == (14, d0)]
        for P, d, modes in cases:
            leaf, _, params, grad = bench_op.make_case(B, T, d, r, T, dtype, cfg.device, gen)
            case = (leaf, common.positions(B, T, P, cfg.device), params, grad)
            fns, missing = op_providers(d, r, cfg.device, compiled)
            if cfg.compile_at and (dname, P, d) not in cfg.compile_at:
                # each new shape recompiles (~10 s on 2 cores): --quick compiles once
                missing.update(dict.fromkeys(compiled, "skipped: --quick compiles one shape"))
            shape = f"B={B} T={T} d={d} r={r} P={P}"
            load = f"loadavg={os.getloadavg()[0]:.2f}"
            t0 = time.perf_counter()
            for name in report.OP_PROVIDERS:
                for mode in modes:
                    stats = peak = None
                    note = missing.get(name) or failed.get(name)
                    if note is None:
                        try:
                            stats, peak = time_op(fns[name], mode, case, cfg)
                            note = load
                        except Exception as e:  # e.g. inductor cannot build here: report it
                            note = f"error: {type(e).__name__}: {e}".replace("\n", " ")[:500]
                            failed[name] = note
                    rows.append(common.row(env, op="loreft", provider=name, mode=mode,
                                           shape=shape, dtype=dname, stats=stats,
                                           peak_bytes=peak, notes=note))
            log(f"op {dname} {shape}: {time.perf_counter() - t0:.0f} s")
    if torch.device(cfg.device).type == "cpu":
        tiny = bench_op.tiny_overhead(cfg.reps)
        rows.append(common.row(env, op="loreft call overhead (no grad)", provider="fused",
                               mode="fwd", shape="B=1 T=4 d=8 r=2 P=1", dtype="float32",
                               stats=tiny, unit="us", scale=1e6))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output directory (default bench/results; "
                    "a new temporary directory with --quick)")
    ap.add_argument("--only", default="op,orth,e2e,cuda", help="comma-separated parts")
    ap.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == "cuda"
    out = Path(a.out or (tempfile.mkdtemp(prefix="reft-bench-quick-") if a.quick
                         else common.RESULTS))
    parts = set(a.only.split(","))
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}",  # noqa: E731
                            file=sys.stderr, flush=True)

    env = {**common.environment(a.device), **common.versions()}
    env["device"] = (f"{torch.cuda.get_device_name(a.device)} (CUDA {torch.version.cuda})"
                     if cuda else
                     f"{common.cpu_model()}, {os.cpu_count()} cores, {a.threads} "
                     f"thread{'s' * (a.threads != 1)}")
    csv_path = out / (f"{common.machine_slug(env['device'])}-"
                      f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.csv")
    op_cfg = argparse.Namespace(
        device=a.device, B=8, T=512, d=4096, r=8, d_sweep=(512, 1024, 2048),
        reps=15, min_reps=5, budget=2.0, warmup=2, sweep_dtypes=("float32", "bfloat16"),
        compile_at=None)
    e2e_args = ["--threads", str(a.threads), "--device", a.device]
    if a.quick:
        vars(op_cfg).update(B=2, T=64, d=256, d_sweep=(128,), reps=3, min_reps=3,
                            budget=0.05, warmup=1, sweep_dtypes=("float32",),
                            compile_at={("float32", 14, 256)})
        e2e_args += ["--layers", "1", "--hidden", "256", "--intermediate", "512",
                     "--vocab", "128", "--batch", "1", "--seq", "32", "--reps", "3",
                     "--positions", "f7+l7", "--slow-every", "1"]
    elif cuda:      # a step big enough for the GPU to be busy
        e2e_args += ["--hidden", "4096", "--intermediate", "11008", "--batch", "4",
                     "--seq", "512"]

    rows = []

    def part(name, fn):
        if name not in parts:
            return
        log(f"{name} ...")
        try:
            rows.extend(fn())
        except Exception as e:  # one broken part must not lose the others' rows
            rows.append(common.row(env, op=name, provider="-", notes=(
                f"error: {type(e).__name__}: {e}".replace("\n", " ")[:500])))
            log(f"{name} failed: {type(e).__name__}: {e}")
        common.write_csv(csv_path, rows, common.COLUMNS)   # partial results survive a crash

    part("op", lambda: run_op(op_cfg, env, log))
    if not cuda:
        part("orth", lambda: bench_orth.run(*((256, 8, 20, 20) if a.quick
                                              else (4096, 8, 200, 1000)), env)[0])
    part("e2e", lambda: bench_e2e.run(bench_e2e.parser().parse_args(e2e_args), env))
    if cuda and "cuda" in parts:
        log("bench_cuda.py ...")
        cmd = [sys.executable, str(HERE / "bench_cuda.py"), "--out", str(out)]
        res = subprocess.run(cmd + (["--quick"] if a.quick else []), capture_output=True,
                             text=True)
        log(f"bench_cuda.py exit {res.returncode}: {(res.stdout + res.stderr)[-300:]}")
    if not rows:
        sys.exit("nothing was measured (see --only)")
    common.write_csv(csv_path, rows, common.COLUMNS)
    rendered = report.render(out, plots=not a.no_plots)
    print(f"wrote {csv_path} ({len(rows)} rows)")
    print(f"wrote {rendered['readme']}")
    for p in rendered["pngs"]:
        print(f"wrote {p}")
    if rendered["skipped"]:
        print(f"plots skipped: {rendered['skipped']}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
