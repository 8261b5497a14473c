"""Which backward path runs: the compact (B, P, d) problem when few rows are edited, the
sparse row correction of h's gradient only for plain eager tensors, the direct CPU kernel
calls only outside dispatch modes. Values always against the reference (float64).
"""
from __future__ import annotations

import pytest
import torch

import reft_ext
from reft_ext.ops import autograd
from reft_ext.ops.reference import loreft_reference
from _util import assert_bitwise_equal, make_inputs, seed_of

OPS = [pytest.param(False, id="loreft"), pytest.param(True, id="loreft_")]


class _Spy:
    """Stands in for torch.ops.reft_ext in ops/autograd.py and records the ops called."""

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
    monkeypatch.setattr(autograd, "_ops_ns", _Spy(recorded))
    return recorded


@pytest.mark.parametrize("inplace", OPS)
@pytest.mark.parametrize("h_grad", [False, True], ids=["params-only", "h-too"])
@pytest.mark.parametrize("P,rows", [(3, True), (7, False)])
def test_few_rows_backward_reads_selected_rows(calls, inplace, h_grad, P, rows):
    """P <= T/2: the backward is loreft_bwd_rows (reads the B*P selected rows of g in place,
    returns their corrections) instead of loreft_bwd (a (B, T, d) copy of g), whether or not
    h needs a gradient (the first edited layer of a frozen model does not)."""
    h, pos, R, W, b, w = make_inputs(seed_of("rows", P, inplace, h_grad), 2, 12, 6, 2, P,
                                     torch.float64, empty_frac=0.3)
    results = []
    for op in ((reft_ext.loreft_ if inplace else reft_ext.loreft), loreft_reference):
        leaf = h.clone().requires_grad_(h_grad)
        params = [t.clone().requires_grad_() for t in (R, W, b)]
        y = op(leaf * 1.0, pos, *params)
        (y * w).sum().backward()
        results.append([leaf.grad, *(p.grad for p in params)])
    for name, f, e in zip(("dh", "dR", "dW", "db"), *results):
        if not h_grad and name == "dh":
            assert f is None and e is None
            continue
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12, msg=name)
    assert [c for c in calls if "bwd" in c] == ["loreft_bwd_rows" if rows else "loreft_bwd"]


@pytest.mark.parametrize("inplace", OPS)
def test_dense_gradient_under_a_dispatch_mode(inplace):
    """A dispatch mode sees every op and may hold the tensors it sees: h's gradient is then
    a dense copy (no sparse correction reaches the mode), with the reference's values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Layouts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sparse = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.sparse += sum(isinstance(t, torch.Tensor) and t.is_sparse
                               for t in (out if isinstance(out, (tuple, list)) else [out]))
            return out

    h, pos, R, W, b, w = make_inputs(seed_of("mode", inplace), 2, 9, 6, 2, 3, torch.float64)
    results = []
    for op in ((reft_ext.loreft_ if inplace else reft_ext.loreft), loreft_reference):
        leaf = h.clone().requires_grad_()
        params = [t.clone().requires_grad_() for t in (R, W, b)]
        with Layouts() as mode:
            (op(leaf * 1.0, pos, *params) * w).sum().backward()
        results.append([leaf.grad, *(p.grad for p in params)])
        assert mode.sparse == 0
    for name, f, e in zip(("dh", "dR", "dW", "db"), *results):
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12, msg=name)


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
    monkeypatch.setattr(autograd, "_dispatcher", _Spy(dispatched))
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
    # dh is g + (dx - g) at the edited rows on the eager path (sparse correction) and dx
    # written into a copy under the mode: one rounding apart; the rest is the same kernels.
    for name, a, e in zip(("out", "dR", "dW", "db"), direct[:1] + direct[2:], via[:1] + via[2:]):
        assert_bitwise_equal(a, e, name)
    torch.testing.assert_close(direct[1], via[1], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("env, path", [("1", "rows"), ("0", "dense")])
def test_sparse_grad_environment_switch(env, path):
    """REFT_EXT_SPARSE_GRAD=0 (read at import) turns the sparse gradient of h off: a plain
    eager backward with few edited rows then takes the dense path, same values."""
    import os
    import subprocess
    import sys

    code = """
import torch, reft_ext
from reft_ext.ops import _grad_reuse
from reft_ext.ops.reference import loreft_reference
g = torch.randn(2, 12, 6, dtype=torch.float64)
pos = torch.tensor([[0, 5, -1], [3, 7, 11]])
with torch.no_grad():
    print(_grad_reuse.backward_path(g, pos, True, True, True))
grads = []
for op in (reft_ext.loreft, loreft_reference):
    h = torch.randn(2, 12, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    leaf = h.requires_grad_()
    R, W, b = (torch.randn(*s, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
               for s in ((2, 6), (2, 6), (2,)))
    (op(leaf * 1.0, pos, R, W, b) * g).sum().backward()
    grads.append(leaf.grad)
torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, REFT_EXT_SPARSE_GRAD=env), timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == path   # (an editable build may print first)
