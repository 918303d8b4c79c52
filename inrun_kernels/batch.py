"""Batches: a Tensor, a tuple/list of Tensors, or a dict of Tensors; the leading dim indexes
samples, and non-tensor entries are passed through. Train and validation batches are joined
along the sample dim into the one batch the engine runs forward and backward on."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _leaves(batch: Any, where: str) -> list[tuple[str, Tensor]]:
    if isinstance(batch, Tensor):
        return [(where, batch)]
    if isinstance(batch, (tuple, list)):
        return [(f"{where}[{i}]", t) for i, t in enumerate(batch) if isinstance(t, Tensor)]
    if isinstance(batch, dict):
        return [(f"{where}[{k!r}]", t) for k, t in batch.items() if isinstance(t, Tensor)]
    raise TypeError(f"{where}: a batch must be a Tensor, a tuple/list of Tensors or a dict of "
                    f"Tensors, got {type(batch).__name__}")


def batch_size(batch: Any, where: str = "batch") -> int:
    leaves = _leaves(batch, where)
    if not leaves:
        raise ValueError(f"{where} holds no tensor")
    sizes = {}
    for name, t in leaves:
        if t.dim() == 0:
            raise ValueError(f"{name} is a scalar; every tensor of a batch needs a leading sample dim")
        sizes[name] = t.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: tensors disagree on the number of samples: {sizes}")
    return next(iter(sizes.values()))


def concat(train: Any, val: Any) -> Any:
    """train rows first, then val rows; every dim but the first must agree."""
    if type(train) is not type(val) and not (isinstance(train, (tuple, list)) and isinstance(val, (tuple, list))):
        raise TypeError(f"train is a {type(train).__name__} but val is a {type(val).__name__}")

    def join(name: str, a, b):
        if not isinstance(a, Tensor):
            return a
        if not isinstance(b, Tensor):
            raise TypeError(f"train{name} is a Tensor but val{name} is {type(b).__name__}")
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(f"train{name} has shape {tuple(a.shape)} but val{name} has {tuple(b.shape)}: "
                             "all dims but the first (samples) must agree; pad to a common length")
        if a.dtype != b.dtype:
            raise TypeError(f"train{name} is {a.dtype} but val{name} is {b.dtype}")
        return torch.cat([a, b.to(a.device)], 0)

    batch_size(train, "train")
    batch_size(val, "val")
    if isinstance(train, Tensor):
        return join("", train, val)
    if isinstance(train, (tuple, list)):
        if len(train) != len(val):
            raise ValueError(f"train has {len(train)} entries but val has {len(val)}")
        return type(train)(join(f"[{i}]", a, b) for i, (a, b) in enumerate(zip(train, val)))
    if set(train) != set(val):
        raise ValueError(f"train and val have different keys: {sorted(set(train) ^ set(val))}")
    return {k: join(f"[{k!r}]", train[k], val[k]) for k in train}
