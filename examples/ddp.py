"""In-Run Data Shapley under DistributedDataParallel, with gradient accumulation.

    torchrun --standalone --nproc_per_node 2 examples/ddp.py          # CPU (gloo) or one GPU per process (nccl)

Every rank trains on its own shard of the data; after each optimizer step every rank's
`eng.values` holds the values of every rank's samples (identical on all ranks)."""
import contextlib
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik


def loss_fn(model, batch):                       # per-sample losses [B]
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def main():
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)                         # same data and initial weights on every rank
    X, Y = torch.randn(512, 20), torch.randint(0, 3, (512,))
    val = (X[:32].to(dev), Y[:32].to(dev))       # the same validation batch on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 3)).to(dev)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    k = 2                                        # micro-batches per optimizer step
    eng = ik.InRunShapley(ddp, opt, loss_fn, val, num_samples=len(X), accumulation_steps=k)
    mine = torch.arange(32 + rank, len(X), world)   # this rank's shard of the training rows
    for step in range(5):
        opt.zero_grad()
        for j in range(k):
            ids = mine[(step * k + j) * 8:(step * k + j + 1) * 8]
            sync = contextlib.nullcontext() if j == k - 1 else ddp.no_sync()
            with sync:                           # DDP syncs gradients on the last micro-batch
                eng.step((X[ids].to(dev), Y[ids].to(dev)), ids)
        opt.step()                               # values of all ranks' samples recorded here
    seen = eng.counts > 0
    if rank == 0:
        print(f"{int(seen.sum())} samples valued on {world} ranks; "
              f"top: {eng.values.argmax().item()}, sum of values {eng.values.sum().item():+.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
