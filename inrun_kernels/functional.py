"""Per-sample gradient products of a whole model, from one forward and one backward.

    grad_dot(model, loss_fn, train, val, per_val=False)  -> [N] or [N, M]
    grad_gram(model, loss_fn, batch)                     -> [N, N]
    grad_norms(model, loss_fn, batch)                    -> [N]

loss_fn(model, batch) returns per-sample losses [B]. g_i is the gradient of sample i's loss
over all trainable parameters; grad_dot_i = <g_i, sum_v g_v>. An unpatched model is patched
for the call and restored after. Existing .grad are left untouched. float32 results (float64
for a float64 model). A torch.compile'd model is accepted (parameter names as in the module
it compiles)."""
from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from . import ghost_pass as gp
from .patch import compiled_inner, is_patched, unpatch


def _call(model: nn.Module, loss_fn: Callable, train: Any, val: Any | None, kind: str,
          per_param: bool, **want) -> Tensor | tuple[Tensor, dict]:
    inner = compiled_inner(model)[0]   # torch.compile(m): m is patched, the wrapper runs forward
    was_patched = is_patched(inner)
    gp.ensure_patched(inner)
    try:
        sess, _ = gp.run(inner, loss_fn, train, val, train_grad=False, per_param=per_param,
                         forward_model=None if inner is model else model, **want)
    finally:
        if not was_patched:
            unpatch(inner)
    out = sess.result(kind)
    gp.check_finite(out, f"grad_{kind}")
    if per_param:
        return out, {n: v[kind].to(out.dtype) for n, v in sess.by_param.items() if kind in v}
    return out


def grad_dot(model: nn.Module, loss_fn: Callable, train: Any, val: Any, *,
             per_val: bool = False, per_param: bool = False):
    """<g_i, sum_v g_v> for each training sample i ([N]), or <g_i, g_v> ([N, M]) with per_val.
    per_param=True also returns {parameter name: its share}."""
    return _call(model, loss_fn, train, val, "per_val" if per_val else "dot", per_param,
                 dot=True, per_val=per_val)


def grad_gram(model: nn.Module, loss_fn: Callable, batch: Any, *, per_param: bool = False):
    """[N, N] matrix of <g_i, g_j>."""
    return _call(model, loss_fn, batch, None, "gram", per_param, gram=True)


def grad_norms(model: nn.Module, loss_fn: Callable, batch: Any, *, per_param: bool = False):
    """L2 norm of each per-sample gradient, [N]."""
    out = _call(model, loss_fn, batch, None, "norms_sq", per_param, norms=True)
    if per_param:
        return out[0].sqrt(), {n: v.sqrt() for n, v in out[1].items()}
    return out.sqrt()
