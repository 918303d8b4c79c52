"""GhostConv1D: Hugging Face's Conv1D (transformers.pytorch_utils.Conv1D, GPT-2's c_attn /
c_proj / c_fc): y = x @ W + b with the weight stored transposed, [in, out].

It is a linear layer, so its backward reuses linear_backward, with the roles of input and
output gradient swapped: the rep Outer(A=gy, B=x) has per-sample gradient sum_t x_t gy_t^T, the
[in, out] layout of the parameter itself (products are symmetric in A and B, so the ghost
products are unchanged, and materialised gradients / dense matrices line up with the weight).
The bias therefore goes separately, as a Direct rep (no fused weight+bias product).

Matched by class (name Conv1D from transformers.pytorch_utils, or a subclass that keeps its
forward) without importing transformers; the ghost class is a subclass of the original.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import session as _session
from . import compiled as _compiled
from ..reps import Direct
from .linear import linear_backward
from .registry import GhostModule, Rule, class_swap_rule, register_matcher

_HF_MODULE = "transformers.pytorch_utils"


class _GhostConv1DFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sess, name, batch_dim):
        sess.note_forward(weight, bias)
        ctx.save_for_backward(x)
        ctx.weight, ctx.bias, ctx.sess, ctx.name, ctx.batch_dim = weight, bias, sess, name, batch_dim
        size_out = x.shape[:-1] + (weight.shape[1],)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
        return y.view(size_out)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        gx = gy @ weight.to(gy.dtype).T if ctx.needs_input_grad[0] else None
        gw, gb = conv1d_backward(ctx.sess, ctx.name, x, gy, weight, ctx.bias, ctx.batch_dim,
                                 ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, gw, gb, None, None, None


def conv1d_backward(sess, name: str, x: Tensor, gy: Tensor, weight: nn.Parameter,
                    bias: nn.Parameter | None, batch_dim: int, need_w: bool, need_b: bool):
    """Hands the session the reps of the weight and bias; returns the training rows' (weight,
    bias) gradients scaled for the mean training loss (None where not needed or left alone)."""
    # roles swapped: "A" = gy, "B" = x, so the weight gradient comes out [in, out]
    gw, _ = linear_backward(sess, name, gy, x, weight, None, batch_dim, need_w, False)
    gb = None
    if bias is not None and bias.requires_grad and not sess.closed:
        g = (gy.movedim(batch_dim, 0) if batch_dim else gy)
        g = g.reshape(g.shape[0], -1, g.shape[-1]).sum(1)
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        N = sess.n_train
        if sess.grad_scale is not None and need_b:
            gb = (g[:N].sum(0) * sess.grad_scale).to(bias.dtype)
        sess.add((bias,), Direct(g[:N]), Direct(g[N:]))
    return gw, gb


class GhostConv1D(GhostModule):
    """Mixin of the ghost subclass made for each matched Conv1D class."""

    def forward(self, x: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None:
            return super().forward(x)
        name = getattr(self, "_inrun_name", type(self).__name__)
        if torch.compiler.is_compiling():
            _compiled.check_no_autocast(x, name)
            return torch.ops.inrun.ghost_linear(x, self.weight, self.bias, name, self.ghost_batch_dim, True)
        return _GhostConv1DFn.apply(x, self.weight, self.bias, sess, name, self.ghost_batch_dim)


_GHOSTS: dict[type, type] = {}


def _hf_conv1d_base(cls: type) -> type | None:
    for base in cls.__mro__:
        if base.__name__ == "Conv1D" and base.__module__ == _HF_MODULE:
            return base if getattr(cls, "forward", None) is getattr(base, "forward", None) else None
    return None


@register_matcher
def _match_hf_conv1d(mod: nn.Module) -> Rule | None:
    cls = type(mod)
    if isinstance(mod, GhostModule) or _hf_conv1d_base(cls) is None:
        return None
    if set(dict(mod.named_parameters())) - {"weight", "bias"} or mod.weight.dim() != 2:
        return None
    ghost = _GHOSTS.get(cls)
    if ghost is None:
        ghost = _GHOSTS[cls] = type(f"Ghost{cls.__name__}", (GhostConv1D, cls), {"__module__": __name__})
    return class_swap_rule(cls, ghost)
