"""Training through patch(): convergence vs the reference path, gradient checkpointing,
the Hugging Face Trainer."""
from __future__ import annotations

import copy

import pytest
import torch

import reft_ext
from patch_helpers import PlainDecoder, batch, build, enable_checkpointing


def _train(model, steps, ids, mask, labels, lr=2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# Per-step losses: fused vs reference path on the same model and data. Both compute the
# edit in float32; they differ only in summation order (~1e-7 relative), which the
# optimizer compounds over the steps. Tolerance: (rtol, atol) = (1e-4, 1e-5) for a float32
# model; for bf16 each edited row is rounded to bf16 (eps 2^-8 = 3.9e-3): 2 eps relative.
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convergence_fused_vs_reference(dtype):
    model, _ = build("llama")
    model = model.to(dtype).train()
    ids, mask = batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    runs = {}
    for backend in ("fused", "reference"):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        reft_ext.patch(m, [0, 1, 2], rank=4, positions="f3+l3", backend=backend)
        runs[backend] = _train(m, 20, ids, mask, labels)
    torch.testing.assert_close(torch.tensor(runs["fused"]), torch.tensor(runs["reference"]),
                               **TOL[dtype])
    assert runs["fused"][-1] < 0.95 * runs["fused"][0]        # it does learn


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_transformers():
    """transformers >= 5.23 checkpoints layer.forward: our hooks run once, outside; 4.x
    checkpoints layer.__call__, so the hooks re-run in the backward recompute. CI runs this
    file on 5.x and again on 4.57 (.ci/run); the __call__ style is also covered without
    transformers by test_gradient_checkpointing_hooks_rerun_in_recompute."""
    model, _ = build("llama")
    model.train()
    ids, mask = batch(left=False)
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    ckpt = enable_checkpointing(copy.deepcopy(model))
    assert ckpt.model.layers[0].gradient_checkpointing
    for m in (model, ckpt):
        m(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    a, b = _grads(model), _grads(ckpt)
    assert a.keys() == b.keys() and len(a) == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("early_stop", [True, False])
def test_gradient_checkpointing_hooks_rerun_in_recompute(early_stop):
    """4.x-style: checkpoint(layer.__call__) re-runs the hooks in backward; the positions of
    the forward must still be in place then, and the grads equal the plain run's. (With
    early stop, torch ends the recompute once the saved tensors are back, which may be
    inside our hook.)"""
    torch.manual_seed(0)
    model = PlainDecoder()
    x = torch.randint(0, 90, (2, 7))
    torch.manual_seed(1)
    reft_ext.patch(model, [0, 1, 2], rank=4, positions="f1+l2")
    ckpt = copy.deepcopy(model)
    ckpt.checkpoint_layers = True
    calls = []
    ckpt.reft_interventions["default"]["1"].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.utils.checkpoint.set_checkpoint_early_stop(early_stop):
        for m in (model, ckpt):
            m(x).pow(2).mean().backward()
    assert len(calls) == 2                                    # forward + recompute
    a, b = _grads(model), _grads(ckpt)
    assert len(a) == 9
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("collator_positions", [False, True])
def test_hf_trainer(tmp_path, collator_positions):
    """Trainer trains only the interventions. With collator_positions, a collator puts
    prompt-only positions in the batch as reft_positions (remove_unused_columns=False, else
    the Trainer drops the column); the model's forward never sees that kwarg."""
    pytest.importorskip("accelerate")
    tf = pytest.importorskip("transformers")
    model, _ = build("llama")
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = batch(B=3, left=False)
    prompt_len = [4, 3, 1]
    rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100),
             "prompt_len": n} for i, m, n in zip(ids, mask, prompt_len)] * 4

    def collate(feats):
        out = {k: torch.stack([f[k] for f in feats]) for k in ("input_ids", "attention_mask",
                                                               "labels")}
        if collator_positions:
            out["reft_positions"] = reft_ext.positions_from_prompt(
                "f1+l1", [f["prompt_len"] for f in feats], out["attention_mask"])
        return out

    args = tf.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                                max_steps=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                                save_strategy="no", logging_strategy="no",
                                remove_unused_columns=False)
    seen = []   # the positions each step's edit used
    model.reft_interventions["default"]["0"].register_forward_pre_hook(lambda m, a: seen.append(a[1]))
    tf.Trainer(model=model, args=args, train_dataset=rows, data_collator=collate).train()
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("reft_interventions."), k
    expect = (torch.tensor([[0, 3], [0, 2], [0, -1]]) if collator_positions
              else reft_ext.positions_from_mask("f2+l2", mask))
    # what the last step edited: its rows (shuffled by the Trainer) are rows of `expect`
    last = seen[-1]
    assert last.shape == (3, expect.shape[1])
    assert all(row.tolist() in expect.tolist() for row in last)


# Dynamo (torch 2.13) instantiates torch.autograd.Function() itself to trace any
# autograd.Function's ctx, inside warnings.catch_warnings(record=True), which does not
# override pytest's filterwarnings=error (see test_compile.py): not a warning of ours.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager():
    """torch.compile(model, fullgraph=True): our hooks and the op trace without breaks
    (aot_eager: the same Dynamo capture and AOT autograd as inductor, without codegen)."""
    model, _ = build("llama")
    ids, mask = batch(left=True)
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")   # no C compiler
    w = torch.randn(3, 9, 97)
    pos = torch.tensor([[1, 8], [4, -1], [8, 7]])
    for kw in ({}, {"reft_positions": pos}):
        grads = []
        for m in (model, compiled):
            model.zero_grad()
            out = m(input_ids=ids, attention_mask=mask, **kw).logits
            (out * w).sum().backward()
            grads.append((out.detach(), _grads(model)))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        for k in grads[0][1]:
            torch.testing.assert_close(grads[0][1][k], grads[1][1][k])


def test_ddp_wrapped_patched_model(tmp_path):
    """DistributedDataParallel (gloo, world size 1) around a patched model: kwargs such as
    reft_positions pass through to the patched module; grads equal the unwrapped run."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    model, _ = build("llama")
    ids, mask = batch()
    torch.manual_seed(0)
    reft_ext.patch(model, [0, 2], rank=4, positions="f2+l2")
    plain = copy.deepcopy(model)
    pos = torch.tensor([[8, 0], [4, 5], [-1, 7]])
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        for kw in ({}, {"reft_positions": pos}):
            for m in (ddp, plain):
                m.zero_grad()
                m(input_ids=ids, attention_mask=mask, **kw).logits.pow(2).mean().backward()
            a, b = _grads(model), _grads(plain)
            assert len(a) == 6
            for k in a:
                torch.testing.assert_close(a[k], b[k])
    finally:
        dist.destroy_process_group()
