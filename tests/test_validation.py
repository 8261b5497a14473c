"""Bad input raises a clear exception naming the argument, and nothing is written.

Every case runs through both loreft and loreft_, with and without parameters requiring
grad (two different code paths of loreft_), and checks that h is bitwise untouched.
"""
from __future__ import annotations

import re

import pytest
import torch

import reft_ext
from _util import DEVICES, assert_bitwise_equal, bits, make_inputs, make_positions, gen, seed_of

OPS = [pytest.param("loreft", id="loreft"), pytest.param("loreft_", id="loreft_")]
B, T, d, r, P = 2, 6, 8, 3, 4


def _base(device):
    h, pos, R, W, b, _ = make_inputs(seed_of("validation"), B, T, d, r, P, empty_frac=0.0)
    return [t.to(device) for t in (h, pos, R, W, b)]


def _set(i, value):
    def edit(args):
        args = list(args)
        args[i] = value(args[i]) if callable(value) else value
        return args
    return edit


def _all(fn):
    return lambda args: list(fn(*args))


def _pos_with(entries, dtype=torch.int64):
    """Edit positions: entries = {(i, j): value}."""
    def edit(args):
        pos = args[1].clone().to(dtype)
        for (i, j), v in entries.items():
            pos[i, j] = v
        return [args[0], pos, *args[2:]]
    return edit


def _repeat_large_P(dtype):
    """P = 40 > 32 (the checker's other code path): row 1 repeats slot 2's index at 35."""
    def edit(args):
        h, _, R, W, b = args
        g = gen(seed_of("large_P", dtype))
        hh = torch.randn(B, 50, d, generator=g).to(h.device)
        pos = torch.stack([torch.randperm(50, generator=g)[:40] for _ in range(B)])
        pos[1, 35] = pos[1, 2]
        return [hh, pos.to(dtype).to(h.device), R, W, b]
    return edit


# (id, edit of (h, positions, R, W, b), exception type, message regex after "reft_ext.op: ")
CASES = [
    # h
    ("h_2d", _set(0, lambda h: h[0]), ValueError, r"h must have shape \(B, T, d\), got \(6, 8\)"),
    ("h_4d", _set(0, lambda h: h[None]), ValueError, r"h must have shape \(B, T, d\)"),
    ("h_int", _set(0, lambda h: h.to(torch.int32)), TypeError,
     r"h must be float32, bfloat16, float16 or float64, got torch.int32"),
    ("h_complex", _set(0, lambda h: h.to(torch.complex64)), TypeError, r"h must be float32"),
    ("h_d0", _all(lambda h, p, R, W, b: (h[..., :0], p, R[:, :0], W[:, :0], b)), ValueError,
     r"h must have a non-empty hidden dimension"),
    ("h_not_tensor", _set(0, lambda h: h.cpu().numpy()), TypeError,
     r"h must be a torch.Tensor, got ndarray"),
    # positions
    ("pos_1d", _set(1, lambda p: p[0]), ValueError, r"positions must have shape \(B, P\)"),
    ("pos_3d", _set(1, lambda p: p[..., None]), ValueError, r"positions must have shape \(B, P\)"),
    ("pos_wrong_B", _set(1, lambda p: p[:1]), ValueError,
     r"positions must have shape \(B, P\) = \(2, P\) to match h \(2, 6, 8\), got \(1, 4\)"),
    ("pos_float", _set(1, lambda p: p.float()), TypeError,
     r"positions must be int64 or int32, got torch.float32"),
    ("pos_int16", _set(1, lambda p: p.to(torch.int16)), TypeError,
     r"positions must be int64 or int32, got torch.int16"),
    ("pos_bool", _set(1, lambda p: p >= 0), TypeError, r"positions must be int64 or int32"),
    ("pos_list", _set(1, lambda p: p.tolist()), TypeError, r"positions must be a torch.Tensor"),
    ("pos_eq_T", _pos_with({(0, 1): T}), ValueError,
     r"positions\[0, 1\] = 6 is out of range: expected -1 \(empty slot\) or a token index "
     r"in \[0, 6\)"),
    ("pos_eq_T_int32", _pos_with({(1, 3): T}, torch.int32), ValueError,
     r"positions\[1, 3\] = 6 is out of range"),
    ("pos_minus_2", _pos_with({(1, 2): -2}), ValueError, r"positions\[1, 2\] = -2 is out of range"),
    ("pos_minus_2_int32", _pos_with({(0, 0): -2}, torch.int32), ValueError,
     r"positions\[0, 0\] = -2 is out of range"),
    ("pos_huge", _pos_with({(0, 3): 2 ** 40}), ValueError,
     r"positions\[0, 3\] = 1099511627776 is out of range"),
    ("pos_min_int64", _pos_with({(1, 0): -2 ** 63}), ValueError,
     r"positions\[1, 0\] = -9223372036854775808 is out of range"),
    ("pos_repeated", _pos_with({(1, 0): 3, (1, 1): -1, (1, 2): 3, (1, 3): 0}), ValueError,
     r"positions\[1\] repeats token index 3 \(slots 0 and 2\): each index may appear at most "
     r"once per row"),
    ("pos_repeated_int32", _pos_with({(0, 1): 5, (0, 3): 5}, torch.int32), ValueError,
     r"positions\[0\] repeats token index 5 \(slots 1 and 3\)"),
    ("pos_repeated_P40", _repeat_large_P(torch.int64), ValueError,
     r"positions\[1\] repeats token index \d+ \(slots 2 and 35\)"),
    ("pos_repeated_P40_int32", _repeat_large_P(torch.int32), ValueError,
     r"positions\[1\] repeats token index \d+ \(slots 2 and 35\)"),
    # R, W, b shapes
    ("R_1d", _set(2, lambda R: R[0]), ValueError,
     r"R must have shape \(r, d\) with d=8, got \(8,\)"),
    ("R_wrong_d", _set(2, lambda R: R[:, :5]), ValueError, r"R must have shape \(r, d\) with d=8"),
    ("R_transposed", _set(2, lambda R: R.T), ValueError, r"R must have shape \(r, d\)"),
    ("r_0", _all(lambda h, p, R, W, b: (h, p, R[:0], W[:0], b[:0])), ValueError,
     r"R must have at least one row \(rank r >= 1\), got r=0"),
    ("r_gt_d", _all(lambda h, p, R, W, b: (h[..., :2], p, R[:, :2], W[:, :2], b)), ValueError,
     r"rank r=3 exceeds the hidden size d=2"),
    ("W_wrong_r", _set(3, lambda W: W[:2]), ValueError,
     r"W must have shape \(r, d\) = \(3, 8\) like R, got \(2, 8\)"),
    ("W_transposed", _set(3, lambda W: W.T), ValueError, r"W must have shape \(r, d\)"),
    ("W_1d", _set(3, lambda W: W[0]), ValueError, r"W must have shape \(r, d\)"),
    ("b_wrong_r", _set(4, lambda b: b[:2]), ValueError,
     r"b must have shape \(r,\) = \(3,\), got \(2,\)"),
    ("b_2d", _set(4, lambda b: b[None]), ValueError, r"b must have shape \(r,\)"),
    ("b_scalar", _set(4, lambda b: b[0]), ValueError, r"b must have shape \(r,\)"),
    ("W_not_tensor", _set(3, lambda W: W.tolist()), TypeError,
     r"W must be a torch.Tensor, got list"),
    # parameter dtypes: h's or float32 only
    ("R_fp16_on_fp32", _set(2, lambda R: R.half()), TypeError,
     r"R must be torch.float32 \(h's dtype\) or float32, got torch.float16"),
    ("W_bf16_on_fp32", _set(3, lambda W: W.bfloat16()), TypeError,
     r"W must be torch.float32 \(h's dtype\) or float32, got torch.bfloat16"),
    ("b_fp64_on_fp32", _set(4, lambda b: b.double()), TypeError,
     r"b must be torch.float32 \(h's dtype\) or float32, got torch.float64"),
    ("W_bf16_on_fp16", _all(lambda h, p, R, W, b: (h.half(), p, R.half(), W.bfloat16(), b)),
     TypeError, r"W must be torch.float16 \(h's dtype\) or float32, got torch.bfloat16"),
    ("R_fp64_on_bf16", _all(lambda h, p, R, W, b: (h.bfloat16(), p, R.double(), W, b)),
     TypeError, r"R must be torch.bfloat16 \(h's dtype\) or float32, got torch.float64"),
    ("R_int", _set(2, lambda R: R.to(torch.int64)), TypeError, r"R must be torch.float32"),
    # devices (the meta device stands in for a second device)
    ("pos_on_meta", _set(1, lambda p: p.to("meta")), ValueError,
     r"positions is on meta but h is on (cpu|cuda:0); move it to"),
    ("R_on_meta", _set(2, lambda R: R.to("meta")), ValueError, r"R is on meta but h is on"),
    ("W_on_meta", _set(3, lambda W: W.to("meta")), ValueError, r"W is on meta but h is on"),
    ("b_on_meta", _set(4, lambda b: b.to("meta")), ValueError, r"b is on meta but h is on"),
]


def _grad_variant(args, grad):
    if grad:
        return [args[0], args[1]] + [t.detach().requires_grad_() if isinstance(t, torch.Tensor)
                                     and t.is_floating_point() else t for t in args[2:]]
    return args


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_writes_nothing(case, op, grad, device):
    _, edit, exc, pattern = case
    args = _grad_variant(edit(_base(device)), grad)
    h = args[0]
    before = bits(h).clone() if isinstance(h, torch.Tensor) else None
    version = h._version if isinstance(h, torch.Tensor) else None
    with pytest.raises(exc, match=rf"^reft_ext\.{re.escape(op)}: {pattern}"):
        getattr(reft_ext, op)(*args)
    if before is not None:
        assert torch.equal(bits(h), before), "h was written before the error"
        assert h._version == version, "h's version was bumped by a failed call"


@pytest.mark.parametrize("device", DEVICES)
def test_device_mismatch_between_cpu_and_cuda(device):
    """A CPU tensor with a CUDA h (and vice versa) names the argument and both devices."""
    if device == "cpu" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device as the other device")
    other = "cuda" if device == "cpu" else "cpu"
    h, pos, R, W, b = _base(device)
    for k, name in enumerate(("positions", "R", "W", "b"), 1):
        args = [h, pos, R, W, b]
        args[k] = args[k].to(other)
        for op in ("loreft", "loreft_"):
            before = bits(h).clone()
            with pytest.raises(ValueError, match=rf"reft_ext\.{re.escape(op)}: {name} is on "
                                                 rf"{other}"):
                getattr(reft_ext, op)(*args)
            assert torch.equal(bits(h), before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_valid_edge_positions_are_accepted(device, op, pos_dtype):
    """No false alarms: 0 and T-1, -1 anywhere, the same index in different rows, and
    P > 32 rows that share all their indices (the checker's other code path)."""
    fn = getattr(reft_ext, op)
    h, _, R, W, b = _base(device)
    pos = torch.tensor([[0, -1, T - 1, -1], [T - 1, 0, -1, 2]], dtype=pos_dtype, device=device)
    fn(h.clone(), pos, R, W, b)
    g = gen(seed_of("shared_rows"))
    perm = torch.randperm(50, generator=g)[:40]
    pos40 = torch.stack([perm, perm, perm.flip(0)]).to(pos_dtype).to(device)
    h40 = torch.randn(3, 50, d, generator=g).to(device)
    out = fn(h40.clone(), pos40, R, W, b)
    assert not torch.equal(out, h40)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 5, 0), (2, 5, 3), (0, 5, 3), (2, 0, 3), (2, 0, 0)],
                         ids=["P0", "all_minus_1", "B0", "T0", "T0_P0"])
def test_empty_positions_give_h_back_exactly(device, op, shape):
    Bs, Ts, Ps = shape
    h, _, R, W, b, g = make_inputs(seed_of("empty", shape), Bs, Ts, d, r, 0)
    pos = torch.full((Bs, Ps), -1, dtype=torch.int64)
    leaf = h.to(device).clone().requires_grad_()
    params = [t.to(device).clone().requires_grad_() for t in (R, W, b)]
    x = leaf.clone() if op == "loreft_" else leaf
    out = getattr(reft_ext, op)(x, pos.to(device), *params)
    assert_bitwise_equal(out.detach(), h.to(device), "output with no valid position")
    out.backward(g.to(device))
    assert_bitwise_equal(leaf.grad, g.to(device), "dh with no valid position")
    for name, p in zip("RWb", params):
        assert p.grad is not None and not p.grad.any(), f"d{name} must be zero"


def test_positions_values_checked_before_any_write_in_large_batches():
    """The bad entry is in the last row: rows before it must not have been edited."""
    h, pos, R, W, b, _ = make_inputs(seed_of("late_error"), 16, 20, 32, 4, 6, empty_frac=0.0)
    pos[-1, -1] = 20
    for op in ("loreft", "loreft_"):
        before = bits(h).clone()
        with pytest.raises(ValueError, match=r"positions\[15, 5\] = 20 is out of range"):
            getattr(reft_ext, op)(h, pos, R, W, b)
        assert torch.equal(bits(h), before)


def test_make_positions_helper_is_valid():
    """The tests' own position generator: distinct indices per row, -1 elsewhere."""
    g = gen(0)
    for B_, T_, P_ in [(3, 5, 9), (2, 40, 40), (1, 1, 1)]:
        pos = make_positions(g, B_, T_, P_)
        for row in pos:
            valid = row[row >= 0]
            assert valid.unique().numel() == valid.numel() and (valid < T_).all()
            assert ((row == -1) | (row >= 0)).all()
