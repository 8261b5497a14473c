"""Mixed-adapter batches combined with the rest of PyTorch and reft_ext (adversarial tests).

Every result is checked against something that does not go through Mixed / the bank:

* ``_RowReference``: plain forward hooks on an unpatched copy of the base model that apply,
  row by row, the row's adapter's edit with the pyreft formula of its type (README table,
  written out here from the module's own parameters, not from kernel_params) at positions
  from a Python loop over the attention mask (tied and untied rules written out here);
* single-adapter runs of deep copies from which every other adapter was deleted;
* finite differences, SGD by hand.

The bugs this pass found are fixed; their tests stay as regression tests.
"""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from torch import nn

import reft_ext
import reft_ext.model.adapters as adapters_mod
from patch_helpers import PlainDecoder, build, call
from reft_ext.modules import orthonormal_rows

pytestmark = pytest.mark.filterwarnings(
    r"ignore:<class 'torch\.autograd\.function\.Function'> should not be instantiated"
    r":DeprecationWarning",
    "ignore:The .grad attribute of a Tensor that is not a leaf")

VOCAB = 97


# ----------------------------------------------------------------- independent reference

def _phi(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """pyreft's edit of type(mod) at rows x (n, d), from the module's parameters."""
    kind = {reft_ext.LoReFT: "loreft", reft_ext.NoReFT: "noreft", reft_ext.ConsReFT: "consreft",
            reft_ext.LobiReFT: "lobireft", reft_ext.DiReFT: "direft",
            reft_ext.NodiReFT: "nodireft"}[type(mod)]
    p = {n: t.detach() for n, t in mod.named_parameters()}
    dt = p["bias"].dtype
    xs = x.to(torch.float64) if dt == torch.float64 else x.float()
    p = {n: t.to(xs.dtype) for n, t in p.items()}
    R = orthonormal_rows(p["rotate_raw"]) if "rotate_raw" in p else None
    b = p["bias"]
    if kind == "loreft":
        delta = (xs @ p["weight"].T + b - xs @ R.T) @ R
    elif kind == "noreft":
        c = p.get("proj_bias", torch.zeros_like(b))
        W1, W2 = p["weight"], p["proj"]
        delta = (xs @ W1.T + b - (xs @ W2.T + c)) @ W2
    elif kind == "consreft":
        delta = (b - xs @ R.T) @ R
    elif kind == "lobireft":
        delta = (b + 0 * xs @ R.T) @ R
    elif kind == "direft":
        delta = (xs @ p["weight"].T + b) @ R
    elif kind == "nodireft":
        delta = (xs @ p["weight"].T + b) @ p["proj"]
    else:
        raise AssertionError(kind)
    return (xs + delta).to(x.dtype)


def _loop_positions(cfg: dict, valid: list[int]):
    """[(member index or None for tied, [token indices])] of one row, pure Python."""
    spec, tied = cfg["positions"], cfg["tied"]
    n = len(valid)
    if spec == "all":
        return [(None, valid)]
    if spec == "last":
        spec = "l1"
    first = last = 0
    for part in spec.split("+"):
        if part[0] == "f":
            first = int(part[1:])
        else:
            last = int(part[1:])
    if not tied:
        k0, k1 = min(first, n // 2), min(last, n // 2)
        return [(0, valid[:k0]), (1, valid[n - k1:] if k1 else [])]
    sel = sorted(set(valid[:first]) | set(valid[n - last:] if last else []))
    return [(None, sel)]


class _RowReference:
    """Forward hooks on ``base`` (an unpatched copy) editing row i with the interventions of
    adapter rows[i] of ``patched`` (None: no edit), at loop positions from ``mask``."""

    def __init__(self, base, path, patched, rows, mask, seq_first=False):
        self.cfgs = reft_ext.adapters(patched)
        self.mods = {a: reft_ext.interventions(patched, a) for a in self.cfgs}
        self.rows, self.seq_first = list(rows), seq_first
        self.valid = [[t for t, m in enumerate(r) if m] for r in mask.tolist()]
        self.handles = [blk.register_forward_hook(self._hook(i))
                        for i, blk in enumerate(base.get_submodule(path))]

    def _hook(self, layer):
        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            hv = (h.transpose(0, 1) if self.seq_first else h).clone()
            for i, a in enumerate(self.rows):
                if a is None or layer not in self.mods[a]:
                    continue
                m = self.mods[a][layer]
                for k, toks in _loop_positions(self.cfgs[a], self.valid[i]):
                    if toks:
                        mk = m if k is None else m.members[k]
                        hv[i, toks] = _phi(mk, hv[i, toks])
            y = hv.transpose(0, 1) if self.seq_first else hv
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _perturb(model, scale=0.5, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.reft_interventions.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)


def _mask(lengths, T, left=True):
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        if left:
            mask[i, T - n:] = 1
        else:
            mask[i, :n] = 1
    return mask


def _ids_mask(lengths, T=9, left=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = _mask(lengths, T, left)
    ids = torch.randint(3, VOCAB, (len(lengths), T), generator=g).masked_fill(mask == 0, 0)
    return ids, mask


def _only(model, keep: str):
    """A deep copy of ``model`` holding only adapter ``keep`` (the others deleted)."""
    m = copy.deepcopy(model)
    for a in list(reft_ext.adapters(m)):
        if a != keep:
            reft_ext.delete_adapter(m, a)
    return m


def _assert_rows_equal_adapter_only_copies(model, ids, mask, rows, names):
    """Each row of a mixed forward (llama-style call) bitwise equals that row of the same
    batch on a copy holding only the row's adapter."""
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=rows)
        for a in names:
            single = call(_only(model, a), ids, mask, "llama")
            for i, r in enumerate(rows):
                if r == a:
                    assert torch.equal(mixed[i], single[i]), (a, i)
    return mixed


def _count_bank_calls(monkeypatch):
    calls = []
    real = adapters_mod.bank_call
    monkeypatch.setattr(adapters_mod, "bank_call",
                        lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    return calls


# ------------------------------------------------------------------ 1 every type, one bank

def _zoo(name, dtype=None):
    """Nine adapters on one model; seven of rank 2 (one bank where they meet, all six
    types, tied and untied, NoReFT with proj bias), one of rank 3, one rank-2 LoReFT on the
    reference backend (not fusable: runs alone)."""
    model, path = build(name)
    if dtype is not None:
        model = model.to(dtype)
    base = copy.deepcopy(model)
    torch.manual_seed(11)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="lo")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="l3", adapter="no",
                   intervention="noreft")
    reft_ext.patch(model, [1], rank=2, positions="f1", adapter="co", intervention="consreft")
    reft_ext.patch(model, [0], rank=2, positions="last", adapter="lb",
                   intervention="lobireft")
    reft_ext.patch(model, [2], rank=2, positions="all", adapter="di", intervention="direft")
    reft_ext.patch(model, [0, 1], rank=2, positions="f2+l2", adapter="nd",
                   intervention="nodireft", tied=False)
    reft_ext.patch(model, [0, 2], rank=2, positions="f1+l1", adapter="nb",
                   intervention=lambda d, r, **kw: reft_ext.NoReFT(d, r, add_bias=True, **kw))
    reft_ext.patch(model, [1], rank=3, positions="f1+l1", adapter="r3")
    reft_ext.patch(model, [1, 2], rank=2, positions="f1+l1", adapter="rf", backend="reference")
    _perturb(model)
    return model, base, path


ZOO_ROWS = ["lo", "no", "co", "lb", "di", "nd", "nb", "r3", None, "nd", "rf", "di"]
ZOO_LENS = [9, 6, 2, 1, 4, 9, 6, 2, 1, 3, 1, 2]


@pytest.mark.parametrize("name, left", [("llama", True), ("llama", False), ("gpt2", True),
                                        ("plain", None), ("encoder_seq_first", None)])
def test_all_types_tied_untied_ranks_match_row_reference(name, left, monkeypatch):
    """All six types (and NoReFT with proj bias), tied and untied, one bank per layer, a
    rank-3 singleton, adapters on some layers only, rows of 1 and 2 tokens (untied: clipped
    to half, a 1-token row unedited), left/right padding, seq-first layers and models
    without an attention mask (spec over all T tokens)."""
    model, base, path = _zoo(name)
    if left is None:          # no attention mask: every token counts
        ids, _ = _ids_mask([9] * len(ZOO_ROWS))
        mask = torch.ones_like(ids)
    else:
        ids, mask = _ids_mask(ZOO_LENS, left=left)
    calls = _count_bank_calls(monkeypatch)
    with torch.no_grad():
        got = call(model, ids, mask, name, reft_adapter=ZOO_ROWS)
        ref = _RowReference(base, path, model, ZOO_ROWS, mask,
                            seq_first=name == "encoder_seq_first")
        want = call(base, ids, mask, name)
        ref.remove()
        plain = call(base, ids, mask, name)
    # layer 0: lo no lb nd nb; 1: no co nd (r3, rf alone); 2: lo no di nb (rf alone)
    assert calls == [1 + 1 + 1 + 2 + 1, 1 + 1 + 2, 1 + 1 + 1 + 1]
    valid = mask.bool()
    for i, r in enumerate(ZOO_ROWS):
        torch.testing.assert_close(got[i][valid[i]], want[i][valid[i]], rtol=1e-4, atol=1e-4,
                                   msg=f"row {i} ({r})")
        if r is None:
            assert torch.equal(got[i], plain[i])
        elif not (r == "nd" and ZOO_LENS[i] < 2 and left is not None):
            assert not torch.allclose(got[i][valid[i]], plain[i][valid[i]]), (i, r)


def _row_losses(logits, ids, mask):
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tok = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return -(tok * mask[:, 1:]).sum(-1)


def test_all_types_gradients_through_the_bank_equal_each_adapter_alone():
    """float64: the gradients of a mixed zoo batch (per-row summed loss) equal, adapter by
    adapter, those of an adapter-only copy on that adapter's rows (every type's gradient
    through the stacked bank, untied members, the proj bias, reference backend)."""
    model, _, _ = _zoo("llama", dtype=torch.float64)
    model.train()
    ids, mask = _ids_mask(ZOO_LENS, left=False)
    _row_losses(call(model, ids, mask, "llama", reft_adapter=ZOO_ROWS), ids, mask).sum().backward()
    got = _grads(model)
    checked = 0
    for a in sorted(set(ZOO_ROWS) - {None}):
        m = _only(model, a)
        m.zero_grad(set_to_none=True)
        keep = [i for i, r in enumerate(ZOO_ROWS) if r == a]
        _row_losses(call(m, ids[keep], mask[keep], "llama"), ids[keep], mask[keep]).sum().backward()
        for n, g in _grads(m).items():
            torch.testing.assert_close(got[n], g, rtol=1e-9, atol=1e-12, msg=n)
            checked += g.abs().sum() > 0
    assert checked >= 25


@pytest.mark.parametrize("mdt, dts", [(torch.float64, (torch.float64, torch.float32)),
                                      (torch.bfloat16, (torch.bfloat16, torch.float32))])
def test_adapters_of_different_param_dtypes_in_one_batch(mdt, dts):
    """float64 model with float64 and float32 adapters; bf16 model with bf16 and float32
    adapters: one bank per dtype, each row bitwise its adapter-only copy's row."""
    model, _ = build("llama")
    model = model.to(mdt)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 1], rank=2, positions="l2", adapter="x", dtype=dts[0])
    reft_ext.patch(model, [0, 1], rank=2, positions="f2", adapter="y", dtype=dts[1])
    reft_ext.patch(model, [1], rank=2, positions="f1+l1", adapter="z", dtype=dts[1],
                   intervention="consreft")
    reft_ext.patch(model, [0, 1], rank=2, positions="f1+l1", adapter="w", dtype=dts[0],
                   intervention="nodireft", tied=False)
    _perturb(model)
    ids, mask = _ids_mask([9, 6, 2, 5, 3, 9, 4, 7], left=False)
    rows = ["x", "y", "z", "w", None, "y", "z", "x"]
    _assert_rows_equal_adapter_only_copies(model, ids, mask, rows, "xyzw")


# ------------------------------------------------------------------ 2 argument forms

def _abc():
    model, path = build("llama")
    base = copy.deepcopy(model)
    torch.manual_seed(3)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="a")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="l3", adapter="b",
                   intervention="noreft")
    reft_ext.patch(model, [1], rank=3, positions="f1", adapter="c", intervention="direft")
    _perturb(model)
    return model, base, path


ROWS = ["a", "b", None, "c", "a", "c", "b", None]
LENS = [9, 6, 2, 9, 6, 2, 9, 6]


def test_tuple_numpy_strings_and_mutated_list_are_read_per_call():
    np = pytest.importorskip("numpy")
    model, _, _ = _abc()
    ids, mask = _ids_mask(LENS)
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=ROWS)
        assert torch.equal(want, call(model, ids, mask, "llama", reft_adapter=tuple(ROWS)))
        as_np = [None if r is None else np.str_(r) for r in ROWS]
        assert torch.equal(want, call(model, ids, mask, "llama", reft_adapter=as_np))
        rows = list(ROWS)
        first = call(model, ids, mask, "llama", reft_adapter=rows)
        rows.reverse()                       # the same list object, other contents
        second = call(model, ids, mask, "llama", reft_adapter=rows)
        assert torch.equal(first, want)
        assert torch.equal(second, call(model, ids, mask, "llama", reft_adapter=ROWS[::-1]))
        with pytest.raises(TypeError, match="reft_adapter must be"):
            call(model, ids, mask, "llama", reft_adapter=np.array(ROWS[:2] * 4, dtype=object))


@pytest.mark.parametrize("where", ["forward", "generate"])
def test_single_name_list_of_wrong_length_raises(where):
    model, _, _ = _abc()
    ids, mask = _ids_mask(LENS)
    with pytest.raises(ValueError, match="lists 3 adapters"):
        if where == "forward":
            with torch.no_grad():
                call(model, ids, mask, "llama", reft_adapter=["a"] * 3)
        else:
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                           pad_token_id=0, reft_adapter=["a"] * 3)


@pytest.mark.parametrize("default", ["u", "a"])
def test_positions_context_fits_the_selected_adapters_not_the_default(default):
    model, _ = build("llama")
    reft_ext.patch(model, [0, 1], rank=2, positions="f1+l1", adapter="u", tied=False)
    reft_ext.patch(model, [0], rank=2, positions="l2", adapter="a")
    reft_ext.patch(model, [1], rank=2, positions="l2", adapter="b")
    _perturb(model)
    reft_ext.set_adapter(model, default)
    ids, mask = _ids_mask([6, 5, 6, 4], T=6)
    if default == "u":          # tied rows, untied default
        rows, pos = ["a", "b", "a", None], torch.tensor([[2, 5]] * 4)
    else:                       # untied rows, tied default
        rows, pos = ["u", None, "u", "u"], torch.tensor([[[2], [5]]] * 4)
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=rows, reft_positions=pos)
        with reft_ext.positions(model, pos):
            got = call(model, ids, mask, "llama", reft_adapter=rows)
    assert torch.equal(got, want)


def test_bad_selections_leave_the_model_unchanged():
    model, _, _ = _abc()
    ids, mask = _ids_mask(LENS)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    reft_ext.delete_adapter(model, "c")
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=["a", "b"] * 4)
    for bad, err in ((["a", "c"] * 4, ValueError), ("c", ValueError),
                     ([b"a"] * 8, TypeError), ({"a": 1}, TypeError)):
        with pytest.raises(err, match="reft_adapter"):
            call(model, ids, mask, "llama", reft_adapter=bad)
        with pytest.raises(err, match="reft_adapter"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1,
                           pad_token_id=0, reft_adapter=bad)
        with reft_ext.disabled(model), pytest.raises(err, match="reft_adapter"):
            call(model, ids, mask, "llama", reft_adapter=bad)
    # a mismatched list inside generate with beams raises before generating
    with pytest.raises(ValueError, match="reft_adapter lists 2"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, num_beams=2,
                       pad_token_id=0, reft_adapter=["a", "b"])
    with torch.no_grad():
        assert torch.equal(want, call(model, ids, mask, "llama", reft_adapter=["a", "b"] * 4))
        with reft_ext.disabled(model):       # valid names, no edit
            assert torch.equal(call(model, ids, mask, "llama", reft_adapter=["a", "b"] * 4),
                               call(model, ids, mask, "llama", reft_adapter=[None] * 8))
    after = model.state_dict()
    for k, v in after.items():
        assert torch.equal(v, state[k]), k


# ------------------------------------------------------------------ 3 autograd modes

def test_inference_mode_no_grad_and_grad_agree_and_threads_on_copies():
    model, _, _ = _abc()
    ids, mask = _ids_mask(LENS)
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=ROWS)
    with torch.inference_mode():
        assert torch.equal(want, call(model, ids, mask, "llama", reft_adapter=ROWS))
    assert torch.equal(want, call(model, ids, mask, "llama", reft_adapter=ROWS).detach())
    # threads, each on its own deep copy, each with its own rows
    copies = [copy.deepcopy(model) for _ in range(3)]
    rowsets = [ROWS, ROWS[::-1], ["c", None, "a", "b"] * 2]
    with torch.no_grad():
        wants = [call(model, ids, mask, "llama", reft_adapter=r) for r in rowsets]
    got = [None] * 3

    def work(k):
        with torch.no_grad():
            for _ in range(3):
                got[k] = call(copies[k], ids, mask, "llama", reft_adapter=rowsets[k])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        assert torch.equal(got[k], wants[k]), k


def _plain_model(checkpoint_layers=False):
    torch.manual_seed(0)
    model = PlainDecoder(checkpoint_layers=checkpoint_layers).double()
    torch.manual_seed(1)
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="f1+l2", adapter="a")
    reft_ext.patch(model, [0, 1], rank=2, positions="l1", adapter="b", intervention="noreft")
    reft_ext.patch(model, [1], rank=3, positions="f2", adapter="c")
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l1", adapter="u", tied=False)
    _perturb(model)
    return model


P_ROWS = ["a", "b", "c", None, "u", "a"]


def _grads(model):
    return {n: p.grad for n, p in model.reft_interventions.named_parameters()}


def _assert_same_grads(got, want):
    assert got.keys() == want.keys()
    for n in want:
        if want[n] is None:
            assert got[n] is None, n
        else:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)


class _ReentrantDecoder(PlainDecoder):
    """PlainDecoder whose layer calls are checkpointed with use_reentrant=True."""

    def forward(self, input_ids):
        T = input_ids.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        x = self.embed(input_ids)
        for blk in self.blocks:
            if torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=True)
            else:
                x = blk(x, mask)
        return self.head(x)


@pytest.mark.parametrize("mode", ["non_reentrant", "early_stop_off", "reentrant"])
def test_two_mixed_forwards_before_backward_layer_call_checkpoint(mode):
    """checkpoint(layer.__call__) re-runs the hooks in backward: each recompute must edit
    the rows of its own forward (two forwards with different rows, one backward; a no-grad
    forward with a third row list in between)."""
    ref = _plain_model()
    model = copy.deepcopy(ref)
    if mode == "reentrant":
        model.__class__ = _ReentrantDecoder
        model.embed.weight.requires_grad_(True)      # reentrant needs an input with grad
    else:
        model.checkpoint_layers = True
    model.train()
    ref.train()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    w = torch.randn(6, 7, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    other = P_ROWS[::-1]
    early = mode != "early_stop_off"
    with torch.utils.checkpoint.set_checkpoint_early_stop(early):
        loss = (model(x, reft_adapter=P_ROWS) * w).sum()
        loss = loss + (model(x, reft_adapter=other) * w).pow(2).sum()
        with torch.no_grad():
            model(x, reft_adapter=["c"] * 6)
        loss.backward()
    ((ref(x, reft_adapter=P_ROWS) * w).sum()
     + (ref(x, reft_adapter=other) * w).pow(2).sum()).backward()
    _assert_same_grads(_grads(model), _grads(ref))


def test_checkpoint_of_the_whole_model_call_with_a_forward_in_between():
    ref = _plain_model()
    model = copy.deepcopy(ref)
    model.train()
    ref.train()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))

    def f(m, rows):
        return m(x, reft_adapter=rows)
    loss = torch.utils.checkpoint.checkpoint(f, model, P_ROWS, use_reentrant=False).pow(2).sum()
    with torch.no_grad():
        f(model, P_ROWS[::-1])                   # e.g. logging / eval between
    loss.backward()
    f(ref, P_ROWS).pow(2).sum().backward()
    _assert_same_grads(_grads(model), _grads(ref))


class _EmbedsDecoder(PlainDecoder):
    """PlainDecoder fed embeddings directly (inputs_embeds-style); with checkpoint_layers,
    layer calls are checkpointed (non-reentrant) while grad is enabled."""

    def forward(self, x):
        return self.blocks_and_head(x)


def test_sequential_steps_on_the_same_input_tensor_with_layer_call_checkpoint():
    """A known limit, documented in the README (gradient checkpointing): with the layer call
    checkpointed, a layer's record of which rows each forward edited is keyed by its input
    tensor and lives as long as that tensor, not as long as the forward's graph. Steps that
    feed the very same input tensor (precomputed embeddings reused) with other rows or
    another adapter therefore raise on the recompute instead of guessing (never a silently
    wrong gradient); a fresh input tensor per step (emb.clone()) gives every step exact
    gradients."""
    ref = _plain_model()
    ref.__class__ = _EmbedsDecoder
    ref.checkpoint_layers = False
    emb = torch.randn(6, 7, 32, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(ref)
    model.checkpoint_layers = True
    steps = (P_ROWS, P_ROWS[::-1], "a", "b")
    model(emb, reft_adapter=steps[0]).pow(2).sum().backward()
    with pytest.raises(RuntimeError, match="cannot tell which forward it repeats"):
        model(emb, reft_adapter=steps[1]).pow(2).sum().backward()
    for sel in steps:
        model.zero_grad(set_to_none=True)
        model(emb.clone(), reft_adapter=sel).pow(2).sum().backward()
        ref.zero_grad(set_to_none=True)
        ref(emb, reft_adapter=sel).pow(2).sum().backward()
        _assert_same_grads(_grads(model), _grads(ref))


def test_adapter_changes_between_forward_and_backward(tmp_path):
    """set_adapter, patch(adapter=new) and load() into an adapter that is not in the batch,
    between a mixed forward and its backward (layer-call checkpoint: the hooks re-run in
    backward), leave that forward's gradients unchanged; delete_adapter of an adapter of
    the batch makes the recompute differ and raises (loud, not silent)."""
    ref = _plain_model()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    rows = [r if r != "c" else None for r in P_ROWS]          # c is loaded meanwhile
    src = copy.deepcopy(ref)
    with torch.no_grad():
        for p in src.reft_interventions["c"].parameters():
            p.mul_(3.0)
    reft_ext.save(src, tmp_path / "c", adapter="c")
    ref.train()
    ref(x, reft_adapter=rows).pow(2).sum().backward()
    for change in ("set", "patch", "load"):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model.checkpoint_layers = True
        loss = model(x, reft_adapter=rows).pow(2).sum()
        if change == "set":
            reft_ext.set_adapter(model, "c")
        elif change == "patch":
            reft_ext.patch(model, [0, 1, 2], rank=2, positions="all", adapter="new")
        else:
            reft_ext.load(model, tmp_path / "c", adapter="c")
            assert torch.equal(model.reft_interventions["c"]["1"].bias,
                               src.reft_interventions["c"]["1"].bias)
        loss.backward()
        got = {n: g for n, g in _grads(model).items() if not n.startswith("new.")}
        _assert_same_grads(got, _grads(ref))
    model = copy.deepcopy(ref)
    model.checkpoint_layers = True
    loss = model(x, reft_adapter=P_ROWS).pow(2).sum()
    reft_ext.delete_adapter(model, "c")
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        loss.backward()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("rows", ["a", P_ROWS], ids=["single", "mixed"])
def test_model_stays_usable_after_a_torch_func_transform_raises(rows):
    model = _plain_model()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x, reft_adapter=rows)
    name = "reft_interventions.a.0.bias"
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(bb):
        return torch.func.functional_call(model, {**params, name: bb}, (x,),
                                          {"reft_adapter": rows})
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(f, (params[name],), (torch.ones_like(params[name]),))
    clone = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for m in (model, clone, again):
            assert torch.equal(m(x, reft_adapter=rows), want)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_jvp_through_a_mixed_batch_against_finite_differences():
    """torch.func.jvp through a mixed batch whose layers make several calls (a bank and a
    module on its own): every call must stay out of place under the transform (attention
    on the math kernel, which has forward AD); the tangent equals central differences."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = _plain_model()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    name = "reft_interventions.a.0.bias"
    params = {k: v.detach() for k, v in model.named_parameters()}
    bias = params[name]
    t = torch.randn(bias.shape, generator=torch.Generator().manual_seed(1), dtype=bias.dtype)

    def f(bb):
        return torch.func.functional_call(model, {**params, name: bb}, (x,),
                                          {"reft_adapter": P_ROWS})
    with sdpa_kernel(SDPBackend.MATH):
        _, tangent = torch.func.jvp(f, (bias,), (t,))
    copy.deepcopy(model)                # nothing of the transform stays in the model
    eps = 1e-6
    with torch.no_grad():
        fd = (f(bias + eps * t) - f(bias - eps * t)) / (2 * eps)
    assert tangent.abs().max() > 1e-3
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_forward_mode_ad_through_a_mixed_batch():
    """torch.autograd.forward_ad (documented exact for loreft_) through a mixed zoo batch
    (float64): each row's tangent equals that of its adapter-only copy, and <J t, w> equals
    <t, J^T w> from reverse mode, for parameters of a bank member, an untied member, the
    reference backend and a singleton of another rank."""
    import torch.autograd.forward_ad as fwAD
    model, _, _ = _zoo("llama", dtype=torch.float64)
    ids, mask = _ids_mask(ZOO_LENS, left=False)
    g = torch.Generator().manual_seed(5)
    for pname in ("lo.0.bias", "nd.0.members.1.weight", "no.1.proj", "rf.1.weight",
                  "r3.1.rotate_raw"):
        adapter = pname.split(".")[0]
        tangents = {}
        for m, rows in ((model, ZOO_ROWS), (_only(model, adapter), None)):
            params = {k: v.detach() for k, v in m.named_parameters()}
            key = "reft_interventions." + pname
            p = params[key]
            t = torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                            dtype=p.dtype)

            def f(pp):
                kw = {"input_ids": ids, "attention_mask": mask}
                if rows is not None:
                    kw["reft_adapter"] = rows
                return torch.func.functional_call(m, {**params, key: pp}, (), kw).logits
            with fwAD.dual_level():
                tan = fwAD.unpack_dual(f(fwAD.make_dual(p, t))).tangent
            assert tan is not None, pname
            tangents[rows is None] = tan
            if rows is not None:
                w = torch.randn(tan.shape, generator=g, dtype=tan.dtype)
                leaf = p.clone().requires_grad_(True)
                grad, = torch.autograd.grad((f(leaf) * w).sum(), leaf)
                # (llama's RMSNorm computes in float32 even on a float64 model)
                torch.testing.assert_close((tan * w).sum(), (grad * t).sum(), rtol=1e-5,
                                           atol=1e-6, msg=pname)
        for i, r in enumerate(ZOO_ROWS):
            if r == adapter:
                torch.testing.assert_close(tangents[False][i], tangents[True][i],
                                           rtol=1e-9, atol=1e-12, msg=f"{pname} row {i}")
            else:
                assert tangents[False][i].abs().max() == 0, (pname, i)


# ------------------------------------------------------------------ 4 training

def test_sgd_steps_on_several_adapters_equal_training_each_alone():
    """3 SGD steps (momentum) on a mixed batch of 4 adapters (a b u share a bank), loss
    summed per row, equal 3 steps of each adapter alone on its own rows (adapter-only deep
    copies, own optimizer)."""
    model = _plain_model()
    model.train()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    w = torch.randn(6, 7, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alone = {a: _only(model, a) for a in "abcu"}
    opt = torch.optim.SGD(model.reft_interventions.parameters(), lr=0.05, momentum=0.9)
    opts = {a: torch.optim.SGD(m.reft_interventions.parameters(), lr=0.05, momentum=0.9)
            for a, m in alone.items()}
    for _ in range(3):
        opt.zero_grad()
        ((model(x, reft_adapter=P_ROWS) * w).sum(dim=(1, 2)).mul(0.01).tanh()).sum().backward()
        opt.step()
        for a, m in alone.items():
            keep = [i for i, r in enumerate(P_ROWS) if r == a]
            opts[a].zero_grad()
            ((m(x[keep]) * w[keep]).sum(dim=(1, 2)).mul(0.01).tanh()).sum().backward()
            opts[a].step()
    got = dict(model.reft_interventions.named_parameters())
    moved = 0
    for a, m in alone.items():
        for n, p in m.reft_interventions.named_parameters():
            torch.testing.assert_close(got[n], p, rtol=1e-9, atol=1e-12, msg=n)
        moved += 1
    assert moved == 4
    fresh = _plain_model()
    for n, p in fresh.reft_interventions.named_parameters():
        assert not torch.equal(p, got[n]), n             # every adapter trained


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_hf_gradient_checkpointing_two_mixed_forwards():
    """transformers' gradient_checkpointing_enable (non-reentrant) and
    activation_checkpointing_enable, two mixed forwards before one backward."""
    model, _ = build("llama")
    model = model.double()
    torch.manual_seed(3)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="a")
    reft_ext.patch(model, [0, 1], rank=2, positions="l3", adapter="b", intervention="noreft")
    reft_ext.patch(model, [1], rank=2, positions="f2+l1", adapter="u", tied=False)
    _perturb(model)
    model.train()
    ids, mask = _ids_mask([9, 6, 2, 9, 6, 2], left=False)
    rows = ["a", "b", "u", None, "b", "a"]
    labels = ids.masked_fill(mask == 0, -100)

    def loss(m, r):
        return m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False,
                 reft_adapter=r).loss
    ref = copy.deepcopy(model)
    (loss(ref, rows) + 2 * loss(ref, rows[::-1])).backward()
    for how in ("gradient_checkpointing_enable", "activation_checkpointing_enable"):
        m = copy.deepcopy(model)
        if how == "gradient_checkpointing_enable":
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(m, how):
            m.activation_checkpointing_enable()
        else:
            continue
        (loss(m, rows) + 2 * loss(m, rows[::-1])).backward()
        _assert_same_grads(_grads(m), _grads(ref))


# ------------------------------------------------------------------ 5 custom modules

class _Halved(reft_ext.LoReFT):
    """A LoReFT subclass whose forward halves the edit (a custom forward over built-in
    parameters: kernel_params is inherited)."""

    def forward(self, h, positions, inplace=True):
        out = super().forward(h, positions, inplace=False)
        return h + 0.5 * (out - h)


def test_subclass_overriding_forward_gets_its_forward_in_a_mixed_batch():
    model, _ = build("llama")
    torch.manual_seed(0)
    reft_ext.patch(model, [0], rank=2, positions="l2", adapter="s1", intervention=_Halved)
    reft_ext.patch(model, [0], rank=2, positions="l2", adapter="s2", intervention=_Halved)
    _perturb(model)
    ids, mask = _ids_mask(LENS)
    rows = ["s1", "s2"] * 4
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=rows)
        for a in ("s1", "s2"):
            single = call(_only(model, a), ids, mask, "llama")
            for i, r in enumerate(rows):
                if r == a:
                    torch.testing.assert_close(mixed[i], single[i], msg=f"{a} row {i}")


def test_intervention_module_hooks_run_in_a_mixed_batch():
    model, _, _ = _abc()
    ids, mask = _ids_mask(LENS)
    seen = []
    model.reft_interventions["a"]["0"].register_forward_pre_hook(lambda m, a: seen.append(1))
    with torch.no_grad():
        call(model, ids, mask, "llama", reft_adapter="a")
        assert len(seen) == 1
        call(model, ids, mask, "llama", reft_adapter=ROWS)
    assert len(seen) == 2


def test_custom_module_without_kernel_params_next_to_a_bank():
    """A custom factory (no kernel_params: runs alone) in the same batch as a bank."""
    class Shift(nn.Module):
        def __init__(self, d, rank, dtype=None, device=None):
            super().__init__()
            self.v = nn.Parameter(torch.randn(d, dtype=dtype, device=device))

        def forward(self, h, positions, inplace=True):
            out = h if inplace else h.clone()
            for i in range(h.shape[0]):
                p = positions[i][positions[i] >= 0]
                out[i, p] = out[i, p] + self.v
            return out

    model, base, path = _abc()
    reft_ext.patch(model, [0, 1], rank=2, positions="f2", adapter="s", intervention=Shift)
    ids, mask = _ids_mask(LENS)
    rows = ["s", "a", "b", "s", None, "c", "a", "b"]
    _assert_rows_equal_adapter_only_copies(model, ids, mask, rows, "sabc")


class _Wrap(nn.Module):
    """A custom intervention that wraps a LoReFT and exposes its kernel_params (so the
    bank may fuse it) but has no ``rank`` attribute."""

    def __init__(self, d, rank, **kw):
        super().__init__()
        self.inner = reft_ext.LoReFT(d, rank, **kw)

    def kernel_params(self):
        return self.inner.kernel_params()

    def forward(self, h, positions, inplace=True):
        return self.inner(h, positions, inplace=inplace)


def test_fusable_custom_modules_of_different_ranks_without_rank_attribute():
    model, _ = build("llama")
    torch.manual_seed(0)
    reft_ext.patch(model, [0], rank=2, positions="l2", adapter="w2", intervention=_Wrap)
    reft_ext.patch(model, [0], rank=3, positions="l2", adapter="w3", intervention=_Wrap)
    _perturb(model)
    ids, mask = _ids_mask([9, 6, 2, 5])
    rows = ["w2", "w3", None, "w2"]
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=rows)
        for a in ("w2", "w3"):
            single = call(model, ids, mask, "llama", reft_adapter=a)
            for i, r in enumerate(rows):
                if r == a:
                    assert torch.equal(mixed[i], single[i]), (a, i)


def test_explicit_positions_mutated_after_forward_with_layer_call_checkpoint():
    ref = _plain_model()
    ref.train()
    x = torch.randint(3, 90, (6, 7), generator=torch.Generator().manual_seed(0))
    pos0 = torch.tensor([[0, 3]] * 6)
    ref(x, reft_adapter="a", reft_positions=pos0).pow(2).sum().backward()
    for rows in (["a", "b", "c", None, "b", "a"], "a"):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        model.checkpoint_layers = True
        pos = pos0.clone()
        loss = model(x, reft_adapter=rows, reft_positions=pos).pow(2).sum()
        pos[:] = torch.tensor([5, 6])                 # the buffer is reused
        if isinstance(rows, list):
            rows.reverse()                            # so is the rows list
        loss.backward()
        if rows == "a":
            _assert_same_grads(_grads(model), _grads(ref))


def test_pyreft_import_as_an_adapter_in_a_mixed_batch(tmp_path):
    """load_pyreft(adapter=) onto a patched model: its rows equal a fresh import's, the
    other adapters' rows are unchanged, everything equals the row reference."""
    from test_pyreft_import import loreft_state, write_pyreft_dir
    model, path = build("llama")
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2", adapter="a")
    reft_ext.patch(model, [1], rank=4, positions="l1", adapter="b")
    _perturb(model)
    ids, mask = _ids_mask([9, 6, 2, 9, 6, 2])
    rows = ["p", "a", "b", "p", None, "a"]
    with torch.no_grad():
        before = call(model, ids, mask, "llama", reft_adapter=[r if r != "p" else None
                                                                for r in rows])
    states, _ = zip(*(loreft_state(32, 4, seed=10 + i) for i in (2, 0)))
    write_pyreft_dir(tmp_path / "py", [2, 0], states)
    reft_ext.load_pyreft(model, tmp_path / "py", positions="f1+l2", adapter="p")
    fresh = reft_ext.load_pyreft(copy.deepcopy(base), tmp_path / "py", positions="f1+l2")
    with torch.no_grad():
        mixed = call(model, ids, mask, "llama", reft_adapter=rows)
        single = call(fresh, ids, mask, "llama")
        ref = _RowReference(base, path, model, rows, mask)
        want = call(base, ids, mask, "llama")
        ref.remove()
    for i, r in enumerate(rows):
        if r == "p":
            assert torch.equal(mixed[i], single[i]), i
        else:
            assert torch.equal(mixed[i], before[i]), i
    torch.testing.assert_close(mixed, want, rtol=1e-4, atol=1e-4)


def test_numeric_adapter_names_save_adapters_round_trip(tmp_path):
    """Adapter names "0", "1", "2" (also the layer keys inside each adapter's ModuleDict)
    survive save_adapters / load_adapters; each row equals its adapter-only copy's."""
    model, _ = build("llama")
    base = copy.deepcopy(model)
    torch.manual_seed(0)
    reft_ext.patch(model, [0], rank=2, positions="l2", adapter="0")
    reft_ext.patch(model, [1, 2], rank=2, positions="f2", adapter="1")
    reft_ext.patch(model, [0, 2], rank=3, positions="f1+l1", adapter="2", tied=False)
    _perturb(model)
    rows = ["0", "1", "2", None, "1", "0"]
    ids, mask = _ids_mask([9, 6, 2, 9, 6, 2])
    reft_ext.save_adapters(model, tmp_path / "all")
    fresh = copy.deepcopy(base)
    reft_ext.load_adapters(fresh, tmp_path / "all")
    mixed = _assert_rows_equal_adapter_only_copies(model, ids, mask, rows, "012")
    with torch.no_grad():
        assert torch.equal(call(fresh, ids, mask, "llama", reft_adapter=rows), mixed)


class _Ident(nn.Module):
    def forward(self, x, causal_mask):
        return x


@pytest.mark.parametrize("grad", [False, True])
def test_layer_returning_its_input_is_not_edited_twice(grad):
    """A layer that returns its input (skipped layer): the edit must not reach the previous
    layer's output in place (float64, against the row reference)."""
    torch.manual_seed(0)
    model = PlainDecoder().double()
    model.blocks[1] = _Ident()
    base = copy.deepcopy(model)
    torch.manual_seed(1)
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="f2", adapter="a", hidden_size=32,
                   layer_path="blocks")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="l2", adapter="b",
                   intervention="noreft", hidden_size=32)
    reft_ext.patch(model, [1], rank=3, positions="all", adapter="c", hidden_size=32)
    _perturb(model)
    x = torch.randint(3, 90, (4, 7), generator=torch.Generator().manual_seed(0))
    rows = ["a", "b", "c", None]
    with torch.set_grad_enabled(grad):
        got = model(x, reft_adapter=rows)
    with torch.no_grad():
        ref = _RowReference(base, "blocks", model, rows, torch.ones_like(x))
        want = base(x)
        ref.remove()
    torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-10)


def test_active_dropout_adapters_next_to_a_bank_in_train_mode():
    """Train mode, dropout 0.5 (tied and untied: they leave the bank and run alone): each
    row equals the adapter-only copy run on the same batch with the spec's positions kept
    on that adapter's rows only (the same dropout draws, from the same seed)."""
    model, _ = build("llama")
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 1], rank=2, positions="f2+l2", adapter="d", dropout=0.5)
    reft_ext.patch(model, [0, 1], rank=2, positions="f2+l2", adapter="ud", dropout=0.5,
                   tied=False)
    reft_ext.patch(model, [0, 1], rank=2, positions="l2", adapter="b")
    reft_ext.patch(model, [1], rank=2, positions="f1", adapter="b2", intervention="consreft")
    _perturb(model)
    model.train()
    ids, mask = _ids_mask([9, 6, 2, 9, 6, 2])
    for a in ("d", "ud"):
        rows = [a, "b", a, "b2", a, "b"]
        pos = reft_ext.positions_from_mask("f2+l2", mask, tied=a == "d")
        keep = torch.tensor([r == a for r in rows]).view(-1, *([1] * (pos.dim() - 1)))
        pos = torch.where(keep, pos, -1)
        only = _only(model, a)
        torch.manual_seed(42)
        with torch.no_grad():
            mixed = call(model, ids, mask, "llama", reft_adapter=rows)
            torch.manual_seed(42)
            single = call(only, ids, mask, "llama", reft_positions=pos)
        for i, r in enumerate(rows):
            if r == a:
                assert torch.equal(mixed[i], single[i]), (a, i)


# ------------------------------------------------------------------ 6 generate

def _gen_model():
    model, _ = build("llama")
    torch.manual_seed(3)
    reft_ext.patch(model, [0, 2], rank=2, positions="f2+l2", adapter="a")
    reft_ext.patch(model, [0, 1, 2], rank=2, positions="l3", adapter="b",
                   intervention="noreft")
    reft_ext.patch(model, [1], rank=3, positions="f1", adapter="c", intervention="direft")
    reft_ext.patch(model, [0, 1], rank=2, positions="f1+l1", adapter="u", tied=False)
    _perturb(model, scale=2.0)
    return model


def _same_tokens(x, y, pad=0):
    """Equal generated rows, the shorter one padded (a batch that finished early stops)."""
    L = max(x.shape[-1], y.shape[-1])
    x = torch.nn.functional.pad(x, (0, L - x.shape[-1]), value=pad)
    y = torch.nn.functional.pad(y, (0, L - y.shape[-1]), value=pad)
    return torch.equal(x, y)


@pytest.mark.parametrize("case", ["beams_explicit", "no_cache", "one_token", "return_seqs"])
def test_generate_mixed_matches_adapter_only_copies(case):
    model = _gen_model()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    if case == "one_token":
        ids, mask = _ids_mask([1] * 5, T=1)
        rows = ["a", "u", "b", None, "c"]
    else:
        ids, mask = _ids_mask([7, 4, 2, 7, 3], T=7)
        rows = ["a", "b", "c", None, "u"]
    if case == "beams_explicit":
        rows = ["a", "b", "c", None, "b"]                 # tied only: one layout
        kw.update(num_beams=2, reft_positions=torch.tensor([[6, 5]] * 5))
    elif case == "no_cache":
        kw.update(use_cache=False)
    elif case == "return_seqs":
        kw.update(num_beams=3, num_return_sequences=2)
    out = model.generate(input_ids=ids, attention_mask=mask, reft_adapter=rows, **kw)
    k = out.shape[0] // len(rows)
    base = _only(model, "a")
    with reft_ext.disabled(base):
        plain = base.generate(input_ids=ids, attention_mask=mask, **kw)
    differs = 0
    for a in set(rows) - {None}:
        single = _only(model, a).generate(input_ids=ids, attention_mask=mask, **kw)
        for i, r in enumerate(rows):
            if r == a:
                assert _same_tokens(out[i * k:(i + 1) * k], single[i * k:(i + 1) * k]), (a, i)
                differs += not _same_tokens(single[i * k:(i + 1) * k], plain[i * k:(i + 1) * k])
    for i, r in enumerate(rows):
        if r is None:
            assert _same_tokens(out[i * k:(i + 1) * k], plain[i * k:(i + 1) * k])
    assert differs >= 1


# ------------------------------------------------------------------ 7 copies, unpatch, compile

def test_pickle_deepcopy_and_unpatch_after_mixed_batches():
    model, base, path = _abc()
    ids, mask = _ids_mask(LENS)
    base_keys = set(base.state_dict())
    base_rg = {n: p.requires_grad for n, p in base.named_parameters()}
    with torch.no_grad():
        want = call(model, ids, mask, "llama", reft_adapter=ROWS)
        for m in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
            assert torch.equal(call(m, ids, mask, "llama", reft_adapter=ROWS), want)
            m.reft_interventions["b"]["1"].bias.add_(1.0)
        assert torch.equal(call(model, ids, mask, "llama", reft_adapter=ROWS), want)
        plain = call(base, ids, mask, "llama")
    reft_ext.unpatch(model)
    assert set(model.state_dict()) == base_keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == base_rg
    assert "generate" not in model.__dict__ and not hasattr(model, "reft_interventions")
    for blk in model.get_submodule(path):
        assert not blk._forward_hooks and "_reft_link" not in blk.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(call(model, ids, mask, "llama"), plain)


@pytest.mark.slow
def test_torch_compile_fullgraph_with_changing_rows_and_adapters():
    """torch.compile(model, fullgraph=True): a mixed batch (values and gradients), then the
    same rows list mutated in place, give the eager results (no stale cached plan)."""
    torch._dynamo.reset()
    try:
        model, _, _ = _abc()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        ids, mask = _ids_mask(LENS)

        def check(rows, backward=False):
            model.zero_grad(set_to_none=True)
            got = compiled(input_ids=ids, attention_mask=mask, reft_adapter=rows).logits
            if backward:
                got.pow(2).sum().backward()
                g = {n: t.clone() for n, t in _grads(model).items() if t is not None}
                model.zero_grad(set_to_none=True)
            want = model(input_ids=ids, attention_mask=mask, reft_adapter=rows).logits
            torch.testing.assert_close(got, want, msg=str(rows))
            if backward:
                want.pow(2).sum().backward()
                w = {n: t for n, t in _grads(model).items() if t is not None}
                assert g.keys() == w.keys() and len(w) == 18
                for n in w:
                    torch.testing.assert_close(g[n], w[n], msg=n)
        rows = list(ROWS)
        check(rows, backward=True)
        rows.reverse()
        check(rows)
        # (set_adapter, patch(adapter=new), delete_adapter and disabled() after compiling
        # were also checked by hand: each recompiles and matches eager; left out here for
        # run time, about 5 s per recompile)
    finally:
        torch._dynamo.reset()
