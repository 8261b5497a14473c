"""Intervention banks: the op with a (B, P) index into stacked R, W (N, r, d) and b (N, r).

Every result is compared with the float64 reference (reft_ext.ops.reference with index,
which edits each entry's rows with that entry's parameters: an independent grouping of the
same math) under the tolerance rule of tests/_util.py, and with the plain op: a bank row
must be bitwise the row the plain op gives with that row's entry (a row's result does not
depend on which rows share its tile), unused entries get exact zero gradients, and a
slot whose index is -1 is left alone like a -1 position.
"""
from __future__ import annotations

import pytest
import torch

import reft_ext
from _util import (DEVICES, POS_DTYPES, assert_bitwise_equal, assert_within_rule, gen,
                   make_positions, seed_of, selected_mask)
from reft_ext.ops.reference import loreft_reference

# name: (B, T, d, r, P, N, empty fraction of positions, fraction of index -1)
SHAPES = {
    "basic": (3, 12, 32, 4, 6, 3, 0.2, 0.1),
    "odd": (5, 9, 17, 3, 7, 4, 0.25, 0.2),
    "many_rows": (8, 80, 64, 2, 40, 5, 0.1, 0.0),     # several reduction chunks per entry
    "one_entry": (2, 10, 24, 3, 5, 1, 0.2, 0.0),
    "r_equals_d": (2, 6, 5, 5, 3, 2, 0.0, 0.0),
}
DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
          (torch.float64, None), (torch.bfloat16, torch.float32)]
DTYPE_IDS = ["f32", "bf16", "f16", "f64", "bf16_fp32params"]


def make_bank(seed, B, T, d, r, P, N, empty, unindexed, h_dtype=torch.float32,
              p_dtype=None, pos_dtype=torch.int64, idx_dtype=torch.int64):
    """Fresh random (h, positions, R, W, b, index, grad_out): each entry's R orthonormal,
    entries drawn at random per slot (entry N - 1 left unused when N > 2), a fraction of
    the index -1."""
    g = gen(seed)
    p_dtype = p_dtype or h_dtype
    h = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(h_dtype)
    pos = make_positions(g, B, T, P, pos_dtype, empty)
    Rs = [torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].T
          for _ in range(N)]
    R = torch.stack(Rs).to(p_dtype)
    W = (torch.randn(N, r, d, generator=g, dtype=torch.float64) / d ** 0.5).to(p_dtype)
    b = torch.randn(N, r, generator=g, dtype=torch.float64).to(p_dtype)
    used = N - 1 if N > 2 else N
    index = torch.randint(0, used, (B, P), generator=g)
    index[torch.rand(B, P, generator=g) < unindexed] = -1
    grad = torch.randn(B, T, d, generator=g, dtype=torch.float64).to(h_dtype)
    return h, pos, R, W, b, index.to(idx_dtype), grad


def run(op, h, pos, R, W, b, index, grad, device, grad_from="caller"):
    """(out, dh, dR, dW, db) of one call with autograd on `device` (dh None when h needs
    no gradient)."""
    leaf = h.detach().to(device).requires_grad_(grad_from != "params-only")
    params = [t.detach().to(device).requires_grad_() for t in (R, W, b)]
    x = leaf.clone() if op is reft_ext.loreft_ else leaf
    out = op(x, pos.to(device), *params, index=None if index is None else index.to(device))
    if grad_from == "caller":
        out.backward(grad.to(device))
    else:   # the gradient is autograd's own buffer (the in-place row-correction path)
        (out * grad.to(device)).sum().backward()
    return (out.detach(), leaf.grad, *(p.grad for p in params))


def reference(h, pos, R, W, b, index, grad, float64):
    if float64:
        h, R, W, b, grad = (t.double() for t in (h, R, W, b, grad))
    return run(loreft_reference, h, pos, R, W, b, index, grad, "cpu")


def edited_mask(pos, index, T):
    return selected_mask(torch.where(index >= 0, pos, -1), T)


def check(h, pos, R, W, b, index, grad, device, op, grad_from="caller"):
    fused = run(op, h, pos, R, W, b, index, grad, device, grad_from)
    ref64 = reference(h, pos, R, W, b, index, grad, True)
    same = reference(h, pos, R, W, b, index, grad, False)
    for name, f, e, s in zip(("out", "dh", "dR", "dW", "db"), fused, ref64, same):
        if f is None:
            assert grad_from == "params-only" and name == "dh"
            continue
        assert f.shape == e.shape, f"{name}: shape {tuple(f.shape)} != {tuple(e.shape)}"
        assert_within_rule(name, f, e, s)
    mask = edited_mask(pos, index, h.shape[1])
    assert_bitwise_equal(fused[0].cpu()[~mask], h[~mask], "out at unedited rows vs h")
    if fused[1] is not None:
        assert_bitwise_equal(fused[1].cpu()[~mask], grad[~mask], "dh at unedited rows")
    return fused


OPS = [reft_ext.loreft, reft_ext.loreft_]
OP_IDS = ["loreft", "loreft_"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_bank_matches_reference(device, op, dtypes, shape):
    B, T, d, r, P, N, empty, unindexed = SHAPES[shape]
    s = seed_of("bank", shape, dtypes, op.__name__)
    h, pos, R, W, b, index, grad = make_bank(
        s, B, T, d, r, P, N, empty, unindexed, *dtypes, pos_dtype=POS_DTYPES[s % 2],
        idx_dtype=POS_DTYPES[(s // 2) % 2])
    check(h, pos, R, W, b, index, grad, device, op)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("grad_from", ["autograd", "params-only"])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[4]], ids=[DTYPE_IDS[0], DTYPE_IDS[4]])
def test_bank_other_backward_paths(device, op, grad_from, dtypes):
    """The row-correction backward (P <= T / 2): gradient owned by autograd, and only the
    parameters requiring grad."""
    h, pos, R, W, b, index, grad = make_bank(seed_of("paths", grad_from, dtypes), 4, 30, 40,
                                             3, 8, 4, 0.2, 0.1, *dtypes)
    check(h, pos, R, W, b, index, grad, device, op, grad_from)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_each_row_is_bitwise_the_plain_op_with_its_entry(device, op):
    """A bank edit equals N plain edits, each on the slots of one entry: rows bitwise (the
    kernels group rows by entry, and a row's result does not depend on its tile), and each
    entry's parameter gradients equal the plain op's on that entry's slots within the rule
    (their reduction partition differs)."""
    B, T, d, r, P, N = 6, 40, 48, 4, 12, 4
    h, pos, R, W, b, index, grad = make_bank(seed_of("plain", op.__name__), B, T, d, r, P,
                                             N, 0.1, 0.1, torch.bfloat16, torch.float32)
    fused = run(op, h, pos, R, W, b, index, grad, device)
    mask_all = edited_mask(pos, index, T)
    for e in range(N):
        pos_e = torch.where(index == e, pos, -1)
        plain = run(op, h, pos_e, R[e], W[e], b[e], None, grad, device)
        m = selected_mask(pos_e, T)
        assert_bitwise_equal(fused[0].cpu()[m], plain[0].cpu()[m], f"rows of entry {e}")
        assert_bitwise_equal(fused[1].cpu()[m], plain[1].cpu()[m], f"dh rows of entry {e}")
        for name, f, p in zip(("dR", "dW", "db"), fused[2:], plain[2:]):
            ref = reference(h, pos_e, R[e], W[e], b[e], None, grad, True)
            same = reference(h, pos_e, R[e], W[e], b[e], None, grad, False)
            k = ("dR", "dW", "db").index(name) + 2
            assert_within_rule(f"{name}[{e}]", f[e], ref[k], same[k])
            if not m.any():
                assert not f[e].any(), f"{name}[{e}] of an unused entry must be exactly 0"
    assert mask_all.any()


@pytest.mark.parametrize("device", DEVICES)
def test_one_entry_bank_is_bitwise_the_plain_op(device):
    """N = 1 with index 0 everywhere (or -1 where a position is -1) is the plain op."""
    h, pos, R, W, b, index, grad = make_bank(seed_of("n1"), 4, 20, 40, 3, 9, 1, 0.2, 0.0)
    bank = run(reft_ext.loreft, h, pos, R, W, b, index, grad, device)
    plain = run(reft_ext.loreft, h, pos, R[0], W[0], b[0], None, grad, device)
    for name, a, e in zip(("out", "dh", "dR", "dW", "db"), bank, plain):
        assert_bitwise_equal(a.reshape(e.shape), e, name)


@pytest.mark.parametrize("device", DEVICES)
def test_unused_entries_and_unindexed_slots(device):
    """Entries no slot uses get exact zero gradients; a valid position with index -1 is not
    edited; an index where every slot is -1 edits nothing and gives zero gradients."""
    h, pos, R, W, b, index, grad = make_bank(seed_of("unused"), 3, 10, 16, 2, 4, 5, 0.0, 0.0)
    index[:, :] = torch.tensor([0, -1, 2, -1])
    out, dh, dR, dW, db = run(reft_ext.loreft, h, pos, R, W, b, index, grad, device)
    for e in (1, 3, 4):
        for name, t in (("dR", dR), ("dW", dW), ("db", db)):
            assert not t[e].any(), f"{name}[{e}] (unused entry) must be exactly 0"
    for e in (0, 2):
        assert dW[e].abs().sum() > 0, f"entry {e} is used: its gradient must not be 0"
    skipped = selected_mask(torch.where(index < 0, pos, -1), 10)
    assert_bitwise_equal(out.cpu()[skipped], h[skipped], "rows whose index is -1")
    index[:] = -1
    out, dh, dR, dW, db = run(reft_ext.loreft, h, pos, R, W, b, index, grad, device)
    assert_bitwise_equal(out.cpu(), h, "out with every index -1")
    assert_bitwise_equal(dh.cpu(), grad, "dh with every index -1")
    assert not (dR.any() or dW.any() or db.any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_strided_index_and_params(device, op):
    """A transposed (non-contiguous) index and non-contiguous parameter stacks."""
    h, pos, R, W, b, index, grad = make_bank(seed_of("strided", op.__name__), 4, 14, 20, 3,
                                             5, 3, 0.2, 0.1)
    index_t = index.T.contiguous().T                    # strides (1, B)
    assert not index_t.is_contiguous()
    R_t = R.transpose(0, 1).contiguous().transpose(0, 1)
    assert not R_t.is_contiguous()
    check(h, pos, R_t, W, b, index_t, grad, device, op)


@pytest.mark.parametrize("device", DEVICES)
def test_bank_backward_is_deterministic_across_threads(device):
    h, pos, R, W, b, index, grad = make_bank(seed_of("det"), 8, 120, 128, 4, 100, 6, 0.05,
                                             0.05)
    runs = []
    old = torch.get_num_threads()
    try:
        for threads in ((2, 1, 3, 2) if device == "cpu" else (None,) * 3):
            if threads is not None:
                torch.set_num_threads(threads)
            runs.append(run(reft_ext.loreft_, h, pos, R, W, b, index, grad, device,
                            "autograd"))
    finally:
        torch.set_num_threads(old)
    for k, r_ in enumerate(runs[1:], 1):
        for name, a, e in zip(("out", "dh", "dR", "dW", "db"), r_, runs[0]):
            assert_bitwise_equal(a, e, f"{name} of run {k}")


def test_gradcheck_and_gradgradcheck_float64():
    h, pos, R, W, b, index, _ = make_bank(seed_of("gc"), 2, 7, 6, 2, 4, 3, 0.2, 0.2,
                                          torch.float64)
    inputs = [t.clone().requires_grad_() for t in (h, R, W, b)]

    def f(h_, R_, W_, b_):
        return reft_ext.loreft(h_, pos, R_, W_, b_, index=index)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


# torch 2.13 scripts a helper on the first use of forward-mode AD.
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
def test_forward_mode_matches_reference(op):
    import torch.autograd.forward_ad as fwAD
    h, pos, R, W, b, index, _ = make_bank(seed_of("jvp", op.__name__), 3, 9, 10, 2, 5, 3,
                                          0.2, 0.2, torch.float64)
    g = gen(7)
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (h, R, W, b)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip((h, R, W, b), tangents)]
        want = fwAD.unpack_dual(loreft_reference(duals[0], pos, *duals[1:],
                                                 index=index)).tangent
        x = duals[0].clone() if op is reft_ext.loreft_ else duals[0]
        got = fwAD.unpack_dual(op(x, pos, *duals[1:], index=index)).tangent
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


BAD = {
    "index_entry_N": (lambda a: a["index"].__setitem__((1, 2), 3), ValueError,
                      r"index\[1, 2\] = 3 is out of range"),
    "index_minus_2": (lambda a: a["index"].__setitem__((0, 0), -2), ValueError,
                      r"index\[0, 0\] = -2 is out of range"),
    "index_shape": (lambda a: a.__setitem__("index", a["index"][:, :3]), ValueError,
                    r"index must have the shape of positions"),
    "index_float": (lambda a: a.__setitem__("index", a["index"].float()), TypeError,
                    r"index must be int64 or int32"),
    "index_not_tensor": (lambda a: a.__setitem__("index", [0, 1]), TypeError,
                         r"index must be a torch.Tensor or None"),
    "R_2d_with_index": (lambda a: a.__setitem__("R", a["R"][0]), ValueError,
                        r"R must have shape \(N, r, d\)"),
    "W_other_N": (lambda a: a.__setitem__("W", a["W"][:2]), ValueError,
                  r"W must have shape \(N, r, d\)"),
    "b_2d_wrong": (lambda a: a.__setitem__("b", a["b"][:, :1]), ValueError,
                   r"b must have shape \(N, r\)"),
    "bank_without_index": (lambda a: a.__setitem__("index", None), ValueError,
                           r"needs index="),
}


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_bank_input_raises_and_writes_nothing(op, case):
    edit, exc, pattern = BAD[case]
    h, pos, R, W, b, index, _ = make_bank(seed_of("bad"), 2, 8, 6, 2, 4, 3, 0.0, 0.0)
    args = dict(R=R, W=W, b=b, index=index)
    edit(args)
    before = h.clone()
    with pytest.raises(exc, match=pattern):
        op(h, pos, args["R"], args["W"], args["b"], index=args["index"])
    assert_bitwise_equal(h, before, "h after a refused call")


def test_opcheck_with_index():
    h, pos, R, W, b, index, grad = make_bank(seed_of("opcheck"), 2, 9, 8, 2, 4, 3, 0.2, 0.1)
    ops = torch.ops.reft_ext
    torch.library.opcheck(ops.loreft_fwd, (h, pos, R, W, b, index))
    torch.library.opcheck(ops.loreft_fwd_, (h.clone(), pos, R, W, b, True, index))
    torch.library.opcheck(ops.loreft_bwd, (grad, pos, h, False, R, W, b, None, index))
    torch.library.opcheck(ops.loreft_bwd_rows, (grad, pos, h, False, R, W, b, None, index))


# Dynamo instantiates torch.autograd.Function() to trace a ctx (see test_compile.py).
@pytest.mark.filterwarnings(r"ignore:<class 'torch\.autograd\.function\.Function'> should "
                            r"not be instantiated:DeprecationWarning")
def test_compile_fullgraph_with_index():
    h, pos, R, W, b, index, grad = make_bank(seed_of("compile"), 2, 9, 8, 2, 4, 3, 0.2, 0.1)
    torch._dynamo.reset()

    def step(h_, R_, W_, b_):
        return (reft_ext.loreft(h_ * 1.0, pos, R_, W_, b_, index=index) * grad).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_in = [t.clone().requires_grad_() for t in (h, R, W, b)]
    comp_in = [t.clone().requires_grad_() for t in (h, R, W, b)]
    step(*eager_in).backward()
    compiled(*comp_in).backward()
    for name, a, e in zip(("dh", "dR", "dW", "db"), comp_in, eager_in):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6, msg=name)


BAD_BWD = {
    "positions_batch": (lambda a: a.__setitem__("pos", torch.zeros(4, 3, dtype=torch.long)),
                        ValueError, r"positions must have shape \(B, P\) = \(3, P\)"),
    "position_ge_T": (lambda a: a["pos"].__setitem__((0, 0), 50), ValueError,
                      r"positions\[0, 0\] = 50 is out of range"),
    "index_out_of_range": (lambda a: a["index"].__setitem__((1, 1), 7), ValueError,
                           r"index\[1, 1\] = 7 is out of range"),
    "x_shape": (lambda a: a.__setitem__("x", a["x"][:, :5]), ValueError,
                r"x must have shape \(3, 10, 8\)"),
    "grad_2d": (lambda a: a.__setitem__("grad", a["grad"][0]), ValueError,
                r"grad must have 3 dimensions"),
}


@pytest.mark.parametrize("op_name", ["loreft_bwd", "loreft_bwd_rows"])
@pytest.mark.parametrize("case", list(BAD_BWD))
def test_backward_ops_validate_their_inputs(op_name, case):
    """The backward ops are public (torch.ops.reft_ext): bad metadata or values raise a
    named error instead of reading outside the tensors."""
    edit, exc, pattern = BAD_BWD[case]
    h, pos, R, W, b, index, grad = make_bank(seed_of("badbwd"), 3, 10, 8, 2, 3, 3, 0.0, 0.0)
    a = dict(grad=grad, pos=pos, x=h, index=index)
    edit(a)
    with pytest.raises(exc, match=pattern):
        getattr(torch.ops.reft_ext, op_name)(a["grad"], a["pos"], a["x"], False, R, W, b, None,
                                             a["index"])
