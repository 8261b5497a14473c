"""``accelerate launch`` with 2 CPU processes (gloo): a patched model trained through
``accelerator.prepare`` / ``accelerator.backward`` gives the result of the torchrun DDP test.

tests/accelerate_worker.py checks on every rank that the accelerate run and the torchrun DDP
test's own code path (tests/dist_worker.py, run in the same processes from the same init)
end with bitwise-equal interventions. Here, as in tests/test_distributed.py, the losses and
the checkpoint rank 0 saved are compared with one process training on the concatenated
batch, with that test's tolerance (rtol 1e-6 / atol 1e-7: the same gradient summed in
another order; see its docstring).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import reft_ext

pytest.importorskip("accelerate")
pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import accelerate_worker  # noqa: E402  (tests/ is on sys.path)
import dist_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               # no user config file may change the launch (mixed precision, GPUs, ...)
               HF_HOME=str(tmp_path / "hf_home"), ACCELERATE_CONFIG_FILE="")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    # `accelerate launch ...` is `python -m accelerate.commands.launch ...` (no PATH lookup).
    # --multi_gpu picks the torchrun-style launcher; the worker's Accelerator(cpu=True) keeps
    # the processes on the CPU (gloo). See tests/accelerate_worker.py.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           accelerate_worker.__file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, \
        f"accelerate launch failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world"] == 2 and report["wrapper"] == "DistributedDataParallel"

    model = dist_worker.build_model(seed=0)            # one process, the whole batch
    losses = dist_worker.train(model, dist_worker.make_optimizer(model),
                               dist_worker.make_batch(), dist_worker.STEPS)
    torch.testing.assert_close(torch.tensor(report["losses"]),
                               torch.tensor([loss.item() for loss in losses]), rtol=1e-6, atol=0)
    saved = reft_ext.load(reft_ext.unpatch(dist_worker.build_model(seed=1)),
                          tmp_path / "accelerate")
    dist_worker.assert_same_trained_interventions(saved, model)
