"""patch(model, layers, rank): LoReFT on the decoder layers of any torch model.

How it works (all state lives on the model, nothing in closures, so copy.deepcopy of a
patched model is an independent patched model):

* ``model.reft_interventions``: one nn.ModuleDict {str(layer index): intervention}. Base
  state_dict keys are unchanged; the new keys all start with ``reft_interventions.``.
* ``model._reft_state``: a plain object with the patch config and the positions of the
  current forward. Each patched layer holds ``layer._reft_link`` (state + its intervention).
* Hooks on the model and on each patched layer, and a ``model.generate`` shadow: see
  model/hooks.py.

Positions of a forward, first match wins:
  1. the model was called with a non-empty KV cache (``cache`` / ``past_key_values``):
     decode step, no edit;
  2. ``reft_positions=`` (B, P) passed to the model's forward (or to generate);
  3. positions fixed by generate() from the prompt;
  4. ``with reft_ext.positions(model, tensor):``;
  5. the spec given to patch() ("all", "last", "f7+l7", ...) computed from the 2-D
     attention mask of the call (``attention_mask``, 1 = token; or ``src_key_padding_mask``
     / ``key_padding_mask``, True = pad), or from all T tokens when there is none.

Positions live for one call of the patched module: a layer run outside one (a call below
it, ``model.model(...)``, or ``model.forward(...)`` bypassing the hooks) edits nothing. A
layer re-run by a gradient checkpoint recompute during backward (transformers 4.x / < 5.23
and plain torch checkpoint the layer's __call__, hooks included) edits the positions its own
forward used, even when other forwards ran since (see hooks._CallRecord).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Sequence

import torch
from torch import nn

from ..bank import Untied
from ..modules import build_intervention
from .hooks import (Generate, Link, State, check_explicit, layer_hook, root_post_hook,
                    root_pre_hook)
from .layers import find_layers, normalise_layers, seq_first
from .layers import hidden_size as infer_hidden_size  # patch() has a hidden_size argument
from .positions import PositionSpec, check_untied_spec, parse_positions

__all__ = ["patch", "unpatch", "is_patched", "interventions", "disabled", "use_positions",
           "print_trainable_parameters", "trainable_counts", "patch_config"]

CONTAINER = "reft_interventions"


def patch(model: nn.Module, layers: int | Sequence[int] | str, rank: int, *,
          positions: str | PositionSpec = "all", intervention="loreft",
          dtype: torch.dtype | None = None, layer_path: str | None = None,
          hidden_size: int | None = None, dropout: float = 0.0,
          backend: str = "fused", tied: bool = True) -> nn.Module:
    """Adds trainable interventions to the decoder layers of ``model``, in place.

    Args:
        model: any nn.Module whose layers map hidden states (B, T, d) to (B, T, d) (or a
            tuple / ModelOutput whose first item is that); Hugging Face or plain torch.
            nn.Transformer* layers with batch_first=False ((T, B, d)) are handled.
        layers: indices into the discovered layer container (negative allowed), or "all".
        rank: r of each intervention.
        positions: default spec, "all" | "last" | "f{p}" | "l{s}" | "f{p}+l{s}"; see the
            module docstring for how positions are resolved per forward.
        intervention: "loreft" (default), "direft", or a factory called as
            ``factory(d, rank, dtype=..., device=...)`` returning a module with
            ``forward(h, positions, inplace=True)`` (see reft_ext.modules).
        dtype: intervention parameter dtype; default float32 (also on a bf16/fp16 model),
            float64 on a float64 model.
        layer_path: dotted path of the layer container, to override discovery.
        hidden_size: d, to override inference from the config / layer parameters.
        dropout, backend: passed to LoReFT / DiReFT (backend "reference" runs the
            pure-PyTorch path instead of the fused op).
        tied: True (default): one intervention per layer, applied at every position of
            the spec. False: untied, as pyreft's share_weights=False: two interventions
            per layer (a reft_ext.bank.Untied of two members), #0 editing the first p and
            #1 the last s tokens of a "f{p}+l{s}" spec, each clipped to half the row's
            valid tokens (pyreft's rule, see reft_ext.model.positions), both in one fused
            call. Explicit positions are then (B, 2, P) or a tuple (first, last) of
            (B, P_k) tensors.

    Returns:
        ``model``, with base parameters frozen and ``model.reft_interventions`` holding the
        interventions (random init from torch's global RNG: seed before patch() to
        reproduce it).

    Raises:
        ValueError on a bad spec, layer index, an already patched model, or when the layer
        container cannot be found unambiguously.
    """
    if is_patched(model):
        raise ValueError("reft_ext.patch: model is already patched; call reft_ext.unpatch "
                         "first")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"reft_ext.patch: rank must be a positive int, got {rank!r}")
    if not isinstance(tied, bool):
        raise TypeError(f"reft_ext.patch: tied must be a bool, got {type(tied).__name__}")
    spec = parse_positions(positions) if tied else check_untied_spec(positions)
    path, container = find_layers(model, layer_path)
    ids = normalise_layers(layers, len(container))
    blocks = list(container.children())
    d = hidden_size if hidden_size is not None else infer_hidden_size(model, blocks[ids[0]])
    if rank > d:
        raise ValueError(f"reft_ext.patch: rank={rank} exceeds the hidden size d={d}")
    if dtype is None:
        fp = [p.dtype for p in model.parameters() if p.is_floating_point()]
        dtype = torch.float64 if fp and all(t == torch.float64 for t in fp) else torch.float32

    def make(block):
        dev = next((p.device for p in block.parameters()), None)
        return build_intervention(intervention, d, rank, dtype=dtype, device=dev,
                                  dropout=dropout, backend=backend)

    def make_layer(block):
        return make(block) if tied else Untied([make(block), make(block)])

    mods = nn.ModuleDict({str(i): make_layer(blocks[i]) for i in ids})   # may raise: no change
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    st = State(spec, path, ids, requires_grad, params, "generate" in model.__dict__,
               0 if tied else 2)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, CONTAINER, mods)
    model.__dict__["_reft_state"] = st
    model.register_forward_pre_hook(root_pre_hook, with_kwargs=True, prepend=True)
    model.register_forward_hook(root_post_hook, always_call=True)
    for i in ids:
        blocks[i].__dict__["_reft_link"] = Link(st, mods[str(i)], seq_first(blocks[i]))
        blocks[i].register_forward_hook(layer_hook, with_kwargs=True, prepend=True)
    if callable(getattr(type(model), "generate", None)) and not st.had_generate_attr:
        model.__dict__["generate"] = Generate(model)
    return model


def is_patched(model: nn.Module) -> bool:
    """True if reft_ext.patch was applied to ``model`` (and not undone)."""
    return "_reft_state" in model.__dict__


def _state(model: nn.Module, fn: str) -> State:
    st = model.__dict__.get("_reft_state")
    if st is None:
        raise ValueError(f"reft_ext.{fn}: model is not patched by reft_ext.patch")
    return st


def _remove_hook(module: nn.Module, fn) -> None:
    for dname in ("_forward_hooks", "_forward_pre_hooks"):
        hooks = getattr(module, dname)
        for hid in [k for k, v in hooks.items() if v is fn]:
            del hooks[hid]
            for extra in (dname + "_with_kwargs", "_forward_hooks_always_called"):
                getattr(module, extra, {}).pop(hid, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Removes everything patch() added and restores the requires_grad flags; returns model.

    Afterwards the module tree, hooks, state_dict and outputs are those of the model before
    patch() (the interventions are discarded: save them first if needed).
    """
    st = _state(model, "unpatch")
    container = model.get_submodule(st.layer_path)
    blocks = list(container.children())
    for i in st.layer_ids:
        _remove_hook(blocks[i], layer_hook)
        blocks[i].__dict__.pop("_reft_link", None)
    _remove_hook(model, root_pre_hook)
    _remove_hook(model, root_post_hook)
    delattr(model, CONTAINER)
    if not st.had_generate_attr:
        model.__dict__.pop("generate", None)
    del model.__dict__["_reft_state"]
    for n, p in model.named_parameters():
        p.requires_grad_(st.requires_grad.get(n, p.requires_grad))
    return model


def interventions(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: intervention module} of a patched model, in patch order."""
    st = _state(model, "interventions")
    mods = getattr(model, CONTAINER)
    return {i: mods[str(i)] for i in st.layer_ids}


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: forwards inside run the base model (no edits). Nests."""
    st = _state(model, "disabled")
    st.disabled += 1
    try:
        yield model
    finally:
        st.disabled -= 1


@contextlib.contextmanager
def use_positions(model: nn.Module, positions: torch.Tensor) -> Iterator[nn.Module]:
    """Context manager: forwards (and generate) inside edit ``positions``.

    positions: (B, P) int64/int32, token indices in [0, T) or -1, no repeats per row; B must
    match the batch of each forward inside. An explicit ``reft_positions=`` kwarg still
    wins. Also available as ``reft_ext.positions(model, positions)``.
    """
    st = _state(model, "positions")
    st.context.append(check_explicit(positions, "positions", st.groups))
    try:
        yield model
    finally:
        st.context.pop()


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable elements, all elements) of the model's parameters, each tensor counted
    once however often it is shared."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: N || all params: M || trainable%: X`` (peft's format)."""
    trainable, total = trainable_counts(model)
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {pct:.4f}")


def patch_config(model: nn.Module) -> dict:
    """Read-only summary of how ``model`` was patched (what reft_ext.save records).

    Returns:
        {"layer_path": dotted path of the layer container, "layers": patched layer indices
        in patch order, "n_layers": length of the container, "positions": the default
        positions spec as a string ("all", "f7+l7", ...), "tied": False for untied
        interventions}.
    """
    st = _state(model, "patch_config")
    return {"layer_path": st.layer_path, "layers": list(st.layer_ids),
            "n_layers": len(model.get_submodule(st.layer_path)), "positions": str(st.spec),
            "tied": not st.groups}
