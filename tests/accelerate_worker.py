"""Worker of tests/test_integration_accelerate.py, run by ``accelerate launch``:

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port PORT tests/accelerate_worker.py OUT_DIR

(--multi_gpu selects accelerate's torchrun-style launcher, which starts the processes; with
``Accelerator(cpu=True)`` they run on the CPU with gloo. ``--cpu`` instead selects the
single-process launcher, which expects mpirun to start CPU processes.)

Every process builds the model of tests/dist_worker.py (tiny Llama, patched with the same
seed), lets ``accelerator.prepare`` wrap the model, the optimizer and a DataLoader of the
fixed batch (accelerate shards it: process i gets rows [2i, 2i+1], the halves
dist_worker.py uses), and trains dist_worker.STEPS steps with ``accelerator.backward``.
Then, in the same processes, the torchrun DDP test's own path (dist_worker._wrap "ddp",
dist_worker.train on the same halves) runs from the same init, and every rank asserts that
the two runs end with bitwise-equal interventions. Rank 0 saves the accelerate run with
``reft_ext.save(accelerator.unwrap_model(model), OUT_DIR/accelerate)`` and writes
OUT_DIR/report.json (per-step losses averaged over the processes, the wrapper's type).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dist_worker  # noqa: E402

import reft_ext  # noqa: E402


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith("reft_interventions.")}


def main(out: Path) -> None:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader, TensorDataset

    # cpu=True: without it, on a machine with no GPU, accelerate 1.x leaves each launched
    # process on its own (DistributedType.NO, world size 1): two unrelated runs.
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2 and torch.distributed.get_backend() == "gloo", \
        (accelerator.distributed_type, world)
    ids = dist_worker.make_batch()
    mine = ids[rank * dist_worker.B // world:(rank + 1) * dist_worker.B // world]

    model = dist_worker.build_model(seed=0)
    opt = dist_worker.make_optimizer(model)
    loader = DataLoader(TensorDataset(ids), batch_size=dist_worker.B // world, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    losses = []
    for _ in range(dist_worker.STEPS):
        for (x,) in loader:                        # one batch per process per epoch
            assert torch.equal(x, mine)
            opt.zero_grad()
            loss = model(input_ids=x, labels=x).loss
            accelerator.backward(loss)
            opt.step()
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    ours = _params(accelerator.unwrap_model(model))
    reft_ext.save(accelerator.unwrap_model(model), out / "accelerate")   # rank 0 writes
    accelerator.wait_for_everyone()

    # the torchrun DDP test's code path, same processes, same init and data
    ddp = dist_worker._wrap(dist_worker.build_model(seed=0), "ddp")
    dist_worker.train(ddp, dist_worker.make_optimizer(ddp), mine, dist_worker.STEPS)
    theirs = _params(ddp.module)
    assert ours.keys() == theirs.keys() and len(ours) == 3 * len(dist_worker.PATCH["layers"])
    for k in ours:
        assert torch.equal(ours[k].view(torch.int32), theirs[k].view(torch.int32)), k

    if accelerator.is_main_process:
        (out / "report.json").write_text(json.dumps(
            {"losses": losses, "wrapper": type(model).__name__, "world": world}))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
