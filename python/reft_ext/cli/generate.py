"""`reft-ext generate`: greedy continuations of prompts with a saved LoReFT checkpoint."""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import load
from ..checkpoint.format import CONFIG_NAME
from ._common import DEFAULT_MODEL, Parser, UsageError, add_model_args, check_device, first_line
from ._model import generate, load_model


def generate_command(argv) -> int:
    ap = Parser(prog="reft-ext generate",
                description="Generate with a saved LoReFT checkpoint (greedy).")
    add_model_args(ap)
    ap.add_argument("--reft", required=True, help="checkpoint directory from reft-ext train")
    ap.add_argument("--prompt", action="append", required=True,
                    help="prompt text (repeat for several)")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="tokens generated per prompt (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    reft_dir = Path(args.reft)
    if not (reft_dir / CONFIG_NAME).is_file():
        raise UsageError(f"--reft {reft_dir}: not a reft_ext checkpoint directory "
                         f"(no {CONFIG_NAME})")
    check_device(args.device)
    model, tok = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    try:
        load(model, reft_dir)
    except ValueError as e:  # CheckpointError and patch errors
        hint = ""
        if args.model is None:
            # Without --model the built-in model is used; a checkpoint trained on any other
            # model fails here (hidden size, layer count), and the fix is --model, not the
            # checkpoint.
            hint = ("; it was not trained on the built-in model: pass --model DIR, the "
                    "model it was trained on")
        raise UsageError(f"--reft {reft_dir}: {first_line(e)}{hint}")
    model.eval()
    outs = generate(model, tok, args.prompt, args.max_new_tokens, args.device)
    for p, g in zip(args.prompt, outs):
        print(g if len(args.prompt) == 1 else f"{p!r} -> {g!r}")
    return 0
