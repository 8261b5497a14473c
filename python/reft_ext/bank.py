"""Several interventions at one layer, applied by one fused call: the module behind untied
interventions (``patch(..., tied=False)``).

``Untied([m0, m1])`` follows the intervention call contract of reft_ext.modules with
positions grouped per member:

    module(h, positions, inplace=True) -> Tensor
    h:         (B, T, d)
    positions: (B, N, P) int64: group k lists the tokens member k edits (-1: empty slot);
               a token may appear at most once in a row, across all groups

Members that expose ``kernel_params() -> (R, W, b)`` (every built-in type, see
reft_ext.modules) are stacked into a bank R, W (N, r, d), b (N, r) and run as one call of
the op with an index (B, N * P) that maps group k's slots to entry k: one pass over the
edited rows instead of one per member. Gradients reach each member's own parameters
through the stacking. When a member has no kernel_params, or a member's dropout is active,
the members run one after the other, each on its own group (the same result: the groups
never share a token).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as mm

from .modules import _Intervention
from .ops import loreft, loreft_

__all__ = ["Untied", "fusable", "has_hooks", "owned", "bank_call"]


def fusable(module: nn.Module) -> bool:
    """True if ``module`` can be one entry of a bank, i.e. calling it is exactly the op on
    its ``kernel_params()``: a built-in type's forward (not overridden by a subclass), the
    fused backend, dropout not active (it runs a pure-PyTorch path of its own), and no
    hooks that a call would run (on the module or global): otherwise it is called."""
    return (hasattr(module, "kernel_params")
            and getattr(type(module), "forward", None) is _Intervention.forward
            and getattr(module, "backend", "fused") == "fused"
            and not (module.training and getattr(module, "dropout", 0.0) > 0)
            and not has_hooks(module))


def has_hooks(module: nn.Module) -> bool:
    """True if calling ``module`` would run forward or backward hooks besides forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or mm._global_forward_hooks
                or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or mm._global_backward_pre_hooks)


def owned(out: torch.Tensor, h: torch.Tensor) -> bool:
    """True if ``out``, a result of editing ``h`` out of place, may take further edits in
    place: it is a new tensor, and no torch.func transform is active (there only the
    out-of-place op works)."""
    return out is not h and not torch._C._are_functorch_transforms_active()


def bank_call(h: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, members,
              inplace: bool) -> torch.Tensor:
    """One fused call of the op over the stacked ``kernel_params()`` of ``members`` (entry k
    = members[k]): positions, index (B, P); gradients reach each member's parameters
    through the stacking."""
    R, W, b = (torch.stack(ts) for ts in zip(*(m.kernel_params() for m in members)))
    return (loreft_ if inplace else loreft)(h, positions, R, W, b, index=index)


class Untied(nn.Module):
    """N interventions at one layer, member k editing positions[:, k].

    Args:
        members: the N >= 1 intervention modules, in group order (pyreft's untied layer:
            #0 first-p tokens, #1 last-s tokens). All of one hidden size d and rank.

    ``d``, ``rank``, ``dropout``, ``backend`` are the members' (read by reft_ext.save).
    """

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("reft_ext.Untied: needs at least one member intervention")
        self.members = nn.ModuleList(members)
        first = members[0]
        self.d, self.rank = getattr(first, "d", None), getattr(first, "rank", None)
        self.dropout = getattr(first, "dropout", 0.0)
        self.backend = getattr(first, "backend", "fused")

    def __len__(self) -> int:
        return len(self.members)

    def _fused(self) -> bool:
        return all(fusable(m) for m in self.members)

    def forward(self, h: torch.Tensor, positions: torch.Tensor,
                inplace: bool = True) -> torch.Tensor:
        """h: (B, T, d); positions: (B, N, P) (see the module docstring)."""
        N = len(self.members)
        if positions.dim() != 3 or positions.shape[1] != N:
            raise ValueError(
                f"reft_ext: an untied layer of {N} interventions needs positions of shape "
                f"(B, {N}, P), one group per intervention, got {tuple(positions.shape)}")
        B, _, P = positions.shape
        if not self._fused():
            out = h
            for k, m in enumerate(self.members):
                out = m(out, positions[:, k], inplace=inplace or owned(out, h))
            return out
        index = _group_index(B, N, P, positions.device)
        return bank_call(h, positions.reshape(B, N * P), index, self.members, inplace)

    def extra_repr(self) -> str:
        return f"members={len(self.members)}"


def _group_index(B: int, N: int, P: int, device) -> torch.Tensor:
    """(B, N * P) int32: slot j of each row belongs to group j // P."""
    return torch.arange(N, dtype=torch.int32, device=device).repeat_interleave(P).expand(B, -1)
