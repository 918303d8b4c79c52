"""Small test models built from Linear layers and parameter-free ops."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """2-D inputs [B, d_in]."""

    def __init__(self, d_in=17, hidden=33, classes=5, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, hidden, bias=bias)
        self.head = nn.Linear(hidden, classes, bias=bias)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class TokenMixer(nn.Module):
    """3-D inputs [B, T, d]: per-token Linear layers around a parameter-free causal token mix
    (running mean), mean-pooled into a classifier."""

    def __init__(self, d=17, hidden=33, classes=4, bias=True):
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=bias)
        self.down = nn.Linear(hidden, d, bias=bias)
        self.head = nn.Linear(d, classes, bias=bias)

    def forward(self, x):
        h = F.gelu(self.up(x))
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device)
        h = h.cumsum(1) / steps[:, None]
        h = x + self.down(h)
        return self.head(h.mean(1))


class Tied(nn.Module):
    """One weight used by two Linear layers (and a bias of its own in each)."""

    def __init__(self, d=9, classes=3):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def make_data(n, shape, classes, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(n, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y
