"""In-Run Data Shapley with FSDP2 (torch.distributed.fsdp.fully_shard).

    torchrun --standalone --nproc_per_node 2 examples/fsdp2.py        # CPU (gloo) or one GPU per process (nccl)

Parameters are sharded across ranks; the engine maps the unsharded parameters the layers see
in forward back to the optimizer's sharded ones."""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard

import inrun_kernels as ik


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def main():
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    X, Y = torch.randn(512, 20), torch.randint(0, 3, (512,))
    val = (X[:32].to(dev), Y[:32].to(dev))
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3)).to(dev)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    eng = ik.InRunShapley(model, opt, loss_fn, val, num_samples=len(X), estimator="midpoint")
    mine = torch.arange(32 + rank, len(X), world)
    for step in range(5):
        ids = mine[step * 8:(step + 1) * 8]
        opt.zero_grad()
        eng.step((X[ids].to(dev), Y[ids].to(dev)), ids)
        opt.step()
    if rank == 0:
        print(f"{int((eng.counts > 0).sum())} samples valued on {world} ranks (FSDP2); "
              f"sum of values {eng.values.sum().item():+.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
