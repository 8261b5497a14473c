"""CUDA-only tests of the fused kernels (csrc/cuda): the cases the shared device matrix of
test_op.py / test_validation.py / test_compile.py (which already runs every case on CUDA)
does not cover: a model-sized problem, streams, CUDA graphs, the vectorised vs scalar
paths and the paths chosen by d and r.

Skipped, with the reason, when no GPU is present or reft_ext was built without CUDA
kernels. Tolerances follow the one rule of tests/_util.py.
"""
from __future__ import annotations

import pytest
import torch

import reft_ext
from reft_ext import _native
from reft_ext.ops.reference import loreft_reference
from _util import (CUDA_SKIP_REASON, assert_bitwise_equal, assert_within_rule,
                   check_against_reference, make_inputs, make_params, seed_of)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")]

DEV = "cuda"


def _grads(op, h, pos, R, W, b, g, inplace=False):
    """(out, dh, dR, dW, db) of op on CUDA tensors (inputs are left untouched)."""
    leaf = h.detach().clone().requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in (R, W, b)]
    x = leaf.clone() if inplace else leaf
    out = op(x, pos, *params)
    out.backward(g)
    return (out.detach(), leaf.grad, *(p.grad for p in params))


def _large_inputs(seed, B, T, d, r, h_dtype, param_dtype):
    """Inputs drawn on the GPU (a CPU draw of 8 x 4096 x 4096 would dominate the test)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    h = torch.randn(B, T, d, device=DEV, generator=gen).to(h_dtype)
    g = torch.randn(B, T, d, device=DEV, generator=gen).to(h_dtype)
    cpu_gen = torch.Generator().manual_seed(seed)
    R, W, b = (t.to(DEV) for t in make_params(cpu_gen, r, d, (param_dtype,) * 3))
    return h, g, R, W, b


@pytest.mark.slow
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_large_all_positions_bf16(param_dtype):
    """B=8, T=4096, d=4096, r=8, every position edited, bf16 h: forward and all gradients
    within the tolerance rule. The float64 ground truth is computed on the GPU here (same
    float64 reference; the CPU would take minutes at this size)."""
    B, T, d, r = 8, 4096, 4096, 8
    h, g, R, W, b = _large_inputs(seed_of("large", param_dtype), B, T, d, r, torch.bfloat16,
                                  param_dtype)
    pos = torch.arange(T, device=DEV).repeat(B, 1)
    fused = _grads(reft_ext.loreft, h, pos, R, W, b, g)
    ref64 = _grads(loreft_reference, h.double(), pos, R.double(), W.double(), b.double(),
                   g.double())
    same = _grads(loreft_reference, h, pos, R, W, b, g)
    for name, f, e, s in zip(("out", "dh", "dR", "dW", "db"), fused, ref64, same):
        assert_within_rule(name, f, e, s)
    del ref64, same
    # In place on the same problem: same values and gradients, bit for bit.
    fused_ = _grads(reft_ext.loreft_, h, pos, R, W, b, g, inplace=True)
    for name, f, f_ in zip(("out", "dh", "dR", "dW", "db"), fused, fused_):
        assert_bitwise_equal(f_, f, f"{name} of loreft_ vs loreft")


@pytest.mark.parametrize("inplace", [False, True], ids=["loreft", "loreft_"])
def test_runs_on_the_current_stream(inplace):
    """The kernels must be enqueued on torch.cuda.current_stream(): on a side stream that is
    still busy computing h, a launch on any other stream would read h before it exists."""
    h, pos, R, W, b, g = make_inputs(seed_of("stream", inplace), 4, 64, 256, 8, 16,
                                     torch.bfloat16)
    h, pos, R, W, b, g = (t.to(DEV) for t in (h, pos, R, W, b, g))
    expected = _grads(reft_ext.loreft_ if inplace else reft_ext.loreft, h, pos, R, W, b, g,
                      inplace)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keeps `side` busy for ~10 ms
        h_late = h * 1  # written on `side` only after the sleep
        got = _grads(reft_ext.loreft_ if inplace else reft_ext.loreft, h_late, pos, R, W, b,
                     g, inplace)
    side.synchronize()
    for name, e, o in zip(("out", "dh", "dR", "dW", "db"), expected, got):
        assert_bitwise_equal(o, e, f"{name} computed on a side stream")


@pytest.mark.parametrize("inplace", [False, True], ids=["loreft", "loreft_"])
def test_compile_reduce_overhead_cuda_graphs(inplace):
    """torch.compile(mode="reduce-overhead") records the ops into CUDA graphs (forward and
    backward) and replays them on fresh inputs: results must match eager."""
    torch._dynamo.reset()
    op = reft_ext.loreft_ if inplace else reft_ext.loreft

    def step(h, pos, R, W, b):
        x = h * 1 if inplace else h  # loreft_ needs a non-leaf
        return (op(x, pos, R, W, b).float() ** 2).sum()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for it in range(4):  # warm-up, recording, then replays with new values
        h, pos, R, W, b, _ = make_inputs(seed_of("graphs", inplace, it), 2, 32, 128, 4, 6,
                                         torch.bfloat16, (torch.float32,) * 3)
        h, pos, R, W, b = (t.to(DEV) for t in (h, pos, R, W, b))
        results = []
        for fn in (step, compiled):
            leaves = [t.detach().clone().requires_grad_() for t in (h, R, W, b)]
            loss = fn(leaves[0], pos, *leaves[1:])
            loss.backward()
            results.append([loss.detach().clone()] + [t.grad.clone() for t in leaves])
        for name, e, c in zip(("loss", "dh", "dR", "dW", "db"), *results):
            torch.testing.assert_close(c, e, msg=f"{name} at step {it}")
    torch._dynamo.reset()


def test_invalid_positions_under_graph_capture_write_nothing():
    """During CUDA graph capture the positions cannot be read back to raise: the captured
    check kernel makes the captured edit a no-op instead (never a write out of bounds)."""
    B, T, d, r = 2, 16, 64, 4
    h, pos, R, W, b, _ = make_inputs(seed_of("capture"), B, T, d, r, 3, torch.float32)
    h, pos, R, W, b = (t.to(DEV) for t in (h, pos, R, W, b))
    static_h, static_pos = h.clone(), pos.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        reft_ext.loreft_(static_h.clone(), static_pos, R, W, b)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        reft_ext.loreft_(static_h, static_pos, R, W, b)

    static_h.copy_(h)
    graph.replay()
    expected = reft_ext.loreft(h, pos, R, W, b)
    assert_bitwise_equal(static_h, expected, "replayed edit with valid positions")

    for bad in (T, -2, "repeat"):
        static_h.copy_(h)
        bad_pos = pos.clone()
        if bad == "repeat":
            bad_pos[0, 1] = bad_pos[0, 0] = 3
        else:
            bad_pos[1, 2] = bad
        static_pos.copy_(bad_pos)
        graph.replay()
        assert_bitwise_equal(static_h, h, f"h after a replay with invalid positions ({bad})")


def _grads_on_shifted_view(op, h, pos, R, W, b, g, inplace):
    """As _grads, but h is a view one element into a (B, T, d + 1) buffer: rows are not
    16-byte aligned. loreft_ edits that view itself (forward on unaligned rows; its
    gradient reaches the kernels as an unaligned slice); loreft reads x from it in the
    backward (its forward works on an aligned clone)."""
    B, T, d = h.shape
    big = torch.zeros(B, T, d + 1, dtype=h.dtype, device=DEV)
    big[..., 1:] = h
    big.requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in (R, W, b)]
    base = big.clone() if inplace else big
    x = base[..., 1:]
    assert x.data_ptr() % 16 != 0
    out = op(x, pos, *params)
    out.backward(g)
    return (out.detach(), big.grad[..., 1:], *(p.grad for p in params))


@pytest.mark.parametrize("inplace", [False, True], ids=["loreft", "loreft_"])
@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16, torch.float16,
                                     torch.float64], ids=["f32", "bf16", "f16", "f64"])
def test_unaligned_rows_match_aligned_bitwise(h_dtype, inplace):
    """Rows that are not 16-byte aligned take the scalar path; the column ownership and so
    every summation order are the same as on the vectorised path: same bits."""
    B, T, d, r, P = 3, 40, 192, 8, 12
    h, pos, R, W, b, g = make_inputs(seed_of("align", h_dtype, inplace), B, T, d, r, P,
                                     h_dtype)
    h, pos, R, W, b, g = (t.to(DEV) for t in (h, pos, R, W, b, g))
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    aligned = _grads(op, h, pos, R, W, b, g, inplace)
    unaligned = _grads_on_shifted_view(op, h, pos, R, W, b, g, inplace)
    for name, a, u in zip(("out", "dh", "dR", "dW", "db"), aligned, unaligned):
        assert_bitwise_equal(u, a, f"{name} on unaligned rows")


# (B, T, d, r, P): the register-cached path for each column-iteration count, the general
# path (r > 64; d beyond the cached limit) and awkward sizes.
PATH_SHAPES = {
    "d256_iters1": (2, 24, 256, 8, 10),
    "d2048_iters1": (2, 12, 2048, 4, 6),
    "d4096_iters2": (2, 12, 4096, 16, 6),
    "d8192_iters4": (1, 8, 8192, 8, 5),
    "d16384_iters8": (1, 6, 16384, 4, 3),
    "d16392_general": (1, 6, 16392, 4, 3),
    "r65_general": (2, 16, 384, 65, 7),
    "r200_chunks": (2, 16, 512, 200, 7),
    "d1000_tail": (2, 16, 1000, 8, 7),
    "many_chunks": (16, 256, 128, 3, 200),
}


@pytest.mark.parametrize("shape", list(PATH_SHAPES))
@pytest.mark.parametrize("h_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_kernel_paths(shape, h_dtype):
    B, T, d, r, P = PATH_SHAPES[shape]
    h, pos, R, W, b, g = make_inputs(seed_of("paths", shape, h_dtype), B, T, d, r, P, h_dtype,
                                     (torch.float32,) * 3)
    check_against_reference(h, pos, R, W, b, g, DEV, inplace=False)


def test_parameter_gradients_are_deterministic():
    """Three backward runs of a problem with many row chunks: bitwise equal gradients."""
    h, pos, R, W, b, g = make_inputs(seed_of("det"), 8, 512, 1024, 8, 256, torch.bfloat16,
                                     (torch.float32,) * 3, empty_frac=0.1)
    h, pos, R, W, b, g = (t.to(DEV) for t in (h, pos, R, W, b, g))
    first = _grads(reft_ext.loreft, h, pos, R, W, b, g)
    for _ in range(2):
        again = _grads(reft_ext.loreft, h, pos, R, W, b, g)
        for name, a, c in zip(("out", "dh", "dR", "dW", "db"), first, again):
            assert_bitwise_equal(c, a, f"{name} on a repeated run")


def test_rank_above_cuda_limit_raises_before_writing():
    limit = _native.lib().cuda_max_rank
    d = limit + 8
    h = torch.randn(1, 2, d, device=DEV)
    before = h.clone()
    R = torch.zeros(limit + 1, d, device=DEV)
    with pytest.raises(ValueError, match=r"rank r=\d+ .*exceeds the CUDA kernels' limit"):
        reft_ext.loreft_(h, torch.zeros(1, 1, dtype=torch.long, device=DEV), R, R.clone(),
                         torch.zeros(limit + 1, device=DEV))
    assert_bitwise_equal(h, before, "h after a rejected rank")


def test_build_reports_cuda():
    info = reft_ext.build_info()
    assert info["cuda_kernels"] and info["cuda_archs"], info
    assert info["cuda_devices"] and info["cuda_devices"] >= 1, info


# ---------------------------------------------------------------------------------------
# Intervention banks (issue 16): R, W (N, r, d), b (N, r) and a (B, P) index, through the
# ops themselves (torch.ops.reft_ext.*, index as their last argument) on CUDA tensors.
# tests/test_cuda_emu.py runs the same kernels on the CPU with poisoned outputs and block
# orders; these check what only a GPU shows (nvcc's code, the real memory model, streams
# and graph capture).

OPS = torch.ops.reft_ext
NAMES = ("out", "dh", "dR", "dW", "db")


def _bank(seed, N, r, d, dtypes):
    gen = torch.Generator().manual_seed(seed)
    entries = [make_params(gen, r, d, dtypes) for _ in range(N)]
    return tuple(torch.stack([e[k] for e in entries]) for k in range(3))


def _bank_index(seed, B, P, N, dtype=torch.int64, empty_frac=0.2, unused=()):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(N) if e not in unused])
    index = allowed[torch.randint(len(allowed), (B, P), generator=gen)]
    index[torch.rand(B, P, generator=gen) < empty_frac] = -1
    return index.to(dtype)


def _bank_ops(h, pos, R, W, b, g, index, inplace):
    """(out, dh, dR, dW, db) from the CUDA ops: loreft_fwd + loreft_bwd (x = h), or
    loreft_fwd_ (saving the rows) + loreft_bwd (x = the saved rows); also checks that
    loreft_bwd_rows gives the same row corrections and gradients."""
    if inplace:
        out = h.clone()
        saved, _ = OPS.loreft_fwd_(out, pos, R, W, b, True, index)
        x, gathered = saved, True
    else:
        out = OPS.loreft_fwd(h, pos, R, W, b, index)
        x, gathered = h, False
    dh, dR, dW, db = OPS.loreft_bwd(g, pos, x, gathered, R, W, b, None, index)
    delta, *grads = OPS.loreft_bwd_rows(g, pos, x, gathered, R, W, b, None, index)
    edited = (pos >= 0) & (index >= 0)
    bi, pj = edited.nonzero(as_tuple=True)
    rows = pos[bi, pj].long()
    expect = torch.zeros_like(delta)
    expect[bi, pj] = (dh[bi, rows] - g[bi, rows].to(dh.dtype)).to(delta.dtype)
    torch.testing.assert_close(delta, expect, msg="loreft_bwd_rows' row corrections")
    for name, a, c in zip(NAMES[2:], (dR, dW, db), grads):
        assert_bitwise_equal(c, a, f"{name} of loreft_bwd_rows vs loreft_bwd")
    return out, dh, dR, dW, db


def _bank_reference(h, pos, R, W, b, g, index, float64):
    if float64:
        h, R, W, b, g = (t.detach().cpu().double() for t in (h, R, W, b, g))
        pos, index = pos.cpu(), index.cpu()
    leaf = h.detach().clone().requires_grad_()
    params = [t.detach().clone().requires_grad_() for t in (R, W, b)]
    out = loreft_reference(leaf, pos, *params, index=index)
    out.backward(g)
    return (out.detach(), leaf.grad, *(p.grad for p in params))


@pytest.mark.parametrize("inplace", [False, True], ids=["loreft", "loreft_"])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
@pytest.mark.parametrize("h_dtype,p_dtype", [(torch.float32, torch.float32),
                                             (torch.float64, torch.float64),
                                             (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16)],
                         ids=["f32", "f64", "f16-pf32", "bf16"])
@pytest.mark.parametrize("shape", [(3, 40, 1003, 5, 7, 4), (8, 96, 256, 13, 80, 3)],
                         ids=["odd_d", "chunks"])
def test_bank_matches_reference(shape, h_dtype, p_dtype, index_dtype, inplace):
    """Each slot edited with its entry, -1 index slots untouched, an unused entry's
    gradients exact zeros, against the float64 reference under the tolerance rule."""
    B, T, d, r, P, N = shape
    seed = seed_of("bank", shape, h_dtype, p_dtype, index_dtype, inplace)
    h, pos, _, _, _, g = make_inputs(seed, B, T, d, r, P, h_dtype, (p_dtype,) * 3)
    R, W, b = _bank(seed + 1, N, r, d, (p_dtype,) * 3)
    index = _bank_index(seed + 2, B, P, N, index_dtype, unused=(1,))
    index_view = torch.stack([index, index], dim=-1).to(DEV)[..., 0]  # strides (2P, 2)
    assert not index_view.is_contiguous()
    dev = [t.to(DEV) for t in (h, pos, R, W, b, g)]
    fused = _bank_ops(*dev, index_view, inplace)
    ref64 = _bank_reference(h, pos, R, W, b, g, index, True)
    same = _bank_reference(*dev, index.to(DEV), False)
    for name, f, e, s in zip(NAMES, fused, ref64, same):
        assert f.device.type == "cuda" and not f.isnan().any(), name
        assert_within_rule(name, f, e, s)
    edited = torch.where(index >= 0, pos, -1)
    bi, pj = (edited >= 0).nonzero(as_tuple=True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[bi, edited[bi, pj]] = True
    assert_bitwise_equal(fused[0].cpu()[~mask], h[~mask], "out at unedited rows vs h")
    assert_bitwise_equal(fused[1].cpu()[~mask], g[~mask], "dh at unedited rows vs g")
    for name, t in zip(NAMES[2:], fused[2:]):
        assert_bitwise_equal(t[1], torch.zeros_like(t[1]), f"{name} of the unused entry")


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_bank_of_one_equals_no_index_bitwise(h_dtype):
    """N = 1 with an index of zeros runs the ordinary kernels: the same bits as no index."""
    B, T, d, r, P = 3, 64, 512, 8, 24
    h, pos, R, W, b, g = (t.to(DEV) for t in make_inputs(seed_of("bank-one", h_dtype), B, T,
                                                         d, r, P, h_dtype))
    index = torch.zeros(B, P, dtype=torch.int64, device=DEV)
    plain = (OPS.loreft_fwd(h, pos, R, W, b), *OPS.loreft_bwd(g, pos, h, False, R, W, b))
    banked = (OPS.loreft_fwd(h, pos, R[None], W[None], b[None], index),
              *OPS.loreft_bwd(g, pos, h, False, R[None], W[None], b[None], None, index))
    for name, p_, k in zip(NAMES, plain, banked):
        assert_bitwise_equal(k if name in ("out", "dh") else k[0], p_, f"{name}, N = 1")


def test_bank_gradients_are_deterministic():
    """Many row chunks shared among the entries: repeated runs give the same bits."""
    B, T, d, r, P, N = 8, 512, 1024, 8, 256, 5
    h, pos, _, _, _, g = make_inputs(seed_of("bank-det"), B, T, d, r, P, torch.bfloat16,
                                     (torch.float32,) * 3, empty_frac=0.1)
    R, W, b = _bank(seed_of("bank-det", 1), N, r, d, (torch.float32,) * 3)
    index = _bank_index(seed_of("bank-det", 2), B, P, N)
    args = [t.to(DEV) for t in (h, pos, R, W, b, g, index)]
    first = _bank_ops(*args, False)
    for _ in range(2):
        for name, a, c in zip(NAMES, first, _bank_ops(*args, False)):
            assert_bitwise_equal(c, a, f"{name} on a repeated run")


def test_bank_bad_index_raises_before_writing():
    """An index entry outside {-1} U [0, N) raises ValueError and leaves h untouched, also
    after the same positions (and another index) were found valid: the check's cache
    keys on the index tensor and its version."""
    B, T, d, r, P, N = 2, 16, 64, 4, 3, 3
    h, pos, _, _, _, _ = make_inputs(seed_of("bank-bad"), B, T, d, r, P, torch.float32)
    R, W, b = (t.to(DEV) for t in _bank(seed_of("bank-bad", 1), N, r, d, (torch.float32,) * 3))
    h, pos = h.to(DEV), pos.to(DEV)
    index = torch.zeros(B, P, dtype=torch.int64, device=DEV)
    OPS.loreft_fwd_(h.clone(), pos, R, W, b, False, index)  # valid: cached
    for bad in (N, -2):
        for fresh in (False, True):
            bad_index = index.clone() if fresh else index
            bad_index[1, 2] = bad  # in place on the cached tensor: a version bump
            x = h.clone()
            with pytest.raises(ValueError, match="index"):
                OPS.loreft_fwd_(x, pos, R, W, b, False, bad_index)
            assert_bitwise_equal(x, h, f"h after a rejected index ({bad})")
            index[1, 2] = 0


def test_bank_bad_index_under_graph_capture_writes_nothing():
    """Under capture the check kernel's bit 4 makes the captured edit a no-op."""
    B, T, d, r, P, N = 2, 16, 64, 4, 3, 3
    h, pos, _, _, _, _ = make_inputs(seed_of("bank-capture"), B, T, d, r, P, torch.float32)
    R, W, b = (t.to(DEV) for t in _bank(seed_of("bank-capture", 1), N, r, d,
                                        (torch.float32,) * 3))
    h, pos = h.to(DEV), pos.to(DEV)
    index = _bank_index(seed_of("bank-capture", 2), B, P, N).to(DEV)
    static_h, static_index = h.clone(), index.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        OPS.loreft_fwd_(static_h.clone(), pos, R, W, b, False, static_index)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        OPS.loreft_fwd_(static_h, pos, R, W, b, False, static_index)

    graph.replay()
    assert_bitwise_equal(static_h, OPS.loreft_fwd(h, pos, R, W, b, index),
                         "replayed edit with a valid index")
    for bad in (N, -2, 1 << 40):
        static_h.copy_(h)
        bad_index = index.clone()
        bad_index[1, 2] = bad
        static_index.copy_(bad_index)
        graph.replay()
        assert_bitwise_equal(static_h, h, f"h after a replay with index entry {bad}")
