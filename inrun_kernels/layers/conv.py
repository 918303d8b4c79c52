"""GhostConv1d / GhostConv2d: nn.Conv1d / nn.Conv2d whose backward, inside a ghost session, also
yields per-sample gradient products, and accumulates only the training rows' weight gradient.

A convolution is a linear layer over unfolded windows (im2col). With A the unfolded input
[n, L, C_in/g * k] (L output positions, k = kernel numel, channels slowest, then the kernel
positions: the order of weight.view(C_out, -1)) and B the output gradient [n, L, C_out], sample
i's weight gradient is sum_t outer(B[i, t], A[i, t]) restricted to each group's block:

- groups == 1: exactly linear_backward's case: Outer(A, B) reps (bias fused when the session
  allows), the training rows' weight gradient one GEMM, viewed back to the weight's shape. The
  rep's dense form is [C_out, C_in * k], the weight flattened (products.dense_dot views a dense V
  of the weight's shape so).
- groups = G > 1: group g's gradient is sum_t outer(B_g[i, t], A_g[i, t]) with A_g, B_g its
  channel slices; the blocks do not overlap. Two exact reps, picked by size:
  * Direct: the per-sample gradients themselves, [n, *weight.shape], from ONE convolution
    weight-gradient with the samples as extra groups (input [1, n C_in, ...], n G groups; no
    unfolding: depthwise 64 channels, 16x16, n=40, 1 thread: 1.7 ms against 155 ms for unfold +
    einsum). Taken when n * numel(weight) fits the temp budget (ops/budget.py) or is no larger
    than the Outer embedding below. Depthwise convolutions (groups == C_in) land here: a
    sample's gradient is only [C_out, k].
  * Outer block embedding: every (position, group) pair becomes a token with A_g[t] as its
    input [C_in/G * k] and B_g[t] placed in group g's rows of a zero [C_out] vector: the Outer
    rep of n x (L G) tokens whose sum of outer products is exactly the block gradient (G x the
    size of B; products then cost G x what the blocks need, but no [n, numel] per-sample tensor).
  The training rows' weight gradient is the sum of the Direct rows, or one batched GEMM per
  group.

Padding: integer zero padding goes into the unfolding; padding='same' / 'valid' and
padding_mode 'reflect' / 'replicate' / 'circular' pad the input first (F.pad, as nn.Conv does),
then the ghost op runs unpadded. Memory: A is k x the layer input (the Outer rep holds it until
the products; the engine's estimator route keeps it until optimizer.step()).

Inside a session the input must be batched with samples on dim 0 ([N, C, L] / [N, C, H, W]);
an unbatched input or a ghost_batch_dim other than 0 is an error naming the module. Outside a
session the module is its original class's forward. Under torch.compile the layer calls the
custom ops inrun::ghost_conv / inrun::ghost_conv_bw defined below (see compiled.py).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import session as _session
from ..ops import reference as ref
from ..ops.budget import temp_budget_elems
from ..reps import Direct, Outer
from . import compiled as _compiled
from .linear import linear_backward
from .registry import GhostModule, register


def unfold_rows(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """[n, C, *spatial] -> [n, L, C * prod(kernel)]: the windows each output position reads
    (im2col), channels slowest then kernel positions, one copy."""
    d = len(kernel)
    if any(padding):
        x = F.pad(x, [p for pd in reversed(padding) for p in (pd, pd)])
    for i in range(d):   # each unfold appends one window dim: [n, C, *out, *window]
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    if any(dl > 1 for dl in dilation):
        x = x[(Ellipsis, *[slice(None, None, dl) for dl in dilation])]
    n, C = x.shape[:2]
    out = x.shape[2:2 + d]
    perm = [0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d)]
    return x.permute(perm).reshape(n, math.prod(out), C * math.prod(kernel))


def conv_input_grad(x_shape, gy: Tensor, weight: Tensor, stride, padding, dilation, groups) -> Tensor:
    """The input gradient of the convolution (its ordinary backward)."""
    d = weight.dim() - 2
    like = gy.new_empty(1).expand(x_shape)   # only the input's shape is read
    return torch.ops.aten.convolution_backward(
        gy, like, weight.to(gy.dtype), None, list(stride), list(padding), list(dilation), False,
        [0] * d, groups, [True, False, False])[0]


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                 groups: int) -> Tensor:
    fn = F.conv1d if weight.dim() == 3 else F.conv2d
    return fn(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def per_sample_grads(x: Tensor, gy: Tensor, weight: Tensor, stride, padding, dilation,
                     groups: int) -> Tensor:
    """[n, *weight.shape] per-sample weight gradients, exact: the samples become groups of one
    convolution ([1, n C_in, ...] input, n * groups groups), whose weight gradient is the stack
    of the samples' (no unfolding; accumulated in fp32, or fp64 for fp64)."""
    n, C_in, C_out, d = x.shape[0], x.shape[1], gy.shape[1], weight.dim() - 2
    dt = ref.acc_dtype(x, gy)
    xs = x.to(dt).reshape(1, n * C_in, *x.shape[2:])
    gys = gy.to(dt).reshape(1, n * C_out, *gy.shape[2:])
    like = xs.new_empty(()).expand(n * C_out, *weight.shape[1:])   # only its shape is read
    g = torch.ops.aten.convolution_backward(gys, xs, like, None, list(stride), list(padding),
                                            list(dilation), False, [0] * d, n * groups,
                                            [False, True, False])[1]
    return g.view(n, *weight.shape)


def _use_direct(rows: int, L: int, groups: int, weight: Tensor, elem_size: int) -> bool:
    """Per-sample gradients as a Direct rep (else the Outer block embedding), by size."""
    direct = rows * weight.numel()
    outer = rows * L * groups * (weight[0].numel() + weight.shape[0])
    return direct <= max(outer, temp_budget_elems(elem_size))


def conv_backward(sess, name: str, x: Tensor, gy: Tensor, weight: nn.Parameter,
                  bias: nn.Parameter | None, stride, padding, dilation, groups: int,
                  need_w: bool, need_b: bool):
    """Hands the session the reps of the weight (and bias); returns the training rows' (weight,
    bias) gradients scaled for the mean training loss (None where not needed or left alone)."""
    if sess.closed:
        return None, None
    sess.check_rows(gy.shape[0], name)
    n, C_out = gy.shape[:2]
    N = sess.n_train
    B = gy.reshape(n, C_out, -1).transpose(1, 2).contiguous()   # [n, L, C_out]
    L = B.shape[1]
    fused = False
    gw = None
    if not weight.requires_grad:   # a frozen weight: only the bias, no unfolding
        pass
    elif groups == 1:
        A = unfold_rows(x, weight.shape[2:], stride, padding, dilation)   # [n, L, C_in * k]
        gw, gb = linear_backward(sess, name, A, B, weight, bias, 0, need_w, need_b)
        return (None if gw is None else gw.reshape(weight.shape)), gb
    elif _use_direct(n, L, groups, weight, x.element_size()):
        per_sample = per_sample_grads(x, gy, weight, stride, padding, dilation, groups)
        sess.add((weight,), Direct(per_sample[:N]), Direct(per_sample[N:]))
        if sess.grad_scale is not None and need_w:
            gw = per_sample[:N].sum(0)
    else:
        G = groups
        A = unfold_rows(x, weight.shape[2:], stride, padding, dilation)   # [n, L, C_in * k]
        dk, og = A.shape[2] // G, C_out // G
        Ag, Bg = A.view(n, L, G, dk), B.view(n, L, G, og)
        A_emb = Ag.reshape(n, L * G, dk)
        B_emb = B.new_zeros(n, L, G, G, og)
        B_emb.diagonal(dim1=2, dim2=3).copy_(Bg.transpose(2, 3))   # group g's rows of token (t, g)
        B_emb = B_emb.reshape(n, L * G, C_out)
        fused = sess.can_fuse(weight, bias)   # token sums of B_emb are B's: the bias fuses too
        sess.add((weight, bias) if fused else (weight,), Outer(A_emb[:N], B_emb[:N], bias=fused),
                 Outer(A_emb[N:], B_emb[N:], bias=fused))
        if sess.grad_scale is not None and need_w:   # one batched GEMM over the groups
            b_tr = Bg[:N].reshape(N * L, G, og).permute(1, 2, 0)
            a_tr = Ag[:N].reshape(N * L, G, dk).transpose(0, 1)
            gw = torch.bmm(b_tr, a_tr.to(b_tr.dtype))
    gb = None
    if bias is not None and bias.requires_grad:
        g = B.sum(1)
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
        if not fused:
            sess.add((bias,), Direct(g[:N]), Direct(g[N:]))
        if sess.grad_scale is not None and need_b:
            gb = (g[:N].sum(0) * sess.grad_scale).to(bias.dtype)
    if gw is not None:
        gw = (gw * sess.grad_scale).reshape(weight.shape).to(weight.dtype)
    return gw, gb


class _GhostConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sess, name, geometry):
        sess.note_forward(weight, bias)
        # the Parameters themselves on ctx (the session keys them by identity), x saved
        ctx.save_for_backward(x)
        ctx.sess, ctx.name, ctx.geometry, ctx.weight, ctx.bias = sess, name, geometry, weight, bias
        return conv_forward(x, weight, bias, *geometry)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        gx = None
        if ctx.needs_input_grad[0]:
            gx = conv_input_grad(x.shape, gy, ctx.weight, stride, padding, dilation, groups)
        gw, gb = conv_backward(ctx.sess, ctx.name, x, gy, ctx.weight, ctx.bias, stride, padding,
                               dilation, groups, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return gx, gw, gb, None, None, None


class _GhostConvNd(GhostModule):
    """Mixin of GhostConv1d / GhostConv2d: outside a session the original forward."""
    _spatial = 0

    def forward(self, input: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None:
            return super().forward(input)
        name = getattr(self, "_inrun_name", type(self).__name__)
        orig = getattr(self, "_inrun_orig_class", type(self)).__name__
        where = f"inrun_kernels: module '{name}' ({orig})"
        if input.dim() != self._spatial + 2:
            dims = "L" if self._spatial == 1 else "H, W"
            raise ValueError(f"{where}: input of shape {tuple(input.shape)} inside a ghost session; "
                             f"per-sample gradients need a batched input [N, C, {dims}] with the "
                             "samples on dim 0")
        if self.ghost_batch_dim != 0:
            raise ValueError(f"{where}: ghost_batch_dim={self.ghost_batch_dim}; convolutions take "
                             "their samples on dim 0")
        sess.check_rows(input.shape[0], where)
        if not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return super().forward(input)   # nothing to value here
        x, padding = input, self.padding
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            # as nn.Conv does for these: pad first ('same' may be asymmetric), convolve unpadded
            pads = self._reversed_padding_repeated_twice
            if any(pads):
                mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
                x = F.pad(input, pads, mode=mode)
            padding = (0,) * self._spatial
        geometry = (tuple(self.stride), tuple(padding), tuple(self.dilation), self.groups)
        if torch.compiler.is_compiling():
            _compiled.check_no_autocast(x, name)
            return torch.ops.inrun.ghost_conv(x, self.weight, self.bias, name, *geometry)
        return _GhostConvFn.apply(x, self.weight, self.bias, sess, name, geometry)


@register(nn.Conv1d)
class GhostConv1d(_GhostConvNd, nn.Conv1d):
    """Drop-in nn.Conv1d. Outside a ghost session it IS nn.Conv1d (same call, same gradients)."""
    _spatial = 1


@register(nn.Conv2d)
class GhostConv2d(_GhostConvNd, nn.Conv2d):
    """Drop-in nn.Conv2d. Outside a ghost session it IS nn.Conv2d (same call, same gradients)."""
    _spatial = 2


# ==== under torch.compile: opaque custom ops (as compiled.py does for the other layers) =========
@torch.library.custom_op("inrun::ghost_conv", mutates_args=(), tags=_compiled._TAGS)
def ghost_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str, stride: List[int],
               padding: List[int], dilation: List[int], groups: int) -> Tensor:
    sess = _compiled._active()
    if sess is not None:
        sess.note_forward(weight, bias)
    return conv_forward(x, weight, bias, stride, padding, dilation, groups)


@ghost_conv.register_fake
def _(x, weight, bias, name, stride, padding, dilation, groups):
    return conv_forward(x, weight, bias, stride, padding, dilation, groups)


@torch.library.custom_op("inrun::ghost_conv_bw", mutates_args=(), tags=_compiled._TAGS)
def ghost_conv_bw(x: Tensor, gy: Tensor, weight: Tensor, bias: Optional[Tensor], name: str,
                  stride: List[int], padding: List[int], dilation: List[int], groups: int,
                  need_w: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    sess = _compiled._active()
    if sess is None:   # traced in a session, run outside one: the plain gradients of all rows
        d = weight.dim() - 2
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x.to(gy.dtype), weight.to(gy.dtype), [weight.shape[0]] if need_b and bias is not None else None,
            stride, padding, dilation, False, [0] * d, groups, [False, need_w, need_b and bias is not None])
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
    else:
        with _compiled._own_what_is_kept(sess, x, gy):
            gw, gb = conv_backward(sess, name, x, gy, weight, bias, stride, padding, dilation, groups,
                                   need_w, need_b)
    return _compiled._grad_out(gw, weight, need_w, gy), _compiled._grad_out(gb, bias, need_b, gy)


@ghost_conv_bw.register_fake
def _(x, gy, weight, bias, name, stride, padding, dilation, groups, need_w, need_b):
    return _compiled._empty_or_like(weight, need_w, gy), _compiled._empty_or_like(bias, need_b, gy)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, name, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.name, ctx.geometry = name, (stride, padding, dilation, groups)


def _conv_backward_formula(ctx, gy):
    x, weight, bias = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and bias is not None
    gx = conv_input_grad(x.shape, gy, weight, stride, padding, dilation, groups) if need_x else None
    gw = gb = None
    if need_w or need_b:
        gw, gb = torch.ops.inrun.ghost_conv_bw(x, gy, weight, bias, ctx.name, stride, padding,
                                               dilation, groups, need_w, need_b)
    return gx, gw if need_w else None, gb if need_b else None, None, None, None, None, None


ghost_conv.register_autograd(_conv_backward_formula, setup_context=_conv_setup)
