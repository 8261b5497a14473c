"""LoRA (PEFT) and ReFT on one model, in either order.

Both libraries freeze what they did not add: ``reft_ext.patch`` freezes every parameter it
finds (LoRA's included), ``peft.get_peft_model`` freezes every parameter without ``lora_``
in its name (the interventions included). So whichever goes second, the first one's
parameters are switched back on; the README's "Integrations" section shows the one line.

Checked here, on a tiny random Llama (d=32, 3 layers), for both orders:
  * exactly the LoRA and the ReFT parameters train, and both move;
  * the combined forward equals an independent reference: the base model with the LoRA
    update merged by hand (W + B A * alpha / r) and LoReFT applied by plain forward hooks
    (tests/patch_helpers.ReferenceHooks) with the trained R, W, b;
  * each library saves and reloads its own part (PEFT ``save_pretrained`` /
    ``PeftModel.from_pretrained``, ``reft_ext.save`` / ``reft_ext.load``) into a fresh base:
    logits bitwise equal to the trained model's;
  * ``reft_ext.unpatch`` leaves the LoRA model as it was: state_dict keys, requires_grad
    flags and logits equal to the reloaded LoRA-only model's, bitwise.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import reft_ext
from _integration_util import train_losses
from patch_helpers import HF_LAYER_PATHS, ReferenceHooks, batch, build, params_of

peft = pytest.importorskip("peft")
# peft imports bitsandbytes where installed, which may look for kernels on the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# peft 0.21 reads model.is_gradient_checkpointing, which transformers 5 deprecates.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LORA_R, LORA_ALPHA, TARGETS = 4, 8, ["q_proj", "v_proj", "down_proj"]
LAYERS, RANK, SPEC = [0, 2], 4, "f2+l2"


def _lora(model):
    cfg = peft.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=TARGETS,
                          lora_dropout=0.0)
    return peft.get_peft_model(model, cfg)


def _combine(order):
    """(PeftModel with both, the module reft_ext patched, the LoRA model's own
    requires_grad flags) for a fresh tiny Llama."""
    model, _ = build("llama")
    torch.manual_seed(0)
    if order == "lora_first":
        pm = _lora(model)
        flags = {n: p.requires_grad for n, p in pm.named_parameters()}
        reft_ext.patch(pm, LAYERS, RANK, positions=SPEC)       # freezes the LoRA weights too
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
        return pm, pm, flags
    reft_ext.patch(model, LAYERS, RANK, positions=SPEC)
    pm = _lora(model)                                          # freezes the interventions
    flags = {n: p.requires_grad for n, p in pm.named_parameters()
             if "reft_interventions." not in n}
    for p in model.reft_interventions.parameters():
        p.requires_grad_(True)
    return pm, model, flags


def _merged_reference(pm, base):
    """base (an unpatched, LoRA-free copy) with W += B A * alpha / r, by hand."""
    ref = copy.deepcopy(base)
    sd = ref.state_dict()
    n = 0
    for name, p in pm.named_parameters():
        if name.endswith("lora_A.default.weight"):
            B = dict(pm.named_parameters())[name.replace("lora_A", "lora_B")]
            # base_model.model.<module path>.lora_A.default.weight -> <module path>.weight
            target = name[len("base_model.model."):-len(".lora_A.default.weight")] + ".weight"
            sd[target] = sd[target] + (B @ p).detach() * (LORA_ALPHA / LORA_R)
            n += 1
    assert n == len(TARGETS) * 3
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("order", ["lora_first", "reft_first"])
def test_lora_and_reft_on_one_model(order, tmp_path):
    base, _ = build("llama")
    pm, patched, flags = _combine(order)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    n_lora = sum("lora_" in n for n in trainable)
    n_reft = sum("reft_interventions." in n for n in trainable)
    assert n_lora == 2 * len(TARGETS) * 3 and n_reft == 3 * len(LAYERS)
    assert len(trainable) == n_lora + n_reft
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}

    ids, mask = batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    losses = train_losses(pm, 20, 4e-2, input_ids=ids, attention_mask=mask, labels=labels)
    assert losses[-1] < 0.9 * losses[0], losses      # measured: 0.87
    for n, p in pm.named_parameters():            # both kinds moved (LoRA B starts at zero)
        if n in before:
            assert not torch.equal(p, before[n]), n

    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=mask).logits
        # independent reference: LoRA merged by hand + LoReFT by plain hooks
        ref = _merged_reference(pm, base)
        pos = reft_ext.positions_from_mask(SPEC, mask)
        hooks = ReferenceHooks(ref, HF_LAYER_PATHS["llama"],
                               {i: tuple(t.detach() for t in p)
                                for i, p in params_of(patched).items()}, pos)
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits
        hooks.remove()
        # and the edit matters: without it the output differs
        with reft_ext.disabled(patched):
            no_edit = pm(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert (logits - no_edit).abs().max() > 1e-3

    # each library saves its own part; reload both into a fresh base: bitwise equal
    pm.save_pretrained(tmp_path / "lora")
    reft_ext.save(patched, tmp_path / "reft")
    fresh, _ = build("llama")
    if order == "lora_first":
        pm2 = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora")
        reft_ext.load(pm2, tmp_path / "reft")
    else:
        reft_ext.load(fresh, tmp_path / "reft")
        pm2 = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora")
    with torch.no_grad():
        assert torch.equal(pm2.eval()(input_ids=ids, attention_mask=mask).logits, logits)

    # unpatch leaves the LoRA model intact: same as the LoRA adapter loaded alone
    keys_before = {k for k in pm.state_dict() if "reft_interventions" not in k}
    reft_ext.unpatch(patched)
    assert set(pm.state_dict()) == keys_before
    now = {n: p.requires_grad for n, p in pm.named_parameters()}
    if order == "reft_first":
        # unpatch restores the flags from before patch(), when nothing was frozen yet: the
        # base weights PEFT froze afterwards (those it did not rename to base_layer) are
        # trainable again. Re-freeze them (README).
        assert now["base_model.model.model.embed_tokens.weight"] and now != flags
        for n, p in pm.named_parameters():
            p.requires_grad_("lora_" in n)
        now = {n: p.requires_grad for n, p in pm.named_parameters()}
    assert now == flags
    lora_only = peft.PeftModel.from_pretrained(build("llama")[0], tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits,
                           lora_only(input_ids=ids, attention_mask=mask).logits)
