"""Mixed-adapter batches: each row of one forward edited by its own named adapter.

A forward called with ``reft_adapter=[name or None per row]`` gets a :class:`Mixed` plan:
for every adapter a of the batch, its positions as the layers take them ((B, P) tied,
(B, N, P) untied) with every row that does not use a set to -1. At a layer, the adapters
of the batch that have an intervention there are applied to the same hidden states:

* each adapter whose intervention can be a bank entry (reft_ext.bank.fusable) joins a
  group of the same rank, parameter dtype and device; a group of several adapters is one
  fused call of the op with an index (an untied adapter contributes its N members as N
  entries), so one pass over the edited rows serves the whole batch;
* a group of one adapter, or an intervention that cannot be an entry (custom module,
  active dropout, reference backend), is called as in a single-adapter forward with its
  own positions.

The adapters' rows are disjoint, so the order of these calls does not matter, and each
row's edit is the one its adapter alone gives (the op computes a row from its own slots
only: a bank row is bitwise the plain op's row with that entry).
"""
from __future__ import annotations

import torch
from torch import nn

from ..bank import Untied, bank_call, fusable, has_hooks, owned
from .positions import positions_from_mask


class Mixed:
    """The per-row adapters of one forward and the positions each adapter edits.

    rows: one adapter name or None (no edit) per row, in batch order.
    pos: {adapter: its positions at full batch size, -1 on the rows of other adapters}.
    """

    def __init__(self, rows, pos: dict[str, torch.Tensor]):
        self.rows = tuple(rows)
        self.pos = pos
        self._moved: dict = {}    # device -> {adapter: positions there}
        self._flat: dict = {}     # (device, adapters) -> (positions, index) of a bank call

    @property
    def names(self) -> list[str]:
        return list(self.pos)

    @classmethod
    def from_explicit(cls, rows, positions: torch.Tensor) -> "Mixed":
        """positions: (B, P) or (B, N, P) for every row; each adapter keeps its own rows."""
        _check_batch(rows, positions.shape[0], "the positions")
        return cls(rows, {a: _only_rows(positions, rows, a) for a in distinct_adapters(rows)})

    @classmethod
    def from_spec(cls, rows, adapters: dict, mask: torch.Tensor) -> "Mixed":
        """Each adapter's positions from its own spec on its rows of mask (B, T), True =
        token (adapters: {name: reft_ext.model.hooks.Adapter})."""
        _check_batch(rows, mask.shape[0], "the attention mask")
        pos = {}
        for a in distinct_adapters(rows):
            sel = _rows_of(rows, a, mask.device)
            part = positions_from_mask(adapters[a].spec, mask[sel], tied=not adapters[a].groups)
            full = torch.full((len(rows), *part.shape[1:]), -1, dtype=part.dtype,
                              device=part.device)
            full[sel] = part
            pos[a] = full
        return cls(rows, pos)

    def repeat_rows(self, k: int) -> "Mixed":
        """The plan of a batch whose rows were each repeated k times (generate's beams,
        num_return_sequences: repeat_interleave)."""
        rows = [r for r in self.rows for _ in range(k)]
        return Mixed(rows, {a: p.repeat_interleave(k, dim=0) for a, p in self.pos.items()})

    def positions_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        moved = self._moved.get(device)
        if moved is None:
            moved = self._moved[device] = {a: p.to(device) for a, p in self.pos.items()}
        return moved

    def same_as(self, other) -> bool:
        return isinstance(other, Mixed) and (other is self or (
            other.rows == self.rows and other.pos.keys() == self.pos.keys()
            and all(torch.equal(p, other.pos[a]) for a, p in self.pos.items())))

    def apply(self, mods: dict[str, nn.Module], h: torch.Tensor, inplace: bool) -> torch.Tensor:
        """Edits h (B, T, d) at one layer, where adapter a has intervention mods[a] (only
        the adapters with an intervention at this layer are in mods)."""
        pos = self.positions_on(h.device)
        groups: dict[tuple, list[str]] = {}
        alone: list[str] = []
        for a in self.pos:
            m = mods.get(a)
            if m is None:
                continue
            key = _bank_key(m)
            if key is None:
                alone.append(a)
            else:
                groups.setdefault(key, []).append(a)
        out = h
        for a in alone + [g[0] for g in groups.values() if len(g) == 1]:
            out = mods[a](out, pos[a], inplace=inplace or owned(out, h))
        for names in (g for g in groups.values() if len(g) > 1):
            members = [e for a in names for e in _entries(mods[a])]
            flat_pos, index = self._bank_slots(tuple(names), pos, h.device)
            out = bank_call(out, flat_pos, index, members, inplace or owned(out, h))
        return out

    def _bank_slots(self, names: tuple, pos: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, index) (B, S) of one bank call over the entries of ``names`` in
        order: row i lists its adapter's slots (all groups, flattened), the index maps each
        to its entry; rows of other adapters are empty (-1)."""
        key = (device, names)
        got = self._flat.get(key)
        if got is not None:
            return got
        B = len(self.rows)
        parts = [pos[a] if pos[a].dim() == 3 else pos[a].unsqueeze(1) for a in names]
        width = max(p.shape[1] * p.shape[2] for p in parts)
        flat = torch.full((B, width), -1, dtype=torch.int64, device=device)
        index = torch.full((B, width), -1, dtype=torch.int32, device=device)
        offset = 0
        for a, p in zip(names, parts):
            sel = _rows_of(self.rows, a, device)
            G, P = p.shape[1], p.shape[2]
            slots = p[sel].reshape(-1, G * P)
            entry = (offset + torch.arange(G, dtype=torch.int32, device=device)
                     ).repeat_interleave(P).expand_as(slots)
            flat[sel, :G * P] = slots
            index[sel, :G * P] = torch.where(slots >= 0, entry, -1).to(torch.int32)
            offset += G
        self._flat[key] = (flat, index)
        return flat, index


def distinct_adapters(rows) -> list[str]:
    """The adapter names of a per-row selection, each once, in row order."""
    return list(dict.fromkeys(r for r in rows if r is not None))


def _check_batch(rows, B: int, what: str) -> None:
    if len(rows) != B:
        raise ValueError(f"reft_ext: reft_adapter lists {len(rows)} adapters but {what} has "
                         f"batch size {B}: give one adapter name (or None) per row")


def _rows_of(rows, a: str, device) -> torch.Tensor:
    """(B,) bool: the rows that use adapter a."""
    return torch.tensor([r == a for r in rows], device=device)


def _only_rows(positions: torch.Tensor, rows, a: str) -> torch.Tensor:
    keep = _rows_of(rows, a, positions.device)
    shape = (-1,) + (1,) * (positions.dim() - 1)
    return torch.where(keep.view(shape), positions, torch.full_like(positions, -1))


def _entries(m: nn.Module) -> list[nn.Module]:
    """The bank entries of an intervention: itself, or an Untied layer's members."""
    return list(m.members) if isinstance(m, Untied) else [m]


def _bank_key(m: nn.Module):
    """What interventions whose entries stack into one bank share: rank, parameter dtypes
    (and the class, when they differ within one intervention) and device; None for one
    that cannot join a bank."""
    entries = _entries(m)
    if not all(fusable(e) for e in entries) or (entries[0] is not m and has_hooks(m)):
        return None
    params = list(entries[0].parameters())
    if not params:
        return None
    dtypes = tuple(p.dtype for p in params)
    mixed = (type(entries[0]), dtypes) if len(set(dtypes)) > 1 else dtypes[0]
    return (getattr(entries[0], "rank", None), mixed, params[0].device)
