"""Issue 19 item 1: the README's Trainer `collate` must label and position the same tokens
whichever side the tokenizer pads on. It used `labels[i, :len(p)] = -100`, which on a
left-padded row masks padding and leaves the prompt in the loss, silently.

The function is taken from README.md itself (the "Example: Hugging Face Trainer" block) and
run with the tests' offline byte-level tokenizer in place of the hub one."""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import reft_ext  # noqa: E402
from _integration_util import byte_tokenizer  # noqa: E402
from test_readme_blocks import readme_blocks  # noqa: E402


def _readme_collate(tok):
    block = readme_blocks()[("Example: Hugging Face Trainer", 0)]
    src = re.search(r"^def collate\(rows\):.*?^    return batch\n", block, re.S | re.M)
    assert src, "no collate in the README's Trainer example"
    ns = {"tok": tok, "torch": torch, "reft_ext": reft_ext}
    exec(src.group(0), ns)
    return ns["collate"]


ROWS = [{"prompt": "Who wrote Hamlet?", "answer": " William Shakespeare."},
        {"prompt": "What is the capital of France?", "answer": " Paris."},
        {"prompt": "2+2?", "answer": " 4"}]


def _per_row(batch):
    """Each row's labels over its real tokens and its edit positions counted from its first
    real token: what must not depend on the padding side."""
    out = []
    for i in range(len(ROWS)):
        valid = batch["attention_mask"][i].bool()
        start = int(valid.nonzero()[0])
        pos = [int(p) - start for p in batch["reft_positions"][i] if p >= 0]
        out.append((batch["labels"][i][valid].tolist(), pos,
                    bool((batch["labels"][i][~valid] == -100).all())))
    return out


def test_trainer_collate_is_padding_side_proof():
    tok = byte_tokenizer()
    rows = {}
    for side in ("right", "left"):
        tok.padding_side = side
        rows[side] = _per_row(_readme_collate(tok)(ROWS))
    assert rows["left"] == rows["right"]
    for (labels, pos, pad_masked), r in zip(rows["right"], ROWS):
        n_prompt = len(tok(r["prompt"])["input_ids"])
        answer = tok(r["prompt"] + r["answer"])["input_ids"][n_prompt:] + [tok.eos_token_id]
        assert labels == [-100] * n_prompt + answer  # loss on the answer and eos only
        assert pad_masked and pos and max(pos) < n_prompt  # edits within the prompt
