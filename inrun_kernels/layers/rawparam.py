"""Raw nn.Parameters broadcast over the batch (cls tokens, position tables, layer scales), natively.

A module that owns trainable parameters directly (not through a child layer) used to go to the
per-sample fallback as a whole, children included: one layer-scale vector sent a ConvNeXt block
(depthwise conv, norm, two linears) through the per-row loop. When every such parameter is
broadcast-shaped (at most 1-D, or a leading dim of 1: ViT's cls_token [1, 1, d] and
position_embeddings [1, T, d], ConvNeXt's layer_scale_parameter [d], CLIP's class_embedding
[d]), patch() (with the fallback on) gives the module this rule instead: its children are
patched natively, and inside a ghost session its own parameters' uses are intercepted (a
TorchFunctionMode scoped to the module's forward) where they meet the samples:

  - x OP p, p OP x with OP elementwise (add, sub, mul, div) and x a tensor with the session's
    rows on dim 0 that p broadcasts over: p is replaced by q = p viewed [1, ..., *p.shape] and
    expanded to [rows, ...] (no copy), so autograd hands q's gradient per sample, already summed
    over the other broadcast dims: sample i's gradient of p is exactly q.grad[i];
  - p.expand(rows, ...) (a token concatenated to every sample): the same q, expanded.
  Per-sample gradients enter the products as Direct reps [rows, *p.shape] (as small as p per
  row); the training rows' sum, scaled, is p.grad.

Checked, per instance and per call signature (tensor shapes / dtypes and the other arguments),
on the first call inside a session, by a dry run on the real inputs (session suspended, no
parameter or RNG state changed): every use of the module's own parameters that carries a
gradient is one of the above; the output with q equals the module's own output; perturbing q's
row r moves only the output's row r (r = first and last); and sample 0 run alone gives the
batched output's row 0. When a check fails (an indexed or interpolated table, an op on p alone,
a sample-mixing forward), that signature goes through the exact per-sample fallback
(layers/fallback.py) with the session suspended for the children (they then run as their
original classes and the fallback owns their parameters), and ik.coverage() lists the module
under `fallback`. A use outside the checked ops on a later call of an already checked signature
(a data-dependent branch) is an error naming the module, the parameter and the op. Not under
torch.compile (an error naming the module, as the fallback).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .. import session as _session
from ..reps import Direct
from .fallback import GhostFallback, _close, _layout, _slice
from .registry import GhostModule, Rule

_BINARY = {"add", "sub", "mul", "div", "true_divide", "multiply", "subtract", "__add__", "__radd__",
           "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__div__",
           "__rdiv__"}


def eligible(mod: nn.Module) -> bool:
    """Own trainable parameters, all broadcast-shaped (see module doc)."""
    own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
    return bool(own) and not isinstance(mod, GhostModule) and all(p.dim() <= 1 or p.shape[0] == 1 for p in own)


class _PerSampleFn(torch.autograd.Function):
    """q = p viewed `view` ([1, ...]) and expanded to [rows, ...]; backward: Direct reps."""

    @staticmethod
    def forward(ctx, p, view, sess, name):
        sess.note_forward(p)
        ctx.p, ctx.sess, ctx.name = p, sess, name
        return p.detach().reshape(view).expand(sess.n_rows, *view[1:])

    @staticmethod
    def backward(ctx, gq):
        sess, p = ctx.sess, ctx.p
        if sess.closed:
            return None, None, None, None
        sess.check_rows(gq.shape[0], ctx.name)
        G = gq.reshape(gq.shape[0], *p.shape)
        G = G.to(torch.promote_types(G.dtype, p.dtype))
        N = sess.n_train
        gp = None
        if sess.grad_scale is not None and ctx.needs_input_grad[0]:
            gp = (G[:N].sum(0) * sess.grad_scale).to(p.dtype)
        sess.add((p,), Direct(G[:N]), Direct(G[N:]))
        return gp, None, None, None


class _Unsupported(Exception):
    pass


class _Intercept(TorchFunctionMode):
    """Rewrites the uses of `params` (see module doc). sess=None: the dry run (q from p's data;
    `perturb`: that row of every q gets a different value; unsupported uses are collected)."""

    def __init__(self, mod, params: dict[int, tuple[str, nn.Parameter]], rows: int, sess=None,
                 perturb: int | None = None, gen: torch.Generator | None = None):
        super().__init__()
        self.mod, self.params, self.rows, self.sess = mod, params, rows, sess
        self.perturb, self.gen = perturb, gen
        self.bad: list[str] = []
        self.used: set[int] = set()

    def _is_param(self, a) -> bool:
        return isinstance(a, Tensor) and id(a) in self.params and self.params[id(a)][1] is a

    def _q(self, p: Tensor, name: str, view: list[int]) -> Tensor:
        self.used.add(id(p))
        if self.sess is not None:
            mod_name = getattr(self.mod, "_inrun_name", type(self.mod).__name__)
            return _PerSampleFn.apply(p, view, self.sess, f"{mod_name}.{name}")
        q = p.detach().reshape(view).expand(self.rows, *view[1:])
        if self.perturb is not None:
            q = q.clone()
            noise = torch.randn(q[self.perturb].shape, generator=self.gen, dtype=torch.float64)
            q[self.perturb] += (noise.to(q.dtype) * (q.abs().max() + 1)).to(q.device)
        return q

    def _view(self, p: Tensor, rank: int) -> list[int] | None:
        if rank < p.dim() or rank < 1:
            return None
        view = [1] * (rank - p.dim()) + list(p.shape)
        return view if view[0] == 1 else None

    def _rewrite(self, func, args, kwargs, k: int, name: str, p: Tensor):
        fname = getattr(func, "__name__", "")
        if fname == "expand" and k == 0:
            sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list, torch.Size)) else args[1:]
            sizes = list(sizes)
            view = self._view(p, len(sizes))
            if view is None or sizes[0] != self.rows:
                return None
            return self._q(p, name, view).expand(*sizes)
        if fname in _BINARY and len(args) == 2 and k in (0, 1):
            other = args[1 - k]
            if not isinstance(other, Tensor) or other.dim() < 1 or other.shape[0] != self.rows:
                return None
            view = self._view(p, other.dim())
            if view is None:
                return None
            new = list(args)
            new[k] = self._q(p, name, view)
            return func(*new, **kwargs)
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        hits = [a for a in pytree.tree_leaves((list(args), kwargs)) if self._is_param(a)]
        if not hits:
            return func(*args, **kwargs)
        p = hits[0]
        name = self.params[id(p)][0]
        top = [k for k, a in enumerate(args) if a is p]
        if len(hits) == 1 and len(top) == 1:   # one use of one parameter, as a direct argument
            out = self._rewrite(func, args, kwargs, top[0], name, p)
            if out is not None:
                return out
        out = func(*args, **kwargs)
        if not any(isinstance(t, Tensor) and t.requires_grad for t in pytree.tree_leaves(out)):
            return out   # no gradient through it (shape, dtype, a comparison, .data, ...)
        what = f"'{name}' in {getattr(func, '__name__', func)}"
        if self.sess is None:
            self.bad.append(what)
            return out
        mod_name = getattr(self.mod, "_inrun_name", type(self.mod).__name__)
        raise RuntimeError(
            f"inrun_kernels: module '{mod_name}' ({self.mod._inrun_orig_class.__name__}) uses its "
            f"parameter {what}, which the native rule for broadcast parameters does not split by "
            "sample (layers/rawparam.py); this call's path was not the one checked on its first "
            "call with these input shapes. Freeze the parameter or patch(fallback=False) and "
            "register a rule for the module")


def _own_params(mod: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    return {id(p): (n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad}


def _signature(args, kwargs) -> str:
    """Tensors by shape / dtype / device, plain values by value, other objects by type (a cache
    object's repr would differ at every call)."""
    leaves, spec = pytree.tree_flatten((list(args), kwargs))
    parts = [f"T{tuple(t.shape)}{t.dtype}{t.device}" if isinstance(t, Tensor)
             else repr(t) if t is None or isinstance(t, (bool, int, float, str)) else type(t).__name__
             for t in leaves]
    return f"{spec}|{'|'.join(parts)}"


def _detached(args, kwargs):
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (list(args), kwargs))


def _dry_run(mod: nn.Module, sess, args, kwargs) -> str | None:
    """None when the native rule covers this call (see module doc), else why not."""
    rows = sess.n_rows
    fwd = mod._inrun_orig_class.forward
    params = _own_params(mod)
    a, kw = _detached(args, kwargs)
    dev = next(iter(params.values()))[1].device
    devices = [dev] if dev.type == "cuda" else []
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=devices), _session.suspended(), torch.enable_grad():
        state = torch.get_rng_state()
        cuda_state = torch.cuda.get_rng_state(dev) if devices else None

        def run(mode=None, a=a, kw=kw):
            torch.set_rng_state(state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, dev)
            if mode is None:
                return pytree.tree_leaves(fwd(mod, *a, **kw))
            with mode:
                return pytree.tree_leaves(fwd(mod, *a, **kw))

        y = run()
        mode = _Intercept(mod, params, rows)
        yq = run(mode)
        if mode.bad:
            return "uses " + ", ".join(dict.fromkeys(mode.bad))
        if not mode.used:
            return "no use of its parameters met the samples"
        outs = [(j, t) for j, t in enumerate(y) if isinstance(t, Tensor)]
        if len(y) != len(yq) or not outs:
            return "its output has no tensor"
        for j, t in outs:
            if not isinstance(yq[j], Tensor) or yq[j].shape != t.shape or not _close(yq[j].detach(), t.detach()):
                return "its output differs when the parameters are expanded per sample"
            if _layout(t, 0, rows) is None:
                return f"output {j} of shape {tuple(t.shape)} has no per-sample layout on dim 0"
        for r in sorted({0, rows - 1}):
            yr = run(_Intercept(mod, params, rows, perturb=r, gen=gen))
            moved = False
            for j, t in outs:
                k = t.shape[0] // rows
                d = (yr[j].detach() != yq[j].detach()).reshape(rows, k, -1).any(2).any(1)
                if bool(d[torch.arange(rows, device=d.device) != r].any()):
                    return "a parameter's use mixes the samples"
                moved = moved or bool(d[r])
            if not moved:
                return "a parameter's per-sample use does not reach the output"
        leaves, spec = pytree.tree_flatten((a, kw))
        one = [(_slice(t, 0, _layout(t, 0, rows), 0) if isinstance(t, Tensor) and _layout(t, 0, rows) else t)
               for t in leaves]
        a1, kw1 = pytree.tree_unflatten(one, spec)
        y1 = run(None, a1, kw1)
        for j, t in outs:
            k = t.shape[0] // rows
            if not isinstance(y1[j], Tensor) or y1[j].shape[0] != k or not _close(y1[j].detach(), t[:k].detach()):
                return "sample 0 alone gives another output than in the batch (the module couples the samples)"
    return None


class GhostRawParams(GhostFallback):
    """Mixin of the ghost classes of modules with broadcast parameters (see module doc)."""

    def forward(self, *args, **kwargs):
        sess = _session.current()
        if (sess is None or self.__dict__.get("_inrun_fb_inner") or sess.closed
                or torch.compiler.is_compiling()):
            return GhostFallback.forward(self, *args, **kwargs)
        params = _own_params(self)
        if not params:
            return self._inrun_orig_class.forward(self, *args, **kwargs)
        modes = self.__dict__.setdefault("_inrun_raw_modes", {})
        key = (sess.n_rows, _signature(args, kwargs))
        if key not in modes:
            modes[key] = _dry_run(self, sess, args, kwargs)
            if modes[key] is not None:
                self.__dict__.setdefault("_inrun_raw_fallback", modes[key])
        if modes[key] is not None:
            return GhostFallback.forward(self, *args, **kwargs)
        with _Intercept(self, params, sess.n_rows, sess=sess):
            return self._inrun_orig_class.forward(self, *args, **kwargs)

_GHOSTS: dict[type, type] = {}


def raw_param_rule(mod: nn.Module) -> Rule:
    cls = mod.__dict__.get("_inrun_orig_class", type(mod))

    def ghost_of(c):
        if c not in _GHOSTS:
            _GHOSTS[c] = type(f"GhostRawParams{c.__name__}", (GhostRawParams, c), {"__module__": __name__})
        return _GHOSTS[c]

    def to_ghost(m):
        m._inrun_orig_class = type(m)
        m.__class__ = ghost_of(type(m))

    def from_ghost(m):
        m.__class__ = m.__dict__.pop("_inrun_orig_class")
        for attr in ("_inrun_fb_inner", "_inrun_fb_names", "_inrun_fb_seconds", "_inrun_raw_modes",
                     "_inrun_raw_fallback"):
            m.__dict__.pop(attr, None)

    ghost_of(cls)
    return Rule(cls, to_ghost, from_ghost, owns_children=False)
