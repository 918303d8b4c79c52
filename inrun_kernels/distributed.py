"""The engine under torch.distributed: DistributedDataParallel and FSDP2 (`fully_shard`).

torch.distributed is the scale-out engine; this module only tells the value engine what the
data-parallel step is and moves a few numbers between ranks:

- the global step: DDP and FSDP2 average the ranks' gradients, so sample i of rank r (local
  batch n_r, k micro-batches) owns the share g_i / (W k n_r) of the update, W the world size;
- the step's ids and values, all-gathered at every commit (16 bytes per sample), so every
  rank's ledger holds every rank's samples, identical on all ranks;
- the validation batch: the same on every rank (checked by a fingerprint, one small all_gather
  at set_val), or sharded, in which case the validation gradient is the row-weighted mean over
  the union of the shards (one all-reduce of a gradient-sized vector per step);
- FSDP2 parameters: in forward and backward the layers see FSDP's unsharded parameters, the
  optimizer holds the sharded DTensors; `ParamAliases` maps one to the other.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .batch import _leaves


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:   # pragma: no cover - torch built without distributed
        return False
    return isinstance(t, DTensor)


def _is_fsdp2(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:   # pragma: no cover
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _is_fsdp1(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:   # pragma: no cover
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in model.modules())


def unwrap(model: nn.Module) -> nn.Module:
    """The module holding the layers: DDP's `.module`, torch.compile's `._orig_mod`."""
    while True:
        if _is_ddp(model):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass
class DataParallel:
    """How the gradient of a step is formed across processes. kind: None (one process), "ddp"
    or "fsdp2"; world: the number of ranks averaging their gradients."""
    kind: str | None = None
    group: Any = None
    world: int = 1
    rank: int = 0
    val_rows: list[int] = field(default_factory=list)   # validation rows per rank when sharded

    @property
    def active(self) -> bool:
        return self.kind is not None

    @property
    def val_sharded(self) -> bool:
        return bool(self.val_rows)

    # ---- collectives (every rank calls them in the same order) ----------------------------
    def _device(self, like: Tensor | None = None) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def gather_step(self, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Every rank's (ids, values) of the step, in rank order. Ids travel as float64 (exact
        below 2^53), so one message of 16 bytes per sample after one of the row counts."""
        if not self.active:
            return ids, values
        dev = self._device()
        n = torch.tensor([ids.numel()], dtype=torch.long, device=dev)
        counts = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(counts, n, group=self.group)
        counts = [int(c) for c in counts]
        width = max(counts)
        mine = torch.zeros(width, 2, dtype=torch.float64, device=dev)
        mine[:ids.numel(), 0] = ids.to(dev, torch.float64)
        mine[:ids.numel(), 1] = values.to(dev, torch.float64)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        rows = torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
        return rows[:, 0].long(), rows[:, 1]

    def check_val(self, val: Any, n_val: int) -> None:
        """Set val_rows: [] when every rank holds the same validation batch, else the rows of
        each rank's shard (the validation loss is then the mean over the union)."""
        self.val_rows = []
        if not self.active:
            return
        dev = self._device()
        fp = torch.tensor([float(n_val)] + [_fingerprint(t) for _, t in _leaves(val, "val")],
                          dtype=torch.float64, device=dev)
        size = torch.tensor([fp.numel()], dtype=torch.long, device=dev)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        if len({int(s) for s in sizes}) > 1:
            raise ValueError("the validation batch has a different structure (number of tensors) on "
                             "different ranks; give every rank a batch of the same form")
        fps = [torch.empty_like(fp) for _ in range(self.world)]
        dist.all_gather(fps, fp, group=self.group)
        if all(torch.equal(fps[0], f) for f in fps[1:]):
            return
        self.val_rows = [int(f[0]) for f in fps]

    def val_mean(self, grads: list[Tensor | None], n_val: int) -> list[Tensor | None]:
        """Validation gradients (means over this rank's rows) -> means over the union of the
        shards, weighted by rows: sum_r n_r g_r / sum_r n_r. One all-reduce (flattened)."""
        if not self.val_sharded:
            return grads
        total = sum(self.val_rows)
        live = [g for g in grads if g is not None]
        if not live:
            return grads
        dev = self._device()
        flat = torch.cat([local_shard(g).reshape(-1).to(dev, torch.float64) for g in live]) * (n_val / total)
        dist.all_reduce(flat, group=self.group)
        out, at = [], 0
        for g in grads:
            if g is None:
                out.append(None)
                continue
            loc = local_shard(g)
            part = flat[at:at + loc.numel()].view(loc.shape).to(loc.device, loc.dtype)
            at += loc.numel()
            out.append(_like(g, part))
        return out


def _fingerprint(t: Tensor) -> float:
    """Content hash of a validation tensor, for comparing ranks (not a security hash)."""
    x = t.detach().reshape(-1).to(torch.float64).cpu()
    if x.numel() == 0:
        return 0.0
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64).remainder_(9973).add_(1)
    return float((torch.nan_to_num(x) * w).sum()) + 1e-3 * x.numel()


def local_shard(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def _like(ref: Tensor, local: Tensor) -> Tensor:
    """`local` in the form of `ref` (a DTensor with ref's mesh and placements, or plain)."""
    if not is_dtensor(ref):
        return local
    from torch.distributed.tensor import DTensor
    return DTensor.from_local(local, ref.device_mesh, ref.placements, run_check=False,
                              shape=ref.shape, stride=ref.stride())


def full(t: Tensor) -> Tensor:
    """The whole tensor of a (sharded) DTensor: an all-gather; plain tensors as they are."""
    return t.full_tensor() if is_dtensor(t) else t


def data_parallel(given: nn.Module, inner: nn.Module) -> DataParallel:
    """What the model the user gave implies (called once, at engine construction)."""
    if _is_ddp(given) or any(_is_ddp(m) for m in (getattr(given, "_orig_mod", None),) if m is not None):
        ddp = given if _is_ddp(given) else given._orig_mod
        group = ddp.process_group
        return DataParallel("ddp", group, dist.get_world_size(group), dist.get_rank(group))
    if _is_fsdp1(inner):
        raise TypeError("FSDP1 (FullyShardedDataParallel) flattens parameters into one FlatParameter, "
                        "whose per-sample gradients the layers cannot see: use FSDP2 "
                        "(torch.distributed.fsdp.fully_shard) or DDP")
    if _is_fsdp2(inner):
        group = None
        for p in inner.parameters():
            if is_dtensor(p):
                mesh = p.device_mesh
                if mesh.ndim != 1:
                    raise TypeError(f"FSDP2 on a {mesh.ndim}-D device mesh (HSDP or tensor parallel) is "
                                    "not supported: only 1-D data-parallel sharding")
                group = mesh.get_group()
                break
        world = dist.get_world_size(group)
        return DataParallel("fsdp2", group, world, dist.get_rank(group))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            f"torch.distributed is initialised with {dist.get_world_size()} processes but the model "
            "is neither DistributedDataParallel nor FSDP2: values are those of each process's own "
            "batch and are not gathered. Give InRunShapley the DDP-wrapped model", stacklevel=3)
    return DataParallel()


class ParamAliases:
    """FSDP2 hands the layers its unsharded parameters in forward and backward; the optimizer
    holds the sharded ones. Maps an unsharded parameter (by identity) to the module slot's
    registered (sharded) parameter: a forward pre-hook on every module that owns parameters
    reads the slot while it holds the unsharded one. Empty (no hooks) without FSDP2."""

    def __init__(self, model: nn.Module, enabled: bool):
        self._to: dict[int, nn.Parameter] = {}
        self._hooks = []
        if not enabled:
            return
        for mod in model.modules():
            slots = {name: p for name, p in mod._parameters.items() if p is not None}
            if slots:
                self._hooks.append(mod.register_forward_pre_hook(self._hook(mod, slots)))

    def _hook(self, mod: nn.Module, slots: dict[str, nn.Parameter]):
        def record(_mod, _args):
            for name, canonical in slots.items():
                now = mod._parameters.get(name)
                if now is not None and now is not canonical:
                    self._to[id(now)] = canonical
        return record

    def canonical(self, p: nn.Parameter) -> nn.Parameter:
        return self._to.get(id(p), p)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
