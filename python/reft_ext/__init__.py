"""reft_ext: fused kernels for Representation Finetuning (LoReFT) in PyTorch.

    out = reft_ext.loreft(h, positions, R, W, b)    # new tensor
    reft_ext.loreft_(h, positions, R, W, b)         # edits h's selected rows in place
"""
from __future__ import annotations

from ._version import __version__
from .ops import loreft, loreft_, loreft_reference, loreft_reference_  # noqa: E402
from ._build import build_info  # noqa: E402
from . import positions  # noqa: E402  (module; also callable: reft_ext.positions(model, pos))
from .positions import (PositionSpec, parse_positions, positions_from_lengths,  # noqa: E402
                        positions_from_mask, positions_from_prompt)
from .interventions import DiReFT, LoReFT, orthonormal_rows  # noqa: E402
from . import interventions  # noqa: E402  (module; also callable: reft_ext.interventions(m))
from .patch import (disabled, find_layers, is_patched, patch,  # noqa: E402
                    print_trainable_parameters, unpatch, use_positions)

__all__ = ["loreft", "loreft_", "loreft_reference", "loreft_reference_", "build_info",
           "__version__"]
__all__ += ["positions", "PositionSpec", "parse_positions", "positions_from_lengths",
            "positions_from_mask", "positions_from_prompt", "DiReFT", "LoReFT",
            "orthonormal_rows", "disabled", "find_layers", "interventions", "is_patched",
            "patch", "print_trainable_parameters", "unpatch", "use_positions"]
from .io import CheckpointError, load, load_optimizer, load_pyreft, save  # noqa: E402
__all__ += ["save", "load", "load_optimizer", "load_pyreft", "CheckpointError",
            "ReftCheckpointCallback"]


def __getattr__(name):
    # reft_ext.ReftCheckpointCallback (a transformers.TrainerCallback) is built on first
    # use, so `import reft_ext` does not import transformers.
    if name == "ReftCheckpointCallback":
        from . import io
        return io.ReftCheckpointCallback
    raise AttributeError(f"module 'reft_ext' has no attribute {name!r}")
