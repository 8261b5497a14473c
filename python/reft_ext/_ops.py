"""torch.library definitions of the LoReFT ops, their fake kernels and device kernels.

Three ops, all operating on rows h[i, positions[i, j]] of a (B, T, d) tensor:

  reft_ext::loreft_fwd(h, positions, R, W, b) -> out          new tensor, h untouched
  reft_ext::loreft_fwd_(h!, positions, R, W, b, save_rows) -> (saved, coef)
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
        zeros for -1 slots (functional.py adds them to g as a sparse gradient)

Ops are defined with torch.library.define/impl/register_fake rather than custom_op: the
dispatcher overhead is ~3x lower per call, and autograd lives outside the ops
(functional.py), so torch.compile still traces them without graph breaks.
"""
from __future__ import annotations

import weakref

import torch

from . import _native
from ._build import cuda_problem
from ._checks import check_inplace_layout, check_inputs

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

torch.library.define(
    "reft_ext::loreft_fwd", "(Tensor h, Tensor positions, Tensor R, Tensor W, Tensor b) -> Tensor")
torch.library.define(
    "reft_ext::loreft_fwd_",
    "(Tensor(a!) h, Tensor positions, Tensor R, Tensor W, Tensor b, bool save_rows) "
    "-> (Tensor, Tensor)")
torch.library.define(
    "reft_ext::loreft_bwd",
    "(Tensor grad, Tensor positions, Tensor x, bool x_gathered, Tensor R, Tensor W, Tensor b,"
    " Tensor? coef=None) -> (Tensor, Tensor, Tensor, Tensor)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 h, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


torch.library.define(
    "reft_ext::loreft_bwd_rows",
    "(Tensor grad, Tensor positions, Tensor x, bool x_gathered, Tensor R, Tensor W, Tensor b,"
    " Tensor? coef=None) -> (Tensor, Tensor, Tensor, Tensor)")


# ---------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes only (torch.compile, meta tensors, opcheck).

@torch.library.register_fake("reft_ext::loreft_fwd")
def _fwd_fake(h, positions, R, W, b):
    check_inputs("loreft", h, positions, R, W, b)
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _coef_buffer(h, positions, R, save_rows):
    # Only the CPU kernels save z (the CUDA backward computes it again).
    shape = ((h.shape[0], positions.shape[1], R.shape[0])
             if save_rows and h.device.type == "cpu" else (0,))
    return h.new_empty(shape, dtype=acc_dtype(h.dtype))


@torch.library.register_fake("reft_ext::loreft_fwd_")
def _fwd_inplace_fake(h, positions, R, W, b, save_rows):
    check_inputs("loreft_", h, positions, R, W, b)
    saved = h.new_empty((h.shape[0], positions.shape[1], h.shape[2]) if save_rows else (0,))
    return saved, _coef_buffer(h, positions, R, save_rows)


@torch.library.register_fake("reft_ext::loreft_bwd")
def _bwd_fake(grad, positions, x, x_gathered, R, W, b, coef=None):
    # The device kernels return contiguous gradients whatever the parameters' strides.
    contig = torch.contiguous_format
    return (torch.empty_like(grad, dtype=x.dtype, memory_format=contig),
            torch.empty_like(R, memory_format=contig), torch.empty_like(W, memory_format=contig),
            torch.empty_like(b, memory_format=contig))


@torch.library.register_fake("reft_ext::loreft_bwd_rows")
def _bwd_rows_fake(grad, positions, x, x_gathered, R, W, b, coef=None):
    _, dR, dW, db = _bwd_fake(grad, positions, x, x_gathered, R, W, b)
    B, P = positions.shape
    return grad.new_empty((B, P, grad.shape[2]), dtype=x.dtype), dR, dW, db


# ---------------------------------------------------------------------------------------
# Argument marshalling for the native module.

def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    # Kernels walk rows with arbitrary (B, T) strides but need unit stride along d.
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _rows(t: torch.Tensor):
    return (t.data_ptr(), t.stride(0), t.stride(1))


def _problem(h, positions, R, W, b, stream: int = 0):
    """The leading arguments of every _C entry point (see csrc/bindings.cpp)."""
    B, T, d = h.shape
    return ((B, T, positions.shape[1], d, R.shape[0]), _DTYPE_CODE[h.dtype],
            positions.data_ptr(), positions.dtype == torch.int64,
            positions.stride(0), positions.stride(1),
            R.data_ptr(), _DTYPE_CODE[R.dtype], W.data_ptr(), _DTYPE_CODE[W.dtype],
            b.data_ptr(), _DTYPE_CODE[b.dtype], torch.get_num_threads(), stream)


def _contig_params(R, W, b):
    return R.contiguous(), W.contiguous(), b.contiguous()


def _param_grad_buffers(R, x):
    acc = acc_dtype(x.dtype)
    r, d = R.shape
    return (torch.empty((r, d), dtype=acc, device=x.device),
            torch.empty((r, d), dtype=acc, device=x.device),
            torch.empty((r,), dtype=acc, device=x.device))


# ---------------------------------------------------------------------------------------
# CPU kernels.

def _raise_if(op: str, msg: str) -> None:
    # The native calls return '' on success, else the reason they wrote nothing.
    if msg:
        raise ValueError(f"reft_ext.{op}: {msg}")


def _bump_version(t: torch.Tensor) -> None:
    # Ops from torch.library.define get no ADInplaceOrView kernel, so the version counter
    # is bumped here: autograd then refuses a backward through a tensor we clobbered.
    if not t.is_inference():
        torch.autograd.graph.increment_version(t)


@torch.library.impl("reft_ext::loreft_fwd", "cpu")
def _fwd_cpu(h, positions, R, W, b):
    R, W, b = _contig_params(R, W, b)
    out = h.clone(memory_format=torch.contiguous_format)
    _raise_if("loreft", _native.lib().forward_cpu(*_problem(h, positions, R, W, b),
                                                  *_rows(out), 0, 0, 0, 0))
    return out


def fwd_inplace_cpu(h, positions, R, W, b, save_rows):
    """CPU kernel of reft_ext::loreft_fwd_ (functional.py also calls it directly)."""
    check_inplace_layout(h)
    R, W, b = _contig_params(R, W, b)
    B, T, d = h.shape
    P = positions.shape[1]
    # Empty, not zeros: the kernel writes every slot of saved (zeros for -1 slots), so the
    # op never returns uninitialised memory (opcheck's AOT check would catch it).
    saved = h.new_empty((B, P, d) if save_rows else (0,))
    saved_rows = _rows(saved) if save_rows else (0, 0, 0)
    coef = _coef_buffer(h, positions, R, save_rows)
    _raise_if("loreft_", _native.lib().forward_cpu(*_problem(h, positions, R, W, b),
                                                   *_rows(h), *saved_rows,
                                                   coef.data_ptr() if save_rows else 0))
    _bump_version(h)
    return saved, coef


torch.library.impl("reft_ext::loreft_fwd_", "cpu")(fwd_inplace_cpu)


def _coef_ptr(coef, grad, positions, R) -> int:
    """Data pointer of a coef the CPU backward may read, or 0 (None or empty: recompute)."""
    if coef is None or coef.numel() == 0:
        return 0
    want = (grad.shape[0], positions.shape[1], R.shape[0])
    if tuple(coef.shape) != want or coef.dtype != acc_dtype(grad.dtype) or \
            not coef.is_contiguous() or coef.device != grad.device:
        raise ValueError(f"reft_ext.loreft_bwd: coef must be a contiguous {want} tensor of "
                         f"{acc_dtype(grad.dtype)} on {grad.device} (loreft_fwd_'s), got "
                         f"{tuple(coef.shape)} {coef.dtype} on {coef.device}")
    return coef.data_ptr()


def _bwd_cpu_into(grad_h, positions, x, x_gathered, R, W, b, coef=None):
    """Overwrites grad_h's selected rows (holding g) with dx; returns dR, dW, db."""
    coef_ptr = _coef_ptr(coef, grad_h, positions, R)
    Rc, Wc, bc = _contig_params(R, W, b)
    x = _inner_contiguous(x)
    dR, dW, db = _param_grad_buffers(R, x)
    _native.lib().backward_cpu(*_problem(grad_h, positions, Rc, Wc, bc), *_rows(grad_h),
                               *_rows(x), x_gathered, coef_ptr, dR.data_ptr(),
                               dW.data_ptr(), db.data_ptr(), 0, 0, 0)
    return dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


@torch.library.impl("reft_ext::loreft_bwd", "cpu")
def _bwd_cpu(grad, positions, x, x_gathered, R, W, b, coef=None):
    grad_h = grad.to(x.dtype).clone(memory_format=torch.contiguous_format)
    return grad_h, *_bwd_cpu_into(grad_h, positions, x, x_gathered, R, W, b, coef)


def bwd_rows_cpu(grad, positions, x, x_gathered, R, W, b, coef=None):
    """CPU kernel of reft_ext::loreft_bwd_rows (functional.py also calls it directly): one
    pass that reads g's selected rows in place and writes their corrections."""
    g = _inner_contiguous(grad.to(x.dtype))
    coef_ptr = _coef_ptr(coef, g, positions, R)
    Rc, Wc, bc = _contig_params(R, W, b)
    x = _inner_contiguous(x)
    dR, dW, db = _param_grad_buffers(R, x)
    B, P = positions.shape
    # Empty, not zeros: the kernel writes every slot (zeros for -1 slots).
    delta = g.new_empty((B, P, g.shape[2]))
    _native.lib().backward_cpu(*_problem(g, positions, Rc, Wc, bc), *_rows(g), *_rows(x),
                               x_gathered, coef_ptr, dR.data_ptr(), dW.data_ptr(),
                               db.data_ptr(), *_rows(delta))
    return delta, dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


torch.library.impl("reft_ext::loreft_bwd_rows", "cpu")(bwd_rows_cpu)


def compact_rows(grad, positions, x, x_gathered):
    """The selected rows as a (B, P, d) problem: (g rows, positions' = slot index or -1,
    x rows), so that a backward runs without a copy of the whole gradient. Empty slots
    gather row 0 and stay empty (-1) in positions'."""
    B, P = positions.shape
    rows = torch.arange(B, device=grad.device)[:, None]
    idx = positions.clamp(min=0)
    slots = torch.arange(P, device=positions.device, dtype=positions.dtype).expand(B, P)
    pos_c = torch.where(positions >= 0, slots, -1)
    g_c = grad[rows, idx].to(x.dtype)
    return g_c, pos_c, (x if x_gathered else x[rows, idx])


# ---------------------------------------------------------------------------------------
# CUDA kernels (csrc/cuda). Launched on the caller's current stream.

def _cuda_lib(op: str, device: torch.device):
    problem = cuda_problem(device)
    if problem is not None:
        raise RuntimeError(f"reft_ext.{op}: tensors are on {device} but {problem}")
    return _native.lib()


def _check_rank_cuda(op: str, lib, R: torch.Tensor) -> None:
    if R.shape[0] > lib.cuda_max_rank:
        raise ValueError(f"reft_ext.{op}: rank r={R.shape[0]} (R.shape[0]) exceeds the CUDA "
                         f"kernels' limit of {lib.cuda_max_rank}; use a smaller rank or CPU "
                         "tensors")


@torch.library.impl("reft_ext::loreft_fwd", "cuda")
def _fwd_cuda(h, positions, R, W, b):
    lib = _cuda_lib("loreft", h.device)
    _check_rank_cuda("loreft", lib, R)
    with torch.cuda.device(h.device):
        R, W, b = _contig_params(R, W, b)
        stream = torch.cuda.current_stream(h.device).cuda_stream
        skip = _validate_positions_cuda("loreft", lib, h, positions, R, W, b, stream)
        out = h.clone(memory_format=torch.contiguous_format)
        lib.forward_cuda(*_problem(h, positions, R, W, b, stream), *_rows(out), 0, 0, 0,
                         skip.data_ptr() if skip is not None else 0)
    return out


@torch.library.impl("reft_ext::loreft_fwd_", "cuda")
def _fwd_inplace_cuda(h, positions, R, W, b, save_rows):
    lib = _cuda_lib("loreft_", h.device)
    check_inplace_layout(h)
    _check_rank_cuda("loreft_", lib, R)
    with torch.cuda.device(h.device):
        R, W, b = _contig_params(R, W, b)
        stream = torch.cuda.current_stream(h.device).cuda_stream
        skip = _validate_positions_cuda("loreft_", lib, h, positions, R, W, b, stream)
        B, T, d = h.shape
        # Empty, not zeros: the kernel writes every slot of saved, zeros for -1 slots (a
        # memset would add a (B, P, d) write to a pass that moves 2 (B, P, d)).
        saved = h.new_empty((B, positions.shape[1], d) if save_rows else (0,))
        saved_rows = _rows(saved) if save_rows else (0, 0, 0)
        lib.forward_cuda(*_problem(h, positions, R, W, b, stream), *_rows(h), *saved_rows,
                         skip.data_ptr() if skip is not None else 0)
    _bump_version(h)
    return saved, _coef_buffer(h, positions, R, save_rows)  # empty: not saved on CUDA


def _bwd_cuda_into(g, grad_h, positions, x, x_gathered, R, W, b):
    """dx of g's selected rows into grad_h's (a different buffer whose other rows already
    hold the gradient); returns dR, dW, db. Two launches (csrc/cuda/loreft_kernels.cuh):
    the second reads the original g after the first wrote dx, hence two buffers."""
    lib = _cuda_lib("loreft", grad_h.device)
    _check_rank_cuda("loreft", lib, R)
    with torch.cuda.device(grad_h.device):
        Rc, Wc, bc = _contig_params(R, W, b)
        x = _inner_contiguous(x)
        dR, dW, db = _param_grad_buffers(R, x)
        stream = torch.cuda.current_stream(grad_h.device).cuda_stream
        args = _problem(grad_h, positions, Rc, Wc, bc, stream)
        ws_bytes = lib.backward_cuda_workspace(*args)
        ws = torch.empty((max(ws_bytes, 1),), dtype=torch.uint8, device=grad_h.device)
        lib.backward_cuda(*args, *_rows(g), *_rows(grad_h), *_rows(x), x_gathered,
                          dR.data_ptr(), dW.data_ptr(), db.data_ptr(), ws.data_ptr(), ws_bytes)
    return dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


@torch.library.impl("reft_ext::loreft_bwd", "cuda")
def _bwd_cuda(grad, positions, x, x_gathered, R, W, b, coef=None):  # recomputes z
    # grad_h is a full copy of g: its unselected rows are the gradient of h there.
    g = _inner_contiguous(grad.to(x.dtype))
    grad_h = g.clone(memory_format=torch.contiguous_format)
    return grad_h, *_bwd_cuda_into(g, grad_h, positions, x, x_gathered, R, W, b)


@torch.library.impl("reft_ext::loreft_bwd_rows", "cuda")
def _bwd_rows_cuda(grad, positions, x, x_gathered, R, W, b, coef=None):
    # The CUDA kernels write dx into a second buffer: run them on the gathered rows and
    # subtract (a (B, P, d) problem; empty slots' rows are left as g, so their delta is 0
    # unless g holds inf or NaN there, hence the fill).
    g_c, pos_c, x_c = compact_rows(grad, positions, x, x_gathered)
    dx_c, dR, dW, db = _bwd_cuda(g_c, pos_c, x_c, True, R, W, b)
    return dx_c.sub_(g_c).masked_fill_((positions < 0).unsqueeze(-1), 0), dR, dW, db


# The positions tensor last found valid: (weak reference, its version counter, T). patch()
# hands one positions tensor to every patched layer of a step, so this makes the check's
# device-to-host sync once per step rather than once per layer. Any in-place change of
# the tensor through torch bumps its version and forces a new check.
_last_valid_positions = (None, -1, -1)


def _validate_positions_cuda(op, lib, h, positions, R, W, b, stream):
    """Checks positions before any write. Returns None when they are known valid, or a
    device int32 status the forward kernel reads (nonzero: it writes nothing).

    Eager: one device check and one sync (the status is read back so that bad positions
    raise ValueError before anything is written), skipped when `positions` is the tensor
    validated last and unchanged. Under CUDA graph capture (torch.compile with
    mode="reduce-overhead") nothing can be read back: the check kernel is captured and the
    forward kernel skips its writes on a nonzero status, so invalid positions leave h
    untouched but cannot raise. The kernels never touch rows outside [0, T) in any case.
    """
    global _last_valid_positions
    if positions.numel() == 0:
        return None
    capturing = torch.cuda.is_current_stream_capturing()
    T = h.shape[1]
    trackable = not positions.is_inference()
    if not capturing and trackable:
        ref, version, t_ok = _last_valid_positions
        if ref is not None and ref() is positions and positions._version == version \
                and t_ok == T:
            return None
    status = torch.zeros((1,), dtype=torch.int32, device=h.device)
    lib.check_positions_cuda(*_problem(h, positions, R, W, b, stream), status.data_ptr())
    if capturing:
        return status
    if int(status.item()):  # one sync: an invalid edit must raise before any write
        # The CPU checker finds and words the offending entry; it reads only the positions.
        _raise_if(op, _native.lib().check_positions_cpu(*_problem(h, positions.cpu(), R, W, b)))
        raise ValueError(f"reft_ext.{op}: invalid positions")
    if trackable:
        _last_valid_positions = (weakref.ref(positions), positions._version, T)
    return None
