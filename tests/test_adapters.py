"""Named adapters on one patched model and mixed-adapter batches (issue 17).

What a user can combine with them, each tested here against an independent result:
* each row of a mixed batch against the same batch run with that row's adapter on every row
  (bitwise: the same shapes, so the base model's arithmetic is the same), against that row
  run alone (B = 1, to the base model's batch-size rounding), and rows with None against the
  base model (bitwise);
* adapters with other layers, ranks, specs, types, tied and untied, custom modules and
  active dropout (paths that leave the bank), explicit positions and the positions context;
* generate (greedy, beams, num_return_sequences) against single-adapter generation;
* training several adapters at once against training each alone on its own examples
  (float64, so "equal" is checked to 1e-12), two forwards before one backward with
  gradient checkpointing, deepcopy;
* save / load of one adapter and of all of them, into fresh and patched models, and every
  validation error before any change.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import reft_ext
import reft_ext.model.adapters as adapters_mod
from patch_helpers import batch, build, call

ROWS = ["a", "b", None, "c", "u", "a", "b", "c"]   # row i has length 9, 6, 2 for i % 3 = 0, 1, 2


def _perturb(model):
    """Non-trivial edits: random biases and weights (a fresh LoReFT's W b are small)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _model(name="llama", dtype=None):
    """Four adapters: a, b (same rank: one bank), c (other rank and spec, other layers),
    u (untied, same rank as a and b)."""
    model, _ = build(name)
    if dtype is not None:
        model = model.to(dtype)
    torch.manual_seed(3)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="a")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="l3", adapter="b", intervention="noreft")
    reft_ext.patch(model, [1], rank=3, positions="f1", adapter="c", intervention="direft")
    reft_ext.patch(model, [0, 1], rank=2, positions="f2+l2", adapter="u", tied=False)
    _perturb(model)
    return model


def _ids(B=8, T=9, left=True):
    """Rows of lengths T, T-3, 2, repeated. Float64 tests pad on the right: transformers'
    eager attention gives NaN on left-padded rows in float64 (a fully masked pad query)."""
    ids, mask = batch(B=3, T=T, left=left)
    reps = (B + 2) // 3
    return ids.repeat(reps, 1)[:B], mask.repeat(reps, 1)[:B]


@pytest.mark.parametrize("name", ["llama", "plain", "gpt2"])
def test_mixed_rows_equal_single_adapter_batches_bitwise(name, monkeypatch):
    model = _model(name)
    ids, mask = _ids()
    calls = []
    real = adapters_mod.bank_call
    monkeypatch.setattr(adapters_mod, "bank_call",
                        lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    with torch.no_grad():
        mixed = call(model, ids, mask, name, reft_adapter=ROWS)
        assert calls == [1 + 1 + 2, 1 + 2, 2]   # layer 0: a b u; 1: b u (c alone); 2: a b
        base = call(model, ids, mask, name, reft_adapter=[None] * len(ROWS))
        with reft_ext.disabled(model):
            assert torch.equal(base, call(model, ids, mask, name))
        for a in "abcu":
            single = call(model, ids, mask, name, reft_adapter=a)
            for i, r in enumerate(ROWS):
                if r == a:
                    assert torch.equal(mixed[i], single[i]), (a, i)
                    assert not torch.equal(single[i], base[i]), (a, i)   # it edits
        for i, r in enumerate(ROWS):
            if r is None:
                assert torch.equal(mixed[i], base[i]), i


def test_mixed_row_equals_the_row_run_alone():
    model = _model()
    ids, mask = _ids()
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=ROWS)
        for i, r in enumerate(ROWS):
            alone = call(model, ids[i:i + 1], mask[i:i + 1], "llama", reft_adapter=[r])
            valid = mask[i].bool()
            torch.testing.assert_close(mixed[i][valid], alone[0][valid], rtol=1e-5, atol=1e-5)


def test_adapter_lists_of_one_name_and_default():
    model = _model()
    ids, mask = _ids()
    with torch.no_grad():
        as_list = call(model, ids, mask, "llama", reft_adapter=["b"] * len(ROWS))
        assert torch.equal(as_list, call(model, ids, mask, "llama", reft_adapter="b"))
        reft_ext.set_adapter(model, "b")
        assert torch.equal(as_list, call(model, ids, mask, "llama"))
        assert reft_ext.adapters(model)["b"]["default"]
        assert {a: (c["rank"], c["intervention"], c["tied"])
                for a, c in reft_ext.adapters(model).items()} == {
            "a": (2, "loreft", True), "b": (2, "noreft", True), "c": (3, "direft", True),
            "u": (2, "loreft", False)}
        assert list(reft_ext.interventions(model)) == [0, 1, 2]


def test_explicit_positions_and_context_with_mixed_rows():
    model = _model()
    ids, mask = _ids()
    rows = ["a", "b", None, "c", "a", "c", "b", None]     # all tied
    pos = torch.tensor([[0, 4, 8]] * len(rows))
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=rows, reft_positions=pos)
        with reft_ext.positions(model, pos):
            assert torch.equal(mixed, call(model, ids, mask, "llama", reft_adapter=rows))
        for a in "abc":
            single = call(model, ids, mask, "llama", reft_adapter=a, reft_positions=pos)
            for i, r in enumerate(rows):
                if r == a:
                    assert torch.equal(mixed[i], single[i]), (a, i)
        with pytest.raises(ValueError, match="mixing tied and untied"):
            call(model, ids, mask, "llama", reft_adapter=ROWS, reft_positions=pos)


def test_generate_mixed_equals_single_adapter_generate():
    model = _model()
    ids, mask = _ids()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
              pad_token_id=0)
    mixed = model.generate(**kw, reft_adapter=ROWS)
    base = model.generate(**kw, reft_adapter=[None] * len(ROWS))
    differs = 0
    for a in "abcu":
        single = model.generate(**kw, reft_adapter=a)
        for i, r in enumerate(ROWS):
            if r == a:
                assert torch.equal(mixed[i], single[i]), (a, i)
                differs += not torch.equal(single[i], base[i])
    assert differs >= 3                          # the adapters change the generated tokens
    for i, r in enumerate(ROWS):
        if r is None:
            assert torch.equal(mixed[i], base[i])


@pytest.mark.parametrize("expand", [dict(num_beams=2), dict(num_return_sequences=2,
                                                             do_sample=True)])
def test_generate_mixed_with_expanded_batches(expand):
    model = _model()
    ids, mask = _ids(B=4)
    rows = ROWS[:4]
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
              **expand)
    torch.manual_seed(5)
    mixed = model.generate(**kw, reft_adapter=rows)
    for a in ("a", "b"):
        torch.manual_seed(5)
        single = model.generate(**kw, reft_adapter=a)
        k = mixed.shape[0] // 4
        for i, r in enumerate(rows):
            if r == a and "do_sample" not in expand:
                assert torch.equal(mixed[i * k:(i + 1) * k], single[i * k:(i + 1) * k])
    assert mixed.shape[0] == 4 * (2 if "num_return_sequences" in expand else 1)


def _losses(logits, ids, mask):
    """Per-row summed next-token loss (B,)."""
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tok = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return -(tok * mask[:, 1:]).sum(-1)


def test_training_several_adapters_equals_training_each_alone():
    model = _model(dtype=torch.float64)
    model.train()
    ids, mask = _ids(left=False)
    loss = _losses(call(model, ids, mask, "llama", reft_adapter=ROWS), ids, mask).sum()
    loss.backward()
    mixed = {n: p.grad.clone() for n, p in model.reft_interventions.named_parameters()}
    for a in "abcu":
        model.zero_grad(set_to_none=True)
        keep = [i for i, r in enumerate(ROWS) if r == a]
        sub_ids, sub_mask = ids[keep], mask[keep]
        _losses(call(model, sub_ids, sub_mask, "llama", reft_adapter=a),
                sub_ids, sub_mask).sum().backward()
        for n, p in model.reft_interventions.named_parameters():
            if n.startswith(a + "."):
                assert p.grad is not None and p.grad.abs().max() > 0, n
                torch.testing.assert_close(mixed[n], p.grad, rtol=1e-10, atol=1e-12)
            else:
                assert p.grad is None, n


def test_two_mixed_forwards_before_backward_with_checkpointing():
    from patch_helpers import enable_checkpointing
    model = _model(dtype=torch.float64)
    ref = copy.deepcopy(model)
    model.train()
    ref.train()
    enable_checkpointing(model)
    ids, mask = _ids(left=False)
    other = ROWS[::-1]
    total = (_losses(call(model, ids, mask, "llama", reft_adapter=ROWS), ids, mask).sum()
             + _losses(call(model, ids, mask, "llama", reft_adapter=other), ids, mask).sum())
    total.backward()
    for rows in (ROWS, other):
        _losses(call(ref, ids, mask, "llama", reft_adapter=rows), ids, mask).sum().backward()
    got = dict(model.reft_interventions.named_parameters())
    for n, p in ref.reft_interventions.named_parameters():
        torch.testing.assert_close(got[n].grad, p.grad, rtol=1e-10, atol=1e-12)


def test_paths_outside_the_bank_dropout_and_custom_modules():
    model, _ = build("llama")
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 1], rank=2, positions="f2", adapter="a", dropout=0.5)
    reft_ext.patch(model, [0, 1], rank=2, positions="l2", adapter="b")
    _perturb(model)
    ids, mask = _ids()
    rows = ["a", "b", None, "a", "b", None, "a", "b"]
    with torch.no_grad():
        base = call(model, ids, mask, "llama", reft_adapter=[None] * 8)
        model.train()                        # a's dropout is active: a runs on its own
        out = call(model, ids, mask, "llama", reft_adapter=rows)
        model.eval()
        single_b = call(model, ids, mask, "llama", reft_adapter="b")
    for i, r in enumerate(rows):
        if r is None:
            assert torch.equal(out[i], base[i])
        if r == "b":   # b has no dropout: the same in train mode (the model has none either)
            assert torch.equal(out[i], single_b[i])


def test_delete_and_set_adapter():
    model = _model()
    blocks = list(model.model.layers)
    n_params = len(list(model.parameters()))
    reft_ext.delete_adapter(model, "c")
    assert list(reft_ext.adapters(model)) == ["a", "b", "u"]
    assert "c" not in model.reft_interventions
    assert len(list(model.parameters())) < n_params
    reft_ext.delete_adapter(model, "b")            # layer 1 keeps u, layer 2 keeps a
    reft_ext.delete_adapter(model, "a")            # the default: u becomes it
    assert reft_ext.adapters(model)["u"]["default"]
    assert "_reft_link" not in blocks[2].__dict__ and not blocks[2]._forward_hooks
    assert "_reft_link" in blocks[1].__dict__
    with pytest.raises(ValueError, match="only adapter"):
        reft_ext.delete_adapter(model, "u")
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        reft_ext.set_adapter(model, "a")
    reft_ext.unpatch(model)
    assert all(not b._forward_hooks and "_reft_link" not in b.__dict__ for b in blocks)


def test_deepcopy_keeps_adapters_independent():
    model = _model()
    clone = copy.deepcopy(model)
    ids, mask = _ids()
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=ROWS)
        assert torch.equal(call(clone, ids, mask, "llama", reft_adapter=ROWS), want)
        clone.reft_interventions["b"]["1"].bias.add_(1.0)
        assert torch.equal(call(model, ids, mask, "llama", reft_adapter=ROWS), want)


@pytest.mark.parametrize("bad, err, match", [
    (["a", "nope"] + ["a"] * 6, ValueError, r"reft_adapter\[1\] names adapter 'nope'"),
    (["a", "b"], ValueError, "lists 2 adapters for (a batch of )?8"),
    ([], ValueError, "empty"),
    ("zzz", ValueError, "'zzz', which this model does not have"),
    (["a", 3] + ["a"] * 6, TypeError, r"reft_adapter\[1\]"),
    (3, TypeError, "reft_adapter must be"),
])
def test_bad_selections_raise_before_anything_runs(bad, err, match):
    model = _model()
    ids, mask = _ids()
    ran = []
    model.model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(err, match=match):
        call(model, ids, mask, "llama", reft_adapter=bad)
    with pytest.raises(err, match=match):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                       pad_token_id=0, reft_adapter=bad)
    assert not ran


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "keys", "training", "-x", 3])
def test_bad_adapter_names(name):
    model, _ = build("llama")
    with pytest.raises(ValueError, match="adapter names are"):
        reft_ext.patch(model, [0], rank=2, adapter=name)
    assert not reft_ext.is_patched(model)


def test_patch_errors_when_adding():
    model = _model()
    before = dict(model.state_dict())
    with pytest.raises(ValueError, match="already patched with an adapter named 'a'"):
        reft_ext.patch(model, [0], rank=2, adapter="a")
    with pytest.raises(ValueError, match="rank=40 exceeds"):
        reft_ext.patch(model, [0], rank=40, adapter="z")
    assert dict(model.state_dict()).keys() == before.keys()


# ---------------------------------------------------------------- save / load

def test_save_one_adapter_and_load_under_names(tmp_path):
    model = _model()
    with pytest.raises(reft_ext.CheckpointError, match="name the one to save"):
        reft_ext.save(model, tmp_path / "x")
    for a in "abcu":
        reft_ext.save(model, tmp_path / a, adapter=a)
    fresh, _ = build("llama")
    for a in "abcu":
        reft_ext.load(fresh, tmp_path / a, adapter=a)
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(call(fresh, ids, mask, "llama", reft_adapter=ROWS),
                           call(model, ids, mask, "llama", reft_adapter=ROWS))
    # loading into an existing adapter fills it in place
    p = fresh.reft_interventions["b"]["1"].bias
    with torch.no_grad():
        p.zero_()
    reft_ext.load(fresh, tmp_path / "b", adapter="b")
    assert fresh.reft_interventions["b"]["1"].bias is p
    assert torch.equal(p, model.reft_interventions["b"]["1"].bias)


def test_save_and_load_all_adapters(tmp_path):
    model = _model()
    reft_ext.set_adapter(model, "b")
    reft_ext.save_adapters(model, tmp_path / "all")
    index = json.loads((tmp_path / "all" / "reft_adapters.json").read_text())
    assert index["adapters"] == ["a", "b", "c", "u"] and index["default"] == "b"
    fresh, _ = build("llama")
    reft_ext.load_adapters(fresh, tmp_path / "all")
    assert reft_ext.adapters(fresh) == reft_ext.adapters(model)
    ids, mask = _ids()
    with torch.no_grad():
        assert torch.equal(call(fresh, ids, mask, "llama", reft_adapter=ROWS),
                           call(model, ids, mask, "llama", reft_adapter=ROWS))
        assert torch.equal(call(fresh, ids, mask, "llama"), call(model, ids, mask, "llama"))
    # each subdirectory is an ordinary checkpoint
    one, _ = build("llama")
    reft_ext.load(one, tmp_path / "all" / "u")
    assert reft_ext.adapters(one)["default"] == {**reft_ext.adapters(model)["u"], "default": True}
    # saving again replaces the directory; a non-adapters directory is refused
    reft_ext.save_adapters(model, tmp_path / "all")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(reft_ext.CheckpointError, match="refusing to replace"):
        reft_ext.save_adapters(model, tmp_path / "other")


def test_load_adapters_is_all_or_nothing(tmp_path):
    model = _model()
    reft_ext.save_adapters(model, tmp_path / "all")
    # c fits no other model than one with layer 1 of rank 3: make the target's c clash
    target, _ = build("llama")
    reft_ext.patch(target, [0], rank=2, adapter="keep")
    reft_ext.patch(target, [1], rank=5, adapter="c")
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(reft_ext.CheckpointError, match="adapter 'c'"):
        reft_ext.load_adapters(target, tmp_path / "all")
    assert list(reft_ext.adapters(target)) == ["keep", "c"]
    assert state.keys() == target.state_dict().keys()
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in state.items())
    # an unpatched model stays unpatched
    fresh, _ = build("llama")
    (tmp_path / "all" / "u" / "reft_model.safetensors").write_bytes(b"broken")
    with pytest.raises(reft_ext.CheckpointError):
        reft_ext.load_adapters(fresh, tmp_path / "all")
    assert not reft_ext.is_patched(fresh)


@pytest.mark.parametrize("index", [
    {"format": "other", "format_version": 1, "adapters": ["a"], "default": "a"},
    {"format": "reft_ext_adapters", "format_version": 1, "adapters": ["../a"], "default": "../a"},
    {"format": "reft_ext_adapters", "format_version": 1, "adapters": ["a", "a"], "default": "a"},
    {"format": "reft_ext_adapters", "format_version": 1, "adapters": ["a"], "default": "b"},
    {"format": "reft_ext_adapters", "format_version": 9, "adapters": ["a"], "default": "a"},
])
def test_bad_adapter_index_raises(tmp_path, index):
    model = _model()
    reft_ext.save_adapters(model, tmp_path / "all")
    (tmp_path / "all" / "reft_adapters.json").write_text(json.dumps(index))
    fresh, _ = build("llama")
    with pytest.raises(reft_ext.CheckpointError, match="index|version"):
        reft_ext.load_adapters(fresh, tmp_path / "all")
    assert not reft_ext.is_patched(fresh)


@pytest.mark.parametrize("other", ["d", "layers"])
def test_adapter_saved_for_another_base_model_raises_naming_it(tmp_path, other):
    tf = pytest.importorskip("transformers")
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64)
    cfg["hidden_size" if other == "d" else "num_hidden_layers"] = 48 if other == "d" else 4
    src = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg))
    reft_ext.patch(src, [0], rank=2, adapter="sql")
    reft_ext.save(src, tmp_path / "sql")
    model = _model()
    keys = set(model.state_dict())
    with pytest.raises(reft_ext.CheckpointError, match="adapter 'sql'"):
        reft_ext.load(model, tmp_path / "sql", adapter="sql")
    assert set(model.state_dict()) == keys and "sql" not in reft_ext.adapters(model)


# ---------------------------------------------------------------- Hugging Face Trainer

def test_trainer_trains_several_adapters_and_the_callback_saves_and_resumes_them(tmp_path):
    """Each example names its adapter (a collator passes reft_adapter= as a list; the
    Trainer must keep the column: remove_unused_columns=False). The callback writes
    save_adapters directories; a run resumed from checkpoint-2 ends bitwise where the
    uninterrupted run ends; every parameter of both adapters moved."""
    pytest.importorskip("accelerate")
    tf = pytest.importorskip("transformers")
    from reft_ext.checkpoint.adapters import INDEX_NAME

    def build_patched(seed):
        model, _ = build("llama")
        torch.manual_seed(seed)
        reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="a")
        reft_ext.patch(model, [1], rank=2, positions="l2", adapter="b")
        return model

    ids, mask = _ids(B=6, left=False)
    rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100),
             "reft_adapter": "ab"[k % 2]} for k, (i, m) in enumerate(zip(ids, mask))]

    def collate(feats):
        out = {k: torch.stack([f[k] for f in feats])
               for k in ("input_ids", "attention_mask", "labels")}
        out["reft_adapter"] = [f["reft_adapter"] for f in feats]
        return out

    def trainer(model, out, cb):
        args = tf.TrainingArguments(output_dir=str(out), per_device_train_batch_size=2,
                                    max_steps=4, learning_rate=1e-2, report_to=[],
                                    use_cpu=True, save_strategy="steps", save_steps=2,
                                    logging_strategy="no", seed=0, data_seed=0,
                                    dataloader_num_workers=0, remove_unused_columns=False)
        return tf.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate,
                          callbacks=[cb])

    model = build_patched(0)
    init = {n: p.detach().clone() for n, p in model.reft_interventions.named_parameters()}
    trainer(model, tmp_path / "run", reft_ext.ReftCheckpointCallback()).train()
    for n, p in model.reft_interventions.named_parameters():
        assert not torch.equal(p, init[n]), n
    assert (tmp_path / "run" / "checkpoint-2" / "reft" / INDEX_NAME).is_file()

    resumed = build_patched(123)
    cb = reft_ext.ReftCheckpointCallback(resume_from=tmp_path / "run" / "checkpoint-2")
    trainer(resumed, tmp_path / "run2", cb).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    got = dict(resumed.reft_interventions.named_parameters())
    for n, p in model.reft_interventions.named_parameters():
        assert torch.equal(got[n], p), n


def test_added_adapter_takes_d_from_the_others_when_it_cannot_be_inferred():
    """A layer without parameters has no inferable hidden size: the first adapter needs
    hidden_size=, a later one on that layer reuses the model's d (one residual width)."""
    from patch_helpers import PlainDecoder

    class Skip(torch.nn.Module):
        def forward(self, x, *args, **kwargs):
            return x.clone()

    model = PlainDecoder()
    model.blocks[1] = Skip()
    with pytest.raises(ValueError, match="cannot infer the hidden size"):
        reft_ext.patch(model, [1], rank=2, layer_path="blocks")
    reft_ext.patch(model, [1], rank=2, layer_path="blocks", hidden_size=32)
    reft_ext.patch(model, [1], rank=3, adapter="b")
    assert reft_ext.interventions(model, "b")[1].d == 32
    x = torch.randint(3, 90, (2, 5))
    with torch.no_grad():
        out = model(x, reft_adapter=["b", None])
        with reft_ext.disabled(model):
            base = model(x)
    assert not torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
