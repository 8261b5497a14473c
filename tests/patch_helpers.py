"""Shared helpers for the patch tests: tiny random models and an independent reference.

No tests here. The reference applies LoReFT with plain forward hooks and
reft_ext.ops.reference.loreft_reference (out of place), with positions from a Python loop, so
it shares nothing with reft_ext.patch except the R, W, b values it is given.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from reft_ext.modules import orthonormal_rows
from reft_ext.ops.reference import loreft_reference

D, LAYERS, VOCAB = 32, 3, 97
TOK = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _hf(name):
    tf = pytest.importorskip("transformers")
    common = dict(vocab_size=VOCAB, **TOK)
    llama_like = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, **common)
    cfgs = {
        "llama": lambda: tf.LlamaConfig(**llama_like),
        "qwen2": lambda: tf.Qwen2Config(**llama_like),
        "qwen3": lambda: tf.Qwen3Config(head_dim=8, **llama_like),
        "mistral": lambda: tf.MistralConfig(**llama_like),
        "gemma2": lambda: tf.Gemma2Config(head_dim=8, **llama_like),
        "phi3": lambda: tf.Phi3Config(**llama_like),
        "gpt2": lambda: tf.GPT2Config(n_embd=D, n_layer=LAYERS, n_head=4, n_positions=64,
                                      **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=D, num_hidden_layers=LAYERS,
                                             num_attention_heads=4, intermediate_size=64,
                                             **common),
        "opt": lambda: tf.OPTConfig(hidden_size=D, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, ffn_dim=64,
                                    word_embed_proj_dim=D, max_position_embeddings=64,
                                    **common),
        "falcon": lambda: tf.FalconConfig(hidden_size=D, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, **common),
        "bloom": lambda: tf.BloomConfig(hidden_size=D, n_layer=LAYERS, n_head=4, **common),
    }
    cfg = cfgs[name]()
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


HF_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox",
               "opt", "falcon", "bloom"]
# Layer containers, written out independently of reft_ext.find_layers.
HF_LAYER_PATHS = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
                  "mistral": "model.layers", "gemma2": "model.layers", "phi3": "model.layers",
                  "gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers",
                  "opt": "model.decoder.layers", "falcon": "transformer.h",
                  "bloom": "transformer.h"}


class PlainBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x, causal_mask):
        y = self.norm(x)
        x = x + self.attn(y, y, y, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(x)


class PlainDecoder(nn.Module):
    """A plain-torch causal LM: embedding, a ModuleList of blocks, head. No config."""

    def __init__(self, d=D, n_layers=LAYERS, vocab=VOCAB, checkpoint_layers=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(PlainBlock(d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)
        self.checkpoint_layers = checkpoint_layers

    def forward(self, input_ids):
        return self.blocks_and_head(self.embed(input_ids))

    def blocks_and_head(self, x):
        """The model after its embedding: x (B, T, d) -> logits."""
        T = x.shape[1]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        for blk in self.blocks:
            if self.checkpoint_layers and torch.is_grad_enabled():
                # transformers 4.x style: the layer's __call__ (hooks included) re-runs in
                # the backward recompute.
                x = torch.utils.checkpoint.checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, mask)
        return self.head(x)


class Encoder(nn.Module):
    """nn.TransformerEncoder on embeddings; seq-first when batch_first=False."""

    def __init__(self, d=D, batch_first=True):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(d, VOCAB)
        self.batch_first = batch_first

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.encoder(x)
        if not self.batch_first:
            x = x.transpose(0, 1)
        return self.head(x)


def build(name):
    torch.manual_seed(1234)
    if name == "plain":
        return PlainDecoder().eval(), "blocks"
    if name == "encoder":
        return Encoder().eval(), "encoder.layers"
    if name == "encoder_seq_first":
        return Encoder(batch_first=False).eval(), "encoder.layers"
    return _hf(name), HF_LAYER_PATHS[name]


def batch(B=3, T=9, left=True, seed=0):
    """input_ids (B, T) and a padded attention mask; row lengths T, T-3, 2 (short)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    lens = [T, T - 3, 2][:B]
    for i, n in enumerate(lens):
        if left:
            mask[i, :T - n] = 0
        else:
            mask[i, n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def loop_positions(spec_first, spec_last, mask, all_tokens=False):
    """Python-loop positions: list per row of token indices (first/last valid tokens)."""
    out = []
    for row in mask.tolist():
        valid = [t for t, m in enumerate(row) if m]
        if all_tokens:
            sel = valid
        else:
            sel = sorted(set(valid[:spec_first]) | set(valid[len(valid) - spec_last:]
                                                        if spec_last else []))
        out.append(sel)
    return out


def to_tensor(rows, P):
    t = torch.full((len(rows), P), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        t[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return t


class ReferenceHooks:
    """Independent LoReFT on ``model`` (an unpatched copy) at ``layers`` of ``path``.

    params: {layer index: (rotate_raw, W, b)} copied into fresh leaves; R is
    orthonormal_rows(rotate_raw) so gradients are comparable with reft_ext's parameters.
    """

    def __init__(self, model, path, params, positions, seq_first=False):
        self.positions = positions
        self.leaves = {i: tuple(t.detach().clone().requires_grad_(True) for t in p)
                       for i, p in params.items()}
        blocks = model.get_submodule(path)
        self.handles = []
        for i in params:
            self.handles.append(blocks[i].register_forward_hook(self._hook(i, seq_first)))

    def _hook(self, i, seq_first):
        def hook(mod, args, out):
            raw, W, b = self.leaves[i]
            h = out[0] if isinstance(out, tuple) else out
            hv = h.transpose(0, 1) if seq_first else h
            y = loreft_reference(hv, self.positions.to(h.device), orthonormal_rows(raw), W, b)
            y = y.transpose(0, 1) if seq_first else y
            return (y, *out[1:]) if isinstance(out, tuple) else y
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def params_of(model):
    import reft_ext
    return {i: (m.rotate_raw, m.weight, m.bias) for i, m in reft_ext.interventions(model).items()}


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def call(model, ids, mask, name, **kw):
    if name in ("plain", "encoder", "encoder_seq_first"):
        return logits_of(model(ids, **kw))
    return logits_of(model(input_ids=ids, attention_mask=mask, **kw))


def copy_model(model):
    return copy.deepcopy(model)


def enable_checkpointing(model):
    """Turns on gradient checkpointing of a transformers model: layer.forward on 5.x
    (activation_checkpointing_enable), the layer call on 4.x (non-reentrant)."""
    import transformers
    if int(transformers.__version__.split(".")[0]) >= 5:
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
