"""torch.library.opcheck of the three ops, and torch.compile(fullgraph=True) of the public
functions (no graph break; same values and gradients as eager)."""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import reft_ext
from _util import DEVICES, assert_bitwise_equal, make_inputs, seed_of

ops = torch.ops.reft_ext

# Dynamo (torch 2.13, _dynamo/side_effects.py) instantiates torch.autograd.Function() to
# trace an autograd.Function's ctx, inside warnings.catch_warnings(record=True); that does
# not override pytest's filterwarnings=error, so its DeprecationWarning would fail the test.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:<class 'torch\.autograd\.function\.Function'> should not be instantiated"
    r":DeprecationWarning")

# (B, T, d, r, P, h dtype, (R, W, b) dtypes, positions dtype, fraction of empty slots)
SAMPLES = {
    "f32_int64": (2, 7, 16, 4, 5, torch.float32, None, torch.int64, 0.3),
    "bf16_fp32params_int32": (3, 6, 12, 3, 8, torch.bfloat16, (torch.float32,) * 3,
                              torch.int32, 0.3),  # P > T: -1s
    "f16_mixed_int32": (2, 5, 9, 2, 3, torch.float16, (torch.float32, torch.float16,
                                                      torch.float16), torch.int32, 0.0),
    "f64_B1_d1": (1, 4, 1, 1, 2, torch.float64, None, torch.int64, 0.0),
    "f32_P0": (2, 5, 8, 2, 0, torch.float32, None, torch.int64, 0.0),
}


def _sample(name, device):
    B, T, d, r, P, hd, pd, pos_dtype, empty = SAMPLES[name]
    h, pos, R, W, b, g = make_inputs(seed_of("opcheck", name), B, T, d, r, P, hd, pd,
                                     pos_dtype, empty)
    return [t.to(device) for t in (h, pos, R, W, b, g)]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck_loreft_fwd(device, sample):
    h, pos, R, W, b, _ = _sample(sample, device)
    opcheck(ops.loreft_fwd.default, (h, pos, R, W, b))
    # Strided h and parameters.
    opcheck(ops.loreft_fwd.default, (h.transpose(0, 1).contiguous().transpose(0, 1), pos,
                                     R.T.contiguous().T, W, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck_loreft_fwd_inplace(device, sample):
    """The mutating op. opcheck's test_aot_dispatch_dynamic runs the op twice on the *same*
    h (eager, then compiled) and compares the outputs; with save_rows=True the output is the
    pre-edit rows, which differ between the two runs for any real edit. So: all other checks
    on a real edit, and the full opcheck (AOT dispatch included) on an edit that is exactly
    the identity (W = R, b = 0 gives z = 0 bitwise), and with save_rows=False."""
    h, pos, R, W, b, _ = _sample(sample, device)
    opcheck(ops.loreft_fwd_.default, (h.clone(), pos, R, W, b, True),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    opcheck(ops.loreft_fwd_.default, (h.clone(), pos, R, W, b, False))
    opcheck(ops.loreft_fwd_.default, (h.clone(), pos, R, R.to(W.dtype), torch.zeros_like(b),
                                      True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck_loreft_bwd(device, sample):
    h, pos, R, W, b, g = _sample(sample, device)
    opcheck(ops.loreft_bwd.default, (g, pos, h, False, R, W, b))
    saved = torch.randn(h.shape[0], pos.shape[1], h.shape[2]).to(h)
    opcheck(ops.loreft_bwd.default, (g, pos, saved, True, R, W, b))
    # Non-contiguous grad and parameters: the fake kernel must report the real strides.
    opcheck(ops.loreft_bwd.default, (g.transpose(0, 1).contiguous().transpose(0, 1), pos, h,
                                     False, R.T.contiguous().T, W.T.contiguous().T, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sample", list(SAMPLES))
def test_opcheck_loreft_bwd_rows(device, sample):
    h, pos, R, W, b, g = _sample(sample, device)
    opcheck(ops.loreft_bwd_rows.default, (g, pos, h, False, R, W, b))
    saved = torch.randn(h.shape[0], pos.shape[1], h.shape[2]).to(h)
    opcheck(ops.loreft_bwd_rows.default, (g, pos, saved, True, R, W, b))
    opcheck(ops.loreft_bwd_rows.default, (g.transpose(0, 1).contiguous().transpose(0, 1), pos,
                                          h, False, R.T.contiguous().T, W.T.contiguous().T, b))


def _assert_same_but_dh(name, compiled, eager, what):
    """Bitwise, except h's gradient at the edited rows: eager (P <= T/2) returns it as g plus
    a sparse correction dx - g that autograd adds (ops/_grad_reuse.py), a compiled graph as dx
    written into a copy of g; the two are one rounding apart there."""
    if name != "dh":
        return assert_bitwise_equal(compiled, eager, what)
    eps = torch.finfo(eager.dtype).eps
    torch.testing.assert_close(compiled, eager, rtol=eps,
                               atol=2 * eps * eager.abs().max().item(), msg=what)


def _model(op):
    def f(h, pos, R, W, b):
        x = h * 1.5 + 0.25  # a non-leaf, so loreft_ may edit it in place
        y = op(x, pos, R, W, b)
        return (y * y).sum(dim=-1), y
    return f


def _run(fn, h, pos, R, W, b, g):
    leaf = h.clone().requires_grad_()
    params = [t.clone().requires_grad_() for t in (R, W, b)]
    s, y = fn(leaf, pos, *params)
    (s.sum() + (y * g).sum()).backward()
    return [s.detach(), y.detach(), leaf.grad] + [p.grad for p in params]


BACKENDS = [
    pytest.param("aot_eager", id="aot_eager"),
    # Inductor compiles C++ for the surrounding ops: tens of seconds on a cold cache.
    # Inductor's first use imports torch modules that call the deprecated
    # torch.jit.script_method: a torch-internal warning, not ours.
    pytest.param("inductor", id="inductor", marks=[
        pytest.mark.slow,
        pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script_method` is deprecated"
                                   r":DeprecationWarning")]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["loreft", "loreft_"])
def test_compile_fullgraph_matches_eager(device, backend, op):
    # aot_eager runs the eager kernels: bf16 with fp32 parameters must match bit for bit.
    # Inductor fuses the surrounding elementwise ops in float32 without rounding between
    # them (x = h * 1.5 + 0.25 lands on the other side of a bf16 tie now and then), so it is
    # compared in float32, with assert_close's float32 tolerances.
    sample = "bf16_fp32params_int32" if backend == "aot_eager" else "f32_int64"
    h, pos, R, W, b, g = _sample(sample, device)
    fn = _model(getattr(reft_ext, op))
    eager = _run(fn, h, pos, R, W, b, g)
    compiled = _run(torch.compile(fn, backend=backend, fullgraph=True), h, pos, R, W, b, g)
    names = ("s", "y", "dh", "dR", "dW", "db")
    if backend == "aot_eager":  # the same kernels in the same order: the same bits
        for name, c, e in zip(names, compiled, eager):
            _assert_same_but_dh(name, c, e, f"compiled {name}")
    else:
        for name, c, e in zip(names, compiled, eager):
            torch.testing.assert_close(c, e, msg=lambda m, name=name: f"compiled {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_shapes(device):
    """One dynamic-shape graph serves several (B, T, P, d, r) without failing or breaking."""
    fn = _model(reft_ext.loreft)
    cfn = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for k, shape in enumerate([(2, 7, 16, 4, 5), (3, 9, 20, 2, 6), (1, 4, 16, 4, 2)]):
        h, pos, R, W, b, g = (t.to(device) for t in make_inputs(seed_of("dyn", k), *shape))
        for name, c, e in zip(("s", "y", "dh", "dR", "dW", "db"), _run(cfn, h, pos, R, W, b, g),
                              _run(fn, h, pos, R, W, b, g)):
            _assert_same_but_dh(name, c, e, f"dynamic-shape compiled {name} for shape {shape}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["loreft", "loreft_"])
def test_compiled_validation_still_raises(device, op):
    """Metadata checks run while tracing; value checks of the positions run in the kernel,
    so a compiled function still refuses out-of-range and repeated positions."""
    h, pos, R, W, b, _ = _sample("f32_int64", device)
    cfn = torch.compile(_model(getattr(reft_ext, op)), backend="aot_eager", fullgraph=True)
    cfn(h, pos, R, W, b)  # compile with good positions first
    bad = pos.clone()
    bad[0, 0] = h.shape[1]
    with pytest.raises(ValueError, match=rf"reft_ext\.{op}: positions\[0, 0\] = 7 is out of range"):
        cfn(h, bad, R, W, b)
    bad = pos.clone()
    bad[1, :2] = 3
    with pytest.raises(ValueError, match=r"positions\[1\] repeats token index 3"):
        cfn(h, bad, R, W, b)
    with pytest.raises(Exception, match=r"R must have shape \(r, d\)"):
        cfn(h, pos, R[:, :3], W, b)
