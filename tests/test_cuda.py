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
