"""BatchNorm1d/2d/3d in eval mode (running statistics) with trainable affine parameters: exact
products against a float64 batch-size-1 oracle on the ORIGINAL model, exact engine values, the
same outputs and training as the unpatched model, and a BatchCouplingError whenever the layer
normalises with batch statistics (training mode, or track_running_stats=False)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers.batchnorm import GhostBatchNorm
from inrun_kernels.layers.registry import GhostModule
from tests.models import ce_loss, make_data
from tests.oracle import Oracle, rel_err

TOL = 1e-10


def _randomise_bn(model, seed=0):
    """Running statistics and affine parameters away from their defaults (0, 1), so that a rule
    that ignored any of them would be wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(torch.rand(C, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(C, generator=g) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(C, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(C, generator=g) * 2 - 1)
    return model


class Flat(nn.Module):
    """Linear -> BatchNorm1d -> Linear on 2-D inputs [B, d]."""

    def __init__(self, d=7, h=6, classes=3):
        super().__init__()
        self.fc = nn.Linear(d, h)
        self.bn = nn.BatchNorm1d(h, eps=1e-3)
        self.head = nn.Linear(h, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.fc(x))))


class Channels(nn.Module):
    """BatchNorm{1,2,3}d on [B, C, *S, L] inputs, the Linear layers on the last dim."""

    def __init__(self, dims=1, C=4, L=5, h=6, classes=3, spatial=(3, 2)):
        super().__init__()
        self.fc = nn.Linear(L, h)
        self.bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](C)
        self.head = nn.Linear(h, classes)
        self.shape = (C,) + spatial[:dims - 1] + (L,)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc(x)))          # channel dim 1, normalised per channel
        return self.head(h.flatten(1, -2).mean(1))   # pool over channels and spatial dims


def _case(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "flat":
        model, shape = Flat(), (7,)
    else:
        dims = int(kind[-1])
        model = Channels(dims)
        shape = model.shape
    model = _randomise_bn(model.double(), seed).eval()
    return model, make_data(6, shape, 3, seed=seed + 1), make_data(3, shape, 3, seed=seed + 2)


KINDS = ["flat", "channels1", "channels2", "channels3"]


@pytest.mark.parametrize("kind", KINDS)
def test_products_match_the_oracle(kind):
    model, train, val = _case(kind)
    orc = Oracle(model, ce_loss, train, val)
    errs = {
        "dot": rel_err(ik.grad_dot(model, ce_loss, train, val), orc.dot()),
        "per_val": rel_err(ik.grad_dot(model, ce_loss, train, val, per_val=True), orc.dot(per_val=True)),
        "gram": rel_err(ik.grad_gram(model, ce_loss, train), orc.gram()),
        "norms": rel_err(ik.grad_norms(model, ce_loss, train), orc.norms()),
    }
    assert max(errs.values()) <= TOL, errs
    _, per = ik.grad_dot(model, ce_loss, train, val, per_param=True)
    for name in ("bn.weight", "bn.bias"):   # the BatchNorm's own share, not just the total
        assert rel_err(per[name], orc.dot(name=name)) <= TOL, name
    assert ik.coverage(model).complete


def test_only_the_trainable_affine_parameter_counts():
    model, train, val = _case("channels2")
    model.bn.bias.requires_grad_(False)
    orc = Oracle(model, ce_loss, train, val)
    assert rel_err(ik.grad_dot(model, ce_loss, train, val), orc.dot()) <= TOL
    assert "bn.bias" not in orc.train
    model.bn.weight.requires_grad_(False)   # nothing trainable left in the layer
    orc = Oracle(model, ce_loss, train, val)
    assert rel_err(ik.grad_dot(model, ce_loss, train, val), orc.dot()) <= TOL


@pytest.mark.parametrize("kind", ["flat", "channels1"])
def test_engine_values_and_training_match_the_unpatched_model(kind):
    """SGD, first order: values = lr/(N M) <g_i, sum_v g_v>; every step's loss, every p.grad and
    the weights after training equal the unpatched model's (the running statistics, in eval
    mode, never change)."""
    model, train, val = _case(kind)
    plain = copy.deepcopy(model)
    lr, N, M = 0.05, 6, 3
    opt_p = torch.optim.SGD(plain.parameters(), lr=lr)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=40)
    assert isinstance(model.bn, GhostBatchNorm) and isinstance(model.bn, type(plain.bn))
    shape = train[0].shape[1:]
    for step in range(4):
        batch = train if step == 0 else make_data(N, shape, 3, seed=10 + step)
        ids = torch.arange(N) + N * step
        want = lr / (N * M) * Oracle(model, ce_loss, batch, val).dot()
        opt_p.zero_grad()
        loss_p = ce_loss(plain, batch).mean()
        loss_p.backward()
        opt.zero_grad()
        loss = eng.step(batch, ids)
        torch.testing.assert_close(loss, loss_p.detach(), rtol=1e-13, atol=0)
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)
        opt_p.step()
        opt.step()
        assert rel_err(eng.last_values, want) <= TOL
        assert rel_err(eng.values[ids], want) <= TOL
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=name)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, dict(plain.named_buffers())[name]), name
    torch.testing.assert_close(model(val[0]), plain(val[0]), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("estimator", ["first", "midpoint", "second"])
def test_engine_values_with_adamw_match_the_step_oracle(estimator):
    """update='optimizer' with AdamW: the training rows' per-sample gradient reps are kept and
    dotted with a dense vector after the backward (the Direct reps of the BatchNorm included)."""
    from tests.test_estimators import N, M, TOL as EST_TOL, run_engine
    torch.manual_seed(0)
    model = _randomise_bn(Channels(1, C=3, L=4).double()).eval()
    shape = model.shape
    warm = [make_data(N, shape, 3, seed=s) for s in (1, 2)]
    train, val = make_data(N, shape, 3, seed=4), make_data(M, shape, 3, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    got, orc = run_engine(model, opt, ce_loss, warm, train, val, estimator=estimator, update="optimizer")
    assert rel_err(got, orc.values(estimator)) <= EST_TOL[estimator]


def test_patch_outside_a_session_is_the_original_module_and_unpatch_restores_it():
    model, train, _ = _case("channels2")
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    bn_params = [id(p) for p in model.bn.parameters()]
    ik.patch(model)
    assert type(model.bn).__name__ == "GhostBatchNorm2d" and isinstance(model.bn, nn.BatchNorm2d)
    assert [id(p) for p in model.bn.parameters()] == bn_params and list(model.state_dict()) == keys
    assert torch.equal(model(train[0]), plain(train[0]))
    with pytest.raises(ValueError, match="expected 4D input"):    # BatchNorm2d's own check
        model.bn(torch.zeros(2, 3))
    ik.unpatch(model)
    assert type(model.bn) is nn.BatchNorm2d
    assert not any(isinstance(m, GhostModule) for m in model.modules())


def test_eval_mode_with_trainable_affine_is_covered_not_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    ik.patch(model)       # used to be UnsupportedModuleError naming '1' (BatchNorm1d)
    cov = ik.coverage(model)
    assert cov.complete and {"1.weight", "1.bias"} <= set(cov.covered)


def test_training_mode_is_a_batch_coupling_error_at_patch_time_and_at_every_step():
    model, train, val = _case("flat")
    model.train()
    with pytest.raises(ik.BatchCouplingError, match=r"'bn' \(BatchNorm1d\) is in training mode.*couples"):
        ik.patch(model)
    assert type(model.bn) is nn.BatchNorm1d           # nothing was patched
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=10)
    model.train()                                      # e.g. model.train() in the training loop
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ik.BatchCouplingError, match=r"'bn' \(BatchNorm1d\) is in training mode"):
        eng.step(train, torch.arange(6))
    with pytest.raises(ik.BatchCouplingError):
        ik.grad_dot(model, ce_loss, train, val)
    assert all(p.grad is None for p in model.parameters())
    assert eng.counts.sum() == 0 and eng.values.abs().sum() == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    # the ghost layer itself refuses batch statistics inside a session
    from inrun_kernels.session import ghost_session
    with ghost_session(2, 1, dot=True), pytest.raises(ik.BatchCouplingError, match="training mode"):
        model.bn(torch.randn(3, 6, dtype=torch.float64))
    model.eval()
    assert rel_err(ik.grad_dot(model, ce_loss, train, val), Oracle(model, ce_loss, train, val).dot()) <= TOL


def test_eval_mode_without_running_statistics_is_a_batch_coupling_error():
    """track_running_stats=False: batch statistics in eval mode too (samples coupled)."""
    for affine in (True, False):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=affine,
                                                                track_running_stats=False)).eval()
        with pytest.raises(ik.BatchCouplingError, match=r"'1' \(BatchNorm1d\).*track_running_stats=False"):
            ik.patch(model)
        x = torch.randn(5, 4)
        with pytest.raises(ik.BatchCouplingError):
            ik.grad_dot(model, lambda m, b: m(b).sum(1), x[:3], x[3:])
