"""reft_ext.load_pyreft: importing pyreft / pyvene save directories.

pyreft is not installed: the tests write such directories themselves, in the layout
pyvene's IntervenableModel.save produces (config.json with positional representation
lists, class-name intervention types, sorted_keys; one torch.save'd state dict per
intervention, intkey_<key>.bin), with rotate layers made by torch's own orthogonal
parametrization, the one pyreft registers.

Tolerances. The reference is pyreft's formula evaluated in float64 on the file's values:
    LoReFT        h + (W h + b - R h) R            with R = rotate_layer^T
reft_ext evaluates it in float32 with R' = orthonormal_rows(R) (the import sets
rotate_raw = R). R' differs from R by at most about max|R R^T - I| + a few eps (measured
<= 1.5 eps32 for d <= 4096, r <= 32), so the edit obeys the test suite's rule
(tests/_util.py: <= 2 x PyTorch's own float32 error + 4 ulps), with PyTorch's error
taken from the same formula evaluated eagerly in the parameters' dtypes.

All six types (test_import_each_pyreft_type): the reference is each pyreft class's
forward restated from pyreft/interventions.py (PYREFT_FORWARDS, on pyreft's own tensors:
rotate_layer weight (d, r), learned_source, proj_layer), in float64 for the truth and in
float32 for pyreft's own result; the imported model's logits must be within 1e-4 of
pyreft's float32 logits.
"""
from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

import reft_ext
from reft_ext.checkpoint import CheckpointError
from _util import assert_bitwise_equal, assert_within_rule, make_positions
from test_io import assert_same_snapshot, llama, snapshot
from patch_helpers import batch

D, R_ = 32, 4
EPS32 = torch.finfo(torch.float32).eps


def rotate_layer_module(d, r, seed):
    """pyreft's rotate layer: a (d, r) weight under torch's orthogonal parametrization,
    moved away from its init the way training moves it (the strictly lower triangle of
    the householder reflectors; the diagonal holds signs)."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Module()
    m.weight = nn.Parameter(torch.empty(d, r))
    nn.init.orthogonal_(m.weight, generator=g)
    nn.utils.parametrizations.orthogonal(m)
    with torch.no_grad():
        m.parametrizations.weight.original.add_(
            0.3 * torch.randn(d, r, generator=g).tril(-1))
    return m


def loreft_state(d, r, seed, wdtype=torch.bfloat16, style="current"):
    """A LoreftIntervention state dict: pyreft's own override (weight, bias, rotate_layer)
    or (style="module") nn.Module.state_dict of the old ConditionedSource... class."""
    g = torch.Generator().manual_seed(seed + 1)
    rot = rotate_layer_module(d, r, seed)
    W = (torch.randn(r, d, generator=g) / d ** 0.5).to(wdtype)
    b = torch.randn(r, generator=g).to(wdtype)
    if style == "current":
        sd = OrderedDict(weight=W, bias=b, rotate_layer=rot.weight.detach().clone())
    else:
        sd = OrderedDict({"learned_source.weight": W, "learned_source.bias": b})
        for k, v in rot.state_dict().items():
            sd[f"rotate_layer.{k}"] = v
        sd["embed_dim"] = torch.tensor(d)
        sd["interchange_dim"] = torch.tensor(d)
    return sd, {"R": rot.weight.detach().T.clone(), "W": W, "b": b}


def write_pyreft_dir(path, layers, states, cls="LoreftIntervention", rank=R_, d=D,
                     key_style="new", component="block_output"):
    """config.json + intkey_*.bin as pyvene's save writes them."""
    path.mkdir(parents=True, exist_ok=True)
    reprs, keys = [], []
    for layer, sd in zip(layers, states):
        comp = component.format(layer=layer)
        reprs.append([layer, comp, "pos", 1, rank, None, None, None, None, None, None, None,
                      None, None])
        if "." in comp:
            key = f"comp_{comp.replace('.', '_')}_unit_pos_nunit_1#0"
        elif key_style == "new":
            key = f"layer_{layer}_comp_{comp}_unit_pos_nunit_1#0"
        else:
            key = f"layer.{layer}.comp.{comp}.unit.pos.nunit.1#0"
        keys.append(key)
        torch.save(sd, path / f"intkey_{key}.bin")
    cls_list = cls if isinstance(cls, list) else [cls] * len(layers)
    cfg = {"model_type": "None", "representations": reprs,
           "intervention_types": [f"<class 'pyreft.interventions.{c}'>" for c in cls_list],
           "mode": "parallel", "sorted_keys": keys, "intervention_dimensions": [d] * len(layers),
           "intervention_constant_sources": [False] * len(layers),
           "transformers_version": "4.40.1"}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return keys


def formula64(kind, h, positions, t):
    """pyreft's formulas in float64 at the selected rows; returns float64."""
    out = h.double().clone()
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    x = out[bi, positions[bi, pj]]
    assert kind == "loreft"             # the other types: PYREFT_FORWARDS below
    R, W, b = (t[k].double() for k in ("R", "W", "b"))
    y = x + (x @ W.T + b - x @ R.T) @ R
    out[bi, positions[bi, pj]] = y
    return out


def formula_same(kind, h, positions, t):
    """The same formula eagerly in the files' dtypes (pyreft computes W h + b in W's
    dtype, the rotation in R's), accumulated in float32: PyTorch's own error."""
    out = h.clone()
    bi, pj = (positions >= 0).nonzero(as_tuple=True)
    x = h[bi, positions[bi, pj]]
    assert kind == "loreft"
    R, W, b = t["R"], t["W"], t["b"]
    src = (x.to(W.dtype) @ W.T + b).float()
    y = x.float() + (src - x.float() @ R.float().T) @ R.float()
    out[bi, positions[bi, pj]] = y.to(h.dtype)
    return out


def check_intervention(kind, module, t, h_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 11, D, generator=g).to(h_dtype)
    pos = make_positions(g, 3, 11, 5)
    with torch.no_grad():
        ours = module(h.clone(), pos, inplace=False)
    assert_within_rule(f"{kind} edit", ours, formula64(kind, h, pos, t),
                       formula_same(kind, h, pos, t))


@pytest.mark.parametrize("key_style", ["new", "old"])
@pytest.mark.parametrize("state_style", ["current", "module"])
def test_import_loreft(key_style, state_style, tmp_path):
    base = llama()
    layers = [2, 0]
    states, truth = zip(*(loreft_state(D, R_, seed=10 + i, style=state_style)
                          for i in layers))
    cls = "LoreftIntervention" if state_style == "current" else \
        "ConditionedSourceLowRankRotatedSpaceIntervention"
    write_pyreft_dir(tmp_path / "pyreft", layers, states, cls=cls, key_style=key_style)
    rng = torch.get_rng_state()
    model = reft_ext.load_pyreft(copy.deepcopy(base), tmp_path / "pyreft", positions="f2+l2")
    assert torch.equal(torch.get_rng_state(), rng)     # the patch() init does not leak out
    mods = reft_ext.interventions(model)
    assert list(mods) == layers
    for i, t in zip(layers, truth):
        m = mods[i]
        assert isinstance(m, reft_ext.LoReFT) and (m.d, m.rank) == (D, R_)
        assert m.weight.dtype == torch.float32          # bf16 W, b widened exactly
        assert_bitwise_equal(m.weight.detach(), t["W"].float(), "W")
        assert_bitwise_equal(m.bias.detach(), t["b"].float(), "b")
        assert_bitwise_equal(m.rotate_raw.detach(), t["R"], "rotate_raw")
        R = t["R"].double()
        orth = (R @ R.T - torch.eye(R_, dtype=torch.float64)).abs().max().item()
        err = (m.R.detach().double() - R).abs().max().item()
        assert err <= orth + 4 * EPS32, (err, orth)
        check_intervention("loreft", m, t, torch.float32, seed=i)
        check_intervention("loreft", m, t, torch.bfloat16, seed=i + 100)

    # the whole model: pyreft's formula at positions f2+l2 of every prompt, via hooks
    ids, mask = batch()
    pos = reft_ext.positions_from_mask("f2+l2", mask)
    ref = copy.deepcopy(base)
    for i, t in zip(layers, truth):
        def hook(mod, args, out, t=t):
            return formula64("loreft", out, pos, t).to(out.dtype)
        ref.model.layers[i].register_forward_hook(hook)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    assert (want - plain).abs().max() > 1e-2            # the edit is not a no-op

    # a reft_ext save of the imported model reloads bitwise
    reft_ext.save(model, tmp_path / "ours")
    again = reft_ext.load(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert_bitwise_equal(again(input_ids=ids, attention_mask=mask).logits, ours, "logits")


def test_import_component_path_and_dtype(tmp_path):
    """component 'model.layers[1].output' (pyvene's string access) and dtype=float64."""
    base = llama().double()
    sd, t = loreft_state(D, R_, seed=3, wdtype=torch.float32)
    write_pyreft_dir(tmp_path / "p", [1], [sd], component="model.layers[{layer}].output")
    model = reft_ext.load_pyreft(base, tmp_path / "p", positions="last", dtype=torch.float64)
    m = reft_ext.interventions(model)[1]
    assert m.weight.dtype == torch.float64
    assert reft_ext.model.patch.patch_config(model)["layer_path"] == "model.layers"


# ---- the six pyreft types ------------------------------------------------------------
# pyreft's forward of each class, restated from pyreft/interventions.py (pyreft 0.1.0) on
# its own tensors (t: "rot" = rotate_layer.weight (d, r) as its orthogonal parametrization
# computes it; "ls_w", "ls_b" = learned_source Linear(d, r), or "ls" = the (r,) Parameter
# of Cons/Lobi; "proj_w", "proj_b" = proj_layer Linear(d, r)). Dropout is the identity at
# eval, act_fn is linear (the default), and every tensor here has one dtype, so pyreft's
# .to() casts do nothing.

def _lin(x, w, b=None):
    return x @ w.T + (b if b is not None else 0.0)


PYREFT_FORWARDS = {
    # rotated_base = rotate_layer(base); base + (act(ls(base)) - rotated_base) @ rot.T
    "LoreftIntervention": lambda x, t: x + (_lin(x, t["ls_w"], t["ls_b"])
                                            - x @ t["rot"]) @ t["rot"].T,
    # proj_base = proj_layer(base); base + (act(ls(base)) - proj_base) @ proj_layer.weight
    "NoreftIntervention": lambda x, t: x + (_lin(x, t["ls_w"], t["ls_b"])
                                            - _lin(x, t["proj_w"], t.get("proj_b")))
                                           @ t["proj_w"],
    # base + (learned_source - rotate_layer(base)) @ rot.T
    "ConsreftIntervention": lambda x, t: x + (t["ls"] - x @ t["rot"]) @ t["rot"].T,
    # base + learned_source @ rot.T
    "LobireftIntervention": lambda x, t: x + t["ls"] @ t["rot"].T,
    # base + act(ls(base)) @ rot.T
    "DireftIntervention": lambda x, t: x + _lin(x, t["ls_w"], t["ls_b"]) @ t["rot"].T,
    # base + act(ls(base)) @ proj_layer.weight   (proj_layer's bias is never used)
    "NodireftIntervention": lambda x, t: x + _lin(x, t["ls_w"], t["ls_b"]) @ t["proj_w"],
}

# (pyreft class, with proj_layer bias = pyreft's add_bias) -> reft_ext class
SIX = {
    ("LoreftIntervention", False): reft_ext.LoReFT,
    ("NoreftIntervention", False): reft_ext.NoReFT,
    ("NoreftIntervention", True): reft_ext.NoReFT,
    ("ConsreftIntervention", False): reft_ext.ConsReFT,
    ("LobireftIntervention", False): reft_ext.LobiReFT,
    ("DireftIntervention", False): reft_ext.DiReFT,
    ("NodireftIntervention", False): reft_ext.NodiReFT,
    ("NodireftIntervention", True): reft_ext.NodiReFT,
}


def pyreft_state(cls, seed, add_bias=False):
    """(the intkey state dict pyvene saves for a `cls` intervention, its tensors in
    PYREFT_FORWARDS' terms). Linear weights ~ N(0, 1/d), biases ~ N(0, 1), all float32;
    the orthonormal classes' rotate layer is a trained-looking torch orthogonal
    parametrization (rotate_layer_module). LoreftIntervention saves through pyreft's own
    state_dict override; the others are plain nn.Module state dicts (+ pyvene's buffers)."""
    g = torch.Generator().manual_seed(seed)
    if cls == "LoreftIntervention":
        sd, t = loreft_state(D, R_, seed, wdtype=torch.float32)
        return sd, {"rot": t["R"].T.contiguous(), "ls_w": t["W"], "ls_b": t["b"]}
    sd = OrderedDict({"embed_dim": torch.tensor(D), "interchange_dim": torch.tensor(D)})
    t = {}
    if cls in ("ConsreftIntervention", "LobireftIntervention"):
        t["ls"] = sd["learned_source"] = torch.randn(R_, generator=g)
    else:
        t["ls_w"] = sd["learned_source.weight"] = torch.randn(R_, D, generator=g) / D ** 0.5
        t["ls_b"] = sd["learned_source.bias"] = torch.randn(R_, generator=g)
    if cls in ("NoreftIntervention", "NodireftIntervention"):
        t["proj_w"] = sd["proj_layer.weight"] = torch.randn(R_, D, generator=g) / D ** 0.5
        if add_bias:
            t["proj_b"] = sd["proj_layer.bias"] = torch.randn(R_, generator=g)
    else:
        rot = rotate_layer_module(D, R_, seed)
        for k, v in rot.state_dict().items():
            sd[f"rotate_layer.{k}"] = v
        t["rot"] = rot.weight.detach().clone()
    return sd, t


def pyreft_hook_model(base, layers, truths, cls, pos, dtype):
    """A copy of the (float32) base whose layers apply pyreft's forward at pos, evaluated
    in dtype (float32: pyreft's own result; float64: the truth, rounded to float32)."""
    ref = copy.deepcopy(base)
    for i, t in zip(layers, truths):
        def hook(mod, args, out, t={k: v.to(dtype) for k, v in t.items()}):
            h = out[0] if isinstance(out, tuple) else out
            y = h.clone()
            bi, pj = (pos >= 0).nonzero(as_tuple=True)
            y[bi, pos[bi, pj]] = PYREFT_FORWARDS[cls](h[bi, pos[bi, pj]].to(dtype),
                                                      t).to(h.dtype)
            return (y, *out[1:]) if isinstance(out, tuple) else y
        ref.model.layers[i].register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("cls, add_bias", list(SIX), ids=[
    f"{c}{'-add_bias' if a else ''}" for c, a in SIX])
def test_import_each_pyreft_type(cls, add_bias, tmp_path):
    """Each pyreft class imports as the reft_ext type of the same meaning and reproduces
    pyreft's forward: logits within 1e-4 of pyreft's own float32 computation (and of the
    float64 truth), through the whole model at positions f2+l2; a reft_ext save of the
    import reloads bitwise."""
    base = llama()
    layers = [2, 0]
    states, truths = zip(*(pyreft_state(cls, seed=20 + i, add_bias=add_bias)
                           for i in layers))
    write_pyreft_dir(tmp_path / "pyreft", layers, states, cls=cls)
    model = reft_ext.load_pyreft(copy.deepcopy(base), tmp_path / "pyreft", positions="f2+l2")
    mods = reft_ext.interventions(model)
    assert list(mods) == layers
    assert all(type(m) is SIX[cls, add_bias] for m in mods.values())
    if cls == "NoreftIntervention":                   # pyreft's proj_layer bias is c
        assert all(m.add_bias == add_bias for m in mods.values())
        if add_bias:
            assert_bitwise_equal(mods[2].proj_bias.detach(), truths[0]["proj_b"], "c")

    ids, mask = batch()
    pos = reft_ext.positions_from_mask("f2+l2", mask)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        want32 = pyreft_hook_model(base, layers, truths, cls, pos, torch.float32)(
            input_ids=ids, attention_mask=mask).logits
        want64 = pyreft_hook_model(base, layers, truths, cls, pos, torch.float64)(
            input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (want32 - plain).abs().max() > 1e-2       # the edit is not a no-op
    torch.testing.assert_close(ours, want32, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours, want64, rtol=0, atol=1e-4)

    # the edit itself, on fresh hidden states, under the suite's tolerance rule
    g = torch.Generator().manual_seed(5)
    h = torch.randn(3, 11, D, generator=g)
    p = make_positions(g, 3, 11, 5)
    bi, pj = (p >= 0).nonzero(as_tuple=True)
    t = truths[0]
    ref64, same = h.double().clone(), h.clone()
    ref64[bi, p[bi, pj]] = PYREFT_FORWARDS[cls](
        h.double()[bi, p[bi, pj]], {k: v.double() for k, v in t.items()})
    same[bi, p[bi, pj]] = PYREFT_FORWARDS[cls](h[bi, p[bi, pj]], t)
    with torch.no_grad():
        assert_within_rule(f"{cls} edit", mods[2](h.clone(), p, inplace=False), ref64, same)

    reft_ext.save(model, tmp_path / "ours")
    again = reft_ext.load(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert_bitwise_equal(again(input_ids=ids, attention_mask=mask).logits, ours, "logits")


def test_noreft_add_bias_on_some_layers_only_is_refused(tmp_path):
    states = [pyreft_state("NoreftIntervention", seed=i, add_bias=i == 1)[0] for i in (0, 1)]
    write_pyreft_dir(tmp_path / "p", [0, 1], states, cls="NoreftIntervention")
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=r"add_bias\) on layers \[1\] only"):
        reft_ext.load_pyreft(model, tmp_path / "p", positions="all")
    assert_same_snapshot(before, snapshot(model))


BAD = {
    # pyvene's own (non-pyreft) trainable intervention
    "pyvene-type": ("LowRankRotatedSpaceIntervention",
                    r"unsupported pyreft intervention type\(s\) "
                    r"\['LowRankRotatedSpaceIntervention'\]"),
    "mixed": (["LoreftIntervention", "NodireftIntervention"], "mixed intervention types"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsupported_types_name_them(case, tmp_path):
    cls, msg = BAD[case]
    states = [loreft_state(D, R_, seed=i)[0] for i in range(2)]
    write_pyreft_dir(tmp_path / "p", [0, 1], states, cls=cls)
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=msg):
        reft_ext.load_pyreft(model, tmp_path / "p", positions="f1+l1")
    assert_same_snapshot(before, snapshot(model))


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _bad_dir(kind, path):
    sd, _ = loreft_state(D, R_, seed=1)
    if kind == "uneven-per-layer":    # two on layer 1, one on layer 2: neither layout
        write_untied_dir(path, [1, 1, 2], [sd, sd, sd])
        return
    write_pyreft_dir(path, [1], [sd])
    key = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    if kind == "component":
        _edit_config(path, lambda c: c["representations"][0].__setitem__(1, "mlp_output"))
    elif kind == "unit":
        _edit_config(path, lambda c: c["representations"][0].__setitem__(2, "h.pos"))
    elif kind == "missing-bin":
        (path / f"intkey_{key}.bin").unlink()
    elif kind == "rank-mismatch":
        _edit_config(path, lambda c: c["representations"][0].__setitem__(4, 3))
    elif kind == "not-orthonormal":
        sd["rotate_layer"] = sd["rotate_layer"] * 2
        torch.save(sd, path / f"intkey_{key}.bin")
    elif kind == "unexpected-tensor":
        sd["mystery"] = torch.zeros(3)
        torch.save(sd, path / f"intkey_{key}.bin")
    elif kind == "missing-weight":
        del sd["weight"]
        torch.save(sd, path / f"intkey_{key}.bin")
    elif kind == "pickle":             # arbitrary objects: refused by weights_only=True
        torch.save({"weight": sd["weight"], "bias": sd["bias"], "rotate_layer": sd["rotate_layer"],
                    "obj": _Evil()}, path / f"intkey_{key}.bin")
    elif kind == "other-d":
        sd2, _ = loreft_state(48, R_, seed=1)
        torch.save(sd2, path / f"intkey_{key}.bin")
        _edit_config(path, lambda c: c.update(intervention_dimensions=[48]))
    elif kind == "no-config":
        (path / "config.json").unlink()
    elif kind == "not-pyvene":
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    else:
        raise AssertionError(kind)


class _Evil:
    pass


BAD_DIRS = {
    "uneven-per-layer": "interventions per layer \\{1: 2, 2: 1\\}",
    "component": "component 'mlp_output' is not supported",
    "unit": "unit 'h.pos' is not supported",
    "missing-bin": "no intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin",
    "rank-mismatch": "expected \\(d, 3\\)",
    "not-orthonormal": "not orthonormal",
    "unexpected-tensor": "unexpected tensors \\['mystery'\\]",
    "missing-weight": "has no weight / learned_source.weight",
    "pickle": "cannot read .*intkey_",
    "other-d": "has d=48 but this model's hidden size is 32",
    "no-config": "cannot read .*config.json",
    "not-pyvene": "no 'representations' list",
}


@pytest.mark.parametrize("kind", list(BAD_DIRS))
def test_bad_pyreft_dirs_raise_before_any_change(kind, tmp_path):
    _bad_dir(kind, tmp_path / "p")
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=BAD_DIRS[kind]):
        reft_ext.load_pyreft(model, tmp_path / "p", positions="f1+l1")
    assert_same_snapshot(before, snapshot(model))


def test_patched_model_is_refused(tmp_path):
    sd, _ = loreft_state(D, R_, seed=1)
    write_pyreft_dir(tmp_path / "p", [1], [sd])
    model = reft_ext.patch(llama(), [0], rank=2)
    with pytest.raises(CheckpointError, match="already patched with an adapter named 'default'"):
        reft_ext.load_pyreft(model, tmp_path / "p", positions="all")
    assert list(reft_ext.adapters(model)) == ["default"]


def test_import_as_another_adapter(tmp_path):
    """load_pyreft(adapter=) adds the import to a patched model: a mixed batch gives each
    row the import's (or the other adapter's) result, bitwise as the import alone."""
    sd, _ = loreft_state(D, R_, seed=1)
    write_pyreft_dir(tmp_path / "p", [1], [sd])
    base = llama()
    alone = reft_ext.load_pyreft(copy.deepcopy(base), tmp_path / "p", positions="f2+l2")
    torch.manual_seed(0)
    model = reft_ext.patch(copy.deepcopy(base), [0], rank=2, positions="l1")
    reft_ext.load_pyreft(model, tmp_path / "p", positions="f2+l2", adapter="imported")
    assert list(reft_ext.adapters(model)) == ["default", "imported"]
    ids, mask = batch()
    rows = ["imported", "default", "imported"]
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, reft_adapter=rows).logits
        want = alone(input_ids=ids, attention_mask=mask).logits
        other = model(input_ids=ids, attention_mask=mask).logits
    for i, a in enumerate(rows):
        assert_bitwise_equal(mixed[i], want[i] if a == "imported" else other[i], str(i))


def write_untied_dir(path, reprs_layers, states, cls="LoreftIntervention"):
    """A pyvene save whose representation list names layers as given (pyreft's untied
    recipe lists each layer twice: [2, 0, 2, 0]); the n-th intervention on a layer gets
    key ...#n, as pyvene numbers them."""
    path.mkdir(parents=True, exist_ok=True)
    reprs, keys, seen = [], [], {}
    for layer, sd in zip(reprs_layers, states):
        n = seen[layer] = seen.get(layer, -1) + 1
        reprs.append([layer, "block_output", "pos", 1, R_] + [None] * 9)
        keys.append(f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{n}")
        torch.save(sd, path / f"intkey_{keys[-1]}.bin")
    cfg = {"model_type": "None", "representations": reprs,
           "intervention_types": [f"<class 'pyreft.interventions.{cls}'>"] * len(reprs),
           "mode": "parallel", "sorted_keys": keys,
           "intervention_dimensions": [D] * len(reprs)}
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize("cls", sorted({c for c, _ in SIX}))
def test_import_untied_pyreft_save(cls, tmp_path):
    """pyreft's share_weights=False save (each layer listed twice, #0 on the first and #1
    on the last positions, each side clipped to half the row) imports as patch(...,
    tied=False) and reproduces pyreft's two interventions per layer: logits within 1e-4
    of pyreft's float32 computation, positions from a Python restatement of pyreft's
    rule."""
    from test_untied import groups_tensor, pyreft_groups
    base = llama()
    layers = [2, 0]
    listed = layers + layers            # pyreft's train.py: layers += layers
    pairs = [pyreft_state(cls, seed=40 + j) for j in range(len(listed))]
    write_untied_dir(tmp_path / "pyreft", listed, [p[0] for p in pairs], cls=cls)
    model = reft_ext.load_pyreft(copy.deepcopy(base), tmp_path / "pyreft", positions="f2+l3")
    from reft_ext.model.patch import patch_config
    assert patch_config(model)["tied"] is False
    ids, mask = batch()
    groups = groups_tensor(pyreft_groups(2, 3, mask), 3)
    ref = copy.deepcopy(base)
    for j, layer in enumerate(listed):
        k = j // len(layers)            # first listing: #0 (first tokens), second: #1
        truth = pairs[j][1]

        def hook(mod, args, out, t=truth, pos=groups[:, k]):
            h = out[0] if isinstance(out, tuple) else out
            y = h.clone()
            bi, pj = (pos >= 0).nonzero(as_tuple=True)
            y[bi, pos[bi, pj]] = PYREFT_FORWARDS[cls](h[bi, pos[bi, pj]], t).to(h.dtype)
            return (y, *out[1:]) if isinstance(out, tuple) else y
        ref.model.layers[layer].register_forward_hook(hook)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
        plain = base(input_ids=ids, attention_mask=mask).logits
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-4)


def test_untied_import_needs_first_and_last_positions(tmp_path):
    sd, _ = loreft_state(D, R_, seed=1)
    write_untied_dir(tmp_path / "p", [1, 1], [sd, sd])
    model = llama()
    before = snapshot(model)
    with pytest.raises(CheckpointError, match="untied interventions.*f<p>\\+l<s>"):
        reft_ext.load_pyreft(model, tmp_path / "p", positions="all")
    assert_same_snapshot(before, snapshot(model))
