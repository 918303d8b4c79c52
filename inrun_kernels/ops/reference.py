"""Exact PyTorch versions of every ghost primitive.

They are the CPU fallback, the oracle the kernels are tested against, and the benchmark
baseline. Shapes: training inputs A [N, T, d] and output gradients B [N, T, p]; validation
Av [M, S, d], Bv [M, S, p]. Sample i's weight gradient is g_i = B_i^T A_i (p x d), its bias
gradient B_i^T 1. No per-sample gradient is formed except by the explicit "materialise"
helpers, and every temporary is bounded by the memory budget (see budget.py) by chunking.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .budget import temp_budget_elems


def acc_dtype(*ts: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 accumulate in fp32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _mask_lengths(B: Tensor, lengths: Tensor | None) -> Tensor:
    """Zero the output gradients of right-padded tokens (they then contribute nothing)."""
    if lengths is None:
        return B
    keep = torch.arange(B.shape[1], device=B.device)[None, :] < lengths.to(B.device)[:, None]
    return B * keep[..., None].to(B.dtype)


def _row_chunk(rows_per_unit: int, cols: int, factor: int = 2) -> int:
    """How many units (samples) fit in the budget when each costs rows*cols*factor elements."""
    per_unit = max(1, rows_per_unit * cols * factor)
    return max(1, temp_budget_elems() // per_unit)


def val_grad(Av: Tensor, Bv: Tensor, *, bias: bool, per_val: bool = False):
    """Dense validation gradient: G = sum_v Bv_v^T Av_v [p, d] (or [M, p, d] with per_val),
    and the bias part sum_v Bv_v^T 1 [p] (or [M, p]); None when bias is False."""
    dt = acc_dtype(Av, Bv)
    Av, Bv = Av.to(dt), Bv.to(dt)
    if per_val:
        G = torch.bmm(Bv.transpose(1, 2), Av)
        gb = Bv.sum(1) if bias else None
    else:
        G = Bv.reshape(-1, Bv.shape[-1]).T @ Av.reshape(-1, Av.shape[-1])
        gb = Bv.sum((0, 1)) if bias else None
    return G, gb


def dot_gram(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, *, bias: bool, per_val: bool,
             lengths: Tensor | None = None, val_lengths: Tensor | None = None) -> Tensor:
    """Gram route: s_iv = sum_{t,s} (a_it . a_vs + bias) (b_it . b_vs).

    Returns [N, M] when per_val else [N] (the sum over v)."""
    dt = acc_dtype(A, B, Av, Bv)
    N, T, _ = A.shape
    M, S, _ = Av.shape
    B, Bv = _mask_lengths(B, lengths), _mask_lengths(Bv, val_lengths)
    out = torch.empty(N, M, dtype=dt, device=A.device)
    # Blocks of (training samples) x (validation samples) whose two Grams fit the budget.
    vstep = min(M, _row_chunk(T, S))
    step = _row_chunk(T, vstep * S)
    for v0 in range(0, M, vstep):
        mv = min(vstep, M - v0)
        a_v = Av[v0:v0 + vstep].reshape(mv * S, -1).to(dt)
        b_v = Bv[v0:v0 + vstep].reshape(mv * S, -1).to(dt)
        for i0 in range(0, N, step):
            a = A[i0:i0 + step].reshape(-1, A.shape[-1]).to(dt)
            b = B[i0:i0 + step].reshape(-1, B.shape[-1]).to(dt)
            ga = a @ a_v.T
            if bias:
                ga += 1
            ga *= b @ b_v.T
            out[i0:i0 + step, v0:v0 + mv] = ga.reshape(-1, T, mv, S).sum((1, 3))
    return out if per_val else out.sum(1)


def dot_dense(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
              lengths: Tensor | None = None) -> Tensor:
    """Per-sample dot with a dense per-layer matrix: s_i = sum_t b_it^T V a_it (+ b_it . v_bias).

    V is [p, d] (-> [N]) or [K, p, d] (-> [N, K], e.g. one matrix per validation sample)."""
    dt = acc_dtype(A, B, V)
    N, T, d = A.shape
    p = B.shape[-1]
    B = _mask_lengths(B, lengths)
    Vs = V.to(dt).reshape(-1, p, d)
    vbs = None if v_bias is None else v_bias.to(dt).reshape(-1, p)
    out = torch.empty(N, Vs.shape[0], dtype=dt, device=A.device)
    # b^T V a either as (b V) . a or as (a V^T) . b: same flops, but the intermediate is
    # [T, min(p, d)] wide, 32x less memory traffic for an LM head (p = vocab >> d).
    step = _row_chunk(T, min(p, d), factor=1)
    for i0 in range(0, N, step):
        a = A[i0:i0 + step].to(dt)
        b = B[i0:i0 + step].to(dt)
        for k in range(Vs.shape[0]):
            if p > d:
                s = torch.linalg.vecdot(b @ Vs[k], a).sum(1)
            else:
                s = torch.linalg.vecdot(a @ Vs[k].T, b).sum(1)
            if vbs is not None:
                s += b.sum(1) @ vbs[k]
            out[i0:i0 + step, k] = s
    return out if V.dim() == 3 else out[:, 0]


def dot_dense_val(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, *, bias: bool, per_val: bool,
                  lengths: Tensor | None = None, val_lengths: Tensor | None = None) -> Tensor:
    """Dense route of the train x val dot: form G_val once, then sum_t b_it^T G_val a_it."""
    G, gb = val_grad(Av, _mask_lengths(Bv, val_lengths), bias=bias, per_val=per_val)
    return dot_dense(A, B, G, gb, lengths=lengths)


def gram(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Train x train Gram [N, N] of per-sample gradients, Gram route (blocks i <= j only)."""
    dt = acc_dtype(A, B)
    N, T, _ = A.shape
    B = _mask_lengths(B, lengths)
    out = torch.empty(N, N, dtype=dt, device=A.device)
    step = max(1, int(_row_chunk(T, T) ** 0.5))
    for i0 in range(0, N, step):
        ai = A[i0:i0 + step].reshape(-1, A.shape[-1]).to(dt)
        bi = B[i0:i0 + step].reshape(-1, B.shape[-1]).to(dt)
        for j0 in range(i0, N, step):
            aj = A[j0:j0 + step].reshape(-1, A.shape[-1]).to(dt)
            bj = B[j0:j0 + step].reshape(-1, B.shape[-1]).to(dt)
            ga = ai @ aj.T
            if bias:
                ga += 1
            ga *= bi @ bj.T
            blk = ga.reshape(-1, T, ga.shape[1] // T, T).sum((1, 3))
            out[i0:i0 + step, j0:j0 + step] = blk
            out[j0:j0 + step, i0:i0 + step] = blk.T
    return _symmetric(out)


def _symmetric(G: Tensor) -> Tensor:
    """Mirror the upper triangle: a Gram must be exactly symmetric, rounding included."""
    upper = torch.triu(G, 1)
    return upper + upper.T + torch.diag_embed(torch.diagonal(G))


def norms_sq(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Squared L2 norms of the per-sample gradients [N], Gram route (diagonal blocks only)."""
    dt = acc_dtype(A, B)
    N, T, _ = A.shape
    B = _mask_lengths(B, lengths)
    out = torch.empty(N, dtype=dt, device=A.device)
    step = _row_chunk(T, T)
    for i0 in range(0, N, step):
        a = A[i0:i0 + step].to(dt)
        b = B[i0:i0 + step].to(dt)
        ga = a @ a.transpose(1, 2)
        if bias:
            ga += 1
        ga *= b @ b.transpose(1, 2)
        out[i0:i0 + step] = ga.sum((1, 2))
    return out


def materialise(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Per-sample gradients [N, p*d (+p)], flattened. Only for a chunk that fits the budget:
    the cheaper route for Gram/norms when T^2 > p*d (fastDP's rule, decided by cost in dispatch)."""
    dt = acc_dtype(A, B)
    B = _mask_lengths(B, lengths).to(dt)
    g = torch.bmm(B.transpose(1, 2), A.to(dt)).flatten(1)
    return torch.cat([g, B.sum(1)], 1) if bias else g


def gram_materialised(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Train x train Gram through chunks of materialised per-sample gradients (upper blocks)."""
    N, T, d = A.shape
    width = B.shape[-1] * (d + 1)
    step = max(1, temp_budget_elems() // (2 * width))

    def block(i):
        return materialise(A[i:i + step], B[i:i + step], bias=bias,
                           lengths=None if lengths is None else lengths[i:i + step])

    out = None
    for i in range(0, N, step):
        gi = block(i)
        if out is None:
            out = torch.empty(N, N, dtype=gi.dtype, device=A.device)
        for j in range(i, N, step):
            gj = gi if j == i else block(j)
            blk = gi @ gj.T
            out[i:i + step, j:j + step] = blk
            out[j:j + step, i:i + step] = blk.T
    return _symmetric(out)


def norms_sq_materialised(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    N, T, d = A.shape
    p = B.shape[-1]
    step = max(1, temp_budget_elems() // max(1, p * d + p))
    return torch.cat([materialise(A[i:i + step], B[i:i + step], bias=bias,
                                  lengths=None if lengths is None else lengths[i:i + step])
                      .square().sum(1) for i in range(0, N, step)])
