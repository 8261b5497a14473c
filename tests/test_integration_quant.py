"""patch() on a base loaded in 8-bit or 4-bit by bitsandbytes (its CPU backend), training
float32 interventions on top (ReFT's answer to QLoRA).

Checked for LLM.int8 (load_in_8bit) and NF4 (load_in_4bit, float32 compute), on a tiny
random Llama saved and reloaded through transformers' BitsAndBytesConfig:
  * patch() leaves the frozen base alone: logits under ``reft_ext.disabled`` are bitwise
    the quantised model's before patch(), and the quantised weights are bitwise unchanged
    after training; the interventions are float32 and the only trainable parameters;
  * gradients are right: the interventions' gradients equal those of the same patch on a
    float32 copy of the model whose Linear weights are the dequantised ones. NF4 with
    float32 compute dequantises and multiplies in float32: equal (measured: bitwise; bound
    1e-5 of the largest entry). LLM.int8 also quantises the activations row-wise: measured
    <= 0.9% of the largest entry, bound 3%. A gradient that did not flow back through the
    quantised layers is ~100% off (seen with bitsandbytes' CPU inference packing, below);
  * the loss decreases (by the factor stated in the test) and the interventions saved with
    ``reft_ext.save`` reload into a freshly quantised base to bitwise-identical logits.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import reft_ext
from _integration_util import tiny_llama, train_losses

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")   # bitsandbytes may look for hub kernels

pytestmark = [
    # bitsandbytes' own notices: LLM.int8 casts float32 activations to float16; torch.jit
    # deprecation warnings raised while bitsandbytes imports. (torch's warning about
    # backpropagating through gemv_4bit is NOT ignored: see _no_cpu_inference_packing.)
    pytest.mark.filterwarnings("ignore:MatMul8bitLt. inputs will be cast:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated"),
]

LAYERS, RANK, SPEC = [0, 1], 4, "f3+l3"


def _config(bits):
    if bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_compute_dtype=torch.float32)


def _quantised(path, bits, cpu_inference_packing=False):
    # dtype=float32: the non-quantised parameters (embeddings, norms, head) stay float32
    # (transformers would otherwise load them in float16 for bitsandbytes)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=_config(bits), device_map="cpu", dtype=torch.float32,
        attn_implementation="eager").eval()
    if not cpu_inference_packing:
        _no_cpu_inference_packing(model)
    return model


def _no_cpu_inference_packing(model):
    """The README's workaround. bitsandbytes 0.50 on a CPU with AVX512-BF16: the first
    forward of a Linear4bit in eval mode with an input that does not require grad repacks
    its weight for a bf16 inference kernel, for good; every later forward, training ones
    included, calls that kernel outside bitsandbytes' autograd.Function, so no gradient
    flows back through the layer (torch only warns "gemv_4bit: an autograd kernel was not
    registered"). Interventions below a 4-bit layer then get wrong gradients."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def _dequantised(qm, float_model):
    """float_model with each bitsandbytes Linear's weight replaced by its dequantised value."""
    deq = copy.deepcopy(float_model)
    sd = deq.state_dict()
    n = 0
    for name, mod in qm.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            # int8 rows times their absmax / 127; the first forward moves the scales (and
            # the int8 matrix) from the parameter into mod.state
            cb = mod.weight.data if mod.state.CB is None else mod.state.CB
            scb = mod.weight.SCB if mod.state.SCB is None else mod.state.SCB
            w = cb.float() * scb.float()[:, None] / 127
        else:
            continue
        sd[name + ".weight"] = w.float()
        n += 1
    assert n == 7 * 2                                     # q k v o gate up down, 2 layers
    deq.load_state_dict(sd)
    return deq


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 259, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    mask[3, 4:] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_base(bits, tmp_path):
    base = tiny_llama(259)
    base.save_pretrained(tmp_path / "base")
    qm = _quantised(tmp_path / "base", bits)
    qlinear = bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit
    assert isinstance(qm.model.layers[0].mlp.down_proj, qlinear)
    ids, mask, labels = _batch()
    with torch.no_grad():
        before = qm(input_ids=ids, attention_mask=mask).logits
    qweights = {n: p.detach().clone() for n, p in qm.named_parameters()}

    deq = _dequantised(qm, base)
    for m in (qm, deq):
        torch.manual_seed(0)
        reft_ext.patch(m, LAYERS, RANK, positions=SPEC)
    trainable = [(n, p) for n, p in qm.named_parameters() if p.requires_grad]
    assert len(trainable) == 3 * len(LAYERS)
    assert all(n.startswith("reft_interventions.") and p.dtype == torch.float32
               for n, p in trainable)
    with torch.no_grad(), reft_ext.disabled(qm):
        assert torch.equal(qm(input_ids=ids, attention_mask=mask).logits, before)

    grads = []
    for m in (qm, deq):
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.reft_interventions.named_parameters()})
        m.zero_grad()
    for name in grads[1]:
        err = (grads[0][name] - grads[1][name]).abs().max()
        scale = grads[1][name].abs().max()
        assert err <= (0.03 if bits == 8 else 1e-5) * scale, (name, (err / scale).item())

    assert {id(p) for _, p in trainable} == {id(p) for p in qm.parameters() if p.requires_grad}
    losses = train_losses(qm, 20, 5e-2, weight_decay=0.0, input_ids=ids, attention_mask=mask,
                          labels=labels)
    assert losses[-1] < 0.5 * losses[0], losses          # measured: 0.28x for both
    for n, p in qm.named_parameters():                   # the quantised base did not move
        if n in qweights:
            assert torch.equal(p, qweights[n]), n

    reft_ext.save(qm, tmp_path / "reft")
    fresh = reft_ext.load(_quantised(tmp_path / "base", bits), tmp_path / "reft")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits,
                           qm(input_ids=ids, attention_mask=mask).logits)
