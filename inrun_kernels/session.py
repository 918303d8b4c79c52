"""What the current backward must compute, and where the results go.

A GhostSession is opened around one forward+backward of a concatenated batch: the first
`n_train` rows are training samples, the next `n_val` validation samples. Ghost layers find the
active session with `current()`; in forward they announce which parameters they use (so a
parameter shared by several layers is recognised), in backward they hand over per-sample
gradient reps of their parameters (see reps.py). The session turns them into products and sums
them, scaled per parameter, into its accumulators. It never sees a per-sample gradient.
"""
from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import products
from .reps import Outer

_local = threading.local()


def current() -> "GhostSession | None":
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


class GhostSession:
    def __init__(self, n_train: int, n_val: int, *, dot: bool = False, per_val: bool = False,
                 gram: bool = False, norms: bool = False, grad_scale: float | None = None,
                 dot_scale: dict[nn.Parameter, float] | None = None,
                 names: dict[int, str] | None = None, per_param: bool = False, keep: bool = False,
                 dense_v: dict[int, Tensor] | None = None, canonical=None):
        if n_train < 1:
            raise ValueError(f"a ghost session needs at least one training row, got {n_train}")
        if (dot or per_val) and n_val < 1:
            raise ValueError("train x val products need at least one validation row")
        self.n_train, self.n_val = n_train, n_val
        self.want_dot, self.want_per_val = dot or per_val, per_val
        self.want_gram, self.want_norms = gram, norms
        # None: leave .grad alone (functional API). Else the training rows' weight gradient is
        # accumulated with this factor (1/N for the mean training loss).
        self.grad_scale = grad_scale
        self._dot_scale = {id(p): float(s) for p, s in (dot_scale or {}).items()}
        self._names = names or {}
        self.per_param = per_param
        self._expected: dict[int, int] = defaultdict(int)   # uses of each parameter in forward
        self._seen: dict[int, int] = defaultdict(int)
        self._stash: dict[int, list] = defaultdict(list)    # reps of shared parameters
        self._rows_ids: dict[int, list[Tensor]] = defaultdict(list)  # ids of embedding-type uses
        self._params: dict[int, nn.Parameter] = {}
        self.dot: Tensor | None = None        # [N] float64
        self.per_val: Tensor | None = None    # [N, M]
        self.gram: Tensor | None = None       # [N, N]
        self.norms_sq: Tensor | None = None   # [N]
        self.by_param: dict[str, dict[str, Tensor]] = {}
        self.result_dtype = torch.float32
        self.closed = False   # set after the ghost backward: later backwards add nothing
        # keep=True: no products here; the training rows' reps are kept, per use, for dots with a
        # dense vector known only after the backward (estimators.py): [(params, rep), ...]
        self.keep = keep
        self.kept: list[tuple[tuple[nn.Parameter, ...], object]] = []
        # dense_v={id(param): V}: no validation rows; each use adds <g_i, V> to `dot` right away
        # (dots with a dense vector are linear in g_i: a shared parameter needs no cross terms)
        self.dense_v = dense_v
        # the parameter a layer's tensor stands for (FSDP2: unsharded -> the optimizer's sharded
        # one); parameters are keyed by what this returns
        self._canon = canonical or (lambda p: p)

    # ---- called by layers ---------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return self.n_train + self.n_val

    def check_rows(self, rows: int, where: str) -> None:
        if rows != self.n_rows:
            raise ValueError(f"{where}: batch dimension has {rows} rows but the session holds "
                             f"{self.n_train} training + {self.n_val} validation = {self.n_rows} samples; "
                             "is the batch dimension of this layer's input the first one?")

    def note_forward(self, *params) -> None:
        for p in params:
            if p is not None and p.requires_grad:
                p = self._canon(p)
                self._expected[id(p)] += 1
                self._params[id(p)] = p
                if p.dtype == torch.float64:
                    self.result_dtype = torch.float64

    def note_rows(self, weight: nn.Parameter, ids: Tensor) -> None:
        """An embedding-type use of `weight` reads rows `ids` [rows, T] (in forward): lets an
        Outer use of the same (tied) weight keep only those columns for the cross terms."""
        if weight.requires_grad:
            self._rows_ids[id(self._canon(weight))].append(ids)

    def is_shared(self, p: nn.Parameter) -> bool:
        return self._expected.get(id(self._canon(p)), 0) > 1

    def can_fuse(self, weight: nn.Parameter, bias: nn.Parameter | None) -> bool:
        """Weight and bias may go through one fused product (bias as +1 on the A-Gram)."""
        return (bias is not None and bias.requires_grad and not self.per_param
                and not self.is_shared(weight) and not self.is_shared(bias)
                and self._dot_scale.get(id(self._canon(weight)), 1.0)
                == self._dot_scale.get(id(self._canon(bias)), 1.0))

    def add(self, params: tuple, train_rep, val_rep) -> None:
        """Per-sample gradient reps of `params` (one parameter, or a fused weight+bias pair)."""
        params = tuple(self._canon(p) for p in params if p is not None and p.requires_grad)
        if not params:
            return
        if self.keep:   # a shared parameter's uses are kept separately: dots are linear in g_i
            self.kept.append((params, _detached(train_rep)))
            return
        if self.dense_v is not None:
            V = [self.dense_v.get(id(p)) for p in params]
            if all(v is not None for v in V):   # (None: a parameter without a share of the values)
                self._add_total("dot", products.dense_dot(train_rep, *V).double())
            return
        for p in params:
            self._seen[id(p)] += 1
        self._accumulate(params, [(train_rep, val_rep)], [(0, 0)])   # this use's own products
        if len(params) == 1 and self.is_shared(params[0]):
            # A shared parameter's per-sample gradient is the sum over its uses: the cross terms
            # between uses wait until the last use has handed over its reps.
            key = id(params[0])
            self._stash[key].append(self._compact(key, train_rep, val_rep))
            if self._seen[key] >= self._expected[key]:
                self._flush(key)

    def split_source(self, params: tuple) -> str | None:
        """What a linear-type use of `params` could dot its training rows with inside its
        weight-gradient GEMM (the split route): "dense_v" (the prefetched V), "val" (the
        validation rows' summed gradient, for a joined train x val dot; with `want_per_val`
        each validation row's own gradient, one dot each), "norms" (squared norms only), or
        None when this use needs more (Grams, dots and norms together, kept reps, the cross
        terms of a shared parameter)."""
        params = tuple(self._canon(p) for p in params if p is not None and p.requires_grad)
        if not params or self.keep or self.want_gram:
            return None
        if self.want_norms:
            alone = not self.want_dot and self.dense_v is None
            return "norms" if alone and not any(self.is_shared(p) for p in params) else None
        if self.dense_v is not None:
            return "dense_v" if all(id(p) in self.dense_v for p in params) else None
        if self.want_dot and not any(self.is_shared(p) for p in params):
            return "val"
        return None

    def dense_vectors(self, params: tuple) -> list[Tensor]:
        """The prefetched V of each parameter in `params` (split_source() == "dense_v")."""
        return [self.dense_v[id(self._canon(p))] for p in params if p is not None and p.requires_grad]

    def add_dots(self, params: tuple, dots: Tensor) -> None:
        """<g_i, V> of one use, already formed by the layer (the split route): recorded as
        add() records a use's own train x val dot (or dense-V dot); [N, M] with want_per_val."""
        params = tuple(self._canon(p) for p in params if p is not None and p.requires_grad)
        if self.dense_v is not None:
            self._add_total("dot", dots.double())
            return
        for p in params:
            self._seen[id(p)] += 1
        dots = dots.double() * self._dot_scale.get(id(params[0]), 1.0)
        self._record(params, {"per_val": dots, "dot": dots.sum(1)} if self.want_per_val else {"dot": dots})

    def add_norms(self, params: tuple, norms_sq: Tensor) -> None:
        """||g_i||^2 of one use, formed by the layer (the split route, split_source() == "norms")."""
        params = tuple(self._canon(p) for p in params if p is not None and p.requires_grad)
        for p in params:
            self._seen[id(p)] += 1
        self._record(params, {"norms_sq": norms_sq.double()})   # (norms are not update-scaled, as in _accumulate)

    def finish(self) -> None:
        """Flush shared parameters whose remaining uses got no gradient (they contribute 0)."""
        for key in list(self._stash):
            self._flush(key)

    # ---- internals ----------------------------------------------------------------------
    def _compact(self, key: int, tr, va):
        """What the cross terms need of an Outer use whose other uses are all embedding-type:
        only B's columns at the token ids those uses read (known from their forward). For
        GPT-2's tied lm_head this frees the [rows, T, vocab] logits gradient right away."""
        ids = self._rows_ids.get(key, [])
        if not isinstance(tr, Outer) or len(ids) != self._expected[key] - 1 or not ids:
            return tr, va
        n = self.n_train
        tr_ids = torch.cat([i[:n].reshape(-1) for i in ids])
        va_ids = torch.cat([i[n:].reshape(-1) for i in ids])
        # train side: dots read the embedding uses' validation ids, Grams their training ids
        need_tr = va_ids if self.want_dot else va_ids[:0]
        if self.want_gram or self.want_norms:
            need_tr = torch.cat([need_tr, tr_ids])
        rows = lambda t: torch.unique(t[t >= 0])  # noqa: E731
        return tr.keep_cols(rows(need_tr)), va.keep_cols(rows(tr_ids if self.want_dot else tr_ids[:0]))

    def _flush(self, key: int) -> None:
        uses = self._stash.pop(key, [])
        if len(uses) > 1:
            cross = [(a, b) for a in range(len(uses)) for b in range(len(uses)) if a != b]
            self._accumulate((self._params[key],), uses, cross)

    def _accumulate(self, params: tuple, uses: list, pairs: list[tuple[int, int]]) -> None:
        """Products summed over `pairs` (a, b) of uses: <g^a_i, g^b_v> for dots, <g^a_i, g^b_j>
        for Grams and norms; a use's own products are the pair (a, a)."""
        scale = self._dot_scale.get(id(params[0]), 1.0)
        out: dict[str, Tensor] = {}
        if self.want_dot:
            pv = self.want_per_val
            val = sum(products.dot(uses[a][0], uses[b][1], per_val=pv) for a, b in pairs)
            val = val.double() * scale
            if pv:
                out["per_val"] = val
            out["dot"] = val.sum(1) if pv else val
        if self.want_gram or (self.want_norms and pairs != [(0, 0)]):
            g = 0
            for a, b in pairs:
                if a == b:
                    g = g + products.gram(uses[a][0]).double()
                elif a < b:   # (b, a) is the transpose
                    cross = products.gram(uses[a][0], uses[b][0]).double()
                    g = g + cross + cross.T
            if self.want_gram:
                out["gram"] = g
            if self.want_norms:
                out["norms_sq"] = torch.diagonal(g).clone()
        elif self.want_norms:
            out["norms_sq"] = products.norms_sq(uses[0][0]).double()
        self._record(params, out)

    def _record(self, params: tuple, out: dict[str, Tensor]) -> None:
        """Adds products to the totals (and, with per_param, to the parameter's own)."""
        for kind, val in out.items():
            self._add_total(kind, val)
            if self.per_param:
                name = self._names.get(id(params[0]), f"param@{id(params[0]):x}")
                slot = self.by_param.setdefault(name, {})
                slot[kind] = slot[kind] + val if kind in slot else val

    def _add_total(self, kind: str, val: Tensor) -> None:
        cur = getattr(self, kind)
        setattr(self, kind, val if cur is None else cur + val)

    def result(self, kind: str) -> Tensor:
        """An accumulator in the result dtype; zeros when no layer contributed."""
        shapes = {"dot": (self.n_train,), "per_val": (self.n_train, self.n_val),
                  "gram": (self.n_train, self.n_train), "norms_sq": (self.n_train,)}
        val = getattr(self, kind)
        if val is None:
            val = torch.zeros(shapes[kind], dtype=torch.float64)
        return val.to(self.result_dtype)


def _detached(rep):
    """The rep with detached tensors: a kept layer input still points (grad_fn) into the graph,
    whose nodes point back to this session; the cycle would outlive the step."""
    fields = {f.name: getattr(rep, f.name) for f in dataclasses.fields(rep)}
    return type(rep)(**{k: v.detach() if isinstance(v, Tensor) else v for k, v in fields.items()})


@contextmanager
def _current_is(sess: "GhostSession | None"):
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(sess)
    try:
        yield sess
    finally:
        stack.pop()


def ghost_session(*args, **kwargs):
    """Open a GhostSession for the forward+backward inside the block (a context manager)."""
    return _current_is(GhostSession(*args, **kwargs))


def suspended():
    """No ghost session inside the block: ghost layers run as their original classes (the
    per-sample fallback's own runs of a module whose children are patched natively)."""
    return _current_is(None)
