"""Worker of tests/test_distributed.py: DDP and FSDP2 training of a patched model.

Run by torchrun with 2 processes, gloo backend, CPU only:

    python -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 \
        --master_port=PORT tests/dist_worker.py OUT_DIR

For each mode (ddp, fsdp2) every rank builds the same tiny Llama, patches it (same seed,
so the ranks start identical), wraps it and trains STEPS momentum-SGD steps on its half of
a fixed batch, calling reft_ext.save on every rank (FSDP2 gathers the sharded parameters
and optimizer state; rank 0 writes) after RESUME_AT steps, with the optimizer, and at the
end (OUT_DIR/<mode>). Then every rank resumes: loads the step-RESUME_AT checkpoint into a
freshly patched (other seed) and wrapped model, checks its shards reassemble the file,
restores the optimizer state, trains the remaining steps and checks that the parameters
equal the uninterrupted run's bitwise. Rank 0 writes OUT_DIR/report.json (per-step
losses, averaged over the ranks). The test compares OUT_DIR/<mode> with a single-process
run on the whole batch.

The model/data/optimizer helpers are imported by the test too, so both sides agree.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import reft_ext

B, T, VOCAB, D, LAYERS, STEPS, RESUME_AT = 4, 8, 97, 32, 3, 4, 2
PATCH = dict(layers=[0, 2], rank=4, positions="f2+l2")


def build_model(seed: int = 0):
    """Tiny Llama, patched; the same on every process for the same seed."""
    import transformers as tf
    torch.manual_seed(1234)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).train()
    torch.manual_seed(seed)
    p = dict(PATCH)
    return reft_ext.patch(model, p.pop("layers"), p.pop("rank"), **p)


def make_batch():
    """(B, T) input_ids without padding: every rank's half has the same number of label
    tokens, so the mean of the per-rank mean losses is the whole batch's mean loss."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, VOCAB, (B, T), generator=g)


def make_optimizer(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5,
                           momentum=0.9)


def train(model, opt, ids, steps):
    """Returns the per-step losses."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def assert_same_trained_interventions(loaded, model):
    """The interventions of `loaded` (a checkpoint read back) equal `model`'s, and training
    moved them away from the initialisation (test helper; runs in the test process)."""
    import torch
    ours = dict(model.named_parameters())
    n = 0
    for name, p in loaded.named_parameters():
        if name.startswith("reft_interventions."):
            assert p.shape == ours[name].shape
            torch.testing.assert_close(p, ours[name], rtol=1e-6, atol=1e-7)
            n += 1
    assert n == 3 * len(PATCH["layers"])
    init = build_model(seed=0)
    assert not torch.equal(init.reft_interventions["default"]["0"].weight,
                           ours["reft_interventions.default.0.weight"])


def _wrap(model, mode):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_params(model):
    out = {}
    for n, p in reft_ext.checkpoint._dist.unwrap(model)[0].named_parameters():
        if n.startswith("reft_interventions."):
            out[n] = reft_ext.checkpoint._dist.full(p).clone()
    return out


def main(out: Path) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = make_batch()
    mine = ids[rank * B // world:(rank + 1) * B // world]
    report = {}
    for mode in ("ddp", "fsdp2"):
        model = _wrap(build_model(seed=0), mode)
        opt = make_optimizer(model)
        losses = train(model, opt, mine, RESUME_AT)
        reft_ext.save(model, out / f"{mode}_step{RESUME_AT}", optimizer=opt)   # every rank
        losses += train(model, opt, mine, STEPS - RESUME_AT)
        for loss in losses:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        reft_ext.save(model, out / mode)               # every rank; rank 0 writes
        dist.barrier()

        # resume on every rank: a freshly patched (other seed) and wrapped model, the
        # checkpoint of step RESUME_AT and its optimizer state, then the remaining steps
        fresh = _wrap(build_model(seed=1), mode)
        ck = out / f"{mode}_step{RESUME_AT}"
        reft_ext.load(fresh, ck)
        saved = load_file(ck / reft_ext.checkpoint.WEIGHTS_NAME)
        names = {"rotate_raw": "rotate_raw", "weight": "W", "bias": "b"}
        for n, v in _full_params(fresh).items():       # the loaded shards make up the file
            _, _, i, pname = n.split(".")      # reft_interventions.default.{i}.{p}
            assert torch.equal(v, saved[f"layers.{i}.{names[pname]}"]), n
        opt2 = make_optimizer(fresh)
        reft_ext.load_optimizer(opt2, ck)
        train(fresh, opt2, mine, STEPS - RESUME_AT)
        a, b = _full_params(model), _full_params(fresh)
        assert a.keys() == b.keys() and len(a) == 3 * len(PATCH["layers"])
        for k in a:                                    # bitwise, as in one process
            assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), (mode, k)
        report[mode] = [loss.item() for loss in losses]
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(Path(sys.argv[1]))
