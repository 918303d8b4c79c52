"""The split route: the weight-gradient GEMM and the per-sample products in one pass.

A linear layer's weight gradient is sum_i g_i with g_i = B_i^T A_i (A_i [T, d] inputs,
B_i [T, p] output gradients of sample i). Splitting that GEMM's reduction over tokens at sample
boundaries yields each sample's gradient one (p, d) tile at a time; dotting the tile with the
same tile of a dense V gives <g_i, V> (d*p multiply-adds per sample, 2/T of the GEMM), squaring
it gives ||g_i||^2, and adding it into the output tile gives the weight gradient. No per-sample
gradient is kept beyond one tile (the C++ kernel, csrc/split.cpp) or one budget-sized chunk
(this exact PyTorch reference, chunked over samples and output rows within INRUN_TEMP_MB).

Shapes and conventions are those of ops/reference.py: A [N, T, d], B [N, T, p] (2-D [N, d] /
[N, p] is one token per sample), `lengths` [N] the valid (left-aligned) token counts of
right-padded rows -- tokens at t >= lengths[i] contribute to nothing, not even the weight
gradient. fp32/bf16/fp16 inputs accumulate in fp32, fp64 in fp64; all outputs are in that
accumulation dtype. `scale` multiplies the weight (and bias) gradient only, never the dots or
norms (the layer scales the gradient for the mean training loss; the products are of the
per-sample-loss gradients, as everywhere else).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .budget import temp_budget_elems
from .reference import _mask_lengths, acc_dtype


def as_rows_tokens(A: Tensor, B: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """[N, d] / [N, p] -> [N, 1, d] / [N, 1, p]; [N, T, d] / [N, T, p] unchanged; checks shapes."""
    if A.dim() != B.dim() or A.dim() not in (2, 3):
        raise ValueError(f"{name}: expected A [N, (T,) d] and B [N, (T,) p] of the same rank, "
                         f"got A{tuple(A.shape)} B{tuple(B.shape)}")
    if A.dim() == 2:
        A, B = A[:, None], B[:, None]
    if A.shape[:2] != B.shape[:2]:
        raise ValueError(f"{name}: A{tuple(A.shape)} and B{tuple(B.shape)} differ in samples/tokens")
    return A, B


def check_operands(name: str, A: Tensor, B: Tensor, V: Tensor | None = None,
                   v_bias: Tensor | None = None, lengths: Tensor | None = None) -> None:
    """V [p, d] (one vector: dots [N]) or [K, p, d] (K vectors, e.g. one per validation sample:
    dots [N, K]); v_bias [p] or [K, p] to match."""
    N, _, d = A.shape
    p = B.shape[-1]
    if V is not None and (V.dim() not in (2, 3) or tuple(V.shape[-2:]) != (p, d)):
        raise ValueError(f"{name}: V{tuple(V.shape)} must be [p, d] = [{p}, {d}] or [K, {p}, {d}]")
    if V is not None and V.dim() == 3 and V.shape[0] == 0:
        raise ValueError(f"{name}: V{tuple(V.shape)} holds no vector (K = 0)")
    if v_bias is not None:
        want = (p,) if V is None or V.dim() == 2 else (V.shape[0], p)
        if tuple(v_bias.shape) != want:
            raise ValueError(f"{name}: v_bias{tuple(v_bias.shape)} must be {list(want)} to match V{tuple(V.shape)}")
    if lengths is not None and tuple(lengths.shape) != (N,):
        raise ValueError(f"{name}: lengths{tuple(lengths.shape)} must be [N] = [{N}]")


def _chunks(N: int, p: int, d: int):
    """(sample step, row step) so that one [n, rows, d] per-sample tile block fits the budget."""
    budget = temp_budget_elems()
    rows = max(1, min(p, budget // max(1, d)))
    n = max(1, min(N, budget // max(1, rows * d)))
    return n, rows


def _split(A: Tensor, B: Tensor, V: Tensor | None, lengths: Tensor | None, scale: float,
           bias: bool, v_bias: Tensor | None):
    dt = acc_dtype(A, B) if V is None else acc_dtype(A, B, V)
    N, T, d = A.shape
    p = B.shape[-1]
    B = _mask_lengths(B, lengths)
    W = torch.zeros(p, d, dtype=dt, device=A.device)
    multi = V is not None and V.dim() == 3
    out = torch.zeros((N, V.shape[0]) if multi else (N,), dtype=dt, device=A.device)
    Vd = None if V is None else V.to(dt)
    n, rows = _chunks(N, p, d)
    for i0 in range(0, N, n):
        a = A[i0:i0 + n].to(dt)
        for r0 in range(0, p, rows):
            b = B[i0:i0 + n, :, r0:r0 + rows].to(dt)
            g = torch.bmm(b.transpose(1, 2), a)                 # [n, rows, d]: sample tiles
            W[r0:r0 + rows] += g.sum(0)
            if Vd is None:
                out[i0:i0 + n] += g.square().sum((1, 2))
            elif multi:   # [n, rows*d] x [rows*d, K]
                out[i0:i0 + n] += g.reshape(g.shape[0], -1) @ Vd[:, r0:r0 + rows].reshape(Vd.shape[0], -1).T
            else:
                out[i0:i0 + n] += (g * Vd[r0:r0 + rows]).sum((1, 2))
    gb = None
    if bias:
        bs = B.to(dt).sum(1)                                    # [N, p] per-sample bias grads
        gb = bs.sum(0) * scale
        if V is None:
            out += bs.square().sum(1)
        elif v_bias is not None:
            vb = v_bias.to(dt)
            out += bs @ (vb.T if vb.dim() == 2 else vb)   # [N, p] x [p(, K)]
    return W * scale, gb, out


def split_dot(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
              lengths: Tensor | None = None, scale: float = 1.0, *, bias: bool | None = None):
    """(scale * sum_i g_i [p, d], scale * sum_i B_i^T 1 [p] or None, dots) with
    dots_i = <g_i, V> (+ <B_i^T 1, v_bias>): [N] for V [p, d], [N, K] for K vectors V [K, p, d]
    (v_bias [K, p]). The bias gradient is returned when `bias` (default: whether v_bias is given)."""
    A, B = as_rows_tokens(A, B, "split_dot")
    check_operands("split_dot", A, B, V, v_bias, lengths)
    bias = (v_bias is not None) if bias is None else bias
    return _split(A, B, V, lengths, scale, bias, v_bias)


def split_norms(A: Tensor, B: Tensor, lengths: Tensor | None = None, scale: float = 1.0, *,
                bias: bool = False):
    """(scale * sum_i g_i [p, d], bias gradient [p] or None, ||g_i||^2 [N]); with `bias` the
    norms include the bias part ||B_i^T 1||^2 and the bias gradient is returned."""
    A, B = as_rows_tokens(A, B, "split_norms")
    check_operands("split_norms", A, B, lengths=lengths)
    return _split(A, B, None, lengths, scale, bias, None)
