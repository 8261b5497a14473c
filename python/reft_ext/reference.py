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
