"""The LoReFT op: h + R^T (W h + b - R h) at gathered rows of h.

Layers, each importing only those above it in this list:

    _checks.py     input checks, the accumulation dtype, "plain eager tensor"
    reference.py   pure-PyTorch reference (the semantics; tests and benchmarks use it)
    _library.py    torch.library schemas of reft_ext::loreft_* and their fake kernels
    _marshal.py    how a problem is handed to the native module reft_ext._C
    _cpu.py        CPU kernels        _cuda.py   CUDA kernels
    _grad_reuse.py how h's gradient is returned (and the switch that turns reuse off)
    autograd.py    autograd.Functions and the public loreft / loreft_
"""
from __future__ import annotations

from ._checks import acc_dtype
from .autograd import loreft, loreft_
from .reference import loreft_reference, loreft_reference_

__all__ = ["loreft", "loreft_", "loreft_reference", "loreft_reference_", "acc_dtype"]
