"""Helpers of the integration tests (TRL, accelerate, quantised bases): an offline
tokenizer and a tiny random Llama sized for it. No tests here.

There is no model hub in CI: the tokenizer is byte-level BPE with no merges (256 byte
tokens + <pad>, <s>, </s>), built in memory, with a minimal chat template for TRL's
conversational datasets; the model is built from a config with random weights.
"""
from __future__ import annotations

import torch

PAD, BOS, EOS = 0, 1, 2


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    # The rendered prompt (with add_generation_prompt) is a prefix of prompt + completion,
    # as TRL expects of a chat template.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    return tok


def tiny_llama(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 1234):
    """A random Llama (d=hidden, 4 heads, 2 KV heads), eager attention, eval mode.

    The LM head is drawn with std 0.3 instead of the config's 0.02: after the final RMSNorm
    a 0.02-std head gives logits of about +-1 whatever the hidden states, so no edit of them
    could make a confident prediction and a "loss decreases" check would measure nothing.
    """
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=2 * hidden, max_position_embeddings=128,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.3)
    return model


def loop_prompt_positions(first: int, last: int, prompt_lens: list[int]) -> torch.Tensor:
    """(B, first+last) positions of the first / last tokens of each row's prompt (which
    starts at token 0: right padding), from a Python loop; -1 fills."""
    rows = []
    for n in prompt_lens:
        sel = sorted(set(range(min(first, n))) | set(range(max(0, n - last), n)))
        rows.append(sel + [-1] * (first + last - len(sel)))
    return torch.tensor(rows, dtype=torch.long)


def train_losses(model, steps: int, lr: float, weight_decay: float = 0.01,
                 **batch) -> list[float]:
    """AdamW on the model's trainable parameters for `steps` steps on one batch
    (input_ids, attention_mask, labels), train mode then eval mode; the per-step losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=weight_decay)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
