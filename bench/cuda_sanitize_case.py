"""A small forward + backward of every CUDA kernel path, once, for compute-sanitizer
(run by bench/gpu_check.sh under memcheck, racecheck, synccheck and initcheck).

Paths covered: register-cached rows (aligned, r <= 64) and the general path (unaligned
rows, odd d, r > 64), loreft and loreft_, empty slots, int32 positions, every h dtype,
the parameter-gradient reduction with several row chunks, the positions check with and
without the shared-memory bitmap, and an empty problem. Exits nonzero on a wrong result.
"""
from __future__ import annotations

import torch

import reft_ext
from reft_ext.ops.reference import loreft_reference

DEV = "cuda"


def case(B, T, d, r, P, dtype, pdtype, inplace, pos_dtype=torch.int64, shift=0):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + d + r)
    base = torch.randn(B, T, d + shift, generator=g).to(dtype).to(DEV)
    h = base[..., shift:]  # shift > 0: rows not 16-byte aligned
    pos = torch.full((B, P), -1, dtype=torch.int64)
    for i in range(B):
        k = min(P, T) - (1 if P > 1 else 0)  # leave an empty slot
        pos[i, torch.randperm(P, generator=g)[:k]] = torch.randperm(T, generator=g)[:k]
    pos = pos.to(pos_dtype).to(DEV)
    R = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0].T
    params = [t.to(pdtype).to(DEV).requires_grad_() for t in
              (R, 0.1 * torch.randn(r, d, generator=g), torch.randn(r, generator=g))]
    grad = torch.randn(B, T, d, generator=g).to(dtype).to(DEV)
    leaf = h.detach().clone().requires_grad_()
    x = leaf.clone() if inplace else leaf
    out = (reft_ext.loreft_ if inplace else reft_ext.loreft)(x, pos, *params)
    out.backward(grad)
    ref = loreft_reference(h.double(), pos, *(p.detach().double() for p in params))
    err = (out.detach().double() - ref).abs().max().item()
    tol = 0.1 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    assert err < tol * max(1.0, ref.abs().max().item()), (B, T, d, r, P, dtype, err)
    assert all(torch.isfinite(t.grad).all() for t in (leaf, *params))


def main():
    torch.manual_seed(0)
    case(2, 8, 256, 8, 5, torch.bfloat16, torch.float32, inplace=True)
    case(2, 8, 256, 8, 5, torch.bfloat16, torch.bfloat16, inplace=False, pos_dtype=torch.int32)
    case(1, 6, 4096, 8, 4, torch.float16, torch.float32, inplace=True)          # 2 iterations
    case(1, 4, 8192, 4, 3, torch.bfloat16, torch.float32, inplace=False)        # 4 iterations
    case(2, 8, 128, 8, 5, torch.float32, torch.float32, inplace=True, shift=1)  # unaligned
    case(2, 9, 17, 5, 4, torch.float64, torch.float64, inplace=False)           # odd d
    case(2, 16, 192, 70, 6, torch.float32, torch.float32, inplace=True)         # r > 64
    case(8, 64, 64, 3, 48, torch.bfloat16, torch.float32, inplace=False)        # many chunks
    case(1, 300_000, 16, 2, 3, torch.float32, torch.float32, inplace=False)     # no bitmap
    case(2, 5, 8, 2, 0, torch.float32, torch.float32, inplace=True)             # empty
    torch.cuda.synchronize()
    print("sanitize case: all paths ran and matched the reference")


if __name__ == "__main__":
    main()
