"""Keeping R orthonormal: reft_ext's QR map vs torch.nn.utils.parametrizations.orthogonal.

pyreft keeps its rotation as a (d, r) Linear weight under torch's default `orthogonal`
parametrisation (householder map for a non-square matrix, with trivialisation: a d x d
`base` buffer). reft_ext keeps an unconstrained (r, d) parameter and orthonormalises it by a
sign-fixed thin QR (reft_ext.modules.orthonormal_rows), once per forward.

Per provider, at d=4096, r=8 (LLaMA-7B width) on 2 threads:
  * time of one forward + backward of the map (materialise R, backprop a random cotangent),
    median and p20/p80 of many repeats;
  * persistent state (parameters + buffers) and the peak RSS growth of a fresh process that
    builds the module and runs 5 forward+backward passes;
  * ||R R^T - I||_max after 1 and N AdamW steps (lr 1e-3, weight decay 0.01; N = 1000 for
    the QR map, 3 for the parametrisation, whose steps take seconds), and ||R||_F
    (sqrt(r) = 2.83 when orthonormal, 0 when collapsed).

Peak memory: the growth of the process's peak RSS (VmHWM, reset through
/proc/self/clear_refs) over its RSS before building the module, in a fresh process.

    python bench/bench_orth.py [--d 4096] [--r 8] [--threads 2] [--reps 200]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from reft_ext.modules import orthonormal_rows  # noqa: E402


class QRRotation(nn.Module):
    """reft_ext: raw (r, d) parameter, R = orthonormal_rows(raw)."""

    def __init__(self, d, r):
        super().__init__()
        self.raw = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d)))

    def forward(self):
        return orthonormal_rows(self.raw)                       # (r, d)


class TorchOrthogonal(nn.Module):
    """pyreft's LowRankRotateLayer: (d, r) weight under parametrizations.orthogonal."""

    def __init__(self, d, r):
        super().__init__()
        lin = nn.Module()
        lin.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, r)))
        self.rot = nn.utils.parametrizations.orthogonal(lin)

    def forward(self):
        return self.rot.weight.T                                # (r, d)


PROVIDERS = {"qr (reft_ext)": QRRotation, "parametrizations.orthogonal": TorchOrthogonal}


def state_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


def fwd_bwd(m, g):
    R = m()
    (R * g).sum().backward()


def time_provider(cls, d, r, reps):
    torch.manual_seed(0)
    m = cls(d, r)
    g = torch.randn(r, d)
    return common.measure(lambda: fwd_bwd(m, g), reps=reps, warmup=3), state_bytes(m)


def decay_check(cls, d, r, steps):
    torch.manual_seed(0)
    m = cls(d, r)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01)
    out = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        fwd_bwd(m, torch.randn(r, d))
        opt.step()
        if step in (1, steps):
            with torch.no_grad():
                R = m()
                err = (R @ R.T - torch.eye(r)).abs().max().item()
                out[step] = (err, R.norm().item())
    return out


def child(name, d, r):
    """Runs in a fresh process: prints the peak-RSS growth (bytes) of build + 5 fwd+bwd."""
    torch.set_num_threads(2)
    m0 = QRRotation(8, 2)                                      # warm up BLAS / LAPACK / autograd
    fwd_bwd(m0, torch.randn(2, 8))
    token = common.peak_memory_start()
    m = PROVIDERS[name](d, r)
    g = torch.randn(r, d)
    for _ in range(5):
        fwd_bwd(m, g)
    print(json.dumps({"peak_rss_growth": common.peak_memory_growth(token)}))


def run(d: int, r: int, reps: int, decay_steps: int, env: dict) -> tuple[list[dict], str]:
    """Measures both R maps at (r, d) on the CPU. Returns report rows (`common.row`: the
    fwd+bwd time with peak memory, then max|RR^T - I| after 1 and N AdamW steps) and a
    markdown table."""
    rows, table = [], []
    shape = f"d={d} r={r}"
    for name, cls in PROVIDERS.items():
        # the slow provider gets fewer repeats (each is ~1 s), still a median of >= 10
        n_reps = reps if cls is QRRotation else max(10, reps // 20)
        t, sbytes = time_provider(cls, d, r, n_reps)
        out = subprocess.run([sys.executable, __file__, "--child", name, "--d", str(d),
                              "--r", str(r)], capture_output=True, text=True, check=True)
        peak = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_growth"]
        steps = decay_steps if cls is QRRotation else 3
        dec = decay_check(cls, d, r, steps)
        rows.append(common.row(env, op="R map", provider=name, mode="fwd+bwd", shape=shape,
                               dtype="float32", stats=t, peak_bytes=peak,
                               notes=f"state_MiB={sbytes / 2**20:.3f}"))
        for k in sorted({1, steps}):
            rows.append(common.row(
                env, op="R map after AdamW (lr 1e-3, wd 0.01)", provider=name,
                mode=f"{k} steps", shape=shape, dtype="float32", unit="max|RR^T-I|",
                stats={"median": dec[k][0]}, scale=1.0, notes=f"normR={dec[k][1]:.4g}"))
        table.append([name, common.fmt_ms(t), t["n"], f"{sbytes / 2**20:.2f}",
                      f"{peak / 2**20:.1f}", f"{dec[1][0]:.1e} / {dec[1][1]:.2f}",
                      f"{dec[steps][0]:.1e} / {dec[steps][1]:.2f} (N={steps})"])
    md = common.markdown_table(
        ["provider", "fwd+bwd ms, median (p20–p80)", "n", "state MiB", "peak RSS growth MiB",
         "AdamW wd=0.01, 1 step: max|RRᵀ-I| / ‖R‖F",
         "N steps: max|RRᵀ-I| / ‖R‖F"], table)
    return rows, md


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--decay-steps", type=int, default=1000)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.d, a.r)
    torch.set_num_threads(a.threads)
    env = {**common.environment(), **common.versions()}
    env["device"] = f"{common.cpu_model()}, {a.threads} threads"
    rows, md = run(a.d, a.r, a.reps, a.decay_steps, env)
    times = [x["median"] for x in rows if x["mode"] == "fwd+bwd"]
    path = common.write_rows("orth", rows)
    print(f"R orthonormalisation, d={a.d}, r={a.r}: forward+backward of the map "
          f"({env['device']}; torch {env['torch']}; {env['date']})\n")
    print(md)
    print(f"\nqr is {times[1] / times[0]:.0f}x faster. CSV: {path}")


if __name__ == "__main__":
    main()
