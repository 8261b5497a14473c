"""torch.library definitions of the LoReFT ops, their fake kernels and device kernels.

Four ops, all operating on rows h[i, positions[i, j]] of a (B, T, d) tensor, each with an
optional bank index (B, P) as its last argument: R, W (N, r, d) and b (N, r) then hold N
interventions, slot (i, j) uses entry index[i, j] (-1: empty slot), and the parameter
gradients have the bank's shapes.

  reft_ext::loreft_fwd(h, positions, R, W, b, index) -> out   new tensor, h untouched
  reft_ext::loreft_fwd_(h!, positions, R, W, b, save_rows, index) -> (saved, coef)
        edits h's selected rows in place; saved (B, P, d) holds their old values (for the
        backward) when save_rows, else is empty; coef (B, P, r), in the accumulation dtype,
        the rows' z = x M^T + b when save_rows on the CPU, else empty
  reft_ext::loreft_bwd(grad, positions, x, x_gathered, R, W, b, coef=None)
        -> (grad_h, dR, dW, db)
        x is the forward input: h itself (x_gathered=False) or the saved rows (True);
        coef: loreft_fwd_'s for these x and parameters, or None; the CPU kernels then
        skip computing z again (one of the backward's five passes over a row)
  reft_ext::loreft_bwd_rows(grad, positions, x, x_gathered, R, W, b, coef=None)
        -> (delta, dR, dW, db)
        the same, but instead of a whole gradient of h only the row corrections:
        delta (B, P, d) in x's dtype, slot (i, j) = dx - g at row (i, positions[i, j]),
        zeros for -1 slots (autograd.py adds them to g as a sparse gradient)

This file holds the schemas and the fake kernels (shapes and dtypes only); the device
kernels are registered by _cpu.py and _cuda.py. Ops are defined with
torch.library.define/impl/register_fake rather than custom_op: the dispatcher overhead is
~3x lower per call, and autograd lives outside the ops (autograd.py), so torch.compile
still traces them without graph breaks.
"""
from __future__ import annotations

import torch

from ._checks import acc_dtype, check_backward_inputs, check_inputs

torch.library.define(
    "reft_ext::loreft_fwd",
    "(Tensor h, Tensor positions, Tensor R, Tensor W, Tensor b, Tensor? index=None) -> Tensor")
torch.library.define(
    "reft_ext::loreft_fwd_",
    "(Tensor(a!) h, Tensor positions, Tensor R, Tensor W, Tensor b, bool save_rows,"
    " Tensor? index=None) -> (Tensor, Tensor)")
torch.library.define(
    "reft_ext::loreft_bwd",
    "(Tensor grad, Tensor positions, Tensor x, bool x_gathered, Tensor R, Tensor W, Tensor b,"
    " Tensor? coef=None, Tensor? index=None) -> (Tensor, Tensor, Tensor, Tensor)")
torch.library.define(
    "reft_ext::loreft_bwd_rows",
    "(Tensor grad, Tensor positions, Tensor x, bool x_gathered, Tensor R, Tensor W, Tensor b,"
    " Tensor? coef=None, Tensor? index=None) -> (Tensor, Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (torch.compile, meta tensors, opcheck).

@torch.library.register_fake("reft_ext::loreft_fwd")
def _fwd_fake(h, positions, R, W, b, index=None):
    check_inputs("loreft", h, positions, R, W, b, index)
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def coef_buffer(h, positions, R, save_rows):
    # Only the CPU kernels save z (the CUDA backward computes it again).
    shape = ((h.shape[0], positions.shape[1], R.shape[-2])
             if save_rows and h.device.type == "cpu" else (0,))
    return h.new_empty(shape, dtype=acc_dtype(h.dtype))


@torch.library.register_fake("reft_ext::loreft_fwd_")
def _fwd_inplace_fake(h, positions, R, W, b, save_rows, index=None):
    check_inputs("loreft_", h, positions, R, W, b, index)
    saved = h.new_empty((h.shape[0], positions.shape[1], h.shape[2]) if save_rows else (0,))
    return saved, coef_buffer(h, positions, R, save_rows)


@torch.library.register_fake("reft_ext::loreft_bwd")
def _bwd_fake(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    check_backward_inputs("loreft_bwd", grad, positions, x, x_gathered, R, W, b, index)
    # The device kernels return contiguous gradients whatever the parameters' strides.
    contig = torch.contiguous_format
    return (torch.empty_like(grad, dtype=x.dtype, memory_format=contig),
            torch.empty_like(R, memory_format=contig), torch.empty_like(W, memory_format=contig),
            torch.empty_like(b, memory_format=contig))


@torch.library.register_fake("reft_ext::loreft_bwd_rows")
def _bwd_rows_fake(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    _, dR, dW, db = _bwd_fake(grad, positions, x, x_gathered, R, W, b, coef, index)
    B, P = positions.shape
    return grad.new_empty((B, P, grad.shape[2]), dtype=x.dtype), dR, dW, db
