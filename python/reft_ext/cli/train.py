"""`reft-ext train`: fits LoReFT interventions (reft_ext.patch) on a JSONL of {"prompt",
"response"} records: the interventions edit prompt positions, the loss covers the response
tokens. It saves them with reft_ext.save and reports greedy exact match on training and
held-out prompts, before (frozen base) and after.

Three parts: TrainArgs (the validated arguments), train_loop (the optimisation) and
report (the before/after table); train_command strings them together.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path

from ..checkpoint import CheckpointError, save
from ..checkpoint.format import check_target
from ..model.layers import find_layers, hidden_size, normalise_layers
from ..model.patch import patch, trainable_counts
from ..model.positions import PositionSpec, parse_positions
from ._common import DEFAULT_MODEL, Parser, UsageError, add_model_args, check_device, first_line
from ._data import DEFAULT_DATA, encode, load_data, split_data, train_batch
from ._model import generate, load_model


@dataclasses.dataclass
class TrainArgs:
    """The arguments of `reft-ext train`, validated (see from_argv for their meaning)."""

    model: str | None
    dtype: str
    device: str
    data: str | None
    layers: str | None
    rank: int
    positions: str
    steps: int | None
    epochs: float | None
    lr: float
    batch_size: int
    heldout_fraction: float
    max_new_tokens: int | None
    examples: int
    seed: int
    output: str
    spec: PositionSpec | None = dataclasses.field(default=None, init=False)  # of positions

    @classmethod
    def from_argv(cls, argv) -> "TrainArgs":
        ap = Parser(prog="reft-ext train", description="Train LoReFT interventions on a JSONL "
                    "of {\"prompt\", \"response\"} records, save them, and report exact match.")
        add_model_args(ap)
        ap.add_argument("--data", default=None, help="JSONL of {\"prompt\", \"response\"} "
                        "(optional \"split\": \"train\"|\"heldout\"; default: the built-in set)")
        ap.add_argument("--layers", default=None,
                        help="comma-separated layer indices (negative count from the end) "
                             "or 'all' (default: the middle layer)")
        ap.add_argument("--rank", type=int, default=4,
                        help="rank of each intervention (default: %(default)s)")
        ap.add_argument("--positions", default="f7+l7",
                        help="positions edited within the prompt (default: %(default)s)")
        ap.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides "
                        "--epochs; default: from --epochs)")
        ap.add_argument("--epochs", type=float, default=None,
                        help="passes over the training records (default: 40)")
        ap.add_argument("--lr", type=float, default=1e-2,
                        help="AdamW learning rate (default: %(default)s)")
        ap.add_argument("--batch-size", type=int, default=16,
                        help="records per optimizer step (default: %(default)s)")
        ap.add_argument("--heldout-fraction", type=float, default=0.1,
                        help="records held out for evaluation when the data has no \"split\" "
                             "fields (default: %(default)s)")
        ap.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation length for evaluation (default: longest response + 3)")
        ap.add_argument("--examples", type=int, default=4,
                        help="examples printed per split (default: %(default)s)")
        ap.add_argument("--seed", type=int, default=0,
                        help="seed of the split, initialisation and batch order "
                             "(default: %(default)s)")
        ap.add_argument("--output", default="reft_out", help="checkpoint directory "
                        "(default: ./%(default)s)")
        args = cls(**vars(ap.parse_args(argv)))
        args.validate()
        return args

    def validate(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--rank {self.rank}: must be >= 1")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UsageError(f"--{name.replace('_', '-')} {v}: must be >= 1")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs {self.epochs}: must be > 0")
        if not self.lr > 0:
            raise UsageError(f"--lr {self.lr}: must be > 0")
        if not 0 <= self.heldout_fraction < 1:
            raise UsageError(f"--heldout-fraction {self.heldout_fraction}: must be in [0, 1)")
        try:
            self.spec = parse_positions(self.positions)
        except ValueError as e:
            raise UsageError(f"--positions {self.positions}: {first_line(e)}")


def _check_output(out: Path) -> None:
    """The library's rule for where a checkpoint may go, checked before any work, plus a
    writable parent directory."""
    try:
        check_target(out, f"--output {out}:")
    except CheckpointError as e:
        raise UsageError(str(e))
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"--output {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output {out}: parent directory {parent} is not writable")


def _layers(model, text: str | None) -> tuple[list[int], int, int]:
    """(patched layer indices, number of layers, hidden size d) of --layers on model."""
    try:
        _, container = find_layers(model)
    except ValueError as e:
        raise UsageError(f"--model: cannot find the decoder layers: {first_line(e)}")
    n = len(container)
    if text and text.strip() == "all":  # as patch(model, layers="all")
        layers = normalise_layers("all", n)
    elif text:
        try:
            ids = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected comma-separated "
                             "integers, e.g. 1,3, or 'all'")
        try:
            layers = normalise_layers(ids, n, what=f"--layers {text}")
        except ValueError as e:
            raise UsageError(str(e))
    else:
        layers = [n // 2]
    return layers, n, hidden_size(model, list(container.children())[layers[0]])


def evaluate(model, tok, records, max_new_tokens, device):
    if not records:
        return 0, 0, []
    got = generate(model, tok, [r["prompt"] for r in records], max_new_tokens, device)
    # exact: the generation must stop (eos) right after the response; "..." marks one
    # that ran on to max_new_tokens
    hits = [not g.endswith("...") and g.strip() == r["response"].strip()
            for g, r in zip(got, records)]
    return sum(hits), len(records), list(zip(records, got, hits))


def _fmt_rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


def train_loop(model, tok, train_enc, args: TrainArgs, spec, device, steps: int) -> float:
    """AdamW with a linear warm-up and decay over `steps` batches of shuffled records,
    printing the loss and throughput (a progress bar on a terminal); returns the seconds
    spent."""
    import torch

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
        batch = train_batch([train_enc[i] for i in idx], tok, spec, device)
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
    return time.perf_counter() - start


def report(before: dict, after: dict, examples: int) -> None:
    """The exact-match table, before (frozen base) and after training, and examples.
    before / after: {"training" | "held-out": evaluate()'s (hits, n, examples)}."""
    def pct(a, n):
        return f"{a:3d}/{n:<3d} ({100 * a / n:5.1f}%)" if n else "  -  (no records)"
    print("exact match (greedy):     frozen base        with LoReFT")
    for title in ("training", "held-out"):
        (b, n, _), (a, _, _) = before[title], after[title]
        print(f"  {title + ' prompts':<21}{pct(b, n)}   {pct(a, n)}")
    before_by_prompt = {r["prompt"]: g for title in ("held-out", "training")
                        for r, g, _ in before[title][2]}
    for title in ("held-out", "training"):
        ex = after[title][2]
        if not ex or examples <= 0:
            continue
        print(f"examples ({title}):")
        for r, g, hit in ex[:examples]:
            base = before_by_prompt.get(r["prompt"])
            verdict = "ok" if hit else "WRONG, want " + repr(r["response"])
            line = f"  {r['prompt']!r:24} -> {g!r}  {verdict}"
            if base is not None:
                line += f"   (base: {base[:30]!r})"
            print(line)


def train_command(argv) -> int:
    args = TrainArgs.from_argv(argv)
    spec = args.spec
    out = Path(args.output)
    _check_output(out)
    records = load_data(args.data or DEFAULT_DATA)
    device = check_device(args.device)

    import torch

    model, tok = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    layers, n_layers, d = _layers(model, args.layers)
    if args.rank > d:
        raise UsageError(f"--rank {args.rank}: exceeds the hidden size d={d}")

    train, held = split_data(records, args.heldout_fraction, args.seed)
    train_enc = encode(tok, train)
    max_new = args.max_new_tokens or (max(len(a) for _, a in encode(tok, records)) + 3)
    per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.steps or max(1, round((args.epochs or 40) * per_epoch))

    name = "built-in model" if args.model is None else str(args.model)
    print(f"model: {name} ({type(model).__name__}, {n_layers} layers, d={d}, "
          f"{trainable_counts(model)[1]:,} params, {args.dtype}, {device})")
    print(f"data: {args.data or 'built-in special method names (' + DEFAULT_DATA.name + ')'}"
          f": {len(train)} training / {len(held)} held-out records")
    print(f"task example: {train[0]['prompt']!r} -> {train[0]['response']!r}")

    splits = {"training": train, "held-out": held}
    before = {t: evaluate(model, tok, recs, max_new, device) for t, recs in splits.items()}
    torch.manual_seed(args.seed)
    try:
        patch(model, layers=layers, rank=args.rank, positions=spec)
    except ValueError as e:
        raise UsageError(f"cannot patch the model: {first_line(e)}")
    trainable, total = trainable_counts(model)
    print(f"LoReFT: layers {layers}, rank {args.rank}, positions {args.positions} of the "
          f"prompt; trainable params: {trainable:,} of {total:,} "
          f"({100 * trainable / total:.4f}%)")
    train_time = train_loop(model, tok, train_enc, args, spec, device, steps)
    try:
        save(model, out)
    except (OSError, ValueError) as e:  # save is atomic: nothing half-written is left
        raise UsageError(f"--output {out}: cannot save: {first_line(e)}")
    print(f"trained {steps} steps in {train_time:.1f}s; saved the interventions to {out}/")
    after = {t: evaluate(model, tok, recs, max_new, device) for t, recs in splits.items()}
    report(before, after, args.examples)
    return 0
