"""The one step that changes an unpatched model when a checkpoint is loaded (reft_ext's own
format or a pyreft import): find its layers, check that the checkpoint fits them, patch,
and set every intervention parameter. Either all of it happens or nothing does."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..model.layers import find_layers, hidden_size
from ..model.patch import DEFAULT, delete_adapter, interventions, is_patched, patch, unpatch
from ..modules import INTERVENTIONS, build_intervention
from ._errors import CheckpointError
from ._units import layer_of, units


@contextlib.contextmanager
def _rng_untouched(model: nn.Module):
    """patch() draws the random init from torch's global generators; a load overwrites it,
    so keep the caller's RNG state as it was (training after a load stays reproducible)."""
    devs = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devs):
        yield


def _fitting_layers(model: nn.Module, op: str, where: str, layers: list[int], d: int,
                    layer_path: str | None, saved_from: tuple[str, int] | None) -> str:
    """The path of model's layer container after checking that the checkpoint fits it:
    the recorded container length (saved_from: (its recorded path, its length), for
    reft_ext's own checkpoints), the layer indices, and the hidden size d."""
    try:
        path, container = find_layers(model, layer_path)
    except ValueError as e:
        at = (f"{where} was saved from a model with layers at {saved_from[0]!r}: "
              if saved_from is not None else "")
        raise CheckpointError(f"reft_ext.{op}: {at}{e}") from None
    st = model.__dict__.get("_reft_state")
    if st is not None and path != st.layer_path:
        raise CheckpointError(f"reft_ext.{op}: {where} edits the layers at {path!r}, the "
                              f"model's adapters those at {st.layer_path!r}")
    if saved_from is not None and len(container) != saved_from[1]:
        raise CheckpointError(f"reft_ext.{op}: {where} was saved from a model with "
                              f"{saved_from[1]} layers at {saved_from[0]!r}; this model "
                              f"has {len(container)}")
    if any(not 0 <= i < len(container) for i in layers):
        raise CheckpointError(f"reft_ext.{op}: layers {layers} out of range for the "
                              f"{len(container)} layers at {path!r}")
    try:
        d_model = hidden_size(model, list(container.children())[layers[0]])
    except ValueError:
        d_model = None                  # cannot infer: the kernel checks d on first use
    if d_model is not None and d_model != d:
        raise CheckpointError(f"reft_ext.{op}: {where} has d={d} but this model's "
                              f"hidden size is {d_model}")
    return path


def patch_and_fill(model: nn.Module, values: dict, *,
                   op: str, where: str, kind: str, rank: int, d: int,
                   dtype: torch.dtype | None, layer_path: str | None,
                   saved_from: tuple[str, int] | None = None, options: dict | None = None,
                   **patch_kw) -> None:
    """patch(model, layers, rank, intervention=kind, ...) and set every intervention
    parameter from values {unit: {tensor name: tensor}} (unit: a layer index, or a unit key
    of reft_ext.checkpoint._units with patch_kw tied=False), named as in a reft_ext
    checkpoint (the class's saved_tensors(**options)), converted to dtype (None: each
    tensor's own dtype), after checking that the layers fit (see _fitting_layers). options:
    the class's construction options (e.g. NoReFT's add_bias). patch_kw "adapter" names
    the new adapter (on a patched model: one it does not have). Raises CheckpointError
    naming op and where before any change; leaves torch's RNG state as it was; on a failure
    while filling, the model is unpatched again (or loses the new adapter)."""
    options = options or {}
    adapter = patch_kw.setdefault("adapter", DEFAULT)
    was_patched = is_patched(model)
    names = INTERVENTIONS[kind].saved_tensors(**options)
    params = {str(u): {names[n]: t for n, t in v.items()} for u, v in values.items()}
    want = {u: {p: dtype if dtype is not None else t.dtype for p, t in v.items()}
            for u, v in params.items()}
    layers = list(dict.fromkeys(layer_of(u) for u in params))
    path = _fitting_layers(model, op, where, layers, d, layer_path, saved_from)
    intervention = kind
    if options:   # patch() takes a name or a factory: the options need a factory
        dropout, backend = patch_kw.pop("dropout", 0.0), patch_kw.pop("backend", "fused")

        def with_options(d_, rank_, *, dtype, device):
            return build_intervention(kind, d_, rank_, dtype=dtype, device=device,
                                      dropout=dropout, backend=backend, **options)
        intervention = with_options
    # any parameter's dtype: patch() builds all in it, a mixed checkpoint is fixed below
    first = next(iter(next(iter(want.values())).values()))
    with _rng_untouched(model):
        patch(model, layers, rank, intervention=intervention, dtype=first,
              layer_path=path, hidden_size=d, **patch_kw)
    try:
        with torch.no_grad():
            for i, m in units(interventions(model, adapter)).items():
                for pname, t in params[i].items():
                    p = getattr(m, pname)
                    if p.dtype != want[i][pname]:   # a checkpoint of mixed parameter dtypes
                        p = nn.Parameter(torch.empty_like(p, dtype=want[i][pname]),
                                         requires_grad=p.requires_grad)
                        setattr(m, pname, p)
                    p.copy_(t.to(p.dtype).contiguous())
    except BaseException:
        if was_patched:
            delete_adapter(model, adapter)
        else:
            unpatch(model)
        raise
