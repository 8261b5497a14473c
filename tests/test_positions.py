"""Position specs and (B, P) position tensors."""
from __future__ import annotations

import pytest
import torch

import reft_ext
from reft_ext.model.positions import (PositionSpec, parse_positions, positions_from_lengths,
                                      positions_from_mask, positions_from_prompt)


@pytest.mark.parametrize("spec,expect", [
    ("all", PositionSpec(all=True)), ("last", PositionSpec(last=1)),
    ("f7", PositionSpec(first=7)), ("l3", PositionSpec(last=3)),
    ("f7+l7", PositionSpec(first=7, last=7)), ("l2+f1", PositionSpec(first=1, last=2)),
    (" F5+L5 ", PositionSpec(first=5, last=5)),
])
def test_parse(spec, expect):
    assert parse_positions(spec) == expect
    assert parse_positions(expect) is expect


@pytest.mark.parametrize("spec", ["", "f", "f0", "l0+f1", "f7+f7", "f7+", "f-1", "first7",
                                  "f7 + l7", "f7,l7", "f1.5", "all+l1", "l2+f2+l2"])
def test_parse_rejects(spec):
    with pytest.raises(ValueError, match="positions spec"):
        parse_positions(spec)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError, match="positions spec"):
        parse_positions(7)


def _loop(spec, mask):
    sp = parse_positions(spec)
    rows = []
    for row in mask.tolist():
        valid = [t for t, m in enumerate(row) if m]
        if sp.all:
            rows.append(valid)
            continue
        last = valid[len(valid) - sp.last:] if sp.last else []
        rows.append(sorted(set(valid[:sp.first]) | set(last)))
    P = mask.shape[1] if sp.all else sp.first + sp.last
    out = torch.full((len(rows), P), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


@pytest.mark.parametrize("spec", ["all", "last", "f1", "f3", "l2", "f2+l2", "f4+l5"])
@pytest.mark.parametrize("side", ["left", "right", "random"])
def test_from_mask_matches_loop(spec, side):
    g = torch.Generator().manual_seed(hash((spec, side)) % 2**31)
    B, T = 6, 10
    lens = torch.tensor([10, 9, 5, 3, 1, 0])
    idx = torch.arange(T)
    if side == "left":
        mask = idx >= (T - lens)[:, None]
    elif side == "right":
        mask = idx < lens[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.6
    got = positions_from_mask(spec, mask.long())
    assert got.dtype == torch.int64
    assert torch.equal(got, _loop(spec, mask))


def test_padding_sides_select_the_same_tokens():
    lens = torch.tensor([8, 5, 2])
    T = 8
    idx = torch.arange(T)
    left = positions_from_mask("f2+l3", idx >= (T - lens)[:, None])
    right = positions_from_mask("f2+l3", idx < lens[:, None])
    shift = (T - lens)[:, None]
    assert torch.equal(torch.where(right >= 0, right + shift, right), left)


def test_overlaps_are_deduplicated_with_minus_one_fill():
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    assert positions_from_mask("f2+l2", mask).tolist() == [[0, 1, 2, -1]]
    # a sequence shorter than P (T = 3 < 4): still P = p + s slots
    assert positions_from_mask("f3+l1", torch.ones(1, 3)).tolist() == [[0, 1, 2, -1]]
    assert positions_from_mask("l3", torch.zeros(2, 4)).tolist() == [[-1] * 3] * 2


def test_positions_are_valid_for_the_op():
    """Short rows give -1 fill and no repeats: the fused op accepts them as they are."""
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    pos = positions_from_mask("f2+l2", mask)
    h = torch.randn(2, 3, 4)
    R = torch.linalg.qr(torch.randn(4, 2))[0].T.contiguous()
    W, b = torch.randn(2, 4), torch.randn(2)
    torch.testing.assert_close(reft_ext.loreft(h, pos, R, W, b),
                               reft_ext.loreft_reference(h, pos, R, W, b))


def test_from_lengths_right_and_left_padding():
    # right padding: spans start at 0
    got = positions_from_lengths("f1+l2", [4, 2, 0], seq_len=6)
    assert got.tolist() == [[0, 2, 3], [0, 1, -1], [-1, -1, -1]]
    # left padding: the prompt starts after the pads
    got = positions_from_lengths("f1+l2", [4, 2], seq_len=6, start=torch.tensor([2, 1]))
    assert got.tolist() == [[2, 4, 5], [1, 2, -1]]
    assert positions_from_lengths("all", [2], seq_len=3).tolist() == [[0, 1, -1]]


def test_from_prompt_covers_prompt_tokens_only():
    # prompt + response sequences, both padding sides: intervene on the prompt's tokens
    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    left = right.flip(1)
    prompt = [3, 1]
    assert positions_from_prompt("f1+l1", prompt, right).tolist() == [[0, 2], [0, -1]]
    assert positions_from_prompt("f1+l1", prompt, left).tolist() == [[1, 3], [3, -1]]
    assert positions_from_prompt("all", prompt, left).tolist() == [
        [1, 2, 3, -1, -1, -1], [3, -1, -1, -1, -1, -1]]


def test_helper_errors():
    with pytest.raises(ValueError, match="attention_mask"):
        positions_from_mask("all", torch.ones(3))
    with pytest.raises(ValueError, match="exceed seq_len"):
        positions_from_lengths("all", [5], seq_len=4)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        positions_from_lengths("all", [-1], seq_len=4)
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        positions_from_lengths("all", [1.5], seq_len=4)
    with pytest.raises(ValueError, match="start has shape"):
        positions_from_lengths("all", [1, 2], seq_len=4, start=[0])
    with pytest.raises(ValueError, match="exceed the valid tokens"):
        positions_from_prompt("all", [3], torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="entries for a batch"):
        positions_from_prompt("all", [1, 1], torch.tensor([[1, 1, 0]]))
