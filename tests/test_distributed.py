"""DDP and FSDP2 (fully_shard) training of a patched model: 2 processes, gloo, CPU.

tests/dist_worker.py (run here by torchrun on 127.0.0.1) trains under both wrappers, saves
from every rank (rank 0 writes; FSDP2 gathers the shards) and checks on every rank that
loading the checkpoint into a fresh wrapped model is bitwise exact. This test runs the same
model, data and optimizer in one process on the whole batch and compares.

Tolerance: parameters after STEPS momentum-SGD steps agree with the single-process run
to rtol = 1e-6, atol = 1e-7 (per-step losses: rtol = 1e-6). Both runs compute the same
mathematical gradient (the mean of the per-rank mean losses over equal token counts is the
batch mean) but sum it in another order (per-rank halves, then an all-reduce average): a
float32 rounding difference of about 1 ulp of the gradient per step. Measured: max
|difference| 1.5e-8 on parameters of magnitude <= 0.6 (about 0.25 ulp there), identical
for DDP and FSDP2; atol is ~7x that.
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

pytest.importorskip("transformers")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import dist_worker  # noqa: E402  (tests/ is on sys.path, like _util)

WORKER = Path(dist_worker.__file__)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"        # never a routable interface
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


@pytest.fixture(scope="module")
def single_process():
    model = dist_worker.build_model(seed=0)
    opt = dist_worker.make_optimizer(model)
    losses = dist_worker.train(model, opt, dist_worker.make_batch(), dist_worker.STEPS)
    return model, [loss.item() for loss in losses]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_matches_single_process_on_concatenated_batch(mode, torchrun_out, single_process):
    model, losses = single_process
    report = json.loads((torchrun_out / "report.json").read_text())
    torch.testing.assert_close(torch.tensor(report[mode]), torch.tensor(losses),
                               rtol=1e-6, atol=0)
    # the checkpoint rank 0 wrote holds the full (gathered) tensors
    cfg = reft_ext.checkpoint.read_config(torchrun_out / mode)
    assert cfg["layers"] == dist_worker.PATCH["layers"]
    dist_worker.assert_same_trained_interventions(
        reft_ext.load(_unpatched(), torchrun_out / mode), model)


def _unpatched():
    return reft_ext.unpatch(dist_worker.build_model(seed=0))
