"""Many adapters, one model (issue 17): greedy generation with mixed-adapter batches on the
CPU, and the bank op that serves them, against one batch / one call per adapter.

Generation: 8 LoReFT adapters on one model (reft_ext.patch(..., adapter="a0"), then
a1..a7 added to the patched model), 32 prompts of 12-28 random tokens (seeded, left-padded,
attention mask), 4 per adapter; greedy, 16 new tokens each (min_new_tokens = 16: no early
eos). Adapters: rank 4; even ones on every layer with positions f5+l5, odd ones on layers
1 and 3 with f7+l7; random init, then W and b redrawn larger (seeded) so that every adapter
changes the greedy output. Variants, timed in turns with the order rotating every round
(bench_e2e.interleaved), so drift of a shared machine falls on all alike:
  mixed      one generate of the 32 rows, reft_adapter = each row's adapter (rows of
             different adapters interleaved)
  eight      8 generates of the 4 rows of one adapter each, reft_adapter="aK" (each
             sub-batch left-padded to its own longest prompt)
  all a0     one generate of the 32 rows, every row reft_adapter="a0": the cost of one
             adapter at the mixed batch's size
Models: the built-in byte-level model (reft_ext.builtin_model(): Llama, d=128, 4 layers,
vocab 259) and a random Llama (bench_e2e.build: d=2048, 4 layers, intermediate 5504,
16 heads, vocab 32000), float32, inference mode, 2 threads. Reported: tokens/s
(32 x 16 / seconds per variant), median and p20-p80, and the ratios mixed / eight and
mixed / all a0 in tokens/s. Checked once, untimed: every row of mixed generates the same
tokens as its row in eight (and the number of rows whose adapter changes the tokens from
the base model's, reft_adapter=None).

Op alone (reft_ext.loreft_, B=32 T=64 r=4 P=10 (f5+l5), d = 2048 and the built-in's 128,
fp32, rows of adapter k = rows 4k..4k+3):
  bank, 1 call    R, W (8, r, d), b (8, r) and an index giving each row its entry
  8 calls         the plain op once per entry, the positions of the other rows -1
  1 entry         the plain op with one (R, W, b) for all rows (all a0)
Modes: "fwd, no grad" (generation's prefill), "fwd" and "fwd+bwd" as in bench_op
(training form); providers in turns (common.measure_interleaved). Checked: the bank call
and the 8 calls give the same h.

    python bench/bench_adapters.py                 # ~8 min on 2 idle cores (29 min
                                                   # under a load of 3-5 from others)
    python bench/bench_adapters.py --only random --rounds 8 --out NAME   # one part
    python bench/bench_adapters.py --quick         # smoke test (~10 s idle; a d=256
                                                   # random model, nothing written)
"""
from __future__ import annotations

import argparse
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_bank  # noqa: E402
import bench_e2e  # noqa: E402
import bench_op  # noqa: E402
import common  # noqa: E402

import reft_ext  # noqa: E402

N_ADAPTERS, PER_ADAPTER, NEW_TOKENS, RANK = 8, 4, 16, 4
PROMPT_LEN = (12, 28)
VARIANTS = ("mixed", "eight", "all a0")
OP_PROVIDERS = ("bank, 1 call", "8 calls", "1 entry")
OP_MODES = ("fwd, no grad", "fwd", "fwd+bwd")
RANDOM_MODEL = dict(hidden=2048, layers=4, intermediate=5504, vocab=32000)
QUICK_MODEL = dict(hidden=256, layers=4, intermediate=688, vocab=1024)


def adapter_spec(k: int, n_layers: int) -> dict:
    """Layers and positions of adapter k: even k every layer, f5+l5; odd k layers 1 and 3
    (of 4), f7+l7."""
    if k % 2 == 0:
        return {"layers": list(range(n_layers)), "positions": "f5+l5"}
    return {"layers": [1, n_layers - 1], "positions": "f7+l7"}


# --- models, adapters, prompts ------------------------------------------------------------

def builtin_model():
    """(model, token id range, pad id, description) of the built-in byte-level model."""
    model, tok = reft_ext.builtin_model()
    for p in model.parameters():
        p.requires_grad_(False)
    c = model.config
    desc = (f"built-in (llama d={c.hidden_size} L={c.num_hidden_layers} "
            f"ffn={c.intermediate_size} V={c.vocab_size})")
    return model, (0, 256), tok.pad_token_id, desc      # prompts of byte tokens


def random_model(hidden, layers, intermediate, vocab):
    model = bench_e2e.build(types.SimpleNamespace(hidden=hidden, layers=layers,
                                                  intermediate=intermediate, vocab=vocab,
                                                  device="cpu"))
    desc = f"random llama d={hidden} L={layers} ffn={intermediate} V={vocab}"
    return model, (3, vocab), model.config.pad_token_id, desc


def add_adapters(model, n: int = N_ADAPTERS) -> list[str]:
    """Patches model with adapters a0..a{n-1} (adapter_spec, rank RANK), each seeded; W and
    b redrawn with std 4/sqrt(d) and 1 so that the edit changes greedy outputs."""
    n_layers = len(reft_ext.find_layers(model)[1])
    d = model.config.hidden_size
    names = []
    for k in range(n):
        before = {id(p) for p in model.parameters()}
        torch.manual_seed(1000 + k)
        reft_ext.patch(model, rank=RANK, adapter=f"a{k}", **adapter_spec(k, n_layers))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if id(p) in before:
                    continue
                if name.endswith("weight"):
                    p.normal_(0.0, 4.0 / d ** 0.5)
                elif name.endswith("bias"):
                    p.normal_(0.0, 1.0)
        names.append(f"a{k}")
    model.eval()
    return names


def prompts(n: int, id_range, pad: int, gen):
    """(ids, mask): n prompts of PROMPT_LEN random tokens, left-padded to the longest."""
    lens = torch.randint(PROMPT_LEN[0], PROMPT_LEN[1] + 1, (n,), generator=gen).tolist()
    T = max(lens)
    ids = torch.full((n, T), pad, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    for i, L in enumerate(lens):
        ids[i, T - L:] = torch.randint(*id_range, (L,), generator=gen)
        mask[i, T - L:] = 1
    return ids, mask


def trim(ids, mask):
    """Drops the leading columns that are padding in every row."""
    first = int((mask.sum(0) > 0).nonzero()[0])
    return ids[:, first:], mask[:, first:]


def generation_cases(model, names, ids, mask, pad):
    """{variant: fn() -> list of 32 token-id lists, in prompt order}. Prompt i belongs to
    adapter names[i // PER_ADAPTER]; the mixed batch interleaves the adapters' rows."""
    n = len(names) * PER_ADAPTER
    owner = [names[i // PER_ADAPTER] for i in range(n)]
    order = [a * PER_ADAPTER + j for j in range(PER_ADAPTER) for a in range(len(names))]
    kw = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
              pad_token_id=pad)

    def gen(rows, adapter):
        i, m = trim(ids[rows], mask[rows])
        with torch.inference_mode():
            out = model.generate(input_ids=i, attention_mask=m, reft_adapter=adapter, **kw)
        return out[:, i.shape[1]:].tolist()

    def mixed():
        out = gen(order, [owner[i] for i in order])
        res = [None] * n
        for k, i in enumerate(order):
            res[i] = out[k]
        return res

    def eight():
        res = []
        for a, name in enumerate(names):
            res += gen(list(range(a * PER_ADAPTER, (a + 1) * PER_ADAPTER)), name)
        return res

    def all_a0():
        return gen(list(range(n)), names[0])

    def base():
        return gen(list(range(n)), [None] * n)

    return {"mixed": mixed, "eight": eight, "all a0": all_a0}, base


def run_generation(model, desc, id_range, pad, rounds, gen):
    """Stats per variant, and the untimed check {"match", "changed", "rows"}."""
    names = add_adapters(model)
    n = len(names) * PER_ADAPTER
    ids, mask = prompts(n, id_range, pad, gen)
    cases, base = generation_cases(model, names, ids, mask, pad)
    mixed, eight, ref = cases["mixed"](), cases["eight"](), base()
    check = {"rows": n, "match": sum(a == b for a, b in zip(mixed, eight)),
             "changed": sum(a != b for a, b in zip(mixed, ref)),
             "lengths": all(len(x) == NEW_TOKENS for x in mixed + eight)}
    load0 = os.getloadavg()[0]
    stats = bench_e2e.interleaved(cases, rounds, 1, {})
    check["loadavg"] = f"{load0:.2f}->{os.getloadavg()[0]:.2f}"
    check["adapters"] = "; ".join(
        f"{name}: layers {','.join(map(str, c['layers']))} {c['positions']}"
        for name, c in reft_ext.adapters(model).items())
    shape = (f"{desc} B={n} T={ids.shape[1]} new={NEW_TOKENS} adapters={len(names)} r={RANK} "
             f"pos=f5+l5/f7+l7")
    return stats, check, shape


# --- the op alone -------------------------------------------------------------------------

def op_providers(pos, r, d, gen):
    """{name: (fn(h, pos, *unused), parameters)} (bench_bank's form) on the (B, P) positions
    pos: N_ADAPTERS entries, the rows of entry k are rows k*B/N .. (k+1)*B/N - 1."""
    N, (B, P) = N_ADAPTERS, pos.shape
    owner = torch.arange(B) // (B // N)
    index = owner.to(torch.int32)[:, None].expand(B, P).contiguous()
    # positions of each call of "8 calls": the other entries' rows -1 (made once, untimed)
    pos_k = [pos.masked_fill((owner != k)[:, None], -1) for k in range(N)]
    params = bench_bank.bank_params(N, r, d, gen)
    one = bench_bank.bank_params(1, r, d, gen)

    def bank(h, pos, *_):
        return reft_ext.loreft_(h, pos, *params, index=index)

    def calls(h, _pos, *_):
        for k in range(N):
            h = reft_ext.loreft_(h, pos_k[k], params[0][k], params[1][k], params[2][k])
        return h

    def single(h, pos, *_):
        return reft_ext.loreft_(h, pos, one[0][0], one[1][0], one[2][0])

    return {"bank, 1 call": (bank, params), "8 calls": (calls, params),
            "1 entry": (single, one)}


def run_op(B, T, d, r, P, reps, gen):
    case = bench_op.make_case(B, T, d, r, P, torch.float32, "cpu", gen)
    leaf, pos = case[0], case[1]
    provs = op_providers(pos, r, d, gen)
    with torch.no_grad():
        a, b = leaf.detach().clone(), leaf.detach().clone()
        provs["bank, 1 call"][0](a, pos)
        provs["8 calls"][0](b, pos)
        same = bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5)) and not torch.equal(a, leaf)
    per = {}
    for name, (fn, params) in provs.items():
        modes = bench_op.mode_cases(fn, case, extra=params)

        def no_grad(h, fn=fn):
            with torch.no_grad():
                fn(h, pos)
        modes["fwd, no grad"] = (no_grad, lambda: leaf.detach().clone())
        per[name] = modes
    out, load0 = {}, os.getloadavg()[0]
    for mode in OP_MODES:
        cases = {name: modes[mode] for name, modes in per.items()}
        for name, stats in common.measure_interleaved(cases, reps=reps).items():
            out[(name, mode)] = stats
    return out, same, f"{load0:.2f}->{os.getloadavg()[0]:.2f}"


# --- report -------------------------------------------------------------------------------

def tok_s(stats: dict, n: int) -> dict:
    """Tokens/s of a variant's seconds: median, and p20/p80 (from the p80/p20 times)."""
    return {"median": n / stats["median"], "p20": n / stats["p80"], "p80": n / stats["p20"]}


def fmt_tok(t: dict) -> str:
    return f"{t['median']:.1f} ({t['p20']:.1f}–{t['p80']:.1f})"


def csv_row(env, stats, *, tokens_per_s="", ratio="", ratio_of="", check="", loadavg="",
            **fields):
    return common.ms_row(env, stats, **fields, tokens_per_s=tokens_per_s, ratio=ratio,
                         ratio_of=ratio_of, check=check, loadavg=loadavg)


def generation_section(env, desc, stats, check, shape, target: bool):
    n = check["rows"] * NEW_TOKENS
    t = {v: tok_s(stats[v], n) for v in VARIANTS}
    vs_eight = t["mixed"]["median"] / t["eight"]["median"]
    vs_one = t["mixed"]["median"] / t["all a0"]["median"]
    ok = check["match"] == check["rows"] and check["lengths"]
    check_txt = (f"mixed == eight row by row: {ok} ({check['match']}/{check['rows']} rows); "
                 f"rows whose adapter changes the tokens from the base model's: "
                 f"{check['changed']}/{check['rows']}")
    lines = [f"### {desc}", "", f"`{shape}`, load average {check['loadavg']}.", "",
             f"Adapters (`reft_ext.adapters`, rank {RANK}): {check['adapters']}.", ""]
    table, rows = [], []
    for v in VARIANTS:
        ratio = t["mixed"]["median"] / t[v]["median"]
        table.append([v, fmt_tok(t[v]), common.fmt_ms(stats[v]), stats[v]["n"],
                      f"{ratio:.2f}x"])
        rows.append(csv_row(env, stats[v], op="generate", provider=v, mode="greedy",
                            shape=shape, dtype="float32", tokens_per_s=t[v]["median"],
                            ratio=ratio, ratio_of="mixed tokens/s / this", check=check_txt,
                            loadavg=check["loadavg"]))
    lines += [common.markdown_table(["variant", "tokens/s (p20–p80)", "ms per variant "
                                     "(p20–p80)", "n", "mixed ÷ this (tokens/s)"], table), ""]
    lines.append(f"- mixed vs eight single-adapter batches: {vs_eight:.2f}x the tokens/s"
                 + (f" (target ≥ 2x: {'met' if vs_eight >= 2 else 'NOT met'})" if target
                    else ""))
    lines.append(f"- mixed vs all rows on a0: {vs_one:.2f}x the tokens/s, "
                 f"{(vs_one - 1) * 100:+.1f}%"
                 + (f" (target within 10%: {'met' if vs_one >= 0.9 else 'NOT met'})" if target
                    else ""))
    lines.append(f"- Check (untimed): {check_txt}.")
    return lines + [""], rows


def op_section(env, res, same, load, shape):
    lines = [f"### {shape}", "", f"Load average {load}.", ""]
    table, rows = [], []
    for name in OP_PROVIDERS:
        cells = [name]
        for mode in OP_MODES:
            s = res[(name, mode)]
            ratio = s["median"] / res[("bank, 1 call", mode)]["median"]
            cells.append(f"{common.fmt_ms(s)} ({ratio:.2f}x)")
            rows.append(csv_row(env, s, op="loreft_", provider=name, mode=mode, shape=shape,
                                dtype="float32", ratio=ratio, ratio_of="this / bank, 1 call",
                                check=f"bank == 8 calls: {same}", loadavg=load))
        table.append(cells)
    lines += [common.markdown_table(["provider"] + [f"{m} ms (vs bank)" for m in OP_MODES],
                                    table), ""]
    lines += ["- 8 calls / bank, 1 call: " + ", ".join(
        f"{m} {res[('8 calls', m)]['median'] / res[('bank, 1 call', m)]['median']:.2f}x"
        for m in OP_MODES) + f"; bank == 8 calls (h after the edit): {same}.", ""]
    return lines, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds of generation")
    ap.add_argument("--reps", type=int, default=50, help="repeats of the op alone")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: a d=256 random model, 2 rounds, nothing written")
    ap.add_argument("--only", default="builtin,random,op",
                    help="comma-separated parts: builtin, random (the generation tables), op")
    ap.add_argument("--out", default="bench_adapters-cpu")
    args = ap.parse_args(argv)
    rounds, reps = (2, 5) if args.quick else (args.rounds, args.reps)
    rand = QUICK_MODEL if args.quick else RANDOM_MODEL
    env = common.environment()
    gen = torch.Generator().manual_seed(0)
    rows, lines = [], [common.machine_line(env), "", "## Greedy generation, 8 adapters", ""]
    print("\n".join(lines), flush=True)
    parts = set(args.only.split(","))
    for part, make, target in (("builtin", builtin_model, False),
                               ("random", lambda: random_model(**rand), True)):
        if part not in parts:
            continue
        model, id_range, pad, desc = make()
        # prompts seeded per model: the same whichever parts run
        stats, check, shape = run_generation(model, desc, id_range, pad, rounds,
                                             torch.Generator().manual_seed(0))
        more, r = generation_section(env, desc, stats, check, shape,
                                     target and rand["hidden"] == 2048)
        lines += more
        rows += r
        print("\n".join(more), flush=True)       # each section as it is done
        del model
    more = ["## The op alone: 8 adapters in one bank call vs 8 calls", ""]
    if "op" in parts:
        lines += more
        print("\n".join(more), flush=True)
    widths = (rand["hidden"], builtin_model()[0].config.hidden_size)
    for d in (widths if "op" in parts else []):
        B, T, P = N_ADAPTERS * PER_ADAPTER, 64, 10
        res, same, load = run_op(B, T, d, RANK, P, reps, gen)
        more, r = op_section(env, res, same, load, f"B={B} T={T} d={d} r={RANK} P={P} N=8")
        lines += more
        rows += r
        print("\n".join(more), flush=True)
    text = "\n".join(lines)
    if not args.quick:
        common.write_rows(args.out, rows)
        (common.RESULTS / f"{args.out}.md").write_text(
            "# bench_adapters: mixed-adapter batches vs one batch per adapter (CPU)\n\n"
            "Median (p20–p80) of interleaved repeats; ratios between variants of the same "
            "run.\n`" + " ".join(["python bench/bench_adapters.py",
                                  *(sys.argv[1:] if argv is None else argv)]) + "`\n\n"
            + text + "\n")


if __name__ == "__main__":
    main()
