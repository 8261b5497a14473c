"""Public LoReFT ops with autograd: `loreft` (out of place) and `loreft_` (in place)."""
from __future__ import annotations

import sys
import threading

import torch

from . import _ops  # registers torch.ops.reft_ext.*
from ._checks import check_inputs

_dispatcher = torch.ops.reft_ext


def _plain_eager_cpu(t: torch.Tensor) -> bool:
    """A plain CPU tensor, used eagerly: not traced, no torch function / dispatch mode, no
    functorch transform, not a tensor subclass."""
    # is_compiling first: under torch.compile it short-circuits the calls dynamo cannot trace.
    return (not torch.compiler.is_compiling() and type(t) is torch.Tensor
            and t.device.type == "cpu" and _no_modes()
            and not torch._C._are_functorch_transforms_active())


class _Ops:
    """The ops as this file calls them: torch.ops.reft_ext, except that the in-place ops of
    loreft_'s training step, on plain eager CPU tensors, go straight to their CPU kernels.
    For those tensors the dispatcher's round trip to a Python kernel does nothing more, and
    costs ~0.05 ms a call once a step's (B, T, d) tensors have evicted the caches: ~5% of
    an f7+l7 step in bench_op."""

    loreft_fwd = _dispatcher.loreft_fwd
    loreft_bwd = _dispatcher.loreft_bwd

    @staticmethod
    def loreft_fwd_(h, *args):
        if _plain_eager_cpu(h):
            return _ops.fwd_inplace_cpu(h, *args)
        return _dispatcher.loreft_fwd_(h, *args)

    @staticmethod
    def loreft_bwd_(grad, *args):
        if _plain_eager_cpu(grad):
            return _ops.bwd_inplace_cpu(grad, *args)
        return _dispatcher.loreft_bwd_(grad, *args)


_ops_ns = _Ops()


def _needs_grad(h, R, W, b) -> bool:
    return torch.is_grad_enabled() and (
        h.requires_grad or R.requires_grad or W.requires_grad or b.requires_grad)


# ---------------------------------------------------------------------------------------
# Gradient ownership. The gradient of h equals the incoming gradient g except at the B*P
# edited rows, so copying g (B*T*d elements) dominates the backward at few positions. When
# autograd hands g to this backward and to nobody else, dx is written into g in place and
# g is returned: that is AccumulateGrad's own "steal" rule (torch/csrc/autograd/functions/
# accumulate_grad.h), with the reference counts seen from Python. Anything else that holds
# g (another consumer not yet run, a hook that stashed it, the caller of backward(g), a
# retained .grad, a view of its storage) raises one of the counts, and g is then copied.
# The Python count depends on the interpreter and on this file's call path, so the counts
# of an owned gradient are measured once through these very backward functions
# (_calibrate); if an extra holder would not show in them, nothing is ever written in place.
# Torch function / dispatch modes (debug and flop-counting tools) may hold tensors of their
# own, so with one active nothing is calibrated or written in place either.

_REFS_OWNED: dict = {}      # Function name -> refs of an owned gradient; {} = uncalibrated
_calibration_lock = threading.Lock()
# Set while _calibrate runs: CPU backwards run on the calling thread, so another thread's
# backward never records here.
_tls = threading.local()


def _refs(grad, probe):
    # probe went through the same frames as grad, so subtracting its count cancels the
    # frames' references, which vary: an eval-frame hook (left by torch.compile) adds some.
    return (sys.getrefcount(grad) - sys.getrefcount(probe), grad._use_count(),
            torch._C._storage_Use_Count(grad.untyped_storage()._cdata))


def _no_modes() -> bool:
    return torch._C._len_torch_dispatch_stack() == 0 and \
        torch._C._len_torch_function_stack() == 0


def _owned(name: str, grad: torch.Tensor, probe: object, x: torch.Tensor) -> bool:
    """True when dx may be written into grad itself (see above). probe: an object held
    like grad (a local of the calling backward, then arguments) and by nothing else."""
    if not _no_modes():
        return False
    refs = _refs(grad, probe)
    record = getattr(_tls, "calibration", None)
    if record is not None:
        record.append(refs)
        return False
    owned = _REFS_OWNED.get(name)
    return (owned is not None and refs == owned and grad._base is None
            and type(grad) is torch.Tensor and not grad.requires_grad
            and not torch.is_grad_enabled() and grad.dtype == x.dtype
            and grad.is_contiguous())


def _calibrate() -> None:
    """Measures the refs of an owned gradient in each backward, and checks that a stashed
    gradient and a caller's gradient read differently; leaves _REFS_OWNED empty (never
    write in place) if not. Runs once, eagerly, on a tiny CPU input (~1 ms)."""
    if _REFS_OWNED or torch.compiler.is_compiling() or not _no_modes():
        return
    with _calibration_lock, torch.enable_grad():
        if _REFS_OWNED:
            return
        result = {}
        try:
            for name, fn in (("loreft", LoReFTFunction.apply),
                             ("loreft_", LoReFTInplaceFunction.apply)):
                seen = [_calibration_case(fn, case) for case in ("owned", "stashed", "caller")]
                if seen[0] not in seen[1:] and seen[0][1] == 1:
                    result[name] = seen[0]
        except Exception:  # noqa: BLE001  (never fail a user's call over an optimisation)
            result = {}
        _REFS_OWNED.update(result or {"": None})


def _calibration_case(fn, case):
    kw = dict(dtype=torch.float32, device="cpu")  # whatever the user's defaults are
    params = [torch.ones(1, 1, requires_grad=True, **kw), torch.ones(1, 1, **kw),
              torch.ones(1, **kw)]
    h = torch.ones(1, 2, 1, requires_grad=True, **kw)
    out = fn(h.clone(), torch.zeros(1, 1, dtype=torch.long, device="cpu"), *params)
    stash = []
    if case == "stashed":
        out.register_hook(stash.append)
    _tls.calibration = []
    try:
        if case == "caller":
            out.backward(torch.ones_like(out))
        else:
            (out * 2.0).sum().backward()
        return _tls.calibration[0]
    finally:
        _tls.calibration = None


def _compact(grad, positions, x, x_gathered):
    """The selected rows as a (B, P, d) problem: (g rows, positions' = slot index or -1,
    x rows), so the kernels run without a copy of the whole gradient."""
    B, P = positions.shape
    rows = torch.arange(B, device=grad.device)[:, None]
    idx = positions.clamp(min=0)
    slots = torch.arange(P, device=positions.device, dtype=positions.dtype).expand(B, P)
    pos_c = torch.where(positions >= 0, slots, -1)
    g_c = grad[rows, idx].to(x.dtype)
    return g_c, pos_c, (x if x_gathered else x[rows, idx])


def _may_write_grad(ctx, grad) -> bool:
    """Whether a backward should ask _owned at all: h needs a gradient, the CPU kernels
    can write dx in place (on CUDA the backward needs g in a second buffer), and no graph
    is being traced (a traced graph has no per-call reference counts)."""
    return (ctx.needs_input_grad[0] and grad.device.type == "cpu"
            and not torch.compiler.is_compiling())


def _backward(ctx, grad, owned, positions, x, x_gathered, R, W, b, coef=None):
    """(grad_h or None, dR, dW, db) for a backward whose forward input rows are x; owned:
    dx may be written into grad (_owned); coef: the forward's z of those rows, or None."""
    need_h = ctx.needs_input_grad[0]
    if owned:
        dR, dW, db = _ops_ns.loreft_bwd_(grad, positions, x, x_gathered, R, W, b, coef)
        grad_h = grad
    elif not need_h and 2 * positions.shape[1] <= grad.shape[1]:
        # Only the parameters' gradients: the selected rows suffice (coef is per slot, so
        # it stays valid for the compacted (B, P) problem).
        g_c, pos_c, x_c = _compact(grad, positions, x, x_gathered)
        _, dR, dW, db = _ops_ns.loreft_bwd(g_c, pos_c, x_c, True, R, W, b, coef)
        grad_h = None
    else:
        grad_h, dR, dW, db = _ops_ns.loreft_bwd(grad, positions, x, x_gathered, R, W, b, coef)
    need = ctx.needs_input_grad
    return (grad_h if need_h else None, None, dR if need[2] else None,
            dW if need[3] else None, db if need[4] else None)


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
        owned = False
        if _may_write_grad(ctx, grad):
            probe = object()
            owned = _owned("loreft", grad, probe, h)
        return _backward(ctx, grad, owned, positions, h, False, R, W, b)


class LoReFTInplaceFunction(torch.autograd.Function):
    """Autograd for reft_ext::loreft_fwd_: saves only the (B, P, d) rows it overwrote, and
    on the CPU their (B, P, r) coefficients z, which the backward then need not recompute."""

    @staticmethod
    def forward(ctx, h, positions, R, W, b):
        saved, coef = _ops_ns.loreft_fwd_(h, positions, R, W, b, True)
        ctx.mark_dirty(h)
        ctx.save_for_backward(saved, coef, positions, R, W, b)
        return h

    @staticmethod
    def backward(ctx, grad):
        saved, coef, positions, R, W, b = ctx.saved_tensors
        owned = False
        if _may_write_grad(ctx, grad):
            probe = object()
            owned = _owned("loreft_", grad, probe, saved)
        return _backward(ctx, grad, owned, positions, saved, True, R, W, b, coef)


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
    if not _REFS_OWNED:
        _calibrate()
    return LoReFTFunction.apply(h, positions, R, W, b)


def loreft_(h: torch.Tensor, positions: torch.Tensor, R: torch.Tensor, W: torch.Tensor,
            b: torch.Tensor) -> torch.Tensor:
    """In-place form of :func:`loreft`: edits only the selected rows of h and returns h.

    Same arguments and result values as :func:`loreft`. h must have unit stride along d.
    Its cost scales with the B*P edited rows, not with B*T*d: for the backward it saves a
    (B, P, d) copy of the rows it overwrote (and on the CPU their (B, P, r) coefficients). Autograd marks h dirty and bumps its version,
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
    if not _REFS_OWNED:
        _calibrate()
    return LoReFTInplaceFunction.apply(h, positions, R, W, b)
