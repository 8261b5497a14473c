"""CUDA kernels of the reft_ext ops (csrc/cuda), registered for the "cuda" dispatch key.
Launched on the caller's current stream."""
from __future__ import annotations

import weakref

import torch

from .. import _native
from .._build import cuda_problem
from . import _library  # noqa: F401  (defines the ops registered here)
from ._checks import check_backward_inputs, check_inplace_layout
from ._library import coef_buffer
from ._marshal import (NO_ROWS, bump_version, contig_params, inner_contiguous,
                       param_grad_buffers, param_grads, problem, raise_if, rows)


def cuda_lib(op: str, device: torch.device):
    """The native module, or a RuntimeError saying why its CUDA kernels cannot run on
    device."""
    reason = cuda_problem(device)
    if reason is not None:
        raise RuntimeError(f"reft_ext.{op}: tensors are on {device} but {reason}")
    return _native.lib()


def _check_rank_cuda(op: str, lib, R: torch.Tensor) -> None:
    # R is (r, d), or (N, r, d) for a bank.
    if R.shape[-2] > lib.cuda_max_rank:
        raise ValueError(f"reft_ext.{op}: rank r={R.shape[-2]} (R.shape[{R.dim() - 2}]) "
                         f"exceeds the CUDA kernels' limit of {lib.cuda_max_rank}; use a "
                         "smaller rank or CPU tensors")


def _forward_cuda(op, h, positions, R, W, b, inplace, save_rows, index=None):
    """One forward_cuda launch: the edited rows into a new tensor, or into h itself when
    inplace, and the rows' old values into a (B, P, d) buffer when save_rows. Returns
    (out, saved); saved is None out of place (that op returns no saved rows). index: None,
    or the (B, P) bank index into R, W (N, r, d) and b (N, r)."""
    lib = cuda_lib(op, h.device)
    if inplace:
        check_inplace_layout(h)
    _check_rank_cuda(op, lib, R)
    with torch.cuda.device(h.device):
        R, W, b = contig_params(R, W, b)
        stream = torch.cuda.current_stream(h.device).cuda_stream
        skip = _validate_positions_cuda(op, lib, h, positions, R, W, b, stream, index)
        B, T, d = h.shape
        # Empty, not zeros: the kernel writes every slot of saved, zeros for -1 slots (a
        # memset would add a (B, P, d) write to a pass that moves 2 (B, P, d)).
        saved = (h.new_empty((B, positions.shape[1], d) if save_rows else (0,)) if inplace
                 else None)
        out = h if inplace else h.clone(memory_format=torch.contiguous_format)
        lib.forward_cuda(problem(h, positions, R, W, b, stream, index), rows(out),
                         rows(saved) if save_rows else NO_ROWS,
                         skip.data_ptr() if skip is not None else 0)
    return out, saved


@torch.library.impl("reft_ext::loreft_fwd", "cuda")
def _fwd_cuda(h, positions, R, W, b, index=None):
    return _forward_cuda("loreft", h, positions, R, W, b, False, False, index)[0]


@torch.library.impl("reft_ext::loreft_fwd_", "cuda")
def _fwd_inplace_cuda(h, positions, R, W, b, save_rows, index=None):
    _, saved = _forward_cuda("loreft_", h, positions, R, W, b, True, save_rows, index)
    bump_version(h)
    return saved, coef_buffer(h, positions, R, save_rows)  # empty: not saved on CUDA


def _bwd_cuda_into(g, grad_h, positions, x, x_gathered, R, W, b, index=None):
    """dx of g's selected rows into grad_h's (a different buffer whose other rows already
    hold the gradient); returns dR, dW, db (bank-shaped with an index). Two launches
    (csrc/cuda/loreft_kernels.cuh): the second reads the original g after the first wrote
    dx, hence two buffers."""
    lib = cuda_lib("loreft", grad_h.device)
    _check_rank_cuda("loreft", lib, R)
    with torch.cuda.device(grad_h.device):
        Rc, Wc, bc = contig_params(R, W, b)
        x = inner_contiguous(x)
        bufs = param_grad_buffers(R, x)
        stream = torch.cuda.current_stream(grad_h.device).cuda_stream
        prob = problem(grad_h, positions, Rc, Wc, bc, stream, index)
        ws_bytes = lib.backward_cuda_workspace(prob)
        ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=grad_h.device)
        lib.backward_cuda(prob, rows(g), rows(grad_h), rows(x), x_gathered,
                          *(t.data_ptr() for t in bufs), ws.data_ptr(), ws_bytes)
    return param_grads(bufs, R, W, b)


@torch.library.impl("reft_ext::loreft_bwd", "cuda")
def _bwd_cuda(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):  # recomputes z
    # Metadata only: the kernels skip positions outside [0, T) and index entries outside
    # [0, N) (slot_token), so a bad value cannot make them read outside the tensors.
    check_backward_inputs("loreft_bwd", grad, positions, x, x_gathered, R, W, b, index)
    # grad_h is a full copy of g: its unselected rows are the gradient of h there.
    g = inner_contiguous(grad.to(x.dtype))
    grad_h = g.clone(memory_format=torch.contiguous_format)
    return grad_h, *_bwd_cuda_into(g, grad_h, positions, x, x_gathered, R, W, b, index)


def compact_rows(grad, positions, x, x_gathered):
    """The selected rows as a (B, P, d) problem: (g rows, positions' = slot index or -1,
    x rows), so that a backward runs without a copy of the whole gradient. Empty slots
    gather row 0 and stay empty (-1) in positions'. Slot (i, j) stays slot (i, j), so a
    bank index (B, P) applies to the compact problem unchanged."""
    B, P = positions.shape
    batch = torch.arange(B, device=grad.device)[:, None]
    idx = positions.clamp(min=0)
    slots = torch.arange(P, device=positions.device, dtype=positions.dtype).expand(B, P)
    pos_c = torch.where(positions >= 0, slots, -1)
    g_c = grad[batch, idx].to(x.dtype)
    return g_c, pos_c, (x if x_gathered else x[batch, idx])


@torch.library.impl("reft_ext::loreft_bwd_rows", "cuda")
def _bwd_rows_cuda(grad, positions, x, x_gathered, R, W, b, coef=None, index=None):
    check_backward_inputs("loreft_bwd_rows", grad, positions, x, x_gathered, R, W, b, index)
    # The CUDA kernels write dx into a second buffer: run them on the gathered rows and
    # subtract (a (B, P, d) problem; empty slots' rows are left as g, so their delta is 0
    # unless g holds inf or NaN there, hence the fill). With a bank, a slot is also empty
    # when its index is -1 (or out of range, which the kernels treat alike when nothing
    # validated it: under graph capture).
    g_c, pos_c, x_c = compact_rows(grad, positions, x, x_gathered)
    dx_c, dR, dW, db = _bwd_cuda(g_c, pos_c, x_c, True, R, W, b, index=index)
    empty = positions < 0
    if index is not None:
        empty = empty | (index < 0) | (index >= R.shape[0])
    return dx_c.sub_(g_c).masked_fill_(empty.unsqueeze(-1), 0), dR, dW, db


# The positions (and bank index) last found valid: (weak reference to positions, its
# version counter, T, weak reference to the index or None, its version, N). patch() hands
# one positions tensor to every patched layer of a step, so this makes the check's
# device-to-host sync once per step rather than once per layer. Any in-place change of
# either tensor through torch bumps its version and forces a new check.
_last_valid_positions = (None, -1, -1, None, -1, -1)


def _same_tensor(ref, version, t) -> bool:
    return t is None if ref is None else (t is not None and ref() is t
                                          and t._version == version)


def _validate_positions_cuda(op, lib, h, positions, R, W, b, stream, index=None):
    """Checks positions before any write. Returns None when they are known valid, or a
    device int32 status the forward kernel reads (nonzero: it writes nothing).

    Eager: one device check and one sync (the status is read back so that bad positions
    raise ValueError before anything is written), skipped when `positions` is the tensor
    validated last and unchanged (with the same index, unchanged, and N). The bank index is
    checked by the same kernel (status bit 4). Under CUDA graph capture (torch.compile with
    mode="reduce-overhead") nothing can be read back: the check kernel is captured and the
    forward kernel skips its writes on a nonzero status, so invalid positions leave h
    untouched but cannot raise. The kernels never touch rows outside [0, T) in any case.
    """
    global _last_valid_positions
    if positions.numel() == 0:
        return None
    capturing = torch.cuda.is_current_stream_capturing()
    T = h.shape[1]
    N = 1 if index is None else R.shape[0]
    trackable = not positions.is_inference() and (index is None or not index.is_inference())
    if not capturing and trackable:
        ref, version, t_ok, iref, iversion, n_ok = _last_valid_positions
        if ref is not None and _same_tensor(ref, version, positions) and t_ok == T \
                and _same_tensor(iref, iversion, index) and n_ok == N:
            return None
    status = torch.zeros((1,), dtype=torch.int32, device=h.device)
    lib.check_positions_cuda(problem(h, positions, R, W, b, stream, index), status.data_ptr())
    if capturing:
        return status
    bits = int(status.item())  # one sync: an invalid edit must raise before any write
    if bits:
        # The CPU checker finds and words the offending entry; it reads only the positions
        # and the index (R, W, b stay on the device: their pointers are not dereferenced).
        index_cpu = None if index is None else index.cpu()
        raise_if(op, _native.lib().check_positions_cpu(
            problem(h, positions.cpu(), R, W, b, index=index_cpu)))
        if bits & 4:
            raise ValueError(f"reft_ext.{op}: invalid index: each entry must be -1 or a bank "
                             f"entry in [0, {N})")
        raise ValueError(f"reft_ext.{op}: invalid positions")
    if trackable:
        _last_valid_positions = (weakref.ref(positions), positions._version, T,
                                 None if index is None else weakref.ref(index),
                                 -1 if index is None else index._version, N)
    return None
