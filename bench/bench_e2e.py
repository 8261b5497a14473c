"""End-to-end training step with reft_ext.patch at a width where the edit is visible.

A small random Llama (hidden 2048, 2 layers by default, intermediate 5504, 16 heads, vocab
1024: LLaMA-7B's width with few layers, so the edit is as large a share of the step as it
can get), LoReFT rank 8 at every layer, batch 2 x 128 tokens, on 2 threads; positions f7+l7
(pyreft's usual setting: 28 edited rows per layer) and "all" (256 rows per layer).

Providers, all measured in the same run:
  floor         the frozen model alone: forward + loss + backward
  fused         patch(): QR R and the fused op (reft_ext.loreft_)
  eager-qr      patch(backend="reference"): reft_ext's QR-orthonormalised R and the
                pure-PyTorch reference edit (reft_ext.ops.reference)
  pyreft-style  patch() with a pyreft-style intervention: R under
                torch.nn.utils.parametrizations.orthogonal (read twice per forward, as
                pyreft's LoreftIntervention does) and eager gather/matmul/scatter
  pyreft        pyreft's own LoreftIntervention on the gathered rows, behind patch()'s
                hooks (not pyvene's); only when pyreft is importable, else a skipped row
  lora          LoRA from peft on q_proj and v_proj of the same layers, its rank chosen so
                that its trainable parameter count is closest to LoReFT's (both counts are
                in the rows); only when peft is installed, else a skipped row
A step is zero_grad + forward + loss + backward (+ AdamW step on the trainable parameters).
So that every provider backpropagates through the same layers, the embedding output is a
leaf that requires grad in all of them (the floor then runs the full backward too).
Reported: median and p20/p80 of the step, its ratio to the floor's median, the extra time
over the floor, and the peak memory growth of 3 steps.

The providers are timed interleaved (one step of each per round, order rotating), so load
from other processes on a shared machine hits all of them alike; the load average before
and after the run is recorded with the rows. Peak memory is measured before the timing,
each provider in a fresh process (`common.peak_memory_start`): the base model is built,
then the window opens, then the provider is added (patch / LoRA) and 3 steps run, so its
parameters, optimizer state and buffers count (pyreft-style's d x d buffer too). CPU: growth
of the peak RSS (VmHWM); CUDA: of torch.cuda.max_memory_allocated.

    python bench/bench_e2e.py [--layers 2] [--hidden 2048] [--batch 2] [--seq 128]
                              [--positions f7+l7,all] [--reps 20] [--device cpu]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import reft_ext  # noqa: E402

PROVIDERS = ("floor", "fused", "eager-qr", "pyreft-style", "pyreft", "lora")
SLOW = ("pyreft-style", "pyreft")       # timed every --slow-every rounds only
LORA_TARGETS = ("q_proj", "v_proj")     # peft's default targets for Llama


def _selected(positions):
    """(batch index, token index) of the valid slots of a (B, P) position tensor."""
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    return bi, positions[bi, pj]


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
        bi, t = _selected(positions)
        x = h[bi, t].to(self.learned_source.weight.dtype)
        rotated = x @ self.rotate_layer.weight
        y = x + (self.learned_source(x) - rotated) @ self.rotate_layer.weight.T
        out = h.clone()
        out[bi, t] = y.to(h.dtype)
        return out


class PyreftLoReFT(nn.Module):
    """pyreft's own LoreftIntervention (needs pyreft) applied to the gathered rows, with the
    call signature patch() takes: forward(h (B, T, d), positions (B, P)) -> (B, T, d)."""

    def __init__(self, d, rank, dtype=None, device=None):
        super().__init__()
        import pyreft
        self.inner = pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank,
                                               dtype=dtype or torch.float32).to(device)

    def forward(self, h, positions, inplace=True):
        bi, t = _selected(positions)
        # pyreft's Linear would fail on a bf16 x with fp32 weights: feed its dtype
        y = self.inner(h[bi, t].to(self.inner.learned_source.weight.dtype))
        out = h.clone()
        out[bi, t] = y.to(h.dtype)
        return out


def unavailable(name: str) -> str | None:
    """Why provider `name` cannot run here (a missing optional package), or None."""
    mod = {"pyreft": "pyreft", "lora": "peft"}.get(name)
    if mod is None:
        return None
    try:
        __import__(mod)
    except Exception as e:  # pyreft's import can fail on its own dependencies too
        return f"{mod} not importable ({type(e).__name__}: {e})".replace("\n", " ")
    return None


def loreft_params(a) -> int:
    """Trainable parameters of LoReFT at every layer: R, W (r, d) and b (r,) per layer."""
    return a.layers * (2 * a.rank * a.hidden + a.rank)


def lora_rank(model: nn.Module, budget: int) -> tuple[int, int]:
    """LoRA rank on LORA_TARGETS whose parameter count, rank * sum(in + out) over the
    target Linears, is closest to `budget`; returns (rank, parameters at that rank)."""
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS)
    rank = max(1, round(budget / per_rank))
    return rank, rank * per_rank


def setup_provider(name: str, model: nn.Module, a, spec: str):
    """Adds provider `name` to the frozen `model` (in place, except LoRA, which wraps it).
    Returns (model to call, trainable parameters, notes)."""
    if name == "floor":
        return model, [], ""
    if name == "lora":
        import peft
        rank, _ = lora_rank(model, loreft_params(a))
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                              target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, params, (f"lora_rank={rank}; targets={'+'.join(LORA_TARGETS)}; "
                               f"loreft_params={loreft_params(a)}")
    kw = {"fused": {}, "eager-qr": dict(backend="reference"),
          "pyreft-style": dict(intervention=PyreftStyleLoReFT),
          "pyreft": dict(intervention=PyreftLoReFT)}[name]
    torch.manual_seed(0)
    reft_ext.patch(model, "all", a.rank, positions=spec, **kw)
    return model, list(model.reft_interventions.parameters()), ""


def build(args):
    """A frozen random Llama of args' shape (seeded) on args.device."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=args.vocab, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().to(args.device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def inputs(a):
    """Token ids (B, T) and labels, seeded, on a.device."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    return ids, ids.clone()


def make_step(model, emb, labels, params):
    """One training step on inputs_embeds `emb` (B, T, d), a fresh leaf each call."""
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


def interleaved(steps: dict, reps: int, warmup: int, slow: dict, device="cpu") -> dict:
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
            common._sync(device)
            t0 = time.perf_counter()
            steps[n]()
            common._sync(device)
            times[n].append(time.perf_counter() - t0)
    out = {}
    for n, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts)] * 4
        out[n] = {"median": statistics.median(ts), "p20": q[0], "p80": q[3], "n": len(ts)}
    return out


MODEL_ARGS = ("layers", "hidden", "intermediate", "vocab", "rank", "batch", "seq", "threads",
              "device")


def mem_child(a) -> None:
    """In a fresh process: peak memory growth of provider a.mem_child over 3 steps, the
    window opened after the base model is built (see the module docstring); prints JSON."""
    torch.set_num_threads(a.threads)
    base = build(a)
    ids, labels = inputs(a)
    emb = base.get_input_embeddings()(ids).detach()
    unavailable(a.mem_child)        # imports peft / pyreft: their modules are not the step's
    token = common.peak_memory_start(a.device)
    model, params, _ = setup_provider(a.mem_child, base, a, a.positions)
    step = make_step(model, emb, labels, params)
    for _ in range(3):
        step()
    print(json.dumps({"peak_bytes": common.peak_memory_growth(token, a.device)}))


def measure_memory(a, spec: str, names: list[str]) -> dict:
    """{provider: peak growth in bytes, or an error string}, one fresh process each (two at
    a time on the CPU: each measures only itself, and nothing is being timed meanwhile)."""
    argv = [sys.executable, __file__, "--positions", spec]
    for k in MODEL_ARGS:
        argv += [f"--{k}", str(getattr(a, k))]
    # freed tensors go back to the OS at once, so the peak RSS tracks live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    width = 2 if torch.device(a.device).type == "cpu" else 1
    out, todo = {}, list(names)
    while todo:
        batch, todo = todo[:width], todo[width:]
        procs = {n: subprocess.Popen(argv + ["--mem-child", n], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
                 for n in batch}
        for n, p in procs.items():
            stdout, stderr = p.communicate()
            try:
                out[n] = json.loads(stdout.strip().splitlines()[-1])["peak_bytes"]
            except (ValueError, IndexError, KeyError):
                out[n] = "memory child failed: " + (stderr.strip().splitlines() or ["?"])[-1]
    return out


def run(a, env: dict, memory: bool = True) -> list[dict]:
    """All providers at every spec of a.positions (comma-separated): report rows
    (`common.row`, op "train step"), with peak memory unless memory=False."""
    base = build(a)
    ids, labels = inputs(a)
    emb = base.get_input_embeddings()(ids).detach()
    rows = []
    for spec in a.positions.split(","):
        rows += run_spec(a, base, emb, labels, spec, env, memory)
    return rows


def run_spec(a, base, emb, labels, spec, env, memory=True):
    shape = (f"llama L={a.layers} d={a.hidden} ffn={a.intermediate} V={a.vocab} "
             f"B={a.batch} T={a.seq} r={a.rank} pos={spec} layers=all")
    notes = {n: f"skipped: {why}" for n in PROVIDERS if (why := unavailable(n))}
    names = [n for n in PROVIDERS if n not in notes]
    mem = measure_memory(a, spec, names) if memory else {}
    steps, counts = {}, {}
    for name in names:
        try:
            model, params, notes[name] = setup_provider(name, copy.deepcopy(base), a, spec)
        except Exception as e:  # an optional provider that breaks must not end the report
            notes[name] = f"error: {type(e).__name__}: {e}".replace("\n", " ")
            continue
        counts[name] = sum(p.numel() for p in params)
        steps[name] = make_step(model, emb, labels, params)
    load0 = os.getloadavg()[0]
    results = interleaved(steps, a.reps, 1, {n: a.slow_every for n in SLOW}, a.device)
    load = f"loadavg={load0:.2f}->{os.getloadavg()[0]:.2f}"
    rows = []
    for name in PROVIDERS:
        if name not in notes and name not in results:
            continue
        m = mem.get(name)
        note = "; ".join(x for x in (notes.get(name, ""), load if name in results else "",
                                     m if isinstance(m, str) else "") if x)
        rows.append(common.row(env, op="train step", provider=name, mode="step", shape=shape,
                               dtype=str(next(base.parameters()).dtype).replace("torch.", ""),
                               stats=results.get(name), params=counts.get(name),
                               peak_bytes=m if isinstance(m, (int, float)) else None,
                               notes=note))
    return rows


def parser() -> argparse.ArgumentParser:
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
                    help="time pyreft-style / pyreft only every n-th round")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    ap.add_argument("--mem-child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv=None):
    a = parser().parse_args(argv)
    if a.mem_child:
        return mem_child(a)
    import report
    torch.set_num_threads(a.threads)
    env = {**common.environment(a.device), **common.versions()}
    if a.device == "cpu":
        env["device"] = f"{common.cpu_model()}, {a.threads} threads"
    path = common.write_rows("e2e", run(a, env, memory=not a.no_memory))
    print(report.e2e_tables(report.read_rows(path)))
    print(f"CSV: {path}")


if __name__ == "__main__":
    main()
