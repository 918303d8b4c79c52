"""Learning-rate schedules and hyper-parameter changes between optimizer steps: every step's
values are those of the update that step applies (README "What is computed": Delta with the
optimizer state -- momentum, moments, step count, lr -- as it is at that step), checked at
EVERY step of a run against the independent float64 step oracle of tests/test_estimators.py
(which reads the live optimizer: its lr, betas, momentum at that step).

Measured (float64, max over the steps and cases below): first 6.3e-13, midpoint 1.1e-11,
second 6.7e-10 under AdamW (the oracle's finite-difference D2 sets it; 2e-15 under SGD),
update="sgd" 5e-16."""
from __future__ import annotations

import copy

import pytest
import torch

import inrun_kernels as ik
from tests.models import MLP, ce_loss, make_data
from tests.oracle import rel_err
from tests.test_estimators import StepOracle

TOL = {"first": 1e-10, "midpoint": 1e-10, "second": 2e-8}
STEPS, N = 4, 5


def _groups(model):
    """Two param groups (their lrs move differently under the manual schedule)."""
    return [{"params": model.fc1.parameters()},
            {"params": list(model.fc2.parameters()) + list(model.head.parameters())}]


OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


def _manual(opt):
    """Sets each group's lr by hand before every step (no scheduler object)."""
    class Manual:
        def __init__(self):
            self.t = 0

        def step(self):
            self.t += 1
            for k, g in enumerate(opt.param_groups):
                g["lr"] = g["initial_lr"] * (0.5 ** self.t if k == 0 else 1.0 + self.t)

    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    return Manual()


SCHEDULES = {
    "step_lr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "warmup": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / STEPS),
    # also moves SGD's momentum / Adam's beta1 at every step
    "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=[3 * g["lr"] for g in opt.param_groups], total_steps=STEPS + 2, pct_start=0.5),
    "manual_per_group": _manual,
}


def run(opt_name, schedule, estimator, update):
    """STEPS engine steps under the schedule; returns per-step (error vs the oracle, lr of group 0)."""
    torch.manual_seed(0)
    model = MLP(d_in=11, hidden=13, classes=3).double()
    opt = OPTIMIZERS[opt_name](_groups(model))
    ce_loss(model, make_data(N, (11,), 3, seed=99)).mean().backward()   # optimizer state exists
    opt.step()                                                          # (Adam's first step is a kink)
    opt.zero_grad()
    ref = copy.deepcopy(model)
    sched = SCHEDULES[schedule](opt)
    val = make_data(3, (11,), 3, seed=98)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=N * STEPS, estimator=estimator,
                          update=update)
    out = []
    for t in range(STEPS):
        train = make_data(N, (11,), 3, seed=t)
        opt.zero_grad()
        eng.step(train, torch.arange(N) + N * t)
        orc = StepOracle(ref, model, opt, ce_loss, train, val, update=update)
        opt.step()
        sched.step()
        out.append((rel_err(eng.last_values, orc.values(estimator)), opt.param_groups[0]["lr"]))
    return out


@pytest.mark.parametrize("update", ["optimizer", "sgd"])
@pytest.mark.parametrize("estimator", ["first", "midpoint"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_values_follow_the_schedule_at_every_step(schedule, opt_name, estimator, update):
    steps = run(opt_name, schedule, estimator, update)
    lrs = [lr for _, lr in steps]
    assert len(set(lrs)) == STEPS, lrs             # the lr really changed at every step
    for t, (err, _) in enumerate(steps):
        assert err <= TOL[estimator], (t, err)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_second_order_follows_the_schedule(opt_name):
    for t, (err, _) in enumerate(run(opt_name, "one_cycle", "second", "optimizer")):
        assert err <= TOL["second"], (t, err)


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_nesterov"])
def test_an_lr_changed_between_eng_step_and_optimizer_step_is_followed(opt_name):
    """first + SGD-type update forms the values in eng.step()'s backward; a scheduler stepped
    before optimizer.step() (one common factor on every group, here lr and momentum) is followed
    at commit."""
    model = MLP(d_in=11, hidden=13, classes=3).double()
    ref = copy.deepcopy(model)
    nesterov = opt_name == "sgd_nesterov"
    opt = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9 if nesterov else 0, nesterov=nesterov)
    val, train = make_data(3, (11,), 3, seed=98), make_data(N, (11,), 3, seed=1)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator="first")
    eng.step(train, torch.arange(N))
    for g in opt.param_groups:                 # e.g. a scheduler stepped before the optimizer
        g["lr"] *= 3.0
    orc = StepOracle(ref, model, opt, ce_loss, train, val)
    opt.step()
    assert rel_err(eng.last_values, orc.values("first")) <= TOL["first"]


def test_an_lr_changed_by_different_factors_before_optimizer_step_is_an_error():
    """Per-group factors cannot be followed (the in-backward values are summed over parameters):
    an error naming the parameters, nothing recorded, the optimizer step not taken."""
    model = MLP(d_in=11, hidden=13, classes=3).double()
    opt = torch.optim.SGD(_groups(model), lr=0.1)
    val, train = make_data(3, (11,), 3, seed=98), make_data(N, (11,), 3, seed=1)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator="first")
    eng.step(train, torch.arange(N))
    opt.param_groups[0]["lr"] = 0.3
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"changed between eng.step\(\) and optimizer.step\(\).*"
                       r"x3: \['fc1\.weight', 'fc1\.bias'\]; x1: \['fc2\.weight'.*"
                       r"estimator='midpoint'.*Nothing was recorded"):
        opt.step()
    assert eng.steps == 0 and float(eng.values.abs().sum()) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
