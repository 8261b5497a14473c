"""Intervention modules: the six pyreft intervention types, all run through one fused
kernel, and their registry.

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

The six types and the kernel
----------------------------
The fused kernel computes, at each selected row x (a (d,) vector),

    y = x + R^T (W x + b - R x)          kernel parameters R (r, d), W (r, d), b (r,)

and every built-in type is that kernel with (R, W, b) given by its ``kernel_params()``,
the only way its forward reaches the kernel (so a bank of modules can be stacked into
(N, r, d) / (N, r) kernel parameters). The identities are exact in real arithmetic:

    name        pyreft class            Phi(h)                         kernel (R, W, b)
    "loreft"    LoreftIntervention      h + R^T(W h + b - R h)         (R, W, b)
    "noreft"    NoreftIntervention      h + W2^T(W1 h + b - W2 h - c)  (W2, W1, b - c)
    "consreft"  ConsreftIntervention    h + R^T(b - R h)               (R, 0, b)
    "lobireft"  LobireftIntervention    h + R^T b                      (R, R, b)
    "direft"    DireftIntervention      h + R^T(W h + b)               (R, W + R, b)
    "nodireft"  NodireftIntervention    h + W2^T(W1 h + b)             (W2, W1 + W2, b)

R has orthonormal rows (R = orthonormal_rows(rotate_raw), pyreft's orthogonal
parametrization); W1, W2 are free (pyreft's learned_source and proj_layer weights); c
is NoReFT's proj_layer bias, present only with ``add_bias=True`` as in pyreft. The
kernel's gradient formulas do not assume orthonormal R and autograd carries the gradients
of the kernel's R and W back through these maps (e.g. W + R), so gradients are exact too.
The activation is linear (pyreft's default; other act_fn values are not supported).
Numerically, W := W1 + W2 (or W + R, or R) makes the kernel form (W1 + W2) x - W2 x in
the accumulation dtype, adding an error of order eps * |W2 x| to W1 x: far below bf16
resolution at any sensible scale.

Naming decision: each name means what pyreft's class of that name means. Up to this
version reft_ext had a "direft" whose second matrix was free ("no orthogonality"): that
is pyreft's *NodireftIntervention*, so it is now :class:`NodiReFT` ("nodireft"), and
"direft" / :class:`DiReFT` is pyreft's DireftIntervention with an orthonormal R.
Checkpoints saved by the older code (intervention "direft" with tensors W1, W2, b) are
read as "nodireft", their real type, with the same math (reft_ext.checkpoint.format).

Dropout (one rule for every type): with ``dropout=p > 0`` in training mode, the *edit*
delta = R^T(W x + b - R x) at the selected rows is dropped out elementwise (scaled by
1/(1-p)); x itself and unselected rows are never touched (see :func:`_apply_dropout`).
pyreft instead applies nn.Dropout to the whole output row x + delta (which also zeroes
and rescales parts of x), and its ConsreftIntervention has no dropout at all. Default
p = 0 matches pyreft exactly for all six; in eval mode dropout never acts.

Checkpoints: each built-in type is registered in INTERVENTIONS under the name patch() and
checkpoints use, and declares what a checkpoint holds of it: SAVED_TENSORS, {tensor name
in the file: parameter name}, the tensors that rebuild it exactly; DERIVED_TENSORS,
{name: (the saved tensor it is computed from, how)}, tensors a file also holds so that
it can be used without reft_ext (the materialised orthonormal R); OPTIONS, {construction
option: default} a checkpoint records (NoReFT's add_bias), with ``options()`` (an instance's
values) and ``saved_tensors(**options)`` (the file's tensors for those values).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops import acc_dtype, loreft, loreft_, loreft_reference, loreft_reference_
from .ops.reference import edit_delta, valid_slots

__all__ = ["LoReFT", "NoReFT", "ConsReFT", "LobiReFT", "DiReFT", "NodiReFT",
           "orthonormal_rows", "INTERVENTIONS", "kind_of", "build_intervention"]

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
    """What every built-in type shares: hyper-parameters, and a forward through the one
    kernel with the (R, W, b) of :meth:`kernel_params`.

    A subclass defines its parameters, ``reset_parameters()``, ``kernel_params()`` and the
    checkpoint declarations SAVED_TENSORS / DERIVED_TENSORS (and OPTIONS when it has
    construction options that change its parameters)."""

    SAVED_TENSORS: dict = {}
    DERIVED_TENSORS: dict = {}
    OPTIONS: dict = {}          # {construction option: default} recorded by checkpoints

    def __init__(self, name: str, d: int, rank: int, dropout: float, backend: str):
        super().__init__()
        _check_common(name, d, rank, dropout, backend)
        self.d, self.rank, self.dropout, self.backend = d, rank, float(dropout), backend

    def kernel_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R (r, d), W (r, d), b (r,)): the kernel's parameters for this intervention,
        differentiable in the module's parameters, in the parameters' dtype; forward is
        exactly the kernel y = x + R^T(W x + b - R x) with them (module docstring)."""
        raise NotImplementedError

    def options(self) -> dict:
        """{option: value} of this instance, for every name in OPTIONS."""
        return {}

    @classmethod
    def saved_tensors(cls, **options) -> dict:
        """{file tensor name: parameter name} of a checkpoint of an instance built with
        ``options`` (the class's SAVED_TENSORS unless an option adds parameters)."""
        return dict(cls.SAVED_TENSORS)

    @property
    def b(self) -> torch.Tensor:
        """(r,)."""
        return self.bias

    def forward(self, h: torch.Tensor, positions: torch.Tensor,
                inplace: bool = True) -> torch.Tensor:
        """h: (B, T, d); positions: (B, P) int64 with -1 for empty slots. See module doc."""
        R, W, b = self.kernel_params()
        return _apply(h, positions, R, W, b, inplace, self.backend, self.dropout,
                      self.training)

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v}" for k, v in self.options().items())
        return (f"d={self.d}, rank={self.rank}, dtype={self.bias.dtype}, "
                f"dropout={self.dropout}, backend={self.backend!r}{opts}")


class _Orthonormal(_Intervention):
    """Base of the types with an orthonormal R (LoReFT, ConsReFT, LobiReFT, DiReFT):
    ``rotate_raw`` (r, d) unconstrained, R = orthonormal_rows(rotate_raw) evaluated once
    per forward (O(d r^2), no d x d buffer), initialised with orthonormal rows (pyreft:
    nn.init.orthogonal_ on its rotate layer)."""

    def _init_rotate(self, kw: dict) -> None:
        self.rotate_raw = nn.Parameter(torch.empty(self.rank, self.d, **kw))

    @torch.no_grad()
    def _reset_rotate(self) -> None:
        # orthogonal_ uses QR, which has no 16-bit kernel: initialise in float32.
        self.rotate_raw.copy_(nn.init.orthogonal_(torch.empty_like(self.rotate_raw,
                                                                   dtype=torch.float32)))

    @property
    def R(self) -> torch.Tensor:
        """(r, d) tensor with orthonormal rows (differentiable in rotate_raw)."""
        return orthonormal_rows(self.rotate_raw)


def _linear_init(*params: torch.Tensor, d: int) -> None:
    """nn.Linear(d, r)'s default init (pyreft's learned_source / proj_layer): weight and
    bias U(-1/sqrt(d), 1/sqrt(d)) (kaiming_uniform_(a=sqrt(5)) gives the same bound)."""
    bound = 1.0 / math.sqrt(d)
    with torch.no_grad():
        for p in params:
            nn.init.uniform_(p, -bound, bound)


class LoReFT(_Orthonormal):
    """LoReFT Phi(h) = h + R^T (W h + b - R h), R with orthonormal rows (pyreft's
    LoreftIntervention). Kernel: (R, W, b) as they are.

    Args:
        d: hidden size.
        rank: r, 1 <= r <= d.
        dtype: parameter dtype (default float32, also on a bf16/fp16 model).
        device: parameter device.
        dropout: probability of dropping elements of the edit at the edited rows during
            training (module docstring, :func:`_apply_dropout`); 0 (default) keeps the
            fused path.
        backend: "fused" (reft_ext.loreft_, default) or "reference" (the pure-PyTorch
            reft_ext.ops.reference implementation; same semantics, for tests and benchmarks).

    Parameters:
        rotate_raw: (r, d), R = orthonormal_rows(rotate_raw) (see :class:`_Orthonormal`).
        weight: (r, d) = W, bias: (r,) = b, initialised like pyreft's ``learned_source``
            (nn.Linear(d, r) default: U(-1/sqrt(d), 1/sqrt(d))).

    ``.R``, ``.W``, ``.b`` return the (r, d), (r, d), (r,) tensors used by forward.
    """

    SAVED_TENSORS = {"rotate_raw": "rotate_raw", "W": "weight", "b": "bias"}
    DERIVED_TENSORS = {"R": ("rotate_raw", orthonormal_rows)}   # the R forward uses

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused"):
        super().__init__(type(self).__name__, d, rank, dropout, backend)
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self._init_rotate(kw)
        self.weight = nn.Parameter(torch.empty(rank, d, **kw))
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthonormal rotate_raw; W, b as nn.Linear(d, r). Draws from torch's global RNG."""
        self._reset_rotate()
        _linear_init(self.weight, self.bias, d=self.d)

    @property
    def W(self) -> torch.Tensor:
        """(r, d)."""
        return self.weight

    def kernel_params(self):
        return self.R, self.weight, self.bias


class NoReFT(_Intervention):
    """NoReFT Phi(h) = h + W2^T (W1 h + b - (W2 h + c)), no orthogonality (pyreft's
    NoreftIntervention: W1, b = learned_source; W2, c = proj_layer, c only with
    ``add_bias=True``). Kernel: R := W2, W := W1, b := b - c (exact: the kernel's
    -R x term is -W2 x, and c only ever enters as b - c).

    Args: as :class:`LoReFT`, plus ``add_bias`` (default False): give proj_layer its bias
    c, as pyreft's add_bias does.

    Parameters (all nn.Linear(d, r)'s default init, as pyreft's two Linear layers):
        weight: (r, d) = W1; bias: (r,) = b; proj: (r, d) = W2;
        proj_bias: (r,) = c with add_bias, else None.
    """

    SAVED_TENSORS = {"W1": "weight", "W2": "proj", "b": "bias"}
    OPTIONS = {"add_bias": False}

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused",
                 add_bias: bool = False):
        super().__init__("NoReFT", d, rank, dropout, backend)
        if not isinstance(add_bias, bool):
            raise ValueError(f"reft_ext.NoReFT: add_bias must be a bool, got {add_bias!r}")
        self.add_bias = add_bias
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self.weight = nn.Parameter(torch.empty(rank, d, **kw))
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.proj = nn.Parameter(torch.empty(rank, d, **kw))
        self.proj_bias = nn.Parameter(torch.empty(rank, **kw)) if add_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W1, b, W2 (and c) as nn.Linear(d, r). Draws from torch's global RNG."""
        _linear_init(*(p for p in (self.weight, self.bias, self.proj, self.proj_bias)
                       if p is not None), d=self.d)

    def options(self) -> dict:
        return {"add_bias": self.add_bias}

    @classmethod
    def saved_tensors(cls, add_bias: bool = False) -> dict:
        return {**cls.SAVED_TENSORS, **({"c": "proj_bias"} if add_bias else {})}

    @property
    def W1(self) -> torch.Tensor:
        """(r, d)."""
        return self.weight

    @property
    def W2(self) -> torch.Tensor:
        """(r, d)."""
        return self.proj

    def kernel_params(self):
        b = self.bias if self.proj_bias is None else self.bias - self.proj_bias
        return self.proj, self.weight, b


class _RotatedBias(_Orthonormal):
    """What ConsReFT and LobiReFT share: an orthonormal R and a bias b, no W.

    Parameters:
        rotate_raw: (r, d), see :class:`_Orthonormal`.
        bias: (r,) = b, initialised U[0, 1) like pyreft's ``learned_source`` (torch.rand).
    """

    SAVED_TENSORS = {"rotate_raw": "rotate_raw", "b": "bias"}
    DERIVED_TENSORS = {"R": ("rotate_raw", orthonormal_rows)}

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused"):
        super().__init__(type(self).__name__, d, rank, dropout, backend)
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self._init_rotate(kw)
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Orthonormal rotate_raw; b ~ U[0, 1). Draws from torch's global RNG."""
        self._reset_rotate()
        with torch.no_grad():
            self.bias.uniform_(0.0, 1.0)


class ConsReFT(_RotatedBias):
    """ConsReFT Phi(h) = h + R^T (b - R h), R orthonormal (pyreft's ConsreftIntervention:
    the edit moves h's component in R's row space to the constant b). Kernel: W := 0, a
    constant zero matrix (not a parameter; its kernel gradient is discarded).

    Args: as :class:`LoReFT`. Parameters: ``rotate_raw``, ``bias`` (see _RotatedBias).
    """

    def kernel_params(self):
        R = self.R
        return R, torch.zeros_like(R), self.bias


class LobiReFT(_RotatedBias):
    """LobiReFT Phi(h) = h + R^T b, R orthonormal (pyreft's LobireftIntervention: a
    learned bias in a learned rank-r subspace). Kernel: W := R, so W x - R x cancels
    (exactly: the kernel forms both products from the same tensor) and the gradient
    reaching rotate_raw is the sum of the kernel's R and W gradients.

    Args: as :class:`LoReFT`. Parameters: ``rotate_raw``, ``bias`` (see _RotatedBias).
    """

    def kernel_params(self):
        R = self.R
        return R, R, self.bias


class DiReFT(LoReFT):
    """DiReFT Phi(h) = h + R^T (W h + b), R orthonormal (pyreft's DireftIntervention:
    LoReFT without the -R h term). Kernel: W := W + R.

    (Before this version reft_ext's DiReFT had a free second matrix: that type is
    :class:`NodiReFT` now; see the module docstring.)

    Args: as :class:`LoReFT`.

    Parameters: as :class:`LoReFT` (rotate_raw; weight = W, bias = b as nn.Linear(d, r)).
    """

    def kernel_params(self):
        R = self.R
        return R, self.weight + R, self.bias


class NodiReFT(_Intervention):
    """NodiReFT Phi(h) = h + W2^T (W1 h + b), no orthogonality (pyreft's
    NodireftIntervention). Kernel: R := W2, W := W1 + W2, since

        h + W2^T ((W1 + W2) h + b - W2 h) = h + W2^T (W1 h + b).

    This is the type reft_ext called "direft" before (same parameters and file tensors
    W1, W2, b; such checkpoints load as "nodireft"). pyreft's proj_layer may carry a bias
    (add_bias) that its forward never uses: it has no counterpart here.

    Args: as :class:`LoReFT`. Parameters (nn.Linear(d, r)'s default init, as pyreft):
    ``weight`` = W1 (r, d), ``bias`` = b (r,) (pyreft's learned_source) and ``proj`` = W2
    (r, d) (pyreft's proj_layer.weight).
    """

    SAVED_TENSORS = {"W1": "weight", "W2": "proj", "b": "bias"}

    def __init__(self, d: int, rank: int, *, dtype: torch.dtype | None = None,
                 device=None, dropout: float = 0.0, backend: str = "fused"):
        super().__init__("NodiReFT", d, rank, dropout, backend)
        kw = dict(dtype=_default_dtype(dtype), device=device)
        self.weight = nn.Parameter(torch.empty(rank, d, **kw))
        self.bias = nn.Parameter(torch.empty(rank, **kw))
        self.proj = nn.Parameter(torch.empty(rank, d, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W1, b, W2 as nn.Linear(d, r). Draws from torch's global RNG."""
        _linear_init(self.weight, self.bias, self.proj, d=self.d)

    @property
    def W1(self) -> torch.Tensor:
        """(r, d)."""
        return self.weight

    @property
    def W2(self) -> torch.Tensor:
        """(r, d)."""
        return self.proj

    def kernel_params(self):
        return self.proj, self.weight + self.proj, self.bias


# name (patch()'s intervention=, a checkpoint's "intervention") -> class; each name means
# what pyreft's class of that name means (module docstring).
INTERVENTIONS = {"loreft": LoReFT, "noreft": NoReFT, "consreft": ConsReFT,
                 "lobireft": LobiReFT, "direft": DiReFT, "nodireft": NodiReFT}


def kind_of(module: nn.Module) -> str | None:
    """The registered name of a built-in intervention's exact class, else None."""
    return next((k for k, cls in INTERVENTIONS.items() if type(module) is cls), None)


def build_intervention(intervention, d: int, rank: int, *, dtype: torch.dtype, device,
                       dropout: float = 0.0, backend: str = "fused",
                       **options) -> nn.Module:
    """One intervention module for patch(): ``intervention`` is a registered name
    (case-insensitive) or a factory called as ``factory(d, rank, dtype=..., device=...)``.
    ``options`` are the registered class's OPTIONS (e.g. NoReFT's add_bias=True)."""
    if isinstance(intervention, str):
        cls = INTERVENTIONS.get(intervention.lower())
        if cls is None:
            raise ValueError(f"reft_ext.patch: intervention must be one of "
                             f"{sorted(INTERVENTIONS)} or a factory, got {intervention!r}")
        bad = sorted(set(options) - set(cls.OPTIONS))
        if bad:
            raise ValueError(f"reft_ext.patch: intervention {intervention!r} has no "
                             f"option(s) {bad}")
        return cls(d, rank, dtype=dtype, device=device, dropout=dropout, backend=backend,
                   **options)
    if not callable(intervention):
        raise TypeError(f"reft_ext.patch: intervention must be a str or a callable, got "
                        f"{type(intervention).__name__}")
    return intervention(d, rank, dtype=dtype, device=device)
