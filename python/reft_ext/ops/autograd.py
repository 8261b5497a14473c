"""The public LoReFT ops with autograd: `loreft` (out of place) and `loreft_` (in place),
their autograd.Functions (backward, double backward, forward mode, torch.compile).

How h's gradient is returned is decided in _grad_reuse.py.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _cpu, _cuda  # noqa: F401  (register the device kernels of torch.ops.reft_ext)
from . import _grad_reuse
from ._checks import acc_dtype, check_inputs, plain_eager_cpu
from .reference import entries_of, entry_rows, input_rows, loreft_backward_reference

_dispatcher = torch.ops.reft_ext


class _Ops:
    """The ops as this file calls them: torch.ops.reft_ext, except that loreft_'s in-place
    forward and the row-correction backward, on plain eager CPU tensors, go straight to
    their CPU kernels.
    For those tensors the dispatcher's round trip to a Python kernel does nothing more, and
    costs a noticeable share of an f7+l7 step once the step's (B, T, d) tensors have
    evicted the caches (bench/results/code-measurements.md)."""

    loreft_fwd = _dispatcher.loreft_fwd
    loreft_bwd = _dispatcher.loreft_bwd

    @staticmethod
    def loreft_fwd_(h, *args):
        if plain_eager_cpu(h):
            return _cpu.fwd_inplace_cpu(h, *args)
        return _dispatcher.loreft_fwd_(h, *args)

    @staticmethod
    def loreft_bwd_rows(grad, *args):
        if plain_eager_cpu(grad):
            return _cpu.bwd_rows_cpu(grad, *args)
        return _dispatcher.loreft_bwd_rows(grad, *args)


_ops_ns = _Ops()


def _needs_autograd(h, R, W, b) -> bool:
    """Whether the call must go through an autograd.Function: a backward may follow, or
    forward-mode AD is active (a dual level, or a torch.func transform). The bare ops have
    no autograd formula and would pass h's tangent through unchanged."""
    return (torch.is_grad_enabled() and (
        h.requires_grad or R.requires_grad or W.requires_grad or b.requires_grad)) or \
        _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _backward(ctx, grad, positions, x, x_gathered, R, W, b, index, coef=None,
              sparse_ok=True):
    """Gradients for the Function's inputs, (h, positions, R, W, b, index) or (h, h again,
    positions, R, W, b, index) (the eager Functions: see _grad_reuse.py), of a forward whose
    input rows are x (h itself, or the saved (B, P, d) rows when x_gathered); coef: the
    forward's z of those rows, or None."""
    need = ctx.needs_input_grad
    two_h = len(need) == 7
    need_h = need[0] or (two_h and need[1])
    path = _grad_reuse.backward_path(grad, positions, need_h, two_h, sparse_ok)
    sparse = None
    if path == _grad_reuse.DIFFERENTIABLE:
        dense, dR, dW, db = loreft_backward_reference(grad, positions, x, x_gathered, R, W, b,
                                                      index)
    elif path == _grad_reuse.ROWS:
        delta, dR, dW, db = _ops_ns.loreft_bwd_rows(grad, positions, x, x_gathered, R, W, b,
                                                    coef, index)
        if need_h:
            sparse = _grad_reuse.row_correction(grad, positions.clamp(min=0), delta)
        dense = grad if need_h else None
    else:
        dense, dR, dW, db = _ops_ns.loreft_bwd(grad, positions, x, x_gathered, R, W, b, coef,
                                               index)
    params = tuple(g if n else None for g, n in zip((dR, dW, db), need[-4:-1]))
    return (*_grad_reuse.grads_of_h(need_h, two_h, dense, sparse), None, *params, None)


def _jvp_rows(h_t, positions, x, x_gathered, R, W, b, index, R_t, W_t, b_t):
    """Tangent of the edited rows, (bi, t, rows in h's dtype), of y = x + z R with
    z = x (W - R)^T + b:  dy = dx + dz R + z dR,  dz = dx (W - R)^T + x (dW - dR)^T + db
    (with a bank, each entry's rows with that entry's parameters and tangents). A missing
    tangent (None) is zero."""
    acc = acc_dtype(x.dtype)
    bi, t, xr = input_rows(positions, x, x_gathered, index)

    def tangent(v, like):
        return torch.zeros_like(like) if v is None else v.to(acc)

    dx = tangent(None if h_t is None else h_t[bi, t], xr)
    Ra, Ma, ba = R.to(acc), W.to(acc) - R.to(acc), b.to(acc)
    dR, dW, db = tangent(R_t, Ra), tangent(W_t, Ra), tangent(b_t, ba)

    def dy_of(dx, xr, Ra, Ma, ba, dR, dW, db):
        dz = dx @ Ma.T + xr @ (dW - dR).T + db
        return dx + dz @ Ra + (xr @ Ma.T + ba) @ dR

    if index is None:
        dy = dy_of(dx, xr, Ra, Ma, ba, dR, dW, db)
    else:
        dy = dx.clone()
        for e, rows in entry_rows(entries_of(positions, index)):
            dy[rows] = dy_of(dx[rows], xr[rows], Ra[e], Ma[e], ba[e], dR[e], dW[e], db[e])
    return bi, t, dy.to(x.dtype)


class LoReFTFunction(torch.autograd.Function):
    """Autograd for reft_ext::loreft_fwd, inputs (h, positions, R, W, b, index), as traced by
    torch.compile; the backward reads x from h itself (no copy)."""

    @staticmethod
    def forward(h, positions, R, W, b, index):
        return _ops_ns.loreft_fwd(h, positions, R, W, b, index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], *inputs[-5:])
        ctx.save_for_forward(inputs[0], *inputs[-5:])

    @staticmethod
    def backward(ctx, grad):
        h, positions, R, W, b, index = ctx.saved_tensors
        return _backward(ctx, grad, positions, h, False, R, W, b, index)


class LoReFTInplaceFunction(torch.autograd.Function):
    """Autograd for reft_ext::loreft_fwd_, inputs (h, positions, R, W, b, index), as traced by
    torch.compile: saves only the (B, P, d) rows it overwrote, and on the CPU their (B, P, r)
    coefficients z, which the backward then need not recompute. Double backward is refused:
    the saved rows carry no autograd history. (The forward takes ctx: an in-place Function
    on a view may return only one tensor, so saved and coef cannot be outputs for a
    setup_context.)"""

    @staticmethod
    def forward(ctx, h, *args):
        positions, R, W, b, index = args[-5:]
        saved, coef = _ops_ns.loreft_fwd_(h, positions, R, W, b, True, index)
        ctx.mark_dirty(h)
        ctx.save_for_backward(saved, coef, positions, R, W, b, index)
        ctx.save_for_forward(saved, positions, R, W, b, index)
        ctx.h_shape = h.shape
        # An in-place edit of a view is wrapped by autograd's CopySlices, which copies the
        # first gradient into a dense slice: it must be dense.
        ctx.dense_grad = h._base is not None
        return h

    @staticmethod
    def backward(ctx, grad):
        saved, coef, positions, R, W, b, index = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the first-order gradients are right, but they do not
            # depend on h through the saved rows, so a second backward would be wrong.
            with torch.no_grad():
                grads = _backward(ctx, grad, positions, saved, True, R, W, b, index, coef,
                                  sparse_ok=False)
            if any(t.requires_grad for t in (grad, R, W, b)):
                return _refuse_double_backward(grads)
            return grads
        return _backward(ctx, grad, positions, saved, True, R, W, b, index, coef,
                         sparse_ok=not ctx.dense_grad)


# The eager Functions: h twice (the sparse gradient of h, see _grad_reuse.py; dynamo refuses one
# tensor passed twice) and a jvp for forward-mode AD (torch.autograd.forward_ad,
# torch.func.jvp; dynamo cannot trace a Function that defines jvp either).

class LoReFTEagerFunction(LoReFTFunction):
    """reft_ext.loreft's eager Function: inputs (h, h, positions, R, W, b, index)."""

    @staticmethod
    def forward(h, h_again, positions, R, W, b, index):
        return _ops_ns.loreft_fwd(h, positions, R, W, b, index)

    @staticmethod
    def jvp(ctx, h_t, h_t_again, positions_t, R_t, W_t, b_t, index_t):
        h, positions, R, W, b, index = ctx.saved_tensors
        bi, t, rows = _jvp_rows(h_t, positions, h, False, R, W, b, index, R_t, W_t, b_t)
        out_t = (h_t.clone(memory_format=torch.contiguous_format) if h_t is not None
                 else torch.zeros_like(h, memory_format=torch.contiguous_format))
        out_t[bi, t] = rows
        return out_t


class LoReFTInplaceEagerFunction(LoReFTInplaceFunction):
    """reft_ext.loreft_'s eager Function: inputs (h, h, positions, R, W, b, index)."""

    @staticmethod
    def jvp(ctx, h_t, h_t_again, positions_t, R_t, W_t, b_t, index_t):
        saved, positions, R, W, b, index = ctx.saved_tensors
        bi, t, rows = _jvp_rows(h_t, positions, saved, True, R, W, b, index, R_t, W_t, b_t)
        if h_t is None:   # h gets a tangent: zero except at the edited rows
            h_t = saved.new_zeros(ctx.h_shape)
        h_t[bi, t] = rows
        return h_t


_DOUBLE_BACKWARD = ("reft_ext.loreft_: double backward (differentiating its gradients, "
                    "e.g. torch.autograd.grad(..., create_graph=True) then backward) is not "
                    "supported by the in-place form; use reft_ext.loreft, which supports it")


def _refuse_double_backward(grads):
    """grads as tensors that raise if a second backward reaches them (what
    torch.autograd.function.once_differentiable does, with a message naming the op)."""
    keep = [i for i, g in enumerate(grads) if g is not None]
    aliases = [grads[i].detach().requires_grad_() for i in keep]
    errs = torch._C._functions.DelayedError(_DOUBLE_BACKWARD, len(aliases))(*aliases)
    if isinstance(errs, torch.Tensor):
        errs = (errs,)
    out = list(grads)
    for i, g in zip(keep, errs):
        out[i] = g
    return tuple(out)


def loreft(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
           b: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """LoReFT edit at gathered positions; returns a new tensor and never modifies h.

    Args:
        h: (B, T, d) hidden states, float32 / bfloat16 / float16 / float64.
        positions: (B, P) int64 or int32 token indices in [0, T), -1 for an empty slot;
            an index may appear at most once per row.
        R: (r, d), rows expected orthonormal (not checked); W: (r, d); b: (r,). Each in h's
            dtype or float32. 1 <= r <= d.
        index: None, or a bank index (B, P) int64 or int32: R, W are then (N, r, d) and
            b (N, r), N interventions stacked, and slot (i, j) is edited with entry
            index[i, j] (in [0, N); -1 leaves the slot unedited, like a -1 position).
            Gradients of R, W, b have the bank's shapes, each entry's summed over the slots
            that use it (exact zeros for an entry no slot uses).

    Returns:
        (B, T, d) tensor of h's dtype (contiguous): row h[i, positions[i, j]] becomes
        x + (x W^T + b - x R^T) R, accumulated in float32 (float64 for float64 h); every
        other row is bitwise equal to h. Differentiable with respect to h, R, W and b.

    Autograd: backward (h's gradient is the incoming gradient with the edited rows
    corrected, in place when autograd alone holds it: see ops/_grad_reuse.py), double
    backward (create_graph=True; the backward then runs as differentiable PyTorch ops),
    forward mode (torch.autograd.forward_ad dual tensors, torch.func.jvp / grad), and
    torch.compile (fullgraph) all give the reference's gradients.

    Raises:
        ValueError / TypeError naming the argument on bad shapes, dtypes, devices,
        out-of-range or repeated positions, or r > d; nothing is written in that case.
    """
    check_inputs("loreft", h, positions, R, W, b, index)
    if not _needs_autograd(h, R, W, b):
        # Function.apply costs tens of microseconds even when autograd has nothing to
        # record (bench/results/code-measurements.md).
        return _ops_ns.loreft_fwd(h, positions, R, W, b, index)
    if torch.compiler.is_compiling():
        return LoReFTFunction.apply(h, positions, R, W, b, index)
    return LoReFTEagerFunction.apply(h, h, positions, R, W, b, index)


def loreft_(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
            b: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """In-place form of :func:`loreft`: edits only the selected rows of h and returns h.

    Same arguments (bank index included) and result values as :func:`loreft`. h must have
    unit stride along d.
    Its cost scales with the B*P edited rows, not with B*T*d: for the backward it saves a
    (B, P, d) copy of the rows it overwrote (and on the CPU their (B, P, r) coefficients).
    Autograd marks h dirty and bumps its version, so a backward through a tensor this edit
    clobbered raises instead of miscomputing. Backward and forward-mode dual tensors work as
    for loreft; double backward and torch.func transforms raise a RuntimeError naming the
    op (the saved rows carry no autograd history): use loreft for those.
    """
    check_inputs("loreft_", h, positions, R, W, b, index)
    if not _needs_autograd(h, R, W, b):
        _ops_ns.loreft_fwd_(h, positions, R, W, b, False, index)
        return h
    if h.requires_grad and (h.is_leaf or (h._base is not None and h._base.is_leaf
                                          and h._base.requires_grad)):
        raise RuntimeError(
            "reft_ext.loreft_: h is a leaf tensor that requires grad (or a view of one); "
            "autograd cannot record an in-place edit of it. Use reft_ext.loreft, or edit a "
            "non-leaf tensor (e.g. h.clone())")
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError("reft_ext.loreft_: torch.func transforms (grad, jvp, vmap, ...) "
                           "are not supported by the in-place form; use reft_ext.loreft")
    if torch.compiler.is_compiling():
        return LoReFTInplaceFunction.apply(h, positions, R, W, b, index)
    # A view gets a dense gradient (CopySlices) through the first h alone: the second is
    # passed detached, so that autograd does not route its (None) gradient into the view's
    # old grad_fn, where a tensor hook registered on h would be called with None.
    h_again = h.detach() if h._base is not None else h
    return LoReFTInplaceEagerFunction.apply(h, h_again, positions, R, W, b, index)
