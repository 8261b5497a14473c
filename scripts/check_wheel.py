"""Inspects a built reft_ext wheel: the CUDA architectures inside it and what it links.

    python scripts/check_wheel.py dist/reft_ext_cu13-*.whl --expect-archs 75,80,86,89,90,100,120 --expect-ptx 120
    python scripts/check_wheel.py dist/reft_ext-*.whl --cpu

Checks: the compiled module exists; it does not depend on libcudart (the runtime is
static) nor on a vendored OpenMP; for a CUDA wheel, `cuobjdump` lists an sm_XX cubin for
every expected architecture and PTX for the expected virtual ones; for a CPU wheel, no
CUDA code at all. Exits non-zero with the reason on any failure.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def find_cuobjdump() -> str:
    exe = shutil.which("cuobjdump")
    if exe:
        return exe
    try:  # the nvidia-cuda-cuobjdump wheel
        import nvidia  # type: ignore

        for root in nvidia.__path__:
            for cand in Path(root).glob("*/bin/cuobjdump"):
                return str(cand)
    except ImportError:
        pass
    sys.exit("check_wheel: cuobjdump not found (pip install nvidia-cuda-cuobjdump)")


def needed_libs(so: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True)
    return re.findall(r"\(NEEDED\).*\[(.+?)\]", out.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel")
    ap.add_argument("--cpu", action="store_true", help="expect no CUDA code")
    ap.add_argument("--expect-archs", default="", help="comma list of sm numbers (SASS)")
    ap.add_argument("--expect-ptx", default="", help="comma list of compute numbers (PTX)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(args.wheel).extractall(tmp)
        mods = list(Path(tmp).glob("reft_ext/_C*.so"))
        if len(mods) != 1:
            sys.exit(f"check_wheel: expected one reft_ext/_C*.so in {args.wheel}, found {mods}")
        so = mods[0]
        libs = needed_libs(so)
        print(f"{Path(args.wheel).name}: {so.name}, {so.stat().st_size / 1e6:.1f} MB, "
              f"NEEDED {libs}")
        bad = [lib for lib in libs if lib.startswith(("libcudart", "libgomp", "libomp", "libiomp"))]
        if bad:
            sys.exit(f"check_wheel: the module depends on {bad}; the CUDA runtime must be "
                     "static and no OpenMP runtime may be linked")
        has_cuda_strings = b"__nv_module_id" in so.read_bytes() or b".nv_fatbin" in so.read_bytes()
        if args.cpu:
            if has_cuda_strings:
                sys.exit("check_wheel: a CPU wheel contains CUDA code")
            print("ok: CPU-only module, no CUDA code")
            return 0
        listing = subprocess.run([find_cuobjdump(), "--list-elf", "--list-ptx", str(so)],
                                 capture_output=True, text=True)
        if listing.returncode != 0:
            sys.exit(f"check_wheel: cuobjdump failed: {listing.stderr.strip()}")
        sass = sorted({int(m) for m in re.findall(r"\.sm_(\d+)[a-z]?\.cubin", listing.stdout)})
        ptx = sorted({int(m) for m in re.findall(r"\.sm_(\d+)[a-z]?\.ptx", listing.stdout)})
        print(f"SASS: {', '.join(f'sm_{a}' for a in sass)}; PTX: "
              f"{', '.join(f'compute_{a}' for a in ptx) or 'none'}")
        for kind, expected, found in (("SASS", args.expect_archs, sass), ("PTX", args.expect_ptx, ptx)):
            missing = [int(a) for a in expected.split(",") if a and int(a) not in found]
            if missing:
                sys.exit(f"check_wheel: {kind} missing for {missing}")
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
