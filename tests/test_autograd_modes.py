"""Gradients are exact in every autograd mode a user can combine the ops with, or refused
with a clear error.

Each graph topology runs three times: with the fused op, with the pure-PyTorch reference
in the same dtype and with the reference in float64 (ground truth for the same input
values); every gradient must satisfy the tolerance rule of tests/_util.py, and every
tensor another party holds (a hook's stash, the caller's gradient, a retained .grad) must
be bitwise what it was when that party took it. test_matrix_catches_always_reusing_grad
checks that the matrix fails a backward that writes dx into the incoming gradient
regardless of who holds it.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import reft_ext
from reft_ext.ops import _grad_reuse, autograd
from reft_ext.ops.reference import loreft_reference, loreft_reference_
from _util import (DEVICES, assert_bitwise_equal, assert_within_rule, bits, make_inputs,
                   seed_of)

OPS = ["loreft", "loreft_"]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.bfloat16, id="bf16")]
_FUSED = {"loreft": reft_ext.loreft, "loreft_": reft_ext.loreft_}
_REF = {"loreft": loreft_reference, "loreft_": loreft_reference_}


class _Held:
    """Tensors another party keeps, each with a snapshot of its bits when it was taken."""

    def __init__(self):
        self.items = []

    def keep(self, name, t):
        self.items.append((name, t, bits(t).clone()))
        return t

    def check(self):
        for name, t, snap in self.items:
            assert torch.equal(bits(t), snap), f"{name} was modified after it was taken"


def _stash(fn):
    """A tensor hook that calls fn(grad) and leaves the gradient as it is."""
    return lambda g: (fn(g), None)[1]


def _storage_view(g):
    """Keeps only g's storage (no tensor): a view rebuilt from it later."""
    st, meta = g.untyped_storage(), (g.storage_offset(), g.shape, g.stride())
    return lambda: torch.empty(0, dtype=g.dtype, device=g.device).set_(st, *meta)


def _scenario(name, op, h, pos, R, W, b, w, held):
    """Builds and backpropagates one graph; returns the gradients {name: tensor}."""
    leaf = h.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (R, W, b)]
    out = {}

    def grads():
        out.update(dh=leaf.grad, dR=params[0].grad, dW=params[1].grad, db=params[2].grad)
        return out

    x = leaf * 1.0
    if name == "downstream":
        (op(x, pos, *params) * w).sum().backward()
    elif name == "consumer-pending":                 # its backward runs after ours
        other = x * 3.0
        ((op(leaf * 1.0, pos, *params) + other) * w).sum().backward()
    elif name == "consumer-done":                    # its backward runs before ours
        y = op(x, pos, *params)
        ((y + leaf * 3.0) * w).sum().backward()
    elif name == "y+y":
        y = op(x, pos, *params)
        ((y + y) * w).sum().backward()
    elif name == "y+z":
        y = op(x, pos, *params)
        z = op(leaf * 2.0, pos, *params)
        ((y + z) * w).sum().backward()
    elif name == "cat":
        y = op(x, pos, *params)
        (torch.cat([y, y * 2.0], dim=1) * torch.cat([w, w], dim=1)).sum().backward()
    elif name == "hook-stash":
        y = op(x, pos, *params)
        y.register_hook(_stash(lambda g: held.keep("stashed grad", g)))
        (y * w).sum().backward()
    elif name == "hook-stash-view":
        y = op(x, pos, *params)
        y.register_hook(_stash(lambda g: held.keep("stashed view of grad", g[0, 1:])))
        (y * w).sum().backward()
    elif name == "hook-stash-storage":
        y = op(x, pos, *params)
        rebuild = []
        y.register_hook(_stash(lambda g: rebuild.append((_storage_view(g), g.clone()))))
        (y * w).sum().backward()
        view, snap = rebuild[0]
        assert_bitwise_equal(view(), snap, "grad rebuilt from its stashed storage")
    elif name == "hook-stash-numpy":
        y = op(x, pos, *params)
        arrays = []
        y.register_hook(_stash(lambda g: arrays.append((bits(g).numpy(), bits(g).clone()))))
        (y * w).sum().backward()
        arr, snap = arrays[0]
        assert torch.equal(torch.from_numpy(arr), snap), "numpy alias of grad modified"
    elif name == "hook-replace":
        y = op(x, pos, *params)
        y.register_hook(lambda g: g * 0.5 + 1.0)
        (y * w).sum().backward()
    elif name == "retain-grad":
        y = op(x, pos, *params)
        y.retain_grad()
        (y * w).sum().backward()
        out["y.grad"] = y.grad
        held.keep("retained y.grad", y.grad)
    elif name == "autograd.grad":
        y = op(x, pos, *params)
        g = held.keep("grad_outputs", w * 0.75)
        res = torch.autograd.grad(y, [leaf, *params], grad_outputs=g)
        out.update(dh=res[0], dR=res[1], dW=res[2], db=res[3])
        return out
    elif name == "backward(g)":
        y = op(x, pos, *params)
        y.backward(held.keep("caller's grad", w.clone()))
    elif name == "retain-graph":
        loss = (op(x, pos, *params) * w).sum()
        loss.backward(retain_graph=True)
        loss.backward()
    elif name == "micro-batches":
        for k in range(3):
            (op(leaf * (1.0 + k), pos, *params) * w).sum().backward()
    elif name == "twice":
        y = op(op(x, pos, *params), pos, *params)
        (y * w).sum().backward()
    elif name == "view-in-path":
        T = h.shape[1]
        big = torch.cat([leaf, leaf], dim=1) * 1.0     # (B, 2T, d)
        y = op(big[:, T:], pos, *params)               # a view with an offset
        ((y * w).sum() + (big[:, :T] * 0.5).sum()).backward()
    elif name == "expanded":
        op(x, pos, *params).sum().backward()
    elif name == "create-graph":
        y = op(x, pos, *params)
        res = torch.autograd.grad((y * w).sum(), [leaf, *params], create_graph=True)
        out.update(dh=res[0], dR=res[1], dW=res[2], db=res[3])
        return out
    elif name == "params-only":
        (op(h.clone(), pos, *params) * w).sum().backward()
    elif name == "threads":
        results, errors = {}, []

        def work(k):
            try:
                lk = h.clone().requires_grad_()
                ps = [t.clone().requires_grad_() for t in (R, W, b)]
                for _ in range(5):
                    (op(lk * 1.0, pos, *ps) * w).sum().backward()
                results[k] = (lk.grad, *(p.grad for p in ps))
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(e)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for k in range(2):
            out.update({f"{n}[{k}]": g for n, g in zip(("dh", "dR", "dW", "db"), results[k])})
        return out
    elif name in ("setprofile", "settrace"):
        setter = getattr(sys, name)
        frames = []
        setter(lambda frame, *a: frames.append(frame.f_locals) or None)
        try:
            y = op(x, pos, *params)
            y.register_hook(_stash(lambda g: held.keep("stashed grad", g)))
            (y * w).sum().backward()
        finally:
            setter(None)
            frames.clear()
    elif name == "compile":
        torch._dynamo.reset()   # a fresh closure per case: do not pile up recompiles

        def f(x_, *ps):
            return (op(x_ * 1.0, pos, *ps) * w).sum()
        torch.compile(f, backend="aot_eager", fullgraph=True)(leaf, *params).backward()
    else:
        raise AssertionError(name)
    return grads()


SCENARIOS = ["downstream", "consumer-pending", "consumer-done", "y+y", "y+z", "cat",
             "hook-stash", "hook-stash-view", "hook-stash-storage", "hook-stash-numpy",
             "hook-replace", "retain-grad", "autograd.grad", "backward(g)", "retain-graph",
             "micro-batches", "twice", "view-in-path", "expanded", "create-graph",
             "params-only", "threads", "setprofile", "settrace", "compile"]


def _check(op_name, scenario, dtype, device="cpu"):
    h, pos, R, W, b, w = make_inputs(seed_of("modes", op_name, scenario, dtype), 2, 10, 12,
                                     3, 4, dtype, param_dtypes=(torch.float32,) * 3)
    on_dev = [t.to(device) for t in (h, pos, R, W, b, w)]
    held = _Held()
    fused = _scenario(scenario, _FUSED[op_name], *on_dev, held)
    held.check()
    same = _scenario(scenario, _REF[op_name], *on_dev, _Held())
    ref64 = _scenario(scenario, _REF[op_name], *(t.double() for t in (h,)), pos,
                      *(t.double() for t in (R, W, b, w)), _Held())
    assert fused.keys() == ref64.keys()
    for name in fused:
        if ref64[name] is None:
            assert fused[name] is None, f"{name}: expected no gradient"
            continue
        assert fused[name] is not None, f"{name}: missing gradient"
        assert fused[name].layout == torch.strided, f"{name}: layout {fused[name].layout}"
        assert_within_rule(f"{scenario}: {name}", fused[name].detach(), ref64[name],
                           same[name].detach().to(fused[name].dtype))


# Dynamo instantiates torch.autograd.Function() to trace a ctx (see test_compile.py).
_DYNAMO_CTX_WARNING = pytest.mark.filterwarnings(
    r"ignore:<class 'torch\.autograd\.function\.Function'> should not be instantiated"
    r":DeprecationWarning")


@_DYNAMO_CTX_WARNING
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("op_name", OPS)
def test_graph_topologies(op_name, scenario, dtype, device):
    _check(op_name, scenario, dtype, device)


def _always_reuse_backward(ctx, grad, positions, x, x_gathered, R, W, b, index, coef=None,
                           sparse_ok=True):
    """A mutant: writes dx into the incoming gradient whoever holds it (the rule this
    file's matrix must reject)."""
    need = ctx.needs_input_grad
    two_h = len(need) == 7
    if not grad.is_contiguous() or grad.dtype != x.dtype or torch.is_grad_enabled():
        return _real_backward(ctx, grad, positions, x, x_gathered, R, W, b, index, coef,
                              sparse_ok)
    grad_h, dR, dW, db = torch.ops.reft_ext.loreft_bwd(grad, positions, x, x_gathered, R, W,
                                                       b, coef, index)
    grad.copy_(grad_h)
    return (grad, *((None,) if two_h else ()), None, dR, dW, db, None)


_real_backward = autograd._backward


@_DYNAMO_CTX_WARNING
def test_matrix_catches_always_reusing_grad(monkeypatch):
    monkeypatch.setattr(autograd, "_backward", _always_reuse_backward)
    caught = []
    for scenario in SCENARIOS:
        for op_name in OPS:
            try:
                _check(op_name, scenario, torch.float32)
            except AssertionError:
                caught.append((op_name, scenario))
    names = {s for _, s in caught}
    for must in ("consumer-pending", "y+z", "hook-stash", "hook-stash-view",
                 "hook-stash-storage", "hook-stash-numpy", "backward(g)", "autograd.grad",
                 "setprofile", "settrace"):
        assert must in names, f"the always-reuse mutant passed {must}: {sorted(names)}"


@pytest.mark.parametrize("op_name", OPS)
def test_owned_gradient_is_reused_not_copied(op_name):
    """The speed property: when autograd alone holds the incoming gradient, h's gradient
    is that very buffer (the sparse row correction added in place), not a copy; with
    SPARSE_GRAD off it is a copy."""
    h, pos, R, W, b, w = make_inputs(seed_of("reuse", op_name), 2, 10, 12, 3, 4)
    leaf = h.clone().requires_grad_()
    try:
        for sparse in (True, False):
            _grad_reuse.SPARSE_GRAD = sparse
            seen = {}
            x = leaf * 1.0
            x.register_hook(_stash(lambda g: seen.setdefault("dh", g.data_ptr())))
            y = _FUSED[op_name](x, pos, R, W.clone().requires_grad_(), b)
            y.register_hook(_stash(lambda g: seen.setdefault("dy", g.data_ptr())))
            (y * w).sum().backward()
            assert (seen["dh"] == seen["dy"]) == sparse, seen
    finally:
        _grad_reuse.SPARSE_GRAD = True


# ------------------------------------------------------------------ double backward

def _double(op, h, pos, R, W, b, w):
    leaf = h.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (R, W, b)]
    y = op(leaf, pos, *params)
    gs = torch.autograd.grad((y * y * w).sum(), [leaf, *params], create_graph=True)
    sum((g * g).sum() for g in gs).backward()
    return [leaf.grad, *(p.grad for p in params)]


def test_double_backward_matches_reference():
    h, pos, R, W, b, w = make_inputs(seed_of("double"), 2, 7, 5, 2, 3, torch.float64)
    fused = _double(reft_ext.loreft, h, pos, R, W, b, w)
    ref = _double(loreft_reference, h, pos, R, W, b, w)
    for name, f, e in zip(("dh", "dR", "dW", "db"), fused, ref):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10, msg=name)
    inputs = tuple(t.clone().requires_grad_() for t in (h, R, W, b))
    assert torch.autograd.gradgradcheck(
        lambda h_, R_, W_, b_: reft_ext.loreft(h_, pos, R_, W_, b_), inputs)


def test_hvp_matches_reference():
    h, pos, R, W, b, w = make_inputs(seed_of("hvp"), 2, 6, 4, 2, 2, torch.float64)
    v = tuple(torch.randn_like(t) for t in (h, W))

    def loss(op):
        return lambda h_, W_: (op(h_, pos, R, W_, b) ** 2 * w).sum()
    _, fused = torch.autograd.functional.hvp(loss(reft_ext.loreft), (h, W), v)
    _, ref = torch.autograd.functional.hvp(loss(loreft_reference), (h, W), v)
    for f, e in zip(fused, ref):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-10)


def test_inplace_double_backward_refused_with_clear_error():
    h, pos, R, W, b, w = make_inputs(seed_of("double_"), 2, 7, 5, 2, 3, torch.float64)
    leaf = h.clone().requires_grad_()
    Wp = W.clone().requires_grad_()
    y = reft_ext.loreft_(leaf * 1.0, pos, R, Wp, b)
    # (Its first-order values under create_graph are checked by the "create-graph" case.)
    gs = torch.autograd.grad((y * y * w).sum(), [leaf, Wp], create_graph=True)
    with pytest.raises(RuntimeError, match="loreft_: double backward"):
        sum((g * g).sum() for g in gs).backward()


# ------------------------------------------------------------------ forward-mode AD

# torch 2.13 scripts a helper on the first use of forward-mode AD / torch.func.
_JIT_SCRIPT_WARNING = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.script` is deprecated:DeprecationWarning")

def _tangents(seed, h, R, W, b, with_h, with_params):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) if on else None
         for x, on in ((h, with_h), (R, with_params), (W, with_params), (b, with_params))]
    return t


def _dual_out(op, h, pos, R, W, b, tangents):
    with fwAD.dual_level():
        # Clones: an in-place op updates its input's tangent in place, as torch's own do.
        args = [x if t is None else fwAD.make_dual(x, t.clone())
                for x, t in zip((h.clone(), R, W, b), tangents)]
        y = op(args[0], pos, *args[1:])
        p, t = fwAD.unpack_dual(y)
        return p.clone(), (torch.zeros_like(p) if t is None else t.clone())


@_JIT_SCRIPT_WARNING
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("which", ["h", "params", "both"])
@pytest.mark.parametrize("op_name", OPS)
def test_forward_mode_dual_tensors(op_name, which, dtype):
    """Dual tensors through the op (frozen parameters included: the case that used to
    return h's tangent unchanged) against the float64 reference's jvp."""
    h, pos, R, W, b, _ = make_inputs(seed_of("fwd", op_name, which, dtype), 2, 8, 6, 2, 3,
                                     dtype)
    tang = _tangents(seed_of("tan", which), h, R, W, b, which != "params", which != "h")
    _, fused = _dual_out(_FUSED[op_name], h, pos, R, W, b, tang)
    _, same = _dual_out(_REF[op_name], h, pos, R, W, b, tang)
    _, ref64 = _dual_out(_REF[op_name], h.double(), pos, R.double(), W.double(), b.double(),
                         [None if t is None else t.double() for t in tang])
    assert_within_rule("tangent", fused, ref64, same)


@_JIT_SCRIPT_WARNING
def test_torch_func_jvp():
    h, pos, R, W, b, _ = make_inputs(seed_of("func.jvp"), 2, 8, 6, 2, 3, torch.float64)
    tang = tuple(_tangents(3, h, R, W, b, True, True))
    f = lambda *a: reft_ext.loreft(a[0], pos, *a[1:])   # noqa: E731
    fr = lambda *a: loreft_reference(a[0], pos, *a[1:])  # noqa: E731
    _, t = torch.func.jvp(f, (h, R, W, b), tang)
    _, te = torch.func.jvp(fr, (h, R, W, b), tang)
    torch.testing.assert_close(t, te, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="loreft_: torch.func transforms"):
        torch.func.jvp(lambda x: reft_ext.loreft_(x.clone(), pos, R, W, b), (h,), tang[:1])


# ------------------------------------------------------------------ checkpointing

def _two_forward_grads(model, batches, ckpt):
    """loss = chosen-style + rejected-style, one backward; the interventions' gradients."""
    model.zero_grad(set_to_none=True)
    model.checkpoint_layers = ckpt
    loss = 0
    for k, (ids, pos) in enumerate(batches):
        logits = model(ids, reft_positions=pos)
        loss = loss + (k + 1.0) * logits.pow(2).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.reft_interventions.named_parameters()}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("lengths", ["same-length", "different-lengths"])
def test_checkpointed_layer_calls_use_their_own_forwards_positions(reentrant, lengths):
    """Layer-call checkpointing (plain torch, transformers < 5.23): with two forwards before
    one backward, each recompute edits the rows of its own forward."""
    from patch_helpers import PlainDecoder
    import torch.utils.checkpoint as cp
    torch.manual_seed(0)
    model = PlainDecoder()
    torch.manual_seed(1)
    reft_ext.patch(model, [0, 1, 2], rank=4)
    # Reentrant checkpointing needs an input that requires grad to backpropagate at all.
    model.embed.weight.requires_grad_(True)
    T2 = 7 if lengths == "same-length" else 5
    batches = [(torch.randint(0, 90, (2, 7)), torch.tensor([[0, 3, 6], [1, 2, -1]])),
               (torch.randint(0, 90, (2, T2)), torch.tensor([[4, -1, -1], [0, 1, 2]]))]
    plain = _two_forward_grads(model, batches, ckpt=False)
    orig = cp.checkpoint

    def checkpoint(fn, *args, use_reentrant=None, **kw):
        return orig(fn, *args, use_reentrant=reentrant, **kw)
    cp.checkpoint = checkpoint
    try:
        with torch.utils.checkpoint.set_checkpoint_early_stop(True):
            ckpt = _two_forward_grads(model, batches, ckpt=True)
    finally:
        cp.checkpoint = orig
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)


def test_checkpointed_transformers_two_forwards_one_backward():
    """A chosen/rejected-style loss from two forwards of different lengths and masks, one
    backward, on a gradient-checkpointed transformers model: the gradients of the same
    computation without checkpointing. (transformers >= 5.23 checkpoints layer.forward;
    CI runs this file again on 4.57, which checkpoints the layer call.)"""
    import copy
    from patch_helpers import batch, build, enable_checkpointing
    model, _ = build("llama")
    model.train()
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    ckpt = enable_checkpointing(copy.deepcopy(model))
    batches = [batch(B=3, T=9, left=False, seed=1), batch(B=2, T=6, left=False, seed=2)]
    grads = []
    for m in (model, ckpt):
        loss = 0
        for k, (ids, mask) in enumerate(batches):
            labels = ids.masked_fill(mask == 0, -100)
            loss = loss + (1.0 - 2 * k) * m(input_ids=ids, attention_mask=mask, labels=labels,
                                            use_cache=False).loss
        loss.backward()
        grads.append({n: p.grad for n, p in m.reft_interventions.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 6
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_checkpoint_recompute_refuses_an_ambiguous_input():
    """Two pending forwards that fed a layer the very same tensor with different positions:
    the recompute cannot tell them apart, so it raises instead of guessing."""
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            return x
    torch.manual_seed(0)
    model = reft_ext.patch(Stack(), [0], rank=2)
    x = torch.randn(1, 4, 6, requires_grad=True)
    loss = model(x, reft_positions=torch.tensor([[0]])).sum() + \
        model(x, reft_positions=torch.tensor([[1]])).sum()
    with pytest.raises(RuntimeError, match="cannot tell which forward"):
        loss.backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_recompute_of_a_disabled_forward_stays_unedited(reentrant, monkeypatch):
    """A forward under reft_ext.disabled(), then an edited one, then one backward: the first
    forward's recompute runs outside disabled() and must not edit either (gradients equal
    the unchecked run's)."""
    from patch_helpers import PlainDecoder
    torch.manual_seed(0)
    model = PlainDecoder()
    reft_ext.patch(model, [0, 1], rank=2)
    for p in [*model.blocks.parameters(), model.embed.weight]:
        p.requires_grad_(True)    # (reentrant checkpointing needs an input requiring grad)
    orig = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda fn, *a, use_reentrant=None, **kw:
                        orig(fn, *a, use_reentrant=reentrant, **kw))
    ids = torch.randint(0, 90, (2, 6))
    grads = []
    for ckpt in (False, True):
        model.zero_grad(set_to_none=True)
        model.checkpoint_layers = ckpt
        with reft_ext.disabled(model):
            out = model(ids)
        out2 = model(ids[:, :4])
        (out.pow(2).mean() + out2.pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.blocks.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-6, atol=1e-7, msg=k)


def test_positions_moved_once_per_forward():
    """patch() moves CPU positions to a layer's device once per forward and hands every
    layer there the same tensor (on CUDA the op then validates it once per step)."""
    from reft_ext.model.hooks import _on_device
    st = type("S", (), {"on_device": {}})()
    pos = torch.tensor([[0, 1]])
    a = _on_device(st, pos, torch.device("meta"))
    b = _on_device(st, pos, torch.device("meta"))
    assert a is b and a.device.type == "meta"
    other = torch.tensor([[2, 3]])
    assert _on_device(st, other, torch.device("meta")) is not a


def test_every_patched_layer_gets_the_same_positions_tensor():
    """One positions tensor per forward for all patched layers (the CUDA op's validation
    cache keys on it: one check and one sync per step instead of one per layer)."""
    from patch_helpers import PlainDecoder
    torch.manual_seed(0)
    model = reft_ext.patch(PlainDecoder(), [0, 1, 2], rank=2, positions="f1+l1")
    seen = []
    for mod in reft_ext.interventions(model).values():
        mod.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    for _ in range(2):
        seen.clear()
        model(torch.randint(0, 90, (2, 6)))
        assert len(seen) == 3 and all(p is seen[0] for p in seen)
