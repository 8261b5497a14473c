"""Build information and the CUDA compatibility rules (issue: wheels).

These run on any machine: the rules are pure functions, and the "no usable CUDA" error is
what every GPU-less machine (CI included) must produce, for CPU-only and CUDA builds alike.
"""
import subprocess
import sys

import pytest
import torch

import reft_ext
from reft_ext import _build, _native
from reft_ext.ops import _cuda

ARCHS_13 = ["75-real", "80-real", "86-real", "89-real", "90-real", "100-real", "120-real",
            "120-virtual"]


@pytest.mark.parametrize("cc, ok", [
    (75, True), (80, True), (86, True), (87, True), (89, True), (90, True), (100, True),
    (103, True), (120, True), (121, True),
    (130, True),   # newer than any SASS: the compute_120 PTX serves it
    (70, False),   # Volta: gone from nvcc 13, and PTX never runs on older GPUs
    (61, False),
])
def test_arch_supported_default_list(cc, ok):
    assert _build.arch_supported(cc, ARCHS_13) is ok


def test_arch_supported_without_ptx():
    archs = ["80-real", "90-real"]
    assert _build.arch_supported(86, archs)       # sm_80 SASS runs on sm_86
    assert not _build.arch_supported(100, archs)  # other major, no PTX
    assert not _build.arch_supported(75, archs)   # older than every entry
    assert _build.arch_supported(120, ["90"])     # a bare "90" is SASS + PTX


def test_build_info_fields():
    info = reft_ext.build_info()
    assert info["native_loaded"] and info["version"] == reft_ext.__version__
    assert info["cpu_isa"] in ("avx512", "avx2+fma", "baseline")
    assert info["compiler"]
    assert set(info["dtypes"]) == {"float32", "bfloat16", "float16", "float64"}
    if info["cuda_kernels"]:
        assert info["cuda_archs"] and info["cuda_runtime"] and info["cuda_compiler"]
    else:
        assert info["cuda_archs"] == [] and info["cuda_status"] == "built without CUDA kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less error path")
def test_cuda_call_without_usable_gpu_raises_clearly():
    with pytest.raises(RuntimeError, match=r"reft_ext\.loreft: tensors are on cuda:0 but "
                       r"(this build of reft_ext has no CUDA kernels.*REFT_EXT_CUDA=ON"
                       r"|no NVIDIA driver was found)"):
        _cuda.cuda_lib("loreft", torch.device("cuda", 0))


def test_main_prints_build_and_self_check():
    out = subprocess.run([sys.executable, "-m", "reft_ext"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"reft_ext {reft_ext.__version__}" in out.stdout
    assert "CUDA kernels: " in out.stdout
    assert "self-check cpu:" in out.stdout and "match the float64 reference" in out.stdout
    if _native.has_cuda_kernels():
        assert "built with CUDA" in out.stdout


@pytest.mark.parametrize("cap, allowed", [("baseline", {"baseline"}),
                                          ("avx2", {"avx2+fma", "baseline"})])
def test_cpu_isa_can_be_capped(cap, allowed):
    # REFT_EXT_CPU_ISA lets CI run the test suite on every kernel variant of one machine.
    import os
    env = dict(os.environ, REFT_EXT_CPU_ISA=cap)
    out = subprocess.run([sys.executable, "-c",
                          "import reft_ext; print(reft_ext.build_info()['cpu_isa'])"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] in allowed
