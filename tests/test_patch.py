"""reft_ext.patch on a model-family matrix, against an independent hook-based reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import reft_ext
from patch_helpers import (HF_FAMILIES, ReferenceHooks, batch, build, call, loop_positions,
                           params_of, to_tensor)

ALL_MODELS = HF_FAMILIES + ["plain", "encoder", "encoder_seq_first"]
# fp32 everywhere: torch.testing.assert_close's own float32 defaults (rtol 1.3e-6, atol 1e-5)
# hold, since the fused kernel and the reference both accumulate in float32.


def _is_hf(name):
    return name in HF_FAMILIES


def _valid_mask(name, ids, mask):
    return mask if _is_hf(name) else torch.ones_like(ids)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_logits_and_grads_match_reference(name):
    model, path = build(name)
    ref = copy.deepcopy(model)
    ids, mask = batch(left=name != "opt")   # OPT's learned positions assume right padding
    base = call(model, ids, mask, name)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l3")
    pos = to_tensor(loop_positions(2, 3, _valid_mask(name, ids, mask)), 5)
    rh = ReferenceHooks(ref, path, params_of(model), pos, seq_first=name == "encoder_seq_first")

    out, ref_out = call(model, ids, mask, name), call(ref, ids, mask, name)
    torch.testing.assert_close(out, ref_out)
    assert not torch.equal(out, base)                       # the edit does something
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref_out * w).sum().backward()
    for i, (raw, W, b) in params_of(model).items():
        r_raw, r_W, r_b = rh.leaves[i]
        torch.testing.assert_close(raw.grad, r_raw.grad)
        torch.testing.assert_close(W.grad, r_W.grad)
        torch.testing.assert_close(b.grad, r_b.grad)
    assert all(p.grad is None for n, p in model.named_parameters()
               if not n.startswith("reft_interventions."))

    reft_ext.unpatch(model)
    assert torch.equal(call(model, ids, mask, name), base)


def _snapshot(model):
    hooks = {n: (list(m._forward_hooks), list(m._forward_pre_hooks),
                 list(m._forward_hooks_with_kwargs), list(m._forward_pre_hooks_with_kwargs))
             for n, m in model.named_modules()}
    return (list(model.state_dict()), [n for n, _ in model.named_modules()], hooks,
            {n: p.requires_grad for n, p in model.named_parameters()},
            sorted(k for k in model.__dict__ if k.startswith("_reft") or k == "generate"))


@pytest.mark.parametrize("name", ["llama", "falcon", "plain"])
def test_unpatch_restores_exactly(name):
    model, _ = build(name)
    first = next(model.parameters())
    first.requires_grad_(False)                     # a user's own freeze survives unpatch
    before = _snapshot(model)
    reft_ext.patch(model, "all", rank=2)
    assert all(not p.requires_grad for n, p in model.named_parameters()
               if not n.startswith("reft_interventions."))
    assert reft_ext.is_patched(model)
    reft_ext.unpatch(model)
    assert _snapshot(model) == before
    assert not reft_ext.is_patched(model)
    with pytest.raises(ValueError, match="not patched"):
        reft_ext.unpatch(model)


def test_state_dict_keys_and_container():
    model, _ = build("llama")
    keys = list(model.state_dict())
    reft_ext.patch(model, [1, -1], rank=3)
    new = list(model.state_dict())
    assert new[:len(keys)] == keys
    assert sorted(set(new) - set(keys)) == sorted(
        f"reft_interventions.default.{i}.{p}" for i in (1, 2)
        for p in ("rotate_raw", "weight", "bias"))
    assert list(reft_ext.interventions(model)) == [1, 2]
    assert all(isinstance(m, reft_ext.LoReFT) for m in reft_ext.interventions(model).values())
    opt_params = {id(p) for p in model.parameters() if p.requires_grad}
    assert opt_params == {id(p) for p in model.reft_interventions.parameters()}


def test_print_trainable_parameters(capsys):
    model, _ = build("llama")
    reft_ext.patch(model, [0], rank=4)
    reft_ext.print_trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    n = 2 * 4 * 32 + 4
    assert capsys.readouterr().out == (f"trainable params: {n:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * n / total:.4f}\n")


def test_seed_makes_init_reproducible():
    a, _ = build("llama")
    b, _ = build("llama")
    torch.manual_seed(7)
    reft_ext.patch(a, [0, 1], rank=4)
    torch.manual_seed(7)
    reft_ext.patch(b, [0, 1], rank=4)
    for (ka, va), (kb, vb) in zip(a.reft_interventions.state_dict().items(),
                                  b.reft_interventions.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_deepcopy_is_independent():
    model, _ = build("llama")
    ids, mask = batch()
    reft_ext.patch(model, [0, 2], rank=4, positions="l2")
    clone = copy.deepcopy(model)
    torch.testing.assert_close(call(clone, ids, mask, "llama"), call(model, ids, mask, "llama"),
                               rtol=0, atol=0)
    blocks = clone.model.layers
    assert (blocks[0]._reft_link.state.modules["default"]["0"]
            is clone.reft_interventions["default"]["0"])
    assert blocks[0]._reft_link.state is clone._reft_state is not model._reft_state
    assert clone.generate.model is clone
    with torch.no_grad():
        clone.reft_interventions["default"]["0"].weight.add_(1.0)
    before = call(model, ids, mask, "llama")
    assert not torch.equal(call(clone, ids, mask, "llama"), before)
    with reft_ext.disabled(clone):                            # state is per copy
        assert torch.equal(call(model, ids, mask, "llama"), before)
    reft_ext.unpatch(clone)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in clone.modules())
    assert reft_ext.is_patched(model)
    assert torch.equal(call(model, ids, mask, "llama"), before)


def test_disabled_runs_base_model():
    model, _ = build("gpt2")
    ids, mask = batch()
    base = call(model, ids, mask, "gpt2")
    reft_ext.patch(model, "all", rank=4)
    edited = call(model, ids, mask, "gpt2")
    with reft_ext.disabled(model):
        with reft_ext.disabled(model):
            assert torch.equal(call(model, ids, mask, "gpt2"), base)
        assert torch.equal(call(model, ids, mask, "gpt2"), base)
    assert torch.equal(call(model, ids, mask, "gpt2"), edited)


def test_explicit_positions_kwarg_and_context_manager():
    model, path = build("llama")
    ref = copy.deepcopy(model)
    ids, mask = batch(left=False)
    reft_ext.patch(model, [1], rank=4, positions="all")
    pos = torch.tensor([[5, 0, -1], [1, -1, -1], [-1, -1, -1]])
    rh = ReferenceHooks(ref, path, params_of(model), pos)
    expect = call(ref, ids, mask, "llama")
    torch.testing.assert_close(call(model, ids, mask, "llama", reft_positions=pos), expect)
    with reft_ext.positions(model, pos):
        torch.testing.assert_close(call(model, ids, mask, "llama"), expect)
        other = torch.tensor([[0], [1], [2]])
        rh.positions = other                                  # kwarg wins over the context
        torch.testing.assert_close(call(model, ids, mask, "llama", reft_positions=other),
                                   call(ref, ids, mask, "llama"))
    # back to the spec ("all" valid tokens) once the context exits
    rh.positions = to_tensor(loop_positions(0, 0, mask, all_tokens=True), 9)
    torch.testing.assert_close(call(model, ids, mask, "llama"), call(ref, ids, mask, "llama"))


def test_output_hidden_states_report_edited_states():
    model, _ = build("llama")
    ids, mask = batch()
    base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    reft_ext.patch(model, [0], rank=4, positions="last")
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert torch.equal(hs[0], base[0])
    diff = (hs[1] - base[1]).abs().sum(-1) > 0                 # (B, T): edited rows
    assert diff[:, -1].all() and not diff[:, :-1].any()        # left padding: last = T-1


def test_bad_positions_input():
    model, _ = build("llama")
    ids, mask = batch()
    reft_ext.patch(model, [0], rank=2)
    with pytest.raises(ValueError, match="reft_positions"):
        model(input_ids=ids, reft_positions=torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="reft_positions"):
        model(input_ids=ids, reft_positions=[[0]])
    with pytest.raises(ValueError, match="reft_positions"):
        model(input_ids=ids, reft_positions=torch.zeros(3, 1))
    with pytest.raises((ValueError, RuntimeError), match="positions"):   # out of range
        model(input_ids=ids, reft_positions=torch.full((3, 1), 9))
    with pytest.raises((ValueError, RuntimeError), match="positions"):   # repeated
        model(input_ids=ids, reft_positions=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):                   # wrong batch
        model(input_ids=ids, reft_positions=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="2-D"):
        model(input_ids=ids, attention_mask=torch.ones(3, 1, 9, 9))


def test_patch_argument_errors():
    model, _ = build("llama")
    with pytest.raises(ValueError, match="out of range"):
        reft_ext.patch(model, [3], rank=2)
    with pytest.raises(ValueError, match="repeats"):
        reft_ext.patch(model, [0, -3], rank=2)
    with pytest.raises(ValueError, match="rank"):
        reft_ext.patch(model, [0], rank=33)
    with pytest.raises(ValueError, match="positions spec"):
        reft_ext.patch(model, [0], rank=2, positions="first3")
    with pytest.raises(ValueError, match="intervention"):
        reft_ext.patch(model, [0], rank=2, intervention="lora")
    with pytest.raises(ValueError, match="layer_path"):
        reft_ext.patch(model, [0], rank=2, layer_path="model.norm")
    assert not reft_ext.is_patched(model)                      # failed patches change nothing
    assert all(p.requires_grad for p in model.parameters())
    reft_ext.patch(model, [0], rank=2)
    with pytest.raises(ValueError, match="already patched"):
        reft_ext.patch(model, [0], rank=2)


class TwoStacks(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.b = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x):
        for m in (*self.a, *self.b):
            x = m(x)
        return x


def test_layer_discovery_ambiguous_and_explicit():
    model = TwoStacks()
    with pytest.raises(ValueError, match="several candidate"):
        reft_ext.find_layers(model)
    assert reft_ext.find_layers(model, "b")[0] == "b"
    reft_ext.patch(model, [1], rank=2, layer_path="b")
    x = torch.randn(2, 5, 8)
    y = model(x)
    m = reft_ext.interventions(model)[1]
    with reft_ext.disabled(model):
        h = model.b[0](model.a[1](model.a[0](x)))
        h = model.b[1](h)
    expect = reft_ext.loreft_reference(h, torch.arange(5).expand(2, 5), m.R, m.W, m.b)
    torch.testing.assert_close(y, expect)


def test_layer_discovery_prefers_biggest_homogeneous_list():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.small = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
            self.big = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])
    assert reft_ext.find_layers(M())[0] == "big"


@pytest.mark.parametrize("intervention", ["loreft", "direft"])
def test_bf16_model_with_fp32_interventions(intervention):
    model, path = build("llama")
    model = model.to(torch.bfloat16)
    ref = copy.deepcopy(model)
    ids, mask = batch()
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2", intervention=intervention)
    mods = reft_ext.interventions(model)
    assert all(p.dtype == torch.float32 for m in mods.values() for p in m.parameters())
    out = call(model, ids, mask, "llama")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for m in mods.values() for p in m.parameters())
    if intervention == "loreft":
        pos = to_tensor(loop_positions(2, 2, mask), 4)
        ReferenceHooks(ref, path, params_of(model), pos)
        # both paths round each edited row to bf16 once from float32: same bits
        torch.testing.assert_close(out, call(ref, ids, mask, "llama"), rtol=0, atol=0)


def test_direft_through_patch():
    model, _ = build("llama")
    ids, mask = batch()
    reft_ext.patch(model, [1], rank=4, positions="l1", intervention="direft")
    m = reft_ext.interventions(model)[1]
    assert isinstance(m, reft_ext.DiReFT)
    out = call(model, ids, mask, "llama")
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_custom_intervention_factory():
    calls = []

    class AddBias(nn.Module):
        def __init__(self, d, rank, dtype=None, device=None):
            super().__init__()
            calls.append((d, rank, dtype))
            self.v = nn.Parameter(torch.ones(d, dtype=dtype, device=device))

        def forward(self, h, positions, inplace=True):
            out = h.clone()
            bi, pj = (positions >= 0).nonzero(as_tuple=True)
            out[bi, positions[bi, pj]] += self.v
            return out

    model, _ = build("plain")
    x = torch.randint(0, 50, (2, 6))
    base = model(x)
    reft_ext.patch(model, [2], rank=1, positions="l1", intervention=AddBias)
    assert calls == [(32, 1, torch.float32)]
    out = model(x)
    torch.testing.assert_close(out[:, :-1], base[:, :-1])
    assert (out[:, -1] - base[:, -1]).abs().amax() > 0.1      # the returned tensor is used


def test_pickle_round_trip():
    import pickle
    model, _ = build("llama")
    ids, mask = batch()
    reft_ext.patch(model, [0], rank=4, positions="l2")
    expect = call(model, ids, mask, "llama")
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(call(clone, ids, mask, "llama"), expect)
    assert (clone.model.layers[0]._reft_link.state.modules["default"]["0"]
            is clone.reft_interventions["default"]["0"])
    assert clone.generate.model is clone


def test_layer_returning_its_input_is_edited_out_of_place():
    """A layer that returns its input (a skipped block) must not have that tensor edited in
    place: it is also the previous layer's output."""
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)

        def forward(self, x):
            return x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(8, 8)
            self.layers = nn.ModuleList(Skip() for _ in range(2))

        def forward(self, x):
            x = self.pre(x)
            self.seen = [x]
            for layer in self.layers:
                x = layer(x)
                self.seen.append(x)
            return x

    model = M()
    reft_ext.patch(model, [1], rank=2, positions="last")
    x = torch.randn(2, 4, 8)
    out = model(x)
    with reft_ext.disabled(model):
        pre = model.pre(x)
    assert torch.equal(model.seen[0], pre) and torch.equal(model.seen[1], pre)
    m = reft_ext.interventions(model)[1]
    pos = torch.tensor([[3], [3]])
    torch.testing.assert_close(out, reft_ext.loreft_reference(pre, pos, m.R, m.W, m.b))


def test_numpy_layer_indices():
    np = pytest.importorskip("numpy")
    model, _ = build("llama")
    reft_ext.patch(model, np.array([0, 2]), rank=2)
    assert list(reft_ext.interventions(model)) == [0, 2]


def test_patch_config():
    model, _ = build("gpt2")
    reft_ext.patch(model, [2, 0], rank=2, positions="last")
    assert reft_ext.patch.__module__ == "reft_ext.model.patch"
    from reft_ext.model.patch import patch_config
    assert patch_config(model) == {"layer_path": "transformer.h", "layers": [2, 0],
                                   "n_layers": 3, "positions": "l1", "tied": True}


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "namedtuple", "modeloutput"])
@pytest.mark.parametrize("skip", [False, True])
def test_layer_output_containers(kind, skip):
    """Hidden states are found and edited in each container type, in place or (for a layer
    that returns its own input) by replacing the container's first item."""
    import collections
    tf = pytest.importorskip("transformers")
    NT = collections.namedtuple("NT", "hidden extra")

    def wrap(h):
        extra = torch.zeros(1)
        return {"tensor": lambda: h, "tuple": lambda: (h, extra), "list": lambda: [h, extra],
                "namedtuple": lambda: NT(h, extra),
                "modeloutput": lambda: tf.modeling_outputs.BaseModelOutput(
                    last_hidden_state=h, hidden_states=(extra,))}[kind]()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return wrap(x if skip else x + self.lin(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                out = b(x)
                x = out if kind == "tensor" else out[0]
            return x

    model = M()
    x = torch.randn(2, 5, 8)
    reft_ext.patch(model, [0], rank=2, positions="f1+l1")
    with reft_ext.disabled(model):
        h0 = model.blocks[0](x)
        h0 = h0 if kind == "tensor" else h0[0]
    m = reft_ext.interventions(model)[0]
    pos = torch.tensor([[0, 4], [0, 4]])
    edited = reft_ext.loreft_reference(h0, pos, m.R, m.W, m.b)
    with reft_ext.disabled(model):
        expect = model.blocks[1](edited)
        expect = expect if kind == "tensor" else expect[0]
    out = model(x)
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert m.weight.grad is not None


@pytest.mark.parametrize("spec,first,last,all_tokens", [
    ("all", 0, 0, True), ("last", 0, 1, False), ("f3", 3, 0, False), ("l4", 0, 4, False)])
@pytest.mark.parametrize("left", [True, False])
def test_specs_and_padding_sides_match_reference(spec, first, last, all_tokens, left):
    model, path = build("qwen2")
    ref = copy.deepcopy(model)
    ids, mask = batch(left=left)
    torch.manual_seed(0)
    reft_ext.patch(model, [1], rank=4, positions=spec)
    P = 9 if all_tokens else first + last
    pos = to_tensor(loop_positions(first, last, mask, all_tokens=all_tokens), P)
    ReferenceHooks(ref, path, params_of(model), pos)
    torch.testing.assert_close(call(model, ids, mask, "qwen2"), call(ref, ids, mask, "qwen2"))


def test_call_below_the_patched_module_edits_nothing():
    """Positions live for one call of the patched module: a later call below it
    (model.model) or of model.forward must neither reuse that call's rows (same shape:
    silently wrong) nor fail on them (other shape): it runs the base model."""
    model, _ = build("llama")
    reft_ext.patch(model, [0], rank=4)
    ids = torch.randint(3, 90, (2, 6))
    with reft_ext.disabled(model):
        base = model.model(input_ids=ids).last_hidden_state
        base_logits = model(input_ids=ids).logits
    for pos in (torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [4, 5]])):
        edited = model(input_ids=ids, reft_positions=pos).logits
        assert not torch.equal(edited, base_logits)            # the top-level call edits
        torch.testing.assert_close(model.model(input_ids=ids).last_hidden_state, base,
                                   rtol=0, atol=0)
        torch.testing.assert_close(model.forward(input_ids=ids).logits, base_logits,
                                   rtol=0, atol=0)
    other = torch.randint(3, 90, (3, 4))                        # another shape: no error
    with reft_ext.disabled(model):
        expect = model.model(input_ids=other).last_hidden_state
    torch.testing.assert_close(model.model(input_ids=other).last_hidden_state, expect,
                               rtol=0, atol=0)
