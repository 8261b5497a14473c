"""examples/ddp.py and examples/fsdp2.py, run as the README says (torchrun, 2 processes,
gloo on the CPU, the built-in model): each trains, saves with reft_ext.save on rank 0 and
checks on every rank that the checkpoint reloads to the trained outputs. Here: the command
succeeded, and the checkpoint it left loads into a fresh built-in base with trained values
(not the initialisation the script patched with)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft_ext

transformers = pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE = Path(reft_ext.__file__).parent / "data" / "base_model"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base():
    return transformers.AutoModelForCausalLM.from_pretrained(BASE).eval()


@pytest.mark.parametrize("script", ["ddp.py", "fsdp2.py"])
def test_example_runs_with_torchrun_on_two_cpu_processes(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"        # never a routable interface
    # `torchrun ARGS` is `python -m torch.distributed.run ARGS`; a free port instead of the
    # default 29500 so that parallel runs on one machine do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(EXAMPLES / script), "--out", "ckpt", "--steps", "3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert "step 3/3" in proc.stdout and "reloaded into a fresh base" in proc.stdout

    cfg = reft_ext.checkpoint.read_config(tmp_path / "ckpt")
    assert cfg["layers"] == [1, 2] and cfg["rank"] == 4
    loaded = reft_ext.load(_base(), tmp_path / "ckpt")
    torch.manual_seed(0)                       # the script's init, before any step
    init = reft_ext.patch(_base(), layers=[1, 2], rank=4, positions="f7+l7")
    for i in ("1", "2"):
        assert not torch.equal(loaded.reft_interventions["default"][i].weight,
                               init.reft_interventions["default"][i].weight), i
