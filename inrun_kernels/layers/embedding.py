"""GhostEmbedding: nn.Embedding whose backward, inside a ghost session, hands the session
sparse per-sample gradient rows (reps.Rows) and accumulates only the training rows' gradient.

A sample's gradient of the [V, d] table is nonzero only at the rows of its tokens, so products
are computed by comparing token ids (ops/rows.py), never from a dense [V, d] per sample. Tokens
equal to padding_idx get no gradient, as in nn.Embedding. Tied weights (GPT-2's wte shared
with lm_head) are exact: the session adds the cross terms Rows x Outer (products.py).

An index tensor with one row where the session has several (GPT-2's position ids [1, T],
broadcast over the batch) is expanded to one row per sample, so each sample's positions get
their own gradient; the output then has the full batch dim, which broadcasts the same way.
max_norm (renormalises the table in forward), scale_grad_by_freq (scales by token counts of
the whole batch, coupling the samples) and sparse=True are not supported: an error at forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import session as _session
from ..reps import Rows
from .registry import GhostModule, register


class _GhostEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, sess, name, padding_idx, batch_dim):
        sess.note_forward(weight)
        rows_first = ids.movedim(batch_dim, 0) if batch_dim else ids
        sess.note_rows(weight, rows_first.reshape(rows_first.shape[0], -1))
        ctx.save_for_backward(ids)
        ctx.sess, ctx.name, ctx.padding_idx, ctx.batch_dim = sess, name, padding_idx, batch_dim
        ctx.weight = weight   # the Parameter itself: the session keys parameters by identity
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        gw = embedding_backward(ctx.sess, ctx.name, ids, gy, ctx.weight, ctx.padding_idx,
                                ctx.batch_dim, ctx.needs_input_grad[1])
        return None, gw, None, None, None, None


def embedding_backward(sess, name: str, ids: Tensor, gy: Tensor, weight: nn.Parameter,
                       padding_idx: int | None, batch_dim: int, need_w: bool) -> Tensor | None:
    """Hands the session the Rows reps of the table; returns the training rows' gradient scaled
    for the mean training loss (None where not needed or left alone)."""
    if sess.closed:
        return None
    bd = batch_dim
    if bd != 0:
        ids, gy = ids.movedim(bd, 0), gy.movedim(bd, 0)
    n = ids.shape[0]
    sess.check_rows(n, name)
    ids = ids.reshape(n, -1)
    B = gy.reshape(n, ids.shape[1], gy.shape[-1])
    if padding_idx is not None:
        ids = torch.where(ids == padding_idx, torch.full_like(ids, -1), ids)
    N = sess.n_train
    V = weight.shape[0]
    tr, va = Rows(ids[:N], B[:N], V), Rows(ids[N:], B[N:], V)
    gw = None
    if sess.grad_scale is not None and need_w:
        gw = tr.summed().mul_(sess.grad_scale).to(weight.dtype)
    sess.add((weight,), tr, va)
    return gw


@register(nn.Embedding)
class GhostEmbedding(GhostModule, nn.Embedding):
    """Drop-in nn.Embedding. Outside a ghost session it IS nn.Embedding."""

    def forward(self, input: Tensor) -> Tensor:
        sess = _session.current()
        if sess is None or not self.weight.requires_grad:
            return F.embedding(input, self.weight, self.padding_idx, self.max_norm,
                               self.norm_type, self.scale_grad_by_freq, self.sparse)
        name = getattr(self, "_inrun_name", type(self).__name__)
        for flag, why in ((self.max_norm is not None, "max_norm renormalises the table in forward"),
                          (self.scale_grad_by_freq, "scale_grad_by_freq scales by token counts of "
                           "the whole batch, which couples the samples"),
                          (self.sparse, "sparse=True gradients are not supported")):
            if flag:
                raise NotImplementedError(f"inrun_kernels: embedding '{name}': {why}; per-sample "
                                          "products are not available for it (freeze it or drop the option)")
        bd = self.ghost_batch_dim
        if input.dim() <= bd:
            raise ValueError(f"embedding '{name}': index tensor of shape {tuple(input.shape)} has no "
                             f"sample dimension {bd}")
        if input.shape[bd] == 1 and sess.n_rows != 1:   # e.g. position ids broadcast over samples
            shape = list(input.shape)
            shape[bd] = sess.n_rows
            input = input.expand(shape)
        if torch.compiler.is_compiling():
            return torch.ops.inrun.ghost_embedding(input, self.weight, self.padding_idx, name, bd)
        return _GhostEmbeddingFn.apply(input, self.weight, sess, name, self.padding_idx, bd)
