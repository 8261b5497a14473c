"""The byte-level tokenizer of reft_ext's built-in model (python/reft_ext/data/base_model).

Token ids 0-255 are the UTF-8 bytes, then <pad>, <bos>, <eos>. No vocabulary file is
needed; the model directory's ``reft_ext_tokenizer.json`` only names this scheme.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TOKENIZER_FILE = "reft_ext_tokenizer.json"


class ByteTokenizer:
    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        cfg = {"type": "bytes", "pad_token_id": self.pad_token_id,
               "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
               "vocab_size": self.vocab_size}
        (Path(directory) / TOKENIZER_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
