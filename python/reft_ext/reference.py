"""Pure-PyTorch reference of the LoReFT edit, with the fused op's exact semantics.

Used by the tests (in float64, as ground truth) and by the benchmarks (as the eager
baseline), so that both agree on what "correct" means.
"""
from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _edit_rows(h, positions, R, W, b):
    """Returns (batch index, token index, edited rows in h's dtype) of the valid slots."""
    acc = _acc(h.dtype)
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    t = positions[bi, pj].long()
    x = h[bi, t].to(acc)
    Ra = R.to(acc)
    z = x @ W.to(acc).T + b.to(acc) - x @ Ra.T  # (N, r)
    y = x + z @ Ra                               # (N, d)
    return bi, t, y.to(h.dtype)


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
    acc = _acc(grad.dtype)
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    t = positions[bi, pj].long()
    xr = (x[bi, pj] if x_gathered else x[bi, t]).to(acc)
    g = grad[bi, t].to(acc)
    Ra, Wa = R.to(acc), W.to(acc)
    M = Wa - Ra
    z = xr @ M.T + b.to(acc)
    gz = g @ Ra.T
    grad_h = grad.clone()
    grad_h[bi, t] = (g + gz @ M).to(grad.dtype)
    dW = gz.T @ xr
    return grad_h, (z.T @ g - dW).to(R.dtype), dW.to(W.dtype), gz.sum(0).to(b.dtype)
