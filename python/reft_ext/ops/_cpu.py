"""CPU kernels of the reft_ext ops (csrc/cpu), registered for the "cpu" dispatch key.

autograd.py also calls fwd_inplace_cpu and bwd_rows_cpu directly on plain eager tensors,
skipping the dispatcher's round trip (see autograd._Ops).
"""
from __future__ import annotations

import torch

from .. import _native
from . import _library  # noqa: F401  (defines the ops registered here)
from ._checks import acc_dtype, check_backward_inputs, check_inplace_layout
from ._library import coef_buffer
from ._marshal import (NO_ROWS, bump_version, contig_params, inner_contiguous,
                       param_grad_buffers, param_grads, problem, raise_if, rows)


@torch.library.impl("reft_ext::loreft_fwd", "cpu")
def _fwd_cpu(h, positions, R, W, b, index=None):
    R, W, b = contig_params(R, W, b)
    out = h.clone(memory_format=torch.contiguous_format)
    raise_if("loreft", _native.lib().forward_cpu(problem(h, positions, R, W, b, index=index),
                                                 rows(out), NO_ROWS, 0))
    return out


def fwd_inplace_cpu(h, positions, R, W, b, save_rows, index=None):
    """CPU kernel of reft_ext::loreft_fwd_."""
    check_inplace_layout(h)
    R, W, b = contig_params(R, W, b)
    B, T, d = h.shape
    P = positions.shape[1]
    # Empty, not zeros: the kernel writes every slot of saved (zeros for -1 slots), so the
    # op never returns uninitialised memory (opcheck's AOT check would catch it).
    saved = h.new_empty((B, P, d) if save_rows else (0,))
    saved_rows = rows(saved) if save_rows else NO_ROWS
    coef = coef_buffer(h, positions, R, save_rows)
    raise_if("loreft_", _native.lib().forward_cpu(problem(h, positions, R, W, b, index=index),
                                                  rows(h), saved_rows,
                                                  coef.data_ptr() if save_rows else 0))
    bump_version(h)
    return saved, coef


torch.library.impl("reft_ext::loreft_fwd_", "cpu")(fwd_inplace_cpu)


def _coef_ptr(coef, grad, positions, R) -> int:
    """Data pointer of a coef the CPU backward may read, or 0 (None or empty: recompute)."""
    if coef is None or coef.numel() == 0:
        return 0
    want = (grad.shape[0], positions.shape[1], R.shape[-2])
    if tuple(coef.shape) != want or coef.dtype != acc_dtype(grad.dtype) or \
            not coef.is_contiguous() or coef.device != grad.device:
        raise ValueError(f"reft_ext.loreft_bwd: coef must be a contiguous {want} tensor of "
                         f"{acc_dtype(grad.dtype)} on {grad.device} (loreft_fwd_'s), got "
                         f"{tuple(coef.shape)} {coef.dtype} on {coef.device}")
    return coef.data_ptr()


def _backward_cpu(g, positions, x, x_gathered, R, W, b, coef, delta_rows, index=None):
    """One backward_cpu call reading g's selected rows: dx into g's rows when delta_rows is
    NO_ROWS, else the corrections dx - g into delta_rows' buffer. Returns dR, dW, db."""
    coef_ptr = _coef_ptr(coef, g, positions, R)
    Rc, Wc, bc = contig_params(R, W, b)
    x = inner_contiguous(x)
    bufs = param_grad_buffers(R, x)
    _native.lib().backward_cpu(problem(g, positions, Rc, Wc, bc, index=index), rows(g),
                               rows(x), x_gathered, coef_ptr, *(t.data_ptr() for t in bufs),
                               delta_rows)
    return param_grads(bufs, R, W, b)


def _checked(op, grad, positions, x, x_gathered, R, W, b, index):
    """The checks of a backward op called through the dispatcher (the ops are public):
    metadata, then the positions' and index's values, which the kernels use to index rows
    unchecked. autograd.py calls the kernels below directly only with the inputs of a
    forward that passed the same checks, so its backward does not repeat them."""
    check_backward_inputs(op, grad, positions, x, x_gathered, R, W, b, index)
    R, W, b = contig_params(R, W, b)
    raise_if(op, _native.lib().check_positions_cpu(problem(grad, positions, R, W, b,
                                                           index=index)))


def bwd_cpu_into(grad_h, positions, x, x_gathered, R, W, b, coef=None, index=None):
    """Overwrites grad_h's selected rows (holding g) with dx; returns dR, dW, db."""
    return _backward_cpu(grad_h, positions, x, x_gathered, R, W, b, coef, NO_ROWS, index)


@torch.library.impl("reft_ext::loreft_bwd", "cpu")
def _bwd_cpu(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    _checked("loreft_bwd", grad, positions, x, x_gathered, R, W, b, index)
    grad_h = grad.to(x.dtype).clone(memory_format=torch.contiguous_format)
    return grad_h, *bwd_cpu_into(grad_h, positions, x, x_gathered, R, W, b, coef, index)


def bwd_rows_cpu(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    """CPU kernel of reft_ext::loreft_bwd_rows, on inputs already checked: one pass that
    reads g's selected rows in place and writes their corrections."""
    g = inner_contiguous(grad.to(x.dtype))
    B, P = positions.shape
    # Empty, not zeros: the kernel writes every slot (zeros for -1 slots).
    delta = g.new_empty((B, P, g.shape[2]))
    return delta, *_backward_cpu(g, positions, x, x_gathered, R, W, b, coef, rows(delta),
                                 index)


@torch.library.impl("reft_ext::loreft_bwd_rows", "cpu")
def _bwd_rows_cpu_op(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    _checked("loreft_bwd_rows", grad, positions, x, x_gathered, R, W, b, index)
    return bwd_rows_cpu(grad, positions, x, x_gathered, R, W, b, coef, index)
