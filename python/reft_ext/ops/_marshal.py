"""Argument marshalling for the native module reft_ext._C: a LoReFT problem handed to
csrc/bindings.cpp as a described problem (a namedtuple of the fields _C.PROBLEM_FIELDS
names, each set by keyword: sizes, dtype codes, data pointers, strides, threads, stream)
and rows as (data, stride_b, stride_t), and the buffers the kernels write into. Shared by
the CPU and CUDA implementations."""
from __future__ import annotations

import collections
import functools

import torch

from .. import _native
from ._checks import acc_dtype

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels walk rows with arbitrary (B, T) strides but need unit stride along d.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def rows(t: torch.Tensor) -> tuple[int, int, int]:
    """Rows of a (B, T or P, d) tensor for _C: (data pointer, stride of dim 0, of dim 1)."""
    return (t.data_ptr(), t.stride(0), t.stride(1))


NO_ROWS = (0, 0, 0)   # rows of no tensor: an optional output the kernel skips


@functools.lru_cache(maxsize=None)
def _problem_type():
    # The field order is defined once, in csrc/bindings.cpp, and read from there.
    return collections.namedtuple("Problem", _native.lib().PROBLEM_FIELDS)


def problem(h, positions, R, W, b, stream: int = 0, index=None):
    """The described problem of a LoReFT call on these tensors (see csrc/reft_core.h).
    index: None, or the (B, P) bank index into R, W (N, r, d) and b (N, r)."""
    B, T, d = h.shape
    if index is None:
        N, idx = 1, (0, False, 0, 0)
    else:
        N = R.shape[0]
        idx = (index.data_ptr(), index.dtype == torch.int64, index.stride(0), index.stride(1))
    return _problem_type()(
        B=B, T=T, P=positions.shape[1], d=d, r=R.shape[-2], N=N,
        h_dtype=DTYPE_CODE[h.dtype],
        pos=positions.data_ptr(), pos_int64=positions.dtype == torch.int64,
        pos_stride_b=positions.stride(0), pos_stride_p=positions.stride(1),
        index=idx[0], index_int64=idx[1], index_stride_b=idx[2], index_stride_p=idx[3],
        R=R.data_ptr(), R_dtype=DTYPE_CODE[R.dtype], W=W.data_ptr(),
        W_dtype=DTYPE_CODE[W.dtype], b=b.data_ptr(), b_dtype=DTYPE_CODE[b.dtype],
        num_threads=torch.get_num_threads(), stream=stream)


def contig_params(R, W, b):
    return R.contiguous(), W.contiguous(), b.contiguous()


def param_grad_buffers(R, x):
    """dR, dW ((r, d), or (N, r, d) for a bank) and db ((r,) or (N, r)) buffers in the
    accumulation dtype (the kernels reduce into them)."""
    acc = acc_dtype(x.dtype)
    return (torch.empty(R.shape, dtype=acc, device=x.device),
            torch.empty(R.shape, dtype=acc, device=x.device),
            torch.empty(R.shape[:-1], dtype=acc, device=x.device))


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
