"""Public LoReFT ops with autograd: `loreft` (out of place) and `loreft_` (in place)."""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (registers torch.ops.reft_ext.*)
from ._checks import check_inputs

_ops_ns = torch.ops.reft_ext


def _needs_grad(h, R, W, b) -> bool:
    return torch.is_grad_enabled() and (
        h.requires_grad or R.requires_grad or W.requires_grad or b.requires_grad)


def _param_grads(ctx, dR, dW, db):
    need = ctx.needs_input_grad
    return (dR if need[2] else None, dW if need[3] else None, db if need[4] else None)


class LoReFTFunction(torch.autograd.Function):
    """Autograd for reft_ext::loreft_fwd; the backward reads x from h itself (no copy)."""

    @staticmethod
    def forward(h, positions, R, W, b):
        return _ops_ns.loreft_fwd(h, positions, R, W, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        h, positions, R, W, b = ctx.saved_tensors
        grad_h, dR, dW, db = _ops_ns.loreft_bwd(grad, positions, h, False, R, W, b)
        return (grad_h if ctx.needs_input_grad[0] else None, None, *_param_grads(ctx, dR, dW, db))


class LoReFTInplaceFunction(torch.autograd.Function):
    """Autograd for reft_ext::loreft_fwd_: saves only the (B, P, d) rows it overwrote."""

    @staticmethod
    def forward(ctx, h, positions, R, W, b):
        saved = _ops_ns.loreft_fwd_(h, positions, R, W, b, True)
        ctx.mark_dirty(h)
        ctx.save_for_backward(saved, positions, R, W, b)
        return h

    @staticmethod
    def backward(ctx, grad):
        saved, positions, R, W, b = ctx.saved_tensors
        grad_h, dR, dW, db = _ops_ns.loreft_bwd(grad, positions, saved, True, R, W, b)
        return (grad_h if ctx.needs_input_grad[0] else None, None, *_param_grads(ctx, dR, dW, db))


def loreft(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
           b: torch.Tensor) -> torch.Tensor:
    """LoReFT edit at gathered positions; returns a new tensor and never modifies h.

    Args:
        h: (B, T, d) hidden states, float32 / bfloat16 / float16 / float64.
        positions: (B, P) int64 or int32 token indices in [0, T), -1 for an empty slot;
            an index may appear at most once per row.
        R: (r, d), rows expected orthonormal (not checked); W: (r, d); b: (r,). Each in h's
            dtype or float32. 1 <= r <= d.

    Returns:
        (B, T, d) tensor of h's dtype (contiguous): row h[i, positions[i, j]] becomes
        x + (x W^T + b - x R^T) R, accumulated in float32 (float64 for float64 h); every
        other row is bitwise equal to h. Differentiable with respect to h, R, W and b.

    Raises:
        ValueError / TypeError naming the argument on bad shapes, dtypes, devices,
        out-of-range or repeated positions, or r > d; nothing is written in that case.
    """
    check_inputs("loreft", h, positions, R, W, b)
    if not _needs_grad(h, R, W, b):
        # Function.apply costs ~30 us per call even when autograd has nothing to record.
        return _ops_ns.loreft_fwd(h, positions, R, W, b)
    return LoReFTFunction.apply(h, positions, R, W, b)


def loreft_(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """In-place form of :func:`loreft`: edits only the selected rows of h and returns h.

    Same arguments and result values as :func:`loreft`. h must have unit stride along d.
    Its cost scales with the B*P edited rows, not with B*T*d: for the backward it saves a
    (B, P, d) copy of the rows it overwrote. Autograd marks h dirty and bumps its version,
    so a backward through a tensor this edit clobbered raises instead of miscomputing.
    """
    check_inputs("loreft_", h, positions, R, W, b)
    if not _needs_grad(h, R, W, b):
        _ops_ns.loreft_fwd_(h, positions, R, W, b, False)
        return h
    if h.requires_grad and (h.is_leaf or (h._base is not None and h._base.is_leaf
                                          and h._base.requires_grad)):
        raise RuntimeError(
            "reft_ext.loreft_: h is a leaf tensor that requires grad (or a view of one); "
            "autograd cannot record an in-place edit of it. Use reft_ext.loreft, or edit a "
            "non-leaf tensor (e.g. h.clone())")
    return LoReFTInplaceFunction.apply(h, positions, R, W, b)
