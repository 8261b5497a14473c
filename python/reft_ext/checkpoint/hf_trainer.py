"""reft_ext checkpoints inside Hugging Face Trainer checkpoints: ReftCheckpointCallback.

The class subclasses transformers.TrainerCallback, so it is built on first use (this
module's __getattr__): importing reft_ext never imports transformers.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..model.patch import adapters
from . import _dist
from ._errors import CheckpointError
from .adapters import INDEX_NAME, load_adapters, save_adapters
from .format import CONFIG_NAME, load, save

_CALLBACK_DOC = """Hugging Face Trainer callback: a reft_ext checkpoint in every Trainer
checkpoint, reloaded on resume.

    trainer = transformers.Trainer(model=patched_model, args=args, ...,
                                   callbacks=[reft_ext.ReftCheckpointCallback()])
    trainer.train()                               # writes <output_dir>/checkpoint-N/reft/
    trainer.train(resume_from_checkpoint=True)    # resumes; the callback reloads reft/

* on_save: ``reft_ext.save(model, <output_dir>/checkpoint-<global_step>/<subdir>)`` (every
  rank calls it: FSDP2 gathers, rank 0 writes); a model with several adapters (training
  them at once, see the README's "Many adapters, one model") gets
  ``reft_ext.save_adapters`` there instead.
* on_train_begin of a resumed run (global_step > 0 after the Trainer restored its state,
  optimizer and scheduler): ``reft_ext.load`` of ``<resume_from or
  output_dir/checkpoint-<global_step>>/<subdir>`` into the patched model, in place (the
  optimizer keeps its parameters). Pass ``resume_from=`` when resuming from a checkpoint
  outside ``output_dir`` (``reft_ext.load_adapters`` for a save_adapters directory).
  Patch the model, with the same layout and adapters, before building the Trainer.

Each ``checkpoint-N/<subdir>`` is also a standalone checkpoint: ``reft_ext.load(base_model,
".../checkpoint-N/reft")``.
"""


def _make_callback_class():
    from transformers import TrainerCallback

    class ReftCheckpointCallback(TrainerCallback):
        __doc__ = _CALLBACK_DOC

        def __init__(self, subdir: str = "reft", resume_from: str | os.PathLike | None = None):
            self.subdir = subdir
            self.resume_from = resume_from
            self.loaded_from: Path | None = None

        def on_save(self, args, state, control, model=None, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if len(adapters(_dist.unwrap(model)[0])) > 1:
                save_adapters(model, ckpt / self.subdir)
            else:
                save(model, ckpt / self.subdir)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.resume_from is None and not state.global_step:
                return
            ckpt = (Path(self.resume_from) if self.resume_from is not None
                    else Path(args.output_dir) / f"checkpoint-{state.global_step}")
            src = ckpt / self.subdir
            if (src / INDEX_NAME).is_file():
                load_adapters(model, src)
            elif (src / CONFIG_NAME).is_file():
                load(model, src)
            else:
                raise CheckpointError(f"reft_ext.ReftCheckpointCallback: resuming at step "
                                      f"{state.global_step} but {src} has no reft_ext "
                                      f"checkpoint; pass resume_from=")
            self.loaded_from = src

    ReftCheckpointCallback.__module__ = __name__
    ReftCheckpointCallback.__qualname__ = "ReftCheckpointCallback"
    return ReftCheckpointCallback


def __getattr__(name: str):
    if name == "ReftCheckpointCallback":       # built lazily: importing transformers is slow
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
