"""The gradient-reuse decision: how the LoReFT Functions return h's gradient.

h's gradient equals the incoming gradient g except at the B*P edited rows, so a backward
that returned it densely would copy g (B*T*d elements) to change a few rows: the dominant
cost at f7+l7. Writing dx into g itself would avoid the copy, but only autograd knows
whether anyone else (a hook, the caller of backward(g), another consumer) holds g. So the
eager Functions take h twice and return, for the first h, the row correction dx - g as a
sparse (B, T, d) tensor and, for the second, g itself, untouched. Autograd sums the two
into h's gradient with its own rule (torch/csrc/autograd/input_buffer.cpp, the same as
AccumulateGrad's): it adds the sparse rows into g in place when it holds the last
reference to g, and allocates g + rows otherwise. Correct whatever torch decides; only the
speed depends on it. In 16-bit dtypes the edited rows are rounded twice (the correction,
then the sum), within the tolerance rule of the tests.

The sparse form is used where it pays and is safe: eager plain tensors (a traced graph
gets a dense gradient and its compiler decides about buffers), not under create_graph
(the differentiable backward), and few edited rows (2 P <= T). Otherwise h's gradient is a
dense copy of g with dx at the edited rows.

Switch: REFT_EXT_SPARSE_GRAD=0 in the environment (read at import), or
``reft_ext.ops._grad_reuse.SPARSE_GRAD = False`` at run time, turns the sparse form off.
"""
from __future__ import annotations

import os

import torch

from ._checks import plain_eager

SPARSE_GRAD = os.environ.get("REFT_EXT_SPARSE_GRAD", "1") != "0"

# The backward paths of the LoReFT Functions.
DIFFERENTIABLE = "differentiable"   # create_graph=True: differentiable PyTorch ops
ROWS = "rows"                       # loreft_bwd_rows: corrections of g's selected rows
DENSE = "dense"                     # loreft_bwd: a dense copy of g with dx at the rows


def backward_path(grad, positions, need_h: bool, two_h: bool, sparse_ok: bool) -> str:
    """Which backward a Function runs. two_h: the Function took h twice (the eager
    Functions), so it can return h's gradient as (sparse correction, g); sparse_ok: the
    caller allows it (not an in-place edit of a view, whose CopySlices needs it dense)."""
    if torch.is_grad_enabled():
        # create_graph=True: a backward of differentiable ops, so that double backward
        # (Hessian-vector products, gradient penalties) is exact.
        return DIFFERENTIABLE
    if 2 * positions.shape[1] <= grad.shape[1] and (not need_h or (
            two_h and sparse_ok and SPARSE_GRAD and plain_eager(grad)
            and grad.layout == torch.strided)):
        # Few edited rows: the kernels read g's selected rows in place and return their
        # corrections (h needs no gradient: the first edited layer of a frozen model).
        return ROWS
    return DENSE


def row_correction(grad, idx, corr):
    """(B, T, d) sparse COO tensor holding corr (B, P, d) at rows (i, idx[i, j]). Empty
    slots (idx clamped to 0, corr 0 from loreft_bwd_rows) add zeros to row 0: duplicates
    add, so they change nothing."""
    B, P = idx.shape
    bi = torch.arange(B, device=idx.device).repeat_interleave(P)
    indices = torch.stack((bi, idx.reshape(-1).to(bi.dtype)))
    return torch.sparse_coo_tensor(indices, corr.reshape(B * P, grad.shape[-1]), grad.shape,
                                   dtype=grad.dtype, device=grad.device,
                                   check_invariants=False)


def grads_of_h(need_h: bool, two_h: bool, dense, sparse) -> tuple:
    """The gradients the Function returns for its one or two h inputs: (dense,) or
    (dense, None); the eager Functions' (sparse correction, g) when sparse is not None."""
    if not need_h:
        grads = (None, None)
    elif sparse is None:
        grads = (dense, None)
    else:
        grads = (sparse, dense)   # sparse first: autograd adds it into g (see above)
    return grads[:1 + two_h]
