"""Products of per-sample gradient reps: train x val dots, train x train Grams, norms.

Same-type pairs go to the fused primitives in ops (never forming per-sample gradients). Mixed
pairs, which only arise for parameters shared by layers of different kinds, fall back to
materialising the per-sample gradients of the smaller side; that is exact, and rare.
Exception: Rows x Outer / Outer x Rows (an embedding tied to an output head, GPT-2's wte and
lm_head) have their own rules restricted to the rows of the tokens involved, so no dense
[V, d] per-sample gradient is ever formed.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch
from torch import Tensor

from . import ops
from .ops import reference as ref
from .ops import rows as rows_ops
from .ops.budget import temp_budget_elems
from .reps import Direct, Outer, Rows


def _exact(fn):
    """Products run with autocast off: under torch.autocast (the engine inside the user's
    autocast block) a matmul of fp32 operands would be cast to bf16/fp16 and the products would
    lose ~0.4% (bf16) beyond the reps' own rounding. The reps hold what autocast made of the
    activations; their products accumulate in fp32 (fp64 for fp64), as the Triton kernels do."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with no_autocast():
            return fn(*args, **kwargs)
    return wrapper


def no_autocast():
    """A context with autocast off on CPU and CUDA; a no-op one when it is off already (the
    usual case: entering two autocast contexts costs ~20 us, per product, per layer)."""
    if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
        return _autocast_off()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _autocast_off():
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


_DOT: dict[tuple[type, type], Callable] = {}
_GRAM: dict[tuple[type, type], Callable] = {}


def _rule(table, a: type, b: type):
    def deco(fn):
        table[(a, b)] = fn
        return fn
    return deco


@_exact
def dot(train, val, *, per_val: bool) -> Tensor:
    """<g_i, g_v>: [N, M] when per_val, else [N] summed over v."""
    fn = _DOT.get((type(train), type(val)), _dot_materialised)
    return fn(train, val, per_val)


@_exact
def gram(r1, r2=None) -> Tensor:
    """[N1, N2] of <g_i, g_j>; r2=None means r1 against itself (symmetric, cheaper)."""
    if r2 is None:
        fn = _GRAM.get((type(r1), None))
        if fn is not None:
            return fn(r1)
        r2 = r1
    fn = _GRAM.get((type(r1), type(r2)), _gram_materialised)
    return fn(r1, r2)


@_exact
def norms_sq(r) -> Tensor:
    if isinstance(r, Outer):
        return ops.ghost_norms_sq(r.A, r.B, bias=r.bias, lengths=r.lengths)
    if isinstance(r, Rows):
        return rows_ops.rows_norms_sq(*r.clean(), r.num_rows)
    return r.materialise().square().sum(1)


@_rule(_DOT, Outer, Outer)
def _dot_outer(tr: Outer, va: Outer, per_val: bool) -> Tensor:
    tr._full("an Outer x Outer product")
    va._full("an Outer x Outer product")
    if tr.bias != va.bias:
        raise ValueError("train and validation reps disagree on the bias")
    if tr.A.shape[-1] != va.A.shape[-1] or tr.B.shape[-1] != va.B.shape[-1]:
        return _dot_materialised(tr, va, per_val)
    return ops.ghost_dot(tr.A, tr.B, va.A, va.B, bias=tr.bias, per_val=per_val,
                         lengths=tr.lengths, val_lengths=va.lengths)


@_rule(_DOT, Direct, Direct)
def _dot_direct(tr: Direct, va: Direct, per_val: bool) -> Tensor:
    g_tr, g_va = tr.materialise(), va.materialise()
    return g_tr @ g_va.T if per_val else g_tr @ g_va.sum(0)


@_rule(_DOT, Outer, Direct)
def _dot_outer_direct(tr: Outer, va: Direct, per_val: bool) -> Tensor:
    # The validation side is small and dense: the dense route with V = each validation gradient.
    p, d = tr.B.shape[-1], tr.A.shape[-1]
    g = va.materialise()
    if tr.bias:
        return _dot_materialised(tr, va, per_val)
    V = g.reshape(-1, p, d) if per_val else g.sum(0).reshape(p, d)
    return ops.ghost_dot_dense(tr.A, tr.B, V, lengths=tr.lengths)


def _dot_materialised(tr, va, per_val: bool) -> Tensor:
    g_tr, g_va = tr.materialise(), va.materialise()
    if g_tr.shape[1] != g_va.shape[1]:
        raise ValueError(f"per-sample gradient sizes differ: {g_tr.shape[1]} vs {g_va.shape[1]}")
    return g_tr @ g_va.T if per_val else g_tr @ g_va.sum(0)


@_rule(_GRAM, Outer, None)
def _gram_outer_self(r: Outer) -> Tensor:
    return ops.ghost_gram(r.A, r.B, bias=r.bias, lengths=r.lengths)


@_rule(_GRAM, Outer, Outer)
def _gram_outer_pair(r1: Outer, r2: Outer) -> Tensor:
    # Cross Gram between two uses of one weight: a train x val dot with r2 as the "validation".
    r1._full("an Outer x Outer Gram")
    r2._full("an Outer x Outer Gram")
    if r1.A.shape[-1] != r2.A.shape[-1] or r1.B.shape[-1] != r2.B.shape[-1] or r1.bias != r2.bias:
        return _gram_materialised(r1, r2)
    return ops.ghost_dot(r1.A, r1.B, r2.A, r2.B, bias=r1.bias, per_val=True,
                         lengths=r1.lengths, val_lengths=r2.lengths)


def _gram_materialised(r1, r2) -> Tensor:
    g1, g2 = r1.materialise(), r2.materialise()
    return g1 @ g2.T


# ---- embedding-type rows (Rows): sparse in the vocabulary, never a dense [V, d] per sample ----
@_rule(_DOT, Rows, Rows)
def _dot_rows(tr: Rows, va: Rows, per_val: bool) -> Tensor:
    if tr.num_rows != va.num_rows or tr.B.shape[-1] != va.B.shape[-1]:
        return _dot_materialised(tr, va, per_val)
    return rows_ops.rows_dot(*tr.clean(), *va.clean(), per_val=per_val)


def _tied_ok(rows: Rows, outer: Outer) -> bool:
    """An Outer rep of the same [V, d] table (tied weights: output dim = vocabulary)."""
    width = outer.B.shape[-1] if outer.cols is None else rows.num_rows
    return not outer.bias and width == rows.num_rows and outer.A.shape[-1] == rows.B.shape[-1]


@_rule(_DOT, Rows, Outer)
def _dot_rows_outer(tr: Rows, va: Outer, per_val: bool) -> Tensor:
    # Only the rows of the training tokens matter: the Outer side's gradient restricted to them.
    if not _tied_ok(tr, va):
        return _dot_materialised(tr, va, per_val)
    ids, B = tr.clean()
    uniq = torch.unique(ids[ids >= 0])
    Bv = ref._mask_lengths(va.columns(uniq), va.lengths)     # [M, S, U]: only those columns
    if not per_val:
        return rows_ops.lookup(ids, B, uniq, rows_ops.outer_table(va.A, Bv, per_val=False))[:, 0]
    step = max(1, temp_budget_elems() // max(1, uniq.numel() * va.A.shape[-1]))
    return torch.cat([rows_ops.lookup(ids, B, uniq, rows_ops.outer_table(
        va.A[v0:v0 + step], Bv[v0:v0 + step], per_val=True)) for v0 in range(0, va.n, step)], 1)


@_rule(_DOT, Outer, Rows)
def _dot_outer_rows(tr: Outer, va: Rows, per_val: bool) -> Tensor:
    # Dense route restricted to the validation tokens' rows: V = their summed gradient rows.
    if not _tied_ok(va, tr):
        return _dot_materialised(tr, va, per_val)
    ids_v, B_v = va.clean()
    if not per_val:
        uniq, table = rows_ops.val_table(ids_v, B_v, per_val=False)
        return ops.ghost_dot_dense(tr.A, tr.columns(uniq), table[:, 0], lengths=tr.lengths)
    step = rows_ops.val_chunk(B_v.shape[1], B_v.shape[2])
    parts = []
    for v0 in range(0, va.n, step):
        uniq, table = rows_ops.val_table(ids_v[v0:v0 + step], B_v[v0:v0 + step], per_val=True)
        parts.append(ops.ghost_dot_dense(tr.A, tr.columns(uniq), table.transpose(0, 1), lengths=tr.lengths))
    return torch.cat(parts, 1)


@_rule(_GRAM, Rows, None)
def _gram_rows_self(r: Rows) -> Tensor:
    return _dot_rows(r, r, True)


@_rule(_GRAM, Rows, Rows)
def _gram_rows_pair(r1: Rows, r2: Rows) -> Tensor:
    return _dot_rows(r1, r2, True)


@_rule(_GRAM, Rows, Outer)
def _gram_rows_outer(r1: Rows, r2: Outer) -> Tensor:
    return _dot_rows_outer(r1, r2, True)


@_rule(_GRAM, Outer, Rows)
def _gram_outer_rows(r1: Outer, r2: Rows) -> Tensor:
    return _dot_outer_rows(r1, r2, True)


# ---- dots with a dense vector (estimators: V known only after the backward) -------------------
@_exact
def dense_dot(rep, V: Tensor, v_bias: Tensor | None = None) -> Tensor:
    """<g_i, V> for each sample of a rep, [n]. V has the parameter's shape (an Outer rep's weight
    layout: [p, d] with p = B's width); v_bias the bias part of a fused weight+bias Outer rep.
    Never forms a per-sample gradient."""
    if isinstance(rep, Outer):
        rep._full("a dense dot")
        p, d = rep.B.shape[-1], rep.A.shape[-1]
        if V.dim() > 2 and V.numel() == p * d:   # a conv weight [C_out, C_in/g, *k]: rows flattened
            V = V.reshape(p, d)
        return ops.ghost_dot_dense(rep.A, rep.B, V.to(ref.acc_dtype(rep.A, rep.B)),
                                   None if v_bias is None else v_bias.to(ref.acc_dtype(rep.A, rep.B)),
                                   lengths=rep.lengths)
    if isinstance(rep, Direct):
        g = rep.materialise()
        return g @ V.reshape(-1).to(g.dtype)
    if isinstance(rep, Rows):
        return rows_ops.rows_dense_dot(*rep.clean(), V)
    raise TypeError(f"no dense dot for a {type(rep).__name__} rep")
