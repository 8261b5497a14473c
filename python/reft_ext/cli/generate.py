"""`reft-ext generate`: greedy continuations of prompts with saved LoReFT checkpoints: one, or
several loaded as named adapters on one model, each prompt edited by its own adapter."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checkpoint import load
from ..checkpoint.adapters import INDEX_NAME
from ..checkpoint.format import CONFIG_NAME
from ..model.patch import valid_adapter_name
from ._common import DEFAULT_MODEL, Parser, UsageError, add_model_args, check_device, first_line
from ._data import read_jsonl
from ._model import generate, load_model

UNNAMED = "default"  # the adapter name of a --reft DIR (reft_ext.load's default name)
BASE = "base"        # the tag of prompts run without an adapter; not an adapter name here

EPILOG = """\
Several adapters: --reft sql=out/sql --reft chat=out/chat loads both checkpoints on one
model. --prompt prompts use the first --reft (or --adapter NAME); --prompts FILE.jsonl
gives one prompt per line, {"prompt": "...", "adapter": "sql"}, "adapter": null for the
base model, "adapter" left out for the default. All prompts run in mixed batches and each
completion is printed as [adapter] 'prompt' -> 'completion' ([base] without an adapter), in
the order given: --prompt prompts first, then the file's lines. One --reft DIR with --prompt
prints as it always has: the completion alone ('prompt' -> 'completion' for several)."""


def parse_refts(values) -> list[tuple[str, Path, str, bool]]:
    """(adapter name, checkpoint directory, the argument as errors name it, named) per --reft.
    A value that is an existing directory is a DIR, even with '=' in it; otherwise NAME=DIR
    names the adapter. A DIR is the adapter 'default'."""
    out, seen = [], {}
    for v in values:
        if "=" in v and not Path(v).is_dir():
            name, d = v.split("=", 1)
            where, named = f"--reft {name}={Path(d)}", True
            if not valid_adapter_name(name):
                raise UsageError(f"--reft {v}: bad adapter name {name!r} (letters, digits, "
                                 f"'_' and '-', not first; not an nn.ModuleDict "
                                 f"attribute such as 'keys')")
            if name == BASE:
                raise UsageError(f"--reft {v}: the name {BASE!r} is reserved (it tags the "
                                 f"prompts run without an adapter)")
        else:
            name, d = UNNAMED, v
            where, named = f"--reft {Path(d)}", False
        d = Path(d)
        if name in seen:
            why = (f" (a --reft DIR without NAME= is named {UNNAMED!r})"
                   if name == UNNAMED else "")
            raise UsageError(f"{where}: adapter {name!r} is given twice (also "
                             f"{seen[name]}){why}")
        if not (d / CONFIG_NAME).is_file():
            hint = ""
            if (d / INDEX_NAME).is_file():  # reft_ext.save_adapters: one directory each
                hint = (f"; it holds several adapters (reft_ext.save_adapters): pass "
                        f"--reft NAME={d / 'NAME'} for each")
            raise UsageError(f"{where}: not a reft_ext checkpoint directory "
                             f"(no {CONFIG_NAME}){hint}")
        seen[name] = where
        out.append((name, d, where, named))
    return out


def load_prompts(path, names, default: str) -> list[tuple[str, str | None]]:
    """(prompt, adapter name or None) per non-empty line of a --prompts JSONL file."""
    out = []
    for where, rec in read_jsonl(path, "--prompts", "\"prompt\" (and optionally \"adapter\")"):
        if not isinstance(rec.get("prompt"), str) or not rec["prompt"]:
            raise UsageError(f"{where}: \"prompt\" must be a non-empty string")
        adapter = rec.get("adapter", default)
        if adapter is not None and not isinstance(adapter, str):
            raise UsageError(f"{where}: \"adapter\" must be an adapter name or null, got "
                             f"{json.dumps(adapter)}")
        if adapter is not None and adapter not in names:
            raise UsageError(f"{where}: unknown adapter {adapter!r} (the --reft adapters: "
                             f"{', '.join(names)}; null for the base model)")
        out.append((rec["prompt"], adapter))
    if not out:
        raise UsageError(f"--prompts {path}: no prompts")
    return out


def generate_command(argv) -> int:
    ap = Parser(prog="reft-ext generate",
                description="Generate with saved LoReFT checkpoints (greedy).", epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--reft", action="append", required=True, metavar="[NAME=]DIR",
                    help="checkpoint directory from reft-ext train; NAME=DIR loads it as the "
                         "adapter NAME (repeat for several; a DIR without NAME= is named "
                         f"{UNNAMED!r}, and an existing directory is always a DIR)")
    ap.add_argument("--prompt", action="append", default=[],
                    help="prompt text (repeat for several)")
    ap.add_argument("--prompts", metavar="FILE", default=None,
                    help='JSONL file, one {"prompt": ..., "adapter": NAME or null} per line '
                         '(null: the base model; no "adapter": the default adapter)')
    ap.add_argument("--adapter", metavar="NAME", default=None,
                    help="the adapter of the --prompt prompts and of the --prompts lines "
                         "without one (default: the first --reft)")
    ap.add_argument("--max-new-tokens", type=int, default=32,
                    help="tokens generated per prompt (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    refts = parse_refts(args.reft)
    names = [r[0] for r in refts]
    default = names[0]
    if args.adapter is not None:
        if args.adapter not in names:
            raise UsageError(f"--adapter {args.adapter}: no --reft adapter of that name "
                             f"(adapters: {', '.join(names)})")
        default = args.adapter
    rows = [(p, default) for p in args.prompt]
    if args.prompts is not None:
        rows += load_prompts(args.prompts, names, default)
    if not rows:
        raise UsageError("no prompts: give --prompt TEXT or --prompts FILE")
    # Today's output (bare completion(s), no tags) for one unnamed --reft with --prompt.
    plain = (len(refts) == 1 and not refts[0][3] and args.prompts is None
             and args.adapter is None)
    check_device(args.device)
    model, tok = load_model(args.model or DEFAULT_MODEL, args.dtype, args.device)
    for name, d, where, _ in refts:
        try:
            load(model, d, adapter=name)
        except ValueError as e:  # CheckpointError and patch errors
            hint = ""
            if args.model is None:
                # Without --model the built-in model is used; a checkpoint trained on any
                # other model fails here (hidden size, layer count), and the fix is --model,
                # not the checkpoint.
                hint = ("; it was not trained on the built-in model: pass --model DIR, the "
                        "model it was trained on")
            raise UsageError(f"{where}: {first_line(e)}{hint}")
    model.eval()
    prompts = [p for p, _ in rows]
    if plain:
        outs = generate(model, tok, prompts, args.max_new_tokens, args.device)
        for p, g in zip(prompts, outs):
            print(g if len(prompts) == 1 else f"{p!r} -> {g!r}")
        return 0
    adapters = [a for _, a in rows]
    outs = generate(model, tok, prompts, args.max_new_tokens, args.device, adapters=adapters)
    for (p, a), g in zip(rows, outs):
        print(f"[{a if a is not None else BASE}] {p!r} -> {g!r}")
    return 0
