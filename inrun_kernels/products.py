"""Products of per-sample gradient reps: train x val dots, train x train Grams, norms.

Same-type pairs go to the fused primitives in ops (never forming per-sample gradients). Mixed
pairs, which only arise for parameters shared by layers of different kinds, fall back to
materialising the per-sample gradients of the smaller side; that is exact, and rare.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import ops
from .reps import Direct, Outer

_DOT: dict[tuple[type, type], Callable] = {}
_GRAM: dict[tuple[type, type], Callable] = {}


def _rule(table, a: type, b: type):
    def deco(fn):
        table[(a, b)] = fn
        return fn
    return deco


def dot(train, val, *, per_val: bool) -> Tensor:
    """<g_i, g_v>: [N, M] when per_val, else [N] summed over v."""
    fn = _DOT.get((type(train), type(val)), _dot_materialised)
    return fn(train, val, per_val)


def gram(r1, r2=None) -> Tensor:
    """[N1, N2] of <g_i, g_j>; r2=None means r1 against itself (symmetric, cheaper)."""
    if r2 is None:
        fn = _GRAM.get((type(r1), None))
        if fn is not None:
            return fn(r1)
        r2 = r1
    fn = _GRAM.get((type(r1), type(r2)), _gram_materialised)
    return fn(r1, r2)


def norms_sq(r) -> Tensor:
    if isinstance(r, Outer):
        return ops.ghost_norms_sq(r.A, r.B, bias=r.bias, lengths=r.lengths)
    return r.materialise().square().sum(1)


@_rule(_DOT, Outer, Outer)
def _dot_outer(tr: Outer, va: Outer, per_val: bool) -> Tensor:
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
    if r1.A.shape[-1] != r2.A.shape[-1] or r1.B.shape[-1] != r2.B.shape[-1] or r1.bias != r2.bias:
        return _gram_materialised(r1, r2)
    return ops.ghost_dot(r1.A, r1.B, r2.A, r2.B, bias=r1.bias, per_val=True,
                         lengths=r1.lengths, val_lengths=r2.lengths)


def _gram_materialised(r1, r2) -> Tensor:
    g1, g2 = r1.materialise(), r2.materialise()
    return g1 @ g2.T
