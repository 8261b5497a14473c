"""What this installation of reft_ext was built with, and what it can run here."""
from __future__ import annotations

import torch

from . import _native


def build_info() -> dict:
    """Returns a dict describing the native build and the CUDA runtime state.

    Keys: version, native_loaded, native_error, cuda_kernels (bool), cuda_runtime
    (e.g. "13.0" or None), cuda_archs (list of str), cuda_devices (int or None),
    cuda_status (why CUDA kernels can or cannot run here), torch, dtypes, cpu_isa
    (instruction set the CPU kernels use here).
    """
    from . import __version__

    lib = _native._C
    info = {
        "version": __version__,
        "native_loaded": lib is not None,
        "native_error": None if lib is not None else str(_native.LOAD_ERROR),
        "cuda_kernels": bool(lib is not None and lib.has_cuda),
        "cuda_runtime": None,
        "cuda_archs": [a for a in (lib.cuda_archs if lib is not None else "").split(",") if a],
        "cuda_devices": None,
        "cuda_status": "built without CUDA kernels",
        "torch": torch.__version__,
        "dtypes": ["float32", "bfloat16", "float16", "float64"],
        "cpu_isa": lib.cpu_isa() if lib is not None else None,
    }
    if info["cuda_kernels"]:
        v = lib.cuda_runtime_version()
        info["cuda_runtime"] = f"{v // 1000}.{(v % 1000) // 10}"
        err, count, msg = lib.cuda_device_count()
        info["cuda_devices"] = count if err == 0 else 0
        info["cuda_status"] = (f"{count} CUDA device(s) usable" if err == 0 and count
                               else f"no usable CUDA device: {msg}")
    return info
