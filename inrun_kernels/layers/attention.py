"""GhostMultiheadAttention, and the rules that cover PyTorch's Transformer modules.

GhostMultiheadAttention is nn.MultiheadAttention with the same parameters (names, objects,
state_dict). Outside a ghost session its forward IS nn.MultiheadAttention.forward. Inside one it
runs the same computation with ghost projections:

- in-projection: one ghost linear op. Self-attention (query is key is value) hands the session
  a single Outer rep of the packed [3E, E] in_proj_weight (A = x, B = [dq | dk | dv]), so the
  activation Gram is formed once for q, k and v. With distinct inputs (encoder-decoder: query vs
  key is value, or three tensors) the packed weight's row blocks see different inputs; its
  per-sample gradient [B_q^T A_q; B_k^T A_k; B_v^T A_v] is still ONE Outer rep, exactly: the
  inputs are joined along the token axis and each block's output gradients are zero outside its
  rows (the products then cost up to 3x those of one block-wise pass; exact either way).
  kdim/vdim != embed_dim: q/k/v_proj_weight are three parameters (one Outer rep each), and
  in_proj_bias one Direct rep [n, 3E].
- bias_k / bias_v (add_bias_kv): one appended key/value token per sample; their per-sample
  gradients are that token's gradient rows (Direct reps).
- out_proj: the ghost linear op of GhostLinear.
- the attention core (masks, softmax, dropout; F.scaled_dot_product_attention when
  need_weights=False) has no parameters and is plain autograd.

Dropout in training mode is supported: the values are those of the dropped forward actually run
(every per-sample gradient is taken through the same dropout masks). Unbatched (2-D) inputs are
not supported inside a session (a session needs the sample dimension).

Transformer modules (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
nn.TransformerDecoder, nn.Transformer) get a rule too: with batch_first=False their Linear and
LayerNorm children see [T, B, E] tensors, so patching sets ghost_batch_dim=1 on every module
inside them; and inside a session their forward runs with PyTorch's MHA/encoder fast path
switched off, so no fused kernel can bypass the ghost layers.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import session as _session
from ..reps import Direct, Outer
from . import compiled as _compiled
from .linear import ghost_linear, rows_tokens
from .registry import GhostModule, Rule, register, register_rule


# ---- in-projection ----------------------------------------------------------------------------
class _GhostInProjFn(torch.autograd.Function):
    """Ghost linear op for the q/k/v projections.

    tensors = (*xs, *weights); group g projects xs[g] with weights[widx[g]] rows wrows[g] and the
    bias rows orows[g] (rows of the packed [3E] output). Returns one output per group."""

    @staticmethod
    def forward(ctx, sess, name, plan, bias, *tensors):
        widx, wrows, orows = plan
        G = len(widx)
        xs, ws = tensors[:G], tensors[G:]
        sess.note_forward(*ws, bias)
        ctx.save_for_backward(*xs)   # the weights on ctx: kept as the Parameter objects (see linear.py)
        ctx.sess, ctx.name, ctx.plan, ctx.bias, ctx.G, ctx.ws = sess, name, plan, bias, G, ws
        outs = []
        for g in range(G):
            w = ws[widx[g]]
            w = w if wrows[g] is None else w[wrows[g][0]:wrows[g][1]]
            b = None if bias is None else bias[orows[g][0]:orows[g][1]]
            outs.append(F.linear(xs[g], w, b))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gys):
        widx, wrows, orows = ctx.plan
        G, sess, bias = ctx.G, ctx.sess, ctx.bias
        xs, ws = ctx.saved_tensors, ctx.ws
        wslice = [ws[widx[g]] if wrows[g] is None else ws[widx[g]][wrows[g][0]:wrows[g][1]]
                  for g in range(G)]
        gys = [torch.zeros(xs[g].shape[:-1] + (orows[g][1] - orows[g][0],), dtype=xs[g].dtype,
                           device=xs[g].device) if gy is None else gy for g, gy in enumerate(gys)]
        gxs = [gys[g] @ wslice[g].to(gys[g].dtype) if ctx.needs_input_grad[4 + g] else None
               for g in range(G)]
        gws = [None] * len(ws)
        gb = None
        if not sess.closed:
            gws, gb = _in_proj_reps(sess, ctx.name, xs, ws, bias, gys, ctx.plan,
                                    [ctx.needs_input_grad[4 + G + k] for k in range(len(ws))],
                                    ctx.needs_input_grad[3])
        return (None, None, None, gb, *gxs, *gws)


def _in_proj_reps(sess, name, xs, ws, bias, gys, plan, need_w, need_b):
    """Hands the session the reps of the projection weights (and bias); returns the training
    rows' gradients (scaled) or Nones when the session leaves .grad alone."""
    widx, wrows, orows = plan
    G, N = len(xs), sess.n_train
    As = [rows_tokens(x, 0) for x in xs]
    Bs = [rows_tokens(gy, 0) for gy in gys]
    for A in As:
        sess.check_rows(A.shape[0], name)
    gws, gb = [None] * len(ws), None
    if sess.grad_scale is not None:
        s = sess.grad_scale
        for k, w in enumerate(ws):
            if not need_w[k]:
                continue
            gw = torch.zeros(w.shape, dtype=torch.promote_types(Bs[0].dtype, w.dtype), device=w.device)
            for g in range(G):
                if widx[g] != k:
                    continue
                a, b = As[g][:N].reshape(-1, As[g].shape[-1]), Bs[g][:N].reshape(-1, Bs[g].shape[-1])
                r0, r1 = wrows[g] if wrows[g] is not None else (0, w.shape[0])
                gw[r0:r1] += torch.mm(b.T, a.to(b.dtype))
            gws[k] = gw.mul_(s).to(w.dtype)
        if need_b and bias is not None:
            gb = torch.zeros(bias.shape, dtype=Bs[0].dtype, device=bias.device)
            for g in range(G):
                gb[orows[g][0]:orows[g][1]] += Bs[g][:N].sum((0, 1))
            gb = gb.mul_(s).to(bias.dtype)

    packed = len(ws) == 1
    if packed:   # one weight, G row blocks: one exact Outer rep (see the module docstring)
        w = ws[0]
        if G == 1:
            A, B = As[0], Bs[0]
        else:
            A = torch.cat(As, 1)
            B = A.new_zeros(A.shape[:2] + (w.shape[0],), dtype=Bs[0].dtype)
            t0 = 0
            for g in range(G):
                T = Bs[g].shape[1]
                B[:, t0:t0 + T, wrows[g][0]:wrows[g][1]] = Bs[g]
                t0 += T
        if sess.can_fuse(w, bias):
            sess.add((w, bias), Outer(A[:N], B[:N], bias=True), Outer(A[N:], B[N:], bias=True))
            return gws, gb
        sess.add((w,), Outer(A[:N], B[:N]), Outer(A[N:], B[N:]))
    else:        # separate q/k/v weights: one Outer rep each
        for g in range(G):
            w = ws[widx[g]]
            sess.add((w,), Outer(As[g][:N], Bs[g][:N]), Outer(As[g][N:], Bs[g][N:]))
    if bias is not None:
        bsum = torch.cat([Bs[g].sum(1) for g in sorted(range(G), key=lambda g: orows[g][0])], 1)
        sess.add((bias,), Direct(bsum[:N]), Direct(bsum[N:]))
    return gws, gb


class _GhostTokenParamFn(torch.autograd.Function):
    """A [1, 1, E] parameter (bias_k / bias_v) repeated as one extra token of every sample,
    [n, 1, E]; its per-sample gradient is that token's gradient row (a Direct rep)."""

    @staticmethod
    def forward(ctx, p, sess, n):
        sess.note_forward(p)
        ctx.sess, ctx.p = sess, p
        return p.detach().reshape(1, 1, -1).repeat(n, 1, 1)

    @staticmethod
    def backward(ctx, g):
        return token_param_backward(ctx.sess, g, ctx.p), None, None


def token_param_backward(sess, g: Tensor, p: nn.Parameter) -> Tensor | None:
    """Hands the session the token's gradient rows (Direct reps of p); returns the training
    rows' gradient scaled for the mean training loss (None where left alone)."""
    if sess.closed:
        return None
    G, N = g[:, 0], sess.n_train
    sess.add((p,), Direct(G[:N]), Direct(G[N:]))
    gp = None
    if sess.grad_scale is not None:
        gp = G[:N].sum(0).mul(sess.grad_scale).to(p.dtype).reshape(p.shape)
    return gp


def _in_proj(sess, name, plan, bias, xs, ws) -> tuple:
    """The in-projection op: the autograd Function in eager mode, the custom op under compile."""
    if torch.compiler.is_compiling():
        _compiled.check_no_autocast(xs[0], name)
        return tuple(torch.ops.inrun.ghost_in_proj(list(xs), list(ws), bias, name, *_compiled.flat_plan(plan)))
    return _GhostInProjFn.apply(sess, name, plan, bias, *xs, *ws)


def _token_param(p, sess, n):
    if torch.compiler.is_compiling():
        return torch.ops.inrun.ghost_token(p, n)
    return _GhostTokenParamFn.apply(p, sess, n)


# ---- the module ------------------------------------------------------------------------------
@register(nn.MultiheadAttention, owns_children=True)
class GhostMultiheadAttention(GhostModule, nn.MultiheadAttention):
    """Drop-in nn.MultiheadAttention (same parameters and state_dict). Outside a ghost session
    it IS nn.MultiheadAttention.forward; inside one, see the module docstring."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        sess = _session.current()
        if sess is None:
            return nn.MultiheadAttention.forward(
                self, query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return self._ghost_forward(sess, query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)

    def _ghost_forward(self, sess, query, key, value, key_padding_mask, need_weights, attn_mask,
                       average_attn_weights, is_causal):
        name = getattr(self, "_inrun_name", type(self).__name__)
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            raise ValueError(f"{name}: inside a ghost session MultiheadAttention needs batched 3-D "
                             f"inputs (a sample dimension); got query of shape {tuple(query.shape)}")
        if any(t.is_nested for t in (query, key, value)):
            raise ValueError(f"{name}: nested tensors are not supported inside a ghost session")
        # the masks exactly as nn.MultiheadAttention.forward / F.multi_head_attention_forward
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None   # SDPA applies the causal mask itself
        elif key_padding_mask is not None:
            is_causal = False  # the merged mask is no longer causal

        # batch-first internally; keep the identities query is key is value
        if not self.batch_first:
            if key is value:
                if query is key:
                    query = key = value = query.transpose(0, 1)
                else:
                    query, key = query.transpose(0, 1), key.transpose(0, 1)
                    value = key
            else:
                query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        bsz, tgt_len, E = query.shape
        if E != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        sess.check_rows(bsz, name)
        H, hd = self.num_heads, self.head_dim

        q, k, v = self._in_projection(sess, name, query, key, value)

        src_len = k.shape[1]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * H, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * H, tgt_len, src_len)}.")
                attn_mask = attn_mask.view(bsz, H, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, _token_param(self.bias_k, sess, bsz).to(k.dtype)], 1)
            v = torch.cat([v, _token_param(self.bias_v, sess, bsz).to(v.dtype)], 1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("bias_k and bias_v must both be set or both be None")

        q = q.view(bsz, tgt_len, H, hd).transpose(1, 2)
        k = k.view(bsz, k.shape[1], H, hd).transpose(1, 2)
        v = v.view(bsz, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(bsz, H, 1, hd)], 2)
            v = torch.cat([v, v.new_zeros(bsz, H, 1, hd)], 2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[2]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                     f"{tuple(key_padding_mask.shape)}")
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            w = torch.matmul(q * math.sqrt(1.0 / float(hd)), k.transpose(-2, -1))
            if attn_mask is not None:
                w = w + attn_mask
            w = torch.softmax(w, dim=-1)
            if dropout_p > 0.0:
                w = F.dropout(w, p=dropout_p)
            out = torch.matmul(w, v)
            weights = w.mean(1) if average_attn_weights else w
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            weights = None
        out = out.transpose(1, 2).reshape(bsz, tgt_len, E)
        out = ghost_linear(out, self.out_proj.weight, self.out_proj.bias, sess, f"{name}.out_proj", 0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _in_projection(self, sess, name, query, key, value):
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            if query is key and key is value:        # self-attention: one op, one Gram
                xs, spans = (query,), [(0, 3 * E)]
            elif key is value:                       # encoder-decoder
                xs, spans = (query, key), [(0, E), (E, 3 * E)]
            else:
                xs, spans = (query, key, value), [(0, E), (E, 2 * E), (2 * E, 3 * E)]
            plan = ((0,) * len(xs), tuple(spans), tuple(spans))
            outs = _in_proj(sess, name, plan, self.in_proj_bias, xs, (self.in_proj_weight,))
            if len(xs) == 1:
                return outs[0].chunk(3, dim=-1)
            if len(xs) == 2:
                return (outs[0], *outs[1].chunk(2, dim=-1))
            return outs
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        spans = ((0, E), (E, 2 * E), (2 * E, 3 * E))
        plan = ((0, 1, 2), (None, None, None), spans)
        return _in_proj(sess, name, plan, self.in_proj_bias, (query, key, value),
                        (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))


# ---- Transformer modules --------------------------------------------------------------------
@contextmanager
def _no_fastpath():
    """PyTorch's fused MHA / encoder-layer kernels would run the layer without calling the ghost
    children: keep them off while a session is open (global flag, restored afterwards)."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _batch_first(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Transformer):
        return bool(mod.batch_first)
    for sub in mod.modules():
        if isinstance(sub, nn.MultiheadAttention):
            return bool(sub.batch_first)
    return True


class _GhostTransformerMixin(GhostModule):
    """Containers: no parameters of their own; the children are covered by their rules."""

    def forward(self, *args, **kwargs):
        # compiled: the fast path is never taken with grad enabled and trainable weights (and
        # Dynamo would not trace the global flag's switch)
        if _session.current() is None or torch.compiler.is_compiling():
            return super().forward(*args, **kwargs)
        with _no_fastpath():
            return super().forward(*args, **kwargs)


def _transformer_rule(module_type: type) -> type:
    ghost_cls = type(f"Ghost{module_type.__name__}", (_GhostTransformerMixin, module_type),
                     {"__doc__": f"{module_type.__name__} whose forward, inside a ghost session, "
                                 "never takes PyTorch's fused fast path."})
    ghost_cls.__module__ = __name__

    def to_ghost(mod):
        mod._inrun_orig_class = type(mod)
        mod.__class__ = ghost_cls
        if not _batch_first(mod):   # seq-first: samples are dim 1 of every input inside
            for sub in mod.modules():
                if sub is not mod and "ghost_batch_dim" not in sub.__dict__:
                    sub.ghost_batch_dim = 1
                    sub._inrun_set_batch_dim = True

    def from_ghost(mod):
        mod.__class__ = mod.__dict__.pop("_inrun_orig_class")
        for sub in mod.modules():
            if sub.__dict__.pop("_inrun_set_batch_dim", False):
                sub.__dict__.pop("ghost_batch_dim", None)

    register_rule(Rule(module_type, to_ghost, from_ghost, owns_children=False))
    return ghost_cls


GhostTransformerEncoderLayer = _transformer_rule(nn.TransformerEncoderLayer)
GhostTransformerDecoderLayer = _transformer_rule(nn.TransformerDecoderLayer)
GhostTransformerEncoder = _transformer_rule(nn.TransformerEncoder)
GhostTransformerDecoder = _transformer_rule(nn.TransformerDecoder)
GhostTransformer = _transformer_rule(nn.Transformer)
