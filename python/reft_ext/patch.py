"""patch(model, layers, rank): LoReFT on the decoder layers of any torch model.

How it works (all state lives on the model, nothing in closures, so copy.deepcopy of a
patched model is an independent patched model):

* ``model.reft_interventions``: one nn.ModuleDict {str(layer index): intervention}. Base
  state_dict keys are unchanged; the new keys all start with ``reft_interventions.``.
* ``model._reft_state``: a plain object with the patch config and the positions of the
  current forward. Each patched layer holds ``layer._reft_link`` (state + its intervention).
* A forward pre-hook (with kwargs, prepended) on the model resolves the positions once per
  top-level forward and removes a ``reft_positions=`` kwarg before the model sees it.
* A forward hook (with kwargs, prepended) on each patched layer edits the layer's hidden
  state output in place at those positions with the fused op. Because the edit is in place
  and the hook runs first, output_hidden_states and later hooks see the edited states.
* ``model.generate`` (if the model has one) is shadowed by an instance attribute that fixes
  the positions once from the prompt; decode steps with a non-empty KV cache are not edited.

Positions of a forward, first match wins:
  1. the model was called with a non-empty KV cache (``cache`` / ``past_key_values``):
     decode step, no edit;
  2. ``reft_positions=`` (B, P) passed to the model's forward (or to generate);
  3. positions fixed by generate() from the prompt;
  4. ``with reft_ext.positions(model, tensor):``;
  5. the spec given to patch() ("all", "last", "f7+l7", ...) computed from the 2-D
     attention mask of the call (``attention_mask``, 1 = token; or ``src_key_padding_mask``
     / ``key_padding_mask``, True = pad), or from all T tokens when there is none.

A layer re-run by a gradient checkpoint recompute during backward (transformers 4.x /
< 5.23 and plain torch checkpoint the layer's __call__, hooks included) edits the positions
its own forward used, even when other forwards ran since (see _CallRecord).
"""
from __future__ import annotations

import contextlib
import inspect
import operator
from collections import Counter
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .interventions import DiReFT, LoReFT
from .positions import PositionSpec, parse_positions, positions_from_mask

__all__ = ["patch", "unpatch", "is_patched", "interventions", "disabled", "use_positions",
           "print_trainable_parameters", "find_layers", "patch_config"]

CONTAINER = "reft_interventions"
_INTERVENTIONS = {"loreft": LoReFT, "direft": DiReFT}
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
_MASK_KWARGS = (("attention_mask", False), ("src_key_padding_mask", True),
                ("key_padding_mask", True), ("padding_mask", True))
_FROM_SPEC = object()   # sentinel: compute positions lazily from the spec and the mask


class _State:
    """Per-model patch state (plain object: deep-copies with the model)."""

    def __init__(self, spec: PositionSpec, layer_path: str, layer_ids: list[int],
                 requires_grad: dict[str, bool], forward_params: list[str],
                 had_generate_attr: bool):
        self.spec = spec
        self.layer_path = layer_path
        self.layer_ids = layer_ids
        self.requires_grad = requires_grad
        self.forward_params = forward_params
        self.had_generate_attr = had_generate_attr
        self.disabled = 0
        self.context: list[torch.Tensor] = []
        self.generate_positions: torch.Tensor | None = None
        self.active = None                 # None (no edit) | Tensor | _FROM_SPEC
        self.expand = False                # active came from the prompt of generate()
        self.mask: torch.Tensor | None = None
        self.on_device: dict = {}          # active positions moved to a layer's device


class _Link:
    """What a patched layer needs at run time: the model's state and its intervention."""

    def __init__(self, state: _State, intervention: nn.Module, seq_first: bool):
        self.state = state
        self.intervention = intervention
        self.seq_first = seq_first
        self.calls = _CallRecord()


class _CallRecord:
    """The positions each forward call of one patched layer used, keyed by the call's input
    hidden states, so that a gradient checkpoint that re-runs the layer's __call__ during
    backward (plain torch, transformers < 5.23) edits the rows of *that* forward, not of the
    latest one (two forwards before one backward: chosen/rejected, micro-batches).

    The key is the input's storage (held weakly: an entry dies with its tensor), offset,
    shape and strides: the same tensor (non-reentrant checkpoint) or a detached alias of it
    (reentrant checkpoint) at recompute time. While the storage lives, nothing else can have
    its address. Two live forwards that fed the layer the very same input with different
    positions cannot be told apart: a recompute of either raises instead of guessing.
    Not copied by deepcopy or pickling (a copy has no pending backward of its own)."""

    def __init__(self):
        self.entries: dict[tuple, tuple] = {}   # key -> (StorageWeakRef, positions | None)

    def __deepcopy__(self, memo):
        return _CallRecord()

    def __reduce__(self):
        return (_CallRecord, ())

    @staticmethod
    def _key(x: torch.Tensor):
        return (x.untyped_storage()._cdata, x.storage_offset(), tuple(x.shape), x.stride(),
                x.dtype, x.device)

    def record(self, x: torch.Tensor, pos) -> None:
        # (list(): another thread's forward may add entries meanwhile)
        for k, (ref, _) in list(self.entries.items()):
            if ref.expired():
                self.entries.pop(k, None)
        key = self._key(x)
        old = self.entries.get(key)
        if old is not None and not _same_positions(old[1], pos):
            pos = _AMBIGUOUS
        self.entries[key] = (StorageWeakRef(x.untyped_storage()), pos)

    def lookup(self, x: torch.Tensor):
        """The positions recorded for input x, or _NOT_RECORDED."""
        entry = self.entries.get(self._key(x))
        if entry is None or entry[0].expired():
            return _NOT_RECORDED
        if entry[1] is _AMBIGUOUS:
            raise RuntimeError(
                "reft_ext: a gradient-checkpoint recompute of a patched layer cannot tell "
                "which forward it repeats: two forwards still awaiting backward fed this "
                "layer the very same input tensor with different edit positions. Give each "
                "forward its own input tensor (e.g. inputs_embeds.clone()), or checkpoint "
                "layer.forward instead of the layer call")
        return entry[1]


_AMBIGUOUS = object()
_NOT_RECORDED = object()


def _same_positions(a, b) -> bool:
    if a is b:
        return True
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread: a layer called now
    is a gradient checkpoint's recompute."""
    return torch._C._current_graph_task_id() != -1


# ---------------------------------------------------------------- layer discovery

def _homogeneous(container: nn.Module) -> bool:
    children = list(container.children())
    return len(children) > 0 and len({type(c) for c in children}) == 1


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _no_split_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        ns = getattr(m, "_no_split_modules", None)
        if ns:
            names.update(ns)
    return names


def _gc_layer_class():
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        return GradientCheckpointingLayer
    except Exception:  # transformers missing or too old
        return None


def find_layers(model: nn.Module, layer_path: str | None = None) -> tuple[str, nn.Module]:
    """Finds the decoder-layer container of a model.

    Args:
        model: any nn.Module.
        layer_path: explicit dotted path of the container (e.g. "model.layers"), which must
            be an nn.ModuleList or nn.Sequential.

    Returns:
        (path relative to model, container). Rule: search inside ``model.get_decoder()``
        when the model has one (skips vision towers and encoders); among homogeneous
        ModuleList/Sequential containers prefer those whose blocks subclass transformers'
        GradientCheckpointingLayer or are named in a ``_no_split_modules``; otherwise take
        the homogeneous container holding the most parameters.

    Raises:
        ValueError when nothing is found or the choice is ambiguous (pass layer_path).
    """
    if layer_path is not None:
        try:
            c = model.get_submodule(layer_path)
        except AttributeError as e:
            raise ValueError(f"reft_ext.patch: layer_path {layer_path!r} not found in "
                             f"{type(model).__name__}: {e}") from None
        if not isinstance(c, (nn.ModuleList, nn.Sequential)) or len(c) == 0:
            raise ValueError(f"reft_ext.patch: layer_path {layer_path!r} is a "
                             f"{type(c).__name__}, expected a non-empty nn.ModuleList or "
                             f"nn.Sequential of layers")
        return layer_path, c

    root = model
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            dec = get_decoder()
        except Exception:
            dec = None
        if isinstance(dec, nn.Module):
            root = dec
    prefix = ""
    if root is not model:
        prefix = next(n for n, m in model.named_modules() if m is root)
    cands = [(n, m) for n, m in root.named_modules()
             if isinstance(m, (nn.ModuleList, nn.Sequential)) and _homogeneous(m)]
    if not cands:
        raise ValueError(f"reft_ext.patch: found no nn.ModuleList/nn.Sequential of layers in "
                         f"{type(model).__name__}; pass layer_path='...'")
    gc_cls = _gc_layer_class()
    no_split = _no_split_names(model)

    def preferred(m):
        block = next(iter(m.children()))
        return ((gc_cls is not None and isinstance(block, gc_cls))
                or type(block).__name__ in no_split)

    pref = [(n, m) for n, m in cands if preferred(m)]
    pool = pref or cands
    pool = sorted(pool, key=lambda nm: _n_params(nm[1]), reverse=True)
    if len(pool) > 1 and (pref or _n_params(pool[0][1]) == _n_params(pool[1][1])):
        # Preferred containers nested in one another (never seen) or unrelated: ambiguous.
        paths = [_join(prefix, n) for n, _ in pool]
        raise ValueError(f"reft_ext.patch: several candidate layer containers {paths}; pass "
                         f"layer_path= one of them")
    name, container = pool[0]
    return _join(prefix, name), container


def _join(prefix: str, name: str) -> str:
    return ".".join(p for p in (prefix, name) if p)


def _hidden_size(model: nn.Module, layer: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        if hasattr(cfg, "get_text_config"):
            try:
                cfg = cfg.get_text_config(decoder=True)
            except TypeError:
                cfg = cfg.get_text_config()
        for key in ("hidden_size", "n_embd", "d_model", "hidden_dim", "dim"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
    attn = getattr(layer, "self_attn", None)
    if isinstance(attn, nn.MultiheadAttention):
        return attn.embed_dim
    sizes = Counter(p.shape[0] for p in layer.parameters() if p.dim() == 1)
    if sizes:
        (d, n), *rest = sizes.most_common()
        if not rest or rest[0][1] < n:
            return d
    raise ValueError("reft_ext.patch: cannot infer the hidden size of the layers; pass "
                     "hidden_size=")


def _seq_first(layer: nn.Module) -> bool:
    if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not layer.self_attn.batch_first
    return False


def _normalise_layers(layers, n: int) -> list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"reft_ext.patch: layers must be 'all', an int or a list of ints, "
                             f"got {layers!r}")
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        try:
            j = operator.index(i)
        except TypeError:
            j = None
        if j is None or isinstance(i, bool) or not -n <= j < n:
            raise ValueError(f"reft_ext.patch: layer index {i!r} out of range for {n} layers")
        out.append(j % n)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"reft_ext.patch: layers must be non-empty without repeats, got "
                         f"{list(layers)}")
    return out


# ---------------------------------------------------------------- hooks

def _cache_len(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])
    return 0


def _check_explicit(pos, where: str) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"reft_ext: {where} must be a (B, P) integer tensor, got "
                        f"{type(pos).__name__}")
    if pos.dim() != 2 or pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"reft_ext: {where} must be a (B, P) int64/int32 tensor, got shape "
                         f"{tuple(pos.shape)} and dtype {pos.dtype}")
    return pos.long()


def _root_pre_hook(model: nn.Module, args, kwargs):
    st: _State = model.__dict__["_reft_state"]
    explicit = kwargs.pop("reft_positions", None)
    if explicit is not None:
        explicit = _check_explicit(explicit, "reft_positions")
    call = dict(zip(st.forward_params, args))
    call.update(kwargs)
    st.mask = None
    st.expand = False
    st.on_device = {}
    if st.disabled:
        st.active = None
    elif any(_cache_len(call.get(k)) > 0 for k in _CACHE_KWARGS):
        st.active = None                          # decode step of generation
    elif explicit is not None:
        st.active = explicit
    elif st.generate_positions is not None:
        st.active = st.generate_positions
        st.expand = True
    elif st.context:
        st.active = st.context[-1]
    else:
        st.active = _FROM_SPEC
        st.mask = _call_mask(call)
    return args, kwargs


def _call_mask(call: dict) -> torch.Tensor | None:
    """(B, T) mask, True = token, from the call's kwargs; None if there is none."""
    for key, true_is_pad in _MASK_KWARGS:
        m = call.get(key)
        if isinstance(m, torch.Tensor):
            if m.dim() != 2:
                raise ValueError(
                    f"reft_ext: {key} has shape {tuple(m.shape)}; positions spec needs a 2-D "
                    f"(B, T) mask. Pass reft_positions= (B, P) to the forward instead")
            return (m == 0) if true_is_pad else (m != 0)
    return None


def _hidden(output) -> torch.Tensor:
    """The (B, T, d) hidden states in a layer output: a Tensor, a tuple/list whose first item
    is the hidden states, or a ModelOutput (its first field)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output[0]
    raise TypeError(f"reft_ext: cannot find the hidden states in a layer output of type "
                    f"{type(output).__name__}")


def _replace_hidden(output, h):
    """``output`` with its hidden states replaced by h (same container type)."""
    if isinstance(output, torch.Tensor):
        return h
    if hasattr(output, "to_tuple"):           # ModelOutput: first field
        output[next(iter(output.keys()))] = h
        return output
    if isinstance(output, list):
        return [h, *output[1:]]
    if type(output) is tuple:
        return (h, *output[1:])
    return type(output)(h, *output[1:])       # namedtuple


def _layer_hook(layer: nn.Module, args, kwargs, output):
    link: _Link | None = layer.__dict__.get("_reft_link")
    if link is None:
        return None
    # A traced graph (torch.compile) records nothing: its recomputes are traced with it.
    x_in = None if torch.compiler.is_compiling() else _layer_input(args, kwargs)
    recompute = x_in is not None and _in_backward()
    pos = link.calls.lookup(x_in) if recompute else _NOT_RECORDED
    h = None
    if pos is _NOT_RECORDED:
        h = _hidden(output)
        pos = _forward_positions(link.state, h.transpose(0, 1) if link.seq_first else h)
        if x_in is not None and not recompute and not torch.is_inference_mode_enabled():
            link.calls.record(x_in, pos)
    if pos is None:
        return None
    h = _hidden(output) if h is None else h
    if h.is_nested:
        raise TypeError("reft_ext: the layer returned a nested tensor (nn.TransformerEncoder "
                        "fast path); build it with enable_nested_tensor=False")
    hv = h.transpose(0, 1) if link.seq_first else h            # (B, T, d)
    if pos.device != hv.device:
        pos = _on_device(link.state, pos, hv.device)
    inplace = (not (hv.requires_grad and hv.is_leaf) and hv.stride(-1) == 1
               and not _aliases_input(h, args, kwargs))
    out = link.intervention(hv, pos, inplace=inplace)
    if out is hv:
        return None                    # edited in place: output already holds the edit
    return _replace_hidden(output, out.transpose(0, 1) if link.seq_first else out)


def _layer_input(args, kwargs) -> torch.Tensor | None:
    """The layer call's input hidden states, when they are a plain tensor (a subclass such as
    a DTensor or a traced tensor may have no storage to key a recompute record on: its
    recomputes see the latest forward's positions)."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
    return x if type(x) is torch.Tensor else None


def _forward_positions(st: _State, hv: torch.Tensor):
    """The (B, P) positions this forward edits at a layer whose (B, T, d) output is hv, or
    None for no edit."""
    pos = st.active
    if pos is None or st.disabled:
        return None
    if pos is _FROM_SPEC:
        pos = _spec_positions(st, hv)
        st.active = pos
    if st.expand and pos.shape[0] != hv.shape[0] and hv.shape[0] % pos.shape[0] == 0:
        # generate() expanded the batch (beams, num_return_sequences) with repeat_interleave
        pos = pos.repeat_interleave(hv.shape[0] // pos.shape[0], dim=0)
        st.active, st.expand = pos, False
    return pos


def _on_device(st: _State, pos: torch.Tensor, device: torch.device) -> torch.Tensor:
    """pos on device, moved once per forward and shared by the layers there: on CUDA the op
    validates a positions tensor once (one device-to-host sync) and then recognises it."""
    moved = st.on_device.get(device)
    if moved is None or moved[0] is not pos:
        moved = st.on_device[device] = (pos, pos.to(device))
    return moved[1]


def _aliases_input(h: torch.Tensor, args, kwargs) -> bool:
    """True if the layer returned (a view of) its input hidden states, e.g. a skipped layer:
    editing that in place would also edit the previous layer's output."""
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        return False
    base = x if x._base is None else x._base
    return h is x or h is base or h._base is base


def _spec_positions(st: _State, h: torch.Tensor) -> torch.Tensor:
    B, T = h.shape[:2]
    mask = st.mask
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=h.device)
    elif tuple(mask.shape) != (B, T):
        raise ValueError(f"reft_ext: the attention mask has shape {tuple(mask.shape)} but the "
                         f"layer's hidden states have (B, T) = ({B}, {T}); pass "
                         f"reft_positions= (B, P) explicitly")
    return positions_from_mask(st.spec, mask.to(h.device))


class _Generate:
    """``model.generate`` of a patched model: fixes the edit positions once from the prompt
    (``reft_positions=`` passed here > the reft_ext.positions context > the spec on the
    prompt's attention mask), then calls the class's generate. A plain object holding the
    model (not a closure or a bound method), so deepcopy and pickle rebuild it around the
    copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, reft_positions=None, **kwargs):
        model = self.model
        st: _State = model.__dict__["_reft_state"]
        pos = None
        if reft_positions is not None:
            pos = _check_explicit(reft_positions, "reft_positions")
        elif st.context:
            pos = st.context[-1]
        else:
            ids = args[0] if args else None
            for key in ("input_ids", "inputs", "inputs_embeds"):
                if ids is None:
                    ids = kwargs.get(key)
            if isinstance(ids, torch.Tensor):
                mask = kwargs.get("attention_mask")
                if not isinstance(mask, torch.Tensor):
                    mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
                pos = positions_from_mask(st.spec, mask)
        prev, st.generate_positions = st.generate_positions, pos
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            st.generate_positions = prev


# ---------------------------------------------------------------- public API

def patch(model: nn.Module, layers: int | Sequence[int] | str, rank: int, *,
          positions: str | PositionSpec = "all", intervention="loreft",
          dtype: torch.dtype | None = None, layer_path: str | None = None,
          hidden_size: int | None = None, dropout: float = 0.0,
          backend: str = "fused") -> nn.Module:
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
            ``forward(h, positions, inplace=True)`` (see reft_ext.interventions).
        dtype: intervention parameter dtype; default float32 (also on a bf16/fp16 model),
            float64 on a float64 model.
        layer_path: dotted path of the layer container, to override discovery.
        hidden_size: d, to override inference from the config / layer parameters.
        dropout, backend: passed to LoReFT / DiReFT (backend "reference" runs the
            pure-PyTorch path instead of the fused op).

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
    spec = parse_positions(positions)
    path, container = find_layers(model, layer_path)
    ids = _normalise_layers(layers, len(container))
    blocks = list(container.children())
    d = hidden_size if hidden_size is not None else _hidden_size(model, blocks[ids[0]])
    if rank > d:
        raise ValueError(f"reft_ext.patch: rank={rank} exceeds the hidden size d={d}")
    if dtype is None:
        fp = [p.dtype for p in model.parameters() if p.is_floating_point()]
        dtype = torch.float64 if fp and all(t == torch.float64 for t in fp) else torch.float32

    def make(block):
        dev = next((p.device for p in block.parameters()), None)
        if isinstance(intervention, str):
            cls = _INTERVENTIONS.get(intervention.lower())
            if cls is None:
                raise ValueError(f"reft_ext.patch: intervention must be one of "
                                 f"{sorted(_INTERVENTIONS)} or a factory, got {intervention!r}")
            return cls(d, rank, dtype=dtype, device=dev, dropout=dropout, backend=backend)
        if not callable(intervention):
            raise TypeError(f"reft_ext.patch: intervention must be a str or a callable, got "
                            f"{type(intervention).__name__}")
        return intervention(d, rank, dtype=dtype, device=dev)

    mods = nn.ModuleDict({str(i): make(blocks[i]) for i in ids})   # may raise: nothing done
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        params = []
    st = _State(spec, path, ids, requires_grad, params, "generate" in model.__dict__)
    for p in model.parameters():
        p.requires_grad_(False)
    setattr(model, CONTAINER, mods)
    model.__dict__["_reft_state"] = st
    model.register_forward_pre_hook(_root_pre_hook, with_kwargs=True, prepend=True)
    for i in ids:
        blocks[i].__dict__["_reft_link"] = _Link(st, mods[str(i)], _seq_first(blocks[i]))
        blocks[i].register_forward_hook(_layer_hook, with_kwargs=True, prepend=True)
    if callable(getattr(type(model), "generate", None)) and not st.had_generate_attr:
        model.__dict__["generate"] = _Generate(model)
    return model


def is_patched(model: nn.Module) -> bool:
    """True if reft_ext.patch was applied to ``model`` (and not undone)."""
    return "_reft_state" in model.__dict__


def _state(model: nn.Module, fn: str) -> _State:
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
        _remove_hook(blocks[i], _layer_hook)
        blocks[i].__dict__.pop("_reft_link", None)
    _remove_hook(model, _root_pre_hook)
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
    st.context.append(_check_explicit(positions, "positions"))
    try:
        yield model
    finally:
        st.context.pop()


def print_trainable_parameters(model: nn.Module) -> None:
    """Prints ``trainable params: N || all params: M || trainable%: X`` (peft's format)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    pct = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
          f"trainable%: {pct:.4f}")


def patch_config(model: nn.Module) -> dict:
    """Read-only summary of how ``model`` was patched (what reft_ext.save records).

    Returns:
        {"layer_path": dotted path of the layer container, "layers": patched layer indices
        in patch order, "n_layers": length of the container, "positions": the default
        positions spec as a string ("all", "f7+l7", ...)}.
    """
    st = _state(model, "patch_config")
    return {"layer_path": st.layer_path, "layers": list(st.layer_ids),
            "n_layers": len(model.get_submodule(st.layer_path)), "positions": str(st.spec)}
