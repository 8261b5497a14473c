"""Checkpoints: reft_ext.save / load / load_optimizer and the Trainer callback.

Exactness claims are checked bitwise (tests/_util.bits: -0.0 != 0.0, NaN payloads count):
a round trip on the same machine must reproduce every parameter and every output bit.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os

import pytest
import torch
from torch import nn

import reft_ext
from reft_ext.checkpoint import CONFIG_NAME, OPTIMIZER_NAME, WEIGHTS_NAME, CheckpointError
from _util import assert_bitwise_equal
from patch_helpers import PlainDecoder, batch

VOCAB = 97


def llama(d=32, n_layers=3, seed=1234):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


def randomise(model, seed=7):
    """Move the interventions away from their init (W, b are tiny at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in reft_ext.interventions(model).values():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("reft_interventions.")}


# ------------------------------------------------------------------ round trips

def intervention_arg(kind: str):
    """(registered name, patch()'s intervention=) for a case's kind; "noreft+add_bias" is
    NoReFT with pyreft's add_bias (a factory: options are not patch() arguments)."""
    if kind == "noreft+add_bias":
        return "noreft", lambda d, r, **kw: reft_ext.NoReFT(d, r, add_bias=True, **kw)
    return kind, kind


CASES = {
    # name: (model dtype, intervention, parameter dtype)
    "loreft-fp32": (torch.float32, "loreft", None),
    "loreft-fp32params-on-bf16": (torch.bfloat16, "loreft", torch.float32),
    "noreft-fp32": (torch.float32, "noreft", None),
    "noreft-add_bias-bf16": (torch.bfloat16, "noreft+add_bias", torch.bfloat16),
    "consreft-fp32": (torch.float32, "consreft", None),
    "lobireft-fp32params-on-bf16": (torch.bfloat16, "lobireft", torch.float32),
    "direft-bf16": (torch.bfloat16, "direft", torch.bfloat16),
    "direft-fp32": (torch.float32, "direft", None),
    "nodireft-bf16": (torch.bfloat16, "nodireft", torch.bfloat16),
    "nodireft-fp32": (torch.float32, "nodireft", None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_roundtrip_bitwise(case, tmp_path):
    mdtype, kind, pdtype = CASES[case]
    kind, arg = intervention_arg(kind)
    base = llama().to(mdtype)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    reft_ext.patch(model, [2, 0], rank=4, positions="f2+l3", intervention=arg, dtype=pdtype)
    randomise(model)
    ids, mask = batch()
    out = reft_ext.save(model, tmp_path / "ck")
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME]
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode   # not mkdtemp's 0700
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["format_version"] == 1 and cfg["intervention"] == kind
    m0 = reft_ext.interventions(model)[0]
    assert cfg.get("intervention_options", {}) == m0.options()
    assert ("layers.0.c" in cfg["tensors"]) == m0.options().get("add_bias", False)
    assert ("layers.0.rotate_raw" in cfg["tensors"]) == hasattr(m0, "rotate_raw")
    assert (cfg["layers"], cfg["rank"], cfg["d"], cfg["positions"]) == ([2, 0], 4, 32, "f2+l3")
    assert cfg["layer_path"] == "model.layers" and cfg["n_layers"] == 3
    assert cfg["library_version"] == reft_ext.__version__
    want_dtype = pdtype or torch.float32
    assert cfg["dtype"] == str(want_dtype).removeprefix("torch.")

    # into an unpatched model
    loaded = reft_ext.load(copy.deepcopy(base), out)
    assert reft_ext.interventions(loaded).keys() == reft_ext.interventions(model).keys()
    a, b = params(model), params(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert_bitwise_equal(b[k], a[k], k)
    assert_bitwise_equal(logits(loaded, ids, mask), logits(model, ids, mask), "logits")
    assert all(p.requires_grad == n.startswith("reft_interventions.")
               for n, p in loaded.named_parameters())

    # into a patched model with the same layout: in place (same Parameter objects)
    other = copy.deepcopy(base)
    torch.manual_seed(99)
    reft_ext.patch(other, [2, 0], rank=4, positions="f2+l3", intervention=arg, dtype=pdtype)
    ids_before = {n: id(p) for n, p in other.named_parameters()}
    reft_ext.load(other, out)
    assert {n: id(p) for n, p in other.named_parameters()} == ids_before
    assert_bitwise_equal(logits(other, ids, mask), logits(model, ids, mask), "logits")


def test_pre_six_types_direft_checkpoint_loads_as_nodireft(tmp_path):
    """Before the six pyreft types, reft_ext's "direft" was the free-W2 type (pyreft's
    NodiReFT) and its checkpoints said intervention "direft" with tensors W1, W2, b (no
    intervention_options): such a file loads as "nodireft", with bitwise the same outputs,
    into an unpatched model and in place into a patched NodiReFT one; a patched DiReFT
    (orthonormal R, other tensors) does not fit it."""
    base = llama()
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2", intervention="nodireft")
    randomise(model)
    ck = reft_ext.save(model, tmp_path / "ck")
    cfg = json.loads((ck / CONFIG_NAME).read_text())
    assert sorted(cfg["tensors"]) == [f"layers.{i}.{n}" for i in (0, 2) for n in ("W1", "W2", "b")]
    assert "intervention_options" not in cfg
    cfg["intervention"] = "direft"                  # what the older writer recorded
    (ck / CONFIG_NAME).write_text(json.dumps(cfg))
    assert reft_ext.checkpoint.read_config(ck)["intervention"] == "nodireft"
    ids, mask = batch()
    loaded = reft_ext.load(copy.deepcopy(base), ck)
    assert all(type(m) is reft_ext.NodiReFT for m in reft_ext.interventions(loaded).values())
    assert_bitwise_equal(logits(loaded, ids, mask), logits(model, ids, mask), "logits")
    other = reft_ext.patch(copy.deepcopy(base), [0, 2], rank=4, positions="f2+l2",
                           intervention="nodireft")
    reft_ext.load(other, ck)
    assert_bitwise_equal(logits(other, ids, mask), logits(model, ids, mask), "logits")
    wrong = reft_ext.patch(copy.deepcopy(base), [0, 2], rank=4, intervention="direft")
    with pytest.raises(CheckpointError, match="holds a DiReFT, the checkpoint a NodiReFT"):
        reft_ext.load(wrong, ck)


def test_noreft_add_bias_must_match_and_options_are_checked(tmp_path):
    base = llama()
    _, with_c = intervention_arg("noreft+add_bias")
    model = reft_ext.patch(copy.deepcopy(base), [1], rank=2, intervention=with_c)
    ck = reft_ext.save(model, tmp_path / "ck")
    plain = reft_ext.patch(copy.deepcopy(base), [1], rank=2, intervention="noreft")
    before = snapshot(plain)
    with pytest.raises(CheckpointError, match="options"):
        reft_ext.load(plain, ck)
    assert_same_snapshot(before, snapshot(plain))
    # the options reach the module together with dropout / backend (patch() gets a factory)
    loaded = reft_ext.load(copy.deepcopy(base), ck, dropout=0.25, backend="reference")
    m = reft_ext.interventions(loaded)[1]
    assert (m.add_bias, m.dropout, m.backend) == (True, 0.25, "reference")
    assert_bitwise_equal(m.proj_bias.detach(), reft_ext.interventions(model)[1].proj_bias.detach(),
                         "c")
    for bad in ({"add_bias": 1}, {"bias": True}, [True]):
        _rewrite(ck, cfg_edit=lambda c, bad=bad: c.update(intervention_options=bad))
        with pytest.raises(CheckpointError, match="bad intervention_options"):
            reft_ext.load(copy.deepcopy(base), ck)


def test_loreft_materialised_R_and_raw(tmp_path):
    """The file holds R exactly as forward computes it, next to rotate_raw."""
    from safetensors.torch import load_file
    model = llama()
    reft_ext.patch(model, [1], rank=3)
    randomise(model)
    reft_ext.save(model, tmp_path / "ck")
    t = load_file(tmp_path / "ck" / WEIGHTS_NAME)
    assert sorted(t) == ["layers.1.R", "layers.1.W", "layers.1.b", "layers.1.rotate_raw"]
    m = reft_ext.interventions(model)[1]
    assert_bitwise_equal(t["layers.1.R"], m.R.detach(), "R")
    assert_bitwise_equal(t["layers.1.rotate_raw"], m.rotate_raw.detach(), "rotate_raw")
    assert_bitwise_equal(t["layers.1.W"], m.W.detach(), "W")
    assert_bitwise_equal(t["layers.1.b"], m.b.detach(), "b")
    R = t["layers.1.R"].double()
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-6)


def test_bf16_loreft_parameters_roundtrip(tmp_path):
    """bf16 LoReFT parameters keep their dtype and bits (values only: torch has no
    half-precision QR, so this checks the file format, not a forward)."""
    base = llama()
    model = copy.deepcopy(base)
    reft_ext.patch(model, [0, 1], rank=4)
    model.reft_interventions.to(torch.bfloat16)
    randomise(model)
    reft_ext.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / CONFIG_NAME).read_text())["dtype"] == "bfloat16"
    loaded = reft_ext.load(copy.deepcopy(base), tmp_path / "ck")
    a, b = params(model), params(loaded)
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert_bitwise_equal(b[k], a[k], k)


def test_plain_torch_model_and_overrides(tmp_path):
    torch.manual_seed(3)
    base = PlainDecoder().eval()
    model = copy.deepcopy(base)
    reft_ext.patch(model, [1], rank=2, positions="last")
    randomise(model)
    reft_ext.save(model, tmp_path / "ck")
    x = torch.randint(3, VOCAB, (2, 7))
    loaded = reft_ext.load(copy.deepcopy(base), tmp_path / "ck")
    assert_bitwise_equal(loaded(x), model(x), "output")
    # overrides: another positions spec, float64 parameters (converted, not bitwise)
    wide = reft_ext.load(copy.deepcopy(base).double(), tmp_path / "ck", positions="all",
                         dtype=torch.float64)
    m = reft_ext.interventions(wide)[1]
    assert m.weight.dtype == torch.float64
    assert reft_ext.model.patch.patch_config(wide)["positions"] == "all"


def test_load_keeps_rng_state(tmp_path):
    model = llama()
    reft_ext.patch(model, [0], rank=2)
    reft_ext.save(model, tmp_path / "ck")
    fresh = llama()
    state = torch.get_rng_state()
    reft_ext.load(fresh, tmp_path / "ck")
    assert torch.equal(torch.get_rng_state(), state)


def test_save_replaces_existing_checkpoint_and_refuses_other_dirs(tmp_path):
    model = llama()
    reft_ext.patch(model, [0], rank=2)
    reft_ext.save(model, tmp_path / "ck")
    randomise(model)
    reft_ext.save(model, tmp_path / "ck")               # replaces the old checkpoint
    loaded = reft_ext.load(llama(), tmp_path / "ck")
    for k, v in params(model).items():
        assert_bitwise_equal(params(loaded)[k], v, k)
    (tmp_path / "empty").mkdir()
    reft_ext.save(model, tmp_path / "empty")            # an empty directory is fine
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a reft_ext checkpoint"):
        reft_ext.save(model, other)
    assert os.listdir(other) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["ck", "empty", "other"]   # no temp dirs left


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_no_partial_directory(existing, tmp_path, monkeypatch):
    model = llama()
    reft_ext.patch(model, [0, 1], rank=2)
    target = tmp_path / "ck"
    if existing:
        reft_ext.save(model, target)
        old = {f: (target / f).read_bytes() for f in os.listdir(target)}
    randomise(model)
    real = reft_ext.checkpoint._atomic._write_file

    def failing(path, data):
        if path.name == CONFIG_NAME:          # after the weights file was written
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(reft_ext.checkpoint._atomic, "_write_file", failing)
    with pytest.raises(OSError, match="No space left"):
        reft_ext.save(model, target)
    if existing:
        assert {f: (target / f).read_bytes() for f in os.listdir(target)} == old
    assert os.listdir(tmp_path) == (["ck"] if existing else [])


def test_save_errors():
    with pytest.raises(CheckpointError, match="not patched"):
        reft_ext.save(llama(), "unused")

    class Custom(nn.Module):
        def __init__(self, d, rank, dtype=None, device=None):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(rank, d))

        def forward(self, h, positions, inplace=True):
            return h

    model = llama()
    reft_ext.patch(model, [0], rank=2, intervention=Custom)
    with pytest.raises(CheckpointError, match="holds a Custom"):
        reft_ext.save(model, "unused")


# ------------------------------------------------------------------ bad checkpoints

def snapshot(model):
    """Everything load() could change: modules, parameters (bits, flags, identity),
    buffers, hooks, instance attributes."""
    hooks = {}
    for name, m in model.named_modules():
        hooks[name] = tuple(
            (attr, tuple((k, id(v)) for k, v in getattr(m, attr).items()))
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                         "_backward_pre_hooks", "_state_dict_hooks",
                         "_load_state_dict_pre_hooks"))
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.dtype, p.detach().clone())
                   for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": hooks,
        "dict": sorted(model.__dict__),
        "patched": reft_ext.is_patched(model),
        "interventions": ({i: type(m).__name__ for i, m in reft_ext.interventions(model).items()}
                          if reft_ext.is_patched(model) else None),
    }


def assert_same_snapshot(a, b):
    assert a["modules"] == b["modules"]
    assert [x[:4] for x in a["params"]] == [x[:4] for x in b["params"]]
    for x, y in zip(a["params"], b["params"]):
        assert_bitwise_equal(y[4], x[4], x[0])
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert_bitwise_equal(b["state"][k], a["state"][k], k)
    assert a["hooks"] == b["hooks"]
    assert a["dict"] == b["dict"]
    assert (a["patched"], a["interventions"]) == (b["patched"], b["interventions"])


def _rewrite(ck, tensors=None, cfg_edit=None, update_sha=True):
    """Rewrites a checkpoint's weights (tensors: dict) and/or config (cfg_edit(cfg))."""
    from safetensors.torch import save
    cpath = ck / CONFIG_NAME
    cfg = json.loads(cpath.read_text())
    if tensors is not None:
        blob = save(tensors)
        (ck / WEIGHTS_NAME).write_bytes(blob)
        if update_sha:
            cfg["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    if cfg_edit is not None:
        cfg_edit(cfg)
    cpath.write_text(json.dumps(cfg))


def _corrupt(kind, ck):
    from safetensors.torch import load_file
    t = load_file(ck / WEIGHTS_NAME)
    wpath = ck / WEIGHTS_NAME
    if kind == "truncated":
        blob = wpath.read_bytes()
        wpath.write_bytes(blob[: len(blob) // 2])
    elif kind == "truncated-no-sha":
        blob = wpath.read_bytes()
        wpath.write_bytes(blob[: len(blob) // 2])
        _rewrite(ck, cfg_edit=lambda c: c.pop("weights_sha256"))
    elif kind == "bitflip":
        blob = bytearray(wpath.read_bytes())
        blob[-3] ^= 0x10
        wpath.write_bytes(bytes(blob))
    elif kind == "missing-weights":
        wpath.unlink()
    elif kind == "missing-tensor":
        t.pop("layers.1.b")
        _rewrite(ck, t)
    elif kind == "extra-tensor":
        t["layers.1.extra"] = torch.zeros(2)
        _rewrite(ck, t)
    elif kind == "manifest-missing":
        t.pop("layers.1.rotate_raw")
        _rewrite(ck, t, lambda c: c["tensors"].pop("layers.1.rotate_raw"))
    elif kind == "wrong-shape":
        t["layers.1.W"] = torch.zeros(2, 31)
        _rewrite(ck, t)
    elif kind == "wrong-dtype":
        t["layers.1.W"] = t["layers.1.W"].double()
        _rewrite(ck, t)
    elif kind == "R-disagrees":
        t["layers.1.R"] = torch.linalg.qr(torch.randn(32, 2))[0].T.contiguous()
        _rewrite(ck, t)
    elif kind == "nan":
        t["layers.1.W"][0, 0] = float("nan")
        _rewrite(ck, t)
    elif kind == "format-version-3":
        _rewrite(ck, cfg_edit=lambda c: c.update(format_version=3))
    elif kind == "format-version-0":
        _rewrite(ck, cfg_edit=lambda c: c.update(format_version=0))
    elif kind == "other-format":
        _rewrite(ck, cfg_edit=lambda c: c.update(format="peft"))
    elif kind == "unknown-intervention":
        _rewrite(ck, cfg_edit=lambda c: c.update(intervention="moreft"))
    elif kind == "bad-positions":
        _rewrite(ck, cfg_edit=lambda c: c.update(positions="first7"))
    elif kind == "bad-backend":
        _rewrite(ck, cfg_edit=lambda c: c.update(backend="triton"))
    elif kind == "config-truncated":
        cpath = ck / CONFIG_NAME
        cpath.write_text(cpath.read_text()[:40])
    elif kind == "config-missing":
        (ck / CONFIG_NAME).unlink()
    elif kind == "layer-out-of-range":
        _rewrite(ck, cfg_edit=lambda c: c.update(layers=[0, 5]))
    elif kind == "tied-not-bool":
        _rewrite(ck, cfg_edit=lambda c: c.update(tied="no"))
    elif kind == "untied-claimed":   # a tied file that says untied: its tensors do not fit
        _rewrite(ck, cfg_edit=lambda c: c.update(tied=False, positions="f2+l2"))
    else:
        raise AssertionError(kind)


BAD = {
    "truncated": "corrupt or truncated", "truncated-no-sha": "corrupt or truncated",
    "bitflip": "corrupt or truncated", "missing-weights": "cannot read",
    "missing-tensor": r"missing tensors \['layers.1.b'\]",
    "extra-tensor": r"extra tensors \['layers.1.extra'\]",
    "manifest-missing": r"manifest does not match.*missing \['layers.1.rotate_raw'\]",
    "wrong-shape": "layers.1.W is float32 \\[2, 31\\]", "wrong-dtype": "layers.1.W is float64",
    "R-disagrees": "layers.1.R and layers.1.rotate_raw disagree", "nan": "non-finite",
    "format-version-3": "format version 3, written by a newer reft_ext",
    "format-version-0": "invalid format version 0", "other-format": "not a reft_ext checkpoint",
    "unknown-intervention": "unknown intervention 'moreft'",
    "bad-positions": "bad positions spec 'first7'", "bad-backend": "backend 'triton'",
    "config-truncated": "not valid JSON", "config-missing": "reft_config.json not found",
    "layer-out-of-range": "inconsistent",
    "tied-not-bool": "'tied' must be true or false",
    "untied-claimed": r"manifest does not match.*missing \['layers.0#0.R'",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = llama()
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 1], rank=2)
    randomise(model)
    ck = tmp_path_factory.mktemp("saved") / "ck"
    reft_ext.save(model, ck)
    return ck


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_raises_before_any_change(kind, patched, saved, tmp_path):
    import shutil
    ck = tmp_path / "ck"
    shutil.copytree(saved, ck)
    _corrupt(kind, ck)
    model = llama()
    if patched:
        reft_ext.patch(model, [0, 1], rank=2)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=BAD[kind]):
        reft_ext.load(model, ck)
    assert_same_snapshot(before, snapshot(model))


MISFITS = {
    # name: (model builder, patch kwargs or None, message)
    "other-d": (lambda: llama(d=48), None, "has d=32 but this model's hidden size is 48"),
    "other-layer-count": (lambda: llama(n_layers=4), None, "with 3 layers"),
    "no-such-layer-path": (lambda: PlainDecoder(), None, "saved from a model with layers at"),
    "patched-other-layers": (llama, dict(layers=[0, 2], rank=2), "layers \\[0, 2\\] vs"),
    "patched-other-rank": (llama, dict(layers=[0, 1], rank=3), "rank=3"),
    "patched-other-kind": (llama, dict(layers=[0, 1], rank=2, intervention="direft"),
                           "holds a DiReFT"),
    "patched-other-dtype": (llama, dict(layers=[0, 1], rank=2, dtype=torch.float64),
                            "float32 but the patched model's parameter is float64"),
    "patched-other-layer-count": (lambda: llama(n_layers=4), dict(layers=[0, 1], rank=2),
                                  "4 layers in the model vs 3"),
}


@pytest.mark.parametrize("case", list(MISFITS))
def test_checkpoint_that_does_not_fit_raises_before_any_change(case, saved):
    build, kw, msg = MISFITS[case]
    model = build()
    if kw is not None:
        kw = dict(kw)
        reft_ext.patch(model, kw.pop("layers"), kw.pop("rank"), **kw)
    before = snapshot(model)
    with pytest.raises(CheckpointError, match=msg):
        reft_ext.load(model, saved)
    assert_same_snapshot(before, snapshot(model))


def test_save_and_load_through_wrappers(tmp_path):
    """save() finds the patched model inside DDP-style (.module) and torch.compile
    (._orig_mod) wrappers; load() into such a wrapper of a patched model works in place."""
    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    class Compiled(nn.Module):      # the attribute torch.compile's OptimizedModule uses
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    model = llama()
    reft_ext.patch(model, [0], rank=2)
    randomise(model)
    reft_ext.save(Wrapper(Compiled(model)), tmp_path / "ck")
    other = reft_ext.patch(llama(), [0], rank=2)
    reft_ext.load(Wrapper(other), tmp_path / "ck")
    for k, v in params(model).items():
        assert_bitwise_equal(params(other)[k], v, k)


def test_load_into_wrapper_of_unpatched_model_is_refused(saved):
    w = nn.DataParallel(llama())
    before = snapshot(w)
    with pytest.raises(CheckpointError, match="before wrapping"):
        reft_ext.load(w, saved)
    assert_same_snapshot(before, snapshot(w))


# ------------------------------------------------------------------ resume

def _train(model, opt, steps, ids, mask, labels):
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()


def _adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                             weight_decay=0.01)


@pytest.mark.parametrize("kind", ["loreft", "noreft", "noreft+add_bias", "consreft",
                                  "lobireft", "direft", "nodireft"])
def test_resume_is_bitwise_identical(kind, tmp_path):
    """k steps, save (+ optimizer), then N - k more steps == N - k steps after a reload
    into a fresh base model with a fresh optimizer: bitwise."""
    base = llama().train()
    ids, mask = batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    kind, arg = intervention_arg(kind)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2", intervention=arg)
    opt = _adamw(model)
    _train(model, opt, 3, ids, mask, labels)
    reft_ext.save(model, tmp_path / "ck", optimizer=opt)
    assert (tmp_path / "ck" / OPTIMIZER_NAME).is_file()
    _train(model, opt, 4, ids, mask, labels)

    resumed = reft_ext.load(copy.deepcopy(base), tmp_path / "ck")
    opt2 = _adamw(resumed)
    reft_ext.load_optimizer(opt2, tmp_path / "ck")
    _train(resumed, opt2, 4, ids, mask, labels)
    a, b = params(model), params(resumed)
    for k in a:
        assert_bitwise_equal(b[k], a[k], k)
    if kind in ("loreft", "consreft", "lobireft", "direft"):     # R stayed orthonormal
        for m in reft_ext.interventions(resumed).values():
            R = m.R.detach().double()
            torch.testing.assert_close(R @ R.T, torch.eye(4, dtype=torch.float64), rtol=0,
                                       atol=1e-6)


def test_load_optimizer_errors(tmp_path):
    model = llama()
    reft_ext.patch(model, [0, 1], rank=2)
    reft_ext.save(model, tmp_path / "plain")
    opt = _adamw(model)
    with pytest.raises(CheckpointError, match="optimizer.pt not found"):
        reft_ext.load_optimizer(opt, tmp_path / "plain")
    ids, mask = batch(left=False)
    _train(model, opt, 1, ids, mask, ids)
    reft_ext.save(model, tmp_path / "ck", optimizer=opt)
    with pytest.raises(CheckpointError, match="holds AdamW state"):
        reft_ext.load_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "ck")
    fewer = torch.optim.AdamW(list(reft_ext.interventions(model)[0].parameters()))
    with pytest.raises(CheckpointError, match="groups of sizes \\[6\\].*\\[3\\]"):
        reft_ext.load_optimizer(fewer, tmp_path / "ck")
    other = llama()
    reft_ext.patch(other, [0, 1], rank=3)
    with pytest.raises(CheckpointError, match="has shape \\(2, 32\\), the parameter \\(3, 32\\)"):
        opt3 = _adamw(other)
        reft_ext.load_optimizer(opt3, tmp_path / "ck")
    assert opt3.state_dict()["state"] == {}


# ------------------------------------------------------------------ Trainer

def _trainer(tf, model, out, rows, max_steps, callback):
    args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2,
                                max_steps=max_steps, learning_rate=1e-2, report_to=[],
                                use_cpu=True, save_strategy="steps", save_steps=2,
                                logging_strategy="no", seed=0, data_seed=0,
                                dataloader_num_workers=0)
    return tf.Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])


def test_trainer_callback_saves_and_resumes(tmp_path):
    """Trainer with ReftCheckpointCallback: every checkpoint-N holds reft/; a run resumed
    from checkpoint-2 ends bitwise where the uninterrupted run ends; reft/ of the last
    checkpoint reproduces the trained model on a fresh base model."""
    pytest.importorskip("accelerate")
    tf = pytest.importorskip("transformers")
    base = llama()
    ids, mask = batch(B=3, left=False)
    rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)}
            for i, m in zip(ids, mask)] * 3

    model = copy.deepcopy(base)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    _trainer(tf, model, tmp_path / "run", rows, 4, reft_ext.ReftCheckpointCallback()).train()
    for step in (2, 4):
        assert (tmp_path / "run" / f"checkpoint-{step}" / "reft" / CONFIG_NAME).is_file()

    # resume from checkpoint-2 with a differently initialised patched model
    resumed = copy.deepcopy(base)
    torch.manual_seed(123)
    reft_ext.patch(resumed, [0, 2], rank=4, positions="f2+l2")
    cb = reft_ext.ReftCheckpointCallback(resume_from=tmp_path / "run" / "checkpoint-2")
    _trainer(tf, resumed, tmp_path / "run2", rows, 4, cb).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert cb.loaded_from == tmp_path / "run" / "checkpoint-2" / "reft"
    a, b = params(model), params(resumed)
    for k in a:
        assert_bitwise_equal(b[k], a[k], k)

    fresh = reft_ext.load(copy.deepcopy(base), tmp_path / "run" / "checkpoint-4" / "reft")
    model.eval()
    assert_bitwise_equal(logits(fresh, ids, mask), logits(model, ids, mask), "logits")
