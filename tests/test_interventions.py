"""LoReFT / DiReFT modules and the QR orthonormalisation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import reft_ext
from reft_ext.modules import DiReFT, LoReFT, orthonormal_rows
from reft_ext.ops.reference import loreft_reference


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


def test_direft_formula_and_grads():
    torch.manual_seed(0)
    m = DiReFT(16, 4)
    h = _h()
    pos = _pos()
    W1, W2, b = (t.detach().clone().requires_grad_(True) for t in (m.W1, m.W2, m.b))
    hx = h.clone().requires_grad_(True)
    out = m(hx, pos, inplace=False)
    # h + W2^T (W1 h + b) at the selected rows, written out directly
    ref = h.clone().requires_grad_(True)
    expect = ref.clone()
    bi, pj = (pos >= 0).nonzero(as_tuple=True)
    x = ref[bi, pos[bi, pj]]
    expect[bi, pos[bi, pj]] = x + (x @ W1.T + b) @ W2
    torch.testing.assert_close(out, expect)
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    torch.testing.assert_close(hx.grad, ref.grad)
    torch.testing.assert_close(m.weight.grad, W1.grad)
    torch.testing.assert_close(m.proj.grad, W2.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)


def test_dropout_acts_on_the_edit_of_edited_rows():
    torch.manual_seed(0)
    m = LoReFT(16, 4, dropout=0.5)
    h = _h()
    pos = _pos()
    m.eval()
    no_drop = m(h, pos, inplace=False)
    torch.testing.assert_close(no_drop, LoReFT.forward(m, h, pos, inplace=False))
    m.train()
    out = m(h, pos, inplace=False)
    sel = torch.zeros(h.shape[:2], dtype=torch.bool)
    sel[(pos >= 0).nonzero(as_tuple=True)[0], pos[pos >= 0]] = True
    assert torch.equal(out[~sel], h[~sel])
    delta, full = (out - h)[sel], (no_drop - h)[sel]
    dropped = delta == 0
    assert 0.2 < dropped.float().mean() < 0.8
    torch.testing.assert_close(delta[~dropped], 2 * full[~dropped])


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoReFT(4, 5)
    with pytest.raises(ValueError, match="rank"):
        DiReFT(4, 0)
    with pytest.raises(ValueError, match="dropout"):
        LoReFT(4, 2, dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        LoReFT(4, 2, backend="cuda")
    with pytest.raises(ValueError, match="d must"):
        LoReFT(0, 1)


# ---- parity with pyreft (formulas transcribed from pyreft/interventions.py; pyreft is
# not a dependency). LoreftIntervention: rotate_layer.weight is (d, r) (R = weight.T),
# learned_source = nn.Linear(d, r):
#     rotated_base = self.rotate_layer(base)                  # base @ weight
#     output = base + torch.matmul(
#         (self.act_fn(self.learned_source(base)) - rotated_base), self.rotate_layer.weight.T)
#     return self.dropout(output.to(base.dtype))
# DireftIntervention: proj_layer = nn.Linear(d, r) (weight (r, d)):
#     output = base + torch.matmul(self.act_fn(self.learned_source(cast_base)),
#                                  self.proj_layer.weight)

def _pyreft_loreft(base, rotate_weight, learned_source):
    rotated_base = base @ rotate_weight
    return base + (learned_source(base) - rotated_base) @ rotate_weight.T


def _pyreft_direft(base, proj_weight, learned_source):
    return base + learned_source(base) @ proj_weight


def _rows(out, h, pos):
    bi, pj = (pos >= 0).nonzero(as_tuple=True)
    return out[bi, pos[bi, pj]], h[bi, pos[bi, pj]]


def test_parity_with_pyreft_loreft():
    torch.manual_seed(0)
    m = LoReFT(16, 4).double()
    ls = nn.Linear(16, 4).double()
    with torch.no_grad():
        ls.weight.copy_(m.W)
        ls.bias.copy_(m.b)
    h = _h(dtype=torch.float64)
    pos = _pos()
    ours, x = _rows(m(h, pos, inplace=False), h, pos)
    torch.testing.assert_close(ours, _pyreft_loreft(x, m.R.T, ls))


def test_parity_with_pyreft_direft():
    torch.manual_seed(0)
    m = DiReFT(16, 4).double()
    ls = nn.Linear(16, 4).double()
    with torch.no_grad():
        ls.weight.copy_(m.W1)
        ls.bias.copy_(m.b)
    h = _h(dtype=torch.float64)
    pos = _pos()
    ours, x = _rows(m(h, pos, inplace=False), h, pos)
    torch.testing.assert_close(ours, _pyreft_direft(x, m.W2, ls))


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
