"""End-to-end training step with reft_ext.patch at a width where the edit is visible.

A small random Llama (hidden 2048, 2 layers by default, intermediate 5504, 16 heads, vocab
1024: LLaMA-7B's width with few layers, so the edit is as large a share of the step as it
can get), LoReFT rank 8 at every layer, batch 2 x 128 tokens, on 2 threads; positions f7+l7
(pyreft's usual setting: 28 edited rows per layer) and "all" (256 rows per layer).

Providers, all measured in the same run:
  floor            the frozen model alone: forward + loss + backward
  eager-orthogonal patch() with a pyreft-style intervention: R under
                   torch.nn.utils.parametrizations.orthogonal (read twice per forward, as
                   pyreft's LoreftIntervention does) and eager gather/matmul/scatter
  eager-qr         patch(backend="reference"): reft_ext's QR-orthonormalised R and the
                   pure-PyTorch reference edit (reft_ext.reference)
  fused            patch(): QR R and the fused op (reft_ext.loreft_)
A step is zero_grad + forward + loss + backward (+ AdamW step on the interventions). So that
every provider backpropagates through the same layers, the embedding output is a leaf that
requires grad in all of them (the floor then runs the full backward too). Reported: median
and p20/p80 of the step, its ratio to the floor's median, and the extra time over the floor.

The providers are timed interleaved (one step of each per round, order rotating), so load
from other processes on a shared machine hits all of them alike; the load average before
and after the run is recorded with the rows.

    python bench/bench_e2e.py [--layers 2] [--hidden 2048] [--batch 2] [--seq 128]
                              [--positions f7+l7,all] [--reps 20]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reft_ext  # noqa: E402


class PyreftStyleLoReFT(nn.Module):
    """pyreft's LoreftIntervention math on the gathered rows, R under torch's orthogonal
    parametrisation (weight (d, r), R = weight.T), written with eager ops."""

    def __init__(self, d, rank, dtype=None, device=None):
        super().__init__()
        rot = nn.Module()
        rot.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(d, rank, dtype=dtype,
                                                                  device=device)))
        self.rotate_layer = nn.utils.parametrizations.orthogonal(rot)
        self.learned_source = nn.Linear(d, rank, dtype=dtype, device=device)

    def forward(self, h, positions, inplace=True):
        bi, pj = (positions >= 0).nonzero(as_tuple=True)
        t = positions[bi, pj]
        x = h[bi, t].to(self.learned_source.weight.dtype)
        rotated = x @ self.rotate_layer.weight
        y = x + (self.learned_source(x) - rotated) @ self.rotate_layer.weight.T
        out = h.clone()
        out[bi, t] = y.to(h.dtype)
        return out


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=args.vocab, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make_step(model, ids, labels, params):
    emb = model.get_input_embeddings()(ids).detach()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01) if params else None

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        x = emb.clone().requires_grad_(True)
        loss = model(inputs_embeds=x, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
    return step


def interleaved(steps: dict, reps: int, warmup: int, slow: dict) -> dict:
    """Times steps[name]() round-robin; a name in ``slow`` runs only every slow[name]-th
    round. Returns {name: {"median", "p20", "p80", "n"}} in seconds."""
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    times = {n: [] for n in names}
    for k in range(reps):
        order = names[k % len(names):] + names[:k % len(names)]
        for n in order:
            if k % slow.get(n, 1):
                continue
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts)] * 4
        out[n] = {"median": statistics.median(ts), "p20": q[0], "p80": q[3], "n": len(ts)}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--positions", default="f7+l7,all",
                    help="comma-separated specs, one table each")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--slow-every", type=int, default=3,
                    help="time eager-orthogonal only every n-th round")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = build(a)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, a.vocab, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    env = common.environment()
    env["device"] = f"{common.cpu_model()}, {a.threads} threads"
    rows = []
    for spec in a.positions.split(","):
        rows += run_spec(a, base, ids, labels, spec, env)
    path = common.write_rows("e2e", rows)
    print(f"CSV: {path}")


def run_spec(a, base, ids, labels, spec, env):
    variants = {
        "floor": None,
        "eager-orthogonal": dict(intervention=PyreftStyleLoReFT),
        "eager-qr": dict(backend="reference"),
        "fused": dict(),
    }
    shape = (f"llama L={a.layers} d={a.hidden} ffn={a.intermediate} V={a.vocab} "
             f"B={a.batch} T={a.seq} r={a.rank} pos={spec} layers=all")
    steps = {}
    for name, kw in variants.items():
        model = copy.deepcopy(base)
        params = []
        if kw is not None:
            torch.manual_seed(0)
            reft_ext.patch(model, "all", a.rank, positions=spec, **kw)
            params = list(model.reft_interventions.parameters())
        steps[name] = make_step(model, ids, labels, params)
    load0 = os.getloadavg()[0]
    results = interleaved(steps, a.reps, 1, {"eager-orthogonal": a.slow_every})
    env = dict(env, loadavg_1min=f"{load0:.2f} -> {os.getloadavg()[0]:.2f}")
    floor = results["floor"]["median"]
    rows, table = [], []
    for name, t in results.items():
        ratio, extra = t["median"] / floor, (t["median"] - floor) * 1e3
        rows.append({"bench": "e2e_step", "provider": name, "shape": shape,
                     "median_ms": t["median"] * 1e3, "p20_ms": t["p20"] * 1e3,
                     "p80_ms": t["p80"] * 1e3, "n": t["n"], "ratio_vs_floor": ratio,
                     "extra_ms": extra, **env})
        table.append([name, common.fmt_ms(t), t["n"], f"{ratio:.3f}", f"{extra:+.1f}"])
    print(f"Training step, {shape}\n({env['device']}; torch {env['torch']}; "
          f"{env['date']}; load avg {env['loadavg_1min']})\n")
    print(common.markdown_table(["provider", "step ms, median (p20–p80)", "n",
                                 "x floor", "extra ms"], table))
    print()
    return rows


if __name__ == "__main__":
    main()
