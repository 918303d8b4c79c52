"""In-Run Data Shapley (first order) on top of the ghost products.

    eng = InRunShapley(model, optimizer, loss_fn, val, num_samples=None)
    loss = eng.step(train, ids)   # forward + backward of train+val; p.grad = train-only gradient
    optimizer.step()
    eng.values                    # float64 [num_samples], summed over steps

Per step, sample i of a batch of N gets  phi_i = sum_params (lr_p / N) <g_i^p, g_val^p>,
g_val the gradient of the MEAN validation loss and lr_p the learning rate of the optimizer
param group holding p: the first-order Taylor estimate of how much the SGD update, through
sample i's share of it, lowers the validation loss. Positive = helpful. (Under Adam-type
optimizers this is the SGD-form proxy used by the paper.)
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import ghost_pass as gp
from .batch import batch_size
from .ledger import ValueLedger, check_ids


class InRunShapley:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 val: Any, num_samples: int | None = None, *, strict: bool = True):
        self.model = gp.ensure_patched(model, strict=strict)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.val = val
        self.n_val = batch_size(val, "val")
        self.ledger = ValueLedger(num_samples)
        self.steps = 0
        self.last_values: Tensor | None = None

    @property
    def values(self) -> Tensor:
        return self.ledger.values

    @property
    def counts(self) -> Tensor:
        return self.ledger.counts

    def _dot_scales(self, n: int) -> dict[nn.Parameter, float]:
        """lr_p / (N * M) per parameter, read now (schedulers change lr); 0 if not optimised."""
        scales = {p: 0.0 for p in self.model.parameters()}
        for group in self.optimizer.param_groups:
            lr = float(group["lr"])
            for p in group["params"]:
                scales[p] = lr / (n * self.n_val)
        return scales

    def step(self, train: Any, ids) -> Tensor:
        """One forward and one backward on train+val; records the values; returns the mean
        training loss (detached). Call optimizer.step() afterwards as usual."""
        n = batch_size(train, "train")
        ids = check_ids(ids, n, self.ledger.num_samples)
        sess, losses = gp.run(self.model, self.loss_fn, train, self.val, train_grad=True,
                              dot=True, dot_scale=self._dot_scales(n))
        values = sess.result("dot").to(torch.float64)
        gp.check_finite(values, f"InRunShapley step {self.steps}", ids)
        self.ledger.add(ids, values)
        self.last_values = values
        self.steps += 1
        return losses[:n].mean()

    def state_dict(self) -> dict:
        return {"ledger": self.ledger.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.ledger.load_state_dict(state["ledger"])
        self.steps = int(state.get("steps", 0))
