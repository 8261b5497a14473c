"""patch(model, layers, rank): LoReFT on the decoder layers of any torch model.

How it works (all state lives on the model, nothing in closures, so copy.deepcopy of a
patched model is an independent patched model):

* ``model.reft_interventions``: nn.ModuleDict {adapter name: nn.ModuleDict {str(layer
  index): intervention}}. Base state_dict keys are unchanged; the new keys all start with
  ``reft_interventions.<adapter>.``. patch() creates the first adapter, and adds one per
  further call with a new ``adapter=`` name.
* ``model._reft_state``: a plain object with each adapter's config (hooks.Adapter), the
  default adapter and the positions of the current forward. Each layer some adapter edits
  holds ``layer._reft_link`` (the state and the layer's index).
* Hooks on the model and on each of those layers, and a ``model.generate`` shadow: see
  model/hooks.py; a forward with one adapter per row: model/adapters.py.

The adapters of a forward: ``reft_adapter=`` (a name, or one name or None per row) given
to the forward or to generate, else the default adapter (set_adapter; the first one).

Positions of a forward, first match wins:
  1. the model was called with a non-empty KV cache (``cache`` / ``past_key_values``):
     decode step, no edit;
  2. ``reft_positions=`` (B, P) passed to the model's forward (or to generate), for every
     row whatever its adapter;
  3. positions fixed by generate() from the prompt;
  4. ``with reft_ext.positions(model, tensor):``;
  5. the spec given to patch() for the row's adapter ("all", "last", "f7+l7", ...) from
     the 2-D attention mask of the call (``attention_mask``, 1 = token; or
     ``src_key_padding_mask`` / ``key_padding_mask``, True = pad), or from all T tokens
     when there is none.

Positions live for one call of the patched module: a layer run outside one (a call below
it, ``model.model(...)``, or ``model.forward(...)`` bypassing the hooks) edits nothing. A
layer re-run by a gradient checkpoint recompute during backward (transformers 4.x / < 5.23
and plain torch checkpoint the layer's __call__, hooks included) edits the positions its own
forward used, even when other forwards ran since (see hooks._CallRecord).
"""
from __future__ import annotations

import contextlib
import inspect
import re
from typing import Iterator, Sequence

import torch
from torch import nn

from ..bank import Untied
from ..modules import build_intervention, kind_of
from .hooks import (Adapter, Generate, Link, State, check_explicit, layer_hook,
                    root_post_hook, root_pre_hook)
from .layers import find_layers, normalise_layers, seq_first
from .layers import hidden_size as infer_hidden_size  # patch() has a hidden_size argument
from .positions import PositionSpec, check_untied_spec, parse_positions

__all__ = ["patch", "unpatch", "is_patched", "interventions", "disabled", "use_positions",
           "print_trainable_parameters", "trainable_counts", "patch_config", "adapters",
           "set_adapter", "delete_adapter"]

CONTAINER = "reft_interventions"
DEFAULT = "default"   # the adapter name of patch() calls that give none
UNTIED_GROUPS = 2     # interventions per layer of patch(..., tied=False): first, last


def patch(model: nn.Module, layers: int | Sequence[int] | str, rank: int, *,
          positions: str | PositionSpec = "all", intervention="loreft",
          dtype: torch.dtype | None = None, layer_path: str | None = None,
          hidden_size: int | None = None, dropout: float = 0.0,
          backend: str = "fused", tied: bool = True, adapter: str = DEFAULT) -> nn.Module:
    """Adds trainable interventions to the decoder layers of ``model``, in place.

    Args:
        model: any nn.Module whose layers map hidden states (B, T, d) to (B, T, d) (or a
            tuple / ModelOutput whose first item is that); Hugging Face or plain torch.
            nn.Transformer* layers with batch_first=False ((T, B, d)) are handled.
        layers: indices into the discovered layer container (negative allowed), or "all".
        rank: r of each intervention.
        positions: default spec, "all" | "last" | "f{p}" | "l{s}" | "f{p}+l{s}"; see the
            module docstring for how positions are resolved per forward.
        intervention: a registered type ("loreft" (default), "noreft", "consreft",
            "lobireft", "direft", "nodireft"), or a factory called as
            ``factory(d, rank, dtype=..., device=...)`` returning a module with
            ``forward(h, positions, inplace=True)`` (see reft_ext.modules).
        dtype: intervention parameter dtype; default float32 (also on a bf16/fp16 model),
            float64 on a float64 model.
        layer_path: dotted path of the layer container, to override discovery.
        hidden_size: d, to override inference from the config / layer parameters (an
            adapter added to a patched model whose d cannot be inferred takes its other
            adapters' d).
        dropout, backend: passed to the intervention type (backend "reference" runs the
            pure-PyTorch path instead of the fused op).
        tied: True (default): one intervention per layer, applied at every position of
            the spec. False: untied, as pyreft's share_weights=False: two interventions
            per layer (a reft_ext.bank.Untied of two members), #0 editing the first p and
            #1 the last s tokens of a "f{p}+l{s}" spec, each clipped to half the row's
            valid tokens (pyreft's rule, see reft_ext.model.positions), both in one fused
            call. Explicit positions are then (B, 2, P) or a tuple (first, last) of
            (B, P_k) tensors.
        adapter: the name of the interventions created (default "default"). On an
            unpatched model they become its first adapter, also the default one (the
            adapter of calls that name none, see :func:`set_adapter`). On a patched model
            a new name adds another adapter, which may use other layers, rank, positions
            spec, type, dtype and tied-ness; the others are left as they are. Forwards
            and generate pick adapters with ``reft_adapter=`` (one name, or one per row).

    Returns:
        ``model``, with base parameters frozen and ``model.reft_interventions[adapter]``
        holding {str(layer): intervention} (random init from torch's global RNG: seed
        before patch() to reproduce it).

    Raises:
        ValueError on a bad spec, layer index, an adapter name the model already has, or
        when the layer container cannot be found unambiguously.
    """
    st = model.__dict__.get("_reft_state")
    _check_adapter_name(adapter)
    if st is not None and adapter in st.adapters:
        raise ValueError(f"reft_ext.patch: model is already patched with an adapter named "
                         f"{adapter!r}; pass adapter= a new name to add another, or call "
                         f"reft_ext.unpatch first")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"reft_ext.patch: rank must be a positive int, got {rank!r}")
    if not isinstance(tied, bool):
        raise TypeError(f"reft_ext.patch: tied must be a bool, got {type(tied).__name__}")
    spec = parse_positions(positions) if tied else check_untied_spec(positions)
    if st is not None and layer_path is None:
        layer_path = st.layer_path
    path, container = find_layers(model, layer_path)
    if st is not None and path != st.layer_path:
        raise ValueError(f"reft_ext.patch: adapter {adapter!r} would edit the layers at "
                         f"{path!r}, the model's other adapters those at {st.layer_path!r}")
    ids = normalise_layers(layers, len(container))
    blocks = list(container.children())
    d = hidden_size if hidden_size is not None else _hidden_size(model, blocks[ids[0]], st)
    if rank > d:
        raise ValueError(f"reft_ext.patch: rank={rank} exceeds the hidden size d={d}")
    if dtype is None:
        fp = [p.dtype for n, p in model.named_parameters() if p.is_floating_point()
              and not n.startswith(CONTAINER + ".")]
        dtype = torch.float64 if fp and all(t == torch.float64 for t in fp) else torch.float32

    def make(block):
        dev = next((p.device for p in block.parameters()), None)
        return build_intervention(intervention, d, rank, dtype=dtype, device=dev,
                                  dropout=dropout, backend=backend)

    def make_layer(block):
        return make(block) if tied else Untied([make(block), make(block)])

    mods = nn.ModuleDict({str(i): make_layer(blocks[i]) for i in ids})   # may raise: no change
    if st is None:
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            params = list(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            params = []
        st = State(path, requires_grad, params, "generate" in model.__dict__,
                   nn.ModuleDict())
        for p in model.parameters():
            p.requires_grad_(False)
        setattr(model, CONTAINER, st.modules)
        model.__dict__["_reft_state"] = st
        model.register_forward_pre_hook(root_pre_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(root_post_hook, always_call=True)
        if callable(getattr(type(model), "generate", None)) and not st.had_generate_attr:
            model.__dict__["generate"] = Generate(model)
    hooked = set(st.hooked_layers())
    st.modules[adapter] = mods
    st.adapters[adapter] = Adapter(spec, 0 if tied else UNTIED_GROUPS, ids)
    if st.default is None:
        st.default = adapter
    for i in ids:
        if i not in hooked:
            _hook_layer(st, blocks[i], i)
    return model


_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_PROBE = nn.ModuleDict()


def valid_adapter_name(name: str) -> bool:
    """Letters, digits, '_' and '-' (not first): a module key, a file name and a
    state_dict key part; not an attribute name of nn.ModuleDict ("keys", "training")."""
    return bool(_NAME.match(name)) and not hasattr(_PROBE, name)


def _hidden_size(model: nn.Module, block: nn.Module, st: State | None) -> int:
    """d from the config / layer parameters; on a patched model whose d cannot be inferred,
    the d its adapters were given (the residual stream has one width)."""
    try:
        return infer_hidden_size(model, block)
    except ValueError:
        known = {getattr(m, "d", None) for mods in (st.modules.values() if st else ())
                 for m in mods.values()} - {None}
        if len(known) != 1:
            raise
        return known.pop()


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not valid_adapter_name(name):
        raise ValueError(f"reft_ext: adapter names are letters, digits, '_' and '-' (not "
                         f"first), and not an nn.ModuleDict attribute; got {name!r}")


def _hook_layer(st: State, block: nn.Module, i: int) -> None:
    block.__dict__["_reft_link"] = Link(st, i, seq_first(block))
    block.register_forward_hook(layer_hook, with_kwargs=True, prepend=True)


def _unhook_layer(block: nn.Module) -> None:
    _remove_hook(block, layer_hook)
    block.__dict__.pop("_reft_link", None)


def is_patched(model: nn.Module) -> bool:
    """True if reft_ext.patch was applied to ``model`` (and not undone)."""
    return "_reft_state" in model.__dict__


def _state(model: nn.Module, fn: str) -> State:
    st = model.__dict__.get("_reft_state")
    if st is None:
        raise ValueError(f"reft_ext.{fn}: model is not patched by reft_ext.patch")
    return st


def _adapter(st: State, adapter: str | None, fn: str) -> str:
    """The adapter a function acts on: ``adapter``, or the default one for None."""
    if adapter is None:
        return st.default
    if adapter not in st.adapters:
        raise ValueError(f"reft_ext.{fn}: the model has no adapter named {adapter!r} "
                         f"(adapters: {', '.join(map(repr, st.adapters))})")
    return adapter


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
    for i in st.hooked_layers():
        _unhook_layer(blocks[i])
    _remove_hook(model, root_pre_hook)
    _remove_hook(model, root_post_hook)
    delattr(model, CONTAINER)
    if not st.had_generate_attr:
        model.__dict__.pop("generate", None)
    del model.__dict__["_reft_state"]
    for n, p in model.named_parameters():
        p.requires_grad_(st.requires_grad.get(n, p.requires_grad))
    return model


def interventions(model: nn.Module, adapter: str | None = None) -> dict[int, nn.Module]:
    """{layer index: intervention module} of one adapter of a patched model (default: the
    default adapter), in patch order."""
    st = _state(model, "interventions")
    name = _adapter(st, adapter, "interventions")
    mods = st.modules[name]
    return {i: mods[str(i)] for i in st.adapters[name].layer_ids}


def adapters(model: nn.Module) -> dict[str, dict]:
    """{adapter name: its patch_config + "rank", "intervention" (the registered type name,
    or the class name of a custom one) and "default" (True for the default adapter)} of a
    patched model, in creation order."""
    st = _state(model, "adapters")
    out = {}
    for a in st.adapters:
        m = next(iter(st.modules[a].values()))
        m = m.members[0] if isinstance(m, Untied) else m
        out[a] = {**patch_config(model, a), "rank": getattr(m, "rank", None),
                  "intervention": kind_of(m) or type(m).__name__, "default": a == st.default}
    return out


def set_adapter(model: nn.Module, adapter: str) -> None:
    """Makes ``adapter`` the default: the adapter of forwards and generate calls that pass
    no ``reft_adapter=``, and of interventions / save / patch_config without a name."""
    st = _state(model, "set_adapter")
    st.default = _adapter(st, adapter, "set_adapter")


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Removes one adapter: its interventions (and parameters) leave the model, and layers
    no other adapter edits lose their hook. Deleting the default adapter makes the oldest
    remaining one the default. The last adapter cannot be deleted: use unpatch()."""
    st = _state(model, "delete_adapter")
    _adapter(st, adapter, "delete_adapter")
    if len(st.adapters) == 1:
        raise ValueError(f"reft_ext.delete_adapter: {adapter!r} is the model's only adapter; "
                         f"call reft_ext.unpatch to remove it")
    before = st.hooked_layers()
    del st.modules[adapter]
    del st.adapters[adapter]
    if st.default == adapter:
        st.default = next(iter(st.adapters))
    blocks = list(model.get_submodule(st.layer_path).children())
    for i in set(before) - set(st.hooked_layers()):
        _unhook_layer(blocks[i])


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

    positions: (B, P) int64/int32, token indices in [0, T) or -1, no repeats per row (for
    untied adapters (B, N, P) or a tuple of N (B, P_k), see patch()); B must match the
    batch of each forward inside, the layout its adapters (checked at each forward). An
    explicit ``reft_positions=`` kwarg still wins. Also available as
    ``reft_ext.positions(model, positions)``.
    """
    st = _state(model, "positions")
    st.context.append(check_explicit(positions, "positions", None))
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


def patch_config(model: nn.Module, adapter: str | None = None) -> dict:
    """Read-only summary of how one adapter of ``model`` (default: the default adapter) was
    patched (what reft_ext.save records).

    Returns:
        {"layer_path": dotted path of the layer container, "layers": patched layer indices
        in patch order, "n_layers": length of the container, "positions": the default
        positions spec as a string ("all", "f7+l7", ...), "tied": False for untied
        interventions}.
    """
    st = _state(model, "patch_config")
    a = st.adapters[_adapter(st, adapter, "patch_config")]
    return {"layer_path": st.layer_path, "layers": list(a.layer_ids),
            "n_layers": len(model.get_submodule(st.layer_path)), "positions": str(a.spec),
            "tied": not a.groups}
