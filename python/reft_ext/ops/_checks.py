"""What the ops check: their inputs' metadata (shared by the public functions and the fake
kernels), the accumulation dtype, and whether a call runs on plain eager tensors.

Every check names the op, the argument and what was expected, and runs before anything is
written. Checks of the positions' *values* (range, repeats) need the data, so they run in
the device implementations (C++ on the CPU, a device kernel on CUDA), still before any
write; everything here looks only at metadata and so traces under torch.compile.
"""
from __future__ import annotations

import torch

H_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
POS_DTYPES = (torch.int64, torch.int32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the LoReFT edit for h of `dtype`, in the kernels, the
    reference and the interventions' dropout path alike: float64 for float64 h, float32
    otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_modes() -> bool:
    return torch._C._len_torch_dispatch_stack() == 0 and \
        torch._C._len_torch_function_stack() == 0


def plain_eager(t: torch.Tensor) -> bool:
    """A plain tensor, used eagerly: not traced, no torch function / dispatch mode, no
    functorch transform, not a tensor subclass."""
    # is_compiling first: under torch.compile it short-circuits the calls dynamo cannot trace.
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor and _no_modes()
            and not torch._C._are_functorch_transforms_active())


def plain_eager_cpu(t: torch.Tensor) -> bool:
    return plain_eager(t) and t.device.type == "cpu"


def _fail(op: str, msg: str, exc=ValueError):
    raise exc(f"reft_ext.{op}: {msg}")


def check_inplace_layout(h) -> None:
    """loreft_ edits rows through their data pointer: h needs unit stride along d."""
    if h.stride(-1) != 1 and h.shape[-1] != 1:
        _fail("loreft_", "h must have unit stride along its last dimension to be edited in "
                         f"place (got strides {h.stride()}); use reft_ext.loreft for strided "
                         "inputs")


def check_inputs(op: str, h, positions, R, W, b, index=None) -> None:
    """Validates the metadata of a LoReFT call.

    h: (B, T, d) float; positions: (B, P) int64/int32; R, W: (r, d); b: (r,), each of R, W,
    b in h's dtype or float32; all on h's device; 1 <= r <= d. With a bank index (B, P)
    int64/int32: R, W (N, r, d) and b (N, r), N >= 1.
    """
    for name, t in (("h", h), ("positions", positions), ("R", R), ("W", W), ("b", b)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    if index is not None and not isinstance(index, torch.Tensor):
        _fail(op, f"index must be a torch.Tensor or None, got {type(index).__name__}",
              TypeError)
    if h.dim() != 3:
        _fail(op, f"h must have shape (B, T, d), got {tuple(h.shape)}")
    if h.dtype not in H_DTYPES:
        _fail(op, f"h must be float32, bfloat16, float16 or float64, got {h.dtype}", TypeError)
    B, T, d = h.shape
    if d == 0:
        _fail(op, "h must have a non-empty hidden dimension d, got d=0")
    if positions.dim() != 2 or positions.shape[0] != B:
        _fail(op, f"positions must have shape (B, P) = ({B}, P) to match h {tuple(h.shape)}, "
                  f"got {tuple(positions.shape)}")
    if positions.dtype not in POS_DTYPES:
        _fail(op, f"positions must be int64 or int32, got {positions.dtype}", TypeError)
    bank = index is not None
    if bank:
        if tuple(index.shape) != tuple(positions.shape):
            _fail(op, f"index must have the shape of positions {tuple(positions.shape)}, got "
                      f"{tuple(index.shape)}")
        if index.dtype not in POS_DTYPES:
            _fail(op, f"index must be int64 or int32, got {index.dtype}", TypeError)
        if R.dim() != 3 or R.shape[2] != d or R.shape[0] < 1:
            _fail(op, f"R must have shape (N, r, d) with N >= 1 and d={d} when index is "
                      f"given (a bank), got {tuple(R.shape)}")
        lead, shape, bshape = (R.shape[0],), "(N, r, d)", "(N, r)"
    else:
        if R.dim() != 2 or R.shape[1] != d:
            hint = " (a bank (N, r, d) needs index=)" if R.dim() == 3 else ""
            _fail(op, f"R must have shape (r, d) with d={d}, got {tuple(R.shape)}{hint}")
        lead, shape, bshape = (), "(r, d)", "(r,)"
    r = R.shape[-2]
    if r < 1:
        _fail(op, "R must have at least one row (rank r >= 1), got r=0")
    if r > d:
        _fail(op, f"rank r={r} exceeds the hidden size d={d}: R {shape} cannot have "
                  f"orthonormal rows")
    if tuple(W.shape) != (*lead, r, d):
        _fail(op, f"W must have shape {shape} = {(*lead, r, d)} like R, got {tuple(W.shape)}")
    if tuple(b.shape) != (*lead, r):
        _fail(op, f"b must have shape {bshape} = {(*lead, r)}, got {tuple(b.shape)}")
    allowed = (h.dtype, torch.float32)
    for name, t in (("R", R), ("W", W), ("b", b)):
        if t.dtype not in allowed:
            _fail(op, f"{name} must be {h.dtype} (h's dtype) or float32, got {t.dtype}",
                  TypeError)
    others = (("positions", positions), ("R", R), ("W", W), ("b", b))
    for name, t in others + ((("index", index),) if bank else ()):
        if t.device != h.device:
            _fail(op, f"{name} is on {t.device} but h is on {h.device}; move it to {h.device}")
    if op == "loreft_":
        check_inplace_layout(h)


def check_backward_inputs(op: str, grad, positions, x, x_gathered: bool, R, W, b,
                          index=None) -> None:
    """Validates the metadata of a backward op call (reft_ext::loreft_bwd, loreft_bwd_rows):
    grad (B, T, d), the gradient of the forward's output; x the forward's input, (B, T, d)
    h itself or (B, P, d) its selected rows when x_gathered; positions, R, W, b, index as
    check_inputs requires them for h of grad's (B, T, d) and x's dtype."""
    for name, t in (("grad", grad), ("x", x)):
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        if t.dim() != 3:
            _fail(op, f"{name} must have 3 dimensions, got shape {tuple(t.shape)}")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
        _fail(op, f"positions must be a (B, P) tensor, got "
                  f"{getattr(positions, 'shape', type(positions).__name__)}")
    B, T, d = grad.shape
    want = (B, positions.shape[1], d) if x_gathered else (B, T, d)
    if tuple(x.shape) != want:
        what = "the saved (B, P, d) rows" if x_gathered else "h's (B, T, d)"
        _fail(op, f"x must have shape {want} ({what}, from grad {tuple(grad.shape)} and "
                  f"positions {tuple(positions.shape)}), got {tuple(x.shape)}")
    if grad.dtype not in H_DTYPES:
        _fail(op, f"grad must be a float tensor, got {grad.dtype}", TypeError)
    if grad.device != x.device:
        _fail(op, f"grad is on {grad.device} but x is on {x.device}")
    # The forward's checks, on a stand-in h of grad's shape in x's dtype (no memory).
    check_inputs(op, x.new_empty((1, 1, 1)).expand(B, T, d), positions, R, W, b, index)
