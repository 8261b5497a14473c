"""Checkpoints meet distributed training here: wrappers around the patched model (DDP,
DataParallel, torch.compile, accelerate, DeepSpeed), FSDP2's sharded DTensor parameters,
and which rank writes."""
from __future__ import annotations

import torch
from torch import nn

from ..model.patch import is_patched

_WRAPPERS = ("DistributedDataParallel", "DataParallel", "OptimizedModule", "DeepSpeedEngine",
             "FullyShardedDataParallel")    # classes whose .module / ._orig_mod is the model


def is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, detached (FSDP2 DTensor: all-gathered, collective)."""
    t = p.full_tensor() if is_dtensor(p) else p
    return t.detach()


def shard_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's shard, laid out as DTensor p, of the full tensor t (every rank holds t:
    each read the checkpoint, so nothing is sent)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def rank() -> int:
    d = torch.distributed
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
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
