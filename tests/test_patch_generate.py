"""generate() edits only the prompt pass; positions are fixed once from the prompt."""
from __future__ import annotations

import copy

import pytest
import torch

import reft_ext
from patch_helpers import ReferenceHooks, batch, build, loop_positions, params_of, to_tensor

NEW = 5


def _greedy_reference(model, ids, mask, steps):
    """No-cache greedy loop: the full sequence is re-run each step; hooks edit it."""
    for _ in range(steps):
        pos_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos_ids,
                       use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def _setup(name, spec, first, last, B=3, T=9, layers=(0, 2)):
    model, path = build(name)
    model.generation_config.eos_token_id = None       # always generate NEW tokens
    model.generation_config.pad_token_id = 0
    ref = copy.deepcopy(model)
    ids, mask = batch(B=B, T=T, left=True)
    torch.manual_seed(0)
    reft_ext.patch(model, list(layers), rank=4, positions=spec)
    with torch.no_grad():                             # make the edit large enough to matter
        for m in reft_ext.interventions(model).values():
            m.bias.mul_(200.0)
    P = T if spec == "all" else first + last
    pos = to_tensor(loop_positions(first, last, mask, all_tokens=spec == "all"), P)
    ReferenceHooks(ref, path, params_of(model), pos)
    return model, ref, ids, mask


@pytest.mark.parametrize("name", ["llama", "gpt2", "bloom"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_matches_no_cache_reference_loop(name, use_cache):
    model, ref, ids, mask = _setup(name, "f2+l2", 2, 2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             do_sample=False, use_cache=use_cache)
        expect = _greedy_reference(ref, ids, mask, NEW)
        with reft_ext.disabled(model):
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                   do_sample=False, use_cache=use_cache)
    assert torch.equal(out, expect)
    assert not torch.equal(out, plain)                # the edit changed the generation


def test_generate_one_token_prompt_is_edited():
    """A 1-token prompt is a prompt pass (cache length 0), not a decode step."""
    model, ref, ids, mask = _setup("llama", "last", 0, 1, B=1, T=1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                             do_sample=False)
        expect = _greedy_reference(ref, ids, mask, NEW)
        with reft_ext.disabled(model):
            plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                   do_sample=False)
    assert torch.equal(out, expect) and not torch.equal(out, plain)


def test_generate_with_explicit_positions():
    model, path = build("llama")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ref = copy.deepcopy(model)
    ids, mask = batch(left=True)
    reft_ext.patch(model, [1], rank=4, positions="all")
    with torch.no_grad():
        reft_ext.interventions(model)[1].bias.mul_(200.0)
    pos = torch.tensor([[8, -1], [6, 7], [8, 7]])
    ReferenceHooks(ref, path, params_of(model), pos)
    with torch.no_grad():
        expect = _greedy_reference(ref, ids, mask, NEW)
        for use_cache in (True, False):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                 do_sample=False, use_cache=use_cache, reft_positions=pos)
            assert torch.equal(out, expect)
            with reft_ext.positions(model, pos):
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                     do_sample=False, use_cache=use_cache)
            assert torch.equal(out, expect)


def test_manual_decode_step_with_cache_is_not_edited():
    tf = pytest.importorskip("transformers")
    model, _ = build("llama")
    ids, mask = batch(left=True)
    reft_ext.patch(model, [0], rank=4, positions="all")
    # The cache kwarg is `cache` in transformers 5 and `past_key_values` in 4.x.
    key = "cache" if int(tf.__version__.split(".")[0]) >= 5 else "past_key_values"
    with torch.no_grad():
        cache = tf.DynamicCache(config=model.config)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: cache})
        assert cache.get_seq_length() == ids.shape[1]
        step = torch.randint(3, 50, (3, 1))
        mask2 = torch.cat([mask, torch.ones_like(step)], 1)
        a = model(input_ids=step, attention_mask=mask2, **{key: copy.deepcopy(cache)}).logits
        with reft_ext.disabled(model):
            b = model(input_ids=step, attention_mask=mask2,
                      **{key: copy.deepcopy(cache)}).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_expanded_batch_beams_and_return_sequences(use_cache):
    """generate() repeats each prompt (beams, num_return_sequences): the prompt positions
    are repeated the same way."""
    model, path = build("llama")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ref = copy.deepcopy(model)
    ids, mask = batch(left=True)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    with torch.no_grad():
        for m in reft_ext.interventions(model).values():
            m.bias.mul_(200.0)
    pos = to_tensor(loop_positions(2, 2, mask), 4).repeat_interleave(2, dim=0)
    ReferenceHooks(ref, path, params_of(model), pos)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=2,
              num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        out = model.generate(use_cache=use_cache, **kw)
        expect = ref.generate(use_cache=False, **kw)
    assert out.shape == (6, 13) and torch.equal(out, expect)
