"""What every `reft-ext` command shares: the one-line usage error, the argument parser that
raises it, the model options and the device check."""
from __future__ import annotations

import argparse
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = DATA_DIR / "base_model"
DTYPES = ("float32", "bfloat16", "float16", "float64")


class UsageError(Exception):
    """A bad input: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def add_model_args(ap) -> None:
    ap.add_argument("--model", default=None,
                    help="local Hugging Face causal-LM directory (default: the built-in "
                         "byte-level model)")
    ap.add_argument("--dtype", default="float32", choices=DTYPES,
                    help="dtype the model is loaded in (default: %(default)s)")
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, cuda:1, ... (default: %(default)s)")


def check_device(device: str):
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device}: {first_line(e)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available")
    return dev
