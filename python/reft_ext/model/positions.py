"""Position specs ("all", "last", "f7", "l7", "f7+l7") and (B, P) position tensors: pure
functions of tensors, no model state.

A position tensor is (B, P) int64: row i lists token indices of sequence i in [0, T), each
at most once, with -1 in unused slots. The spec counts tokens among the *valid* tokens of a
row (attention mask 1), so left- and right-padded batches give the same edited tokens:

    "all"      every valid token                         P = T
    "last"     the last valid token (same as "l1")       P = 1
    "f{p}"     the first p valid tokens                  P = p
    "l{s}"     the last s valid tokens                   P = s
    "f{p}+l{s}" both; a token in both sets (a prompt     P = p + s
               shorter than p + s) is listed once and the slot left -1

Indices within a row come out in increasing token order, then the -1 fill.

Untied interventions (``patch(..., tied=False)``: two interventions per layer, pyreft's
share_weights=False) take (B, 2, P) positions: group 0, edited by intervention #0, holds
the first min(p, n // 2) valid tokens of a row of n, group 1, edited by #1, the last
min(s, n // 2), each padded with -1 to P = max(p, s). This is pyreft's rule
(get_intervention_locations): clipping each side to half the row means the two groups
never share a token. A row of one valid token is not edited.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

__all__ = ["PositionSpec", "parse_positions", "positions_from_mask",
           "positions_from_lengths", "positions_from_prompt", "check_untied_spec"]

_PART = re.compile(r"^([fl])(\d+)$")


@dataclass(frozen=True)
class PositionSpec:
    """Parsed position spec: all valid tokens, or the first ``first`` + last ``last``."""

    all: bool = False
    first: int = 0
    last: int = 0

    @property
    def width(self) -> int | None:
        """P for a given spec (None for "all": P = T)."""
        return None if self.all else self.first + self.last

    def __str__(self) -> str:
        if self.all:
            return "all"
        parts = [f"f{self.first}"] if self.first else []
        parts += [f"l{self.last}"] if self.last else []
        return "+".join(parts)


SpecLike = Union[str, PositionSpec]


def parse_positions(spec: SpecLike) -> PositionSpec:
    """Parses "all", "last", "f{p}", "l{s}", "f{p}+l{s}" (either order) into a PositionSpec.

    p, s are integers >= 1. Raises ValueError (TypeError for a non-string) on anything else.
    """
    if isinstance(spec, PositionSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reft_ext: positions spec must be a str like 'f7+l7', got "
                        f"{type(spec).__name__}")
    s = spec.strip().lower()
    if s == "all":
        return PositionSpec(all=True)
    if s == "last":
        return PositionSpec(last=1)
    counts = {}
    parts = s.split("+")
    for part in parts:
        m = _PART.match(part)
        if m is None or m.group(1) in counts:
            raise ValueError(
                f"reft_ext: bad positions spec {spec!r}: expected 'all', 'last', 'f<p>', "
                f"'l<s>' or 'f<p>+l<s>' (e.g. 'f7+l7')")
        n = int(m.group(2))
        if n < 1:
            raise ValueError(f"reft_ext: bad positions spec {spec!r}: counts must be >= 1 "
                             f"(got {part!r}); leave the part out instead")
        counts[m.group(1)] = n
    return PositionSpec(first=counts.get("f", 0), last=counts.get("l", 0))


def _pack(sel: torch.Tensor, width: int) -> torch.Tensor:
    """sel: (B, T) bool -> (B, width) int64 of the selected indices ascending, -1 fill."""
    B, T = sel.shape
    idx = torch.arange(T, device=sel.device).expand(B, T)
    key = torch.where(sel, idx, torch.full_like(idx, T))
    if width > T:
        key = torch.cat([key, key.new_full((B, width - T), T)], dim=1)
    key = key.sort(dim=1).values[:, :width]
    return torch.where(key < T, key, torch.full_like(key, -1))


def check_untied_spec(spec: SpecLike) -> PositionSpec:
    """The parsed spec, if untied interventions can use it: "f{p}+l{s}" with p, s >= 1."""
    sp = parse_positions(spec)
    if sp.all or not (sp.first and sp.last):
        raise ValueError(f"reft_ext: untied interventions (tied=False) need a positions spec "
                         f"'f<p>+l<s>' (one intervention edits the first p tokens, the other "
                         f"the last s), got {str(sp)!r}")
    return sp


def positions_from_mask(spec: SpecLike, attention_mask: torch.Tensor, *,
                        tied: bool = True) -> torch.Tensor:
    """Positions of a spec within the valid tokens of each row.

    Args:
        spec: "all", "last", "f{p}", "l{s}", "f{p}+l{s}" or a PositionSpec.
        attention_mask: (B, T), nonzero / True for valid tokens. Padding may be left, right
            or anywhere: tokens are counted in order among the valid ones.
        tied: False for untied interventions (spec "f{p}+l{s}"; see the module docstring).

    Returns:
        (B, P) int64 on the mask's device; P = T for "all", else p + s. Overlapping first /
        last tokens of short rows are listed once; unused slots are -1. Untied: (B, 2,
        max(p, s)), group 0 the first min(p, n // 2) valid tokens, group 1 the last
        min(s, n // 2).
    """
    sp = parse_positions(spec) if tied else check_untied_spec(spec)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("reft_ext: attention_mask must be a (B, T) tensor, got "
                         f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    valid = attention_mask != 0
    T = valid.shape[1]
    if sp.all:
        return _pack(valid, T)
    rank = valid.long().cumsum(dim=1)                  # 1-based rank among valid tokens
    n = rank[:, -1:] if T > 0 else rank.new_zeros(valid.shape[0], 1)
    if not tied:
        half = n // 2
        first = valid & (rank <= half.clamp(max=sp.first))
        last = valid & (rank > n - half.clamp(max=sp.last))
        width = max(sp.first, sp.last)
        return torch.stack((_pack(first, width), _pack(last, width)), dim=1)
    sel = valid & ((rank <= sp.first) | (rank > n - sp.last))
    return _pack(sel, sp.width)


def _as_long(x, name) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"reft_ext: {name} must be a 1-D sequence of ints, got {x!r}")
    t = t.long()
    if (t < 0).any():
        raise ValueError(f"reft_ext: {name} must be >= 0, got {t.tolist()}")
    return t


def positions_from_lengths(spec: SpecLike, lengths: Sequence[int] | torch.Tensor,
                           seq_len: int, *, start: Sequence[int] | torch.Tensor | None = None,
                           device=None, tied: bool = True) -> torch.Tensor:
    """Positions of a spec within the span [start_i, start_i + lengths_i) of each row.

    For a collator that intervenes on prompt tokens only while the loss covers the response:
    with right padding the prompt of row i is [0, prompt_len_i) (start=None); with left
    padding pass start_i = number of pad tokens in row i.

    Args:
        spec: as in :func:`positions_from_mask`.
        lengths: (B,) span lengths (e.g. prompt lengths), ints >= 0.
        seq_len: T, the padded length; every span must fit in [0, T).
        start: (B,) span starts (default 0).
        tied: False for untied interventions, as in :func:`positions_from_mask`.

    Returns:
        (B, P) int64 (on ``device`` or lengths' device), as :func:`positions_from_mask`
        ((B, 2, P) untied).
    """
    L = _as_long(lengths, "lengths")
    S = torch.zeros_like(L) if start is None else _as_long(start, "start")
    if S.shape != L.shape:
        raise ValueError(f"reft_ext: start has shape {tuple(S.shape)} but lengths has "
                         f"{tuple(L.shape)}")
    if not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"reft_ext: seq_len must be an int >= 0, got {seq_len!r}")
    if (S + L > seq_len).any():
        raise ValueError(f"reft_ext: spans start+length {(S + L).tolist()} exceed seq_len="
                         f"{seq_len}")
    if device is not None:
        L, S = L.to(device), S.to(device)
    idx = torch.arange(seq_len, device=L.device)
    mask = (idx >= S[:, None]) & (idx < (S + L)[:, None])
    return positions_from_mask(spec, mask, tied=tied)


def positions_from_prompt(spec: SpecLike, prompt_lengths: Sequence[int] | torch.Tensor,
                          attention_mask: torch.Tensor, *, tied: bool = True) -> torch.Tensor:
    """Positions of a spec within the first ``prompt_lengths[i]`` valid tokens of each row.

    Works for either padding side: only ``attention_mask`` says where a row's tokens are.
    It assumes each row is a prompt followed by its response, so that the prompt is the
    row's first ``prompt_lengths[i]`` valid tokens, and that ``prompt_lengths[i]`` counts
    the prompt's tokens as they appear in that row. ``len(tok(prompt)["input_ids"])`` is
    that count only when the prompt tokenizes alone as it does at the start of
    prompt + response (true when the response starts a new token, e.g. with a space, for
    most tokenizers; a merge across the boundary or special tokens added to only one of the
    two break it). Labels masking "the prompt" must use the same rule (the first
    ``prompt_lengths[i]`` valid tokens, not the first ``prompt_lengths[i]`` columns, which
    are padding on a left-padded row).

    Args:
        spec: as in :func:`positions_from_mask`.
        prompt_lengths: (B,) ints >= 0, each at most the row's number of valid tokens.
        attention_mask: (B, T).
        tied: False for untied interventions, as in :func:`positions_from_mask`.

    Returns:
        (B, P) int64 on the mask's device ((B, 2, P) untied).
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("reft_ext: attention_mask must be a (B, T) tensor")
    L = _as_long(prompt_lengths, "prompt_lengths").to(attention_mask.device)
    valid = attention_mask != 0
    if L.shape[0] != valid.shape[0]:
        raise ValueError(f"reft_ext: prompt_lengths has {L.shape[0]} entries for a batch of "
                         f"{valid.shape[0]}")
    n = valid.sum(dim=1)
    if (L > n).any():
        raise ValueError(f"reft_ext: prompt_lengths {L.tolist()} exceed the valid tokens per "
                         f"row {n.tolist()}")
    rank = valid.long().cumsum(dim=1)
    return positions_from_mask(spec, valid & (rank <= L[:, None]), tied=tied)
