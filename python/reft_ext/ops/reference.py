"""Pure-PyTorch reference of the LoReFT edit, with the fused op's exact semantics.

Used by the tests (in float64, as ground truth) and by the benchmarks (as the eager
baseline), so that both agree on what "correct" means. Its row helpers are also the math
of the ops' forward-mode AD and of the interventions' dropout path, so that the edit is
written down once.
"""
from __future__ import annotations

import torch

from ._checks import acc_dtype


def valid_slots(positions: torch.Tensor):
    """(batch index, slot index, token index) of the slots of positions (B, P) that are not
    -1, each a 1-D int64 tensor of length N."""
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    return bi, pj, positions[bi, pj].long()


def input_rows(positions: torch.Tensor, x: torch.Tensor, x_gathered: bool):
    """(batch index, token index, (N, d) rows in the accumulation dtype) of an edit whose
    input rows are x: (B, T, d) h itself, or (B, P, d) its selected rows when x_gathered."""
    bi, pj, t = valid_slots(positions)
    rows = x[bi, pj] if x_gathered else x[bi, t]
    return bi, t, rows.to(acc_dtype(x.dtype))


def edit_delta(x: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
    """The edit of rows x (N, d) in the accumulation dtype: (x W^T + b - x R^T) R, (N, d),
    with R, W, b converted to x's dtype first."""
    Ra = R.to(x.dtype)
    return (x @ W.to(x.dtype).T + b.to(x.dtype) - x @ Ra.T) @ Ra


def _edit_rows(h, positions, R, W, b):
    """Returns (batch index, token index, edited rows in h's dtype) of the valid slots."""
    bi, t, x = input_rows(positions, h, False)
    return bi, t, (x + edit_delta(x, R, W, b)).to(h.dtype)


def loreft_reference(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor,
                     W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Out-of-place LoReFT edit: a new tensor; h is not modified.

    h: (B, T, d); positions: (B, P) with -1 for empty slots; R, W: (r, d); b: (r,).
    Rows h[i, positions[i, j]] become x + (x W^T + b - x R^T) R, computed in float32
    (float64 for float64 h) and rounded to h's dtype; all other rows are copied unchanged.
    Differentiable with respect to h, R, W and b.
    """
    bi, t, y = _edit_rows(h, positions, R, W, b)
    out = h.clone()
    out[bi, t] = y
    return out


def loreft_reference_(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor,
                      W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """In-place form of :func:`loreft_reference`: edits the selected rows of h, returns h."""
    bi, t, y = _edit_rows(h, positions, R, W, b)
    h[bi, t] = y
    return h


def loreft_backward_reference(grad: torch.Tensor, positions: torch.Tensor, x: torch.Tensor,
                              x_gathered: bool, R: torch.Tensor, W: torch.Tensor,
                              b: torch.Tensor):
    """Gradients of the LoReFT edit from differentiable PyTorch ops (so that they can be
    differentiated again: double backward).

    grad: (B, T, d) gradient of the edit's output; positions: (B, P); x: the forward's
    input, (B, T, d) h itself, or (B, P, d) its selected rows when x_gathered; R, W: (r, d);
    b: (r,). With rows x, g = grad at (i, positions[i, j]), M = W - R, z = x M^T + b and
    gz = g R^T (in the accumulation dtype):

        dx = g + gz M,  dW = sum gz^T x,  db = sum gz,  dR = sum (z^T g - gz^T x)

    Returns (grad_h (B, T, d) in grad's dtype: grad with dx at the edited rows, dR, dW, db
    in the dtypes of R, W, b).
    """
    bi, t, xr = input_rows(positions, x, x_gathered)   # in the accumulation dtype
    acc = xr.dtype
    g = grad[bi, t].to(acc)
    Ra, Wa = R.to(acc), W.to(acc)
    M = Wa - Ra
    z = xr @ M.T + b.to(acc)
    gz = g @ Ra.T
    grad_h = grad.clone()
    grad_h[bi, t] = (g + gz @ M).to(grad.dtype)
    dW = gz.T @ xr
    return grad_h, (z.T @ g - dW).to(R.dtype), dW.to(W.dtype), gz.sum(0).to(b.dtype)
