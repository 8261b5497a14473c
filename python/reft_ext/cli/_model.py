"""The model a command runs: a local Hugging Face causal LM (or the built-in byte-level
one) with the few tokenizer calls the CLI needs, and greedy generation."""
from __future__ import annotations

from pathlib import Path

from ._common import UsageError, first_line


class HFTokenizer:
    """The few calls the CLI needs, on a transformers tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.eos_token_id
        if eos is None:
            raise UsageError("the model's tokenizer has no eos token")
        self.eos_token_id = eos
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos

    def encode_prompt(self, text):
        return list(self.tok(text)["input_ids"])

    def encode_response(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class ByteTok:
    def __init__(self):
        from ._bytetok import ByteTokenizer
        self.tok = ByteTokenizer()
        self.eos_token_id = self.tok.eos_token_id
        self.pad_token_id = self.tok.pad_token_id

    def encode_prompt(self, text):
        return [self.tok.bos_token_id] + self.tok.encode(text)

    def encode_response(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


def _quiet_transformers():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_model(path, dtype_name: str, device: str):
    """(model, tokenizer) from a local Hugging Face model directory; UsageError if it is
    not one (or not a causal LM)."""
    import torch
    from ._bytetok import TOKENIZER_FILE

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--model {path}: no such directory")
    if not path.is_dir():
        raise UsageError(f"--model {path}: not a directory (expected a Hugging Face model "
                         f"directory with config.json)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model {path}: no config.json (not a Hugging Face model "
                         f"directory)")
    _quiet_transformers()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input
        raise UsageError(f"--model {path}: cannot read config.json: {first_line(e)}")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UsageError(f"--model {path}: model type {config.model_type!r} is not a causal "
                         f"language model (AutoModelForCausalLM does not support it)")
    dtype = getattr(torch, dtype_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--model {path}: cannot load the model: {first_line(e)}")
    if (path / TOKENIZER_FILE).is_file():
        tok = ByteTok()
    else:
        try:
            tok = HFTokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"--model {path}: cannot load its tokenizer: {first_line(e)}")
    try:
        model.to(device)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--device {device}: {first_line(e)}")
    model.eval()
    return model, tok


def builtin_model(dtype=None):
    """(model, tokenizer): reft_ext's built-in model, the one ``reft-ext train`` uses by
    default (a small Llama-architecture causal LM shipped in the package, no
    download), in eval mode, and its byte-level tokenizer (``encode(text) -> ids`` of the
    UTF-8 bytes 0-255, ``decode(ids)``, ``pad_token_id`` 256, ``bos_token_id`` 257,
    ``eos_token_id`` 258). dtype: default float32. Needs transformers (the "hf" extra)."""
    import torch
    from ._common import DEFAULT_MODEL
    _quiet_transformers()
    from transformers import AutoModelForCausalLM
    from ._bytetok import ByteTokenizer
    model = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=dtype or torch.float32,
                                                 local_files_only=True)
    return model.eval(), ByteTokenizer()


def generate(model, tok, prompts: list[str], max_new_tokens: int, device,
             batch_size: int = 64, adapters: list | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded up to eos; a
    continuation that did not reach eos within ``max_new_tokens`` ends in "...".

    ``adapters``: None (the model as it is), or one adapter name or None (the base model,
    no edit) per prompt for a model patched with named adapters: each batch is one
    ``model.generate(..., reft_adapter=[...])`` call that edits every row with its own
    adapter."""
    import torch

    if adapters is not None and len(adapters) != len(prompts):
        raise ValueError(f"generate: {len(adapters)} adapters for {len(prompts)} prompts")
    outs = []
    for s in range(0, len(prompts), batch_size):
        enc = [tok.encode_prompt(p) for p in prompts[s:s + batch_size]]
        T = max(len(e) for e in enc)
        ids = torch.full((len(enc), T), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, T - len(e):] = torch.tensor(e)
            mask[i, T - len(e):] = 1
        extra = {}
        if adapters is not None:
            extra["reft_adapter"] = list(adapters[s:s + batch_size])
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **extra)
        for row in gen[:, T:].tolist():
            stopped = tok.eos_token_id in row
            if stopped:
                row = row[:row.index(tok.eos_token_id)]
            outs.append(tok.decode(row) + ("" if stopped else "..."))
    return outs
