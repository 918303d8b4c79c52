"""A CNN (Conv2d, GroupNorm, eval-mode BatchNorm, Linear) on scikit-learn's digits (8x8 images)
trains with the engine; the Conv2d layers (padding, stride, groups) are native ghost layers
(layers/conv.py), no longer the per-sample fallback. The first step's values equal the float64
oracle's; the loss falls."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracle import Oracle, rel_err

datasets = pytest.importorskip("sklearn.datasets")

import inrun_kernels as ik  # noqa: E402


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8).eval(), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).double()


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def test_digits_cnn_trains_with_engine():
    d = datasets.load_digits()
    X = torch.tensor(d.images, dtype=torch.float64)[:, None] / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    val_idx, train_idx = perm[:8], perm[8:8 + 16 * 12]
    val = (X[val_idx], y[val_idx])
    model = cnn()
    with torch.no_grad():
        model[4].running_var.uniform_(0.5, 2.0)
        model[4].weight.normal_()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eng = ik.InRunShapley(model, opt, ce, val, num_samples=len(y), update="sgd")
    cov = ik.coverage(model)
    assert cov.complete and not {"0", "3"} & set(cov.fallback), cov
    assert type(model[0]) is type(model[3]) is ik.layers.GhostConv2d
    losses = []
    for step in range(12):
        ids = train_idx[16 * step:16 * (step + 1)]
        train = (X[ids], y[ids])
        if step == 0:
            orc = Oracle(ik.unpatch(model), ce, train, val)
            ik.patch(model)
            want = 0.05 * orc.dot() / (16 * 8)
        opt.zero_grad()
        eng.step(train, ids)
        opt.step()
        if step == 0:
            assert rel_err(eng.last_values, want) <= 1e-6, rel_err(eng.last_values, want)
        with torch.no_grad():
            losses.append(float(ce(model, val).mean()))
    assert losses[-1] < losses[0], losses
    assert torch.isfinite(eng.values[train_idx]).all()
