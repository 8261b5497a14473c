"""Shared helpers of the op tests: devices, seeded inputs, the tolerance rule, bit checks.

Tolerance rule (the only one in this test suite; see `assert_within_rule`):

    err_fused = max |fused - ref64|
    err_torch = max |torch_same - ref64|
    err_fused <= 2 * err_torch + FLOOR_ULPS[dtype] * eps(dtype) * max(1, max |ref64|)

where ref64 is `reft_ext.ops.reference.loreft_reference` run in float64 on the CPU (inputs
converted exactly with .double(): the ground truth for the very same input values), and
torch_same is the same pure-PyTorch reference run in the dtypes under test, on the device
under test. The fused op may be at most twice as wrong as PyTorch itself in that dtype (the
flash-attention rule). The floor, a few units of `torch.finfo(dtype).eps` at the largest
expected magnitude, is for tensors where PyTorch's error is 0 or tiny while the fused kernel
legitimately rounds a little differently (it folds W - R into one matrix and sums dot
products and row reductions in another order):

  * float32 / bfloat16 / float16: 4 ulps. Only needed in degenerate cases (d = 1, sums of
    few terms); otherwise 2 * err_torch dominates.
  * float64: 16 ulps (about 3.6e-15 relative). Here the reference run in h's dtype *is* the
    ground truth, so err_torch = 0 and the floor is the whole bound; the fused kernel's
    parameter gradients sum hundreds of rows in chunks, in another order than PyTorch.

It applies to the output and to every gradient, each with its own dtype and magnitude.
(Measured when the rule was set, over the shapes of test_op.py: the floor was needed by at
most 1.2 ulps in float32, 0 in bfloat16 / float16, and 4.3 ulps in float64.)
"""
from __future__ import annotations

import zlib

import pytest
import torch

import reft_ext
from reft_ext import _native
from reft_ext.ops.reference import loreft_reference

FLOOR_ULPS = {torch.float32: 4, torch.bfloat16: 4, torch.float16: 4, torch.float64: 16}

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
POS_DTYPES = (torch.int64, torch.int32)


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU available (torch.cuda.is_available() is False)"
    if not _native.has_cuda_kernels():
        return "this build of reft_ext has no CUDA kernels (built with REFT_EXT_CUDA=OFF)"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()

# Every device-parametrised test runs on the CPU and, when a GPU and CUDA kernels are
# present, on CUDA; the float64 ground truth is always computed on the CPU.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or ""),
    ]),
]


def seed_of(*parts) -> int:
    """A reproducible seed derived from the test's parameters (stable across runs)."""
    return zlib.crc32(repr(parts).encode())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_positions(g: torch.Generator, B: int, T: int, P: int, dtype=torch.int64,
                   empty_frac: float = 0.25) -> torch.Tensor:
    """(B, P) distinct token indices per row in random order, -1 in random empty slots.

    At most T slots per row can be valid; when P > T the rest are -1.
    """
    pos = torch.full((B, P), -1, dtype=torch.int64)
    for i in range(B):
        want = min(P, T)
        if want and empty_frac:
            keep = torch.rand(want, generator=g) >= empty_frac
            want = int(keep.sum())
        tokens = torch.randperm(T, generator=g)[:want]
        slots = torch.randperm(P, generator=g)[:want]
        pos[i, slots] = tokens
    return pos.to(dtype)


def make_params(g: torch.Generator, r: int, d: int, dtypes=(torch.float32,) * 3):
    """R (r, d) with orthonormal rows, W (r, d) ~ N(0, 1/d), b (r,) ~ N(0, 1); fresh values."""
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))
    R = q.T.contiguous()
    W = torch.randn(r, d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.randn(r, generator=g, dtype=torch.float64)
    return tuple(t.to(dt) for t, dt in zip((R, W, b), dtypes))


def make_inputs(seed: int, B: int, T: int, d: int, r: int, P: int,
                h_dtype=torch.float32, param_dtypes=None, pos_dtype=torch.int64,
                empty_frac: float = 0.25):
    """Fresh random (h, positions, R, W, b, grad_out) on the CPU, all from one seed."""
    g = gen(seed)
    param_dtypes = param_dtypes or (h_dtype,) * 3
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(h_dtype)
    positions = make_positions(g, B, T, P, pos_dtype, empty_frac)
    R, W, b = make_params(g, r, d, param_dtypes)
    grad_out = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(h_dtype)
    return h, positions, R, W, b, grad_out


def selected_mask(positions: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) bool: True at the rows the op edits."""
    B = positions.shape[0]
    mask = torch.zeros(B, T, dtype=torch.bool)
    pos = positions.cpu().long()
    bi, pj = (pos >= 0).nonzero(as_tuple=True)
    mask[bi, pos[bi, pj]] = True
    return mask


_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32,
             torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits (so -0.0 != 0.0 and NaN == same NaN); tensors of
    other dtypes come back as flat bytes."""
    t = t.detach().cpu().contiguous()
    if t.dtype in _INT_VIEW:
        return t.view(_INT_VIEW[t.dtype])
    return t.reshape(-1).view(torch.uint8)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = bits(actual) != bits(expected)
    assert not diff.any(), f"{what}: {int(diff.sum())} elements differ bitwise"


def tolerance(torch_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The bound of the tolerance rule (module docstring) for one tensor."""
    ref64 = ref64.detach().cpu().double()
    err_torch = (torch_same.detach().cpu().double() - ref64).abs().max().item() \
        if ref64.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
    return 2.0 * err_torch + FLOOR_ULPS[dtype] * torch.finfo(dtype).eps * scale


def assert_within_rule(what: str, fused: torch.Tensor, ref64: torch.Tensor,
                       torch_same: torch.Tensor) -> float:
    """Asserts the tolerance rule for one tensor; returns the bound used."""
    assert fused.dtype == torch_same.dtype, f"{what}: dtype {fused.dtype} != {torch_same.dtype}"
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert fused.device == torch_same.device, f"{what}: device {fused.device}"
    tol = tolerance(torch_same, ref64, fused.dtype)
    err = (fused.detach().cpu().double() - ref64.detach().cpu().double()).abs()
    worst = err.max().item() if err.numel() else 0.0
    assert worst <= tol, (f"{what} ({fused.dtype}): max error {worst:.3e} vs float64 reference "
                          f"exceeds 2 x PyTorch's same-dtype error + floor = {tol:.3e}")
    return tol


def run_op(op, h, positions, R, W, b, grad_out, device, inplace: bool, grad_from="caller"):
    """Runs loreft (or loreft_ on a non-leaf copy) on `device` with grads; returns
    (out, dh, dR, dW, db) where out is detached.

    grad_from: "caller" passes grad_out to out.backward (the caller keeps a reference, so
    the op must not write into it); "autograd" makes it the gradient of (out * grad_out).sum()
    (bitwise grad_out, held by autograd alone, so the op may write dx into it); "params-only"
    is "autograd" with h not requiring grad (dh is returned as None)."""
    leaf = h.detach().to(device).requires_grad_(grad_from != "params-only")
    params = [t.detach().to(device).requires_grad_() for t in (R, W, b)]
    pos = positions.to(device)
    x = leaf.clone() if inplace else leaf  # loreft_ needs a non-leaf when h requires grad
    out = op(x, pos, *params)
    if inplace:
        assert out is x, "loreft_ must return h itself"
    if grad_from == "caller":
        out.backward(grad_out.to(device))
    else:
        (out * grad_out.to(device)).sum().backward()
    return (out.detach(), leaf.grad, *(p.grad for p in params))


def reference_results(h, positions, R, W, b, grad_out, device="cpu", float64=False):
    """loreft_reference forward+backward: in float64 on the CPU (float64=True), or in the
    inputs' own dtypes on `device`."""
    if float64:
        device = "cpu"
        h, R, W, b, grad_out = (t.double() for t in (h, R, W, b, grad_out))
    return run_op(loreft_reference, h, positions, R, W, b, grad_out, device, inplace=False)


def _assert_rows_written(what, result, ref64, before, mask):
    """Poison check: the input itself is the "poison" of an unwritten row. Wherever the
    correctly rounded result differs from the input, the op's row must differ too."""
    if not mask.any():
        return
    expect_changed = (ref64.to(before.dtype)[mask] != before[mask]).any(dim=-1)
    changed = (result[mask] != before[mask]).any(dim=-1)
    assert bool(changed[expect_changed].all()), f"a selected row of {what} was not written"


def check_against_reference(h, positions, R, W, b, grad_out, device, inplace: bool,
                            check_rows_changed: bool = True, grad_from: str = "caller"):
    """The full forward+backward check of one call of loreft / loreft_ (see the module
    docstring for the tolerance rule). Also: unselected rows of out and dh are bitwise h
    and grad_out; every selected row whose correct value differs from its input in h's
    dtype must have been written (catches rows a kernel skipped)."""
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    fused = run_op(op, h, positions, R, W, b, grad_out, device, inplace, grad_from)
    ref64 = reference_results(h, positions, R, W, b, grad_out, float64=True)
    same = reference_results(h, positions, R, W, b, grad_out, device=device)
    names = ("out", "dh", "dR", "dW", "db")
    if grad_from == "params-only":
        assert fused[1] is None, "h does not require grad: no dh expected"
        fused, ref64, same, names = ([t[0], *t[2:]] for t in (fused, ref64, same, names))
    for name, f, e, s in zip(names, fused, ref64, same):
        assert f.dtype == s.dtype, f"{name}: dtype {f.dtype}, expected {s.dtype}"
        assert f.device.type == torch.device(device).type, f"{name} on {f.device}"
        assert_within_rule(name, f, e, s)

    T = h.shape[1]
    mask = selected_mask(positions, T)
    out = fused[0].cpu()
    assert_bitwise_equal(out[~mask], h[~mask], "out at unselected rows vs h")
    if check_rows_changed:
        _assert_rows_written("out", out, ref64[0], h, mask)
    if grad_from != "params-only":
        dh = fused[1].cpu()
        assert_bitwise_equal(dh[~mask], grad_out[~mask], "dh at unselected rows vs grad_out")
        if check_rows_changed:
            _assert_rows_written("dh", dh, ref64[1], grad_out, mask)
    return fused
