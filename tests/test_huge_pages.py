"""Fresh (B, T, d) CPU buffers of the ops (loreft's output, the backward's copy of a
gradient the caller keeps) are advised onto transparent huge pages (_ops._fresh_copy).

The advice is checked where the kernel records it: the "hg" flag (MADV_HUGEPAGE) in the
VmFlags of the mapping that holds the tensor, in /proc/self/smaps. Whether the kernel then
finds free huge pages is its business; the values must be right either way.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft_ext
from reft_ext import _native, _ops
from _util import check_against_reference, make_inputs, seed_of

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not _THP.exists()
    or "[never]" in _THP.read_text(),
    reason="needs Linux with transparent huge pages enabled (always or madvise)")


def _vm_flags(ptr: int) -> set:
    """VmFlags of this process's mapping that contains address ptr."""
    current = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            current = int(m.group(1), 16) <= ptr < int(m.group(2), 16)
        elif current and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def _middle(t: torch.Tensor) -> int:
    # The buffer's ends may share a 4 KiB page with other memory, never its middle.
    return t.data_ptr() + t.nbytes // 2


def test_output_and_copied_gradient_are_advised_and_correct():
    # B=2, T=160, d=4096 float32: 5 MiB per tensor, over the 4 MiB threshold.
    h, pos, R, W, b, g = make_inputs(seed_of("huge"), 2, 160, 4096, 4, 7)
    out, dh, *_ = check_against_reference(h, pos, R, W, b, g, "cpu", inplace=False)
    assert "hg" in _vm_flags(_middle(out)), "loreft's output was not advised"
    # grad_from="caller": the backward had to copy g, into a fresh advised buffer.
    assert "hg" in _vm_flags(_middle(dh)), "the backward's copy of the gradient was not advised"


def test_advice_covers_only_whole_huge_pages_inside_the_buffer():
    lib = _native.lib()
    small = torch.empty(1 << 20, dtype=torch.uint8)  # 1 MiB: holds no aligned 2 MiB page
    assert lib.advise_huge_pages(small.data_ptr(), small.nbytes) is False
    big = torch.empty(8 << 20, dtype=torch.uint8)
    assert lib.advise_huge_pages(big.data_ptr(), big.nbytes) is True
    assert "hg" in _vm_flags(_middle(big))


def test_small_outputs_are_left_alone(monkeypatch):
    calls = []
    lib = _native.lib()
    monkeypatch.setattr(_native, "lib", lambda: _Spy(lib, calls))
    h, pos, R, W, b, _ = make_inputs(seed_of("small"), 2, 8, 64, 2, 3)
    reft_ext.loreft(h, pos, R, W, b)
    assert calls == [], "a buffer under 4 MiB must not be advised"
    h, pos, R, W, b, _ = make_inputs(seed_of("large"), 1, 1024, 1024, 2, 3)
    reft_ext.loreft(h, pos, R, W, b)
    assert calls == [h.nbytes]


class _Spy:
    def __init__(self, lib, calls):
        self._lib, self._calls = lib, calls

    def advise_huge_pages(self, ptr, nbytes):
        self._calls.append(nbytes)
        return self._lib.advise_huge_pages(ptr, nbytes)

    def __getattr__(self, name):
        return getattr(self._lib, name)


def test_env_switch_turns_the_advice_off():
    # A fresh process: its first 8 MiB allocation gets a mapping of its own.
    code = ("import torch, reft_ext, test_huge_pages as t\n"
            "h = torch.randn(1, 512, 4096)\n"
            "out = reft_ext.loreft(h, torch.tensor([[3]]), torch.eye(2, 4096), "
            "torch.zeros(2, 4096), torch.zeros(2))\n"
            "print('hg' in t._vm_flags(t._middle(out)))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    results = {}
    for value in ("0", "1"):
        env["REFT_EXT_HUGE_PAGES"] = value
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        results[value] = run.stdout.strip().splitlines()[-1]
    assert results == {"0": "False", "1": "True"}
