"""What the engine records over time besides the per-sample totals (ledger.py): each group's
summed value every `history_every` steps (the paper's stage-by-stage view of which domains help
when), and the validation loss at the start of each step (for the efficiency check: the values
of a run sum to about the validation loss it removed).

Per committed step: one index_add of the step's values into a [G] accumulator (no Python object
per sample, no extra device sync), one [G] row appended every `history_every` steps."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def check_groups(groups, num_samples: int | None) -> Tensor:
    """groups: one int per sample id (-1 = no group), LongTensor-like [num_samples]."""
    if num_samples is None:
        raise ValueError("groups= needs num_samples= (one group id per sample id)")
    g = torch.as_tensor(groups)
    if g.dtype.is_floating_point or g.dtype == torch.bool or g.dtype.is_complex:
        raise TypeError(f"groups must hold integer group ids, got dtype {g.dtype}")
    if g.shape != (num_samples,):
        raise ValueError(f"groups must have shape [num_samples] = [{num_samples}], got {tuple(g.shape)}")
    g = g.to(torch.long).cpu()
    if g.numel() and int(g.min()) < -1:
        raise ValueError("group ids must be >= 0 (or -1 for none)")
    return g


class StepRecorder:
    def __init__(self, groups: Tensor | None, history_every: int, group_names=None):
        if not isinstance(history_every, int) or isinstance(history_every, bool) or history_every < 0:
            raise ValueError(f"history_every must be an int >= 0 (0: no history), got {history_every!r}")
        self.groups = groups
        n_groups = 1 if groups is None else (int(groups.max()) + 1 if groups.numel() else 0)
        if group_names is not None:
            group_names = [str(x) for x in group_names]
            if len(group_names) < n_groups:
                raise ValueError(f"group_names has {len(group_names)} names for {n_groups} groups")
        self.group_names = group_names
        self.every = history_every
        self._acc = torch.zeros(max(n_groups, len(group_names or [])), dtype=torch.float64)
        self._rows: list[Tensor] = []
        self._row_steps: list[int] = []
        self._val_loss: list[Tensor | float] = []
        self._open = 0   # steps in the accumulator since the last record
        self._step = 0

    def add(self, ids: Tensor, values: Tensor, val_loss: Tensor | None, step: int) -> None:
        """One committed step (step = the count of committed steps after it)."""
        self._val_loss.append(math.nan if val_loss is None else val_loss.detach().to("cpu", torch.float64))
        if not self.every:
            return
        v = values.detach().to("cpu", torch.float64)
        if self.groups is None:
            self._acc[0] += v.sum()
        else:
            g = self.groups[ids.cpu()]
            keep = g >= 0
            self._acc.index_add_(0, g[keep], v[keep])
        self._open, self._step = self._open + 1, step
        if step % self.every == 0:
            self._rows.append(self._acc.clone())
            self._row_steps.append(step)
            self._acc.zero_()
            self._open = 0

    @property
    def history(self) -> Tensor | None:
        """[R, G] float64: each group's summed value over the steps of record r (None: off). The
        last row holds the steps since the last full record, if any: rows sum to the totals."""
        if not self.every:
            return None
        rows = self._rows + ([self._acc] if self._open else [])
        if not rows:
            return torch.zeros(0, self._acc.numel(), dtype=torch.float64)
        return torch.stack(rows)

    @property
    def history_steps(self) -> Tensor | None:
        """[R] long: the committed-step count at the end of each record."""
        if not self.every:
            return None
        return torch.tensor(self._row_steps + ([self._step] if self._open else []), dtype=torch.long)

    @property
    def val_loss(self) -> Tensor:
        """[S] float64: mean validation loss at the start of each committed step (NaN where the
        step's validation pass did not run at the step's own weights, e.g. midpoint)."""
        return torch.tensor([float(x) for x in self._val_loss], dtype=torch.float64)

    def state_dict(self) -> dict:
        rows = torch.stack(self._rows) if self._rows else torch.zeros(0, self._acc.numel(), dtype=torch.float64)
        return {"acc": self._acc.clone(), "open": self._open, "step": self._step, "rows": rows,
                "row_steps": torch.tensor(self._row_steps, dtype=torch.long), "val_loss": self.val_loss}

    def check_state(self, state: dict) -> None:
        """Raise (changing nothing) if `state` cannot be loaded here."""
        if self.every and state["acc"].shape != self._acc.shape:
            raise ValueError(f"the saved group history has {state['acc'].numel()} groups, this engine "
                             f"{self._acc.numel()}: build it with the same groups=")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        if self.every:
            self._rows = list(state["rows"].unbind(0))
            self._row_steps = [int(s) for s in state["row_steps"]]
            self._acc, self._open, self._step = state["acc"].clone(), int(state["open"]), int(state["step"])
        self._val_loss = [float(x) for x in state["val_loss"]]
