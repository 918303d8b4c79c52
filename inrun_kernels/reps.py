"""How a layer describes the per-sample gradients of its parameters, without forming them.

A layer's backward hands the session one representation ("rep") for the training rows and one
for the validation rows of each parameter (or fused weight+bias pair) it owns:

- Outer: g_i = sum_t outer(B[i, t], A[i, t]) (+ sum_t B[i, t] as the bias when `bias`):
  linear-type layers (Linear, Conv1D, attention projections).
- Direct: the per-sample gradients themselves, [N, *shape]: small parameters (norm weights,
  biases) whose per-sample gradients are as cheap as their rows.

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

    @property
    def n(self) -> int:
        return self.A.shape[0]

    def materialise(self) -> Tensor:
        """[n, numel] per-sample gradients: only for rare cross terms (tied weights)."""
        return ref.materialise(self.A, self.B, bias=self.bias, lengths=self.lengths)

    def summed(self):
        """Dense sum over rows: (G [p, d], bias part [p] or None) — the rows' total gradient."""
        return ref.val_grad(self.A, ref._mask_lengths(self.B, self.lengths), bias=self.bias)


@dataclass
class Direct:
    G: Tensor  # [n, *param_shape] per-sample gradients

    @property
    def n(self) -> int:
        return self.G.shape[0]

    def materialise(self) -> Tensor:
        return self.G.flatten(1).to(ref.acc_dtype(self.G))
