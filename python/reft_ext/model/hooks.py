"""The hooks that patch() installs, and the per-model state they share.

* A forward pre-hook (with kwargs, prepended) on the model resolves the positions once per
  top-level forward and removes a ``reft_positions=`` kwarg before the model sees it.
* A forward hook on the model (always called, also when the forward raises) ends the
  positions' life with the top-level forward: a layer run outside one edits nothing.
* A forward hook (with kwargs, prepended) on each patched layer edits the layer's hidden
  state output in place at those positions with its intervention. Because the edit is in
  place and the hook runs first, output_hidden_states and later hooks see the edited states.
* ``model.generate`` (if the model has one) is shadowed by an instance attribute that fixes
  the positions once from the prompt; decode steps with a non-empty KV cache are not edited.

All state lives on the model (``model._reft_state``, ``layer._reft_link``), nothing in
closures, so copy.deepcopy of a patched model is an independent patched model. The order in
which a forward's positions are resolved is in model/patch.py's docstring.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .adapters import Mixed, distinct_adapters
from .positions import PositionSpec, positions_from_mask

_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")
_MASK_KWARGS = (("attention_mask", False), ("src_key_padding_mask", True),
                ("key_padding_mask", True), ("padding_mask", True))
_FROM_SPEC = object()   # sentinel: compute positions lazily from the spec and the mask


class Adapter:
    """One named adapter's patch config (plain object): its default positions spec, 0 for
    tied or N untied interventions per layer ((B, N, P) positions), and its layers in patch
    order. Its interventions are model.reft_interventions[name]."""

    def __init__(self, spec: PositionSpec, groups: int, layer_ids: list[int]):
        self.spec = spec
        self.groups = groups
        self.layer_ids = layer_ids


class State:
    """Per-model patch state (plain object: deep-copies with the model)."""

    def __init__(self, layer_path: str, requires_grad: dict[str, bool],
                 forward_params: list[str], had_generate_attr: bool,
                 modules: nn.ModuleDict):
        self.adapters: dict[str, Adapter] = {}
        self.default: str | None = None    # the adapter of calls that name none
        self.modules = modules             # model.reft_interventions: {adapter: {layer: m}}
        self.layer_path = layer_path
        self.requires_grad = requires_grad
        self.forward_params = forward_params
        self.had_generate_attr = had_generate_attr
        self.disabled = 0
        self.context: list[torch.Tensor] = []
        self.generate_positions = None     # (adapter selection, positions) fixed by generate
        self.selected = None               # this forward's adapter name, or a rows tuple
        self.active = None                 # None (no edit) | Tensor | _FROM_SPEC | Mixed
        self.expand = False                # active came from the prompt of generate()
        self.mask: torch.Tensor | None = None
        self.on_device: dict = {}          # active positions moved to a layer's device

    def hooked_layers(self) -> list[int]:
        """Every layer some adapter edits, each once."""
        return list(dict.fromkeys(i for a in self.adapters.values() for i in a.layer_ids))

    def groups_of(self, selected) -> int:
        """The position layout (0 tied, N untied) shared by the adapters of a selection;
        ValueError when they differ (explicit positions cannot then fit all rows)."""
        names = [selected] if isinstance(selected, str) else distinct_adapters(selected)
        layouts = {self.adapters[a].groups for a in names}
        if len(layouts) > 1:
            raise ValueError(
                f"reft_ext: explicit positions for a batch mixing tied and untied adapters "
                f"({', '.join(names)}) cannot fit every row; pass rows of one layout per call "
                f"or let each adapter's spec choose the positions")
        return layouts.pop() if layouts else 0


class Link:
    """What a patched layer needs at run time: the model's state and its layer index."""

    def __init__(self, state: State, layer_id: int, seq_first: bool):
        self.state = state
        self.layer_id = layer_id
        self.seq_first = seq_first
        self.calls = _CallRecord()
        self.last = None     # what this layer's latest forward call edited (see layer_hook)


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
    def _key(x: torch.Tensor, storage):
        return (storage._cdata, x.storage_offset(), tuple(x.shape), x.stride(), x.dtype,
                x.device)

    def record(self, x: torch.Tensor, pos) -> None:
        # (list(): another thread's forward may add entries meanwhile)
        for k, (ref, _) in list(self.entries.items()):
            if ref.expired():
                self.entries.pop(k, None)
        storage = x.untyped_storage()
        key = self._key(x, storage)
        old = self.entries.get(key)
        if old is not None and not _same_positions(old[1], pos):
            pos = _AMBIGUOUS
        self.entries[key] = (StorageWeakRef(storage), pos)

    def lookup(self, x: torch.Tensor):
        """The positions recorded for input x, or _NOT_RECORDED."""
        entry = self.entries.get(self._key(x, x.untyped_storage()))
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
    """a, b: what a forward edited, (adapter, positions) or a Mixed plan, or None."""
    if a is b:
        return True
    if isinstance(a, Mixed):
        return a.same_as(b)
    if not isinstance(a, tuple) or not isinstance(b, tuple) or a[0] != b[0]:
        return False
    x, y = a[1], b[1]
    return x.shape == y.shape and x.device == y.device and bool(torch.equal(x, y))


def _in_backward() -> bool:
    """True while the autograd engine runs a backward on this thread: a layer called now
    is a gradient checkpoint's recompute."""
    return torch._C._current_graph_task_id() != -1


def _cache_len(cache) -> int:
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])
    return 0


def check_explicit(pos, where: str, groups: int | None = 0) -> torch.Tensor:
    """Explicit positions as the layers take them: (B, P) int64 for tied interventions;
    for N untied ones (groups=N), a (B, N, P) tensor or a sequence of N (B, P_k) tensors
    (group k for intervention #k), padded with -1 to a common P. groups=None: either
    layout (checked again against the adapters of each forward)."""
    if groups is None:
        groups = (len(pos) if isinstance(pos, (tuple, list))
                  else pos.shape[1] if isinstance(pos, torch.Tensor) and pos.dim() == 3 else 0)
    if groups and isinstance(pos, (tuple, list)):
        if len(pos) != groups:
            raise ValueError(f"reft_ext: {where} for untied interventions must hold {groups} "
                             f"position tensors, one per intervention (#0 first, #1 last), "
                             f"got {len(pos)}")
        parts = [check_explicit(p, f"{where}[{k}]") for k, p in enumerate(pos)]
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError(f"reft_ext: the tensors of {where} have different batch sizes "
                             f"{[p.shape[0] for p in parts]}")
        width = max(p.shape[1] for p in parts)
        return torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=-1)
                            for p in parts], dim=1)
    want = f"(B, {groups}, P)" if groups else "(B, P)"
    if not isinstance(pos, torch.Tensor):
        raise TypeError(f"reft_ext: {where} must be a {want} integer tensor"
                        f"{' or a tuple of tensors' if groups else ''}, got "
                        f"{type(pos).__name__}")
    shape_ok = (pos.dim() == 3 and pos.shape[1] == groups) if groups else pos.dim() == 2
    if not shape_ok or pos.dtype not in (torch.int64, torch.int32):
        hint = (" (the model has untied interventions: give one group of positions per "
                "intervention)" if groups else "")
        raise ValueError(f"reft_ext: {where} must be a {want} int64/int32 tensor{hint}, got "
                         f"shape {tuple(pos.shape)} and dtype {pos.dtype}")
    # a copy: a checkpoint recompute in backward must see the values of its forward even
    # if the caller reuses the tensor meanwhile (one (B, P) copy per forward)
    return pos.to(torch.long, copy=True)


def check_selection(st: State, selection, where: str):
    """The adapter selection of a call: ``None`` -> the default adapter's name; a name; or
    a sequence of one name or None (no edit) per row -> a tuple (a tuple naming one adapter
    on every row is that name)."""
    if selection is None:
        return st.default
    if isinstance(selection, str):
        _check_adapter(st, selection, where)
        return selection
    if not isinstance(selection, (list, tuple)):
        raise TypeError(f"reft_ext: {where} must be an adapter name, or a list of one name "
                        f"(or None) per row, got {type(selection).__name__}")
    rows = tuple(selection)
    if not rows:
        raise ValueError(f"reft_ext: {where} is an empty list: give one adapter name (or "
                         f"None) per row")
    for k, r in enumerate(rows):
        if r is not None and not isinstance(r, str):
            raise TypeError(f"reft_ext: {where}[{k}] must be an adapter name or None, got "
                            f"{type(r).__name__}")
        if r is not None:
            _check_adapter(st, r, f"{where}[{k}]")
    return rows


def _collapse(selected):
    """A per-row selection naming one adapter on every row is that adapter (the
    single-adapter path); call it once the rows have been counted against the batch."""
    if isinstance(selected, tuple) and selected[0] is not None and \
            all(r == selected[0] for r in selected):
        return selected[0]
    return selected


def _check_adapter(st: State, name: str, where: str) -> None:
    if name not in st.adapters:
        raise ValueError(f"reft_ext: {where} names adapter {name!r}, which this model does "
                         f"not have (adapters: {', '.join(map(repr, st.adapters))})")


def _call_batch(call: dict):
    """The batch size of a call, from its batch-first inputs, if it has any."""
    for key in ("input_ids", "inputs_embeds", "attention_mask"):
        t = call.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[0]
    return None


def root_pre_hook(model: nn.Module, args, kwargs):
    st: State = model.__dict__["_reft_state"]
    explicit = kwargs.pop("reft_positions", None)
    selected = check_selection(st, kwargs.pop("reft_adapter", None), "reft_adapter")
    if explicit is not None:
        explicit = check_explicit(explicit, "reft_positions", st.groups_of(selected))
    call = dict(zip(st.forward_params, args))
    call.update(kwargs)
    if isinstance(selected, tuple):
        B = _call_batch(call)
        if B is not None and B != len(selected):
            raise ValueError(f"reft_ext: reft_adapter lists {len(selected)} adapters for a "
                             f"batch of {B} rows: give one adapter name (or None) per row")
        if B is not None:
            selected = _collapse(selected)
    st.selected = selected
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
        st.selected, st.active = st.generate_positions
        if st.active is _FROM_SPEC:
            st.mask = _call_mask(call)
        else:
            st.expand = True
    elif st.context:
        st.active = check_explicit(st.context[-1], "the reft_ext.positions context",
                                   st.groups_of(selected))
    else:
        st.active = _FROM_SPEC
        st.mask = _call_mask(call)
    return args, kwargs


def root_post_hook(model: nn.Module, args, output):
    """Ends the top-level forward: its positions are not used again, so that a layer run by
    a call below the patched module (``model.model(...)``, ``model.forward(...)``) edits
    nothing instead of reusing this call's rows (recomputes have their own record)."""
    st: State = model.__dict__["_reft_state"]
    st.active = None
    st.mask = None
    st.expand = False
    st.on_device = {}


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


def layer_hook(layer: nn.Module, args, kwargs, output):
    link: Link | None = layer.__dict__.get("_reft_link")
    if link is None:
        return None
    # A traced graph (torch.compile) records nothing: its recomputes are traced with it.
    compiling = torch.compiler.is_compiling()
    x_in = None if compiling else _layer_input(args, kwargs)
    h = _hidden(output)
    if not compiling and _in_backward():
        # A checkpoint recompute: the positions of the forward it repeats. An input that
        # cannot be keyed (a tensor subclass) gets this layer's latest forward's.
        pos = _NOT_RECORDED if x_in is None else link.calls.lookup(x_in)
        if pos is _NOT_RECORDED:
            # A recompute of the whole patched call (a checkpoint around model(...)) ran the
            # root pre-hook again with that call's arguments: its positions are in the
            # state. A layer recomputed alone whose input cannot be keyed: the latest.
            pos = (_forward_positions(link.state, h, link.seq_first)
                   if link.state.active is not None else link.last)
    else:
        pos = _forward_positions(link.state, h, link.seq_first)
        if not torch._C._are_functorch_transforms_active():
            # (kept for checkpoint recomputes; under a torch.func transform its tensors may
            # be the transform's wrappers, which must not outlive it)
            link.last = pos
            if x_in is not None and not torch.is_inference_mode_enabled():
                link.calls.record(x_in, pos)
    if pos is None:
        return None
    st = link.state
    key = str(link.layer_id)
    hv = _batch_first(h, link.seq_first)
    # (torch.func transforms need the out-of-place op: its saved rows carry no history)
    inplace = (not (hv.requires_grad and hv.is_leaf) and hv.stride(-1) == 1
               and not _aliases_input(h, args, kwargs)
               and not torch._C._are_functorch_transforms_active())
    if isinstance(pos, Mixed):
        mods = {a: st.modules[a][key] for a in pos.names
                if a in st.modules and key in st.modules[a]}
        if not mods:
            return None
        out = pos.apply(mods, hv, inplace)
    else:
        name, pos = pos
        if name not in st.modules or key not in st.modules[name]:
            return None            # the forward's adapter does not edit this layer
        if pos.device != hv.device:
            pos = _on_device(st, pos, hv.device)
        out = st.modules[name][key](hv, pos, inplace=inplace)
    if out is hv:
        return None                    # edited in place: output already holds the edit
    return _replace_hidden(output, out.transpose(0, 1) if link.seq_first else out)


def _layer_input(args, kwargs) -> torch.Tensor | None:
    """The layer call's input hidden states, when they are a plain tensor (a subclass such as
    a DTensor or a traced tensor may have no storage to key a recompute record on: its
    recomputes see the latest forward's positions)."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("src"))
    return x if type(x) is torch.Tensor else None


def _batch_first(h: torch.Tensor, seq_first: bool) -> torch.Tensor:
    """The (B, T, d) view of a layer's hidden states h, which are to be edited."""
    if h.is_nested:
        raise TypeError("reft_ext: the layer returned a nested tensor (nn.TransformerEncoder "
                        "fast path); build it with enable_nested_tensor=False")
    return h.transpose(0, 1) if seq_first else h


def _forward_positions(st: State, h: torch.Tensor, seq_first: bool):
    """What this forward edits at a layer whose output hidden states are h: (adapter name,
    its (B, P) / (B, N, P) positions), a Mixed plan (one adapter per row), or None."""
    act = st.active
    if act is None or st.disabled:
        return None
    hv = _batch_first(h, seq_first)
    sel = st.selected
    if isinstance(sel, tuple) and not isinstance(act, Mixed):
        act = (Mixed.from_spec(sel, st.adapters, _spec_mask(st, hv)) if act is _FROM_SPEC
               else Mixed.from_explicit(sel, act))
        st.active = act
    elif act is _FROM_SPEC:
        a = st.adapters[sel]
        act = st.active = positions_from_mask(a.spec, _spec_mask(st, hv), tied=not a.groups)
    if st.expand:
        B, B0 = hv.shape[0], len(act.rows) if isinstance(act, Mixed) else act.shape[0]
        if B != B0 and B % B0 == 0:
            # generate() expanded the batch (beams, num_return_sequences) with
            # repeat_interleave
            act = (act.repeat_rows(B // B0) if isinstance(act, Mixed)
                   else act.repeat_interleave(B // B0, dim=0))
            st.active, st.expand = act, False
    return act if isinstance(act, Mixed) else (sel, act)


def _on_device(st: State, pos: torch.Tensor, device: torch.device) -> torch.Tensor:
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


def _spec_mask(st: State, h: torch.Tensor) -> torch.Tensor:
    """The (B, T) mask (True = token) the specs count tokens in, on h's device."""
    B, T = h.shape[:2]
    mask = st.mask
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=h.device)
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"reft_ext: the attention mask has shape {tuple(mask.shape)} but the "
                         f"layer's hidden states have (B, T) = ({B}, {T}); pass "
                         f"reft_positions= (B, P) explicitly")
    return mask.to(h.device)


class Generate:
    """``model.generate`` of a patched model: fixes the edit positions once from the prompt
    (``reft_positions=`` passed here > the reft_ext.positions context > the spec on the
    prompt's attention mask), then calls the class's generate. A plain object holding the
    model (not a closure or a bound method), so deepcopy and pickle rebuild it around the
    copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, reft_positions=None, reft_adapter=None, **kwargs):
        model = self.model
        st: State = model.__dict__["_reft_state"]
        selected = check_selection(st, reft_adapter, "reft_adapter")
        ids = args[0] if args else None
        for key in ("input_ids", "inputs", "inputs_embeds"):
            if ids is None:
                ids = kwargs.get(key)
        mixed = isinstance(selected, tuple)
        if mixed and isinstance(ids, torch.Tensor):
            if ids.shape[0] != len(selected):
                raise ValueError(f"reft_ext: reft_adapter lists {len(selected)} adapters for "
                                 f"{ids.shape[0]} prompts: give one adapter name (or None) "
                                 f"per prompt")
            selected = _collapse(selected)
            mixed = isinstance(selected, tuple)
        pos = _FROM_SPEC       # no prompt tensor here: each forward's own mask
        if reft_positions is not None or st.context:
            given = reft_positions if reft_positions is not None else st.context[-1]
            pos = check_explicit(given, "reft_positions", st.groups_of(selected))
            if mixed:
                pos = Mixed.from_explicit(selected, pos)
        elif isinstance(ids, torch.Tensor):
            mask = kwargs.get("attention_mask")
            if not isinstance(mask, torch.Tensor):
                mask = torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)
            if mixed:
                pos = Mixed.from_spec(selected, st.adapters, mask != 0)
            else:
                a = st.adapters[selected]
                pos = positions_from_mask(a.spec, mask, tied=not a.groups)
        prev, st.generate_positions = st.generate_positions, (selected, pos)
        try:
            return type(model).generate(model, *args, **kwargs)
        finally:
            st.generate_positions = prev
