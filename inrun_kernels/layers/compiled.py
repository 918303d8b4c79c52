"""The ghost layers under torch.compile: opaque custom ops instead of autograd Functions.

In eager mode a ghost layer is an autograd Function that receives the GhostSession (a Python
object) and, in backward, hands it per-sample gradient reps. Dynamo cannot put that in a graph
(it would be a graph break per layer). Under compilation (torch.compiler.is_compiling()) the
layers call these torch.library custom ops instead:

    torch.ops.inrun.ghost_linear(x, weight, bias, name, batch_dim, transposed) -> y
    torch.ops.inrun.ghost_linear_bw(x, gy, weight, bias, name, batch_dim, transposed,
                                    need_w, need_b) -> (gw, gb)
    torch.ops.inrun.ghost_embedding / ghost_embedding_bw, ghost_affine / ghost_affine_bw,
    ghost_in_proj / ghost_in_proj_bw (MultiheadAttention), ghost_token / ghost_token_bw,
    ghost_conv / ghost_conv_bw (nn.Conv1d / nn.Conv2d: defined in conv.py, with the same helpers)

Each forward op has an autograd formula (register_autograd) that Dynamo/AOTAutograd trace: the
input gradient is ordinary traced code (it fuses), and the parameter gradients come from the
matching *_bw op. Both ops are opaque to the compiler (register_fake gives their shapes); their
real implementations run at run time, find the active session with session.current(), and do
exactly what the eager autograd Functions do (the same helper functions): the forward op
announces its parameters (note_forward: uses of shared / tied parameters are counted), the
backward op hands the session the reps and returns the training rows' scaled gradients.

Parameters: the session keys them by object identity. The tensors these ops receive at run time
ARE the nn.Parameter objects (Dynamo passes parameters as graph inputs, AOTAutograd and Inductor
hand graph inputs and saved leaves through unchanged; tests/test_compile.py checks it).

What the compiler decides at trace time and guards on: whether a session is open (so a compiled
model outside a session is the plain compiled model, and one recompile happens when a session
first opens), and, where a layer needs it in forward (Embedding's broadcast position ids, Dropout),
the session's row counts (a recompile per new batch size). No session state is mutated inside
traced code. Run time behaviour that differs from eager:

- the backward must run while the session is open (ghost_pass.run and the engine do); a backward
  op that finds no session returns the plain gradients of all rows, a closed one zeros;
- with grad_scale=None (the functional API) the ops return zero parameter gradients (a custom op
  cannot return None); ghost_pass restores every .grad afterwards anyway;
- tensors the session keeps past the backward op (reps of shared parameters waiting for their
  other uses, estimator reps with keep=True, embedding ids of tied weights) are copies where they
  would share memory with the op's inputs: Inductor may reuse that memory once the op returned.

Autocast inside a compiled ghost session is refused (the ops do not model autocast's casts).
The ops are tagged cudagraph_unsafe: their side effects must run at every call, never be skipped
by a CUDA graph replay (mode="reduce-overhead"; not tested here, no GPU).
"""
from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import session as _session


# the ops' Python side effects (the session) run at every call: never inside a CUDA graph replay
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


def _active():
    """The session a run-time op works for: None outside one."""
    return _session.current()


def check_no_autocast(x: Tensor, name: str) -> None:
    """Called in traced forward code: autocast is not modelled by the compiled ghost ops."""
    if torch.is_autocast_enabled(x.device.type):
        raise NotImplementedError(
            f"inrun_kernels: layer '{name}': autocast inside a compiled ghost session is not "
            "supported; run the engine on the eager model under autocast, or compile without autocast")


@contextmanager
def _own_what_is_kept(sess, *inputs: Tensor):
    """Around a backward op's hand-over to the session: afterwards, every tensor of a rep the
    session keeps past the op (a shared parameter's use waiting for its other uses, keep=True
    reps) that still shares memory with the op's inputs is replaced by a copy. Inductor may reuse
    an op input's memory once the op has returned. Copied after the hand-over, so what the
    session already reduced (GPT-2's tied lm_head keeps a few columns of the logits gradient,
    not all of it) is never copied whole."""
    stash = getattr(sess, "_stash", {})
    before = len(sess.kept), {k: len(v) for k, v in stash.items()}
    yield
    ptrs = {t.untyped_storage().data_ptr() for t in inputs}

    def own(rep):
        if not dataclasses.is_dataclass(rep):
            return rep
        copies = {f.name: v.clone() for f in dataclasses.fields(rep)
                  if isinstance(v := getattr(rep, f.name), Tensor) and v.untyped_storage().data_ptr() in ptrs}
        return dataclasses.replace(rep, **copies) if copies else rep

    sess.kept[before[0]:] = [(ps, own(rep)) for ps, rep in sess.kept[before[0]:]]
    for key, uses in stash.items():
        k = before[1].get(key, 0)
        uses[k:] = [tuple(own(rep) for rep in use) for use in uses[k:]]


def _grad_out(g: Optional[Tensor], p: Optional[Tensor], need: bool, like: Tensor) -> Tensor:
    """What a *_bw op returns for one parameter: its gradient, zeros where the session leaves
    .grad alone (None in eager), an empty tensor where none is needed."""
    if not need or p is None:
        return like.new_empty(0)
    if g is None:
        return torch.zeros_like(p)
    return g


def _empty_or_like(p: Optional[Tensor], need: bool, like: Tensor) -> Tensor:
    return torch.empty_like(p) if need and p is not None else like.new_empty(0)


# ---- ops (input, weight, bias, name, batch_dim, flag) -> y, and their autograd formula --------
def _weight_bias_op(qualname: str, forward):
    """A forward op y = forward(input, weight, bias, flag) that announces its parameters to the
    active session at run time (flag: Conv1D's transposed weight, BatchNorm's channel dim)."""
    def op(t: Tensor, weight: Tensor, bias: Optional[Tensor], name: str, batch_dim: int,
           flag: bool) -> Tensor:
        sess = _active()
        if sess is not None:
            sess.note_forward(weight, bias)
        return forward(t, weight, bias, flag)
    return torch.library.custom_op(qualname, op, mutates_args=(), tags=_TAGS)


def _save_weight_bias(ctx, inputs, output):
    t, weight, bias, name, batch_dim, flag = inputs
    ctx.save_for_backward(t, weight, bias)
    ctx.name, ctx.batch_dim, ctx.flag = name, batch_dim, flag


def _weight_bias_backward(input_grad, bw_op):
    """The input gradient as traced code (it fuses), the parameter gradients from the opaque
    bw_op(input, gy, weight, bias, name, batch_dim, flag, need_w, need_b) -> (gw, gb)."""
    def backward(ctx, gy):
        t, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        gx = input_grad(gy, t, weight, ctx.flag) if need_x else None
        gw = gb = None
        if need_w or need_b:
            gw, gb = bw_op(t, gy, weight, bias, ctx.name, ctx.batch_dim, ctx.flag, need_w, need_b)
        return gx, gw if need_w else None, gb if need_b else None, None, None, None
    return backward


# ==== linear-type layers: nn.Linear (y = x W^T + b), transformers Conv1D (y = x W + b) ========
def _linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], transposed: bool) -> Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    size_out = x.shape[:-1] + (weight.shape[1],)
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    return y.view(size_out)


ghost_linear = _weight_bias_op("inrun::ghost_linear", _linear_forward)


@ghost_linear.register_fake
def _(x, weight, bias, name, batch_dim, transposed):
    out = weight.shape[1] if transposed else weight.shape[0]
    return x.new_empty(x.shape[:-1] + (out,))


@torch.library.custom_op("inrun::ghost_linear_bw", mutates_args=(), tags=_TAGS)
def ghost_linear_bw(x: Tensor, gy: Tensor, weight: Tensor, bias: Optional[Tensor], name: str,
                    batch_dim: int, transposed: bool, need_w: bool,
                    need_b: bool) -> tuple[Tensor, Tensor]:
    from .conv1d import conv1d_backward
    from .linear import linear_backward
    sess = _active()
    if sess is None:   # traced in a session, run outside one: the plain gradients
        gw, gb = _plain_linear_grads(x, gy, weight, bias, batch_dim, transposed, need_w, need_b)
    else:
        fn = conv1d_backward if transposed else linear_backward
        with _own_what_is_kept(sess, x, gy):
            gw, gb = fn(sess, name, x, gy, weight, bias, batch_dim, need_w, need_b)
    return _grad_out(gw, weight, need_w, gy), _grad_out(gb, bias, need_b, gy)


@ghost_linear_bw.register_fake
def _(x, gy, weight, bias, name, batch_dim, transposed, need_w, need_b):
    return _empty_or_like(weight, need_w, gy), _empty_or_like(bias, need_b, gy)


def _plain_linear_grads(x, gy, weight, bias, batch_dim, transposed, need_w, need_b):
    a, b = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    gw = gb = None
    if need_w:
        gw = (a.T @ b.to(a.dtype) if transposed else b.T @ a.to(b.dtype)).to(weight.dtype)
    if need_b and bias is not None:
        gb = b.sum(0).to(bias.dtype)
    return gw, gb


def _linear_input_grad(gy: Tensor, x: Tensor, weight: Tensor, transposed: bool) -> Tensor:
    w = weight.to(gy.dtype)
    return gy @ (w.T if transposed else w)


ghost_linear.register_autograd(_weight_bias_backward(_linear_input_grad, torch.ops.inrun.ghost_linear_bw),
                               setup_context=_save_weight_bias)


# ==== embedding ================================================================================
@torch.library.custom_op("inrun::ghost_embedding", mutates_args=(), tags=_TAGS)
def ghost_embedding(ids: Tensor, weight: Tensor, padding_idx: Optional[int], name: str,
                    batch_dim: int) -> Tensor:
    sess = _active()
    if sess is not None:
        sess.note_forward(weight)
        rows_first = ids.movedim(batch_dim, 0) if batch_dim else ids
        # a copy: Inductor may reuse the memory of an op input (e.g. in-graph position ids)
        sess.note_rows(weight, rows_first.reshape(rows_first.shape[0], -1).clone())
    return F.embedding(ids, weight, padding_idx)


@ghost_embedding.register_fake
def _(ids, weight, padding_idx, name, batch_dim):
    return weight.new_empty(ids.shape + (weight.shape[1],))


@torch.library.custom_op("inrun::ghost_embedding_bw", mutates_args=(), tags=_TAGS)
def ghost_embedding_bw(ids: Tensor, gy: Tensor, weight: Tensor, padding_idx: Optional[int],
                       name: str, batch_dim: int) -> Tensor:
    from .embedding import embedding_backward
    sess = _active()
    if sess is None:
        gw = torch.ops.aten.embedding_dense_backward(gy, ids, weight.shape[0],
                                                     -1 if padding_idx is None else padding_idx, False)
        return gw.to(weight.dtype)
    with _own_what_is_kept(sess, ids, gy):
        gw = embedding_backward(sess, name, ids, gy, weight, padding_idx, batch_dim, True)
    return _grad_out(gw, weight, True, gy)


@ghost_embedding_bw.register_fake
def _(ids, gy, weight, padding_idx, name, batch_dim):
    return torch.empty_like(weight)


def _embedding_setup(ctx, inputs, output):
    ids, weight, padding_idx, name, batch_dim = inputs
    ctx.save_for_backward(ids, weight)
    ctx.padding_idx, ctx.name, ctx.batch_dim = padding_idx, name, batch_dim


def _embedding_backward(ctx, gy):
    ids, weight = ctx.saved_tensors
    gw = None
    if ctx.needs_input_grad[1]:
        gw = torch.ops.inrun.ghost_embedding_bw(ids, gy, weight, ctx.padding_idx, ctx.name, ctx.batch_dim)
    return None, gw, None, None, None


ghost_embedding.register_autograd(_embedding_backward, setup_context=_embedding_setup)


# ==== affine step of the norms: y = xhat * weight (+ bias) =====================================
# channel=False: weight over the trailing dims (LayerNorm, RMSNorm); True: over dim 1 (BatchNorm)
def _affine_forward(xhat: Tensor, weight: Tensor, bias: Optional[Tensor], channel: bool) -> Tensor:
    from .batchnorm import _channel_view
    if channel:
        y = xhat * _channel_view(weight, xhat.dim())
        if bias is not None:
            y = y + _channel_view(bias, xhat.dim())
        return y.to(xhat.dtype)
    y = xhat * weight
    return y + bias if bias is not None else y


def _affine_dtype(xhat: Tensor, weight: Tensor, bias: Optional[Tensor], channel: bool) -> torch.dtype:
    if channel:
        return xhat.dtype
    dt = torch.promote_types(xhat.dtype, weight.dtype)
    return dt if bias is None else torch.promote_types(dt, bias.dtype)


ghost_affine = _weight_bias_op("inrun::ghost_affine", _affine_forward)


@ghost_affine.register_fake
def _(xhat, weight, bias, name, batch_dim, channel):
    return xhat.new_empty(xhat.shape, dtype=_affine_dtype(xhat, weight, bias, channel))


@torch.library.custom_op("inrun::ghost_affine_bw", mutates_args=(), tags=_TAGS)
def ghost_affine_bw(xhat: Tensor, gy: Tensor, weight: Tensor, bias: Optional[Tensor], name: str,
                    batch_dim: int, channel: bool, need_w: bool, need_b: bool) -> tuple[Tensor, Tensor]:
    from .batchnorm import channel_affine_backward
    from .norm import affine_backward
    sess = _active()
    if sess is None:
        gw, gb = _plain_affine_grads(xhat, gy, weight, bias, channel, need_w, need_b)
    elif channel:
        gw, gb = channel_affine_backward(sess, name, xhat, gy, weight, bias, need_w, need_b)
    else:
        gw, gb = affine_backward(sess, name, xhat, gy, weight, bias, batch_dim, need_w, need_b)
    return _grad_out(gw, weight, need_w, gy), _grad_out(gb, bias, need_b, gy)


@ghost_affine_bw.register_fake
def _(xhat, gy, weight, bias, name, batch_dim, channel, need_w, need_b):
    return _empty_or_like(weight, need_w, gy), _empty_or_like(bias, need_b, gy)


def _plain_affine_grads(xhat, gy, weight, bias, channel, need_w, need_b):
    def reduce(t, p):
        if channel:
            dims = [0] + list(range(2, t.dim()))
            return t.sum(dims)
        return t.reshape(-1, *p.shape).sum(0)
    gw = reduce(gy * xhat, weight).to(weight.dtype) if need_w else None
    gb = reduce(gy, bias).to(bias.dtype) if need_b and bias is not None else None
    return gw, gb


def _affine_input_grad(gy: Tensor, xhat: Tensor, weight: Tensor, channel: bool) -> Tensor:
    from .batchnorm import _channel_view
    w = _channel_view(weight, gy.dim()) if channel else weight
    return (gy * w).to(xhat.dtype)


ghost_affine.register_autograd(_weight_bias_backward(_affine_input_grad, torch.ops.inrun.ghost_affine_bw),
                               setup_context=_save_weight_bias)


# ==== MultiheadAttention: the q/k/v in-projection and bias_k / bias_v ==========================
# plan (see attention._GhostInProjFn): group g projects xs[g] with ws[widx[g]] rows wrows[g]
# (-1, -1: all rows) and bias rows orows[g]; flattened into int lists for the schema.
def _unflat_plan(widx: List[int], wrows: List[int], orows: List[int]):
    G = len(widx)
    wr = tuple(None if wrows[2 * g] < 0 else (wrows[2 * g], wrows[2 * g + 1]) for g in range(G))
    orr = tuple((orows[2 * g], orows[2 * g + 1]) for g in range(G))
    return tuple(widx), wr, orr


def flat_plan(plan) -> tuple[list[int], list[int], list[int]]:
    widx, wrows, orows = plan
    wr = [v for r in wrows for v in ((-1, -1) if r is None else r)]
    return list(widx), wr, [v for r in orows for v in r]


def _in_proj_forward(xs, ws, bias, plan):
    widx, wrows, orows = plan
    outs = []
    for g in range(len(widx)):
        w = ws[widx[g]]
        w = w if wrows[g] is None else w[wrows[g][0]:wrows[g][1]]
        b = None if bias is None else bias[orows[g][0]:orows[g][1]]
        outs.append(F.linear(xs[g], w, b))
    return outs


@torch.library.custom_op("inrun::ghost_in_proj", mutates_args=(), tags=_TAGS)
def ghost_in_proj(xs: List[Tensor], ws: List[Tensor], bias: Optional[Tensor], name: str,
                  widx: List[int], wrows: List[int], orows: List[int]) -> List[Tensor]:
    sess = _active()
    if sess is not None:
        sess.note_forward(*ws, bias)
    return _in_proj_forward(xs, ws, bias, _unflat_plan(widx, wrows, orows))


@ghost_in_proj.register_fake
def _(xs, ws, bias, name, widx, wrows, orows):
    _, _, orr = _unflat_plan(widx, wrows, orows)
    return [x.new_empty(x.shape[:-1] + (o1 - o0,)) for x, (o0, o1) in zip(xs, orr)]


@torch.library.custom_op("inrun::ghost_in_proj_bw", mutates_args=(), tags=_TAGS)
def ghost_in_proj_bw(xs: List[Tensor], gys: List[Tensor], ws: List[Tensor], bias: Optional[Tensor],
                     name: str, widx: List[int], wrows: List[int], orows: List[int],
                     need_w: List[bool], need_b: bool) -> List[Tensor]:
    """[*gws (one per weight), gb]"""
    from .attention import _in_proj_reps
    plan = _unflat_plan(widx, wrows, orows)
    sess = _active()
    gws, gb = [None] * len(ws), None
    if sess is None:
        gws, gb = _plain_in_proj_grads(xs, gys, ws, bias, plan, need_w, need_b)
    elif not sess.closed:
        with _own_what_is_kept(sess, *xs, *gys):
            gws, gb = _in_proj_reps(sess, name, list(xs), list(ws), bias, list(gys), plan, need_w, need_b)
    like = gys[0]
    return [_grad_out(g, w, n, like) for g, w, n in zip(gws, ws, need_w)] + [_grad_out(gb, bias, need_b, like)]


@ghost_in_proj_bw.register_fake
def _(xs, gys, ws, bias, name, widx, wrows, orows, need_w, need_b):
    like = gys[0]
    return [_empty_or_like(w, n, like) for w, n in zip(ws, need_w)] + [_empty_or_like(bias, need_b, like)]


def _plain_in_proj_grads(xs, gys, ws, bias, plan, need_w, need_b):
    widx, wrows, orows = plan
    gws = [torch.zeros_like(w) if n else None for w, n in zip(ws, need_w)]
    gb = torch.zeros_like(bias) if need_b and bias is not None else None
    for g in range(len(xs)):
        a, b = xs[g].reshape(-1, xs[g].shape[-1]), gys[g].reshape(-1, gys[g].shape[-1])
        k = widx[g]
        if gws[k] is not None:
            r0, r1 = wrows[g] if wrows[g] is not None else (0, ws[k].shape[0])
            gws[k][r0:r1] += (b.T @ a.to(b.dtype)).to(ws[k].dtype)
        if gb is not None:
            gb[orows[g][0]:orows[g][1]] += b.sum(0).to(gb.dtype)
    return gws, gb


def _in_proj_setup(ctx, inputs, output):
    xs, ws, bias, name, widx, wrows, orows = inputs
    ctx.save_for_backward(*xs, *ws, bias)
    ctx.G, ctx.name, ctx.flat = len(xs), name, (widx, wrows, orows)


def _in_proj_backward(ctx, gys):
    saved = ctx.saved_tensors
    G = ctx.G
    xs, ws, bias = list(saved[:G]), list(saved[G:-1]), saved[-1]
    widx, wrows, orows = ctx.flat
    plan = _unflat_plan(widx, wrows, orows)
    need_xs, need_w, need_b = ctx.needs_input_grad[:3]   # one bool per tensor of a list input
    need_xs, need_w, need_b = [bool(n) for n in need_xs], [bool(n) for n in need_w], bool(need_b) and bias is not None
    gys = [torch.zeros(xs[g].shape[:-1] + (plan[2][g][1] - plan[2][g][0],), dtype=xs[g].dtype,
                       device=xs[g].device) if gy is None else gy for g, gy in enumerate(gys)]
    gxs = []
    for g in range(G):
        w = ws[plan[0][g]]
        w = w if plan[1][g] is None else w[plan[1][g][0]:plan[1][g][1]]
        gxs.append(gys[g] @ w.to(gys[g].dtype) if need_xs[g] else None)
    gws, gb = None, None
    if any(need_w) or need_b:
        out = torch.ops.inrun.ghost_in_proj_bw(xs, gys, ws, bias, ctx.name, widx, wrows, orows,
                                               need_w, need_b)
        gws = [o if n else None for o, n in zip(out[:-1], need_w)]
        gb = out[-1] if need_b else None
    return gxs, gws, gb, None, None, None, None


ghost_in_proj.register_autograd(_in_proj_backward, setup_context=_in_proj_setup)


@torch.library.custom_op("inrun::ghost_token", mutates_args=(), tags=_TAGS)
def ghost_token(p: Tensor, n: int) -> Tensor:
    """A [1, 1, E] parameter repeated as one extra token of every sample: [n, 1, E]."""
    sess = _active()
    if sess is not None:
        sess.note_forward(p)
    return p.detach().reshape(1, 1, -1).repeat(n, 1, 1)


@ghost_token.register_fake
def _(p, n):
    return p.new_empty((n, 1, p.numel()))


@torch.library.custom_op("inrun::ghost_token_bw", mutates_args=(), tags=_TAGS)
def ghost_token_bw(g: Tensor, p: Tensor) -> Tensor:
    from .attention import token_param_backward
    sess = _active()
    if sess is None:
        gp = g[:, 0].sum(0).to(p.dtype).reshape(p.shape)
    else:
        with _own_what_is_kept(sess, g):
            gp = token_param_backward(sess, g, p)
    return _grad_out(gp, p, True, g)


@ghost_token_bw.register_fake
def _(g, p):
    return torch.empty_like(p)


def _token_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _token_backward(ctx, g):
    (p,) = ctx.saved_tensors
    return torch.ops.inrun.ghost_token_bw(g, p) if ctx.needs_input_grad[0] else None, None


ghost_token.register_autograd(_token_backward, setup_context=_token_setup)


# ==== the gradient-path guard, for compiled graphs ============================================
def _bw_ops() -> set:
    ops = torch.ops.inrun
    return {ops.ghost_linear_bw.default, ops.ghost_embedding_bw.default, ops.ghost_affine_bw.default,
            ops.ghost_in_proj_bw.default, ops.ghost_token_bw.default,
            ops.ghost_conv_bw.default}   # (defined in conv.py)


# ops that pass one gradient through unchanged in value, or add gradients: a parameter gradient
# made of ghost-op outputs by these alone comes from the ghost layers only
_PASS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
         "aten.t.default", "aten.permute.default", "aten.clone.default", "aten.contiguous.default",
         "aten.alias.default", "aten.detach.default", "prims.convert_element_type.default",
         "aten._to_copy.default"}
_ADD = {"aten.add.Tensor", "aten.add_.Tensor"}


def _sources(node, ghost_ops, memo) -> tuple[frozenset, bool]:
    """(non-ghost ops feeding `node`'s value, whether a ghost op does) in a backward FX graph."""
    if node is None or not hasattr(node, "op"):
        return frozenset(), False
    if node in memo:
        return memo[node]
    import operator
    res: tuple[frozenset, bool]
    if node.op == "call_function" and node.target in ghost_ops:   # a single-output ghost op
        res = (frozenset(), True)
    elif node.op == "call_function" and node.target is operator.getitem:
        src = node.args[0]
        res = (frozenset(), True) if getattr(src, "target", None) in ghost_ops else \
            (frozenset({_opname(src)}), False)
    elif node.op == "call_function" and str(node.target) in _PASS | _ADD:
        ops, ghost = frozenset(), False
        for a in node.args:
            if hasattr(a, "op"):
                o, g = _sources(a, ghost_ops, memo)
                ops, ghost = ops | o, ghost or g
        res = (ops, ghost)
    else:
        res = (frozenset({_opname(node)}), False)
    memo[node] = res
    return res


def _opname(node) -> str:
    t = getattr(node, "target", None)
    return f"{t if node.op == 'call_function' else node.op} (in a compiled graph)"


_UNSEEN_WARNED: set = set()


def compiled_grad_sources(node) -> "list[tuple[frozenset, bool]] | None":
    """For a backward node of a torch.compile'd graph (AOTAutograd's CompiledFunctionBackward):
    per entry of node.next_functions, (non-ghost ops inside the graph feeding that input's
    gradient, whether a ghost op does). Read once per compiled graph from its backward FX graph
    and cached on it. None for any other node. When the graph cannot be read (an AOTAutograd
    cache hit without the module, another torch version): every input counts as ghost-fed,
    with a warning (ik.verify still checks the numbers)."""
    fwd = getattr(type(node), "_forward_cls", None)
    if fwd is None or not hasattr(fwd, "_lazy_backward_info") or not hasattr(fwd, "compiled_fw"):
        return None
    cached = fwd.__dict__.get("_inrun_grad_sources")
    if cached is not None:
        return cached
    n_in = len(node.next_functions)
    try:
        from torch._dynamo.compiled_autograd import extract_bw_module
        gm = extract_bw_module(fwd)
        outs = next(nd for nd in gm.graph.nodes if nd.op == "output").args[0]
        # the graph's gradient outputs follow all its inputs (symbolic sizes too), next_functions
        # its tensor inputs: match the inputs that require grad in order
        wants = [i for i, info in enumerate(fwd.metadata.input_info) if info.requires_grad]
        edges = [k for k, (f, _) in enumerate(node.next_functions) if f is not None]
        if len(outs) != len(fwd.metadata.input_info) or len(wants) != len(edges):
            raise RuntimeError(f"{len(outs)} gradient outputs, {len(wants)} inputs requiring grad, "
                               f"{len(edges)} edges")
        ghost_ops, memo = _bw_ops(), {}
        cached = [(frozenset(), False)] * n_in
        for i, k in zip(wants, edges):
            cached[k] = _sources(outs[i], ghost_ops, memo)
    except Exception as e:   # noqa: BLE001
        key = fwd.__qualname__ + str(getattr(fwd, "_aot_id", ""))
        if key not in _UNSEEN_WARNED:
            _UNSEEN_WARNED.add(key)
            warnings.warn(f"inrun_kernels: the gradient-path guard cannot read the backward graph of "
                          f"a compiled region ({type(e).__name__}: {e}); its parameters are taken as "
                          "fed by ghost layers only (ik.verify checks the numbers)", stacklevel=3)
        cached = [(frozenset(), True)] * n_in
    try:
        fwd._inrun_grad_sources = cached
    except (AttributeError, TypeError):
        pass
    return cached
