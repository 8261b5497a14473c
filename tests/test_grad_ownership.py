"""The backward writes dx into the incoming gradient only when autograd holds it alone.

functional._owned decides it from reference counts (AccumulateGrad's own rule). Each
scenario below builds a graph where the gradient reaching the op is, or is not, held by
someone else, and checks: the gradients equal the float64 reference's in the same graph,
every tensor someone else holds keeps its value, and the path taken (in place or a copy)
is the expected one, so a regression to always copying fails too.
"""
from __future__ import annotations

import pytest
import torch

import reft_ext
from reft_ext import functional
from reft_ext.reference import loreft_reference
from _util import assert_bitwise_equal, make_inputs, seed_of

OPS = [pytest.param(False, id="loreft"), pytest.param(True, id="loreft_")]


class _Spy:
    """Stands in for torch.ops.reft_ext in functional.py and records the ops called."""

    def __init__(self, calls):
        self.calls = calls

    def __getattr__(self, name):
        op = getattr(torch.ops.reft_ext, name)

        def call(*args):
            self.calls.append(name)
            return op(*args)
        return call


@pytest.fixture
def calls(monkeypatch):
    recorded = []
    monkeypatch.setattr(functional, "_ops_ns", _Spy(recorded))
    return recorded


def _graph(op, scenario, inplace, h, pos, R, W, b, w):
    """Runs one scenario; returns (h.grad, dR, dW, db, {name: tensor held by someone})."""
    leaf = h.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (R, W, b)]
    x = leaf * 1.0
    held = {}
    if scenario == "consumer-pending":  # created before y: its backward runs after ours
        other = x * 3.0 if not inplace else leaf * 3.0
    y = op(x, pos, *params)
    if scenario == "downstream-op":
        (y * w).sum().backward()
    elif scenario == "consumer-pending":
        ((y + other) * w).sum().backward()
    elif scenario == "consumer-done":  # created after y: its backward runs first
        ((y + leaf * 3.0) * w).sum().backward()
    elif scenario == "hook-stash":
        stash = []
        y.register_hook(stash.append)
        (y * w).sum().backward()
        held["stashed"] = stash[0]
    elif scenario == "retain-grad":
        y.retain_grad()
        (y * w).sum().backward()
        held["y.grad"] = y.grad
    elif scenario == "caller":
        g = w.clone()
        y.backward(g)
        held["caller's grad"] = g
    elif scenario == "view":
        (y.view(-1, y.shape[-1]) * w.view(-1, w.shape[-1])).sum().backward()
    elif scenario == "expanded":
        y.sum().backward()
    elif scenario == "create-graph":
        grads = torch.autograd.grad((y * w * y).sum(), [leaf, *params], create_graph=True)
        return (*grads, held)
    return (leaf.grad, *(p.grad for p in params), held)


# scenario -> whether the CPU backward may write into the gradient
SCENARIOS = {"downstream-op": True, "consumer-done": True, "retain-grad": True,
             "consumer-pending": False, "hook-stash": False, "caller": False, "view": False,
             "expanded": False, "create-graph": False}


@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gradient_written_in_place_only_when_owned(calls, inplace, scenario):
    h, pos, R, W, b, w = make_inputs(seed_of("own", scenario, inplace), 2, 9, 6, 2, 3,
                                     torch.float64)
    op = reft_ext.loreft_ if inplace else reft_ext.loreft
    *fused, held = _graph(op, scenario, inplace, h, pos, R, W, b, w)
    *ref, held_ref = _graph(loreft_reference, scenario, inplace, h, pos, R, W, b, w)
    for name, f, e in zip(("dh", "dR", "dW", "db"), fused, ref):
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12, msg=name)
    for name, t in held.items():  # what others hold is what the reference left them
        assert_bitwise_equal(t.detach(), held_ref[name].detach(), name)
    assert ("loreft_bwd_" in calls) == SCENARIOS[scenario], calls


def test_hook_stash_scenario_detects_a_wrong_ownership_rule(monkeypatch):
    """The check above can fail: with a rule that ignores the reference counts, the
    stashed gradient is overwritten."""
    monkeypatch.setattr(functional, "_owned", lambda name, grad, probe, x: grad.is_contiguous())
    h, pos, R, W, b, w = make_inputs(seed_of("own-mutant"), 2, 9, 6, 2, 3, torch.float64)
    *_, held = _graph(reft_ext.loreft, "hook-stash", False, h, pos, R, W, b, w)
    assert not torch.equal(held["stashed"], w)


def test_calibration_found_owned_counts():
    reft_ext.loreft(*make_inputs(1, 1, 3, 2, 1, 1)[:5])  # ensures calibration ran
    assert set(functional._REFS_OWNED) == {"loreft", "loreft_"}
    for refs in functional._REFS_OWNED.values():
        assert refs[1] == 1  # the tensor itself has no other owner


@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("P,compact", [(3, True), (7, False)])
def test_params_only_backward_uses_selected_rows(calls, inplace, P, compact):
    """h not requiring grad (the first edited layer of a frozen model): the backward runs on
    the (B, P, d) selected rows instead of copying the (B, T, d) gradient, when P <= T/2."""
    h, pos, R, W, b, w = make_inputs(seed_of("params-only", P, inplace), 2, 12, 6, 2, P,
                                     torch.float64, empty_frac=0.3)
    shapes = []
    spy_bwd = functional._ops_ns.__getattr__("loreft_bwd")

    class _Shapes(_Spy):
        def __getattr__(self, name):
            if name == "loreft_bwd":
                return lambda g, *a: (shapes.append(tuple(g.shape)), spy_bwd(g, *a))[1]
            return super().__getattr__(name)
    functional._ops_ns = _Shapes(calls)
    results = []
    for op in ((reft_ext.loreft_ if inplace else reft_ext.loreft), loreft_reference):
        params = [t.clone().requires_grad_() for t in (R, W, b)]
        y = op(h.clone(), pos, *params)
        (y * w).sum().backward()
        results.append([p.grad for p in params])
    for name, f, e in zip(("dR", "dW", "db"), *results):
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12, msg=name)
    assert shapes == [(2, P, 6) if compact else (2, 12, 6)]


def test_no_in_place_write_under_a_dispatch_mode(calls):
    """A dispatch mode may keep the tensors it sees: then the gradient is always copied."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Keep(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    h, pos, R, W, b, w = make_inputs(seed_of("own-mode"), 2, 9, 6, 2, 3, torch.float64)
    with Keep():
        *fused, _ = _graph(reft_ext.loreft, "downstream-op", False, h, pos, R, W, b, w)
    *ref, _ = _graph(loreft_reference, "downstream-op", False, h, pos, R, W, b, w)
    for name, f, e in zip(("dh", "dR", "dW", "db"), fused, ref):
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12, msg=name)
    assert "loreft_bwd_" not in calls and "loreft_bwd" in calls


def test_calibration_ignores_the_users_default_dtype(monkeypatch):
    monkeypatch.setattr(functional, "_REFS_OWNED", {})
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        functional._calibrate()
    finally:
        torch.set_default_dtype(prev)
    assert set(functional._REFS_OWNED) == {"loreft", "loreft_"}


def test_plain_eager_cpu_calls_skip_the_dispatcher(monkeypatch):
    """loreft_'s in-place ops on plain CPU tensors go straight to their CPU kernels; under a
    dispatch mode, which must see every op, they go through the dispatcher. Same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dispatched = []
    monkeypatch.setattr(functional, "_dispatcher", _Spy(dispatched))
    h, pos, R, W, b, w = make_inputs(seed_of("direct"), 2, 9, 6, 2, 3, torch.float64)

    def step():
        leaf = h.clone().requires_grad_()
        params = [t.clone().requires_grad_() for t in (R, W, b)]
        y = reft_ext.loreft_(leaf.clone(), pos, *params)
        (y * w).sum().backward()
        return y.detach(), leaf.grad, *(p.grad for p in params)

    direct = step()
    assert dispatched == []
    with Seen() as mode:
        via = step()
    assert "loreft_fwd_" in dispatched and "reft_ext.loreft_fwd_.default" in mode.ops
    for name, a, e in zip(("out", "dh", "dR", "dW", "db"), direct, via):
        assert_bitwise_equal(a, e, name)
