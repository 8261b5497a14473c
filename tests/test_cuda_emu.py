"""The CUDA kernels (csrc/cuda), the very source that ships, run on the CPU through the
emulation of tests/cuemu: one std::thread per GPU thread, checked barriers and shuffles.
`bash scripts/cuemu.sh plain|asan|tsan` builds the module (build/cuemu-<mode>) and runs
this file, plain or under AddressSanitizer + UndefinedBehaviorSanitizer or
ThreadSanitizer; .ci/run does all three.

What this checks: every dtype and kernel path, forward and backward, against the float64
reference under the one tolerance rule of tests/_util.py; outputs poisoned beforehand
(NaN) so that an unwritten element fails; unselected rows bitwise untouched; bitwise
determinism across launches and block orders; aligned and unaligned paths bitwise alike;
the positions check kernel and the capture-time skip flag; and the same for intervention
banks (a (B, P) index into stacked parameters).

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
from reft_ext.ops.reference import loreft_reference
from _util import (assert_bitwise_equal, assert_within_rule, gen, make_inputs, make_params,
                   make_positions, reference_results, seed_of, selected_mask)

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

def _status(h, pos, R, W, b, index=None):
    status = torch.zeros(1, dtype=torch.int32)
    E.check_positions_cuda(_problem(h, pos, R, W, b, index=index), status.data_ptr())
    return int(status.item())


def emu_forward(h, pos, R, W, b, io=None, save=False, skip=None, index=None, check=True):
    """_fwd_cuda / _fwd_inplace_cuda: edits io (default: a copy of h) in place; returns
    (io, saved). saved starts as NaN: the kernel must write every slot. check=False skips
    the validation the op does first (for the kernels' own handling of bad entries)."""
    R, W, b = R.contiguous(), W.contiguous(), b.contiguous()
    if check:
        assert _status(h, pos, R, W, b, index) == 0, "test inputs must have valid positions"
    io = h.clone() if io is None else io
    B, T, d = h.shape
    saved = torch.full((B, pos.shape[1], d), float("nan"), dtype=h.dtype)
    E.forward_cuda(_problem(io, pos, R, W, b, index=index), _rows(io),
                   _rows(saved) if save else NO_ROWS, skip.data_ptr() if skip is not None else 0)
    return io, (saved if save else None)


def emu_backward(g, pos, x, x_gathered, R, W, b, dx=None, index=None):
    """_bwd_cuda_into: returns (dx, dR, dW, db). dx starts as g with its selected rows NaN,
    the parameter gradients and the workspace as NaN bytes: everything the kernels must
    write is poisoned."""
    Rc, Wc, bc = R.contiguous(), W.contiguous(), b.contiguous()
    acc = acc_dtype(x.dtype)
    if dx is None:
        dx = g.clone()
    N = R.shape[0] if R.dim() == 3 else None
    mask = selected_mask(_edited(pos, index, N), g.shape[1])
    dx[mask] = float("nan")
    dR, dW = (torch.full(R.shape, float("nan"), dtype=acc) for _ in range(2))
    db = torch.full(b.shape, float("nan"), dtype=acc)
    args = _problem(dx, pos, Rc, Wc, bc, index=index)
    ws_bytes = E.backward_cuda_workspace(args)
    ws = torch.full((max(ws_bytes, 1),), 0xFF, dtype=torch.uint8)
    E.backward_cuda(args, _rows(g), _rows(dx), _rows(x), x_gathered, dR.data_ptr(),
                    dW.data_ptr(), db.data_ptr(), ws.data_ptr(), ws_bytes)
    return dx, dR.to(R.dtype), dW.to(W.dtype), db.to(b.dtype)


def _edited(pos, index, N=None):
    """pos with -1 at the slots a bank index leaves empty: the slots the op edits (N: also
    treat entries >= N as empty, as the kernels do with an index nothing validated)."""
    if index is None:
        return pos
    keep = index >= 0 if N is None else (index >= 0) & (index < N)
    return torch.where(keep, pos, -1)


def emu_op(h, pos, R, W, b, g, inplace=False, index=None):
    """(out, dh, dR, dW, db) as loreft (x = h) or loreft_ (x = the saved rows) computes
    them on CUDA."""
    out, saved = emu_forward(h, pos, R, W, b, save=inplace, index=index)
    if inplace:
        edited = _edited(pos, index)
        bi, pj = (edited >= 0).nonzero(as_tuple=True)
        expect = torch.zeros_like(saved)
        expect[bi, pj] = h[bi, edited[bi, pj].long()]
        assert_bitwise_equal(saved, expect, "saved rows (zeros at empty slots)")
        return (out, *emu_backward(g, pos, saved, True, R, W, b, index=index))
    return (out, *emu_backward(g, pos, h, False, R, W, b, index=index))


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


# ---------------------------------------------------------------------------------------
# Intervention banks: R, W (N, r, d), b (N, r) and a (B, P) index, slot (i, j) edited with
# entry index[i, j] (-1: empty slot). With N > 1 the kernels run their one-row general
# variants, each block pointed at its slot's entry, and the parameter kernel reduces per
# entry (csrc/cuda/loreft_kernels.cuh).

def make_bank(seed, N, r, d, dtypes=(torch.float32,) * 3):
    """N fresh entries of make_params, stacked: R, W (N, r, d), b (N, r)."""
    g = gen(seed)
    entries = [make_params(g, r, d, dtypes) for _ in range(N)]
    return tuple(torch.stack([e[k] for e in entries]) for k in range(3))


def make_index(seed, B, P, N, dtype=torch.int64, empty_frac=0.2, unused=()):
    """(B, P) random entries in [0, N) except those in `unused`, -1 in random slots."""
    g = gen(seed)
    allowed = torch.tensor([e for e in range(N) if e not in unused])
    index = allowed[torch.randint(len(allowed), (B, P), generator=g)]
    index[torch.rand(B, P, generator=g) < empty_frac] = -1
    return index.to(dtype)


def bank_reference(h, pos, R, W, b, g, index, float64=False):
    """(out, dh, dR, dW, db) of loreft_reference with the index, by autograd: in float64,
    or in the inputs' own dtypes (the tolerance rule's PyTorch error)."""
    if float64:
        h, R, W, b, g = (t.double() for t in (h, R, W, b, g))
    leaf = h.detach().requires_grad_()
    params = [t.detach().requires_grad_() for t in (R, W, b)]
    out = loreft_reference(leaf, pos, *params, index=index)
    out.backward(g)
    return (out.detach(), leaf.grad, *(p.grad for p in params))


def check_bank_against_reference(h, pos, R, W, b, g, index, inplace=False):
    fused = emu_op(h, pos, R, W, b, g, inplace, index=index)
    ref64 = bank_reference(h, pos, R, W, b, g, index, float64=True)
    same = bank_reference(h, pos, R, W, b, g, index)
    for name, f, e, sm in zip(NAMES, fused, ref64, same):
        assert not f.isnan().any(), f"{name}: an element the kernels must write was not"
        assert_within_rule(name, f, e, sm)
    mask = selected_mask(_edited(pos, index), h.shape[1])
    assert_bitwise_equal(fused[0][~mask], h[~mask], "out at unselected rows vs h")
    assert_bitwise_equal(fused[1][~mask], g[~mask], "dh at unselected rows vs g")
    used = set(index[_edited(pos, index) >= 0].tolist())
    for e in range(R.shape[0]):
        if e not in used:
            for name, t in zip(NAMES[2:], fused[2:]):
                assert_bitwise_equal(t[e], torch.zeros_like(t[e]),
                                     f"{name} of entry {e}, which no slot uses")
    return fused


# (name, B, T, d, r, P, N) per dtype. Every bank with N > 1 runs the one-row general (or
# unaligned) kernels; the shapes pick the other things the entry selection touches.
def bank_cases(dtype):
    vec = _vec(dtype)
    return [
        ("aligned_r9", 3, 20, 16 * vec, 9, 11, 4),
        ("odd_d_r5", 2, 13, 5 * vec + 3 if vec > 1 else 37, 5, 7, 3),
        # B*P = 217 slots: 4 row chunks, 2 per entry, and 2 rank groups per entry.
        ("chunks_per_entry", 7, 40, 8 * vec, 13, 31, 2),
        ("r65_qchunks", 2, 9, 80, 65, 5, 3),  # two kQChunk rounds per entry
    ]


def chunks_per_entry(B, P, d, r, N):
    """Row chunks per bank entry of the parameter kernel (backward_layout's rule)."""
    base = -(-d // 128) * -(-r // 8)
    nchunks = max(1, min(-(-2048 // base), -(-max(B * P, 1) // 64), 1024))
    return max(1, nchunks // N)


def test_the_bank_matrix_covers_one_and_several_chunks_per_entry():
    for dtype in DTYPES.values():
        per = {chunks_per_entry(B, P, d, r, N) for _, B, _, d, r, P, N in bank_cases(dtype)}
        assert 1 in per and max(per) >= 2, (dtype, per)
        assert any(r > 8 for *_, r, _, _ in bank_cases(dtype))  # several rank groups


BANK_MATRIX = [pytest.param(h, p, i, id=f"h{h}-p{p}-{c[0]}")
               for h, p in PARAM_DTYPES for i, c in enumerate(bank_cases(torch.float32))]


@pytest.mark.parametrize("h_name,p_name,case", BANK_MATRIX)
def test_bank_matches_reference(h_name, p_name, case):
    """Every dtype pair, odd d and r, int64 and int32 index, -1 slots, an entry no slot
    uses (exact zero gradients), in and out of place."""
    h_dtype, p_dtype = DTYPES[h_name], DTYPES[p_name]
    name, B, T, d, r, P, N = bank_cases(h_dtype)[case]
    seed = seed_of("emu-bank", name, h_name, p_name)
    h, pos, _, _, _, g = inputs(seed, B, T, d, r, P, h_dtype, (p_dtype,) * 3)
    R, W, b = make_bank(seed + 1, N, r, d, (p_dtype,) * 3)
    index = make_index(seed + 2, B, P, N, (torch.int64, torch.int32)[case % 2],
                       unused=(N - 2,) if N > 2 else ())
    check_bank_against_reference(h, pos, R, W, b, g, index, inplace=case % 2 == 1)


@pytest.mark.parametrize("h_name", list(DTYPES))
def test_bank_strided_int32_index(h_name):
    """The index read through a non-contiguous view (int32), positions int32 too."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P, N = 3, 16, 8 * _vec(h_dtype) + 1, 3, 5, 3
    seed = seed_of("emu-bank-strided", h_name)
    h, pos, _, _, _, g = inputs(seed, B, T, d, r, P, h_dtype, pos_dtype=torch.int32)
    R, W, b = make_bank(seed + 1, N, r, d, (h_dtype,) * 3)
    index = make_index(seed + 2, P, 2 * B, N, torch.int32).T[::2]  # (B, P), strides (2, 2B)
    assert index.shape == (B, P) and not index.is_contiguous()
    check_bank_against_reference(h, pos, R, W, b, g, index, inplace=True)


@pytest.mark.parametrize("h_name", list(DTYPES))
def test_bank_rows_are_single_entry_edits_bitwise(h_name):
    """A bank's slot gets exactly the bits of an ordinary N = 1 call with its entry's
    parameters (out and dh; every kernel path sums in the same order), so each block
    reads its own entry and no other."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P, N = 3, 24, 16 * _vec(h_dtype), 6, 8, 3
    seed = seed_of("emu-bank-single", h_name)
    h, pos, _, _, _, g = inputs(seed, B, T, d, r, P, h_dtype, empty_frac=0.0)
    R, W, b = make_bank(seed + 1, N, r, d, (torch.float32,) * 3)
    index = make_index(seed + 2, B, P, N, empty_frac=0.0)
    out, dh, *_ = emu_op(h, pos, R, W, b, g, index=index)
    for e in range(N):
        pos_e = torch.where(index == e, pos, -1)
        out_e, dh_e, *_ = emu_op(h, pos_e, R[e], W[e], b[e], g)
        mask = selected_mask(pos_e, T)
        assert mask.any()
        assert_bitwise_equal(out[mask], out_e[mask], f"out of entry {e}'s rows")
        assert_bitwise_equal(dh[mask], dh_e[mask], f"dh of entry {e}'s rows")


@pytest.mark.parametrize("h_name", list(DTYPES))
@pytest.mark.parametrize("d_kind", ["cached", "general"])
def test_bank_of_one_equals_no_index_bitwise(h_name, d_kind):
    """N = 1 with an index of zeros gives bitwise the results of no index (dR, dW, db
    shaped (1, r, d) and (1, r)); an index of -1 at some slots, those of positions -1
    there."""
    h_dtype = DTYPES[h_name]
    B, T, r, P = (3, 20, 7, 9) if d_kind == "cached" else (2, 12, 66, 5)
    d = 16 * _vec(h_dtype) if d_kind == "cached" else 72
    seed = seed_of("emu-bank-one", h_name, d_kind)
    h, pos, R, W, b, g = inputs(seed, B, T, d, r, P, h_dtype)
    plain = emu_op(h, pos, R, W, b, g, inplace=True)
    R1, W1, b1 = R[None], W[None], b[None]
    for index in (torch.zeros(B, P, dtype=torch.int64), make_index(seed + 1, B, P, 1)):
        banked = emu_op(h, pos, R1, W1, b1, g, inplace=True, index=index)
        expect = plain if not (index < 0).any() else \
            emu_op(h, _edited(pos, index), R, W, b, g, inplace=True)
        for name, a, e in zip(NAMES, banked, expect):
            assert_bitwise_equal(a if name in ("out", "dh") else a[0], e, f"{name}, N = 1")


@pytest.mark.parametrize("h_name", ["f32", "bf16"])
def test_bank_deterministic_across_launches_and_block_orders(h_name):
    """The per-entry parameter reduction (217 slots: 4 row chunks, 2 per entry) and the
    per-block entry selection give the same bits whatever order the blocks run in."""
    h_dtype = DTYPES[h_name]
    B, T, d, r, P, N = 7, 40, 8 * _vec(h_dtype), 9, 31, 2
    seed = seed_of("emu-bank-det", h_name)
    h, pos, _, _, _, g = inputs(seed, B, T, d, r, P, h_dtype, empty_frac=0.1)
    R, W, b = make_bank(seed + 1, N, r, d)
    index = make_index(seed + 2, B, P, N)
    first = emu_op(h, pos, R, W, b, g, index=index)
    try:
        for order, sd in (("reverse", 0), ("shuffled", 1), ("shuffled", 7)):
            E.set_block_order(order, sd)
            again = emu_op(h, pos, R, W, b, g, index=index)
            for name, a, c in zip(NAMES, first, again):
                assert_bitwise_equal(c, a, f"{name} with blocks in {order} order ({sd})")
    finally:
        E.set_block_order("forward")


def test_bank_with_every_slot_empty_or_no_slot():
    """Index -1 everywhere, and P = 0: out is h, dh is g, every gradient exact zeros."""
    h, pos, _, _, _, g = inputs(seed_of("emu-bank-empty"), 2, 8, 32, 4, 3, torch.float32)
    R, W, b = make_bank(seed_of("emu-bank-empty", 1), 3, 4, 32)
    none = torch.empty((2, 0), dtype=torch.int64)
    for pos_, index in ((pos, torch.full((2, 3), -1)), (none, none)):
        fused = emu_op(h, pos_, R, W, b, g, inplace=True, index=index)
        assert_bitwise_equal(fused[0], h, "out with no edited slot")
        assert_bitwise_equal(fused[1], g, "dh with no edited slot")
        for name, t in zip(NAMES[2:], fused[2:]):
            assert t.shape[0] == 3
            assert_bitwise_equal(t, torch.zeros_like(t), f"{name} with no edited slot")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_bank_check_kernel_bit4(index_dtype):
    """Bit 4: an index entry outside {-1} U [0, N), alone or with the positions' bits; a
    repeated position counts whatever the index (even -1) at its slots."""
    B, T, P, d, r, N = 3, 40, 9, 8, 2, 4
    h = torch.empty(1).expand(B, T, d)
    R, W, b = make_bank(seed_of("emu-bank-check"), N, r, d)
    g = gen(seed_of("emu-bank-check", index_dtype))
    pos = make_positions(g, B, T, P, empty_frac=0.0)
    good = make_index(seed_of("emu-bank-check", 2), B, P, N, index_dtype)
    assert _status(h, pos, R, W, b, good) == 0
    for bad, bits in ((N, 4), (-2, 4), (N + 12345, 4), ("pos", 5), ("repeat", 6),
                      ("all", 7), ("repeat_at_-1", 2)):
        p_, ix = pos.clone(), good.clone()
        if bad == "pos":
            ix[0, 1], p_[2, 3] = N, T
        elif bad == "repeat":
            ix[1, 0], p_[2, 7] = -3, p_[2, 1]
        elif bad == "all":
            ix[2, 8], p_[0, 0], p_[1, 2] = N + 1, -7, p_[1, 5]
        elif bad == "repeat_at_-1":
            p_[0, 4] = p_[0, 6]
            ix[0, 4] = ix[0, 6] = -1
        else:
            ix[1, 2] = bad
        before = ix.clone()
        assert _status(h, p_, R, W, b, ix) == bits, f"index/positions with {bad}"
        assert_bitwise_equal(ix, before, "index after the check")


def test_bank_bad_index_is_never_dereferenced_and_skip_writes_nothing():
    """An index the host could not check (graph capture): with the check's status as skip
    flag the forward writes nothing; without it, the out-of-range slots stay empty (never
    read out of R, W, b: AddressSanitizer would see it) in the forward and backward."""
    B, T, d, r, P, N = 3, 20, 64, 8, 7, 3
    seed = seed_of("emu-bank-bad")
    h, pos, _, _, _, g = inputs(seed, B, T, d, r, P, torch.float32, empty_frac=0.0)
    R, W, b = make_bank(seed + 1, N, r, d)
    index = make_index(seed + 2, B, P, N, empty_frac=0.0)
    bad = index.clone()
    bad[0, 1], bad[2, 4], bad[1, 6] = N, 1 << 40, -9
    status = torch.tensor([_status(h, pos, R, W, b, bad)], dtype=torch.int32)
    assert int(status) == 4
    io, saved = emu_forward(h, pos, R, W, b, save=True, skip=status, index=bad, check=False)
    assert_bitwise_equal(io, h, "h after a skipped forward (bad index)")
    assert saved.isnan().all(), "saved was written by a skipped forward"
    # Without the skip flag: the bad slots behave as -1 slots.
    cleaned = torch.where((bad >= 0) & (bad < N), bad, -1)
    for inplace in (False, True):
        got_fwd = emu_forward(h, pos, R, W, b, save=True, index=bad, check=False)
        exp_fwd = emu_forward(h, pos, R, W, b, save=True, index=cleaned)
        for name, a, e in zip(("out", "saved"), got_fwd, exp_fwd):
            assert_bitwise_equal(a, e, f"{name} with out-of-range index entries")
        x = exp_fwd[1] if inplace else h
        got = emu_backward(g, pos, x, inplace, R, W, b, index=bad)
        exp = emu_backward(g, pos, x, inplace, R, W, b, index=cleaned)
        for name, a, e in zip(NAMES[1:], got, exp):
            assert_bitwise_equal(a, e, f"{name} with out-of-range index entries")


def test_positions_validation_with_an_index(monkeypatch):
    """reft_ext/ops/_cuda.py's validation (_validate_positions_cuda) run with this module as
    its native library, on CPU tensors: a bad index raises ValueError naming the index;
    the cache of the last valid positions also keys on the index tensor, its version and
    N; under capture the status (bit 4) is returned for the forward's skip flag."""
    from reft_ext.ops import _cuda

    monkeypatch.setattr(_cuda, "_last_valid_positions", (None, -1, -1, None, -1, -1))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    B, T, d, r, P, N = 2, 10, 8, 2, 4, 3
    h, pos, _, _, _, _ = inputs(seed_of("emu-bank-validate"), B, T, d, r, P, torch.float32)
    R, W, b = make_bank(seed_of("emu-bank-validate", 1), N, r, d)
    index = make_index(seed_of("emu-bank-validate", 2), B, P, N)

    def validate(index, R=R, W=W, b=b):
        before = E.stats()["launches"]
        skip = _cuda._validate_positions_cuda("loreft", E, h, pos, R, W, b, 0, index)
        return skip, E.stats()["launches"] - before

    assert validate(index) == (None, 1)
    assert validate(index) == (None, 0), "unchanged positions and index: no new check"
    assert validate(None) == (None, 1), "no index after an index: checked again"
    assert validate(index) == (None, 1)
    other = index.clamp(max=N - 2)
    assert validate(other) == (None, 1), "another index tensor: checked again"
    assert validate(other, R[:-1], W[:-1], b[:-1]) == (None, 1), "N changed: checked again"
    with pytest.raises(ValueError, match="index"):
        validate(other, R[:-2], W[:-2], b[:-2])  # N - 2 entries: other's N - 2 is out
    for bad in (N, -2):
        index[1, 2] = bad  # in place: a version bump
        with pytest.raises(ValueError, match="index"):
            validate(index)
    capturing[0] = True
    skip, launches = validate(index)
    assert launches == 1 and int(skip.item()) == 4
