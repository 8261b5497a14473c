"""Pure-PyTorch reference of the LoReFT edit, with the fused op's exact semantics.

Used by the tests (in float64, as ground truth) and by the benchmarks (as the eager
baseline), so that both agree on what "correct" means. Its row helpers are also the math
of the ops' forward-mode AD and of the interventions' dropout path, so that the edit is
written down once.
"""
from __future__ import annotations

import torch

from ._checks import acc_dtype


def valid_slots(positions: torch.Tensor, index: torch.Tensor | None = None):
    """(batch index, slot index, token index) of the edited slots of positions (B, P):
    those not -1 (and, with a bank index (B, P), whose index is not -1 either), each a 1-D
    int64 tensor of length n."""
    edited = positions >= 0
    if index is not None:
        edited = edited & (index >= 0)
    bi, pj = edited.nonzero(as_tuple=True)
    return bi, pj, positions[bi, pj].long()


def input_rows(positions: torch.Tensor, x: torch.Tensor, x_gathered: bool,
               index: torch.Tensor | None = None):
    """(batch index, token index, (n, d) rows in the accumulation dtype) of an edit whose
    input rows are x: (B, T, d) h itself, or (B, P, d) its selected rows when x_gathered."""
    bi, pj, t = valid_slots(positions, index)
    rows = x[bi, pj] if x_gathered else x[bi, t]
    return bi, t, rows.to(acc_dtype(x.dtype))


def entries_of(positions: torch.Tensor, index: torch.Tensor | None):
    """Bank entry of each edited slot, in valid_slots' order (1-D int64), or None without a
    bank."""
    if index is None:
        return None
    bi, pj, _ = valid_slots(positions, index)
    return index[bi, pj].long()


def edit_delta(x: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
    """The edit of rows x (n, d) in the accumulation dtype: (x W^T + b - x R^T) R, (n, d),
    with R, W, b converted to x's dtype first."""
    Ra = R.to(x.dtype)
    return (x @ W.to(x.dtype).T + b.to(x.dtype) - x @ Ra.T) @ Ra


def entry_rows(entries):
    """(entry, row indices) of each bank entry that edits rows, ascending."""
    return [(e, (entries == e).nonzero(as_tuple=True)[0])
            for e in sorted(set(entries.tolist()))]


def bank_delta(x, entries, R, W, b):
    """edit_delta of rows x (n, d) whose entries (None: no bank) pick their parameters
    from R, W (N, r, d), b (N, r): each entry's rows get an ordinary single edit.
    Differentiable in every input."""
    if entries is None:
        return edit_delta(x, R, W, b)
    delta = x.new_zeros(x.shape)
    for e, rows in entry_rows(entries):
        delta = delta.index_put((rows,), edit_delta(x[rows], R[e], W[e], b[e]))
    return delta


def _edit_rows(h, positions, R, W, b, index=None):
    """Returns (batch index, token index, edited rows in h's dtype) of the edited slots."""
    bi, t, x = input_rows(positions, h, False, index)
    return bi, t, (x + bank_delta(x, entries_of(positions, index), R, W, b)).to(h.dtype)


def loreft_reference(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor,
                     W: torch.Tensor, b: torch.Tensor,
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """Out-of-place LoReFT edit: a new tensor; h is not modified.

    h: (B, T, d); positions: (B, P) with -1 for empty slots; R, W: (r, d); b: (r,).
    Rows h[i, positions[i, j]] become x + (x W^T + b - x R^T) R, computed in float32
    (float64 for float64 h) and rounded to h's dtype; all other rows are copied unchanged.
    With a bank index (B, P): R, W (N, r, d), b (N, r), and slot (i, j) uses entry
    index[i, j] (-1: not edited). Differentiable with respect to h, R, W and b.
    """
    bi, t, y = _edit_rows(h, positions, R, W, b, index)
    out = h.clone()
    out[bi, t] = y
    return out


def loreft_reference_(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor,
                      W: torch.Tensor, b: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """In-place form of :func:`loreft_reference`: edits the selected rows of h, returns h."""
    bi, t, y = _edit_rows(h, positions, R, W, b, index)
    h[bi, t] = y
    return h


def loreft_backward_reference(grad: torch.Tensor, positions: torch.Tensor, x: torch.Tensor,
                              x_gathered: bool, R: torch.Tensor, W: torch.Tensor,
                              b: torch.Tensor, index: torch.Tensor | None = None):
    """Gradients of the LoReFT edit from differentiable PyTorch ops (so that they can be
    differentiated again: double backward).

    grad: (B, T, d) gradient of the edit's output; positions: (B, P); x: the forward's
    input, (B, T, d) h itself, or (B, P, d) its selected rows when x_gathered; R, W: (r, d);
    b: (r,) (with a bank index (B, P): (N, r, d) and (N, r), each entry's gradients summed
    over the slots that use it, zeros for unused entries). With rows x, g = grad at
    (i, positions[i, j]), M = W - R, z = x M^T + b and gz = g R^T (in the accumulation dtype):

        dx = g + gz M,  dW = sum gz^T x,  db = sum gz,  dR = sum (z^T g - gz^T x)

    Returns (grad_h (B, T, d) in grad's dtype: grad with dx at the edited rows, dR, dW, db
    in the dtypes of R, W, b).
    """
    bi, t, xr = input_rows(positions, x, x_gathered, index)   # in the accumulation dtype
    acc = xr.dtype
    g = grad[bi, t].to(acc)

    def one(xr, g, R, W, b):
        Ra, Wa = R.to(acc), W.to(acc)
        M = Wa - Ra
        z = xr @ M.T + b.to(acc)
        gz = g @ Ra.T
        dW = gz.T @ xr
        return g + gz @ M, z.T @ g - dW, dW, gz.sum(0)

    if index is None:
        dx, dR, dW, db = one(xr, g, R, W, b)
    else:
        dx = g
        dR, dW, db = (torch.zeros(p.shape, dtype=acc, device=x.device) for p in (R, W, b))
        for e, rows in entry_rows(entries_of(positions, index)):
            dx_e, *grads = one(xr[rows], g[rows], R[e], W[e], b[e])
            dx = dx.index_put((rows,), dx_e)
            dR, dW, db = (p.index_put((torch.tensor([e], device=x.device),), pg[None])
                          for p, pg in zip((dR, dW, db), grads))
    grad_h = grad.clone()
    grad_h[bi, t] = dx.to(grad.dtype)
    return grad_h, dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)
