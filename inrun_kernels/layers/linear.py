"""GhostLinear: nn.Linear whose backward, inside a ghost session, also yields per-sample
gradient products, and accumulates only the training rows' weight gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import session as _session
from . import compiled as _compiled
from ..reps import Direct, Outer
from .registry import GhostModule, register


def rows_tokens(t: Tensor, batch_dim: int) -> Tensor:
    """[..., f] with samples on `batch_dim` -> [samples, tokens, f] (tokens = all other dims)."""
    if t.dim() < 2:
        raise ValueError(f"expected a batched input with a sample dimension, got shape {tuple(t.shape)}")
    if batch_dim != 0:
        t = t.movedim(batch_dim, 0)
    return t.reshape(t.shape[0], -1, t.shape[-1])


def linear_backward(ctx_session, name: str, x: Tensor, gy: Tensor, weight: nn.Parameter,
                    bias: nn.Parameter | None, batch_dim: int, need_w: bool, need_b: bool):
    """Shared by every linear-type layer: hands the session the reps of the weight (and bias)
    and returns the training rows' (weight, bias) gradients scaled for the mean training loss,
    or (None, None) when the session leaves .grad alone."""
    sess = ctx_session
    if sess.closed:   # a second backward through the same graph (e.g. for uncovered parameters)
        return None, None
    A, B = rows_tokens(x, batch_dim), rows_tokens(gy, batch_dim)
    sess.check_rows(A.shape[0], name)
    N = sess.n_train
    gw = gb = None
    if sess.grad_scale is not None:
        a_tr, b_tr = A[:N].reshape(-1, A.shape[-1]), B[:N].reshape(-1, B.shape[-1])
        if need_w:   # the one weight-gradient GEMM of this backward: training rows only
            # (under autocast the output gradient is bf16/fp16 while the saved input may not be:
            # the GEMM runs in the gradient's precision, as nn.Linear's would)
            gw = torch.mm(b_tr.T, a_tr.to(b_tr.dtype)).mul_(sess.grad_scale).to(weight.dtype)
        if need_b and bias is not None:
            gb = b_tr.sum(0).mul_(sess.grad_scale).to(bias.dtype)
    if sess.can_fuse(weight, bias):
        sess.add((weight, bias), Outer(A[:N], B[:N], bias=True), Outer(A[N:], B[N:], bias=True))
    else:
        sess.add((weight,), Outer(A[:N], B[:N]), Outer(A[N:], B[N:]))
        if bias is not None:
            sess.add((bias,), Direct(B[:N].sum(1)), Direct(B[N:].sum(1)))
    return gw, gb


class _GhostLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sess, name, batch_dim):
        sess.note_forward(weight, bias)
        # the Parameter itself on ctx, not among the saved tensors: the session keys parameters
        # by identity, and saved-tensor hooks (non-reentrant checkpointing) return new objects
        ctx.save_for_backward(x)
        ctx.sess, ctx.name, ctx.batch_dim, ctx.weight, ctx.bias = sess, name, batch_dim, weight, bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        gx = gy @ weight.to(gy.dtype) if ctx.needs_input_grad[0] else None
        gw, gb = linear_backward(ctx.sess, ctx.name, x, gy, weight, ctx.bias, ctx.batch_dim,
                                 ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, gw, gb, None, None, None


@register(nn.Linear)
class GhostLinear(GhostModule, nn.Linear):
    """Drop-in nn.Linear. Outside a ghost session it IS nn.Linear (same call, same gradients)."""

    def forward(self, input: Tensor) -> Tensor:
        """F.linear outside a session; inside, the ghost op (same output)."""
        sess = _session.current()
        if sess is None:
            return F.linear(input, self.weight, self.bias)
        name = getattr(self, "_inrun_name", type(self).__name__)
        rows, bd = sess.n_rows, self.ghost_batch_dim
        if bd == 0 and input.dim() == 2 and input.shape[0] != rows and input.shape[0] % rows == 0:
            # tokens flattened sample-major, [B * T, d] (as x.reshape(-1, d) of [B, T, d] gives:
            # OPT's fc1/fc2, MoE experts): sample i owns rows [i T, (i + 1) T). ik.verify (run by
            # the engine on its first step) checks this reading against plain autograd.
            y = ghost_linear(input.view(rows, -1, input.shape[-1]), self.weight, self.bias, sess, name, 0)
            return y.reshape(input.shape[0], -1)
        return ghost_linear(input, self.weight, self.bias, sess, name, bd)


def ghost_linear(x: Tensor, weight: nn.Parameter, bias: nn.Parameter | None, sess, name: str,
                 batch_dim: int) -> Tensor:
    """The ghost linear op inside session `sess`: the autograd Function in eager mode, the
    custom op (compiled.py) while torch.compile traces."""
    if torch.compiler.is_compiling():
        _compiled.check_no_autocast(x, name)
        return torch.ops.inrun.ghost_linear(x, weight, bias, name, batch_dim, False)
    return _GhostLinearFn.apply(x, weight, bias, sess, name, batch_dim)
