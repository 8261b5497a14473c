"""`reft-ext train` and `reft-ext generate` (also `python -m reft_ext train|generate`).

    train.py     the train command: arguments, training loop, before/after report
    generate.py  the generate command
    _data.py     JSONL records, splits and batches   _model.py  model, tokenizer, generation
    _common.py   usage errors, shared options        _bytetok.py the built-in tokenizer

With no --model / --data they use the built-in byte-level model and instruction set in
reft_ext/data (see scripts/train_base_model.py). Bad inputs print one line on stderr and
exit with status 2; nothing is written then.
"""
from __future__ import annotations

import sys

from ._common import DEFAULT_MODEL, UsageError
from ._data import DEFAULT_DATA, load_data
from .generate import generate_command
from .train import train_command

__all__ = ["run", "COMMANDS", "UsageError", "DEFAULT_MODEL", "DEFAULT_DATA", "load_data"]

COMMANDS = {"train": train_command, "generate": generate_command}


def run(command: str, argv) -> int:
    try:
        return COMMANDS[command](argv)
    except UsageError as e:
        print(f"reft-ext {command}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # -h / --help: argparse printed the help and exits 0
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"reft-ext {command}: interrupted", file=sys.stderr)
        return 130
