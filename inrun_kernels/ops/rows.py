"""Exact PyTorch primitives for embedding-type ("Rows") per-sample gradients.

Sample i's gradient of a [V, d] table is g_i = sum_t outer(e_{ids[i, t]}, B[i, t]): nonzero only
at the rows of the tokens it holds. Tokens with a negative id carry no gradient (callers map
padding_idx and right padding to -1). Nothing here forms a dense [V, d] matrix per sample: the
other side of a product is summed sparsely over its unique ids (index_add), and each token of
this side looks its row up there (searchsorted). Temporaries are chunked by the memory budget.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .budget import temp_budget_elems
from .reference import acc_dtype


def val_table(ids: Tensor, B: Tensor, *, per_val: bool) -> tuple[Tensor, Tensor]:
    """Sparse sum of the rows' gradients: (uniq [U] sorted ids, table [U, K, d]) with
    table[u, k] = sum_{t: ids[k, t] = uniq[u]} B[k, t]; K = n with per_val, else 1 (summed)."""
    n, T, d = B.shape
    dt = acc_dtype(B)
    live = ids >= 0
    uniq, inv = torch.unique(ids[live], return_inverse=True)
    K = n if per_val else 1
    table = torch.zeros(uniq.numel() * K, d, dtype=dt, device=B.device)
    if uniq.numel():
        key = inv * K
        if per_val:
            key = key + torch.arange(n, device=ids.device)[:, None].expand(n, T)[live]
        table.index_add_(0, key, B[live].to(dt))
    return uniq, table.reshape(uniq.numel(), K, d)


def lookup(ids: Tensor, B: Tensor, uniq: Tensor, table: Tensor) -> Tensor:
    """[n, K]: s[i, k] = sum_t B[i, t] . table[row of ids[i, t], k] (0 where the id is absent)."""
    n, T, d = B.shape
    U, K, _ = table.shape
    dt = table.dtype
    out = torch.zeros(n, K, dtype=dt, device=B.device)
    if U == 0:
        return out
    pos = torch.searchsorted(uniq, ids.clamp_min(0)).clamp_max(U - 1)
    hit = (uniq[pos] == ids) & (ids >= 0)
    step = max(1, temp_budget_elems() // max(1, T * K * d))
    for i0 in range(0, n, step):
        p, h = pos[i0:i0 + step], hit[i0:i0 + step]
        b = B[i0:i0 + step].to(dt) * h[..., None].to(dt)
        rows = table[p.reshape(-1)]                              # [c*T, K, d]
        s = torch.bmm(rows, b.reshape(-1, d, 1)).reshape(-1, T, K)
        out[i0:i0 + step] = s.sum(1)
    return out


def val_chunk(S: int, d: int) -> int:
    """Validation rows per chunk so that a per-val table (<= c*S unique ids x c x d) fits."""
    return max(1, int((temp_budget_elems() // max(1, S * d)) ** 0.5))


def rows_dot(ids: Tensor, B: Tensor, ids_v: Tensor, B_v: Tensor, *, per_val: bool) -> Tensor:
    """<g_i, g_v> of two Rows sides: [n, M] with per_val, else [n] (summed over v)."""
    if not per_val:
        uniq, table = val_table(ids_v, B_v, per_val=False)
        return lookup(ids, B, uniq, table)[:, 0]
    M, S, d = B_v.shape
    step = val_chunk(S, d)
    parts = []
    for v0 in range(0, M, step):
        uniq, table = val_table(ids_v[v0:v0 + step], B_v[v0:v0 + step], per_val=True)
        parts.append(lookup(ids, B, uniq, table))
    return torch.cat(parts, 1)


def rows_norms_sq(ids: Tensor, B: Tensor, num_rows: int) -> Tensor:
    """Squared norms [n]: each sample's gradient rows summed sparsely, then squared."""
    n, T, d = B.shape
    dt = acc_dtype(B)
    live = ids >= 0
    sample = torch.arange(n, device=ids.device)[:, None].expand(n, T)[live]
    keys, inv = torch.unique(sample * num_rows + ids[live], return_inverse=True)
    rows = torch.zeros(keys.numel(), d, dtype=dt, device=B.device)
    rows.index_add_(0, inv, B[live].to(dt))
    out = torch.zeros(n, dtype=dt, device=B.device)
    return out.index_add_(0, keys // num_rows, rows.square().sum(1))


def outer_table(A_v: Tensor, Bu: Tensor, *, per_val: bool) -> Tensor:
    """Rows of the gradients g_v = B_v^T A_v of an Outer side whose output dim indexes the same
    table (tied weights): [U, K, d], K = M with per_val else 1. Bu [M, S, U] holds B_v's columns
    of those U rows only, already masked for padding."""
    dt = acc_dtype(A_v, Bu)
    Bu = Bu.to(dt)
    A = A_v.to(dt)
    if per_val:
        return torch.bmm(Bu.transpose(1, 2), A).transpose(0, 1)  # [U, M, d]
    return (Bu.reshape(-1, Bu.shape[-1]).T @ A.reshape(-1, A.shape[-1]))[:, None]


def rows_dense_dot(ids: Tensor, B: Tensor, V: Tensor) -> Tensor:
    """<g_i, V> for a dense [num_rows, d] V: s_i = sum_t B[i, t] . V[ids[i, t]], [n]. Tokens with
    a negative id must carry B = 0 (Rows.clean does both)."""
    n, T, d = B.shape
    dt = acc_dtype(B)
    V = V.to(dt)
    out = torch.zeros(n, dtype=dt, device=B.device)
    step = max(1, temp_budget_elems() // max(1, T * d))
    for i0 in range(0, n, step):
        idx = ids[i0:i0 + step]
        rows = V[idx.clamp_min(0).reshape(-1)].reshape(*idx.shape, d)
        out[i0:i0 + step] = torch.linalg.vecdot(rows, B[i0:i0 + step].to(dt)).sum(1)
    return out
