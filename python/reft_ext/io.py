"""Checkpoints of patched models: save / load (safetensors + JSON), resume, pyreft import.

    reft_ext.save(model, "out/reft")                  # a directory, written atomically
    reft_ext.load(model, "out/reft")                  # patches an unpatched model from it
    reft_ext.save(model, "out/reft", optimizer=opt)   # + optimizer state for exact resume
    reft_ext.load_optimizer(opt, "out/reft")
    reft_ext.load_pyreft(model, "pyreft_dir", positions="f7+l7")

A checkpoint directory (format version 1) holds two files, plus an optional third:

``reft_config.json``
    {"format": "reft_ext", "format_version": 1, "library_version", "torch_version",
     "intervention": "loreft" | "direft", "d", "rank", "layers": [patch order],
     "layer_path", "n_layers" (length of the layer container), "positions" (default spec),
     "dropout", "backend", "dtype" (parameter dtype, or "mixed"),
     "tensors": {name: {"dtype", "shape"}} (the manifest of the weights file),
     "weights_sha256" (of reft_model.safetensors), "base_model" (class name, informative),
     "optimizer" (class name, when optimizer.pt was written)}

``reft_model.safetensors``
    Per patched layer i, in the parameters' own dtypes:

    * loreft: ``layers.{i}.R`` (r, d) the materialised orthonormal R used by forward,
      ``layers.{i}.W`` (r, d), ``layers.{i}.b`` (r,), and ``layers.{i}.rotate_raw`` (r, d),
      the unconstrained parameter R is computed from. R alone is enough to *use* the edit
      (Phi(h) = h + R^T (W h + b - R h)) without reft_ext; rotate_raw is what makes a
      reload exact: orthonormalising a saved R again reproduces it only to rounding
      (~1 ulp), so load() restores rotate_raw and recomputes R with the same code, which
      gives bitwise-identical outputs and bitwise-identical training after a resume.
      load() checks that R and rotate_raw agree (to 64 ulps) and rejects the file if not.
    * direft: ``layers.{i}.W1`` (r, d), ``layers.{i}.W2`` (r, d), ``layers.{i}.b`` (r,)
      (Phi(h) = h + W2^T (W1 h + b)).

``optimizer.pt`` (only with ``save(..., optimizer=opt)``)
    ``optimizer.state_dict()`` (FSDP2 shards gathered into full tensors) written with
    torch.save; read back with ``torch.load(weights_only=True)`` by :func:`load_optimizer`.

Every failure to read or to fit a checkpoint raises :class:`CheckpointError` (a ValueError)
before the model is changed. Distributed runs: see :func:`save` (DDP, FSDP2).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .model.layers import find_layers, hidden_size as _hidden_size
from .model.patch import interventions, is_patched, patch, patch_config, unpatch
from .model.positions import parse_positions
from .modules import DiReFT, LoReFT, orthonormal_rows

__all__ = ["save", "load", "load_optimizer", "load_pyreft", "read_config", "CheckpointError",
           "ReftCheckpointCallback", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME",
           "OPTIMIZER_NAME"]

FORMAT = "reft_ext"
FORMAT_VERSION = 1
CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
OPTIMIZER_NAME = "optimizer.pt"

# intervention kind -> (class, {file name: parameter name}); loreft adds the derived "R".
_KINDS = {
    "loreft": (LoReFT, {"rotate_raw": "rotate_raw", "W": "weight", "b": "bias"}),
    "direft": (DiReFT, {"W1": "weight", "W2": "proj", "b": "bias"}),
}
_DERIVED = {"loreft": ("R",), "direft": ()}
_FLOAT_DTYPES = {str(t).removeprefix("torch."): t for t in
                 (torch.float64, torch.float32, torch.bfloat16, torch.float16)}


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model. Nothing was changed."""


# ------------------------------------------------------------------ helpers

def _dtype_name(t: torch.dtype) -> str:
    return str(t).removeprefix("torch.")


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, detached (FSDP2 DTensor: all-gathered, collective)."""
    t = p.full_tensor() if _is_dtensor(p) else p
    return t.detach()


def _rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def _materialised_R(raw: torch.Tensor) -> torch.Tensor:
    """R = orthonormal_rows(raw), as LoReFT.R computes it. Half-precision QR is not
    implemented by torch's linalg: then QR in float32 and round to raw's dtype."""
    if raw.dtype in (torch.bfloat16, torch.float16):
        return orthonormal_rows(raw.float()).to(raw.dtype)
    return orthonormal_rows(raw)


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "DeepSpeedEngine",
             "FullyShardedDataParallel")    # classes whose .module / ._orig_mod is the model


def _unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the patched module, found by following ``.module`` / ``._orig_mod`` through DDP,
    DataParallel, torch.compile, accelerate or DeepSpeed wrappers; whether ``model`` is
    such a wrapper). Returns (model, is wrapper) when nothing inside is patched."""
    m = model
    for _ in range(8):
        if is_patched(m):
            return m, m is not model
        inner = next((c for c in (getattr(m, a, None) for a in ("module", "_orig_mod"))
                      if isinstance(c, nn.Module)), None)
        if inner is None:
            break
        m = inner
    return model, type(model).__name__ in _WRAPPERS


def _kind_of(mods: dict[int, nn.Module]) -> str:
    kinds = set()
    for i, m in mods.items():
        for kind, (cls, _) in _KINDS.items():
            if type(m) is cls:
                kinds.add(kind)
                break
        else:
            raise CheckpointError(
                f"reft_ext.save: layer {i} holds a {type(m).__name__}; checkpoints support "
                f"the built-in interventions {sorted(_KINDS)} (save a custom intervention's "
                f"state_dict yourself)")
    if len(kinds) != 1:
        raise CheckpointError(f"reft_ext.save: mixed intervention types {sorted(kinds)}")
    return kinds.pop()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _check_target(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"reft_ext.save: {path} exists and is not a directory")
        entries = list(path.iterdir())
        if entries and not (path / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"reft_ext.save: {path} exists, is not empty and is not a reft_ext "
                f"checkpoint (no {CONFIG_NAME}); refusing to replace it")


def _replace_dir(tmp: Path, path: Path) -> None:
    """Moves the finished directory tmp to path; an old checkpoint at path is replaced
    (renamed aside first, restored if the final rename fails, then deleted)."""
    if not path.exists():
        os.rename(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------ save

def save(model: nn.Module, path: str | os.PathLike, *, optimizer=None) -> Path:
    """Writes the interventions of a patched model to the directory ``path``.

    Args:
        model: a model patched by reft_ext.patch (or a DDP / DataParallel / torch.compile /
            accelerate wrapper around one, or an FSDP2 ``fully_shard`` model).
        path: directory to create. An existing reft_ext checkpoint (or an empty directory)
            there is replaced; any other existing path is refused.
        optimizer: if given, its ``state_dict()`` is saved too (``optimizer.pt``), for
            :func:`load_optimizer`; FSDP2-sharded state tensors are gathered into full
            tensors, so the file does not depend on the number of processes.

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
    target, _ = _unwrap(model)
    if not is_patched(target):
        raise CheckpointError("reft_ext.save: model is not patched by reft_ext.patch")
    pc = patch_config(target)
    mods = interventions(target)
    kind = _kind_of(mods)
    names = _KINDS[kind][1]
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, m in mods.items():
            full = {fname: _full(getattr(m, pname)) for fname, pname in names.items()}
            if kind == "loreft":
                full["R"] = _materialised_R(full["rotate_raw"])
            for fname in (*_DERIVED[kind], *names):
                tensors[f"layers.{i}.{fname}"] = full[fname].cpu()
    opt_state = None
    if optimizer is not None:          # FSDP2: gather the sharded state (collective)
        opt_state = optimizer.state_dict()
        opt_state["state"] = {
            k: ({n: _full(v).cpu() if isinstance(v, torch.Tensor) else v for n, v in st.items()}
                if isinstance(st, dict) else st)
            for k, st in opt_state["state"].items()}
    if _rank() != 0:
        return path

    from safetensors.torch import save as st_save
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    blob = st_save(tensors, metadata={"format": "pt", "reft_ext_format": str(FORMAT_VERSION)})
    first = next(iter(mods.values()))
    dtypes = {_dtype_name(p.dtype) for m in mods.values() for p in m.parameters()}
    from . import __version__
    cfg: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "intervention": kind,
        "d": int(first.d),
        "rank": int(first.rank),
        "layers": pc["layers"],
        "layer_path": pc["layer_path"],
        "n_layers": pc["n_layers"],
        "positions": pc["positions"],
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

    path.parent.mkdir(parents=True, exist_ok=True)
    _check_target(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes it 0700; a plain mkdir would not
        _write_file(tmp / WEIGHTS_NAME, blob)
        if opt_state is not None:
            with open(tmp / OPTIMIZER_NAME, "wb") as f:
                torch.save(opt_state, f)
                f.flush()
                os.fsync(f.fileno())
        _write_file(tmp / CONFIG_NAME, (json.dumps(cfg, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


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
    if kind not in _KINDS:
        raise CheckpointError(f"reft_ext.load: {path}: unknown intervention {kind!r}; this "
                              f"reft_ext knows {sorted(_KINDS)}")
    d = _need(cfg, "d", int, cpath.name)
    r = _need(cfg, "rank", int, cpath.name)
    layers = _need(cfg, "layers", list, cpath.name)
    n_layers = _need(cfg, "n_layers", int, cpath.name)
    _need(cfg, "layer_path", str, cpath.name)
    spec = _need(cfg, "positions", str, cpath.name)
    dropout = _need(cfg, "dropout", (int, float), cpath.name)
    backend = _need(cfg, "backend", str, cpath.name)
    try:
        parse_positions(spec)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"reft_ext.load: {cpath}: {e}") from None
    if not 0.0 <= dropout < 1.0 or backend not in ("fused", "reference"):
        raise CheckpointError(f"reft_ext.load: {cpath}: invalid dropout {dropout!r} or "
                              f"backend {backend!r}")
    manifest = _need(cfg, "tensors", dict, cpath.name)
    if not (1 <= r <= d) or not layers or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers
            for i in layers) or len(set(layers)) != len(layers):
        raise CheckpointError(f"reft_ext.load: {cpath}: inconsistent d={d}, rank={r}, "
                              f"layers={layers}, n_layers={n_layers}")
    shapes = {"R": [r, d], "W": [r, d], "rotate_raw": [r, d], "W1": [r, d], "W2": [r, d],
              "b": [r]}
    want = {f"layers.{i}.{n}" for i in layers for n in (*_KINDS[kind][1], *_DERIVED[kind])}
    if set(manifest) != want:
        raise CheckpointError(
            f"reft_ext.load: {cpath}: tensor manifest does not match a {kind} checkpoint of "
            f"layers {layers}: missing {sorted(want - set(manifest))}, extra "
            f"{sorted(set(manifest) - want)}")
    for name, meta in manifest.items():
        short = name.rsplit(".", 1)[1]
        if (not isinstance(meta, dict) or meta.get("dtype") not in _FLOAT_DTYPES
                or meta.get("shape") != shapes[short]):
            raise CheckpointError(f"reft_ext.load: {cpath}: bad manifest entry for {name}: "
                                  f"{meta!r} (expected a float dtype and shape {shapes[short]})")
    return cfg


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
    if cfg["intervention"] == "loreft":
        for i in cfg["layers"]:
            R, raw = tensors[f"layers.{i}.R"], tensors[f"layers.{i}.rotate_raw"]
            tol = 64 * torch.finfo(R.dtype).eps
            try:
                err = (_materialised_R(raw).float() - R.float()).abs().max().item()
            except RuntimeError as e:   # rank-deficient raw, ...
                raise CheckpointError(f"reft_ext.load: {wpath}: layers.{i}.rotate_raw cannot "
                                      f"be orthonormalised ({e})") from None
            if not err <= tol:
                raise CheckpointError(
                    f"reft_ext.load: {wpath}: layers.{i}.R and layers.{i}.rotate_raw disagree "
                    f"(max |orthonormal_rows(rotate_raw) - R| = {err:.3g} > {tol:.3g})")
    return tensors


# ------------------------------------------------------------------ load

@contextlib.contextmanager
def _rng_untouched(model: nn.Module):
    """patch() draws the random init from torch's global generators; load() overwrites it,
    so keep the caller's RNG state as it was (training after load stays reproducible)."""
    devs = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devs):
        yield


def _check_patched_layout(target: nn.Module, cfg: dict, where: str) -> dict[int, nn.Module]:
    pc = patch_config(target)
    mods = interventions(target)
    kind = cfg["intervention"]
    cls = _KINDS[kind][0]
    problems = []
    if pc["layers"] != cfg["layers"]:
        problems.append(f"layers {pc['layers']} vs {cfg['layers']} in the checkpoint")
    if pc["n_layers"] != cfg["n_layers"]:
        problems.append(f"{pc['n_layers']} layers in the model vs {cfg['n_layers']}")
    for i, m in mods.items():
        if type(m) is not cls:
            problems.append(f"layer {i} holds a {type(m).__name__}, the checkpoint a "
                            f"{cls.__name__}")
            break
        if (m.d, m.rank) != (cfg["d"], cfg["rank"]):
            problems.append(f"layer {i} has d={m.d}, rank={m.rank} vs d={cfg['d']}, "
                            f"rank={cfg['rank']}")
            break
    if problems:
        raise CheckpointError(f"reft_ext.load: {where} does not fit the patched model: "
                              + "; ".join(problems))
    return mods


def _staged(mods, cfg, tensors, where: str, cast: torch.dtype | None) -> list:
    """[(module, parameter name, value on the parameter's device)] — everything converted
    before the first write, so a failure cannot leave the model half loaded."""
    out = []
    for i, m in mods.items():
        for fname, pname in _KINDS[cfg["intervention"]][1].items():
            p = getattr(m, pname)
            t = tensors[f"layers.{i}.{fname}"]
            if cast is not None:
                t = t.to(cast)
            if t.dtype != p.dtype:
                raise CheckpointError(
                    f"reft_ext.load: {where}: layers.{i}.{fname} is {_dtype_name(t.dtype)} but "
                    f"the patched model's parameter is {_dtype_name(p.dtype)}; pass dtype= "
                    f"to convert, or load into an unpatched model")
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor
                t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements,
                                      src_data_rank=None)      # every rank read the file
            else:
                t = t.to(p.device, copy=True)
            out.append((m, pname, t))
    return out


def _patch_and_fill(model: nn.Module, values: dict[int, dict[str, torch.Tensor]], *,
                    rank: int, kind: str, dtypes: dict[int, dict[str, torch.dtype]],
                    **patch_kw) -> None:
    """patch(model, layers, rank, ...) and set every intervention parameter from
    values {layer: {parameter name: tensor}} in dtypes {layer: {parameter name: dtype}}.
    Leaves torch's RNG state as it was; on any failure the model is unpatched again."""
    layers = list(values)
    pdtype = dtypes[layers[0]]["weight"]
    if kind == "loreft" and pdtype in (torch.bfloat16, torch.float16):
        # LoReFT's init runs a QR, which torch has no half-precision kernel for: build the
        # modules in float32; the parameters are replaced in their dtype below.
        pdtype = torch.float32
    with _rng_untouched(model):
        patch(model, layers, rank, intervention=kind, dtype=pdtype, **patch_kw)
    try:
        mods = interventions(model)
        with torch.no_grad():
            for i, m in mods.items():
                for pname, t in values[i].items():
                    p = getattr(m, pname)
                    want = dtypes[i][pname]
                    if p.dtype != want:
                        p = nn.Parameter(torch.empty_like(p, dtype=want),
                                         requires_grad=p.requires_grad)
                        setattr(m, pname, p)
                    p.copy_(t.to(want).contiguous())
    except BaseException:
        unpatch(model)
        raise


def load(model: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
         positions: str | None = None, backend: str | None = None,
         dropout: float | None = None, layer_path: str | None = None) -> nn.Module:
    """Loads a checkpoint written by :func:`save` into ``model``; returns ``model``.

    * Unpatched model: patches it exactly as the checkpoint records (layers, rank,
      intervention, positions spec, dropout, backend, parameter dtypes) and sets the
      parameters: outputs are bitwise identical to the saved model's (same device and
      kernels). Torch's global RNG state is left as it was.
    * Patched model with the same layout (layers, layer container length, intervention,
      d, rank, parameter dtypes): the values are copied into the existing parameters in
      place, so an optimizer already built on them stays valid (this is what the Trainer
      callback does on resume). The model's own positions spec, dropout and backend are
      kept. Also works on DDP-wrapped and FSDP2 (``fully_shard``) models: call it on every
      rank; each rank reads the file and keeps its shard.

    Args:
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
    target, wrapped = _unwrap(model)
    if is_patched(target):
        if any(v is not None for v in (positions, backend, dropout, layer_path)):
            raise CheckpointError("reft_ext.load: positions / backend / dropout / layer_path "
                                  "overrides apply to an unpatched model only")
        mods = _check_patched_layout(target, cfg, where)
        staged = _staged(mods, cfg, tensors, where, dtype)
        with torch.no_grad():
            for m, pname, t in staged:
                getattr(m, pname).copy_(t)
        return model
    if wrapped:
        raise CheckpointError(
            f"reft_ext.load: {type(model).__name__} wraps an unpatched model; load (or "
            f"patch) before wrapping it with DDP / FSDP / torch.compile")

    lpath = layer_path if layer_path is not None else cfg["layer_path"]
    try:
        lpath, container = find_layers(model, lpath)
    except ValueError as e:
        raise CheckpointError(f"reft_ext.load: {where} was saved from a model with layers at "
                              f"{cfg['layer_path']!r}: {e}") from None
    if len(container) != cfg["n_layers"]:
        raise CheckpointError(f"reft_ext.load: {where} was saved from a model with "
                              f"{cfg['n_layers']} layers at {cfg['layer_path']!r}; this model "
                              f"has {len(container)}")
    block = list(container.children())[cfg["layers"][0]]
    try:
        d_model = _hidden_size(model, block)
    except ValueError:
        d_model = None                  # cannot infer: the kernel checks d on first use
    if d_model is not None and d_model != cfg["d"]:
        raise CheckpointError(f"reft_ext.load: {where} has d={cfg['d']} but this model's "
                              f"hidden size is {d_model}")
    kind = cfg["intervention"]
    names = _KINDS[kind][1]
    values = {i: {pname: tensors[f"layers.{i}.{fname}"] for fname, pname in names.items()}
              for i in cfg["layers"]}
    dtypes = {i: {pname: dtype if dtype is not None else t.dtype for pname, t in v.items()}
              for i, v in values.items()}
    _patch_and_fill(model, values, rank=cfg["rank"], kind=kind, dtypes=dtypes,
                    positions=positions if positions is not None else cfg["positions"],
                    layer_path=lpath, hidden_size=cfg["d"],
                    dropout=cfg["dropout"] if dropout is None else dropout,
                    backend=backend if backend is not None else cfg["backend"])
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
        if p is not None and _is_dtensor(p) and isinstance(st, dict):
            from torch.distributed.tensor import distribute_tensor
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() > 0:
                    st[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                              src_data_rank=None)
    optimizer.load_state_dict(sd)


# ------------------------------------------------------------------ pyreft import

# pyvene RepresentationConfig field order (positional lists in config.json):
# 0 layer, 1 component, 2 unit, 3 max_number_of_units, 4 low_rank_dimension,
# 5 intervention_type, 6 intervention, 7 subspace_partition, 8 group_key,
# 9 intervention_link_key, 10 moe_key, 11 source_representation,
# 12 hidden_source_representation, 13 latent_dim (older pyvene: 12 or 13 items).
_REPR_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension")

# pyreft class name -> reft_ext intervention kind
_PYREFT_TYPES = {
    "LoreftIntervention": "loreft",                                   # h + R^T(Wh + b - Rh)
    "ConditionedSourceLowRankRotatedSpaceIntervention": "loreft",     # its early name
    "NodireftIntervention": "direft",                                 # h + W2^T(W1h + b)
    "DireftIntervention": "direft",                                   # h + R^T(Wh + b)
}
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
    """Maps one pyreft intervention state_dict to reft_ext names: loreft {"R^T", "W", "b"},
    direft {"W1", "W2", "b"}."""
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
    if kind == "loreft":
        out = {"RT": rotate(), "W": take("weight", "learned_source.weight"),
               "b": take("bias", "learned_source.bias")}
    elif cls_name == "NodireftIntervention":
        out = {"W1": take("learned_source.weight", "weight"),
               "b": take("learned_source.bias", "bias"), "W2": take("proj_layer.weight")}
        used.add("proj_layer.bias")                    # add_bias=True: unused by forward
    else:                                              # DireftIntervention: W2 = R
        out = {"W1": take("learned_source.weight", "weight"),
               "b": take("learned_source.bias", "bias"), "W2": rotate().T}
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


def load_pyreft(model: nn.Module, path: str | os.PathLike, *, positions: str,
                dtype: torch.dtype | None = None, layer_path: str | None = None,
                backend: str = "fused") -> nn.Module:
    """Patches an unpatched ``model`` with the interventions of a pyreft / pyvene save.

    Reads pyvene's ``config.json`` (``representations`` as positional lists: layer,
    component, unit, max_number_of_units, low_rank_dimension, ...; ``intervention_types``;
    ``sorted_keys``) and one ``intkey_<key>.bin`` per intervention, with keys written
    ``layer_15_comp_block_output_unit_pos_nunit_1#0`` (pyvene >= 0.1.7) or
    ``layer.15.comp.block_output.unit.pos.nunit.1#0`` (older), loaded with
    ``torch.load(weights_only=True)``.

    Supported: LoreftIntervention (and its old name
    ConditionedSourceLowRankRotatedSpaceIntervention) -> "loreft"; NodireftIntervention
    (h + W2^T(W1 h + b)) and DireftIntervention (h + R^T(W h + b)) -> "direft". One
    intervention per layer, component "block_output" (or "<path>[i].output"), unit "pos",
    act_fn linear (pyreft's default; it is not recorded in the save). Anything else raises
    CheckpointError naming it.

    Exactness: pyreft's ``rotate_layer`` is R^T (d, r); it is imported as ``rotate_raw =
    R``, unchanged. reft_ext's forward uses R' = orthonormal_rows(rotate_raw), a sign-fixed
    QR, which maps a matrix with orthonormal rows to itself; pyreft's R is orthonormal only
    to float32 rounding, so R' = R + E with max|E| <~ max|R R^T - I| + a few eps32
    (measured: <= 1.5 eps32 = 1.8e-7 for d <= 4096, r <= 32; tests assert
    <= max|R R^T - I| + 4 eps32). The imported edit therefore equals pyreft's formula to
    float32 rounding (tests: within 2x PyTorch's own float32 error + 4 ulps, the suite's
    rule), far below a bf16 model's resolution. Using pyreft's R bit for bit would need an
    intervention option that skips the QR (and then R drifts off orthonormality in
    training); not worth it at this error. A reft_ext save of the imported model reloads
    bitwise.

    Args:
        positions: the positions spec the pyreft model was trained with (e.g. "f7+l7");
            pyreft does not record it.
        dtype: parameter dtype; default float32 (float64 if the files hold float64): pyreft's
            bf16 W, b with fp32 R become float32 exactly.
        layer_path: path of the decoder-layer container, if discovery needs help.

    Returns:
        ``model``, patched.
    """
    path = Path(path)
    cpath = path / "config.json"
    target, wrapped = _unwrap(model)
    if is_patched(target):
        raise CheckpointError("reft_ext.load_pyreft: model is already patched; unpatch first")
    if wrapped:
        raise CheckpointError(f"reft_ext.load_pyreft: {type(model).__name__} wraps the model; "
                              f"import before wrapping it with DDP / FSDP / torch.compile")
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
    kind = kinds.pop()

    entries, paths = _pyreft_entries(reprs, cpath)
    if len(paths) > 1:
        raise CheckpointError(f"reft_ext.load_pyreft: components name several layer "
                              f"containers {sorted(paths)}")
    lpath = layer_path if layer_path is not None else (paths.pop() if paths else None)
    layers = [e[0] for e in entries]
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise CheckpointError(
            f"reft_ext.load_pyreft: several interventions on layer(s) {dup} (e.g. positions "
            f"split by share_weights=False); reft_ext has one intervention per layer")
    ranks = {e[1] for e in entries}
    if len(ranks) != 1:
        raise CheckpointError(f"reft_ext.load_pyreft: different ranks per layer {sorted(ranks)}")
    rank = ranks.pop()
    sorted_keys = cfg.get("sorted_keys")

    values = {}                      # layer -> mapped tensors
    for (layer, _, keys), cls_name in zip(entries, classes):
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
        values[layer] = _pyreft_tensors(cls_name, sd, file)

    # shapes, d, orthonormality; then convert
    d = None
    for layer, v in values.items():
        if kind == "loreft":
            RT = v["RT"]
            if RT.dim() != 2 or RT.shape[1] != rank:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: rotate_layer has "
                                      f"shape {tuple(RT.shape)}, expected (d, {rank})")
            dd = RT.shape[0]
        else:
            dd = v["W1"].shape[-1]
        d = dd if d is None else d
        want = {"RT": (d, rank), "W": (rank, d), "W1": (rank, d), "W2": (rank, d), "b": (rank,)}
        for k, t in v.items():
            if tuple(t.shape) != want[k]:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: {k} has shape "
                                      f"{tuple(t.shape)}, expected {want[k]} (d={d}, "
                                      f"rank={rank})")
        R = v["RT"] if kind == "loreft" else (v["W2"].T if classes[0] == "DireftIntervention"
                                              else None)
        if R is not None:
            R64 = R.double()
            err = (R64.T @ R64 - torch.eye(rank, dtype=torch.float64)).abs().max().item()
            if err > 1e-3:
                raise CheckpointError(f"reft_ext.load_pyreft: layer {layer}: rotate_layer "
                                      f"columns are not orthonormal (max |R R^T - I| = "
                                      f"{err:.3g})")
    dims = cfg.get("intervention_dimensions")
    if isinstance(dims, list) and any(isinstance(x, int) and x != d for x in dims):
        raise CheckpointError(f"reft_ext.load_pyreft: intervention_dimensions {dims} do not "
                              f"match the tensors (d={d})")
    if dtype is None:     # float32 holds bf16 / fp16 values exactly
        dtype = torch.float64 if any(t.dtype == torch.float64 for v in values.values()
                                     for t in v.values()) else torch.float32
    try:
        lpath_found, container = find_layers(model, lpath)
    except ValueError as e:
        raise CheckpointError(f"reft_ext.load_pyreft: {e}") from None
    if any(not 0 <= i < len(container) for i in layers):
        raise CheckpointError(f"reft_ext.load_pyreft: layers {layers} out of range for the "
                              f"{len(container)} layers at {lpath_found!r}")
    try:
        d_model = _hidden_size(model, list(container.children())[layers[0]])
    except ValueError:
        d_model = None
    if d_model is not None and d_model != d:
        raise CheckpointError(f"reft_ext.load_pyreft: {path} has d={d} but this model's "
                              f"hidden size is {d_model}")
    if kind == "loreft":
        src = {i: {"rotate_raw": v["RT"].T, "weight": v["W"], "bias": v["b"]}
               for i, v in values.items()}
    else:
        src = {i: {"weight": v["W1"], "proj": v["W2"], "bias": v["b"]} for i, v in values.items()}
    _patch_and_fill(model, src, rank=rank, kind=kind,
                    dtypes={i: {k: dtype for k in v} for i, v in src.items()},
                    positions=positions, layer_path=lpath_found, hidden_size=d, backend=backend)
    return model


# ------------------------------------------------------------------ Trainer callback

_CALLBACK_DOC = """Hugging Face Trainer callback: a reft_ext checkpoint in every Trainer
checkpoint, reloaded on resume.

    trainer = transformers.Trainer(model=patched_model, args=args, ...,
                                   callbacks=[reft_ext.ReftCheckpointCallback()])
    trainer.train()                               # writes <output_dir>/checkpoint-N/reft/
    trainer.train(resume_from_checkpoint=True)    # resumes; the callback reloads reft/

* on_save: ``reft_ext.save(model, <output_dir>/checkpoint-<global_step>/<subdir>)`` (every
  rank calls it: FSDP2 gathers, rank 0 writes).
* on_train_begin of a resumed run (global_step > 0 after the Trainer restored its state,
  optimizer and scheduler): ``reft_ext.load`` of ``<resume_from or
  output_dir/checkpoint-<global_step>>/<subdir>`` into the patched model, in place (the
  optimizer keeps its parameters). Pass ``resume_from=`` when resuming from a checkpoint
  outside ``output_dir``. Patch the model, with the same layout, before building the
  Trainer.

Each ``checkpoint-N/<subdir>`` is also a standalone checkpoint: ``reft_ext.load(base_model,
".../checkpoint-N/reft")``.
"""


def _make_callback_class():
    from transformers import TrainerCallback

    class ReftCheckpointCallback(TrainerCallback):
        __doc__ = _CALLBACK_DOC

        def __init__(self, subdir: str = "reft", resume_from: str | os.PathLike | None = None):
            self.subdir = subdir
            self.resume_from = resume_from
            self.loaded_from: Path | None = None

        def on_save(self, args, state, control, model=None, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save(model, ckpt / self.subdir)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if self.resume_from is None and not state.global_step:
                return
            ckpt = (Path(self.resume_from) if self.resume_from is not None
                    else Path(args.output_dir) / f"checkpoint-{state.global_step}")
            src = ckpt / self.subdir
            if not (src / CONFIG_NAME).is_file():
                raise CheckpointError(f"reft_ext.ReftCheckpointCallback: resuming at step "
                                      f"{state.global_step} but {src} has no reft_ext "
                                      f"checkpoint; pass resume_from=")
            load(model, src)
            self.loaded_from = src

    ReftCheckpointCallback.__module__ = __name__
    ReftCheckpointCallback.__qualname__ = "ReftCheckpointCallback"
    return ReftCheckpointCallback


def __getattr__(name: str):
    if name == "ReftCheckpointCallback":       # built lazily: importing transformers is slow
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
