"""How a layer describes the per-sample gradients of its parameters, without forming them.

A layer's backward hands the session one representation ("rep") for the training rows and one
for the validation rows of each parameter (or fused weight+bias pair) it owns:

- Outer: g_i = sum_t outer(B[i, t], A[i, t]) (+ sum_t B[i, t] as the bias when `bias`):
  linear-type layers (Linear, Conv1D, attention projections).
- Direct: the per-sample gradients themselves, [N, *shape]: small parameters (norm weights,
  biases) whose per-sample gradients are as cheap as their rows.
- Rows: g_i = sum_t outer(e_{ids[i, t]}, B[i, t]), a [num_rows, d] table gradient with nonzero
  rows only at the sample's token ids: embeddings (products by comparing ids, ops/rows.py).

products.py turns pairs of reps into dot products, Grams and norms. New layer types either
reuse these reps or add one with its product rules there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .ops import reference as ref


@dataclass
class Outer:
    A: Tensor                      # [n, T, d] layer inputs
    B: Tensor                      # [n, T, p] output gradients (per-sample loss scale)
    bias: bool = False             # rep also covers a bias (fused: weight and bias in one product)
    lengths: Tensor | None = None  # [n] real lengths of right-padded rows, or None
    # Sorted weight rows that B's columns hold when only those are kept (None: all p rows).
    # A weight tied to an embedding keeps, until the embedding's backward, only the columns of
    # the token ids its cross terms read (GPT-2: a few thousand of 50257): session._compact.
    cols: Tensor | None = None

    @property
    def n(self) -> int:
        return self.A.shape[0]

    def materialise(self) -> Tensor:
        """[n, numel] per-sample gradients: only for rare cross terms (tied weights)."""
        self._full("materialise")
        return ref.materialise(self.A, self.B, bias=self.bias, lengths=self.lengths)

    def keep_cols(self, rows: Tensor) -> "Outer":
        """This rep with B restricted to the weight rows `rows` (sorted, unique)."""
        self._full("keep_cols")
        return Outer(self.A, self.B[..., rows.to(self.B.device)], self.bias, self.lengths, rows)

    def columns(self, rows: Tensor) -> Tensor:
        """B's columns for the weight rows `rows` (all of which must be held)."""
        if self.cols is None:
            return self.B[..., rows]
        pos = torch.searchsorted(self.cols, rows).clamp_max(max(0, self.cols.numel() - 1))
        if self.cols.numel() == 0 or not torch.equal(self.cols[pos], rows):
            raise RuntimeError("internal: a column-restricted Outer rep was asked for rows it does not hold")
        return self.B[..., pos]

    def _full(self, what: str) -> None:
        if self.cols is not None:
            raise RuntimeError(f"internal: {what} of a column-restricted Outer rep")

    def summed(self, per_row: bool = False):
        """Dense sum over rows: (G [p, d], bias part [p] or None) — the rows' total gradient;
        per_row: each row's own gradient (G [n, p, d], bias part [n, p] or None)."""
        return ref.val_grad(self.A, ref._mask_lengths(self.B, self.lengths), bias=self.bias, per_val=per_row)


@dataclass
class Direct:
    G: Tensor  # [n, *param_shape] per-sample gradients

    @property
    def n(self) -> int:
        return self.G.shape[0]

    def materialise(self) -> Tensor:
        return self.G.flatten(1).to(ref.acc_dtype(self.G))


@dataclass
class Rows:
    """Embedding-type per-sample gradients: g_i = sum_t outer(e_{ids[i, t]}, B[i, t]), a
    [num_rows, d] matrix with nonzero rows only at the sample's token ids. Tokens whose id is
    negative (padding_idx, padded positions) contribute nothing."""
    ids: Tensor                    # [n, T] long row indices (-1: no gradient)
    B: Tensor                      # [n, T, d] output gradients (per-sample loss scale)
    num_rows: int                  # rows of the weight (vocabulary size)
    lengths: Tensor | None = None  # [n] real lengths of right-padded rows, or None

    @property
    def n(self) -> int:
        return self.ids.shape[0]

    def clean(self) -> tuple[Tensor, Tensor]:
        """(ids, B) with every token that carries no gradient set to id -1 and B = 0."""
        ids, B = self.ids, self.B
        if self.lengths is not None:
            keep = torch.arange(ids.shape[1], device=ids.device)[None, :] < self.lengths.to(ids.device)[:, None]
            ids = torch.where(keep, ids, torch.full_like(ids, -1))
        B = B * (ids >= 0)[..., None].to(B.dtype)
        return ids, B

    def materialise(self) -> Tensor:
        """[n, num_rows * d] per-sample gradients: only for rare fallbacks (forms n dense copies)."""
        ids, B = self.clean()
        n, T, d = B.shape
        dt = ref.acc_dtype(B)
        g = torch.zeros(n * self.num_rows + 1, d, dtype=dt, device=B.device)
        rows = torch.where(ids >= 0, ids + self.num_rows * torch.arange(n, device=ids.device)[:, None],
                           torch.full_like(ids, n * self.num_rows))
        g.index_add_(0, rows.reshape(-1), B.reshape(-1, d).to(dt))
        return g[:-1].reshape(n, -1)

    def summed(self) -> Tensor:
        """Dense [num_rows, d] sum over rows: the rows' total gradient."""
        ids, B = self.clean()
        d = B.shape[-1]
        g = torch.zeros(self.num_rows + 1, d, dtype=ref.acc_dtype(B), device=B.device)
        g.index_add_(0, torch.where(ids >= 0, ids, self.num_rows).reshape(-1), B.reshape(-1, d).to(g.dtype))
        return g[:-1]
