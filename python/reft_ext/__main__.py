"""`python -m reft_ext`: build information and a quick self-check against the reference."""
from __future__ import annotations

import sys
import time

import torch


def self_check(device: str, seconds: float = 1.0) -> str:
    """Runs random LoReFT problems on `device` against the float64 reference until
    `seconds` have passed; returns a one-line summary or raises AssertionError."""
    import reft_ext
    from reft_ext.ops import loreft_reference

    gen = torch.Generator().manual_seed(0)
    start, cases = time.perf_counter(), 0
    while cases == 0 or time.perf_counter() - start < seconds:
        B, T, d, r = 2, 9, 33 + cases % 7, 1 + cases % 4
        P = 5
        h = torch.randn(B, T, d, generator=gen)
        pos = torch.stack([torch.randperm(T, generator=gen)[:P] for _ in range(B)])
        pos[0, -1] = -1
        R, W, b = (torch.randn(r, d, generator=gen), torch.randn(r, d, generator=gen),
                   torch.randn(r, generator=gen))
        params = [t.to(device, copy=True).requires_grad_() for t in (R, W, b)]
        hd = h.to(device, copy=True).requires_grad_()
        href = h.detach().double().requires_grad_()
        pref = [t.detach().double().requires_grad_() for t in (R, W, b)]
        ref = loreft_reference(href, pos, *pref)
        ref.square().sum().backward()
        out = reft_ext.loreft(hd, pos.to(device), *params)
        out.square().sum().backward()
        for name, got, want in zip(("output", "dh", "dR", "dW", "db"),
                                   (out.detach(), hd.grad, *(p.grad for p in params)),
                                   (ref.detach(), href.grad, *(p.grad for p in pref))):
            err = ((got.cpu().double() - want).abs().max() / (1 + want.abs().max())).item()
            if not err < 1e-4:  # float32 accumulation over a few rows
                raise AssertionError(f"self-check failed on {device}: {name} relative "
                                     f"error {err:.3g} (B={B} T={T} d={d} r={r})")
        cases += 1
    return f"{device}: {cases} random problems, forward + backward, match the float64 reference"


USAGE = """\
usage: reft-ext [-h] {train,generate,check} ...

LoReFT (representation finetuning) as a PyTorch extension.

commands:
  train     train LoReFT interventions on a JSONL of {"prompt", "response"} records
  generate  generate with a saved LoReFT checkpoint
  check     build information and a quick self-check against the reference
            (also what `reft-ext` / `python -m reft_ext` with no arguments runs)

`reft-ext COMMAND -h` shows a command's options and their defaults."""

SUBCOMMANDS = ("train", "generate", "check")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "generate"):
        from reft_ext.cli import run
        return run(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "check":
        if argv[1:] in (["-h"], ["--help"]):
            print("usage: reft-ext check\n\nPrints build information and runs a quick "
                  "self-check of the kernels against the float64 reference.")
            return 0
        if argv[1:]:
            print(f"reft-ext check: error: unexpected arguments: {' '.join(argv[1:])}",
                  file=sys.stderr)
            return 2
    elif argv:
        # Anything else used to fall through to the self-check and exit 0, so a typo
        # (`reft-ext trian`) looked like success: refuse it in one line, exit 2 like argparse.
        what = "option" if argv[0].startswith("-") else "command"
        print(f"reft-ext: error: unknown {what} {argv[0]!r} (choose from "
              f"{', '.join(SUBCOMMANDS)}; see reft-ext --help)", file=sys.stderr)
        return 2
    return check()


def check() -> int:
    """`reft-ext check`: build information, then the self-check on every usable device."""
    import reft_ext

    info = reft_ext.build_info()
    print(f"reft_ext {info['version']}  (torch {info['torch']})")
    if not info["native_loaded"]:
        print(f"native module: NOT LOADED ({info['native_error']})")
        return 1
    print(f"compiled with {info['compiler']}"
          + (f" and {info['cuda_compiler']}" if info["cuda_compiler"] else ""))
    if info["cuda_kernels"]:
        print(f"CUDA kernels: built with CUDA {info['cuda_runtime']} for "
              f"{', '.join(info['cuda_archs'])}; driver supports CUDA "
              f"{info['cuda_driver'] or '(no driver)'}; {info['cuda_status']}")
    else:
        print("CUDA kernels: not built (CPU kernels only)")
    print(f"CPU kernels: {info['cpu_isa']}, {torch.get_num_threads()} threads")
    print("self-check " + self_check("cpu"))
    if info["cuda_kernels"] and info["cuda_status"].endswith("usable") and \
            torch.cuda.is_available():
        print("self-check " + self_check("cuda"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
