"""All adapters of a model in one directory: save_adapters / load_adapters.

    reft_ext.save_adapters(model, "out/adapters")     # out/adapters/<name>/ per adapter
    reft_ext.load_adapters(model, "out/adapters")     # adds (or fills) each of them

The directory holds ``reft_adapters.json`` ({"format": "reft_ext_adapters",
"format_version": 1, "adapters": [names in creation order], "default": name}) and one
subdirectory per adapter, each an ordinary checkpoint of :func:`reft_ext.save` (readable
on its own by :func:`reft_ext.load`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..model.patch import (adapters, delete_adapter, is_patched, set_adapter, unpatch,
                           valid_adapter_name)
from . import _atomic, _dist
from ._errors import CheckpointError
from .format import check_target, checkpoint_files, load, read_config

INDEX_NAME = "reft_adapters.json"
INDEX_FORMAT = "reft_ext_adapters"


def save_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Writes every adapter of a patched ``model`` to the directory ``path``, atomically
    (all of them or nothing; an existing save_adapters directory there is replaced, any
    other non-empty path refused). Distributed runs: as :func:`reft_ext.save` (call on
    every rank; rank 0 writes).

    Returns:
        Path of the directory.
    """
    path = Path(path)
    target, _ = _dist.unwrap(model)
    if not is_patched(target):
        raise CheckpointError("reft_ext.save_adapters: model is not patched by reft_ext.patch")
    configs = adapters(target)
    files: dict[str, bytes] = {}
    for name in configs:
        one = checkpoint_files(target, name)
        if one is None:       # not rank 0: the collectives ran, nothing to write
            return path
        files.update({f"{name}/{fn}": data for fn, data in one.items()})
    index = {"format": INDEX_FORMAT, "format_version": 1, "adapters": list(configs),
             "default": next(a for a, c in configs.items() if c["default"])}
    files[INDEX_NAME] = (json.dumps(index, indent=2) + "\n").encode()
    check_target(path, f"reft_ext.save_adapters: {path}", INDEX_NAME)
    _atomic.write_dir(path, files)
    return path


def read_index(path: str | os.PathLike) -> dict:
    """The checked index of a save_adapters directory (CheckpointError if it is not one)."""
    path = Path(path)
    try:
        index = json.loads((path / INDEX_NAME).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"reft_ext.load_adapters: {path} has no {INDEX_NAME}: not a "
                              f"directory written by reft_ext.save_adapters") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"reft_ext.load_adapters: cannot read {path / INDEX_NAME}: "
                              f"{e}") from None
    names = index.get("adapters") if isinstance(index, dict) else None
    valid = (isinstance(index, dict) and index.get("format") == INDEX_FORMAT
             and isinstance(names, list) and names and len(set(map(str, names))) == len(names)
             and all(isinstance(n, str) and valid_adapter_name(n) for n in names)
             and index.get("default") in names)
    if not valid:
        raise CheckpointError(f"reft_ext.load_adapters: {path / INDEX_NAME} is not a valid "
                              f"adapters index")
    if index.get("format_version") != 1:
        raise CheckpointError(f"reft_ext.load_adapters: {path / INDEX_NAME} has format "
                              f"version {index.get('format_version')!r}; this reft_ext reads "
                              f"1 (upgrade reft_ext)")
    return index


def load_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads every adapter of a :func:`save_adapters` directory into ``model`` under its
    saved name, each as :func:`reft_ext.load` with ``adapter=name`` does (an unpatched
    model is patched; a new name is added; an existing one is filled in place). On an
    unpatched model the saved default adapter becomes the default.

    All or nothing: every checkpoint is read and checked first; if one still fails to fit
    while loading, the adapters added so far are removed again (an unpatched model is
    unpatched) and the error raised. Adapters filled in place before the failure keep
    their new values.
    """
    path = Path(path)
    index = read_index(path)
    for name in index["adapters"]:
        read_config(path / name)          # every file readable before any change
    target, _ = _dist.unwrap(model)
    was_patched = is_patched(target)
    before = set(adapters(target)) if was_patched else set()
    try:
        for name in index["adapters"]:
            load(model, path / name, adapter=name)
    except BaseException:
        if is_patched(target):
            added = [a for a in adapters(target) if a not in before]
            if not was_patched:
                unpatch(target)
            else:
                for a in added:
                    delete_adapter(target, a)
        raise
    if not was_patched:
        set_adapter(target, index["default"])
    return model
