"""reft_ext: fused kernels for Representation Finetuning (LoReFT) in PyTorch.

    out = reft_ext.loreft(h, positions, R, W, b)    # new tensor
    reft_ext.loreft_(h, positions, R, W, b)         # edits h's selected rows in place
"""
from __future__ import annotations

__version__ = "0.1.0"

from .functional import loreft, loreft_  # noqa: E402
from .reference import loreft_reference, loreft_reference_  # noqa: E402
from ._build import build_info  # noqa: E402

__all__ = ["loreft", "loreft_", "loreft_reference", "loreft_reference_", "build_info",
           "__version__"]
