"""Import of pyreft / pyvene saves: reads pyreft's files into {layer: tensors} (named as
in a reft_ext checkpoint) plus what they record (intervention kind, rank, d, layer path),
then hands them to the patch-and-fill step that reft_ext.load uses too (_fill.py).

    reft_ext.load_pyreft(model, "pyreft_dir", positions="f7+l7")
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model.patch import DEFAULT, _check_adapter_name, adapters, is_patched
from ..model.positions import check_untied_spec
from . import _dist
from ._errors import CheckpointError
from ._fill import patch_and_fill
from ._units import UNTIED_GROUPS

__all__ = ["load_pyreft", "read_pyreft"]

# pyvene RepresentationConfig field order (positional lists in config.json):
# 0 layer, 1 component, 2 unit, 3 max_number_of_units, 4 low_rank_dimension,
# 5 intervention_type, 6 intervention, 7 subspace_partition, 8 group_key,
# 9 intervention_link_key, 10 moe_key, 11 source_representation,
# 12 hidden_source_representation, 13 latent_dim (older pyvene: 12 or 13 items).
_REPR_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")

# pyreft class name -> reft_ext intervention kind (the same meaning: reft_ext.modules)
_PYREFT_TYPES = {
    "LoreftIntervention": "loreft",                                   # h + R^T(Wh + b - Rh)
    "ConditionedSourceLowRankRotatedSpaceIntervention": "loreft",     # its early name
    "NoreftIntervention": "noreft",                       # h + W2^T(W1h + b - (W2h + c))
    "ConsreftIntervention": "consreft",                               # h + R^T(b - Rh)
    "LobireftIntervention": "lobireft",                               # h + R^T b
    "DireftIntervention": "direft",                                   # h + R^T(Wh + b)
    "NodireftIntervention": "nodireft",                               # h + W2^T(W1h + b)
}
_ORTHONORMAL = ("loreft", "consreft", "lobireft", "direft")     # kinds with rotate_layer
_PYREFT_IGNORED_KEYS = {"embed_dim", "interchange_dim"}   # pyvene scalar buffers
_COMPONENT_PATH = re.compile(r"^(?P<path>[\w.]+)\[(?P<i>\d+)\]\.output$")


def _pyreft_class(s: Any) -> str:
    """'<class 'pyreft.interventions.LoreftIntervention'>' -> 'LoreftIntervention'."""
    if not isinstance(s, str):
        raise CheckpointError(f"reft_ext.load_pyreft: intervention type {s!r} is not a string")
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)'?>?\s*$", s.strip())
    return m.group(1) if m else s


def _orthogonal_weight(sd: dict, prefix: str) -> torch.Tensor | None:
    """The (d, r) weight of pyreft's parametrized rotate layer from a plain nn.Module
    state_dict (keys '<prefix>.parametrizations.weight.original' and '...0.base'),
    recomputed with torch's own orthogonal parametrization (the one pyreft registers,
    with its defaults)."""
    k_orig = f"{prefix}.parametrizations.weight.original"
    if k_orig not in sd:
        return None
    orig = sd[k_orig]
    holder = nn.Module()               # deterministic init: the state below replaces it
    holder.weight = nn.Parameter(torch.eye(*orig.shape, dtype=orig.dtype))
    with torch.random.fork_rng(devices=[]):    # registering it draws random numbers
        nn.utils.parametrizations.orthogonal(holder)
    local = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
    try:
        holder.load_state_dict(local, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"reft_ext.load_pyreft: cannot rebuild {prefix} from its "
                              f"parametrization state ({e})") from None
    with torch.no_grad():
        return holder.weight.detach().clone()


def _pyreft_tensors(cls_name: str, sd: dict, file: Path) -> dict[str, torch.Tensor]:
    """Maps one pyreft intervention state_dict to reft_ext's terms: "RT" (pyreft's
    rotate_layer weight, (d, r) = R^T) for the orthonormal kinds, "W" (r, d) for loreft /
    direft, "W1", "W2" (r, d) for noreft / nodireft, "b" (r,) for all, "c" (r,) for a
    noreft saved with add_bias."""
    used = set(_PYREFT_IGNORED_KEYS)

    def take(*keys):
        for k in keys:
            if k in sd:
                used.add(k)
                return sd[k]
        raise CheckpointError(f"reft_ext.load_pyreft: {file} has no {' / '.join(keys)} "
                              f"(keys: {sorted(sd)})")

    def rotate():
        if "rotate_layer" in sd:                       # LoreftIntervention.state_dict
            used.add("rotate_layer")
            return sd["rotate_layer"]
        if "rotate_layer.weight" in sd:                # a plain, non-parametrized layer
            used.add("rotate_layer.weight")
            return sd["rotate_layer.weight"]
        w = _orthogonal_weight(sd, "rotate_layer")     # nn.Module.state_dict of the layer
        if w is None:
            raise CheckpointError(f"reft_ext.load_pyreft: {file} has no rotate_layer "
                                  f"(keys: {sorted(sd)})")
        used.update(k for k in sd if k.startswith("rotate_layer.parametrizations."))
        return w

    kind = _PYREFT_TYPES[cls_name]
    if kind in ("loreft", "direft"):           # rotate_layer + learned_source = Linear(d, r)
        out = {"RT": rotate(), "W": take("weight", "learned_source.weight"),
               "b": take("bias", "learned_source.bias")}
    elif kind in ("consreft", "lobireft"):     # rotate_layer + learned_source = Parameter(r)
        out = {"RT": rotate(), "b": take("learned_source")}
    else:                                      # learned_source, proj_layer = Linear(d, r)
        out = {"W1": take("learned_source.weight", "weight"),
               "b": take("learned_source.bias", "bias"), "W2": take("proj_layer.weight")}
        if "proj_layer.bias" in sd:            # pyreft's add_bias=True
            used.add("proj_layer.bias")
            if kind == "noreft":               # NodiReFT's forward never uses it
                out["c"] = sd["proj_layer.bias"]
    extra = set(sd) - used
    if extra:
        raise CheckpointError(f"reft_ext.load_pyreft: {file} has unexpected tensors "
                              f"{sorted(extra)} for a {cls_name}")
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise CheckpointError(f"reft_ext.load_pyreft: {file}: {k} is not a float tensor")
        if not torch.isfinite(v).all():
            raise CheckpointError(f"reft_ext.load_pyreft: {file}: {k} has non-finite values")
    return out


def _pyreft_entries(reprs: list, cpath: Path) -> tuple[list, set]:
    """[(layer, rank, candidate intkey keys)] per representation, and the layer container
    paths named by string components ("model.layers[3].output")."""
    paths: set[str] = set()
    entries = []
    counter: dict[str, int] = {}
    for j, rep in enumerate(reprs):
        if isinstance(rep, dict):
            fields = [rep.get(f) for f in _REPR_FIELDS]
        elif isinstance(rep, list) and len(rep) >= 5:
            fields = rep[:5]
        else:
            raise CheckpointError(f"reft_ext.load_pyreft: {cpath}: representation {j} is "
                                  f"{rep!r}, expected a pyvene RepresentationConfig list")
        layer, comp, unit, nunit, rank = fields
        comp = comp if comp is not None else "block_output"
        unit = unit if unit is not None else "pos"
        nunit = nunit if nunit is not None else 1
        m = _COMPONENT_PATH.match(comp) if isinstance(comp, str) else None
        if m is not None:
            paths.add(m.group("path"))
            layer = int(m.group("i"))
        elif comp != "block_output":
            raise CheckpointError(f"reft_ext.load_pyreft: representation {j}: component "
                                  f"{comp!r} is not supported (reft_ext edits decoder layer "
                                  f"outputs: 'block_output')")
        if unit != "pos":
            raise CheckpointError(f"reft_ext.load_pyreft: representation {j}: unit {unit!r} "
                                  f"is not supported (only 'pos')")
        if not isinstance(layer, int) or not isinstance(rank, int) or rank < 1:
            raise CheckpointError(f"reft_ext.load_pyreft: representation {j}: bad layer "
                                  f"{layer!r} or low_rank_dimension {rank!r}")
        # pyvene's key: new style (>= 0.1.7) first, then the older dotted style
        n = counter[f"{layer}/{comp}/{nunit}"] = counter.get(f"{layer}/{comp}/{nunit}", -1) + 1
        if "." in comp:
            keys = [f"comp_{comp.replace('.', '_')}_unit_{unit}_nunit_{nunit}#{n}",
                    f"comp.{comp}.unit.{unit}.nunit.{nunit}#{n}"]
        else:
            keys = [f"layer_{layer}_comp_{comp}_unit_{unit}_nunit_{nunit}#{n}",
                    f"layer.{layer}.comp.{comp}.unit.{unit}.nunit.{nunit}#{n}"]
        entries.append((layer, rank, keys))
    return entries, paths


def _read_pyvene_config(cpath: Path) -> tuple[dict, list, list[str], str]:
    """(config, representations, pyreft class name per representation, reft_ext kind)."""
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"reft_ext.load_pyreft: cannot read {cpath} ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"reft_ext.load_pyreft: {cpath} is not a JSON object")
    reprs, types_ = cfg.get("representations"), cfg.get("intervention_types")
    if not isinstance(reprs, list) or not reprs:
        raise CheckpointError(f"reft_ext.load_pyreft: {cpath} has no 'representations' list "
                              f"(not a pyvene/pyreft save?)")
    if isinstance(types_, str):
        types_ = [types_] * len(reprs)
    if not isinstance(types_, list) or len(types_) != len(reprs):
        raise CheckpointError(f"reft_ext.load_pyreft: {cpath}: 'intervention_types' must list "
                              f"one type per representation ({len(reprs)})")
    classes = [_pyreft_class(t) for t in types_]
    bad = sorted({c for c in classes if c not in _PYREFT_TYPES})
    if bad:
        raise CheckpointError(f"reft_ext.load_pyreft: unsupported pyreft intervention type(s) "
                              f"{bad}; reft_ext imports {sorted(_PYREFT_TYPES)}")
    kinds = {_PYREFT_TYPES[c] for c in classes}
    if len(kinds) != 1:
        raise CheckpointError(f"reft_ext.load_pyreft: mixed intervention types {classes}; "
                              f"reft_ext patches one type per model")
    return cfg, reprs, classes, kinds.pop()


def _layer_layout(entries: list, paths: set) -> tuple[str | None, int, bool]:
    """(the layer container path the components name, or None; the one rank; tied): one
    intervention on every layer (tied), or two on every layer (untied: pyreft's
    share_weights=False, which lists the layers twice; #0 edits the first, #1 the last
    positions)."""
    if len(paths) > 1:
        raise CheckpointError(f"reft_ext.load_pyreft: components name several layer "
                              f"containers {sorted(paths)}")
    layers = [e[0] for e in entries]
    counts = {i: layers.count(i) for i in layers}
    if set(counts.values()) not in ({1}, {UNTIED_GROUPS}):
        raise CheckpointError(
            f"reft_ext.load_pyreft: interventions per layer {counts}: reft_ext imports one "
            f"intervention on every layer (tied) or {UNTIED_GROUPS} on every layer (untied, "
            f"pyreft's share_weights=False)")
    ranks = {e[1] for e in entries}
    if len(ranks) != 1:
        raise CheckpointError(f"reft_ext.load_pyreft: different ranks per layer {sorted(ranks)}")
    tied = set(counts.values()) == {1}
    return (next(iter(paths)) if paths else None), ranks.pop(), tied


def _read_intkeys(path: Path, entries: list, classes: list[str], sorted_keys,
                  tied: bool) -> dict:
    """{unit: tensors in pyreft's terms} from the intkey_<key>.bin files; a unit is the
    layer index (tied) or "layer#n", pyvene's n-th intervention on that layer (untied)."""
    values = {}
    for (layer, _, keys), cls_name in zip(entries, classes):
        unit = layer if tied else f"{layer}#{keys[0].rsplit('#', 1)[1]}"
        key = next((k for k in keys if (path / f"intkey_{k}.bin").is_file()), None)
        if key is None:
            raise CheckpointError(f"reft_ext.load_pyreft: no intkey_{keys[0]}.bin (or "
                                  f"intkey_{keys[-1]}.bin) in {path}")
        if isinstance(sorted_keys, list) and key not in sorted_keys:
            raise CheckpointError(f"reft_ext.load_pyreft: intkey_{key}.bin is not listed in "
                                  f"sorted_keys {sorted_keys}")
        file = path / f"intkey_{key}.bin"
        try:
            sd = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"reft_ext.load_pyreft: cannot read {file} "
                                  f"({type(e).__name__}: {e})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"reft_ext.load_pyreft: {file} is not a state_dict")
        values[unit] = _pyreft_tensors(cls_name, sd, file)
    return values


def _checked_d(values: dict, kind: str, rank: int) -> int:
    """d, after checking every tensor's shape and the orthonormality of R."""
    d = None
    for layer, v in values.items():
        if kind in _ORTHONORMAL:
            RT = v["RT"]
            if RT.dim() != 2 or RT.shape[1] != rank:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: rotate_layer has "
                                      f"shape {tuple(RT.shape)}, expected (d, {rank})")
            dd = RT.shape[0]
        else:
            dd = v["W1"].shape[-1]
        d = dd if d is None else d
        want = {"RT": (d, rank), "W": (rank, d), "W1": (rank, d), "W2": (rank, d),
                "b": (rank,), "c": (rank,)}
        for k, t in v.items():
            if tuple(t.shape) != want[k]:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: {k} has shape "
                                      f"{tuple(t.shape)}, expected {want[k]} (d={d}, "
                                      f"rank={rank})")
        if kind in _ORTHONORMAL:
            R64 = v["RT"].double()
            err = (R64.T @ R64 - torch.eye(rank, dtype=torch.float64)).abs().max().item()
            if err > 1e-3:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: rotate_layer "
                                      f"columns are not orthonormal (max |R R^T - I| = "
                                      f"{err:.3g})")
    return d


def read_pyreft(path: str | os.PathLike) -> dict:
    """Reads a pyreft / pyvene save (see :func:`load_pyreft`) without touching a model.

    Returns {"kind" (a reft_ext.modules.INTERVENTIONS name), "options" (the type's
    construction options: NoReFT's add_bias), "rank", "d", "layer_path" (the container
    named by "<path>[i].output" components, or None), "tied" (False: two interventions per
    layer, see load_pyreft), "tensors": {unit: {name: tensor}}} (unit: the layer index;
    untied, "layer#n")
    with tensors named as in a reft_ext checkpoint (the orthonormal types: rotate_raw =
    pyreft's R, and W for loreft / direft; noreft / nodireft: W1, W2, and c with add_bias;
    all: b). Raises CheckpointError on anything it cannot import.
    """
    path = Path(path)
    cpath = path / "config.json"
    cfg, reprs, classes, kind = _read_pyvene_config(cpath)
    entries, paths = _pyreft_entries(reprs, cpath)
    layer_path, rank, tied = _layer_layout(entries, paths)
    values = _read_intkeys(path, entries, classes, cfg.get("sorted_keys"), tied)
    d = _checked_d(values, kind, rank)
    dims = cfg.get("intervention_dimensions")
    if isinstance(dims, list) and any(isinstance(x, int) and x != d for x in dims):
        raise CheckpointError(f"reft_ext.load_pyreft: intervention_dimensions {dims} do not "
                              f"match the tensors (d={d})")
    options = {}
    if kind == "noreft":
        with_c = {i for i, v in values.items() if "c" in v}
        if with_c and with_c != set(values):
            raise CheckpointError(f"reft_ext.load_pyreft: NoreftIntervention with a "
                                  f"proj_layer bias (add_bias) on layers {sorted(with_c)} "
                                  f"only; reft_ext patches one add_bias for all layers")
        options = {"add_bias": bool(with_c)}
    # rename to the reft_ext file names: pyreft's rotate_layer (d, r) is R^T, rotate_raw R
    tensors = {i: {("rotate_raw" if k == "RT" else k): (t.T if k == "RT" else t)
                   for k, t in v.items()} for i, v in values.items()}
    return {"kind": kind, "options": options, "rank": rank, "d": d, "layer_path": layer_path,
            "tied": tied, "tensors": tensors}


def load_pyreft(model: nn.Module, path: str | os.PathLike, *, positions: str,
                dtype: torch.dtype | None = None, layer_path: str | None = None,
                backend: str = "fused", adapter: str | None = None) -> nn.Module:
    """Patches ``model`` with the interventions of a pyreft / pyvene save, as a new adapter.

    An unpatched model gets them as its first adapter (named ``adapter``, default
    "default"); a patched one as another adapter, ``adapter`` being a name it does not
    have yet (see reft_ext.patch).

    Reads pyvene's ``config.json`` (``representations`` as positional lists: layer,
    component, unit, max_number_of_units, low_rank_dimension, ...; ``intervention_types``;
    ``sorted_keys``) and one ``intkey_<key>.bin`` per intervention, with keys written
    ``layer_15_comp_block_output_unit_pos_nunit_1#0`` (pyvene >= 0.1.7) or
    ``layer.15.comp.block_output.unit.pos.nunit.1#0`` (older), loaded with
    ``torch.load(weights_only=True)``.

    Supported, each onto the reft_ext type of the same meaning (reft_ext.modules):
    LoreftIntervention (and its old name ConditionedSourceLowRankRotatedSpaceIntervention)
    -> "loreft", NoreftIntervention -> "noreft" (add_bias kept: proj_layer.bias becomes c),
    ConsreftIntervention -> "consreft", LobireftIntervention -> "lobireft",
    DireftIntervention -> "direft", NodireftIntervention -> "nodireft" (a proj_layer.bias,
    unused by pyreft's forward, is ignored). One intervention type for the model; one
    intervention per layer (tied), or two on every layer (untied: pyreft's
    share_weights=False, which lists each layer twice; pyvene's keys ``...#0`` and ``...#1``
    become intervention #0, editing the first p positions, and #1, the last s, of
    ``patch(..., tied=False)``; positions must then be "f{p}+l{s}"); component
    "block_output" (or "<path>[i].output"), unit "pos", act_fn linear (pyreft's default; it is not recorded in the save). Anything else raises
    CheckpointError naming it, before the model is changed.

    Exactness: pyreft's ``rotate_layer`` is R^T (d, r) (for the orthonormal types); it is
    imported as ``rotate_raw = R``, unchanged. reft_ext's forward uses
    R' = orthonormal_rows(rotate_raw), a sign-fixed QR, which maps a matrix with
    orthonormal rows to itself; pyreft's R is orthonormal only to float32 rounding, so
    R' = R + E with max|E| <~ max|R R^T - I| + a few eps32 (measured: <= 1.5 eps32 =
    1.8e-7 for d <= 4096, r <= 32; tests assert <= max|R R^T - I| + 4 eps32). The
    imported edit therefore equals pyreft's formula to float32 rounding (tests: within 2x
    PyTorch's own float32 error + 4 ulps, the suite's rule), far below a bf16 model's
    resolution. Using pyreft's R bit for bit would need an
    intervention option that skips the QR (and then R drifts off orthonormality in
    training); not worth it at this error. A reft_ext save of the imported model reloads
    bitwise.

    Args:
        positions: the positions spec the pyreft model was trained with (e.g. "f7+l7");
            pyreft does not record it. Untied saves: "f{p}+l{s}", with pyreft's rule (each
            side clipped to half the row, see reft_ext.model.positions).
        dtype: parameter dtype; default float32 (float64 if the files hold float64): pyreft's
            bf16 W, b with fp32 R become float32 exactly.
        layer_path: path of the decoder-layer container, if discovery needs help.

    Returns:
        ``model``, patched.
    """
    path = Path(path)
    target, wrapped = _dist.unwrap(model)
    adapter = DEFAULT if adapter is None else adapter
    _check_adapter_name(adapter)
    if is_patched(target) and adapter in adapters(target):
        raise CheckpointError(f"reft_ext.load_pyreft: model is already patched with an adapter "
                              f"named {adapter!r}; pass adapter= a new name to add the import "
                              f"as another adapter, or unpatch first")
    if wrapped:
        raise CheckpointError(f"reft_ext.load_pyreft: {type(model).__name__} wraps the model; "
                              f"import before wrapping it with DDP / FSDP / torch.compile")
    imported = read_pyreft(path)
    tensors = imported["tensors"]
    if not imported["tied"]:
        try:
            check_untied_spec(positions)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"reft_ext.load_pyreft: {path} holds untied interventions "
                                  f"(two per layer): {e}") from None
    if dtype is None:     # float32 holds bf16 / fp16 values exactly
        dtype = torch.float64 if any(t.dtype == torch.float64 for v in tensors.values()
                                     for t in v.values()) else torch.float32
    patch_and_fill(model, tensors, op="load_pyreft", where=str(path), kind=imported["kind"],
                   options=imported["options"], rank=imported["rank"], d=imported["d"],
                   dtype=dtype,
                   layer_path=layer_path if layer_path is not None else imported["layer_path"],
                   positions=positions, backend=backend, tied=imported["tied"],
                   adapter=adapter)
    return model
