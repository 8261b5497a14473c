"""reft_ext: fused kernels for Representation Finetuning (LoReFT) in PyTorch.

    out = reft_ext.loreft(h, positions, R, W, b)    # new tensor
    reft_ext.loreft_(h, positions, R, W, b)         # edits h's selected rows in place

The public API, nothing else. The package in layers, each importing only those below it:
cli -> checkpoint -> model -> bank -> modules (the interventions) -> ops -> _native /
_build.
"""
from __future__ import annotations

from ._build import build_info
from ._version import __version__
from .model.layers import find_layers
from .model.patch import (adapters, delete_adapter, disabled, interventions, is_patched,
                          patch, print_trainable_parameters, set_adapter, unpatch,
                          use_positions)
from .model.positions import (PositionSpec, parse_positions, positions_from_lengths,
                              positions_from_mask, positions_from_prompt)
from .bank import Untied
from .modules import (ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT, NoReFT,
                      orthonormal_rows)
from .ops import loreft, loreft_, loreft_reference, loreft_reference_
from .checkpoint import (CheckpointError, load, load_adapters, load_optimizer, load_pyreft,
                         save, save_adapters)

# ``with reft_ext.positions(model, t):`` is the documented short name of use_positions.
# A plain alias: no module is named reft_ext.positions (the spec helpers are in
# reft_ext.model.positions), so neither can shadow the other.
positions = use_positions

__all__ = ["loreft", "loreft_", "loreft_reference", "loreft_reference_", "build_info",
           "__version__"]
__all__ += ["positions", "PositionSpec", "parse_positions", "positions_from_lengths",
            "positions_from_mask", "positions_from_prompt", "LoReFT", "NoReFT", "ConsReFT",
            "LobiReFT", "DiReFT", "NodiReFT", "Untied",
            "orthonormal_rows", "disabled", "find_layers", "interventions", "is_patched",
            "patch", "print_trainable_parameters", "unpatch", "use_positions", "adapters",
            "set_adapter", "delete_adapter"]
__all__ += ["save", "load", "save_adapters", "load_adapters", "load_optimizer", "load_pyreft",
            "CheckpointError",
            "ReftCheckpointCallback", "builtin_model"]


def __getattr__(name):
    # reft_ext.ReftCheckpointCallback (a transformers.TrainerCallback) is built on first
    # use, so `import reft_ext` does not import transformers.
    if name == "ReftCheckpointCallback":
        from .checkpoint.hf_trainer import ReftCheckpointCallback
        return ReftCheckpointCallback
    if name == "builtin_model":     # imports transformers when called, not here
        from .cli._model import builtin_model
        return builtin_model
    raise AttributeError(f"module 'reft_ext' has no attribute {name!r}")
