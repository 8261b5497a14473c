"""Trains reft_ext's built-in base model and writes its instruction set (run once; the
outputs are committed under python/reft_ext/data/).

    python scripts/train_base_model.py            # ~1.5 min on 2 idle CPU cores

Text: the Python standard library's own documentation topics (``pydoc_data.topics``),
available offline in every CPython. Model: a tiny byte-level LlamaForCausalLM (4 layers,
hidden 128), trained from a fixed seed on random 128-byte windows of that text, each
paragraph wrapped in <bos> ... <eos>.

Instruction set (``python/reft_ext/data/special_names.jsonl``): for every special method
name ``__x__`` that the text mentions, {"prompt": "__x", "response": "__"}: close the
special method name and stop. The base model has read every one of those names, but after
"__len" it writes "__(self, other)..." or drifts into prose: it never stops at the name, so
its exact match is 0 and the interventions have to teach the task. ``split`` marks a fixed
quarter of the names as held out from training. ``--data-only`` rewrites just this file
(it does not depend on the model).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
from reft_ext.cli._bytetok import ByteTokenizer  # noqa: E402

DATA = ROOT / "python" / "reft_ext" / "data"


def corpus() -> list[str]:
    import pydoc_data.topics as topics
    return [topics.topics[k] for k in sorted(topics.topics)]


def write_instructions(path: Path, seed: int = 0) -> None:
    text = "\n".join(corpus())
    names = sorted(set(re.findall(r"__([a-z][a-z0-9_]*?[a-z0-9])__", text)))
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    held = set(order[: len(order) // 4])
    with open(path, "w") as f:
        for n in order:
            rec = {"prompt": f"__{n}", "response": "__",
                   "split": "heldout" if n in held else "train"}
            f.write(json.dumps(rec) + "\n")
    print(f"wrote {path} ({len(names)} records, {len(held)} held out)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DATA / "base_model")
    ap.add_argument("--data-only", action="store_true",
                    help="only (re)write the instruction set")
    args = ap.parse_args()
    if args.data_only:
        write_instructions(DATA / "special_names.jsonl")
        return 0

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    tok = ByteTokenizer()
    stream = []
    for doc in corpus():  # one <bos> ... <eos> sequence per paragraph
        for para in doc.split("\n\n"):
            if para.strip():
                stream += [tok.bos_token_id] + tok.encode(para) + [tok.eos_token_id]
    data = torch.tensor(stream, dtype=torch.long)
    print(f"corpus: {len(data):,} tokens (pydoc_data.topics)")

    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=512, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1,
                            betas=(0.9, 0.95))
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) *
        (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    gen = torch.Generator().manual_seed(0)
    model.train()
    start = time.perf_counter()
    ema = None
    for step in range(args.steps):
        idx = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,),
                            generator=gen)
        x = torch.stack([data[i: i + args.seq_len + 1] for i in idx.tolist()])
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            el = time.perf_counter() - start
            print(f"step {step:5d}  loss {ema:.3f}  {el:6.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.out)
    tok.save(args.out)
    write_instructions(DATA / "special_names.jsonl")
    print(f"saved {args.out} in {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
