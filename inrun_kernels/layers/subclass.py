"""Subclasses of supported layers with their own forward, accepted natively after a probe.

A subclass S of nn.Linear / nn.Embedding / nn.LayerNorm / nn.RMSNorm that overrides forward
(FalconLinear, OPT's learned position embedding, Gemma's scaled word embedding, ConvNeXt's
channels-first LayerNorm) is covered by its parent's ghost layer when one of two checks passes,
once per class, on the first instance met at patch time (float64 probes; the module's
parameters, buffers, class and the global RNG are left as they were):

A. "calls its parent": S.forward reaches the parent's forward through super() exactly once, its
   parameters enter only through that call, and its output is that call's output scaled by a
   constant and rearranged within each sample (a permute / reshape that keeps dim 0):
   y = s * rearrange(parent(inputs')). The probe runs S.forward with the parent's forward
   replaced by a recorder that returns fresh random values R (the parameters are stand-ins that
   require grad: the output must not depend on them), checks that y is a permutation of s * R
   (same s for two independent draws of R) and that changing R's row i changes y's row i only.
   Patched, the class is S with the parent's GHOST layer spliced in under it (MRO S -> GhostP ->
   P): S.forward runs unchanged and its super().forward call is the ghost op, which therefore
   sees the ids / inputs S actually computes (OPT: positions from the attention mask + 2) and
   gets the output gradient through S's scale by ordinary autograd (Gemma: the per-sample table
   gradient is scale x the rows' output gradient).
B. "computes what its parent computes": S.forward(x) equals the parent's computation
   (F.linear / F.embedding / F.layer_norm / F.rms_norm with the module's options) on a random
   float64 probe with random float64 parameters of the same shapes, to 1e-12 relative
   (FalconLinear: x @ W.T + b). Patched, the parent's ghost forward replaces S.forward inside a
   session; outside one the module is S.

Anything else (another transform of the output, a parameter used outside the parent call, a
forward that mixes the samples, a probe that raises) is not matched: the module goes to the
exact per-sample fallback (layers/fallback.py), as before. Only subclasses whose trainable
parameters are the parent's own (weight / bias, no child with parameters) are considered.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from .. import session as _session
from .embedding import GhostEmbedding
from .linear import GhostLinear
from .norm import GhostLayerNorm, GhostRMSNorm
from .registry import GhostModule, Rule, class_swap_rule, register_matcher

_REL_TOL = 1e-12     # float64 probes: measured agreement 0 .. 1e-16
_MAX_PROBE_NUMEL = 1 << 24   # route B copies the parameters in float64 up to this many elements


def _linear_inputs(mod, gen):
    return [torch.randn(2, 3, mod.in_features, generator=gen, dtype=torch.float64)]


def _embedding_inputs(mod, gen):
    V = mod.num_embeddings
    return [torch.randint(0, V, (2, 5), generator=gen),
            torch.tensor([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]]).clamp_max(V - 1)]   # mask-like


def _norm_inputs(mod, gen):
    shape = tuple(mod.normalized_shape)
    xs = [torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64)]
    if len(shape) == 1:   # channels-first images [n, C, H, W]
        xs.append(torch.randn(2, shape[0], 3, 3, generator=gen, dtype=torch.float64))
    return xs


# parent -> (its ghost class, probe inputs, output shape of its forward, its computation)
_PARENTS = {
    nn.Linear: (GhostLinear, _linear_inputs,
                lambda m, x: (*x.shape[:-1], m.out_features),
                lambda m, x: F.linear(x, m.weight, m.bias)),
    nn.Embedding: (GhostEmbedding, _embedding_inputs,
                   lambda m, ids: (*ids.shape, m.embedding_dim),
                   lambda m, ids: F.embedding(ids, m.weight, m.padding_idx, m.max_norm, m.norm_type,
                                              m.scale_grad_by_freq, m.sparse)),
    nn.LayerNorm: (GhostLayerNorm, _norm_inputs, lambda m, x: tuple(x.shape),
                   lambda m, x: F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)),
    nn.RMSNorm: (GhostRMSNorm, _norm_inputs, lambda m, x: tuple(x.shape),
                 lambda m, x: F.rms_norm(x, m.normalized_shape, m.weight, m.eps)),
}


def _parent(cls: type) -> type | None:
    """The supported parent whose forward `cls` overrides (None: not a strict subclass)."""
    for base in cls.__mro__[1:]:
        if base in _PARENTS:
            return base if getattr(cls, "forward", None) is not getattr(base, "forward", None) else None
    return None


class _Probe:
    """State of one probe run: the recorder's calls and what it returned."""

    def __init__(self, parent, gen):
        self.parent, self.gen = parent, gen
        self.calls: list[tuple[Tensor, Tensor]] = []
        self.replace: dict[int, Tensor] = {}   # call index -> the R to return (else fresh)

    def record(self, mod, x):
        shape = _PARENTS[self.parent][2](mod, x)
        k = len(self.calls)
        R = self.replace.get(k)
        if R is None:
            R = torch.randn(shape, generator=self.gen, dtype=torch.float64).to(x.device)
        self.calls.append((x, R))
        return R


_RECORDERS: dict[tuple[type, type], type] = {}


def _recorder_class(cls: type, parent: type) -> type:
    """cls with the parent's forward replaced by the probe's recorder (MRO: cls -> recorder -> P)."""
    key = (cls, parent)
    if key not in _RECORDERS:
        def forward(self, input):
            return self.__dict__["_inrun_probe"].record(self, input)
        rec = type(f"_Record{parent.__name__}", (parent,), {"forward": forward, "__module__": __name__})
        _RECORDERS[key] = type(f"_Probe{cls.__name__}", (cls, rec), {"__module__": __name__})
    return _RECORDERS[key]


def _stand_ins(mod: nn.Module, real: bool, gen) -> dict[str, Tensor]:
    """Parameters for a probe run: float64 leaves that require grad, of the real shapes: random
    values (real=True), or one zero broadcast to the shape (no memory; route A never reads
    them). Buffers: copies, so that a forward writing to them leaves the module as it was."""
    out = {}
    for n, p in mod.named_parameters():
        if real:
            out[n] = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device).requires_grad_()
        else:
            out[n] = torch.zeros((1,) * p.dim(), dtype=torch.float64, device=p.device,
                                 requires_grad=True).expand(p.shape)
    for n, b in mod.named_buffers():
        out[n] = b.clone()
    return out


def _run(mod, cls, params, x, probe=None):
    """cls.forward(mod, x) with `params` in place of the module's tensors (no hooks run); the
    class and the tensors are restored."""
    orig = type(mod)
    mod.__class__ = cls
    mod.__dict__["_inrun_probe"] = probe
    try:
        with _reparametrize_module(mod, params):
            return cls.forward(mod, x)
    finally:
        mod.__class__ = orig
        mod.__dict__.pop("_inrun_probe", None)


def _scaled_permutation(y: Tensor, R: Tensor) -> float | None:
    """s when y holds the values of s * R in some order (s a constant), else None."""
    if not isinstance(y, Tensor) or y.dtype != torch.float64 or y.numel() != R.numel() or y.requires_grad:
        return None
    ys, rs = y.detach().flatten().sort().values, R.flatten().sort().values
    nr = rs.norm()
    if nr == 0:
        return None
    for sign in (1.0, -1.0):
        s = sign * float(ys.norm() / nr)
        want = (rs * s).sort().values
        if bool(((ys - want).abs().max() <= _REL_TOL * want.abs().max().clamp_min(1e-300))):
            return s
    return None


def _calls_parent(mod: nn.Module, parent: type, x: Tensor, gen) -> bool:
    """Route A (see module doc) on probe input x."""
    cls = _recorder_class(type(mod), parent)
    params = _stand_ins(mod, real=False, gen=gen)
    probe = _Probe(parent, gen)
    y0 = _run(mod, cls, params, x, probe)
    if len(probe.calls) != 1:
        return False
    R0 = probe.calls[0][1]
    rows = x.shape[0]
    if R0.dim() < 1 or R0.shape[0] != rows or not isinstance(y0, Tensor) or y0.dim() < 1 or y0.shape[0] != rows:
        return False
    s = _scaled_permutation(y0, R0)
    if s is None or s == 0.0:
        return False
    # a second draw: the same constant; then row by row: R's row i moves y's row i only
    probe = _Probe(parent, gen)
    y1 = _run(mod, cls, params, x, probe)
    s1 = _scaled_permutation(y1, probe.calls[0][1]) if len(probe.calls) == 1 else None
    if s1 is None or abs(s1 - s) > 1e-9 * abs(s):
        return False
    for i in range(rows):
        R = R0.clone()
        R[i] = torch.randn(R[i].shape, generator=gen, dtype=torch.float64).to(R.device)
        probe = _Probe(parent, gen)
        probe.replace[0] = R
        y = _run(mod, cls, params, x, probe)
        if len(probe.calls) != 1 or not isinstance(y, Tensor) or y.shape != y0.shape:
            return False
        changed = (y.detach() != y0.detach()).reshape(rows, -1).any(1)
        if not bool(changed[i]) or bool(changed[torch.arange(rows, device=changed.device) != i].any()):
            return False
    return True


def _computes_parent(mod: nn.Module, parent: type, x: Tensor, gen) -> bool:
    """Route B (see module doc) on probe input x."""
    if sum(p.numel() for p in mod.parameters()) > _MAX_PROBE_NUMEL:
        return False
    params = _stand_ins(mod, real=True, gen=gen)
    with torch.no_grad():
        y = _run(mod, type(mod), params, x)
        want = _PARENTS[parent][3](_With(mod, params), x)
    if not isinstance(y, Tensor) or y.shape != want.shape or y.dtype != want.dtype:
        return False
    return bool((y - want).abs().max() <= _REL_TOL * want.abs().max().clamp_min(1e-300))


class _With:
    """The module's attributes, with `params` in place of its parameters (for the reference)."""

    def __init__(self, mod, params):
        self._mod, self._params = mod, params

    def __getattr__(self, name):
        return self._params[name] if name in self._params else getattr(self._mod, name)


def _probe(mod: nn.Module, parent: type) -> str | None:
    """'calls' (route A), 'computes' (route B) or None."""
    dev = next(mod.parameters()).device
    gen = torch.Generator().manual_seed(0)
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad():
        inputs = [x.to(dev) for x in _PARENTS[parent][1](mod, gen)]
        for route, check in (("calls", _calls_parent), ("computes", _computes_parent)):
            for x in inputs:
                try:
                    if check(mod, parent, x, gen):
                        return route
                except Exception:   # noqa: BLE001  (a probe that fails to run proves nothing)
                    continue
    return None


class _ComputesParent:
    """Mixin of route B ghost classes: the parent's ghost forward in a session, else S's own."""
    _inrun_sub: type = nn.Module
    _inrun_ghost_parent: type = nn.Module

    def forward(self, *args, **kwargs):
        if _session.current() is None or len(args) != 1 or kwargs:
            return self._inrun_sub.forward(self, *args, **kwargs)
        return self._inrun_ghost_parent.forward(self, args[0])


_GHOSTS: dict[type, type] = {}
_REFUSED: set[type] = set()   # probed once and not matched: the fallback covers them


@register_matcher
def _match_subclass(mod: nn.Module) -> Rule | None:
    cls = type(mod)
    if isinstance(mod, GhostModule):
        return None
    parent = _parent(cls)
    if parent is None:
        return None
    names = {n for n, _ in mod.named_parameters()}
    if not names or names - {"weight", "bias"} or any(p.is_meta for p in mod.parameters()):
        return None
    if any(any(True for _ in c.parameters()) for c in mod.children()):
        return None
    if cls in _REFUSED:
        return None
    if cls not in _GHOSTS:
        route = _probe(mod, parent)
        if route is None:
            _REFUSED.add(cls)
            return None
        ghost_p = _PARENTS[parent][0]
        if route == "calls":   # S.forward's super().forward lands on the ghost parent
            ghost = type(f"Ghost{cls.__name__}", (cls, ghost_p), {"__module__": __name__})
        else:
            ghost = type(f"Ghost{cls.__name__}", (_ComputesParent, ghost_p, cls),
                         {"__module__": __name__, "_inrun_sub": cls, "_inrun_ghost_parent": ghost_p})
        _GHOSTS[cls] = ghost
    return class_swap_rule(cls, _GHOSTS[cls])
