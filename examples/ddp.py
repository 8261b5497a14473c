"""DDP training of a patched model, saved with reft_ext.save and loaded back.

    torchrun --nproc_per_node=2 examples/ddp.py                      # 2 CPU processes, gloo
    torchrun --nproc_per_node=8 examples/ddp.py --device cuda        # 8 GPUs, nccl

By default it trains reft_ext's built-in tiny Llama (no download); --model DIR takes a local
Hugging Face causal LM instead. The data is generated: put your own batches in its place.
"""
import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoModelForCausalLM

import reft_ext

ap = argparse.ArgumentParser()
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--model", default=Path(reft_ext.__file__).parent / "data" / "base_model")
ap.add_argument("--out", default="out/reft-ddp")
ap.add_argument("--steps", type=int, default=10)
args = ap.parse_args()

dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
rank = dist.get_rank()
if args.device == "cuda":
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))   # one GPU per process
    torch.cuda.set_device(device)
else:
    device = torch.device("cpu")

model = AutoModelForCausalLM.from_pretrained(args.model).to(device)
torch.manual_seed(0)                       # the same init on every rank
reft_ext.patch(model, layers=[1, 2], rank=4, positions="f7+l7")   # built-in model: 4 layers
ddp = DDP(model)
opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=4e-3)

# each rank its own shard of the data: here a fixed batch of random tokens per rank
g = torch.Generator().manual_seed(rank)
ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=g).to(device)
for step in range(args.steps):
    loss = ddp(input_ids=ids, labels=ids).loss
    loss.backward()                        # DDP averages the interventions' gradients
    opt.step()
    opt.zero_grad()
    loss = loss.detach()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    if rank == 0:
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}")

reft_ext.save(ddp, args.out)               # unwraps DDP; rank 0 writes
dist.barrier()                             # the other ranks read the directory next

# every rank: the checkpoint into a fresh base gives the trained model's outputs
base = AutoModelForCausalLM.from_pretrained(args.model).to(device)
loaded = reft_ext.load(base, args.out)
model.eval()
with torch.no_grad():
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
if rank == 0:
    print(f"saved {args.out}; reloaded into a fresh base: same logits")
dist.destroy_process_group()
