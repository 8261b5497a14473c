"""TRL's SFTTrainer and DPOTrainer on a patched model (tiny random Llama, byte tokenizer).

SFT: the trainer's per-step losses equal a hand-written loop (own padding, own loss, own
prompt positions from a Python loop) from the same initial interventions, on prompt-
completion and conversational datasets; the collator shown in the README puts the edit on
the prompt tokens that TRL's completion-only loss masks; ReftCheckpointCallback's
checkpoint reloads into a fresh base to bitwise-identical logits.

DPO: the reference is the same patched policy under ``reft_ext.disabled`` (no second copy
of the base): TRL precomputes the reference log-probs while the trainer is built inside
``with reft_ext.disabled(model):``. The gradient of TRL's loss on one batch equals a
hand-written DPO loss (policy log-probs with the edit, reference log-probs of the bare base)
on the same batch, with and without gradient checkpointing.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import reft_ext
from _integration_util import byte_tokenizer, loop_prompt_positions, tiny_llama

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [
    # TRL's configs default gradient_checkpointing=True; transformers 5 renamed the flag.
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LAYERS, RANK, FIRST, LAST = [0, 1], 4, 3, 3
SPEC = f"f{FIRST}+l{LAST}"


class PromptPositions:
    """The README's collator wrapper: edit the first/last tokens of the prompt, i.e. the
    valid tokens TRL leaves out of the loss (labels == -100 in SFT, completion_mask == 0
    in DPO)."""

    def __init__(self, collator, spec):
        self.collator, self.spec = collator, spec

    def __call__(self, examples):
        batch = self.collator(examples)
        if "completion_mask" in batch:                       # DPO
            prompt = batch["completion_mask"] == 0
        else:                                                # SFT, completion-only loss
            prompt = batch["labels"] == -100
        prompt &= batch["attention_mask"] != 0
        batch["reft_positions"] = reft_ext.positions_from_mask(self.spec, prompt)
        return batch


def _patched(tok, seed=0):
    model = tiny_llama(len(tok))
    torch.manual_seed(seed)
    return reft_ext.patch(model, LAYERS, RANK, positions=SPEC)


def _ids(x):
    """apply_chat_template(tokenize=True) returns ids (4.x) or a BatchEncoding (5.x)."""
    return list(x["input_ids"] if hasattr(x, "keys") else x)


# ----------------------------------------------------------------------------- SFT

def _sft_rows(kind):
    rows = []
    for i in range(8):
        p, c = f"q{i}:", f" a{i % 3}"
        if kind == "conversational":
            rows.append({"prompt": [{"role": "user", "content": p}],
                         "completion": [{"role": "assistant", "content": c}]})
        else:
            rows.append({"prompt": p, "completion": c})
    return rows


def _prompt_len(tok, row):
    if isinstance(row["prompt"], list):
        return len(_ids(tok.apply_chat_template(row["prompt"], tokenize=True,
                                                add_generation_prompt=True)))
    return len(tok(row["prompt"])["input_ids"])


def _hand_sft(model, seqs, prompt_lens, steps, lr):
    """Full-batch AdamW on the completion-only loss, without TRL."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    labels = ids.clone()
    for i, (s, n) in enumerate(zip(seqs, prompt_lens)):
        labels[i, :n] = -100
        labels[i, len(s):] = -100
    pos = loop_prompt_positions(FIRST, LAST, prompt_lens)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask, reft_positions=pos).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=-100)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["prompt_completion", "conversational"])
def test_sft_trainer_matches_hand_written_loop(kind, tmp_path):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    tok = byte_tokenizer()
    model = _patched(tok)
    init = copy.deepcopy(model)
    rows = _sft_rows(kind)
    steps, lr = 20, 1e-1
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=steps,
        learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="steps",
        save_steps=steps, save_only_model=True, disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_list(rows),
                             callbacks=[reft_ext.ReftCheckpointCallback()])
    assert trainer.model is model                       # no copy: the patched instance trains
    assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
    collator = trainer.data_collator = PromptPositions(trainer.data_collator, SPEC)   # README

    # TRL's completion-only labels mask exactly the prompt we tokenize ourselves
    prepared = sorted(trainer.train_dataset, key=lambda r: r["input_ids"])
    seqs = [r["input_ids"] for r in prepared]
    prompt_lens = []
    for r in prepared:
        n = next(t for t, v in enumerate(r["labels"]) if v != -100)
        prompt_lens.append(n)
    want = sorted(_prompt_len(tok, r) for r in rows)
    assert sorted(prompt_lens) == want

    trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    hand = _hand_sft(init, seqs, prompt_lens, steps, lr)
    # Same maths, other summation order (row order, fused log-prob head): float32 rounding
    # compounded by Adam over the steps. Measured max rel. diff ~1e-6; atol: transformers
    # 4.x logs the loss rounded to 4 decimals.
    torch.testing.assert_close(torch.tensor(trl_losses), torch.tensor(hand), rtol=1e-4,
                               atol=1e-4)
    assert hand[-1] < 0.6 * hand[0], hand    # it learns (measured: 0.34x, 0.53x)
    for (n, a), b in zip(model.reft_interventions.named_parameters(),
                         init.reft_interventions.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=n)

    # the callback's checkpoint reloads into a fresh base: bitwise the same logits
    ck = tmp_path / f"checkpoint-{steps}" / "reft"
    fresh = reft_ext.load(tiny_llama(len(tok)), ck)
    batch = collator([{"input_ids": s, "labels": [-100] * n + s[n:]}
                      for s, n in zip(seqs, prompt_lens)])
    torch.testing.assert_close(batch["reft_positions"],
                               loop_prompt_positions(FIRST, LAST, prompt_lens))
    model.eval()
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  reft_positions=batch["reft_positions"])
        assert torch.equal(fresh(**kw).logits, model(**kw).logits)
        with reft_ext.disabled(model):
            assert not torch.equal(model(**kw).logits, fresh(**kw).logits)


# ----------------------------------------------------------------------------- DPO

BETA = 0.1


def _seq_logp(model, prompt, completion):
    """log p(completion | prompt), one unpadded sequence; the edit (if any) on the first /
    last tokens of the prompt, positions from a Python loop."""
    ids = torch.tensor([prompt + completion])
    kw = {}
    if reft_ext.is_patched(model):
        kw["reft_positions"] = loop_prompt_positions(FIRST, LAST, [len(prompt)])
    logits = model(input_ids=ids, **kw).logits[0]
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    tgt = ids[0, 1:]
    return logp.gather(1, tgt[:, None])[len(prompt) - 1:, 0].sum()


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_dpo_trainer_gradient_equals_hand_written_dpo(gradient_checkpointing, tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    tok = byte_tokenizer()
    model = _patched(tok)
    base = reft_ext.unpatch(copy.deepcopy(model))        # the reference, for the hand-written loss
    # Copies are taken before TRL sees the model: its fused LM head wraps model.forward in
    # a closure over the original model, so a later deepcopy would still run the original.
    hand = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.reft_interventions.named_parameters()}
    # chosen and rejected start with different tokens: the last patched layer's edit reaches
    # the DPO margin only through the prediction of the first completion token (the prompt
    # positions are the same in both sequences), which cancels when the two share it.
    rows = [{"prompt": f"q{i}:", "chosen": f" a{i % 3}", "rejected": f"b{i % 2}x"}
            for i in range(4)]
    # One SGD step with lr 1 and no clipping: the parameter change is minus TRL's gradient.
    args = trl.DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=1,
        optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, beta=BETA, gradient_checkpointing=gradient_checkpointing,
        precompute_ref_log_probs=True, bf16=False, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="no", disable_tqdm=True)
    # The reference log-probs are computed in the constructor: inside disabled() they are
    # the bare base's, and no second copy of the model is loaded.
    with reft_ext.disabled(model):
        trainer = trl.DPOTrainer(model=model, args=args, processing_class=tok,
                                 train_dataset=datasets.Dataset.from_list(rows))
    assert trainer.ref_model is None and trainer.model is model
    assert isinstance(trainer.data_collator, DataCollatorForPreference)
    trainer.data_collator = PromptPositions(trainer.data_collator, SPEC)               # README

    prepared = list(trainer.train_dataset)
    for r, row in zip(prepared, rows):                    # TRL's tokenization, checked
        assert r["prompt_ids"] == tok(row["prompt"])["input_ids"]
        assert r["chosen_ids"] == tok(row["chosen"])["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():                                 # reference = base without edit
        ref_c = torch.tensor([_seq_logp(base, r["prompt_ids"], r["chosen_ids"]).item()
                              for r in prepared])
        ref_r = torch.tensor([_seq_logp(base, r["prompt_ids"], r["rejected_ids"]).item()
                              for r in prepared])
        edited = torch.tensor([_seq_logp(hand, r["prompt_ids"], r["chosen_ids"]).item()
                               for r in prepared])
    torch.testing.assert_close(torch.tensor([r["ref_chosen_logps"] for r in prepared]), ref_c,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["ref_rejected_logps"] for r in prepared]),
                               ref_r, rtol=1e-5, atol=1e-5)
    assert (edited - ref_c).abs().max() > 0.5            # the edit changes the log-probs

    trainer.train()
    assert model.model.layers[0].gradient_checkpointing == gradient_checkpointing
    trl_grad = {n: start[n] - p.detach() for n, p in model.reft_interventions.named_parameters()}

    # hand-written DPO (sigmoid loss) on the same batch, from the same initial parameters
    hand.train()
    losses = []
    for r, rc, rr in zip(prepared, ref_c, ref_r):
        pc = _seq_logp(hand, r["prompt_ids"], r["chosen_ids"])
        pr = _seq_logp(hand, r["prompt_ids"], r["rejected_ids"])
        losses.append(-F.logsigmoid(BETA * ((pc - rc) - (pr - rr))))
    loss = torch.stack(losses).mean()
    loss.backward()
    # (transformers 4.x logs the loss rounded to 4 decimals)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(loss.item(), abs=1e-4)
    n = 0
    # tolerance: float32 summation order (padded batch vs one sequence at a time) plus the
    # rounding of p - g when the step is recovered from the parameters (~1 ulp of |p|)
    for name, p in hand.reft_interventions.named_parameters():
        torch.testing.assert_close(trl_grad[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert p.grad.abs().max() > 1e-4, name
        n += 1
    assert n == 3 * len(LAYERS)
