"""The CUDA kernels (csrc/cuda), the very source that ships, run on the CPU through the
emulation of tests/cuemu: one std::thread per GPU thread, checked barriers and shuffles.
`bash scripts/cuemu.sh plain|asan|tsan` builds the module (build/cuemu-<mode>) and runs
this file, plain or under AddressSanitizer + UndefinedBehaviorSanitizer or
ThreadSanitizer; .ci/run does all three.

What this checks: every dtype and kernel path, forward and backward, against the float64
reference under the one tolerance rule of tests/_util.py; outputs poisoned beforehand
(NaN) so that an unwritten element fails; unselected rows bitwise untouched; bitwise
determinism across launches and block orders; aligned and unaligned paths bitwise alike;
the positions check kernel and the capture-time skip flag.

What it cannot check (README, "CUDA kernels without a GPU"): nvcc's FMA contraction (so
nothing here is compared bitwise with a GPU), the GPU's weak memory model, register
limits and speed.

The calls mirror reft_ext/ops/_cuda.py's CUDA implementations and take the described
problem and rows from reft_ext.ops._marshal, through the same pybind11 casters
(csrc/problem_caster.h), so the arguments are the shipped ones.

A kernel bug the emulation or a sanitizer catches aborts the process with a report on
stderr; plain `pytest` captures file descriptor 2 and loses it (only "Fatal Python error:
Aborted" and the test's stack remain), `scripts/cuemu.sh` runs with --capture=sys and shows
it.
"""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from reft_ext.ops._checks import acc_dtype
from reft_ext.ops._marshal import NO_ROWS, problem as _problem, rows as _rows
from _util import (assert_bitwise_equal, assert_within_rule, make_inputs, reference_results,
                   seed_of, selected_mask)

_DIR = Path(os.environ.get("REFT_CUEMU_DIR") or
            Path(__file__).resolve().parent.parent / "build" / "cuemu-plain")


def _load():
    if not any(_DIR.glob("reft_cuemu*.so")):
        if os.environ.get("REFT_CUEMU_REQUIRE"):
            raise ImportError(f"REFT_CUEMU_REQUIRE is set but {_DIR} has no reft_cuemu module")
        return None
    sys.path.insert(0, str(_DIR))
    try:
        return importlib.import_module("reft_cuemu")
    finally:
        sys.path.remove(str(_DIR))


E = _load()
pytestmark = pytest.mark.skipif(
    E is None, reason=f"the CUDA emulation module was not built ({_DIR}): run "
                      "`bash scripts/cuemu.sh plain`")

NAMES = ("out", "dh", "dR", "dW", "db")
DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16,
          "bf16": torch.bfloat16}


def inputs(seed, B, T, d, r, P, *args, **kwargs):
    """make_inputs, insisting on the rank asked for: R's orthonormal rows need d >= r, and
    a smaller R would quietly move a case off the path it is there for."""
    h, pos, R, W, b, g = make_inputs(seed, B, T, d, r, P, *args, **kwargs)
    assert R.shape == W.shape == (r, d), f"R {tuple(R.shape)} for r={r}, d={d}"
    return h, pos, R, W, b, g


# ---------------------------------------------------------------------------------------
# The calls of reft_ext/ops/_cuda.py's CUDA kernels, over CPU tensors.

def _status(h, pos, R, W, b):
    status = torch.zeros(1, dtype=torch.int32)
    E.check_positions_cuda(_problem(h, pos, R, W, b), status.data_ptr())
    return int(status.item())


def emu_forward(h, pos, R, W, b, io=None, save=False, skip=None):
    """_fwd_cuda / _fwd_inplace_cuda: edits io (default: a copy of h) in place; returns
    (io, saved). saved starts as NaN: the kernel must write every slot."""
    R, W, b = R.contiguous(), W.contiguous(), b.contiguous()
    assert _status(h, pos, R, W, b) == 0, "test inputs must have valid positions"
    io = h.clone() if io is None else io
    B, T, d = h.shape
    saved = torch.full((B, pos.shape[1], d), float("nan"), dtype=h.dtype)
    E.forward_cuda(_problem(io, pos, R, W, b), _rows(io), _rows(saved) if save else NO_ROWS,
                   skip.data_ptr() if skip is not None else 0)
    return io, (saved if save else None)


def emu_backward(g, pos, x, x_gathered, R, W, b, dx=None):
    """_bwd_cuda_into: returns (dx, dR, dW, db). dx starts as g with its selected rows NaN,
    the parameter gradients and the workspace as NaN bytes: everything the kernels must
    write is poisoned."""
    Rc, Wc, bc = R.contiguous(), W.contiguous(), b.contiguous()
    acc = acc_dtype(x.dtype)
    r, d = R.shape
    if dx is None:
        dx = g.clone()
    mask = selected_mask(pos, g.shape[1])
    dx[mask] = float("nan")
    dR, dW = (torch.full((r, d), float("nan"), dtype=acc) for _ in range(2))
    db = torch.full((r,), float("nan"), dtype=acc)
    args = _problem(dx, pos, Rc, Wc, bc)
    ws_bytes = E.backward_cuda_workspace(args)
    ws = torch.full((max(ws_bytes, 1),), 0xFF, dtype=torch.uint8)
    E.backward_cuda(args, _rows(g), _rows(dx), _rows(x), x_gathered, dR.data_ptr(),
                    dW.data_ptr(), db.data_ptr(), ws.data_ptr(), ws_bytes)
    return dx, dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


def emu_op(h, pos, R, W, b, g, inplace=False):
    """(out, dh, dR, dW, db) as loreft (x = h) or loreft_ (x = the saved rows) computes
    them on CUDA."""
    out, saved = emu_forward(h, pos, R, W, b, save=inplace)
    if inplace:
        bi, pj = (pos >= 0).nonzero(as_tuple=True)
        expect = torch.zeros_like(saved)
        expect[bi, pj] = h[bi, pos[bi, pj].long()]
        assert_bitwise_equal(saved, expect, "saved rows (zeros at -1 slots)")
        return (out, *emu_backward(g, pos, saved, True, R, W, b))
    return (out, *emu_backward(g, pos, h, False, R, W, b))


def check_emu_against_reference(h, pos, R, W, b, g, inplace=False):
    fused = emu_op(h, pos, R, W, b, g, inplace)
    ref64 = reference_results(h, pos, R, W, b, g, float64=True)
    same = reference_results(h, pos, R, W, b, g)
    for name, f, e, s in zip(NAMES, fused, ref64, same):
        assert not f.isnan().any(), f"{name}: an element the kernels must write was not"
        assert_within_rule(name, f, e, s)
    mask = selected_mask(pos, h.shape[1])
    assert_bitwise_equal(fused[0][~mask], h[~mask], "out at unselected rows vs h")
    assert_bitwise_equal(fused[1][~mask], g[~mask], "dh at unselected rows vs g")
    return fused


# ---------------------------------------------------------------------------------------
# Which kernel path a shape takes (csrc/cuda/loreft_kernels.cuh: threads_for,
# cached_iters, forward_launch / backward_launch), to prove the matrix covers them all.

def _vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def path_of(dtype, d, r, aligned=True):
    vec = _vec(dtype)
    groups = -(-d // vec)
    nt = min(256, max(32, -(-groups // 32) * 32))
    need = -(-d // (nt * vec))
    iters = next((it for it in (1, 2, 4, 8) if need <= it), 0)
    aligned = aligned and d % vec == 0
    if not aligned or r > 64:
        iters = 0
    return {"fwd": iters if iters else ("general" if aligned else "unaligned"),
            "bwd": iters if 0 < iters <= 4 else ("general" if aligned else "unaligned")}


def _d_for_iters(dtype, iters):
    return 256 * _vec(dtype) * iters


# (name, B, T, d, r, P) per dtype; d chosen per dtype where the path depends on it.
def cases(dtype):
    vec = _vec(dtype)
    return [
        ("cached_iters1", 3, 20, 16 * vec, 8, 7),
        ("cached_iters1_r1", 2, 12, 8 * vec, 1, 5),
        ("cached_iters2", 1, 6, _d_for_iters(dtype, 2), 4, 3),
        ("cached_iters4", 1, 5, _d_for_iters(dtype, 4), 3, 2),
        ("cached_iters8", 1, 4, _d_for_iters(dtype, 8), 2, 2),
        ("general_r65", 2, 10, 80, 65, 3),  # d >= r: R has orthonormal rows
        ("general_r130_3chunks", 1, 6, 136, 130, 3),
        ("odd_d", 2, 12, 33 * vec + 1 if vec > 1 else 67, 5, 5),
        ("d_not_vec_multiple", 2, 12, 12 * vec + vec // 2, 9, 6),
        ("param_tiles_qgroups_chunks", 3, 50, 40 * vec, 13, 30),
    ]


# The costly cases (many 256-thread blocks) run with fewer dtype pairs: still every h dtype,
# and float32 parameters on half h.
HEAVY = {"cached_iters4", "cached_iters8", "general_r130_3chunks", "param_tiles_qgroups_chunks"}
# d = 8 x 256 x vec takes the cached path in the forward only (the backward caches x and
# g, which fit in registers up to 4 iterations): its backward is the general path, which
# the r > 64 cases cover at a fraction of the cost.
FORWARD_ONLY = {"cached_iters8"}


def test_the_matrix_covers_every_kernel_path():
    for dtype in DTYPES.values():
        seen = {key: {path_of(dtype, d, r)[key] for name, _, _, d, r, _ in cases(dtype)
                      if key == "fwd" or name not in FORWARD_ONLY}
                for key in ("fwd", "bwd")}
        assert seen["fwd"] == {1, 2, 4, 8, "general", "unaligned"}, (dtype, seen)
        assert seen["bwd"] == {1, 2, 4, "general", "unaligned"}, (dtype, seen)
    # more rows than one chunk of the parameter kernel (64 rows): the last-block reduction
    # sums several chunks' partials.
    assert any(B * P > 64 for _, B, _, _, _, P in cases(torch.float32))


PARAM_DTYPES = [("f32", "f32"), ("f64", "f64"), ("f16", "f16"), ("f16", "f32"),
                ("bf16", "bf16"), ("bf16", "f32")]
HEAVY_PARAM_DTYPES = {("f32", "f32"), ("f64", "f64"), ("f16", "f32"), ("bf16", "bf16")}
MATRIX = [pytest.param(h, p, i, id=f"h{h}-p{p}-{c[0]}")
          for h, p in PARAM_DTYPES for i, c in enumerate(cases(torch.float32))
          if c[0] not in HEAVY or (h, p) in HEAVY_PARAM_DTYPES]


@pytest.mark.parametrize("h_name,p_name,case", MATRIX)
def test_forward_backward_match_reference(h_name, p_name, case):
    h_dtype, p_dtype = DTYPES[h_name], DTYPES[p_name]
    name, B, T, d, r, P = cases(h_dtype)[case]
    h, pos, R, W, b, g = inputs(seed_of("emu", name, h_name, p_name), B, T, d, r, P,
                                     h_dtype, (p_dtype,) * 3)
    if name in FORWARD_ONLY:
        out, _ = emu_forward(h, pos, R, W, b)
        ref64 = reference_results(h, pos, R, W, b, g, float64=True)[0]
        same = reference_results(h, pos, R, W, b, g)[0]
        assert_within_rule("out", out, ref64, same)
        mask = selected_mask(pos, T)
        assert_bitwise_equal(out[~mask], h[~mask], "out at unselected rows vs h")
        return
    check_emu_against_reference(h, pos, R, W, b, g, inplace=case % 2 == 1)


@pytest.mark.parametrize("h_name", list(DTYPES))
def test_int32_strided_positions_and_gathered_x(h_name):
    """int32 positions read through a non-contiguous view, x from the saved rows."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P = 3, 16, 8 * _vec(h_dtype), 6, 5
    h, pos, R, W, b, g = inputs(seed_of("emu-int32", h_name), B, T, d, r, 2 * P,
                                     h_dtype, pos_dtype=torch.int32)
    check_emu_against_reference(h, pos[:, ::2], R, W, b, g, inplace=True)


@pytest.mark.parametrize("h_name", list(DTYPES))
def test_no_positions_writes_zero_gradients_and_launches_nothing(h_name):
    h_dtype = DTYPES[h_name]
    h, _, R, W, b, g = inputs(seed_of("emu-p0", h_name), 2, 6, 4 * _vec(h_dtype), 3, 2,
                                   h_dtype)
    pos = torch.empty((2, 0), dtype=torch.int64)
    before = E.stats()["launches"]
    out, _ = emu_forward(h, pos, R, W, b)
    dx, dR, dW, db = emu_backward(g, pos, h, False, R, W, b)
    assert E.stats()["launches"] == before, "P = 0 must launch no kernel"
    assert_bitwise_equal(out, h, "out with P = 0")
    assert_bitwise_equal(dx, g, "dh with P = 0")
    for name, t in (("dR", dR), ("dW", dW), ("db", db)):
        assert_bitwise_equal(t, torch.zeros_like(t), f"{name} with P = 0")


def test_all_slots_empty():
    h, _, R, W, b, g = inputs(seed_of("emu-empty"), 2, 8, 32, 4, 3, torch.float32)
    pos = torch.full((2, 3), -1, dtype=torch.int64)
    fused = check_emu_against_reference(h, pos, R, W, b, g, inplace=True)
    for name, t in zip(NAMES[2:], fused[2:]):
        assert_bitwise_equal(t, torch.zeros_like(t), f"{name} with every slot empty")


# ---------------------------------------------------------------------------------------
# Bitwise properties.

def _shifted(t):
    """t's values in a view one element into a wider buffer: rows not 16-byte aligned.
    The extra column holds a sentinel the kernels must never write."""
    B, T, d = t.shape
    big = torch.full((B, T, d + 1), -7.0, dtype=t.dtype)
    big[..., 1:] = t
    return big, big[..., 1:]


@pytest.mark.parametrize("h_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(3, 20, 4, 8, 7), (2, 12, 10, 66, 5)],
                         ids=["cached", "general"])
def test_unaligned_rows_match_aligned_bitwise(h_name, shape):
    """The column ownership, so every summation order, is the same on the vectorised and
    the scalar path: rows that are not 16-byte aligned give the same bits."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P = shape
    d *= 8  # a multiple of every vector width: aligned storage takes the vectorised path
    h, pos, R, W, b, g = inputs(seed_of("emu-align", h_name, shape), B, T, d, r, P,
                                     h_dtype, (torch.float32,) * 3)
    aligned = emu_op(h, pos, R, W, b, g)

    big_io, io = _shifted(h)
    assert io.data_ptr() % 16 != 0
    out, _ = emu_forward(h, pos, R, W, b, io=io)
    big_g, gv = _shifted(g)
    big_x, xv = _shifted(h)
    big_dx, dxv = _shifted(g)
    dx, dR, dW, db = emu_backward(gv, pos, xv, False, R, W, b, dx=dxv)
    for name, a, u in zip(NAMES, aligned, (out, dx, dR, dW, db)):
        assert_bitwise_equal(u.contiguous(), a, f"{name} on unaligned rows")
    for name, big in (("io", big_io), ("g", big_g), ("x", big_x), ("dx", big_dx)):
        assert (big[..., 0] == -7.0).all(), f"a kernel wrote outside the rows of {name}"


def test_misaligned_parameters_take_the_scalar_path_bitwise():
    """R and W 16-byte misaligned (contiguous views one element into a buffer)."""
    h, pos, R, W, b, g = inputs(seed_of("emu-palign"), 3, 20, 64, 8, 7, torch.float32)
    expect = emu_op(h, pos, R, W, b, g)
    Rb, Wb = torch.empty(R.numel() + 1), torch.empty(W.numel() + 1)
    Rb[1:], Wb[1:] = R.reshape(-1), W.reshape(-1)
    Rm, Wm = Rb[1:].view_as(R), Wb[1:].view_as(W)
    assert Rm.is_contiguous() and Rm.data_ptr() % 16 != 0
    for name, a, m in zip(NAMES, expect, emu_op(h, pos, Rm, Wm, b, g)):
        assert_bitwise_equal(m, a, f"{name} with misaligned parameters")


@pytest.mark.parametrize("h_name", ["f32", "bf16"])
def test_deterministic_across_launches_and_block_orders(h_name):
    """Repeated launches, and blocks run in reverse and in shuffled order, give the same
    bits: no block may depend on another having run first (the parameter kernel's last
    block sums the chunks in chunk order whichever block finishes last)."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P = 3, 50, 16 * _vec(h_dtype), 9, 30  # 90 rows: 2 chunks, 2 rank groups
    h, pos, R, W, b, g = inputs(seed_of("emu-det", h_name), B, T, d, r, P, h_dtype,
                                     (torch.float32,) * 3, empty_frac=0.1)
    first = emu_op(h, pos, R, W, b, g)
    try:
        for order, seed in (("forward", 0), ("reverse", 0), ("shuffled", 1)):
            E.set_block_order(order, seed)
            again = emu_op(h, pos, R, W, b, g)
            for name, a, c in zip(NAMES, first, again):
                assert_bitwise_equal(c, a, f"{name} with blocks in {order} order ({seed})")
    finally:
        E.set_block_order("forward")


# ---------------------------------------------------------------------------------------
# Positions check kernel and the capture-time skip flag.

@pytest.mark.parametrize("T", [40, 300_000], ids=["bitmap", "pairwise"])
@pytest.mark.parametrize("pos_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_positions_check_kernel(T, pos_dtype):
    """Status bits: 1 = an entry outside {-1} U [0, T), 2 = a repeat within a row; only the
    status is written. T = 300000 needs a bitmap above 32 KiB: the pairwise path (the
    positions are all the kernel reads, so no (B, T, d) tensor is needed)."""
    B, P, d, r = 3, 9, 8, 2
    R, W, b = torch.randn(r, d), torch.randn(r, d), torch.randn(r)
    h = torch.empty(1).expand(B, T, d)  # the shape only: the check reads no rows
    g = torch.Generator().manual_seed(seed_of("emu-check", T, pos_dtype))
    good = torch.stack([torch.randperm(T, generator=g)[:P] for _ in range(B)])
    good[1, 4] = -1
    good = good.to(pos_dtype)
    assert _status(h, good, R, W, b) == 0
    for bad, bits in ((T, 1), (-2, 1), (T + 12345, 1), ("repeat", 2), ("both", 3)):
        pos = good.clone()
        if bad == "repeat":
            pos[2, 7] = pos[2, 1]
        elif bad == "both":
            pos[0, 3] = pos[0, 5]
            pos[2, 0] = -5
        else:
            pos[1, 2] = bad
        before = pos.clone()
        assert _status(h, pos, R, W, b) == bits, f"positions with {bad}"
        assert_bitwise_equal(pos, before, "positions after the check")


def test_skip_flag_makes_the_forward_write_nothing():
    """Under CUDA graph capture the forward reads the check's status on the device: a
    nonzero status must leave h and saved untouched; a zero one changes nothing."""
    h, pos, R, W, b, _ = inputs(seed_of("emu-skip"), 3, 20, 64, 8, 7, torch.float32)
    expect, expect_saved = emu_forward(h, pos, R, W, b, save=True)
    for status in (1, 2, 3):
        io, saved = emu_forward(h, pos, R, W, b, save=True,
                                skip=torch.tensor([status], dtype=torch.int32))
        assert_bitwise_equal(io, h, f"h after a skipped forward (status {status})")
        assert saved.isnan().all(), "saved was written by a skipped forward"
    io, saved = emu_forward(h, pos, R, W, b, save=True, skip=torch.zeros(1, dtype=torch.int32))
    assert_bitwise_equal(io, expect, "out with a zero status")
    assert_bitwise_equal(saved, expect_saved, "saved with a zero status")


def test_rank_above_the_limit_is_refused_before_any_launch():
    d, r = 8, E.cuda_max_rank + 1
    h = torch.randn(1, 2, d)
    R = torch.randn(r, d)
    before = E.stats()["launches"]
    with pytest.raises(ValueError, match="exceeds the CUDA kernels' limit"):
        E.forward_cuda(_problem(h, torch.zeros(1, 1, dtype=torch.long), R, R, torch.randn(r)),
                       _rows(h), NO_ROWS, 0)
    assert E.stats()["launches"] == before
