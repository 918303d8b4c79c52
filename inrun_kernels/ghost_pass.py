"""One forward and one backward of train+val rows inside a ghost session.

Shared by the functional API and the engine: joins the batches, checks the losses, runs the
single backward, and keeps the gradients of parameters the ghost layers do not cover right
(train rows only, via a second backward restricted to them: exact, and only when strict=False
left such parameters). Before the backward, guard.check_paths refuses any other gradient path
into a covered parameter."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .batch import batch_size, concat
from .guard import check_paths
from .patch import check_batch_coupling, coverage, is_patched, patch
from .session import GhostSession, ghost_session


def ensure_patched(model: nn.Module, strict: bool = True) -> nn.Module:
    if not is_patched(model):
        patch(model, strict=strict)
    return model


def uncovered_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters patch() left uncovered, matched under any of their names (a shared
    parameter is listed under the name of its uncovered use)."""
    names = set(coverage(model).uncovered)
    ids = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in names}
    return [p for p in model.parameters() if id(p) in ids and p.requires_grad]


def param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def check_losses(losses: Any, rows: int) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"loss_fn must return a Tensor of per-sample losses, got {type(losses).__name__}")
    if losses.shape != (rows,):
        raise ValueError(f"loss_fn must return per-sample losses of shape [{rows}] (train + val rows), "
                         f"got {tuple(losses.shape)}; do not reduce over the batch")
    if not losses.requires_grad:
        raise RuntimeError("the losses do not require grad: no trainable parameter reaches them")
    return losses


def run(model: nn.Module, loss_fn: Callable, train: Any, val: Any | None, *,
        train_grad: bool, grad_scale: float | None = None, ids: Tensor | None = None,
        what: str = "ghost pass", forward_model: nn.Module | None = None,
        **session_kwargs) -> tuple[GhostSession, Tensor]:
    """Returns the finished session and the per-sample losses (detached).

    train_grad=True: every p.grad is as after (grad_scale * loss_fn(model, train).sum()).backward(),
    grad_scale 1/N by default (the mean training loss; 1/(N k) under accumulation).
    train_grad=False: every p.grad is left as it was.
    ids / what: how errors name the training rows and the step.
    forward_model: what loss_fn is called with when it is not `model` itself (a DDP or
    torch.compile wrapper of it: their forward joins the gradient sync or the compiled graph)."""
    if not torch.is_grad_enabled():
        raise RuntimeError("inrun_kernels needs autograd, but this step runs under torch.no_grad() "
                           "or torch.inference_mode(); call it outside that context")
    check_batch_coupling(model)
    n = batch_size(train, "train")
    m = 0 if val is None else batch_size(val, "val")
    batch = train if val is None else concat(train, val)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = None if train_grad else [p.grad for p in params]
    others = uncovered_params(model)
    # copies: the joint backward may accumulate into an existing .grad in place
    others_saved = [None if p.grad is None else p.grad.clone() for p in others]
    names = param_names(model)
    if train_grad and grad_scale is None:
        grad_scale = 1.0 / n
    with ghost_session(n, m, grad_scale=grad_scale if train_grad else None,
                       names=names, **session_kwargs) as sess:
        losses = check_losses(loss_fn(model if forward_model is None else forward_model, batch), n + m)
        check_finite_losses(losses, n, ids, what)
        check_paths(losses, params, {id(p) for p in others}, names, session_kwargs.get("canonical"))
        losses.sum().backward(retain_graph=bool(others) and train_grad)
        sess.finish()
        sess.closed = True
    if others:
        for p, g in zip(others, others_saved):   # drop the validation rows' share
            p.grad = g
        if train_grad:
            torch.autograd.backward(losses[:n].sum() * grad_scale, inputs=others)
    if saved is not None:
        for p, g in zip(params, saved):
            p.grad = g
    return sess, losses.detach()


def check_finite_losses(losses: Tensor, n: int, ids: Tensor | None = None, what: str = "ghost pass") -> None:
    """Before the backward: a non-finite loss names its rows (training rows by id, or position
    in the batch; validation rows by position in the validation batch); nothing computed yet."""
    bad = ~torch.isfinite(losses.detach())
    if not bool(bad.any()):
        return
    rows = bad.nonzero().flatten().tolist()
    tr, va = [r for r in rows if r < n], [r - n for r in rows if r >= n]
    who = f"training ids {ids[tr].tolist()}" if ids is not None else f"training rows {tr}"
    parts = ([who] if tr else []) + ([f"validation rows {va}"] if va else [])
    raise FloatingPointError(f"{what}: non-finite per-sample loss at {' and '.join(parts)}; "
                             "nothing was computed or recorded and .grad is unchanged")


def check_finite(values: Tensor, what: str, ids: Tensor | None = None) -> None:
    if torch.isfinite(values).all():
        return
    bad_rows = (~torch.isfinite(values.reshape(values.shape[0], -1))).any(1).nonzero().flatten()
    who = f"ids {ids[bad_rows].tolist()}" if ids is not None else f"training samples {bad_rows.tolist()}"
    raise FloatingPointError(f"{what}: non-finite per-sample products for {who} "
                             "(a loss or gradient overflowed); no value was recorded")
