"""Untied interventions: patch(..., tied=False) gives each layer two interventions, #0 on
the first p and #1 on the last s tokens of "f{p}+l{s}" (pyreft's share_weights=False),
through one fused call per layer.

The reference shares nothing with the bank path: positions from a Python restatement of
pyreft's get_intervention_locations rule, and two ordinary out-of-place LoReFT edits per
layer (loreft_reference of each member's own R, W, b on its own group) in plain forward
hooks on an unpatched copy of the model.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import reft_ext
from patch_helpers import batch, build, call, to_tensor
from reft_ext.checkpoint import CheckpointError
from reft_ext.model.patch import patch_config
from reft_ext.modules import orthonormal_rows
from reft_ext.ops.reference import loreft_reference


def pyreft_groups(first, last, mask):
    """Per row: (first-group tokens, last-group tokens) by pyreft's rule on the row's valid
    tokens: each side clipped to half the row (n // 2)."""
    out = []
    for row in mask.tolist():
        valid = [t for t, m in enumerate(row) if m]
        n = len(valid)
        f, s = min(n // 2, first), min(n // 2, last)
        out.append((valid[:f], valid[n - s:] if s else []))
    return out


def groups_tensor(groups, width):
    return torch.stack([to_tensor([g[k] for g in groups], width) for k in (0, 1)], dim=1)


class TwoEditHooks:
    """Reference: at each layer, member #0's LoReFT on group 0, then #1's on group 1."""

    def __init__(self, model, path, members, positions):
        self.leaves = {i: [tuple(t.detach().clone().requires_grad_() for t in p) for p in mp]
                       for i, mp in members.items()}
        blocks = model.get_submodule(path)
        for i in members:
            blocks[i].register_forward_hook(self._hook(i, positions))

    def _hook(self, i, positions):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            for k, (raw, W, b) in enumerate(self.leaves[i]):
                h = loreft_reference(h, positions[:, k], orthonormal_rows(raw), W, b)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return hook


def members_of(model):
    return {i: [(m.rotate_raw, m.weight, m.bias) for m in u.members]
            for i, u in reft_ext.interventions(model).items()}


@pytest.mark.parametrize("spec", [(2, 3), (4, 1), (3, 3)])
def test_untied_positions_follow_pyreft(spec):
    f, s = spec
    _, mask = batch(B=3, T=11)
    mask[2, :] = 0
    mask[2, 4] = 1                     # a row of one token: not edited
    got = reft_ext.positions_from_mask(f"f{f}+l{s}", mask, tied=False)
    want = groups_tensor(pyreft_groups(f, s, mask), max(f, s))
    assert torch.equal(got, want)
    for row in got:                    # the two groups never share a token
        a, b = set(row[0].tolist()) - {-1}, set(row[1].tolist()) - {-1}
        assert not a & b


@pytest.mark.parametrize("name", ["llama", "plain"])
def test_untied_logits_and_grads_match_two_separate_edits(name):
    model, path = build(name)
    ref = copy.deepcopy(model)
    ids, mask = batch(B=3, T=9)
    valid = mask if name != "plain" else torch.ones_like(ids)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=3, positions="f2+l3", tied=False)
    pos = groups_tensor(pyreft_groups(2, 3, valid), 3)
    rh = TwoEditHooks(ref, path, members_of(model), pos)
    out, ref_out = call(model, ids, mask, name), call(ref, ids, mask, name)
    torch.testing.assert_close(out, ref_out)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    for i, mp in members_of(model).items():
        for k, params in enumerate(mp):
            for p, r in zip(params, rh.leaves[i][k]):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"layer {i} #{k}"
                torch.testing.assert_close(p.grad, r.grad)


def test_one_fused_call_per_layer(monkeypatch):
    """The two interventions of a layer run as one bank call of the op."""
    import reft_ext.bank as bank
    calls = []
    real = bank.loreft_

    def spy(h, positions, R, W, b, index=None):
        calls.append((tuple(R.shape), None if index is None else tuple(index.shape)))
        return real(h, positions, R, W, b, index=index)

    monkeypatch.setattr(bank, "loreft_", spy)
    model, _ = build("llama")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="f2+l2", tied=False)
    ids, mask = batch(B=2, T=8)
    call(model, ids, mask, "llama")
    assert calls == [((2, 2, 32), (2, 4))] * 3


def test_explicit_positions_tuple_and_tensor():
    model, _ = build("llama")
    reft_ext.patch(model, [1], rank=2, positions="f2+l2", tied=False)
    ids, mask = batch(B=2, T=8, left=False)
    first = torch.tensor([[0, 1], [0, -1]])
    last = torch.tensor([[6, 7, 5], [2, 3, -1]])
    a = call(model, ids, mask, "llama", reft_positions=(first, last))
    stacked = torch.stack([torch.nn.functional.pad(first, (0, 1), value=-1), last], dim=1)
    b = call(model, ids, mask, "llama", reft_positions=stacked)
    assert torch.equal(a, b)
    with reft_ext.positions(model, (first, last)):
        c = call(model, ids, mask, "llama")
    assert torch.equal(a, c)
    # the groups matter: swapping them (other intervention per token) changes the result
    swapped = call(model, ids, mask, "llama", reft_positions=(last, first))
    assert not torch.equal(a, swapped)


def test_explicit_positions_errors():
    model, _ = build("llama")
    reft_ext.patch(model, [1], rank=2, positions="f2+l2", tied=False)
    ids, mask = batch(B=2, T=8, left=False)
    with pytest.raises(ValueError, match=r"must be a \(B, 2, P\).*untied"):
        call(model, ids, mask, "llama", reft_positions=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="must hold 2 position tensors"):
        call(model, ids, mask, "llama", reft_positions=(torch.zeros(2, 1, dtype=torch.long),))
    with pytest.raises(ValueError, match="repeats token index 3"):
        call(model, ids, mask, "llama",
             reft_positions=(torch.tensor([[3], [0]]), torch.tensor([[3], [1]])))


@pytest.mark.parametrize("spec", ["all", "f3", "l2", "last"])
def test_untied_needs_first_and_last(spec):
    model, _ = build("llama")
    with pytest.raises(ValueError, match="untied interventions"):
        reft_ext.patch(model, [1], rank=2, positions=spec, tied=False)
    assert not reft_ext.is_patched(model)


def test_save_load_round_trip_and_layout_checks(tmp_path):
    model, _ = build("llama")
    torch.manual_seed(3)
    reft_ext.patch(model, [0, 2], rank=2, positions="f3+l2", tied=False)
    ids, mask = batch(B=3, T=9)
    want = call(model, ids, mask, "llama")
    reft_ext.save(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "reft_config.json").read_text())
    assert cfg["tied"] is False and cfg["format_version"] == 2
    assert "layers.2#1.rotate_raw" in cfg["tensors"]
    fresh, _ = build("llama")
    reft_ext.load(fresh, tmp_path / "ck")
    assert patch_config(fresh)["tied"] is False
    assert torch.equal(call(fresh, ids, mask, "llama"), want)
    # into an already patched untied model: values copied in place
    other, _ = build("llama")
    reft_ext.patch(other, [0, 2], rank=2, positions="f3+l2", tied=False)
    reft_ext.load(other, tmp_path / "ck")
    assert torch.equal(call(other, ids, mask, "llama"), want)
    # a tied model of the same layers does not fit
    tied, _ = build("llama")
    reft_ext.patch(tied, [0, 2], rank=2, positions="f3+l2")
    before = {k: v.clone() for k, v in tied.state_dict().items()}
    with pytest.raises(CheckpointError, match="tied interventions in the model vs untied"):
        reft_ext.load(tied, tmp_path / "ck")
    assert all(torch.equal(v, before[k]) for k, v in tied.state_dict().items())


def test_tied_checkpoints_keep_format_version_1(tmp_path):
    model, _ = build("llama")
    reft_ext.patch(model, [1], rank=2, positions="f2+l2")
    reft_ext.save(model, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "reft_config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["tied"] is True


def test_generate_with_untied_interventions():
    model, _ = build("llama")
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 1], rank=2, positions="f2+l2", tied=False)
    with torch.no_grad():
        for u in reft_ext.interventions(model).values():
            for m in u.members:
                m.bias.mul_(50)        # a visible edit
    ids, mask = batch(B=2, T=6)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                         do_sample=False)
    with reft_ext.disabled(model):
        base = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3,
                              do_sample=False)
    assert out.shape == base.shape and not torch.equal(out, base)
    # generation edits the prompt's positions: the first step's logits equal a forward
    first = call(model, ids, mask, "llama")[:, -1].argmax(-1)
    assert torch.equal(out[:, ids.shape[1]], first)


def test_sequential_fallback_matches_fused_rows_bitwise():
    """Members without the fused path (dropout active, or a custom module) run one after
    the other; in eval the fused bank gives bitwise the same rows (a row's result does not
    depend on the call it is in)."""
    from reft_ext.bank import Untied
    from reft_ext.modules import LoReFT
    torch.manual_seed(0)
    members = [LoReFT(16, 2), LoReFT(16, 2)]
    h = torch.randn(3, 10, 16)
    pos = groups_tensor(pyreft_groups(3, 3, torch.ones(3, 10)), 3)
    fused = Untied(members)(h.clone(), pos)

    class Plain(torch.nn.Module):          # no kernel_params: the sequential path
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, h, positions, inplace=True):
            return self.m(h, positions, inplace=inplace)

    seq = Untied([Plain(m) for m in members])(h.clone(), pos)
    assert torch.equal(fused, seq)
    assert not torch.equal(fused, h)


def test_dropout_trains_through_the_sequential_path():
    model, _ = build("llama")
    reft_ext.patch(model, [1], rank=2, positions="f2+l2", tied=False, dropout=0.5)
    model.train()
    ids, mask = batch(B=2, T=8)
    call(model, ids, mask, "llama").sum().backward()
    for m in reft_ext.interventions(model)[1].members:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


TYPES = ["loreft", "noreft", "consreft", "lobireft", "direft", "nodireft"]


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_untied_matches_its_members_one_by_one(kind, tmp_path):
    """An untied layer of any built-in type (one bank call of the members' kernel_params)
    equals its two members applied one after the other through their own pure-PyTorch
    reference path; gradients reach every member parameter; save / load is bitwise."""
    model, _ = build("llama")
    torch.manual_seed(5)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l3", tied=False, intervention=kind)
    with torch.no_grad():               # a visible edit for types whose init is near zero
        for u in reft_ext.interventions(model).values():
            for m in u.members:
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
    ids, mask = batch(B=3, T=9)
    out = call(model, ids, mask, "llama")
    pos = groups_tensor(pyreft_groups(2, 3, mask), 3)
    ref = copy.deepcopy(model)
    reft_ext.unpatch(ref)
    blocks = ref.get_submodule("model.layers")
    ref_members = {i: [copy.deepcopy(m) for m in u.members]
                   for i, u in reft_ext.interventions(model).items()}

    def hook_for(members):
        def hook(mod, args, o):
            h = o[0] if isinstance(o, tuple) else o
            for k, m in enumerate(members):
                m.backend = "reference"
                h = m(h, pos[:, k], inplace=False)
            return (h, *o[1:]) if isinstance(o, tuple) else h
        return hook

    for i, members in ref_members.items():
        blocks[i].register_forward_hook(hook_for(members))
    ref_out = call(ref, ids, mask, "llama")
    torch.testing.assert_close(out, ref_out)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    for i, u in reft_ext.interventions(model).items():
        for m, rm in zip(u.members, ref_members[i]):
            for (name, p), rp in zip(m.named_parameters(), rm.parameters()):
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, rp.grad, msg=f"{kind} {i} {name}")
    reft_ext.save(model, tmp_path / "ck")
    fresh, _ = build("llama")
    reft_ext.load(fresh, tmp_path / "ck")
    assert torch.equal(call(fresh, ids, mask, "llama"), out.detach())
