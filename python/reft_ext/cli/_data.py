"""Training data of `reft-ext train`: the JSONL records, their train / held-out split, and
the padded batches with the positions the interventions edit."""
from __future__ import annotations

import json
import random
from pathlib import Path

from ._common import DATA_DIR, UsageError, first_line

DEFAULT_DATA = DATA_DIR / "special_names.jsonl"


def read_jsonl(path, option: str, fields: str):
    """Yields (where, record) for each non-empty line of a JSONL file given as ``option``
    (where: "OPTION PATH:LINE", for messages); UsageError for a missing or unreadable file,
    a line that is not JSON, or not an object (fields: what the object must hold)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{option} {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{option} {path}: cannot read: {first_line(e)}")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{option} {path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})")
        if not isinstance(rec, dict):
            raise UsageError(f"{where}: expected a JSON object with {fields}")
        yield where, rec


def load_data(path) -> list[dict]:
    records = []
    for where, rec in read_jsonl(path, "--data", "\"prompt\" and \"response\""):
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str) or not rec[key]:
                raise UsageError(f"{where}: \"{key}\" must be a non-empty string")
        split = rec.get("split", "train")
        if split not in ("train", "heldout"):
            raise UsageError(f"{where}: \"split\" must be \"train\" or \"heldout\"")
        records.append({"prompt": rec["prompt"], "response": rec["response"],
                        "split": split, "explicit": "split" in rec})
    if not records:
        raise UsageError(f"--data {path}: no records")
    return records


def split_data(records, heldout_fraction: float, seed: int):
    if any(r["explicit"] for r in records):
        train = [r for r in records if r["split"] == "train"]
        held = [r for r in records if r["split"] == "heldout"]
    else:
        order = records[:]
        random.Random(seed).shuffle(order)
        k = int(len(order) * heldout_fraction)
        held, train = order[:k], order[k:]
    if not train:
        raise UsageError("--data: no training records (all are marked \"heldout\")")
    return train, held


def encode(tok, records):
    out = []
    for r in records:
        p = tok.encode_prompt(r["prompt"])
        a = tok.encode_response(r["response"]) + [tok.eos_token_id]
        out.append((p, a))
    return out


def train_batch(pairs, tok, spec, device):
    import torch

    from ..model.positions import positions_from_prompt

    T = max(len(p) + len(a) for p, a in pairs)
    B = len(pairs)
    ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        seq = p + a
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, len(p):len(seq)] = torch.tensor(a)
        mask[i, :len(seq)] = 1
    pos = positions_from_prompt(spec, [len(p) for p, _ in pairs], mask)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "labels": labels.to(device), "reft_positions": pos.to(device)}
