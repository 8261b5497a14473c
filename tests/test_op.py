"""Values and gradients of reft_ext.loreft / reft_ext.loreft_ against the float64 reference.

Tolerances follow the one rule of tests/_util.py. Every test draws fresh random inputs from
a seed derived from its own parameters, so a failure reproduces exactly.
"""
from __future__ import annotations

import itertools
import os
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reft_ext
from _util import (DEVICES, FLOAT_DTYPES, POS_DTYPES, assert_bitwise_equal, bits,
                   assert_within_rule, check_against_reference, make_inputs, reference_results,
                   run_op, seed_of, selected_mask)

OPS = [pytest.param(False, id="loreft"), pytest.param(True, id="loreft_")]


def _dtype_combos():
    """Every (h dtype, (R, W, b) dtypes) the contract allows: each param in h's or float32."""
    combos = []
    for hd in FLOAT_DTYPES:
        choices = (hd,) if hd == torch.float32 else (hd, torch.float32)
        for pd in itertools.product(choices, repeat=3):
            combos.append((hd, pd))
    return combos


def _dt(dt):
    return str(dt).replace("torch.", "").replace("float", "f").replace("bf16", "bf16")


def _combo_id(combo):
    hd, (rd, wd, bd) = combo
    return f"h={_dt(hd)}-R={_dt(rd)}-W={_dt(wd)}-b={_dt(bd)}"


DTYPE_COMBOS = _dtype_combos()

# (B, T, d, r, P, fraction of empty slots)
SHAPES = {
    "basic": (2, 7, 16, 4, 3, 0.25),
    "d1_r1_B1": (1, 5, 1, 1, 2, 0.0),
    "odd_d17": (3, 9, 17, 5, 4, 0.25),
    "odd_d129": (2, 6, 129, 8, 5, 0.25),
    "d777_r9": (2, 6, 777, 9, 5, 0.25),  # several column blocks of the CPU tiles, odd r
    "r1": (2, 8, 12, 1, 3, 0.0),
    "r_eq_d": (2, 5, 6, 6, 4, 0.0),
    "P_gt_T": (2, 4, 9, 3, 7, 0.0),  # at most 4 valid slots per row: the rest are -1
    "P_gt_32_B1": (1, 45, 10, 2, 40, 0.1),
    "many_slots": (4, 64, 24, 3, 48, 0.1),  # several reduction chunks in the backward
    "T1": (3, 1, 8, 2, 1, 0.0),
    "P0": (2, 5, 8, 2, 0, 0.0),
    "all_empty": (2, 5, 8, 2, 4, 1.0),
}
# (h dtype, parameter dtypes or None for h's) run over every shape
SHAPE_DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                (torch.float64, None), (torch.bfloat16, (torch.float32,) * 3)]
SHAPE_DTYPE_IDS = ["f32", "bf16", "f16", "f64", "bf16_fp32params"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("combo", DTYPE_COMBOS, ids=_combo_id)
@pytest.mark.parametrize("shape", ["basic", "odd_d17"])
def test_every_dtype_combination(device, inplace, combo, shape):
    hd, pd = combo
    B, T, d, r, P, empty = SHAPES[shape]
    pos_dtype = POS_DTYPES[seed_of(combo, shape) % 2]
    seed = seed_of("dtypes", shape, combo, inplace)
    h, pos, R, W, b, g = make_inputs(seed, B, T, d, r, P, hd, pd, pos_dtype, empty)
    check_against_reference(h, pos, R, W, b, g, device, inplace)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=_dt)
@pytest.mark.parametrize("dtypes", SHAPE_DTYPES, ids=SHAPE_DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes(device, inplace, pos_dtype, dtypes, shape):
    hd, pd = dtypes
    B, T, d, r, P, empty = SHAPES[shape]
    seed = seed_of("shapes", shape, dtypes, pos_dtype, inplace)
    h, pos, R, W, b, g = make_inputs(seed, B, T, d, r, P, hd, pd, pos_dtype, empty)
    out, dh, dR, dW, db = check_against_reference(h, pos, R, W, b, g, device, inplace)
    if not (pos >= 0).any():  # empty edit: h and grad_out come back exactly, zero grads
        assert_bitwise_equal(out.cpu(), h, "out with no valid position")
        assert_bitwise_equal(dh.cpu(), g, "dh with no valid position")
        for name, t in (("dR", dR), ("dW", dW), ("db", db)):
            assert not t.any(), f"{name} must be zero when no position is valid"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("grad_from", ["autograd", "params-only"])
@pytest.mark.parametrize("dtypes", SHAPE_DTYPES, ids=SHAPE_DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_other_backward_paths(device, inplace, grad_from, dtypes, shape):
    """test_shapes with the gradient owned by autograd (autograd then adds the sparse row
    correction into it in place) and with only the parameters requiring grad (the backward then reads the selected
    rows only, when P <= T/2); see tests/test_backward_paths.py for which path runs when."""
    hd, pd = dtypes
    B, T, d, r, P, empty = SHAPES[shape]
    seed = seed_of("paths", shape, dtypes, grad_from, inplace)
    pos_dtype = POS_DTYPES[seed % 2]
    h, pos, R, W, b, g = make_inputs(seed, B, T, d, r, P, hd, pd, pos_dtype, empty)
    check_against_reference(h, pos, R, W, b, g, device, inplace, grad_from=grad_from)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
def test_nan_outside_selection_is_not_read(device, inplace):
    """Poison: NaN in every unselected row of h and of grad_out. They must come back
    bitwise (unselected rows are copied, not recomputed) and must not leak into the edited
    rows or the parameter gradients (only selected rows are read)."""
    h, pos, R, W, b, g = make_inputs(seed_of("nan", inplace), 3, 11, 20, 3, 5)
    mask = selected_mask(pos, h.shape[1])
    h[~mask] = float("nan")
    g[~mask] = float("-inf")
    out, dh, dR, dW, db = run_op(reft_ext.loreft_ if inplace else reft_ext.loreft,
                                 h, pos, R, W, b, g, device, inplace)
    out, dh = out.cpu(), dh.cpu()
    assert_bitwise_equal(out[~mask], h[~mask], "unselected rows of out")
    assert_bitwise_equal(dh[~mask], g[~mask], "unselected rows of dh")
    assert torch.isfinite(out[mask]).all() and torch.isfinite(dh[mask]).all()
    for name, t in (("dR", dR), ("dW", dW), ("db", db)):
        assert torch.isfinite(t).all(), f"{name} read an unselected row"
    # Values: any finite stand-in for the unselected rows gives the same selected results.
    h_ok, g_ok = h.clone(), g.clone()
    h_ok[~mask] = 0.5
    g_ok[~mask] = 0.25
    ref64 = reference_results(h_ok, pos, R, W, b, g_ok, float64=True)
    same = reference_results(h_ok, pos, R, W, b, g_ok, device=device)
    for k, (name, f) in enumerate((("out", out[mask]), ("dh", dh[mask]), ("dR", dR),
                                   ("dW", dW), ("db", db))):
        e, t = (ref64[k], same[k].cpu()) if k >= 2 else (ref64[k][mask], same[k].cpu()[mask])
        assert_within_rule(name, f.cpu(), e, t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pos_dtype", POS_DTYPES, ids=_dt)
@pytest.mark.parametrize("shape", [(2, 5, 7, 3, 4), (1, 3, 1, 1, 5), (2, 4, 6, 6, 2)],
                         ids=["basic", "d1", "r_eq_d"])
def test_gradcheck_float64(device, pos_dtype, shape):
    B, T, d, r, P = shape
    h, pos, R, W, b, _ = make_inputs(seed_of("gradcheck", shape, pos_dtype), B, T, d, r, P,
                                     torch.float64, pos_dtype=pos_dtype)
    pos = pos.to(device)
    inputs = tuple(t.to(device).clone().requires_grad_() for t in (h, R, W, b))
    assert torch.autograd.gradcheck(
        lambda h_, R_, W_, b_: reft_ext.loreft(h_, pos, R_, W_, b_), inputs)
    assert torch.autograd.gradcheck(
        lambda h_, R_, W_, b_: reft_ext.loreft_(h_.clone(), pos, R_, W_, b_), inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("grad_from", ["caller", "autograd"])
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, (torch.float32,) * 3),
                                    (torch.float64, None)], ids=["f32", "bf16_fp32params", "f64"])
def test_backward_is_deterministic_across_runs_and_threads(device, inplace, grad_from, dtypes):
    """Same inputs give the same bits: three runs, and on the CPU 1 vs 2 vs 3 threads (the
    reduction partition must depend on the shape only). The shape is big enough for the CPU
    kernel to use several threads and several reduction chunks."""
    hd, pd = dtypes
    h, pos, R, W, b, g = make_inputs(seed_of("determinism", dtypes, inplace), 8, 80, 256, 4,
                                     64, hd, pd, empty_frac=0.1)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    runs = []
    for threads in ((2, 2, 2, 1, 3) if device == "cpu" else (None,) * 3):
        if threads is not None:
            torch.set_num_threads(threads)
        runs.append(run_op(op, h, pos, R, W, b, g, device, inplace, grad_from))
    names = ("out", "dh", "dR", "dW", "db")
    for k, run in enumerate(runs[1:], 1):
        for name, a, e in zip(names, run, runs[0]):
            assert_bitwise_equal(a, e, f"{name} of run {k} vs run 0")


@pytest.mark.parametrize("device", DEVICES)
def test_loreft_does_not_modify_inputs(device):
    h, pos, R, W, b, g = make_inputs(seed_of("untouched"), 2, 6, 10, 3, 4)
    tensors = [t.to(device) for t in (h, pos, R, W, b)]
    before = [t.clone() for t in tensors]
    versions = [t._version for t in tensors]
    out = reft_ext.loreft(*tensors)
    out2 = reft_ext.loreft(tensors[0].requires_grad_(), *tensors[1:])
    out2.backward(g.to(device))
    for name, t, t0, v in zip(("h", "positions", "R", "W", "b"), tensors, before, versions):
        assert torch.equal(t.detach(), t0), f"loreft modified {name}"
        assert t._version == v, f"loreft bumped the version of {name}"
    assert out.data_ptr() != tensors[0].data_ptr()
    assert_bitwise_equal(out, out2.detach(), "loreft with and without grad")


# --- strided inputs -------------------------------------------------------------------
# The fused op must give exactly the bits it gives on contiguous copies of the same values.

def _strided_layout(h, kind):
    """(buffer, view) such that view(buffer) equals h but is not contiguous; the rest of the
    buffer holds other random values."""
    B, T, d = h.shape
    if kind == "transposed_BT":  # strides (d, B*d, 1)
        return h.transpose(0, 1).contiguous(), lambda t: t.transpose(0, 1)
    if kind == "d_major":  # (B, d, T) storage: last stride T
        return h.transpose(1, 2).contiguous(), lambda t: t.transpose(1, 2)
    if kind == "sliced_T":  # every other token of a longer buffer
        buf, view = torch.randn(B, 2 * T, d).to(h.dtype), lambda t: t[:, ::2]
    elif kind == "padded_rows":  # row stride d+3, batch stride not a multiple of T*d
        buf, view = torch.randn(B + 1, T, d + 3).to(h.dtype), lambda t: t[1:, :, 2:d + 2]
    elif kind == "last_stride_2":
        buf, view = torch.randn(B, T, 2 * d).to(h.dtype), lambda t: t[..., ::2]
    else:
        raise AssertionError(kind)
    view(buf).copy_(h)
    return buf, view


UNIT_STRIDE_KINDS = ["transposed_BT", "sliced_T", "padded_rows"]
NON_UNIT_KINDS = ["last_stride_2", "d_major"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("kind", UNIT_STRIDE_KINDS + NON_UNIT_KINDS)
def test_strided_h(device, inplace, kind):
    """h as a strided view (of a leaf for loreft, of a non-leaf for loreft_): results and
    gradients are bitwise those of a contiguous h; the rest of the buffer is untouched and
    gets zero gradient."""
    if inplace and kind in NON_UNIT_KINDS:
        pytest.skip("loreft_ refuses these: see test_inplace_rejects_non_unit_last_stride")
    h, pos, R, W, b, g = make_inputs(seed_of("strided_h", kind, inplace), 3, 7, 12, 3, 4)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    expected = run_op(op, h, pos, R, W, b, g, device, inplace)

    buf, view = _strided_layout(h, kind)
    buf_leaf = buf.to(device).clone().requires_grad_()
    params = [t.to(device).clone().requires_grad_() for t in (R, W, b)]
    x = view(buf_leaf.clone() if inplace else buf_leaf)
    assert not x.is_contiguous() and torch.equal(x.detach().cpu(), h)
    out = op(x, pos.to(device), *params)
    if inplace:
        assert out is x
    out.backward(g.to(device))
    dh = view(buf_leaf.grad)
    got = (out.detach(), dh, *(p.grad for p in params))
    for name, a, e in zip(("out", "dh", "dR", "dW", "db"), got, expected):
        assert_bitwise_equal(a, e, f"{name} with {kind} h")
    outside = torch.ones_like(buf, dtype=torch.bool)
    view(outside).fill_(False)
    assert not buf_leaf.grad.cpu()[outside].any(), "gradient leaked outside the view"
    assert torch.equal(buf_leaf.detach().cpu(), buf), "the strided input was modified"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", NON_UNIT_KINDS)
def test_inplace_rejects_non_unit_last_stride(device, kind):
    h, pos, R, W, b, _ = make_inputs(seed_of("inplace_stride", kind), 2, 5, 8, 2, 3)
    buf, view = _strided_layout(h, kind)
    hv = view(buf.to(device))
    before = bits(hv).clone()
    with pytest.raises(ValueError, match=r"loreft_: h must have unit stride"):
        reft_ext.loreft_(hv, pos.to(device), R.to(device), W.to(device), b.to(device))
    assert torch.equal(bits(hv), before), "h was written before the error"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
def test_strided_params_and_positions(device, inplace):
    """R, W, b and positions as non-contiguous views with the same values."""
    B, T, d, r, P = 3, 9, 14, 4, 5
    h, pos, R, W, b, g = make_inputs(seed_of("strided_params", inplace), B, T, d, r, P,
                                     torch.bfloat16, (torch.float32, torch.bfloat16,
                                                      torch.float32), torch.int32)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    expected = run_op(op, h, pos, R, W, b, g, device, inplace)
    Rv = R.T.contiguous().T                       # (r, d) with strides (1, r)
    Wbuf = torch.empty(r, 2 * d, dtype=W.dtype).normal_()
    Wbuf[:, 1::2] = W
    Wv = Wbuf[:, 1::2]                            # last stride 2
    bbuf = torch.empty(3 * r, dtype=b.dtype).normal_()
    bbuf[::3] = b
    bv = bbuf[::3]                                # stride 3
    pos_v = pos.T.contiguous().T                  # (B, P) with strides (1, B)
    for t, v in ((R, Rv), (W, Wv), (b, bv), (pos, pos_v)):
        assert torch.equal(t, v) and not v.is_contiguous()
    got = run_op(op, h, pos_v, Rv, Wv, bv, g, device, inplace)
    for name, a, e in zip(("out", "dh", "dR", "dW", "db"), got, expected):
        assert_bitwise_equal(a, e, f"{name} with strided params/positions")
    assert got[2].shape == R.shape and got[3].shape == W.shape and got[4].shape == b.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
def test_non_contiguous_grad_output(device, inplace):
    h, pos, R, W, b, g = make_inputs(seed_of("strided_grad", inplace), 2, 6, 10, 3, 4)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft

    # Transposed grad (strides (d, B*d, 1)) and a last-stride-2 grad.
    expected = run_op(op, h, pos, R, W, b, g, device, inplace)
    g_t = g.transpose(0, 1).contiguous().transpose(0, 1)
    gbuf = torch.empty(*g.shape[:2], 2 * g.shape[2]).normal_()
    gbuf[..., ::2] = g
    for gv in (g_t, gbuf[..., ::2]):
        assert not gv.is_contiguous() and torch.equal(gv, g)
        got = run_op(op, h, pos, R, W, b, gv, device, inplace)
        for name, a, e in zip(("out", "dh", "dR", "dW", "db"), got, expected):
            assert_bitwise_equal(a, e, f"{name} with strided grad")

    # An expanded (all strides 0) grad from .sum(), against the reference.
    ones = torch.ones_like(h)
    ref64 = reference_results(h, pos, R, W, b, ones, float64=True)
    same = reference_results(h, pos, R, W, b, ones, device=device)
    leaf = h.to(device).clone().requires_grad_()
    params = [t.to(device).clone().requires_grad_() for t in (R, W, b)]
    out = op(leaf.clone() if inplace else leaf, pos.to(device), *params)
    out.sum().backward()
    got = run_op(op, h, pos, R, W, b, ones, device, inplace)
    for name, a, e in zip(("dh", "dR", "dW", "db"), (leaf.grad, *(p.grad for p in params)),
                          got[1:]):
        assert_bitwise_equal(a, e, f"{name} with an expanded grad")
    for k, name in enumerate(("dh", "dR", "dW", "db"), 1):
        assert_within_rule(name, got[k], ref64[k], same[k])


# --- loreft_ ---------------------------------------------------------------------------

def _exact_16bit_case(dtype, d, seed):
    """Values for which the op's float32 results are exact, so its one rounding (float32 to
    the 16-bit dtype) can be predicted bit for bit. Column k holds values with exponent e_k
    and mbits mantissa bits; c (r=1, length d) holds multiples of half a unit in the last
    place there, so x + c lands on ties (odd multiples) in both directions. Column 0 sits
    at the largest exponent with the largest mantissa: +half an ulp rounds to +inf."""
    g = torch.Generator().manual_seed(seed)
    mbits, e_max = (7, 127) if dtype == torch.bfloat16 else (10, 15)
    B, T = 2, 8
    e = torch.randint(-4, 5, (d,), generator=g).double()
    e[0] = e_max
    mant = 1 + torch.randint(0, 2 ** mbits, (B, T, d), generator=g).double() / 2 ** mbits
    mant[:, :, 0] = 2 - 2.0 ** -mbits
    sign = torch.where(torch.rand(B, T, d, generator=g) < 0.5, -1.0, 1.0)
    sign[:, :, 0] = 1.0
    vals = (sign * mant * 2 ** e).to(dtype)
    steps = torch.tensor([1.0, -1.0, 3.0, -3.0, 2.0, -2.0, 0.5, -5.0], dtype=torch.float64)
    mult = steps[torch.randint(0, len(steps), (d,), generator=g)]
    mult[0] = 1.0
    c = (mult * 2.0 ** (e - mbits - 1)).to(torch.float32)[None]  # (1, d), exact in float32
    return vals, c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dt)
@pytest.mark.parametrize("d", [64, 67], ids=["whole_vectors", "tail"])
def test_16bit_results_round_to_nearest_even(device, inplace, dtype, d):
    """Bitwise check of the float32 -> 16-bit rounding, ties and overflow included, in the
    forward (rows written straight from vectors, or through the scalar tail) and in dx."""
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    x, c = _exact_16bit_case(dtype, d, seed_of("round", dtype, d))
    B, T, _ = x.shape
    x[1, 3, 5] = float("nan")  # a NaN in a row makes that whole edited row NaN
    pos = torch.arange(T).repeat(B, 1)
    # Forward: W = R = c and b = 1 give z = 1 exactly, so out = x + c (exact in float32).
    R = c.clone()
    g_any = torch.randn(B, T, d, dtype=torch.float64).to(dtype)
    out, *_ = run_op(op, x, pos, R, R.clone(), torch.ones(1), g_any, device, inplace)
    want = (x.double() + c.double()).float().to(dtype)
    want[1, 3] = float("nan")
    assert int(torch.isinf(want).sum()) >= B * T - 1, "the overflow column must round to inf"
    assert_bitwise_equal(torch.where(torch.isnan(want), 0, out.cpu()),
                         torch.where(torch.isnan(want), 0, want), "forward")
    assert bool(torch.isnan(out[1, 3].cpu()).all()), "the NaN row must be NaN throughout"
    # Backward: R = e_0 and g[..., 0] = 1 give g R^T = 1, so dx = g + (W - R) = g + c.
    g_out = x.clone()
    g_out[1, 3, 5] = 1.0
    g_out[:, :, 0] = 1.0
    R = torch.zeros(1, d)
    R[0, 0] = 1.0
    c[0, 0] = 0.0
    h = torch.randn(B, T, d, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, dh, *_ = run_op(op, h, pos, R, R + c, torch.zeros(1), g_out, device, inplace)
    want = (g_out.double() + c.double()).float().to(dtype)
    assert_bitwise_equal(dh, want, "dx")
    low, half = (0xFFFF, 0x8000) if dtype == torch.bfloat16 else (0x1FFF, 0x1000)
    ties = ((x.double() + c.double()).float().view(torch.int32) & low) == half
    assert int(ties.sum()) > 10, "the case must contain ties to test them"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.float16, None),
                                    (torch.bfloat16, (torch.float32, torch.bfloat16,
                                                      torch.bfloat16))],
                         ids=["f32", "f16", "bf16_mixed"])
def test_inplace_matches_out_of_place_bitwise(device, dtypes):
    hd, pd = dtypes
    h, pos, R, W, b, g = make_inputs(seed_of("same", dtypes), 3, 10, 24, 4, 6, hd, pd)
    a = run_op(reft_ext.loreft, h, pos, R, W, b, g, device, inplace=False)
    c = run_op(reft_ext.loreft_, h, pos, R, W, b, g, device, inplace=True)
    for name, x, y in zip(("out", "dh", "dR", "dW", "db"), c, a):
        assert_bitwise_equal(x, y, f"loreft_ vs loreft: {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires", ["h", "R", "Wb", "none"])
def test_inplace_grad_subsets(device, requires):
    """loreft_ on a plain (leaf, no grad) h with only parameters requiring grad, and the
    other subsets: values and the gradients that exist match loreft."""
    h, pos, R, W, b, g = make_inputs(seed_of("subsets", requires), 2, 7, 9, 2, 3)
    h, pos, R, W, b, g = (t.to(device) for t in (h, pos, R, W, b, g))
    flags = {"h": "h" == requires, "R": requires == "R", "W": requires == "Wb",
             "b": requires == "Wb"}
    results = []
    for op in (reft_ext.loreft, reft_ext.loreft_):
        hl = h.clone().requires_grad_(flags["h"])
        params = [t.clone().requires_grad_(flags[n]) for n, t in zip("RWb", (R, W, b))]
        x = hl.clone() if (op is reft_ext.loreft_ and flags["h"]) else hl
        out = op(x, pos, *params)
        if out.requires_grad:
            out.backward(g)
        # (an h that did not require grad is no longer a leaf after loreft_: skip its .grad)
        results.append([out.detach()] + [t.grad if flags[n] else None
                                         for n, t in zip("hRWb", (hl, *params))])
    for k, (x, y) in enumerate(zip(*results)):
        if y is None:
            assert x is None, f"gradient {k} should be None"
        else:
            assert_bitwise_equal(x, y, f"result {k}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_inplace_marks_h_dirty(device, grad_mode):
    """A backward through a tensor that loreft_ clobbered raises instead of miscomputing."""
    h, pos, R, W, b, g = make_inputs(seed_of("dirty", grad_mode), 2, 6, 8, 2, 3)
    leaf = h.to(device).clone().requires_grad_()
    x = leaf.clone()
    saved_x = x.sin()  # sin saves x for its backward
    params = [t.to(device).requires_grad_(grad_mode == "grad") for t in (R, W, b)]
    v0 = x._version
    with torch.set_grad_enabled(grad_mode == "grad"):
        reft_ext.loreft_(x, pos.to(device), *params)
    assert x._version > v0, "loreft_ must bump h's version counter"
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved_x.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("view", [False, True], ids=["leaf", "view_of_leaf"])
def test_inplace_on_leaf_requiring_grad_raises_before_writing(device, view):
    h, pos, R, W, b, _ = make_inputs(seed_of("leaf", view), 2, 6, 8, 2, 3)
    leaf = h.to(device).clone().requires_grad_()
    x = leaf[:, :] if view else leaf
    before = bits(leaf).clone()
    with pytest.raises(RuntimeError, match=r"loreft_: h is a leaf tensor that requires grad"):
        reft_ext.loreft_(x, pos.to(device), R.to(device), W.to(device), b.to(device))
    assert torch.equal(bits(leaf), before), "h was written before the error"
    # Under no_grad an in-place edit of a leaf is legitimate (e.g. inference).
    with torch.no_grad():
        reft_ext.loreft_(x, pos.to(device), R.to(device), W.to(device), b.to(device))
    expected = reft_ext.loreft(h.to(device), pos.to(device), R.to(device), W.to(device),
                               b.to(device))
    assert_bitwise_equal(leaf.detach(), expected, "loreft_ on a leaf under no_grad")


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_inference_mode(device):
    h, pos, R, W, b, _ = make_inputs(seed_of("inference"), 2, 6, 8, 2, 3)
    h, pos, R, W, b = (t.to(device) for t in (h, pos, R, W, b))
    expected = reft_ext.loreft(h, pos, R, W, b)
    with torch.inference_mode():
        x = h.clone()
        assert reft_ext.loreft_(x, pos, R, W, b) is x
        y = reft_ext.loreft(h, pos, R, W, b)
    assert_bitwise_equal(x, expected, "loreft_ under inference_mode")
    assert_bitwise_equal(y, expected, "loreft under inference_mode")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", OPS)
def test_chained_edits(device, inplace):
    """Two edits of the same hidden state (two interventions at one layer) backprop right."""
    h, pos, R, W, b, g = make_inputs(seed_of("chain", inplace), 2, 8, 10, 3, 4)
    _, pos2, R2, W2, b2, _ = make_inputs(seed_of("chain2", inplace), 2, 8, 10, 2, 5)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft

    def run(fn, dtype, dev):
        leaf = h.to(dtype).to(dev).clone().requires_grad_()
        ps = [t.to(dtype).to(dev).clone().requires_grad_() for t in (R, W, b, R2, W2, b2)]
        x = leaf.clone() if fn is reft_ext.loreft_ else leaf
        y = fn(fn(x, pos.to(dev), *ps[:3]) * 1.5, pos2.to(dev), *ps[3:])
        y.backward(g.to(dtype).to(dev))
        return [y.detach(), leaf.grad] + [p.grad for p in ps]

    fused = run(op, torch.float32, device)
    ref64 = run(reft_ext.loreft_reference, torch.float64, "cpu")
    same = run(reft_ext.loreft_reference, torch.float32, device)
    for k, (f, e, s) in enumerate(zip(fused, ref64, same)):
        assert_within_rule(f"chained result {k}", f, e, s)


# --- random shapes ---------------------------------------------------------------------

@st.composite
def _problems(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 12))
    d = draw(st.integers(1, 40))
    r = draw(st.integers(1, min(d, 6)))
    P = draw(st.integers(0, T + 3))
    hd = draw(st.sampled_from(FLOAT_DTYPES))
    choices = [hd, torch.float32]
    pd = tuple(draw(st.sampled_from(choices)) for _ in range(3))
    pos_dtype = draw(st.sampled_from(POS_DTYPES))
    empty = draw(st.sampled_from([0.0, 0.3, 1.0]))
    inplace = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return B, T, d, r, P, hd, pd, pos_dtype, empty, inplace, seed


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(problem=_problems())
def test_random_problems(device, problem):
    B, T, d, r, P, hd, pd, pos_dtype, empty, inplace, seed = problem
    h, pos, R, W, b, g = make_inputs(seed, B, T, d, r, P, hd, pd, pos_dtype, empty)
    check_against_reference(h, pos, R, W, b, g, device, inplace)


def test_concurrent_calls_from_python_threads():
    """The CPU kernels share one worker pool: calls from several Python threads at once
    (the native calls release the GIL) give the same bits as the same calls one by one."""
    import threading

    torch.set_num_threads(2)
    cases = [make_inputs(seed_of("threads", k), 4, 64, 512, 8, 48, empty_frac=0.1)
             for k in range(4)]

    def run(k):
        return run_op(reft_ext.loreft_ if k % 2 else reft_ext.loreft, *cases[k], "cpu",
                      inplace=bool(k % 2), grad_from="autograd")

    expected = [run(k) for k in range(4)]
    results, errors = {}, []

    def worker(k):
        try:
            for _ in range(10):
                results[k] = run(k)
        except Exception as e:  # noqa: BLE001  (re-raised below, on the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for k in range(4):
        for name, a, e in zip(("out", "dh", "dR", "dW", "db"), results[k], expected[k]):
            assert_bitwise_equal(a, e, f"thread {k}: {name}")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_the_cpu_kernels():
    """After the pool has started in the parent, a forked child (e.g. a DataLoader worker)
    has no pool threads: its calls must run on its own thread, not wait for them. The
    child asks the kernels for 2 threads through the native entry point, and keeps torch
    itself at 1 thread, as DataLoader workers do (torch's OpenMP is not fork-safe)."""
    import warnings

    from reft_ext import _native
    from reft_ext.ops import _marshal

    h, pos, R, W, b, _ = make_inputs(seed_of("fork"), 4, 64, 512, 8, 48)
    torch.set_num_threads(2)
    expected = reft_ext.loreft(h, pos, R, W, b)  # starts the pool here
    io = h.clone()
    rfd, wfd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # child
        try:
            torch.set_num_threads(1)
            problem = _marshal.problem(io, pos, R, W, b)._replace(num_threads=2)
            msg = _native.lib().forward_cpu(problem, _marshal.rows(io), _marshal.NO_ROWS, 0)
            os.write(wfd, b"1" if not msg and torch.equal(io, expected) else b"0")
        finally:
            os._exit(0)
    os.close(wfd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the CPU kernels")
    assert os.read(rfd, 1) == b"1", "the forked child got a different result"
    os.close(rfd)


def _pool_workers() -> list:
    """Thread ids of the CPU kernels' pool workers in this process (Linux)."""
    tids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "reft_ext_pool":
                    tids.append(int(tid))
        except OSError:  # the thread ended meanwhile
            pass
    return tids


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and at least 2 CPUs")
def test_pool_workers_run_off_the_callers_cpu():
    """The pool keeps its workers off the CPU the calling thread is on (else the scheduler
    may wake them on it, and the two take turns), within the caller's own CPU affinity;
    pinned to a single CPU, the caller gets its results all the same."""
    h, pos, R, W, b, _ = make_inputs(seed_of("affinity"), 4, 64, 512, 8, 48)
    torch.set_num_threads(2)
    expected = reft_ext.loreft(h, pos, R, W, b)
    original = os.sched_getaffinity(0)  # of this thread
    pair = set(sorted(original)[:2])
    try:
        for cpus in ({min(pair)}, pair):
            os.sched_setaffinity(0, cpus)
            out = reft_ext.loreft(h, pos, R, W, b)
            assert_bitwise_equal(out, expected, f"caller on CPUs {cpus}")
        workers = _pool_workers()
        assert workers, "no pool worker found (named reft_ext_pool)"
        for tid in workers:
            allowed = os.sched_getaffinity(tid)
            # The caller's pair less the one it ran on: exactly one CPU of the pair.
            assert len(allowed) == 1 and allowed <= pair, (tid, allowed, pair)
    finally:
        os.sched_setaffinity(0, original)
