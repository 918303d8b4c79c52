"""Independent oracles: per-sample gradients of the ORIGINAL (unpatched) model, by a
batch-size-1 loop or by torch.func, flattened over trainable parameters (a tied parameter
counts once, so its per-sample gradient is the sum over its uses)."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap


def _take(batch, i):
    if isinstance(batch, Tensor):
        return batch[i:i + 1]
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[i:i + 1] if isinstance(t, Tensor) else t for t in batch)
    return {k: (t[i:i + 1] if isinstance(t, Tensor) else t) for k, t in batch.items()}


def _n(batch):
    if isinstance(batch, Tensor):
        return batch.shape[0]
    leaves = batch if isinstance(batch, (tuple, list)) else list(batch.values())
    return next(t.shape[0] for t in leaves if isinstance(t, Tensor))


def loop_grads(model: nn.Module, loss_fn, batch) -> dict[str, Tensor]:
    """{param name: [B, *shape]} from one backward per sample."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    rows = []
    for i in range(_n(batch)):
        loss = loss_fn(model, _take(batch, i))
        assert loss.shape == (1,)
        gs = torch.autograd.grad(loss[0], params, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)])
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


class _Functional(nn.Module):
    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.params, args, kwargs)


def func_grads(model: nn.Module, loss_fn, batch) -> dict[str, Tensor]:
    """{param name: [B, *shape]} from torch.func.vmap(grad(functional_call))."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(ps, sample):
        sample = _unsqueeze(sample)
        return loss_fn(_Functional(model, ps), sample)[0]

    return vmap(grad(one), in_dims=(None, 0))(params, batch)


def _unsqueeze(batch):
    if isinstance(batch, Tensor):
        return batch[None]
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[None] if isinstance(t, Tensor) else t for t in batch)
    return {k: (t[None] if isinstance(t, Tensor) else t) for k, t in batch.items()}


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], 1)


class Oracle:
    """Per-sample products of train and val batches from an untouched float64 copy."""

    def __init__(self, model: nn.Module, loss_fn, train, val=None, method: str = "loop"):
        ref = copy.deepcopy(model).double()
        fn = loop_grads if method == "loop" else func_grads
        cast = lambda b: _cast(b)  # noqa: E731
        self.train = fn(ref, loss_fn, cast(train))
        self.val = None if val is None else fn(ref, loss_fn, cast(val))

    def dot(self, per_val=False, name=None):
        gt, gv = self._pick(self.train, name), self._pick(self.val, name)
        return gt @ gv.T if per_val else gt @ gv.sum(0)

    def gram(self, name=None):
        g = self._pick(self.train, name)
        return g @ g.T

    def norms(self, name=None):
        return self._pick(self.train, name).norm(dim=1)

    @staticmethod
    def _pick(grads, name):
        return flat(grads) if name is None else grads[name].flatten(1)


def _cast(batch):
    f = lambda t: t.double() if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    if isinstance(batch, Tensor):
        return f(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(f(t) for t in batch)
    return {k: f(t) for k, t in batch.items()}


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))
