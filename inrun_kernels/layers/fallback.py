"""The generic exact fallback: any module with trainable parameters that no native rule covers.

Per-sample gradients of the module's OWN parameters (its children's included: it owns them) are
formed from the module's inputs and output gradients by running the module once per sample:

  forward (inside a ghost session, one autograd Function):
    1. y = module(*inputs)                     the batched forward, no graph (the check below)
    2. for each sample i:  y_i = module(*inputs_i)  with a small autograd graph of its own, whose
       leaves are detached copies of the parameters and of sample i's inputs
    3. the sample layout of the outputs must agree: cat_i(y_i) == y (dtype tolerance). A module
       whose output for one sample depends on the other rows (batch statistics, capacity-limited
       routing, dropout drawing one mask for the batch, a batch-level auxiliary loss) fails this
       check: BatchCouplingError naming it, at forward, before anything is computed.
    The Function returns cat_i(y_i): exactly what a batch-size-1 loop computes.
  backward: per sample, torch.autograd.grad(y_i, (parameters, inputs_i), gy_i) -- the per-sample
    gradients of the module's parameters [rows, *shape] (handed to the session as Direct reps:
    training rows and validation rows) and the input gradients; the training rows' sum, scaled
    by the session's grad_scale, is the parameters' .grad.

Sample layout: an input or output tensor is batched when its size on the sample dim (dim 0, or
the layer's ghost_batch_dim) is a multiple k of the session's rows, sample-major: sample i owns
the k slices [i k, (i + 1) k) (k = 1: [B, ...]; k = T: tokens flattened as [B * T, ...], as MoE
experts and routers see them). Other tensors (a [1, T, d] position table, a causal mask) are
passed whole to every sample. A wrong guess cannot go silent: the outputs then disagree with
the batched forward and the check in step 3 refuses the module.

Cost: the module runs once per row with a graph, plus the batched forward, plus one backward per
row; the per-sample gradients are materialised, [rows, numel of the module's parameters]
(memory), and their products formed densely. Exact; for small modules (norm variants, learned
position tables, cls tokens, routers, Mamba's mixer on small models) the cost is small;
ik.coverage(model) lists every fallback module with its parameter count and measured seconds.
Not available under torch.compile (an error naming the module), nor under double backward
(estimator='second').
"""
from __future__ import annotations

import inspect
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from .. import session as _session
from ..reps import Direct
from .registry import GhostModule, Rule

_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class BatchMixingError(RuntimeError):
    """Raised (as patch.BatchCouplingError) when a fallback module's output for one sample
    depends on other rows of the batch."""


def _coupling(msg: str):
    from ..patch import BatchCouplingError   # patch imports the layers
    return BatchCouplingError(msg)


def _layout(t: Tensor, bd: int, rows: int) -> int | None:
    """k when t holds k sample-major slices per row on dim bd, else None (broadcast input)."""
    if t.dim() <= bd:
        return None
    size = t.shape[bd]
    if size == 0 or size % rows:
        return None
    return size // rows


def _slice(t: Tensor, bd: int, k: int, i: int) -> Tensor:
    return t.narrow(bd, i * k, k)


class _State:
    """What forward leaves for backward (kept off the autograd ctx's saved tensors: the
    per-sample graphs are ordinary Python objects)."""

    def __init__(self):
        self.outs: list[list[Tensor]] = []      # per sample: differentiable output leaves
        self.ins: list[list[Tensor]] = []       # per sample: input leaves that need grad
        self.leaves: list[Tensor] = []          # detached parameter leaves


class _FallbackFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, *flat):
        mod, sess, name, bd = cfg["mod"], cfg["sess"], cfg["name"], cfg["bd"]
        spec, in_k, in_grad, n_in = cfg["spec"], cfg["in_k"], cfg["in_grad"], cfg["n_in"]
        flat_in, params = list(flat[:n_in]), list(flat[n_in:])
        t0 = time.perf_counter()
        rows = sess.n_rows
        names = mod._inrun_fb_names
        sess.note_forward(*params)
        mod._inrun_fb_inner = True
        susp = _session.suspended()   # children patched natively (layers/rawparam.py) run as their originals
        susp.__enter__()
        try:
            args, kwargs = pytree.tree_unflatten(flat_in, spec)
            batched = mod(*args, **kwargs)                     # 1. the module as it is
            leaves = [p.detach().requires_grad_(p.requires_grad) for p in params]
            st = _State()
            st.leaves = leaves
            outs_i, ins_i = [], []
            for i in range(rows):                              # 2. one sample at a time
                flat_i = []
                in_leaves = []
                for t, k, g in zip(flat_in, in_k, in_grad):
                    if isinstance(t, Tensor):
                        t = t.detach()
                        if k is not None:
                            t = _slice(t, bd, k, i)
                        if g:
                            t = t.requires_grad_()
                            in_leaves.append(t)
                    flat_i.append(t)
                a_i, kw_i = pytree.tree_unflatten(flat_i, spec)
                with torch.enable_grad():
                    out_i = functional_call(mod, dict(zip(names, leaves)), tuple(a_i), kw_i)
                outs_i.append(pytree.tree_flatten(out_i)[0])
                ins_i.append(in_leaves)
        finally:
            susp.__exit__(None, None, None)
            mod._inrun_fb_inner = False
        flat_b, out_spec = pytree.tree_flatten(batched)
        result = []
        for j, yb in enumerate(flat_b):                        # 3. the same outputs, per sample
            if not isinstance(yb, Tensor):
                continue
            parts = [o[j] for o in outs_i]
            k = _layout(yb, bd, rows)
            if k is None or any(not isinstance(p, Tensor) or p.shape[bd] != k for p in parts):
                raise _coupling(
                    f"inrun_kernels: module '{name}' ({mod._inrun_orig_class.__name__}, covered by "
                    f"the per-sample fallback): output {j} of shape {tuple(yb.shape)} has no "
                    f"per-sample layout over the {rows} rows on dim {bd} (a batch-level output, e.g. "
                    "an auxiliary loss, couples the samples); per-sample gradients are not defined")
            y = torch.cat([p.detach() for p in parts], bd)
            if y.shape != yb.shape or not _close(y, yb):
                raise _coupling(
                    f"inrun_kernels: module '{name}' ({mod._inrun_orig_class.__name__}, covered by "
                    "the per-sample fallback) gives a sample a different output when run alone than "
                    "in the batch: it couples the samples (batch statistics, capacity-limited "
                    "routing, dropout in training mode, or an input whose sample layout is not "
                    f"dim {bd}); per-sample gradients are not defined for it. Put it in eval mode, "
                    "freeze its parameters, or register a ghost rule for it")
            result.append(y)
        diff = [j for j, yb in enumerate(flat_b) if isinstance(yb, Tensor)]
        st.outs = [[o[j] if isinstance(o[j], Tensor) and o[j].requires_grad else None for j in diff]
                   for o in outs_i]
        st.ins = ins_i
        ctx.st, ctx.sess, ctx.name, ctx.bd, ctx.params = st, sess, name, bd, params
        ctx.in_grad, ctx.in_k, ctx.n_in, ctx.mod = in_grad, in_k, n_in, mod
        ctx.shapes = [(t.shape, t.dtype) if isinstance(t, Tensor) else None for t in flat_in]
        cfg["out"] = (out_spec, flat_b)
        nondiff = [y for y in result if not y.is_floating_point()]
        if nondiff:
            ctx.mark_non_differentiable(*nondiff)
        mod._inrun_fb_seconds = getattr(mod, "_inrun_fb_seconds", 0.0) + time.perf_counter() - t0
        return tuple(result)

    @staticmethod
    def backward(ctx, *gys):
        t0 = time.perf_counter()
        st, sess, bd, params = ctx.st, ctx.sess, ctx.bd, ctx.params
        if st is None:
            raise RuntimeError(f"inrun_kernels: the per-sample fallback of module '{ctx.name}' was "
                               "backpropagated twice (its per-sample graphs are used once)")
        rows = len(st.outs)
        closed = sess.closed
        train_p = [k for k, p in enumerate(params) if p.requires_grad]
        per_sample = [[] for _ in params]
        in_parts = [[] for _ in ctx.in_grad]
        for i in range(rows):
            outs, grads = [], []
            for o, gy in zip(st.outs[i], gys):
                if o is None or gy is None:
                    continue
                k = gy.shape[bd] // rows
                outs.append(o)
                grads.append(_slice(gy, bd, k, i).to(o.dtype))
            wrt = ([] if closed else [st.leaves[k] for k in train_p]) + st.ins[i]
            if outs and wrt:
                g = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
            else:
                g = [None] * len(wrt)
            np_ = 0 if closed else len(train_p)
            for pos, k in enumerate(train_p if not closed else []):
                gk = g[pos]
                per_sample[k].append(torch.zeros_like(st.leaves[k]) if gk is None else gk)
            it = iter(g[np_:])
            for j, need in enumerate(ctx.in_grad):
                if need:
                    in_parts[j].append(next(it))
        ctx.st = None   # the graphs are spent
        # input gradients, in the inputs' layouts
        gx = []
        for j, need in enumerate(ctx.in_grad):
            if not need:
                gx.append(None)
                continue
            k = ctx.in_k[j]
            parts = in_parts[j]
            if k is None:   # broadcast input: the sum over samples
                tot = None
                for p in parts:
                    if p is not None:
                        tot = p if tot is None else tot + p
                gx.append(tot)
            else:
                shape, dtype = ctx.shapes[j]
                gx.append(torch.cat([torch.zeros(_slice_shape(shape, bd, k), dtype=dtype, device=ref.device)
                                     if p is None else p for p in parts], bd)
                          if (ref := next((p for p in parts if p is not None), None)) is not None else None)
        gp = [None] * len(params)
        if not closed:
            N = sess.n_train
            for k in train_p:
                G = torch.stack(per_sample[k])
                if sess.grad_scale is not None and ctx.needs_input_grad[1 + ctx.n_in + k]:
                    gp[k] = (G[:N].sum(0) * sess.grad_scale).to(params[k].dtype)
                sess.add((params[k],), Direct(G[:N]), Direct(G[N:]))
        mod = ctx.mod
        mod._inrun_fb_seconds = getattr(mod, "_inrun_fb_seconds", 0.0) + time.perf_counter() - t0
        return (None,) + tuple(gx) + tuple(gp)


def _slice_shape(shape, bd, k):
    s = list(shape)
    s[bd] = k
    return s


def _close(a: Tensor, b: Tensor) -> bool:
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tol = _TOL.get(a.dtype, 1e-4)
    a64, b64 = a.double(), b.double()
    if not bool(torch.isfinite(a64).all()) or not bool(torch.isfinite(b64).all()):
        return bool(torch.equal(torch.isfinite(a64), torch.isfinite(b64)))
    scale = b64.abs().max().clamp_min(1e-30) if b64.numel() else 1.0
    return bool(((a64 - b64).abs().max() <= tol * scale) if b64.numel() else True)


class GhostFallback(GhostModule):
    """Mixin of the fallback ghost classes (see module doc). Outside a ghost session, and for
    the per-sample calls inside the fallback itself, the module is its original class."""

    def forward(self, *args, **kwargs):
        sess = _session.current()
        if sess is None or self.__dict__.get("_inrun_fb_inner") or sess.closed:
            return super().forward(*args, **kwargs)
        name = getattr(self, "_inrun_name", type(self).__name__)
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"inrun_kernels: module '{name}' ({self._inrun_orig_class.__name__}) is covered by "
                "the per-sample fallback, which does not run under torch.compile; compile the "
                "model without it (or register a ghost rule for the module type)")
        names, params = [], []
        for n, p in self.named_parameters():
            names.append(n)
            params.append(p)
        self._inrun_fb_names = names
        if not any(p.requires_grad for p in params):
            return super().forward(*args, **kwargs)
        flat_in, spec = pytree.tree_flatten((list(args), kwargs))
        bd = self.ghost_batch_dim
        rows = sess.n_rows
        in_k = [(_layout(t, bd, rows) if isinstance(t, Tensor) else None) for t in flat_in]
        if not any(k is not None for k in in_k):
            raise _coupling(
                f"inrun_kernels: module '{name}' ({self._inrun_orig_class.__name__}, covered by the "
                f"per-sample fallback) got no input with the session's {rows} rows on dim {bd}; "
                "per-sample gradients cannot be split by rows")
        in_grad = [isinstance(t, Tensor) and t.requires_grad and t.is_floating_point() for t in flat_in]
        cfg = dict(mod=self, sess=sess, name=name, bd=bd, spec=spec, in_k=in_k, in_grad=in_grad,
                   n_in=len(flat_in))
        ys = iter(_FallbackFn.apply(cfg, *flat_in, *params))
        out_spec, flat_b = cfg.pop("out")   # the output's structure, tensors replaced by ours
        return pytree.tree_unflatten([next(ys) if isinstance(t, Tensor) else t for t in flat_b], out_spec)


_GHOSTS: dict[type, type] = {}


def fallback_rule(mod: nn.Module) -> Rule:
    cls = mod.__dict__.get("_inrun_orig_class", type(mod))
    if cls not in _GHOSTS:
        _make(cls)

    def to_ghost(m):
        m._inrun_orig_class = type(m)
        m.__class__ = _GHOSTS[type(m)] if type(m) in _GHOSTS else _make(type(m))

    def from_ghost(m):
        m.__class__ = m.__dict__.pop("_inrun_orig_class")
        for attr in ("_inrun_fb_inner", "_inrun_fb_names", "_inrun_fb_seconds"):
            m.__dict__.pop(attr, None)

    return Rule(cls, to_ghost, from_ghost, owns_children=True)


def _make(cls):
    ghost = _GHOSTS[cls] = type(f"GhostFallback{cls.__name__}", (GhostFallback, cls), {"__module__": __name__})
    return ghost


def has_own_trainable(mod: nn.Module) -> bool:
    return any(p.requires_grad for p in mod.parameters(recurse=False))


def _takes_no_input(mod: nn.Module) -> bool:
    """forward(self) with no required argument: a parameter producer (Swin's relative position
    bias table), whose output is broadcast over the batch by its caller."""
    try:
        sig = inspect.signature(type(mod).forward)
    except (TypeError, ValueError):
        return False
    params = list(sig.parameters.values())[1:]
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def needs_fallback_for_children(mod: nn.Module, lookup) -> bool:
    """A module whose child uses its trainable parameters without the samples (their output is
    broadcast over the batch here, so only this module's output splits by sample): a child with
    its own parameters, no native rule and a forward without input (Swin's relative position
    bias), or a trainable nn.Embedding named relative_attention_bias (T5, indexed by position
    buckets [q, k], not by sample). The fallback then covers this module and its children."""
    for cname, c in mod.named_children():
        if isinstance(c, GhostModule) or not any(p.requires_grad for p in c.parameters()):
            continue
        if cname == "relative_attention_bias" and isinstance(c, nn.Embedding):
            return True
        if has_own_trainable(c) and lookup(c) is None and _takes_no_input(c):
            return True
    return False
