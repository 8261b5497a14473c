"""reft_ext's own checkpoint format: save / load of a patched model's interventions
(safetensors + JSON).

    reft_ext.save(model, "out/reft")                  # a directory, written atomically
    reft_ext.load(model, "out/reft")                  # patches an unpatched model from it
    reft_ext.save(model, "out/reft", optimizer=opt)   # + optimizer state for exact resume
    reft_ext.load_optimizer(opt, "out/reft")

A checkpoint directory (format version 1; 2 for untied interventions, which older
readers refuse with "upgrade reft_ext") holds two files, plus an optional third:

``reft_config.json``
    {"format": "reft_ext", "format_version": 1, "library_version", "torch_version",
     "intervention": one of reft_ext.modules.INTERVENTIONS ("loreft", "noreft",
     "consreft", "lobireft", "direft", "nodireft"), "intervention_options" (only for a
     type with options: NoReFT's {"add_bias": bool}), "d", "rank", "layers": [patch order],
     "layer_path", "n_layers" (length of the layer container), "positions" (default spec),
     "tied" (false: two interventions per layer, patch(..., tied=False); absent: true),
     "dropout", "backend", "dtype" (parameter dtype, or "mixed"),
     "tensors": {name: {"dtype", "shape"}} (the manifest of the weights file),
     "weights_sha256" (of reft_model.safetensors), "base_model" (class name, informative),
     "optimizer" (class name, when optimizer.pt was written)}

``reft_model.safetensors``
    Per patched layer i, in the parameters' own dtypes:

    Which tensors, and how the derived ones are computed, each intervention class declares
    (SAVED_TENSORS, DERIVED_TENSORS in reft_ext/modules.py):

    * loreft: ``layers.{i}.R`` (r, d) the materialised orthonormal R used by forward,
      ``layers.{i}.W`` (r, d), ``layers.{i}.b`` (r,), and ``layers.{i}.rotate_raw`` (r, d),
      the unconstrained parameter R is computed from. R alone is enough to *use* the edit
      (Phi(h) = h + R^T (W h + b - R h)) without reft_ext; rotate_raw is what makes a
      reload exact: orthonormalising a saved R again reproduces it only to rounding
      (~1 ulp), so load() restores rotate_raw and recomputes R with the same code, which
      gives bitwise-identical outputs and bitwise-identical training after a resume.
      load() checks that R and rotate_raw agree (to 64 ulps) and rejects the file if not.
    * consreft, lobireft: ``R``, ``rotate_raw`` and ``b`` as loreft (no W).
    * direft (orthonormal R, pyreft's DireftIntervention): as loreft.
    * noreft: ``layers.{i}.W1`` (r, d), ``layers.{i}.W2`` (r, d), ``layers.{i}.b`` (r,),
      and ``layers.{i}.c`` (r,) with add_bias (Phi(h) = h + W2^T (W1 h + b - W2 h - c)).
    * nodireft: ``layers.{i}.W1`` (r, d), ``layers.{i}.W2`` (r, d), ``layers.{i}.b`` (r,)
      (Phi(h) = h + W2^T (W1 h + b)).

    Untied interventions store member k of layer i as unit ``{i}#{k}`` (pyreft's naming:
    #0 edits the first tokens, #1 the last): ``layers.{i}#{k}.{name}``.

    Older checkpoints: before the six pyreft types, reft_ext's "direft" was the type with
    a free W2 (pyreft's NodiReFT). A file with intervention "direft" and tensors W1, W2, b
    is that type and is read as "nodireft", with the same math (:func:`read_config`).

``optimizer.pt`` (only with ``save(..., optimizer=opt)``)
    ``optimizer.state_dict()`` (FSDP2 shards gathered into full tensors) written with
    torch.save; read back with ``torch.load(weights_only=True)`` by :func:`load_optimizer`.

Every failure to read or to fit a checkpoint raises :class:`CheckpointError` (a ValueError)
before the model is changed. Distributed runs: see :func:`save` (DDP, FSDP2).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..model.patch import (DEFAULT, _check_adapter_name, adapters, interventions,
                           is_patched, patch_config)
from ..model.positions import check_untied_spec, parse_positions
from ..modules import INTERVENTIONS, kind_of
from . import _atomic, _dist
from ._errors import CheckpointError
from ._fill import patch_and_fill
from ._units import unit_keys, units

__all__ = ["save", "load", "load_optimizer", "read_config", "check_target", "FORMAT_VERSION",
           "CONFIG_NAME", "WEIGHTS_NAME", "OPTIMIZER_NAME"]

FORMAT = "reft_ext"
FORMAT_VERSION = 2   # 2: untied interventions ("tied": false); tied ones are still written as 1
CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"
_FLOAT_DTYPES = {str(t).removeprefix("torch."): t for t in
                 (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _tensor_names(kind: str, options: dict) -> tuple[str, ...]:
    """The tensors a checkpoint of `kind` built with `options` holds per layer: derived
    ones first."""
    cls = INTERVENTIONS[kind]
    return (*cls.DERIVED_TENSORS, *cls.saved_tensors(**options))


_VECTORS = ("b", "c")     # the (r,) tensors of any type; all others are (r, d)


def _options_of(mods: dict[int, nn.Module]) -> dict:
    """The construction options (e.g. NoReFT's add_bias) shared by every layer."""
    opts = [m.options() for m in mods.values()]
    if any(o != opts[0] for o in opts):
        raise CheckpointError(f"reft_ext.save: the layers' interventions were built with "
                              f"different options {opts}")
    return opts[0]


def _kind_of(mods: dict[str, nn.Module]) -> str:
    kinds = set()
    for i, m in mods.items():
        kind = kind_of(m)
        if kind is None:
            raise CheckpointError(
                f"reft_ext.save: layer {i} holds a {type(m).__name__}; checkpoints support "
                f"the built-in interventions {sorted(INTERVENTIONS)} (save a custom "
                f"intervention's state_dict yourself)")
        kinds.add(kind)
    if len(kinds) != 1:
        raise CheckpointError(f"reft_ext.save: mixed intervention types {sorted(kinds)}")
    return kinds.pop()


def check_target(path: Path, where: str | None = None, marker: str = CONFIG_NAME) -> None:
    """Raises CheckpointError unless a checkpoint may be written at path: nothing there, an
    empty directory, or a reft_ext checkpoint (replaced; marker: the file that makes a
    directory one, CONFIG_NAME or save_adapters' index). The message starts with where
    (default "reft_ext.save: <path>"); the CLI checks its --output with it before training."""
    where = f"reft_ext.save: {path}" if where is None else where
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{where} exists and is not a directory")
        entries = list(path.iterdir())
        if entries and not (path / marker).is_file():
            raise CheckpointError(
                f"{where} exists, is not empty and is not a reft_ext checkpoint (no "
                f"{marker}); refusing to replace it")


# ------------------------------------------------------------------ save

def _layer_tensors(mods: dict[str, nn.Module], kind: str,
                   options: dict) -> dict[str, torch.Tensor]:
    """{"layers.{unit}.{name}": full tensor on the CPU} (FSDP2: gathered, a collective)."""
    cls = INTERVENTIONS[kind]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, m in mods.items():
            full = {fname: _dist.full(getattr(m, pname))
                    for fname, pname in cls.saved_tensors(**options).items()}
            for name, (src, derive) in cls.DERIVED_TENSORS.items():
                full[name] = derive(full[src])
            for fname in _tensor_names(kind, options):
                out[f"layers.{i}.{fname}"] = full[fname].cpu()
    return out


def _gathered_state(optimizer) -> dict:
    """optimizer.state_dict() with FSDP2-sharded state tensors gathered (a collective)."""
    state = optimizer.state_dict()
    state["state"] = {
        k: ({n: _dist.full(v).cpu() if isinstance(v, torch.Tensor) else v
             for n, v in st.items()} if isinstance(st, dict) else st)
        for k, st in state["state"].items()}
    return state


def _config(target, pc: dict, mods, kind, options, tensors, blob: bytes,
            optimizer) -> dict[str, Any]:
    first = next(iter(mods.values()))
    dtypes = {_dtype_name(p.dtype) for m in mods.values() for p in m.parameters()}
    cfg: dict[str, Any] = {
        "format": FORMAT,
        "format_version": 1 if pc["tied"] else 2,
        "library_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "intervention": kind,
        **({"intervention_options": options} if INTERVENTIONS[kind].OPTIONS else {}),
        "d": int(first.d),
        "rank": int(first.rank),
        "layers": pc["layers"],
        "layer_path": pc["layer_path"],
        "n_layers": pc["n_layers"],
        "positions": pc["positions"],
        "tied": pc["tied"],
        "dropout": float(first.dropout),
        "backend": first.backend,
        "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed",
        "tensors": {k: {"dtype": _dtype_name(v.dtype), "shape": list(v.shape)}
                    for k, v in tensors.items()},
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "base_model": next(c.__name__ for c in type(target).__mro__   # not FSDP's subclass
                           if not c.__module__.startswith("torch.distributed")),
    }
    if optimizer is not None:
        cfg["optimizer"] = type(optimizer).__name__
    return cfg


def save(model: nn.Module, path: str | os.PathLike, *, optimizer=None,
         adapter: str | None = None) -> Path:
    """Writes the interventions of one adapter of a patched model to the directory ``path``.

    Args:
        model: a model patched by reft_ext.patch (or a DDP / DataParallel / torch.compile /
            accelerate wrapper around one, or an FSDP2 ``fully_shard`` model).
        path: directory to create. An existing reft_ext checkpoint (or an empty directory)
            there is replaced; any other existing path is refused.
        optimizer: if given, its ``state_dict()`` is saved too (``optimizer.pt``), for
            :func:`load_optimizer`; FSDP2-sharded state tensors are gathered into full
            tensors, so the file does not depend on the number of processes.
        adapter: the adapter to save. May be left out on a model with one adapter; a model
            with several needs a name here (or :func:`save_adapters` for all of them).

    The directory is written under a temporary name next to ``path`` and renamed into
    place when complete, so a failed or interrupted save never leaves a partial checkpoint.

    Distributed runs (torch.distributed initialised): only rank 0 writes. With FSDP2 the
    parameters are sharded DTensors and are all-gathered first, which is a collective:
    **call save() on every rank** (with DDP, calling it on rank 0 only is also fine).
    No barrier is done at the end; add one if other ranks read the directory afterwards.

    Returns:
        Path of the checkpoint directory.
    """
    path = Path(path)
    target, _ = _dist.unwrap(model)
    if not is_patched(target):
        raise CheckpointError("reft_ext.save: model is not patched by reft_ext.patch")
    names = list(adapters(target))
    if adapter is None and len(names) > 1:
        raise CheckpointError(f"reft_ext.save: the model has adapters {names}: name the one "
                              f"to save with adapter=, or save them all with "
                              f"reft_ext.save_adapters")
    files = checkpoint_files(target, adapter, optimizer)
    if files is None:
        return path
    check_target(path)
    _atomic.write_dir(path, files)
    return path


def checkpoint_files(target: nn.Module, adapter: str | None,
                     optimizer=None) -> dict[str, bytes] | None:
    """{file name: contents} of the checkpoint of one adapter of the patched ``target``;
    None on ranks other than 0 of a distributed run (after the collectives)."""
    if adapter is not None and adapter not in adapters(target):
        raise CheckpointError(f"reft_ext.save: the model has no adapter named {adapter!r} "
                              f"(adapters: {list(adapters(target))})")
    mods = units(interventions(target, adapter))
    kind = _kind_of(mods)
    options = _options_of(mods)
    tensors = _layer_tensors(mods, kind, options)
    opt_state = _gathered_state(optimizer) if optimizer is not None else None
    if _dist.rank() != 0:
        return None

    from safetensors.torch import save as st_save
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    pc = patch_config(target, adapter)
    version = "1" if pc["tied"] else "2"
    blob = st_save(tensors, metadata={"format": "pt", "reft_ext_format": version})
    files = {WEIGHTS_NAME: blob}
    if opt_state is not None:
        buf = io.BytesIO()
        torch.save(opt_state, buf)
        files[OPTIMIZER_NAME] = buf.getvalue()
    cfg = _config(target, pc, mods, kind, options, tensors, blob, optimizer)
    files[CONFIG_NAME] = (json.dumps(cfg, indent=2) + "\n").encode()
    return files


# ------------------------------------------------------------------ reading

def _need(cfg: dict, key: str, types, where: str):
    if key not in cfg:
        raise CheckpointError(f"reft_ext.load: {where} has no {key!r}")
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, types):
        raise CheckpointError(f"reft_ext.load: {where}: {key!r} has the wrong type "
                              f"({type(v).__name__})")
    return v


def read_config(path: str | os.PathLike) -> dict:
    """Reads and validates ``reft_config.json`` of a checkpoint directory.

    Raises CheckpointError for a missing / unparsable file, another format, a format
    version this reft_ext cannot read, an unknown intervention or inconsistent fields.
    """
    path = Path(path)
    cpath = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"reft_ext.load: {path} is not a directory")
    if not cpath.is_file():
        hint = (" (this looks like a pyreft save: use reft_ext.load_pyreft)"
                if (path / "config.json").is_file() else "")
        raise CheckpointError(f"reft_ext.load: {cpath} not found{hint}")
    try:
        cfg = json.loads(cpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"reft_ext.load: {cpath} is not valid JSON ({e}); the file "
                              f"is corrupt or truncated") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise CheckpointError(f"reft_ext.load: {cpath} is not a reft_ext checkpoint config "
                              f"(format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
    ver = _need(cfg, "format_version", int, cpath.name)
    if ver > FORMAT_VERSION:
        raise CheckpointError(
            f"reft_ext.load: {path} has format version {ver}, written by a newer reft_ext "
            f"({cfg.get('library_version')}); this reft_ext reads format version <= "
            f"{FORMAT_VERSION}: upgrade reft_ext")
    if ver < 1:
        raise CheckpointError(f"reft_ext.load: {path}: invalid format version {ver}")
    kind = _need(cfg, "intervention", str, cpath.name)
    if kind not in INTERVENTIONS:
        raise CheckpointError(f"reft_ext.load: {path}: unknown intervention {kind!r}; this "
                              f"reft_ext knows {sorted(INTERVENTIONS)}")
    manifest = _need(cfg, "tensors", dict, cpath.name)
    if kind == "direft" and any(k.endswith(".W1") for k in manifest):
        # Written before "direft" meant pyreft's DiReFT: a free-W2 (NodiReFT) checkpoint.
        kind = cfg["intervention"] = "nodireft"
    options = _read_options(cfg, kind, cpath)
    d = _need(cfg, "d", int, cpath.name)
    r = _need(cfg, "rank", int, cpath.name)
    layers = _need(cfg, "layers", list, cpath.name)
    n_layers = _need(cfg, "n_layers", int, cpath.name)
    _need(cfg, "layer_path", str, cpath.name)
    spec = _need(cfg, "positions", str, cpath.name)
    dropout = _need(cfg, "dropout", (int, float), cpath.name)
    backend = _need(cfg, "backend", str, cpath.name)
    tied = cfg.get("tied", True)
    if not isinstance(tied, bool):
        raise CheckpointError(f"reft_ext.load: {cpath}: 'tied' must be true or false, got "
                              f"{tied!r}")
    try:
        parse_positions(spec) if tied else check_untied_spec(spec)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"reft_ext.load: {cpath}: {e}") from None
    if not 0.0 <= dropout < 1.0 or backend not in ("fused", "reference"):
        raise CheckpointError(f"reft_ext.load: {cpath}: invalid dropout {dropout!r} or "
                              f"backend {backend!r}")
    if not (1 <= r <= d) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers
            for i in layers) or len(set(layers)) != len(layers):
        raise CheckpointError(f"reft_ext.load: {cpath}: inconsistent d={d}, rank={r}, "
                              f"layers={layers}, n_layers={n_layers}")
    _check_manifest(manifest, cpath, kind, options, d, r, unit_keys(layers, tied))
    return cfg


def _read_options(cfg: dict, kind: str, cpath: Path) -> dict:
    """The checkpoint's intervention options, checked against the type's OPTIONS {name:
    default} (same names, same types); a missing one takes the default. Stored back in
    cfg["intervention_options"], complete, for the rest of load()."""
    declared = INTERVENTIONS[kind].OPTIONS
    opts = cfg.get("intervention_options", {})
    if not isinstance(opts, dict) or set(opts) - set(declared) or any(
            type(v) is not type(declared[k]) for k, v in opts.items()):
        raise CheckpointError(f"reft_ext.load: {cpath}: bad intervention_options {opts!r} "
                              f"for {kind!r} (its options and defaults: {declared})")
    cfg["intervention_options"] = {**declared, **opts}
    return cfg["intervention_options"]


def _check_manifest(manifest: dict, cpath: Path, kind: str, options: dict, d: int, r: int,
                    keys: list[str]) -> None:
    """The config's "tensors" lists exactly the tensors of a `kind` checkpoint of these
    units, each a float dtype of shape (r,) for a bias "b" / "c", (r, d) for the others."""
    want = {f"layers.{u}.{n}" for u in keys for n in _tensor_names(kind, options)}
    if set(manifest) != want:
        raise CheckpointError(
            f"reft_ext.load: {cpath}: tensor manifest does not match a {kind} checkpoint of "
            f"units {keys}: missing {sorted(want - set(manifest))}, extra "
            f"{sorted(set(manifest) - want)}")
    for name, meta in manifest.items():
        shape = [r] if name.rsplit(".", 1)[1] in _VECTORS else [r, d]
        if (not isinstance(meta, dict) or meta.get("dtype") not in _FLOAT_DTYPES
                or meta.get("shape") != shape):
            raise CheckpointError(f"reft_ext.load: {cpath}: bad manifest entry for {name}: "
                                  f"{meta!r} (expected a float dtype and shape {shape})")


def _read_weights(path: Path, cfg: dict) -> dict[str, torch.Tensor]:
    wpath = path / WEIGHTS_NAME
    try:
        blob = wpath.read_bytes()
    except OSError as e:
        raise CheckpointError(f"reft_ext.load: cannot read {wpath}: {e}") from None
    sha = cfg.get("weights_sha256")
    if sha is not None and hashlib.sha256(blob).hexdigest() != sha:
        raise CheckpointError(
            f"reft_ext.load: {wpath} is corrupt or truncated: its SHA-256 does not match the "
            f"one recorded in {CONFIG_NAME} ({len(blob)} bytes read)")
    from safetensors.torch import load as st_load
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own SafetensorError, or others
        raise CheckpointError(f"reft_ext.load: cannot parse {wpath} ({type(e).__name__}: "
                              f"{e}); the file is corrupt or truncated") from None
    manifest = cfg["tensors"]
    missing, extra = set(manifest) - set(tensors), set(tensors) - set(manifest)
    if missing or extra:
        raise CheckpointError(f"reft_ext.load: {wpath} does not match {CONFIG_NAME}: missing "
                              f"tensors {sorted(missing)}, extra tensors {sorted(extra)}")
    for name, t in tensors.items():
        meta = manifest[name]
        if _dtype_name(t.dtype) != meta["dtype"] or list(t.shape) != meta["shape"]:
            raise CheckpointError(
                f"reft_ext.load: {wpath}: {name} is {_dtype_name(t.dtype)} "
                f"{list(t.shape)}, {CONFIG_NAME} says {meta['dtype']} {meta['shape']}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"reft_ext.load: {wpath}: {name} has non-finite values")
    _check_derived(tensors, cfg, wpath)
    return tensors


def _check_derived(tensors: dict[str, torch.Tensor], cfg: dict, wpath: Path) -> None:
    """Each derived tensor (LoReFT's R) agrees, to 64 ulps, with the one its class computes
    from the saved tensor it comes from: a file whose two disagree is refused."""
    for name, (src, derive) in INTERVENTIONS[cfg["intervention"]].DERIVED_TENSORS.items():
        for i in unit_keys(cfg["layers"], cfg.get("tied", True)):
            stored, raw = tensors[f"layers.{i}.{name}"], tensors[f"layers.{i}.{src}"]
            tol = 64 * torch.finfo(stored.dtype).eps
            try:
                err = (derive(raw).float() - stored.float()).abs().max().item()
            except RuntimeError as e:   # rank-deficient raw, ...
                raise CheckpointError(f"reft_ext.load: {wpath}: layers.{i}.{name} cannot be "
                                      f"computed from layers.{i}.{src} ({e})") from None
            if not err <= tol:
                raise CheckpointError(
                    f"reft_ext.load: {wpath}: layers.{i}.{name} and layers.{i}.{src} "
                    f"disagree (max |{name} computed from {src} - {name}| = {err:.3g} > "
                    f"{tol:.3g})")


# ------------------------------------------------------------------ load

def _check_patched_layout(target: nn.Module, cfg: dict, where: str,
                          adapter: str | None) -> dict[int, nn.Module]:
    pc = patch_config(target, adapter)
    mods = units(interventions(target, adapter))
    kind = cfg["intervention"]
    cls = INTERVENTIONS[kind]
    problems = []
    if pc["layers"] != cfg["layers"]:
        problems.append(f"layers {pc['layers']} vs {cfg['layers']} in the checkpoint")
    if pc["tied"] != cfg.get("tied", True):
        problems.append(f"{'tied' if pc['tied'] else 'untied'} interventions in the model vs "
                        f"{'tied' if cfg.get('tied', True) else 'untied'} in the checkpoint")
        mods = {}
    if pc["n_layers"] != cfg["n_layers"]:
        problems.append(f"{pc['n_layers']} layers in the model vs {cfg['n_layers']}")
    for i, m in mods.items():
        if type(m) is not cls:
            problems.append(f"layer {i} holds a {type(m).__name__}, the checkpoint a "
                            f"{cls.__name__}")
            break
        if m.options() != cfg["intervention_options"]:
            problems.append(f"layer {i} has options {m.options()} vs "
                            f"{cfg['intervention_options']}")
            break
        if (m.d, m.rank) != (cfg["d"], cfg["rank"]):
            problems.append(f"layer {i} has d={m.d}, rank={m.rank} vs d={cfg['d']}, "
                            f"rank={cfg['rank']}")
            break
    if problems:
        into = "the patched model" if adapter is None else f"adapter {adapter!r}"
        raise CheckpointError(f"reft_ext.load: {where} does not fit {into}: "
                              + "; ".join(problems))
    return mods


def _staged(mods, cfg, tensors, where: str, cast: torch.dtype | None) -> list:
    """[(module, parameter name, value on the parameter's device)] — everything converted
    before the first write, so a failure cannot leave the model half loaded."""
    out = []
    for i, m in mods.items():
        cls = INTERVENTIONS[cfg["intervention"]]
        for fname, pname in cls.saved_tensors(**cfg["intervention_options"]).items():
            p = getattr(m, pname)
            t = tensors[f"layers.{i}.{fname}"]
            if cast is not None:
                t = t.to(cast)
            if t.dtype != p.dtype:
                raise CheckpointError(
                    f"reft_ext.load: {where}: layers.{i}.{fname} is {_dtype_name(t.dtype)} but "
                    f"the patched model's parameter is {_dtype_name(p.dtype)}; pass dtype= "
                    f"to convert, or load into an unpatched model")
            if _dist.is_dtensor(p):
                t = _dist.shard_like(t, p)
            else:
                t = t.to(p.device, copy=True)
            out.append((m, pname, t))
    return out


def load(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
         positions: str | None = None, backend: str | None = None,
         dropout: float | None = None, layer_path: str | None = None,
         adapter: str | None = None) -> nn.Module:
    """Loads a checkpoint written by :func:`save` into ``model``; returns ``model``.

    * Unpatched model: patches it exactly as the checkpoint records (layers, rank,
      intervention, positions spec, dropout, backend, parameter dtypes) and sets the
      parameters: outputs are bitwise identical to the saved model's (same device and
      kernels). The adapter is named ``adapter`` (default "default"). Torch's global RNG
      state is left as it was.
    * Patched model, ``adapter`` a name it does not have: adds the checkpoint as a new
      adapter of that name, as above (the overrides apply to it); the model's other
      adapters are untouched.
    * Patched model, ``adapter`` left out or a name it has (left out: the default
      adapter), with the same layout (layers, layer container length, intervention, d,
      rank, parameter dtypes): the values are copied into that adapter's parameters in
      place, so an optimizer already built on them stays valid (this is what the Trainer
      callback does on resume). Its positions spec, dropout and backend are kept. Also
      works on DDP-wrapped and FSDP2 (``fully_shard``) models: call it on every rank; each
      rank reads the file and keeps its shard.

    Args:
        adapter: the adapter to fill or add (see above).
        dtype: convert the parameters to this dtype (not bitwise then).
        positions, backend, dropout: override the recorded values (unpatched model only).
        layer_path: override the recorded path of the layer container (unpatched model).

    Raises:
        CheckpointError (a ValueError) when the directory cannot be read, is corrupt or
        truncated, has another format version, an unknown intervention, or does not fit
        the model (other d, other number of layers, missing / extra tensors, ...). It is
        raised before anything is changed: the model stays exactly as it was.
    """
    path = Path(path)
    cfg = read_config(path)
    tensors = _read_weights(path, cfg)
    where = str(path)
    target, wrapped = _dist.unwrap(model)
    if adapter is not None:
        _check_adapter_name(adapter)
        where = f"{where} (adapter {adapter!r})"
    if is_patched(target) and (adapter is None or adapter in adapters(target)):
        if any(v is not None for v in (positions, backend, dropout, layer_path)):
            raise CheckpointError("reft_ext.load: positions / backend / dropout / layer_path "
                                  "overrides apply to a new adapter only (an unpatched model, "
                                  "or adapter= a name the model does not have)")
        mods = _check_patched_layout(target, cfg, where, adapter)
        staged = _staged(mods, cfg, tensors, where, dtype)
        with torch.no_grad():
            for m, pname, t in staged:
                getattr(m, pname).copy_(t)
        return model
    if wrapped:
        raise CheckpointError(
            f"reft_ext.load: {type(model).__name__} wraps the model; load new interventions "
            f"(or patch) before wrapping it with DDP / FSDP / torch.compile")

    kind, options = cfg["intervention"], cfg["intervention_options"]
    tied = cfg.get("tied", True)
    values = {u: {n: tensors[f"layers.{u}.{n}"]
                  for n in INTERVENTIONS[kind].saved_tensors(**options)}
              for u in unit_keys(cfg["layers"], tied)}
    patch_and_fill(model, values, op="load", where=where, kind=kind, options=options,
                   rank=cfg["rank"], d=cfg["d"], dtype=dtype,
                   layer_path=layer_path if layer_path is not None else cfg["layer_path"],
                   saved_from=(cfg["layer_path"], cfg["n_layers"]),
                   positions=positions if positions is not None else cfg["positions"],
                   dropout=cfg["dropout"] if dropout is None else dropout,
                   backend=backend if backend is not None else cfg["backend"], tied=tied,
                   adapter=adapter if adapter is not None else DEFAULT)
    return model


def load_optimizer(optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> None:
    """Restores the optimizer state saved by ``save(..., optimizer=opt)``.

    Build the optimizer on the loaded model's parameters in the same order as before
    (e.g. ``[p for p in model.parameters() if p.requires_grad]``) and call this before the
    first step. Checks the optimizer class, the parameter groups and every per-parameter
    state tensor's shape before changing anything. With FSDP2 (parameters are DTensors)
    call it on every rank: each keeps its shard of the saved full state.
    """
    path = Path(path)
    cfg = read_config(path)
    opath = path / OPTIMIZER_NAME
    if not opath.is_file():
        raise CheckpointError(f"reft_ext.load_optimizer: {opath} not found (save with "
                              f"reft_ext.save(model, path, optimizer=opt))")
    if cfg.get("optimizer") not in (None, type(optimizer).__name__):
        raise CheckpointError(f"reft_ext.load_optimizer: {path} holds {cfg['optimizer']} "
                              f"state, the optimizer is a {type(optimizer).__name__}")
    try:
        sd = torch.load(opath, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"reft_ext.load_optimizer: cannot read {opath} "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not {"state", "param_groups"} <= set(sd):
        raise CheckpointError(f"reft_ext.load_optimizer: {opath} is not an optimizer "
                              f"state_dict")
    groups = optimizer.param_groups
    saved = sd["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"])
                                        for g, s in zip(groups, saved)):
        raise CheckpointError(
            f"reft_ext.load_optimizer: {opath} has parameter groups of sizes "
            f"{[len(s['params']) for s in saved]}, the optimizer "
            f"{[len(g['params']) for g in groups]}")
    params = {sid: p for g, s in zip(groups, saved) for sid, p in zip(s["params"], g["params"])}
    for sid, st in sd["state"].items():
        p = params.get(sid)
        for k, v in (st.items() if isinstance(st, dict) else ()):
            if (p is not None and isinstance(v, torch.Tensor) and v.dim() > 0
                    and v.shape != p.shape):
                raise CheckpointError(
                    f"reft_ext.load_optimizer: state {k!r} of parameter {sid} has shape "
                    f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")
    for sid, st in sd["state"].items():     # FSDP2: keep this rank's shard of full tensors
        p = params.get(sid)
        if p is not None and _dist.is_dtensor(p) and isinstance(st, dict):
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    st[k] = _dist.shard_like(v, p)
    optimizer.load_state_dict(sd)
