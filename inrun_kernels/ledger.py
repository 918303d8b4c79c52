"""Values by sample id: float64 sums over steps, how often each id was seen, save/load."""
from __future__ import annotations

import os
import tempfile

import torch
from torch import Tensor


def check_ids(ids, n: int, num_samples: int | None) -> Tensor:
    """ids as a LongTensor [n] of dataset indices, or a clear error."""
    if not isinstance(ids, Tensor):
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError) as e:
            raise TypeError(f"ids must be a LongTensor of dataset indices, got {type(ids).__name__}") from e
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integer dataset indices, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"ids must have shape [{n}] (one per training sample), got {tuple(ids.shape)}")
    ids = ids.long().cpu()
    if n and int(ids.min()) < 0:
        raise ValueError(f"ids must be >= 0, got {ids[ids < 0].tolist()}")
    if num_samples is not None and n and int(ids.max()) >= num_samples:
        raise ValueError(f"ids must be < num_samples={num_samples}, got {ids[ids >= num_samples].tolist()}")
    return ids


class ValueLedger:
    """values[i]: sum of sample i's per-step values; counts[i]: steps in which it appeared.
    With num_samples=None the ledger grows to the largest id seen."""

    def __init__(self, num_samples: int | None = None):
        if num_samples is not None and num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        n = num_samples or 0
        self.values = torch.zeros(n, dtype=torch.float64)
        self.counts = torch.zeros(n, dtype=torch.long)

    def _grow(self, size: int) -> None:
        if size > self.values.shape[0]:
            extra = size - self.values.shape[0]
            self.values = torch.cat([self.values, torch.zeros(extra, dtype=torch.float64)])
            self.counts = torch.cat([self.counts, torch.zeros(extra, dtype=torch.long)])

    def add(self, ids, values: Tensor) -> None:
        ids = check_ids(ids, values.shape[0], self.num_samples)
        values = values.detach().to("cpu", torch.float64)
        if not torch.isfinite(values).all():
            bad = ids[~torch.isfinite(values)].tolist()
            raise FloatingPointError(f"non-finite values for ids {bad}; nothing was added")
        if ids.numel():
            self._grow(int(ids.max()) + 1)
        self.values.index_add_(0, ids, values)   # duplicate ids both add
        self.counts.index_add_(0, ids, torch.ones_like(ids))

    def state_dict(self) -> dict:
        return {"values": self.values.clone(), "counts": self.counts.clone(),
                "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        values, counts = state["values"], state["counts"]
        if values.shape != counts.shape or values.dim() != 1:
            raise ValueError(f"ledger state has values {tuple(values.shape)} and counts {tuple(counts.shape)}")
        self.num_samples = state.get("num_samples")
        self.values = values.to(torch.float64).clone()
        self.counts = counts.to(torch.long).clone()

    def save(self, path: str) -> None:
        """Crash-safe: written to a temporary file beside `path`, then renamed over it."""
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".ledger-")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(self.state_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "ValueLedger":
        led = cls()
        led.load_state_dict(torch.load(path, weights_only=True))
        return led
