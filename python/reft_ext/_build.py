"""What this installation of reft_ext was built with, and whether it can run here."""
from __future__ import annotations

import functools

import torch

from . import _native
from ._version import __version__


def _version_str(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def parse_archs(archs: list[str]) -> tuple[list[int], list[int]]:
    """Splits CMake arch entries ("90-real", "120-virtual", "86") into (SASS, PTX) lists of
    compute capabilities as ints (major*10 + minor)."""
    sass, ptx = [], []
    for a in archs:
        num, _, kind = a.partition("-")
        cc = int("".join(ch for ch in num if ch.isdigit()))
        if kind in ("", "real"):
            sass.append(cc)
        if kind in ("", "virtual"):
            ptx.append(cc)
    return sass, ptx


def arch_supported(cc: int, archs: list[str]) -> bool:
    """Whether a GPU of compute capability cc (e.g. 90) can run a module built for archs.

    SASS for sm_XY runs on sm_XZ with Z >= Y (same major); PTX for compute_N is JIT-compiled
    by the driver for any cc >= N.
    """
    sass, ptx = parse_archs(archs)
    return (any(s // 10 == cc // 10 and s <= cc for s in sass)
            or any(p <= cc for p in ptx))


def cuda_problem(device: torch.device | None = None) -> str | None:
    """Returns why the CUDA kernels cannot run on `device` (default: the current one), or
    None when they can. Each reason says what to install or build instead."""
    lib = _native.lib()
    if not lib.has_cuda:
        return ("this build of reft_ext has no CUDA kernels (CPU-only wheel or "
                "REFT_EXT_CUDA=OFF); install reft_ext_cu12 / reft_ext_cu13 matching your "
                "driver, or rebuild with REFT_EXT_CUDA=ON")
    return _cuda_problem_cached(torch.device("cuda", torch.cuda.current_device())
                                if device is None or device.index is None else device)


@functools.lru_cache(maxsize=None)
def _cuda_problem_cached(device: torch.device) -> str | None:
    lib = _native.lib()
    built = lib.cuda_runtime_version()
    driver = lib.cuda_driver_version()
    if driver == 0:
        return ("no NVIDIA driver was found; reft_ext's CUDA kernels need one "
                f"(built with CUDA {_version_str(built)})")
    if driver < built and driver // 1000 != built // 1000:
        # Minor-version compatibility lets a driver run any runtime of its own major.
        return (f"the NVIDIA driver supports CUDA {_version_str(driver)} but reft_ext was "
                f"built with CUDA {_version_str(built)}; update the driver, or install "
                f"reft_ext_cu{driver // 1000} (built for your driver's CUDA major)")
    err, count, msg = lib.cuda_device_count()
    if err:
        return f"the CUDA runtime reports: {msg}"
    major, minor = torch.cuda.get_device_capability(device)
    archs = [a for a in lib.cuda_archs.split(",") if a]
    if not arch_supported(major * 10 + minor, archs):
        return (f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) is not among the "
                f"architectures this build holds ({', '.join(archs)}) and no PTX can serve "
                f"it; rebuild from source with CUDAARCHS={major}{minor} REFT_EXT_CUDA=ON")
    return None


def build_info() -> dict:
    """Returns a dict describing the native build and the CUDA runtime state.

    Keys: version, native_loaded, native_error, cuda_kernels (bool), cuda_runtime
    (CUDA version built with, e.g. "13.0", or None), cuda_driver (CUDA version the driver
    supports, or None), cuda_archs (list of str), cuda_devices (int or None), cuda_status
    (why CUDA kernels can or cannot run here), compiler, cuda_compiler, torch, dtypes,
    cpu_isa (instruction set the CPU kernels use here).
    """
    lib = _native._C
    info = {
        "version": __version__,
        "native_loaded": lib is not None,
        "native_error": None if lib is not None else str(_native.LOAD_ERROR),
        "cuda_kernels": bool(lib is not None and lib.has_cuda),
        "cuda_runtime": None,
        "cuda_driver": None,
        "cuda_archs": [a for a in (lib.cuda_archs if lib is not None else "").split(",") if a],
        "cuda_devices": None,
        "cuda_status": "built without CUDA kernels",
        "compiler": lib.cxx_compiler if lib is not None else None,
        "cuda_compiler": getattr(lib, "cuda_compiler", None),
        "torch": torch.__version__,
        "dtypes": ["float32", "bfloat16", "float16", "float64"],
        "cpu_isa": lib.cpu_isa() if lib is not None else None,
    }
    if info["cuda_kernels"]:
        info["cuda_runtime"] = _version_str(lib.cuda_runtime_version())
        drv = lib.cuda_driver_version()
        info["cuda_driver"] = _version_str(drv) if drv else None
        err, count, msg = lib.cuda_device_count()
        info["cuda_devices"] = count if err == 0 else 0
        if err or not count:
            info["cuda_status"] = f"no usable CUDA device: {msg or 'none found'}"
        else:
            problems = [p for i in range(count)
                        if (p := cuda_problem(torch.device("cuda", i))) is not None]
            info["cuda_status"] = ("; ".join(problems) if problems
                                   else f"{count} CUDA device(s) usable")
    return info
