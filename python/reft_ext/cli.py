"""`reft-ext train` and `reft-ext generate` (also `python -m reft_ext train|generate`).

`train` fits LoReFT interventions (reft_ext.patch) on a JSONL of {"prompt", "response"}
records: the interventions edit prompt positions, the loss covers the response tokens.
It saves them with reft_ext.save and reports greedy exact match on training and held-out
prompts, before (frozen base) and after. With no --model / --data it uses the built-in
byte-level model and instruction set in reft_ext/data (see scripts/train_base_model.py).

Bad inputs print one line on stderr and exit with status 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = DATA_DIR / "base_model"
DEFAULT_DATA = DATA_DIR / "special_names.jsonl"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class UsageError(Exception):
    """A bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


# ---------------------------------------------------------------------------- inputs

class _HFTokenizer:
    """The few calls the CLI needs, on a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.eos_token_id
        if eos is None:
            raise UsageError("the model's tokenizer has no eos token")
        self.eos_token_id = eos
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos

    def encode_prompt(self, text):
        return list(self.tok(text)["input_ids"])

    def encode_response(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class _ByteTok:
    def __init__(self):
        from ._bytetok import ByteTokenizer
        self.tok = ByteTokenizer()
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = self.tok.pad_token_id

    def encode_prompt(self, text):
        return [self.tok.bos_token_id] + self.tok.encode(text)

    def encode_response(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(path, dtype_name: str, device: str):
    """(model, tokenizer) from a local Hugging Face model directory; UsageError if it is
    not one (or not a causal LM)."""
    import torch
    from ._bytetok import TOKENIZER_FILE

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--model {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"--model {path}: not a directory (expected a Hugging Face model "
                         f"directory with config.json)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {path}: no config.json (not a Hugging Face model "
                         f"directory)")
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input
        raise UsageError(f"--model {path}: cannot read config.json: {_first_line(e)}")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"--model {path}: model type {config.model_type!r} is not a causal "
                         f"language model (AutoModelForCausalLM does not support it)")
    dtype = getattr(torch, dtype_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model {path}: cannot load the model: {_first_line(e)}")
    if (path / TOKENIZER_FILE).is_file():
        tok = _ByteTok()
    else:
        try:
            tok = _HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--model {path}: cannot load its tokenizer: {_first_line(e)}")
    try:
        model.to(device)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--device {device}: {_first_line(e)}")
    model.eval()
    return model, tok


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def load_data(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--data {path}: cannot read: {_first_line(e)}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--data {path}:{n}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            raise UsageError(f"--data {path}:{n}: expected a JSON object with \"prompt\" and "
                             f"\"response\"")
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise UsageError(f"--data {path}:{n}: \"{key}\" must be a non-empty string")
        split = rec.get("split", "train")
        if split not in ("train", "heldout"):
            raise UsageError(f"--data {path}:{n}: \"split\" must be \"train\" or \"heldout\"")
        records.append({"prompt": rec["prompt"], "response": rec["response"],
                        "split": split, "explicit": "split" in rec})
    if not records:
        raise UsageError(f"--data {path}: no records")
    return records


def split_data(records, heldout_fraction: float, seed: int):
    if any(r["explicit"] for r in records):
        train = [r for r in records if r["split"] == "train"]
        held = [r for r in records if r["split"] == "heldout"]
    else:
        order = records[:]
        random.Random(seed).shuffle(order)
        k = int(len(order) * heldout_fraction)
        held, train = order[:k], order[k:]
    if not train:
        raise UsageError("--data: no training records (all are marked \"heldout\")")
    return train, held


def parse_layers(text: str, n_layers: int) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: expected comma-separated integers, e.g. 1,3")
    if not ids:
        raise UsageError("--layers: empty")
    for i in ids:
        if not -n_layers <= i < n_layers:
            raise UsageError(f"--layers {text}: layer {i} is out of range (the model has "
                             f"{n_layers} layers: 0..{n_layers - 1})")
    norm = [i % n_layers for i in ids]
    if len(set(norm)) != len(norm):
        raise UsageError(f"--layers {text}: a layer is listed twice")
    return norm


# ---------------------------------------------------------------------------- batches

def _encode(tok, records):
    out = []
    for r in records:
        p = tok.encode_prompt(r["prompt"])
        a = tok.encode_response(r["response"]) + [tok.eos_token_id]
        out.append((p, a))
    return out


def _train_batch(pairs, tok, spec, device):
    import torch
    import reft_ext

    T = max(len(p) + len(a) for p, a in pairs)
    B = len(pairs)
    ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)
        mask[i, :len(seq)] = 1
    pos = reft_ext.positions_from_prompt(spec, [len(p) for p, _ in pairs], mask)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device), "reft_positions": pos.to(device)}


def generate(model, tok, prompts: list[str], max_new_tokens: int, device,
             batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded up to eos; a
    continuation that did not reach eos within ``max_new_tokens`` ends in "..."."""
    import torch

    outs = []
    for s in range(0, len(prompts), batch_size):
        enc = [tok.encode_prompt(p) for p in prompts[s:s + batch_size]]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, T - len(e):] = torch.tensor(e)
            mask[i, T - len(e):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
        for row in gen[:, T:].tolist():
            stopped = tok.eos_token_id in row
            if stopped:
                row = row[:row.index(tok.eos_token_id)]
            outs.append(tok.decode(row) + ("" if stopped else "..."))
    return outs


def evaluate(model, tok, records, max_new_tokens, device):
    if not records:
        return 0, 0, []
    got = generate(model, tok, [r["prompt"] for r in records], max_new_tokens, device)
    # exact: the generation must stop (eos) right after the response; "..." marks one
    # that ran on to max_new_tokens
    hits = [not g.endswith("...") and g.strip() == r["response"].strip()
            for g, r in zip(got, records)]
    return sum(hits), len(records), list(zip(records, got, hits))


# ---------------------------------------------------------------------------- commands

def _common_model_args(ap):
    ap.add_argument("--model", default=None,
                    help="local Hugging Face causal-LM directory (default: the built-in "
                         "byte-level model)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")


def _check_device(device: str):
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {_first_line(e)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    return dev


def _check_output(out: Path):
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"--output {out}: exists and is not a directory")
        if any(out.iterdir()) and not (out / "reft_config.json").is_file():
            raise UsageError(f"--output {out}: a non-empty directory that is not a reft_ext "
                             f"checkpoint (refusing to overwrite it)")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--output {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output {out}: parent directory {parent} is not writable")


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def train_command(argv) -> int:
    ap = _Parser(prog="reft-ext train", description="Train LoReFT interventions on a JSONL "
                 "of {\"prompt\", \"response\"} records, save them, and report exact match.")
    _common_model_args(ap)
    ap.add_argument("--data", default=None, help="JSONL of {\"prompt\", \"response\"} "
                    "(optional \"split\": \"train\"|\"heldout\"); default: built-in set")
    ap.add_argument("--layers", default=None,
                    help="comma-separated layer indices (default: the middle layer)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--positions", default="f7+l7",
                    help="positions edited within the prompt (default f7+l7)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides "
                    "--epochs)")
    ap.add_argument("--epochs", type=float, default=None,
                    help="passes over the training records (default 40)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--heldout-fraction", type=float, default=0.1,
                    help="records held out for evaluation when the data has no \"split\" "
                         "fields (default 0.1)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation length for evaluation (default: longest response + 3)")
    ap.add_argument("--examples", type=int, default=4, help="examples printed per split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="reft_out", help="checkpoint directory "
                    "(default ./reft_out)")
    args = ap.parse_args(argv)

    if args.rank < 1:
        raise UsageError(f"--rank {args.rank}: must be >= 1")
    for name in ("steps", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if args.epochs is not None and not args.epochs > 0:
        raise UsageError(f"--epochs {args.epochs}: must be > 0")
    if not args.lr > 0:
        raise UsageError(f"--lr {args.lr}: must be > 0")
    if not 0 <= args.heldout_fraction < 1:
        raise UsageError(f"--heldout-fraction {args.heldout_fraction}: must be in [0, 1)")
    from .model.positions import parse_positions
    try:
        spec = parse_positions(args.positions)
    except ValueError as e:
        raise UsageError(f"--positions {args.positions}: {_first_line(e)}")
    out = Path(args.output)
    _check_output(out)
    records = load_data(args.data or DEFAULT_DATA)
    device = _check_device(args.device)

    import torch
    import reft_ext

    model, tok = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    try:
        _, container = reft_ext.find_layers(model)
    except ValueError as e:
        raise UsageError(f"--model: cannot find the decoder layers: {_first_line(e)}")
    n_layers = len(container)
    layers = parse_layers(args.layers, n_layers) if args.layers else [n_layers // 2]
    from .model.layers import hidden_size
    d = hidden_size(model, list(container.children())[layers[0]])
    if args.rank > d:
        raise UsageError(f"--rank {args.rank}: exceeds the hidden size d={d}")

    train, held = split_data(records, args.heldout_fraction, args.seed)
    train_enc = _encode(tok, train)
    max_new = args.max_new_tokens or (max(len(a) for _, a in _encode(tok, records)) + 3)
    per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.steps or max(1, round((args.epochs or 40) * per_epoch))

    name = "built-in model" if args.model is None else str(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {name} ({type(model).__name__}, {n_layers} layers, d={d}, "
          f"{n_params:,} params, {args.dtype}, {device})")
    print(f"data: {args.data or 'built-in special method names (' + DEFAULT_DATA.name + ')'}"
          f": {len(train)} training / {len(held)} held-out records")
    print(f"task example: {train[0]['prompt']!r} -> {train[0]['response']!r}")

    # BEFORE: the frozen base model
    before_tr, ntr, before_ex_tr = evaluate(model, tok, train, max_new, device)
    before_ho, nho, before_ex = evaluate(model, tok, held, max_new, device)

    torch.manual_seed(args.seed)
    try:
        reft_ext.patch(model, layers=layers, rank=args.rank, positions=spec)
    except ValueError as e:
        raise UsageError(f"cannot patch the model: {_first_line(e)}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoReFT: layers {layers}, rank {args.rank}, positions {args.positions} of the "
          f"prompt; trainable params: {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%)")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * (1 - s / steps))
    rng = random.Random(args.seed)
    order: list[int] = []
    tty = sys.stdout.isatty()
    model.train()
    start = time.perf_counter()
    tokens = 0
    ema = None
    report_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        if len(order) < args.batch_size:
            perm = list(range(len(train_enc)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:args.batch_size], order[args.batch_size:]
        batch = _train_batch([train_enc[i] for i in idx], tok, spec, device)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        el = time.perf_counter() - start
        line = (f"train {step:5d}/{steps}  loss {ema:.4f}  "
                f"{_fmt_rate(tokens / max(el, 1e-9))} tok/s  {el:5.1f}s")
        if tty:
            bar = "#" * (20 * step // steps)
            print(f"\r[{bar:<20}] {line}", end="", flush=True)
        elif step % report_every == 0 or step == steps:
            print(line, flush=True)
    if tty:
        print()
    model.eval()
    train_time = time.perf_counter() - start
    try:
        reft_ext.save(model, out)
    except (OSError, ValueError) as e:  # save is atomic: nothing half-written is left
        raise UsageError(f"--output {out}: cannot save: {_first_line(e)}")
    print(f"trained {steps} steps in {train_time:.1f}s; saved the interventions to {out}/")

    after_tr, _, ex_tr = evaluate(model, tok, train, max_new, device)
    after_ho, _, ex_ho = evaluate(model, tok, held, max_new, device)

    def pct(a, n):
        return f"{a:3d}/{n:<3d} ({100 * a / n:5.1f}%)" if n else "  -  (no records)"
    print("exact match (greedy):     frozen base        with LoReFT")
    print(f"  training prompts     {pct(before_tr, ntr)}   {pct(after_tr, ntr)}")
    print(f"  held-out prompts     {pct(before_ho, nho)}   {pct(after_ho, nho)}")
    before_by_prompt = {r["prompt"]: g for r, g, _ in before_ex + before_ex_tr}
    for title, ex in (("held-out", ex_ho), ("training", ex_tr)):
        if not ex or args.examples <= 0:
            continue
        print(f"examples ({title}):")
        for r, g, hit in ex[:args.examples]:
            base = before_by_prompt.get(r["prompt"])
            line = f"  {r['prompt']!r:24} -> {g!r}  {'ok' if hit else 'WRONG, want ' + repr(r['response'])}"
            if base is not None:
                line += f"   (base: {base[:30]!r})"
            print(line)
    return 0


def generate_command(argv) -> int:
    ap = _Parser(prog="reft-ext generate",
                 description="Generate with a saved LoReFT checkpoint (greedy).")
    _common_model_args(ap)
    ap.add_argument("--reft", required=True, help="checkpoint directory from reft-ext train")
    ap.add_argument("--prompt", action="append", required=True,
                    help="prompt text (repeat for several)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    reft_dir = Path(args.reft)
    if not (reft_dir / "reft_config.json").is_file():
        raise UsageError(f"--reft {reft_dir}: not a reft_ext checkpoint directory "
                         f"(no reft_config.json)")
    _check_device(args.device)
    import reft_ext
    model, tok = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    try:
        reft_ext.load(model, reft_dir)
    except ValueError as e:  # CheckpointError and patch errors
        raise UsageError(f"--reft {reft_dir}: {_first_line(e)}")
    model.eval()
    outs = generate(model, tok, args.prompt, args.max_new_tokens, args.device)
    for p, g in zip(args.prompt, outs):
        print(g if len(args.prompt) == 1 else f"{p!r} -> {g!r}")
    return 0


COMMANDS = {"train": train_command, "generate": generate_command}


def run(command: str, argv) -> int:
    try:
        return COMMANDS[command](argv)
    except UsageError as e:
        print(f"reft-ext {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reft-ext {command}: interrupted", file=sys.stderr)
        return 130
