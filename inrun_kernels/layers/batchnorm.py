"""BatchNorm1d/2d/3d in eval mode (running statistics) with trainable affine parameters.

With running statistics BatchNorm is per sample: y = xhat * weight + bias, xhat = (x - running
mean) / sqrt(running var + eps), weight and bias over the channel dim 1. Inside a ghost session
xhat comes from F.batch_norm without affine (ordinary autograd, so the input gradient is
PyTorch's own) and the affine step is a custom autograd Function whose backward forms the
per-sample gradients directly, [rows, C] (Direct reps): weight sum gy * xhat, bias sum gy, over
every dim but the sample dim 0 and the channel dim 1.

In training mode, or with track_running_stats=False (batch statistics even in eval mode), the
layer couples the samples of a batch: patch.check_batch_coupling refuses the model at patch time
and at every step, and the forward below refuses it too. Outside a session the layer IS the
original module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import session as _session
from . import compiled as _compiled
from ..ops.reference import acc_dtype
from ..reps import Direct
from .registry import GhostModule, register


def _channel_view(p: Tensor, dim: int) -> Tensor:
    return p.view((1, -1) + (1,) * (dim - 2))


def _per_sample(t: Tensor) -> Tensor:
    """[B, C, *] -> [B, C] summed over the trailing dims."""
    return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t


class _GhostChannelAffineFn(torch.autograd.Function):
    """y = xhat * weight[c] (+ bias[c]) with c the channel dim 1 of xhat [B, C, *]."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, sess, name):
        sess.note_forward(weight, bias)
        ctx.save_for_backward(xhat)
        ctx.weight, ctx.bias, ctx.sess, ctx.name = weight, bias, sess, name
        y = xhat * _channel_view(weight, xhat.dim())
        if bias is not None:
            y = y + _channel_view(bias, xhat.dim())
        return y.to(xhat.dtype)

    @staticmethod
    def backward(ctx, gy):
        (xhat,) = ctx.saved_tensors
        weight = ctx.weight
        gx = (gy * _channel_view(weight, gy.dim())).to(xhat.dtype) if ctx.needs_input_grad[0] else None
        gw, gb = channel_affine_backward(ctx.sess, ctx.name, xhat, gy, weight, ctx.bias,
                                         ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, gw, gb, None, None


def channel_affine_backward(sess, name: str, xhat: Tensor, gy: Tensor, weight: nn.Parameter,
                            bias: nn.Parameter | None, need_w: bool, need_b: bool):
    """Hands the session the per-sample gradients [rows, C] (Direct reps) of weight and bias;
    returns the training rows' gradients scaled for the mean training loss (None where not
    needed or left alone)."""
    if sess.closed:
        return None, None
    sess.check_rows(xhat.shape[0], name)
    N = sess.n_train
    dt = acc_dtype(gy, xhat)
    gw = gb = None
    if weight.requires_grad:
        g = _per_sample(gy.to(dt) * xhat.to(dt))
        if sess.grad_scale is not None and need_w:
            gw = (g[:N].sum(0) * sess.grad_scale).to(weight.dtype)
        sess.add((weight,), Direct(g[:N]), Direct(g[N:]))
    if bias is not None and bias.requires_grad:
        g = _per_sample(gy.to(dt))
        if sess.grad_scale is not None and need_b:
            gb = (g[:N].sum(0) * sess.grad_scale).to(bias.dtype)
        sess.add((bias,), Direct(g[:N]), Direct(g[N:]))
    return gw, gb


class GhostBatchNorm(GhostModule):
    """Mixin of the ghost BatchNorm classes (see module doc)."""

    def forward(self, input: Tensor) -> Tensor:
        sess = _session.current()
        trainable = any(p is not None and p.requires_grad for p in (self.weight, self.bias))
        if sess is None or not trainable:
            return super().forward(input)
        name = getattr(self, "_inrun_name", type(self).__name__)
        if self.training or self.running_mean is None or self.running_var is None:
            from ..patch import batch_coupling_error   # patch imports the layers
            raise batch_coupling_error(name, self)
        if self.weight is None:   # bias only: not something nn.BatchNorm builds
            raise NotImplementedError(f"BatchNorm '{name}' has a bias but no weight")
        self._check_input_dim(input)
        xhat = F.batch_norm(input, self.running_mean, self.running_var, None, None, False, 0.0, self.eps)
        if torch.compiler.is_compiling():
            _compiled.check_no_autocast(xhat, name)
            return torch.ops.inrun.ghost_affine(xhat, self.weight, self.bias, name, 0, True)
        return _GhostChannelAffineFn.apply(xhat, self.weight, self.bias, sess, name)


@register(nn.BatchNorm1d)
class GhostBatchNorm1d(GhostBatchNorm, nn.BatchNorm1d):
    """Drop-in nn.BatchNorm1d (eval mode). Outside a ghost session it IS nn.BatchNorm1d."""


@register(nn.BatchNorm2d)
class GhostBatchNorm2d(GhostBatchNorm, nn.BatchNorm2d):
    """Drop-in nn.BatchNorm2d (eval mode). Outside a ghost session it IS nn.BatchNorm2d."""


@register(nn.BatchNorm3d)
class GhostBatchNorm3d(GhostBatchNorm, nn.BatchNorm3d):
    """Drop-in nn.BatchNorm3d (eval mode). Outside a ghost session it IS nn.BatchNorm3d."""
