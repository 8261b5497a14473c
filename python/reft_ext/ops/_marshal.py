"""Argument marshalling for the native module reft_ext._C: how a LoReFT problem (sizes,
dtype codes, data pointers, strides, threads, stream) is handed to csrc/bindings.cpp, and
the buffers the kernels write into. Shared by the CPU and CUDA implementations."""
from __future__ import annotations

import torch

from ._checks import acc_dtype

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels walk rows with arbitrary (B, T) strides but need unit stride along d.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def rows(t: torch.Tensor):
    """(data pointer, stride of dim 0, stride of dim 1) of a (B, T or P, d) tensor."""
    return (t.data_ptr(), t.stride(0), t.stride(1))


def problem(h, positions, R, W, b, stream: int = 0):
    """The leading arguments of every _C entry point (see csrc/bindings.cpp)."""
    B, T, d = h.shape
    return ((B, T, positions.shape[1], d, R.shape[0]), DTYPE_CODE[h.dtype],
            positions.data_ptr(), positions.dtype == torch.int64,
            positions.stride(0), positions.stride(1),
            R.data_ptr(), DTYPE_CODE[R.dtype], W.data_ptr(), DTYPE_CODE[W.dtype],
            b.data_ptr(), DTYPE_CODE[b.dtype], torch.get_num_threads(), stream)


def contig_params(R, W, b):
    return R.contiguous(), W.contiguous(), b.contiguous()


def param_grad_buffers(R, x):
    """dR, dW, db buffers in the accumulation dtype (the kernels reduce into them)."""
    acc = acc_dtype(x.dtype)
    r, d = R.shape
    return (torch.empty((r, d), dtype=acc, device=x.device),
            torch.empty((r, d), dtype=acc, device=x.device),
            torch.empty((r,), dtype=acc, device=x.device))


def param_grads(bufs, R, W, b):
    """The accumulated dR, dW, db in the parameters' own dtypes."""
    dR, dW, db = bufs
    return dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


def raise_if(op: str, msg: str) -> None:
    # The native calls return '' on success, else the reason they wrote nothing.
    if msg:
        raise ValueError(f"reft_ext.{op}: {msg}")


def bump_version(t: torch.Tensor) -> None:
    # Ops from torch.library.define get no ADInplaceOrView kernel, so the version counter
    # is bumped here: autograd then refuses a backward through a tensor we clobbered.
    if not t.is_inference():
        torch.autograd.graph.increment_version(t)
