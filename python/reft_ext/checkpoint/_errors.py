"""The one error every checkpoint reader and writer raises for a checkpoint's fault."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model. Nothing was changed."""
