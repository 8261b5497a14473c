"""Loads the compiled module reft_ext._C.

torch is imported first so that its runtime libraries are loaded before ours. A failed load
is kept and re-raised, with its cause, on the first native call: `import reft_ext` and the
pure-PyTorch reference keep working on a broken install, and the error says what to do.
"""
from __future__ import annotations

import torch  # noqa: F401  (must precede _C)

try:
    from . import _C  # type: ignore[attr-defined]
    LOAD_ERROR: Exception | None = None
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    _C = None
    LOAD_ERROR = e


def lib():
    """Returns the native module, or raises a RuntimeError explaining why it is missing."""
    if _C is None:
        raise RuntimeError(
            "reft_ext: the native module reft_ext._C could not be loaded "
            f"({LOAD_ERROR}); reinstall with `pip install --no-build-isolation .` from a "
            "source checkout, or install a wheel for your platform") from LOAD_ERROR
    return _C


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.has_cuda)
