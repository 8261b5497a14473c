"""The six intervention modules (LoReFT, NoReFT, ConsReFT, LobiReFT, DiReFT, NodiReFT)
and the QR orthonormalisation.

Each type is checked against its own formula written out here from its parameters
(TYPE_FORMULAS), never through the module's kernel_params(): the forward in float32 /
bfloat16 / float64 hidden states, every parameter's gradient, fused vs reference backend,
dropout, init, and training through patch().
"""
from __future__ import annotations

import pytest
import torch

import reft_ext
from reft_ext.modules import (INTERVENTIONS, ConsReFT, DiReFT, LobiReFT, LoReFT, NodiReFT,
                              NoReFT, orthonormal_rows)
from reft_ext.ops.reference import loreft_reference
from _util import assert_within_rule


def _h(B=3, T=7, d=16, dtype=torch.float32):
    return torch.randn(B, T, d, dtype=dtype)


def _pos():
    return torch.tensor([[0, 6, -1], [3, -1, -1], [1, 2, 5]])


def test_orthonormal_rows_properties():
    A = torch.randn(5, 40, dtype=torch.float64)
    R = orthonormal_rows(A)
    torch.testing.assert_close(R @ R.T, torch.eye(5, dtype=torch.float64))
    # same row space: A's rows are reproduced by projecting on R
    torch.testing.assert_close(A @ R.T @ R, A)
    # scale-invariant; identity on rows that are already orthonormal (sign fix: Gram-Schmidt)
    torch.testing.assert_close(orthonormal_rows(1e-3 * A), R)
    torch.testing.assert_close(orthonormal_rows(R), R)
    torch.testing.assert_close(orthonormal_rows(-R), -R)
    assert R.is_contiguous()
    with pytest.raises(ValueError, match="r <= d"):
        orthonormal_rows(torch.randn(5, 4))


def test_orthonormal_rows_gradcheck():
    A = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(orthonormal_rows, (A,))


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_loreft_forward_and_grads_match_reference(inplace, backend):
    torch.manual_seed(0)
    m = LoReFT(16, 4, backend=backend)
    h = _h()
    base = h.clone()
    x = h.clone().requires_grad_(True)
    out = m(x.clone() if inplace else x, _pos(), inplace=inplace)
    R = m.R.detach().requires_grad_(True)
    W = m.W.detach().clone().requires_grad_(True)
    b = m.b.detach().clone().requires_grad_(True)
    x2 = base.clone().requires_grad_(True)
    ref = loreft_reference(x2, _pos(), R, W, b)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(m.weight.grad, W.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)
    # rotate_raw's gradient is R's gradient pulled back through the QR
    (expect,) = torch.autograd.grad(orthonormal_rows(m.rotate_raw), m.rotate_raw, R.grad)
    torch.testing.assert_close(m.rotate_raw.grad, expect)


def test_loreft_inplace_returns_h_and_out_of_place_leaves_h():
    m = LoReFT(16, 2)
    h = _h()
    h0 = h.clone()
    out = m(h, _pos(), inplace=False)
    assert torch.equal(h, h0) and out is not h
    with torch.no_grad():
        assert m(h, _pos()) is h
    torch.testing.assert_close(h, out, rtol=0, atol=0)


def test_loreft_init():
    torch.manual_seed(3)
    a = LoReFT(64, 8)
    torch.manual_seed(3)
    b = LoReFT(64, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    torch.testing.assert_close(a.R @ a.R.T, torch.eye(8), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.R, a.rotate_raw)       # init is already orthonormal
    assert a.W.abs().max() <= 1 / 8 and a.b.abs().max() <= 1 / 8
    assert LoReFT(8, 2, dtype=torch.float64).W.dtype == torch.float64


def test_loreft_stays_orthonormal_under_adamw_weight_decay():
    """1000 AdamW steps with weight decay 0.01: R orthonormal to 1e-5, nothing collapses."""
    torch.manual_seed(0)
    d, r = 256, 8
    m = LoReFT(d, r)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    R0 = m.R.detach().clone()
    target = torch.randn(16, d)
    x = torch.randn(16, 1, d)
    pos = torch.zeros(16, 1, dtype=torch.long)
    for _ in range(1000):
        opt.zero_grad()
        loss = (m(x, pos, inplace=False)[:, 0] - target).pow(2).mean()
        loss.backward()
        opt.step()
    R = m.R.detach()
    assert (R @ R.T - torch.eye(r)).abs().max() < 1e-5
    assert m.rotate_raw.norm() > 0.1                     # the raw parameter did not collapse
    assert (R - R0).abs().max() > 0.1                    # and R did train


def _assert_dropout_on_the_edit(m, h, pos, no_drop):
    """Training-mode dropout (p = 0.5) of m zeroes about half the elements of the edit at
    the edited rows and doubles the rest; unselected rows stay h. no_drop: m's eval output."""
    m.train()
    out = m(h, pos, inplace=False)
    sel = torch.zeros(h.shape[:2], dtype=torch.bool)
    sel[(pos >= 0).nonzero(as_tuple=True)[0], pos[pos >= 0]] = True
    assert torch.equal(out[~sel], h[~sel])
    delta, full = (out - h)[sel], (no_drop - h)[sel]
    dropped = delta == 0
    assert 0.2 < dropped.float().mean() < 0.8
    torch.testing.assert_close(delta[~dropped], 2 * full[~dropped])


def test_dropout_acts_on_the_edit_of_edited_rows():
    torch.manual_seed(0)
    m = LoReFT(16, 4, dropout=0.5)
    h = _h()
    pos = _pos()
    m.eval()
    no_drop = m(h, pos, inplace=False)
    torch.testing.assert_close(no_drop, LoReFT.forward(m, h, pos, inplace=False))
    _assert_dropout_on_the_edit(m, h, pos, no_drop)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoReFT(4, 5)
    with pytest.raises(ValueError, match="rank"):
        NodiReFT(4, 0)
    with pytest.raises(ValueError, match="dropout"):
        LoReFT(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        LoReFT(4, 2, backend="cuda")
    with pytest.raises(ValueError, match="d must"):
        LoReFT(0, 1)


def test_callable_modules_do_not_shadow():
    import reft_ext.model.patch as mod_patch
    import reft_ext.model.positions as mod_p
    import reft_ext.modules as mod_i
    assert isinstance(mod_i, type(reft_ext)) and isinstance(mod_p, type(reft_ext))
    assert isinstance(mod_patch, type(reft_ext))
    assert mod_i.LoReFT is LoReFT and mod_p.parse_positions is reft_ext.parse_positions
    # reft_ext.interventions(model) and reft_ext.positions(model, t) are plain functions:
    # no module of the package carries their names, so nothing can shadow them.
    assert callable(reft_ext.interventions) and callable(reft_ext.positions)
    assert not isinstance(reft_ext.interventions, type(reft_ext))
    assert not isinstance(reft_ext.positions, type(reft_ext))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loreft_16bit_parameters(dtype):
    # torch's QR has no 16-bit kernel: init and R must still work, R orthonormal to the
    # dtype's precision, and the forward/backward run on a model of the same dtype.
    torch.manual_seed(0)
    m = LoReFT(64, 4, dtype=dtype)
    R = m.R
    assert R.dtype == dtype and R.shape == (4, 64)
    err = (R.float() @ R.float().T - torch.eye(4)).abs().max().item()
    assert err < 8 * torch.finfo(dtype).eps
    h = torch.randn(2, 5, 64, dtype=dtype).requires_grad_()
    pos = torch.tensor([[0, 3], [4, -1]])
    m(h.clone(), pos).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


# ---- every type against its own formula -------------------------------------------
# Phi at the selected rows x (N, d), written from the module's parameters by name
# (p: {parameter name: tensor}), as in the module docstring's table, NOT through
# kernel_params(): these are what the kernel mapping has to reproduce. R =
# orthonormal_rows(rotate_raw) is the types' parametrisation (tested above), not the mapping.

def _R(p):
    return orthonormal_rows(p["rotate_raw"])


TYPE_FORMULAS = {
    "loreft": lambda x, p: x + (x @ p["weight"].T + p["bias"] - x @ _R(p).T) @ _R(p),
    "noreft": lambda x, p: x + (x @ p["weight"].T + p["bias"]
                                - (x @ p["proj"].T + p.get("proj_bias", 0.0))) @ p["proj"],
    "consreft": lambda x, p: x + (p["bias"] - x @ _R(p).T) @ _R(p),
    "lobireft": lambda x, p: x + p["bias"] @ _R(p),
    "direft": lambda x, p: x + (x @ p["weight"].T + p["bias"]) @ _R(p),
    "nodireft": lambda x, p: x + (x @ p["weight"].T + p["bias"]) @ p["proj"],
}

# (registered name, construction options); NoReFT also with pyreft's add_bias
TYPES = [pytest.param(k, {}, id=k) for k in INTERVENTIONS]
TYPES.insert(2, pytest.param("noreft", {"add_bias": True}, id="noreft-add_bias"))
D_, R4 = 24, 4


def test_every_registered_type_has_a_formula_here():
    assert set(TYPE_FORMULAS) == set(INTERVENTIONS)
    assert [c.__name__ for c in INTERVENTIONS.values()] == [
        "LoReFT", "NoReFT", "ConsReFT", "LobiReFT", "DiReFT", "NodiReFT"]


def _module(kind, opts, dtype=torch.float32, seed=0, **kw):
    """A `kind` module with fresh random parameters (not its init, where W and b are tiny
    and c may be absent): rotate_raw, biases ~ N(0, 1), matrices ~ N(0, 1/d)."""
    torch.manual_seed(seed)
    m = INTERVENTIONS[kind](D_, R4, dtype=dtype, **opts, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            scale = 1.0 if p.dim() == 1 or n == "rotate_raw" else D_ ** -0.5
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return m


def _formula(kind, h, pos, p):
    """h with TYPE_FORMULAS[kind] applied at the selected rows, evaluated in p's dtype
    (h converted to it), returned in h's dtype; differentiable in h and p."""
    work = next(iter(p.values())).dtype
    bi, pj = (pos >= 0).nonzero(as_tuple=True)
    t = pos[bi, pj]
    hw = h.to(work)
    out = hw.clone()
    out[bi, t] = TYPE_FORMULAS[kind](hw[bi, t], p)
    return out.to(h.dtype)


def _inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 7, D_, generator=g).to(dtype)
    return h, _pos(), torch.randn(3, 7, D_, generator=g).to(dtype)


@pytest.mark.parametrize("h_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_forward_matches_its_formula(kind, opts, h_dtype):
    """Forward = the type's formula (float64 truth), under the suite's tolerance rule with
    PyTorch's own error taken from the same formula in the working dtype; unselected rows
    bitwise unchanged. float32 parameters on float32 / bfloat16 h (patch()'s default),
    float64 on float64."""
    pdt = torch.float64 if h_dtype == torch.float64 else torch.float32
    m = _module(kind, opts, pdt, seed=1)
    h, pos, _ = _inputs(h_dtype, seed=2)
    with torch.no_grad():
        ours = m(h.clone(), pos, inplace=False)
        p = dict(m.named_parameters())
        ref64 = _formula(kind, h.double(), pos, {n: t.double() for n, t in p.items()})
        same = _formula(kind, h, pos, {n: t.detach() for n, t in p.items()})
    assert_within_rule(f"{kind} forward", ours, ref64, same)
    sel = torch.zeros(h.shape[:2], dtype=torch.bool)
    sel[(pos >= 0).nonzero(as_tuple=True)[0], pos[pos >= 0]] = True
    assert torch.equal(ours[~sel], h[~sel])
    assert (ours[sel].double() - h[sel].double()).abs().max() > 0.1     # not a no-op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_gradients_match_autograd_of_its_formula(kind, opts, dtype):
    """d(out . g)/d(h and every parameter) through the module (fused kernel, kernel_params
    mapping, QR) = autograd through the type's formula, under the tolerance rule."""
    m = _module(kind, opts, dtype, seed=3)
    h, pos, g = _inputs(dtype, seed=4)
    x = h.clone().requires_grad_(True)
    m(x, pos, inplace=False).backward(g)
    grads = {"h": x.grad, **{n: p.grad for n, p in m.named_parameters()}}

    def formula_grads(work):
        # fresh leaves (clone: .to() of the same dtype would return h / p themselves)
        hl = h.to(work).clone().requires_grad_(True)
        p = {n: t.detach().to(work).clone().requires_grad_(True)
             for n, t in m.named_parameters()}
        _formula(kind, hl, pos, p).backward(g.to(work))
        return {"h": hl.grad, **{n: t.grad for n, t in p.items()}}

    ref64, same = formula_grads(torch.float64), formula_grads(dtype)
    assert set(grads) == set(ref64) and all(v is not None for v in grads.values())
    for n in grads:
        assert_within_rule(f"{kind} d{n}", grads[n], ref64[n], same[n])
        assert ref64[n].abs().max() > 1e-3, n        # every parameter is really exercised


@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_fused_and_reference_backends_agree(kind, opts):
    a = _module(kind, opts, seed=5)
    b = _module(kind, opts, seed=5, backend="reference")
    h, pos, g = _inputs(torch.float32, seed=6)
    outs = []
    for m in (a, b):
        x = h.clone().requires_grad_(True)
        out = m(x.clone(), pos)                         # in place, on a non-leaf
        out.backward(g)
        outs.append((out.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    for n in outs[0][2]:
        torch.testing.assert_close(outs[0][2][n], outs[1][2][n], msg=n)


@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_kernel_params_drive_forward(kind, opts):
    """kernel_params() gives the kernel's (r, d), (r, d), (r,) in the parameters' dtype,
    and forward is exactly the kernel with them (what a bank of modules will stack)."""
    m = _module(kind, opts, seed=7, backend="reference")
    R, W, b = m.kernel_params()
    assert (R.shape, W.shape, b.shape) == ((R4, D_), (R4, D_), (R4,))
    assert R.dtype == W.dtype == b.dtype == torch.float32
    assert R.requires_grad and b.requires_grad
    h, pos, _ = _inputs(torch.float32, seed=8)
    with torch.no_grad():
        assert torch.equal(m(h.clone(), pos), loreft_reference(h, pos, *m.kernel_params()))


@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_init_like_pyreft(kind, opts):
    """Reproducible from the seed; orthonormal rotate_raw; nn.Linear(d, r) bounds for
    W / W1 / W2 / c and the Linear-made b; U[0, 1) for ConsReFT / LobiReFT's b."""
    d = 64
    torch.manual_seed(3)
    a = INTERVENTIONS[kind](d, 8, **opts)
    torch.manual_seed(3)
    b = INTERVENTIONS[kind](d, 8, **opts)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    p = dict(a.named_parameters())
    assert ("proj_bias" in p) == bool(opts.get("add_bias"))
    if "rotate_raw" in p:
        torch.testing.assert_close(a.R @ a.R.T, torch.eye(8), atol=1e-6, rtol=0)
        torch.testing.assert_close(a.R, a.rotate_raw)
    for n in ("weight", "proj", "proj_bias"):
        if n in p:
            assert p[n].abs().max() <= d ** -0.5 and p[n].std() > 0.3 * d ** -0.5, n
    if kind in ("consreft", "lobireft"):
        assert 0 <= a.bias.min() and a.bias.max() < 1 and a.bias.max() > d ** -0.5
    else:
        assert a.bias.abs().max() <= d ** -0.5


@pytest.mark.parametrize("kind, opts", TYPES)
def test_type_dropout_acts_on_the_edit_of_edited_rows(kind, opts):
    """One rule for every type: training-mode dropout zeroes elements of the edit (and
    scales the rest by 1/(1-p)); unselected rows and eval mode are untouched."""
    m = _module(kind, opts, seed=9, dropout=0.5)
    h, pos, _ = _inputs(torch.float32, seed=10)
    m.eval()
    no_drop = m(h, pos, inplace=False)
    _assert_dropout_on_the_edit(m, h, pos, no_drop)


@pytest.mark.parametrize("kind", list(INTERVENTIONS))
def test_patch_with_each_type_trains(kind):
    """patch(model, ..., intervention=kind) on a tiny Llama: AdamW lowers the loss, and
    every intervention parameter moved."""
    from patch_helpers import batch
    from test_io import llama
    model = llama()
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2", intervention=kind)
    mods = reft_ext.interventions(model)
    assert all(type(m) is INTERVENTIONS[kind] for m in mods.values())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all(n.startswith("reft_interventions.") for n in before)
    ids, mask = batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    model.train()
    for _ in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    for n, p in model.named_parameters():
        if n in before:
            assert not torch.equal(p.detach(), before[n]), n


def test_noreft_add_bias_and_options():
    assert NoReFT(8, 2).options() == {"add_bias": False} and NoReFT(8, 2).proj_bias is None
    assert NoReFT(8, 2, add_bias=True).proj_bias.shape == (2,)
    assert NoReFT.saved_tensors(add_bias=True) == {"W1": "weight", "W2": "proj", "b": "bias",
                                                   "c": "proj_bias"}
    assert LoReFT(8, 2).options() == {}
    with pytest.raises(ValueError, match="add_bias"):
        NoReFT(8, 2, add_bias=1)
    with pytest.raises(ValueError, match="no option"):
        reft_ext.modules.build_intervention("loreft", 8, 2, dtype=torch.float32,
                                            device=None, add_bias=True)
    m = reft_ext.modules.build_intervention("NoReFT", 8, 2, dtype=torch.float32,
                                            device=None, add_bias=True)
    assert type(m) is NoReFT and m.add_bias


def test_types_are_distinct_classes_with_pyreft_meaning():
    """DiReFT has an orthonormal R (pyreft's DireftIntervention); the free-W2 type that
    reft_ext called DiReFT before is NodiReFT."""
    assert {n for n, _ in DiReFT(8, 2).named_parameters()} == {"rotate_raw", "weight", "bias"}
    assert {n for n, _ in NodiReFT(8, 2).named_parameters()} == {"weight", "bias", "proj"}
    assert {n for n, _ in ConsReFT(8, 2).named_parameters()} == {"rotate_raw", "bias"}
    assert {n for n, _ in LobiReFT(8, 2).named_parameters()} == {"rotate_raw", "bias"}
    assert reft_ext.DiReFT is DiReFT and reft_ext.NodiReFT is NodiReFT
