"""Gradient accumulation (issue 10, item 1): k micro-batches per optimizer step. p.grad as after
(loss_fn(model, micro).mean() / k).backward() on each; sample i of micro-batch j (n_j rows) owns
the share x_i = g_i / (k n_j) of the accumulated update, valued by every estimator against the
real optimizer's update (independent float64 oracle of tests/test_estimators.py)."""
import copy

import pytest
import torch

import inrun_kernels as ik
from tests.models import TokenMixer, ce_loss, make_data
from tests.oracle import rel_err
from tests.test_estimators import TOL, StepOracle

SIZES = (3, 4, 2)   # micro-batch sizes of one optimizer step, k = 3


class AccOracle(StepOracle):
    """StepOracle of the concatenated micro-batches with per-row shares 1 / (k n_j)."""

    def __init__(self, *a, weights, **kw):
        super().__init__(*a, **kw)
        self.w = weights

    @property
    def xi(self):
        return self.c * self.G * self.w[:, None]

    @property
    def xB(self):
        return self.xi.sum(0)


def _micro(seed):
    return [make_data(n, (7, 17), 4, seed=seed + j) for j, n in enumerate(SIZES)]


def _cat(batches):
    return tuple(torch.cat([b[t] for b in batches]) for t in range(2))


@pytest.mark.parametrize("estimator", ["first", "midpoint", "second"])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
def test_accumulated_step_matches_the_oracle(opt_name, estimator):
    torch.manual_seed(0)
    model = TokenMixer().double()
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    make = {"sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}[opt_name]
    opt, opt_p = make(model.parameters()), make(plain.parameters())
    val = make_data(3, (7, 17), 4, seed=99)
    k = len(SIZES)
    for m, o in ((model, opt), (plain, opt_p)):   # one plain step first: optimizer state exists
        ce_loss(m, make_data(6, (7, 17), 4, seed=77)).mean().backward()
        o.step()
        o.zero_grad()
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=40, estimator=estimator,
                          accumulation_steps=k)
    for step in range(2):   # the second step runs with optimizer state from the first
        micro = _micro(10 * step)
        ids = torch.arange(sum(SIZES)) + 9 * step
        opt.zero_grad()
        opt_p.zero_grad()
        for j, b in enumerate(micro):
            lo = sum(SIZES[:j])
            eng.step(b, ids[lo:lo + SIZES[j]])
            (ce_loss(plain, b).mean() / k).backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
        weights = torch.cat([torch.full((n,), 1.0 / (k * n), dtype=torch.float64) for n in SIZES])
        orc = AccOracle(ref, model, opt, ce_loss, _cat(micro), val, weights=weights)
        want = orc.values(estimator)
        opt.step()
        opt_p.step()
        assert rel_err(eng.last_values, want) <= TOL[estimator], rel_err(eng.last_values, want)
        assert torch.equal(eng.values[ids], eng.values[ids])   # ids recorded in order
    assert eng.steps == 2 and int(eng.counts.sum()) == 2 * sum(SIZES)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_sgd_first_order_is_lr_over_k_n_j_and_windows_are_enforced():
    model = TokenMixer().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = make_data(2, (7, 17), 4, seed=5)
    eng = ik.InRunShapley(model, opt, ce_loss, val, accumulation_steps=2, num_samples=20)
    a, b = make_data(3, (7, 17), 4, seed=1), make_data(5, (7, 17), 4, seed=2)
    ref = copy.deepcopy(model)
    orc = StepOracle(ref, model, opt, ce_loss, _cat([a, b]), val, update="sgd")
    eng.step(a, torch.arange(3))
    eng.step(b, torch.arange(3, 8))
    with pytest.raises(RuntimeError, match="accumulation_steps=2"):
        eng.step(a, torch.arange(3))
    opt.step()
    w = torch.tensor([1 / 6] * 3 + [1 / 10] * 5, dtype=torch.float64)
    want = 0.1 * w * (orc.G @ orc.gval)
    assert rel_err(eng.last_values, want) < 1e-10
    with pytest.raises(ValueError, match="accumulation_steps"):
        ik.InRunShapley(model, opt, ce_loss, val, accumulation_steps=0)
    # the window size may change between optimizer steps (a shorter last window), not within one
    opt.zero_grad()
    eng.step(a, torch.arange(3))
    assert eng.micro_batches_pending == 1
    with pytest.raises(RuntimeError, match="change it after optimizer.step"):
        eng.accumulation_steps = 3
    eng.accumulation_steps = 2   # unchanged: fine
    eng.commit()
    assert eng.micro_batches_pending == 0
    eng.accumulation_steps = 1


def test_a_failing_micro_batch_restores_the_accumulated_grad():
    model = TokenMixer().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (7, 17), 4, seed=5), accumulation_steps=2)
    eng.step(make_data(3, (7, 17), 4, seed=1), torch.arange(3))
    after_first = [p.grad.clone() for p in model.parameters()]
    x, y = make_data(3, (7, 17), 4, seed=2)
    x[1] = float("nan")
    with pytest.raises(FloatingPointError):
        eng.step((x, y), torch.arange(3, 6))
    for p, g in zip(model.parameters(), after_first):
        assert torch.equal(p.grad, g)
    opt.step()   # commits the one micro-batch that is in
    assert eng.steps == 1 and int(eng.counts.sum()) == 3


def test_second_order_at_adams_first_step_falls_back_to_the_secant_with_a_warning():
    torch.manual_seed(0)
    model = TokenMixer().double()
    twin = copy.deepcopy(model)
    val, train = make_data(2, (7, 17), 4, seed=5), make_data(3, (7, 17), 4, seed=1)
    opt, opt2 = torch.optim.AdamW(model.parameters(), lr=1e-2), torch.optim.AdamW(twin.parameters(), lr=1e-2)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator="second")
    first = ik.InRunShapley(twin, opt2, ce_loss, val, estimator="first")
    eng.step(train, torch.arange(3))
    first.step(train, torch.arange(3))
    with pytest.warns(UserWarning, match="kink.*secant"):
        opt.step()
    opt2.step()
    # every coordinate moves at Adam's first step: second order is the first-order value there
    assert rel_err(eng.last_values, first.last_values) < 1e-12


def test_validation_rows_cost_once_per_optimizer_step():
    """SGD-type first order under accumulation: one validation pass per optimizer step (the
    "prefetched" route), not the validation rows joined to every micro-batch."""
    model = TokenMixer().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    val = make_data(5, (7, 17), 4, seed=5)
    rows = []

    def counting_loss(m, batch):
        rows.append(batch[0].shape[0])
        return ce_loss(m, batch)

    eng = ik.InRunShapley(model, opt, counting_loss, val, accumulation_steps=3, verify=False)
    for step in range(2):
        opt.zero_grad()
        for j, b in enumerate(_micro(10 * step)):
            eng.step(b, torch.arange(j * 4, j * 4 + SIZES[j]))
        opt.step()
    assert rows == [5, *SIZES] * 2, rows   # validation pass first, then the training rows only
    assert eng._route([p for p in model.parameters()]) == "prefetched"
