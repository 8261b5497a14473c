"""Intervention modules: LoReFT (orthonormal R, fused op) and DiReFT, and their registry.

(Named modules.py, not interventions.py: ``reft_ext.interventions(model)`` is a function,
and a submodule of the same name would shadow it or be shadowed by it.)

Every module here has the same call contract, which is what :func:`reft_ext.patch` uses:

    module(h, positions, inplace=True) -> Tensor

    h:         (B, T, d) hidden states of one layer
    positions: (B, P) int64, token indices in [0, T) or -1 for an empty slot, no repeats
               within a row
    returns    h itself, edited at the selected rows (inplace=True), or a new tensor
               (inplace=False); every unselected row is bitwise unchanged.

A custom intervention for ``patch(..., intervention=factory)`` only needs to follow it.

The built-in ones are registered in INTERVENTIONS under the name patch() and checkpoints
use, and each declares what a checkpoint holds of it: SAVED_TENSORS, {tensor name in the
file: parameter name}, the tensors that rebuild it exactly; DERIVED_TENSORS, {name: (the
saved tensor it is computed from, how)}, tensors a file also holds so that it can be used
without reft_ext (LoReFT's materialised R).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops import acc_dtype, loreft, loreft_, loreft_reference, loreft_reference_
from .ops.reference import edit_delta, valid_slots

__all__ = ["LoReFT", "DiReFT", "orthonormal_rows", "INTERVENTIONS", "kind_of",
           "build_intervention"]

_BACKENDS = ("fused", "reference")


def orthonormal_rows(A: torch.Tensor) -> torch.Tensor:
    """Differentiable orthonormalisation of the rows of A by a sign-fixed thin QR.

    Args:
        A: (r, d) with r <= d and full row rank.

    Returns:
        R: (r, d) with R @ R.T = I (to the dtype's precision), spanning the same row space
        as A: R = (Q * s).T where A.T = Q Rq is the thin QR (Q: (d, r)) and
        s = sign(diag(Rq)) (+1 where 0). The sign fix makes the map A -> R unique and
        continuous (it equals Gram-Schmidt of A's rows), so gradient steps on A move R
        smoothly. R does not depend on A's scale: weight decay on A cannot shrink or
        collapse R. Cost O(d r^2) time, O(d r) memory, once per call.
    """
    if A.dim() != 2 or A.shape[0] > A.shape[1]:
        raise ValueError(f"reft_ext.orthonormal_rows: A must have shape (r, d) with r <= d, "
                         f"got {tuple(A.shape)}")
    # torch has no half-precision QR: factor 16-bit parameters in float32, round back.
    work = A.float() if A.dtype in (torch.bfloat16, torch.float16) else A
    Q, Rq = torch.linalg.qr(work.T)                   # Q: (d, r), Rq: (r, r)
    diag = torch.diagonal(Rq)
    s = torch.where(diag < 0, -torch.ones_like(diag), torch.ones_like(diag))
    return (Q * s).T.to(A.dtype)                      # (r, d), row-major contiguous


def _default_dtype(dtype):
    return torch.float32 if dtype is None else dtype


def _check_common(cls, d, rank, dropout, backend):
    if not (isinstance(d, int) and d >= 1):
        raise ValueError(f"reft_ext.{cls}: d must be a positive int, got {d!r}")
    if not (isinstance(rank, int) and 1 <= rank <= d):
        raise ValueError(f"reft_ext.{cls}: rank must be an int in [1, d={d}], got {rank!r}")
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"reft_ext.{cls}: dropout must be in [0, 1), got {dropout!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"reft_ext.{cls}: backend must be one of {_BACKENDS}, got {backend!r}")


def _apply(h, positions, R, W, b, inplace, backend, dropout, training):
    """Runs Phi(x) = x + (x W^T + b - x R^T) R at the selected rows of h."""
    if dropout > 0.0 and training:
        return _apply_dropout(h, positions, R, W, b, inplace, dropout)
    if backend == "fused":
        return loreft_(h, positions, R, W, b) if inplace else loreft(h, positions, R, W, b)
    return (loreft_reference_(h, positions, R, W, b) if inplace
            else loreft_reference(h, positions, R, W, b))


def _apply_dropout(h, positions, R, W, b, inplace, p):
    """Pure-PyTorch path used only when dropout is active (training and p > 0).

    Dropout acts on the edit, not on the hidden state: y = x + dropout(z R), so unselected
    rows and the kept part of x are never rescaled. (pyreft drops out the whole output row
    x + z R instead, which also rescales x by 1/(1-p).)
    """
    bi, _, t = valid_slots(positions)
    x = h[bi, t].to(acc_dtype(h.dtype))                        # (N, d)
    delta = edit_delta(x, R, W, b)                             # (N, d)
    y = (x + nn.functional.dropout(delta, p, training=True)).to(h.dtype)
    out = h if inplace else h.clone()
    out[bi, t] = y
    return out


class _Intervention(nn.Module):
    """What LoReFT and DiReFT share: hyper-parameters, the bias b, and a forward through the
    LoReFT edit with the (R, W) that a subclass's _edit_matrices() gives."""

    def __init__(self, name: str, d: int, rank: int, dropout: float, backend: str):
        super().__init__()
        _check_common(name, d, rank, dropout, backend)
        self.d, self.rank, self.dropout, self.backend = d, rank, float(dropout), backend

    def _edit_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused kernel's (R, W, b): (r, d), (r, d), (r,)."""
        return (*self._edit_matrices(), self.bias)

    @property
    def b(self) -> torch.Tensor:
        """(r,)."""
        return self.bias

    def forward(self, h: torch.Tensor, positions: torch.Tensor,
                inplace: bool = True) -> torch.Tensor:
        """h: (B, T, d); positions: (B, P) int64 with -1 for empty slots. See module doc."""
        R, W = self._edit_matrices()
        return _apply(h, positions, R, W, self.bias, inplace, self.backend, self.dropout,
                      self.training)

    def extra_repr(self) -> str:
        return (f"d={self.d}, rank={self.rank}, dtype={self.weight.dtype}, "
                f"dropout={self.dropout}, backend={self.backend!r}")


class LoReFT(_Intervention):
    """LoReFT intervention Phi(h) = h + R^T (W h + b - R h) with orthonormal rows in R.

    Args:
        d: hidden size.
        rank: r, 1 <= r <= d.
        dtype: parameter dtype (default float32, also on a bf16/fp16 model).
        device: parameter device.
        dropout: probability of dropping elements of the edit z R at the edited rows during
            training (see :func:`_apply_dropout`); 0 (default) keeps the fused path.
        backend: "fused" (reft_ext.loreft_, default) or "reference" (the pure-PyTorch
            reft_ext.ops.reference implementation; same semantics, for tests and benchmarks).

    Parameters:
        rotate_raw: (r, d) unconstrained; ``R = orthonormal_rows(rotate_raw)`` is evaluated
            once per forward (O(d r^2), no d x d buffer). Initialised with orthonormal rows.
        weight: (r, d) = W, bias: (r,) = b, initialised like pyreft's ``learned_source``
            (nn.Linear(d, r) default: U(-1/sqrt(d), 1/sqrt(d))).

    ``.R``, ``.W``, ``.b`` return the (r, d), (r, d), (r,) tensors used by forward.
    """

    SAVED_TENSORS = {"rotate_raw": "rotate_raw", "W": "weight", "b": "bias"}
    DERIVED_TENSORS = {"R": ("rotate_raw", orthonormal_rows)}   # the R forward uses

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused"):
        super().__init__("LoReFT", d, rank, dropout, backend)
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self.rotate_raw = nn.Parameter(torch.empty(rank, d, **kw))
        self.weight = nn.Parameter(torch.empty(rank, d, **kw))
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Orthonormal rotate_raw; W, b as nn.Linear(d, r). Draws from torch's global RNG."""
        # orthogonal_ uses QR, which has no 16-bit kernel: initialise in float32.
        self.rotate_raw.copy_(nn.init.orthogonal_(torch.empty_like(self.rotate_raw,
                                                                   dtype=torch.float32)))
        bound = 1.0 / math.sqrt(self.d)
        nn.init.uniform_(self.weight, -bound, bound)   # = kaiming_uniform_(a=sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    @property
    def R(self) -> torch.Tensor:
        """(r, d) tensor with orthonormal rows (differentiable in rotate_raw)."""
        return orthonormal_rows(self.rotate_raw)

    @property
    def W(self) -> torch.Tensor:
        """(r, d)."""
        return self.weight

    def _edit_matrices(self):
        return self.R, self.weight


class DiReFT(_Intervention):
    """DiReFT intervention Phi(h) = h + W2^T (W1 h + b): no orthogonality, no -R h term.

    It runs through the same LoReFT kernel by an exact algebraic identity: with R := W2 and
    W := W1 + W2,

        h + R^T (W h + b - R h) = h + W2^T ((W1 + W2) h + b - W2 h) = h + W2^T (W1 h + b).

    The kernel's gradient formulas do not assume orthonormal R, and autograd maps the
    gradient of W back to both W1 and W2, so gradients are exact too. Numerically the
    kernel computes (W1 + W2) h - W2 h in float32 (float64 for float64 h), which adds an
    error of order eps_fp32 * |W2 h| to W1 h: negligible at the scale of the init.

    Args/backends/dropout as :class:`LoReFT`. Parameters: ``weight`` = W1 (r, d),
    ``bias`` = b (r,) (pyreft's learned_source) and ``proj`` = W2 (r, d) (pyreft's
    proj_layer.weight), all initialised as nn.Linear(d, r).
    """

    SAVED_TENSORS = {"W1": "weight", "W2": "proj", "b": "bias"}
    DERIVED_TENSORS: dict = {}

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused"):
        super().__init__("DiReFT", d, rank, dropout, backend)
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self.weight = nn.Parameter(torch.empty(rank, d, **kw))
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.proj = nn.Parameter(torch.empty(rank, d, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d)
        for p in (self.weight, self.bias, self.proj):
            nn.init.uniform_(p, -bound, bound)

    @property
    def W1(self) -> torch.Tensor:
        """(r, d)."""
        return self.weight

    @property
    def W2(self) -> torch.Tensor:
        """(r, d)."""
        return self.proj

    def _edit_matrices(self):
        return self.proj, self.weight + self.proj      # R := W2, W := W1 + W2 (see above)


# name (patch()'s intervention=, a checkpoint's "intervention") -> class
INTERVENTIONS = {"loreft": LoReFT, "direft": DiReFT}


def kind_of(module: nn.Module) -> str | None:
    """The registered name of a built-in intervention's exact class, else None."""
    return next((k for k, cls in INTERVENTIONS.items() if type(module) is cls), None)


def build_intervention(intervention, d: int, rank: int, *, dtype: torch.dtype, device,
                       dropout: float = 0.0, backend: str = "fused") -> nn.Module:
    """One intervention module for patch(): ``intervention`` is a registered name
    (case-insensitive) or a factory called as ``factory(d, rank, dtype=..., device=...)``."""
    if isinstance(intervention, str):
        cls = INTERVENTIONS.get(intervention.lower())
        if cls is None:
            raise ValueError(f"reft_ext.patch: intervention must be one of "
                             f"{sorted(INTERVENTIONS)} or a factory, got {intervention!r}")
        return cls(d, rank, dtype=dtype, device=device, dropout=dropout, backend=backend)
    if not callable(intervention):
        raise TypeError(f"reft_ext.patch: intervention must be a str or a callable, got "
                        f"{type(intervention).__name__}")
    return intervention(d, rank, dtype=dtype, device=device)
