"""GhostLinear: nn.Linear whose backward, inside a ghost session, also yields per-sample
gradient products, and accumulates only the training rows' weight gradient."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, products
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
    fused = sess.can_fuse(weight, bias)
    owned = (weight, bias) if fused else (weight,)
    gw = gb = None
    split = False
    # the split route when .grad is left alone (functional API: the weight gradient it forms is
    # dropped), or when it gives every gradient this backward owes
    if sess.grad_scale is None or (need_w and (need_b or not fused)):
        split, gw, gb = _split_route(sess, owned, A, B, fused)
    if split:   # the weight (and fused bias) products are in
        if bias is not None and not fused:
            sess.add((bias,), Direct(B[:N].sum(1)), Direct(B[N:].sum(1)))
    elif fused:
        sess.add((weight, bias), Outer(A[:N], B[:N], bias=True), Outer(A[N:], B[N:], bias=True))
    else:
        sess.add((weight,), Outer(A[:N], B[:N]), Outer(A[N:], B[N:]))
        if bias is not None:
            sess.add((bias,), Direct(B[:N].sum(1)), Direct(B[N:].sum(1)))
    if sess.grad_scale is not None:
        b_tr = B[:N].reshape(-1, B.shape[-1])
        if need_w and gw is None:   # the one weight-gradient GEMM of this backward: training rows only
            # (under autocast the output gradient is bf16/fp16 while the saved input may not be:
            # the GEMM runs in the gradient's precision, as nn.Linear's would)
            a_tr = A[:N].reshape(-1, A.shape[-1])
            gw = torch.mm(b_tr.T, a_tr.to(b_tr.dtype)).mul_(sess.grad_scale)
        if need_b and bias is not None and gb is None:
            gb = b_tr.sum(0).mul_(sess.grad_scale)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
    else:
        gw = gb = None
    return gw, gb


def _split_route(sess, owned: tuple, A: Tensor, B: Tensor, fused: bool):
    """The split route (ops/split.py): the training rows' weight gradient and their dots with
    dense vectors in one pass over the GEMM: the prefetched V, the validation rows' summed
    gradient, or (per-validation dots) each validation row's own gradient; or their squared
    norms; taken when the cost model says it beats the GEMM plus a separate product.
    Returns (taken, weight gradient, fused bias gradient or None)."""
    source = sess.split_source(owned)
    if source is None or B.dtype != A.dtype:   # autocast: the GEMM keeps nn.Linear's precision
        return False, None, None
    N = sess.n_train
    M, S = (0, 0) if source in ("dense_v", "norms") else (A.shape[0] - N, A.shape[1])
    if source == "val" and M == 0:
        return False, None, None
    per_val = source == "val" and sess.want_per_val
    if not ops.prefer_split(A[:N], B[:N], M, S, v_given=source == "dense_v", per_val=per_val,
                            norms=source == "norms", weight_grad=sess.grad_scale is not None):
        return False, None, None
    p, d = B.shape[-1], A.shape[-1]
    # products accumulate in fp32 (fp64) whatever the caller's autocast (as products.py's do)
    with products.no_autocast():
        if source == "norms":
            gw, gb, norms = ops.ghost_split_norms(A[:N], B[:N], scale=sess.grad_scale or 1.0, bias=fused)
            sess.add_norms(owned, norms)
            return True, *_grad_precision(B, gw, gb)
        if source == "dense_v":
            V = sess.dense_vectors(owned)
            V[0] = V[0].reshape(p, d)
        else:   # [p, d] (+ [p]) summed over the validation rows, or [M, p, d] (+ [M, p]) each
            G, g_bias = Outer(A[N:], B[N:], bias=fused).summed(per_row=per_val)
            V = [G, g_bias] if fused else [G]
        gw, gb, dots = ops.ghost_split_dot(A[:N], B[:N], V[0], V[1] if fused else None,
                                           scale=sess.grad_scale or 1.0, bias=fused)
    sess.add_dots(owned, dots)
    return True, *_grad_precision(B, gw, gb)


def _grad_precision(B: Tensor, gw: Tensor, gb: Tensor | None):
    """The split route's gradients (fp32 accumulated) in the output gradient's precision, as
    the weight-gradient GEMM's would be."""
    if B.dtype in (torch.float16, torch.bfloat16):
        gw, gb = gw.to(B.dtype), None if gb is None else gb.to(B.dtype)
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
