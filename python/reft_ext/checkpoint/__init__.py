"""Checkpoints of patched models:

    format.py      reft_ext's own format: save, load, load_optimizer, read_config
    pyreft.py      import of pyreft / pyvene saves (load_pyreft)
    adapters.py    all adapters of a model in one directory (save_adapters, load_adapters)
    hf_trainer.py  ReftCheckpointCallback for the Hugging Face Trainer (built lazily)
    _fill.py       the patch-and-fill step that load and load_pyreft share
    _atomic.py     atomic directory writes     _dist.py   DDP / FSDP2 unwrapping, shards

Every failure to read or to fit a checkpoint raises CheckpointError (a ValueError) before
the model is changed.
"""
from __future__ import annotations

from ._errors import CheckpointError
from .format import (CONFIG_NAME, FORMAT_VERSION, OPTIMIZER_NAME, WEIGHTS_NAME, load,
                     load_optimizer, read_config, save)
from .pyreft import load_pyreft, read_pyreft
from .adapters import load_adapters, save_adapters

__all__ = ["save", "load", "save_adapters", "load_adapters", "load_optimizer", "load_pyreft",
           "read_pyreft", "read_config", "CheckpointError", "ReftCheckpointCallback", "FORMAT_VERSION", "CONFIG_NAME",
           "WEIGHTS_NAME", "OPTIMIZER_NAME"]


def __getattr__(name: str):
    if name == "ReftCheckpointCallback":       # built lazily: importing transformers is slow
        from .hf_trainer import ReftCheckpointCallback
        return ReftCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
