"""InRunShapley (first order): training unchanged, values exact, Shapley properties, errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from tests.models import MLP, TokenMixer, ce_loss, make_data
from tests.oracle import Oracle, rel_err
from tests.test_estimators import StepOracle


def batches(steps, n, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 50, (n,), generator=g)
        yield (torch.randn(n, *shape, generator=g, dtype=torch.float64),
               torch.randint(0, classes, (n,), generator=g)), ids


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("model_cls,shape", [(MLP, (17,)), (TokenMixer, (13, 17))])
def test_training_with_the_engine_is_unchanged(opt_name, model_cls, shape):
    torch.manual_seed(0)
    plain = model_cls().double()
    ghost = copy.deepcopy(plain)

    def make_opt(m):
        if opt_name == "sgd":
            return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)

    opt_p, opt_g = make_opt(plain), make_opt(ghost)
    ref = copy.deepcopy(plain)                     # unpatched: the oracle's per-sample gradients
    val = make_data(3, shape, 4, seed=9)
    eng = ik.InRunShapley(ghost, opt_g, ce_loss, val, num_samples=50)
    want = torch.zeros(50, dtype=torch.float64)
    for batch, ids in batches(20, 6, shape, 4):
        opt_p.zero_grad()
        loss_p = ce_loss(plain, batch).mean()
        loss_p.backward()
        opt_p.step()
        opt_g.zero_grad()
        loss_g = eng.step(batch, ids)
        orc = StepOracle(ref, ghost, opt_g, ce_loss, batch, val)   # this step's state and lr
        opt_g.step()
        torch.testing.assert_close(loss_g, loss_p.detach(), rtol=1e-12, atol=1e-12)
        step_values = orc.values("first")
        assert rel_err(eng.last_values, step_values) <= 1e-10   # measured <= 4e-13
        want.index_add_(0, ids, step_values)
    for (name, p), q in zip(ghost.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    assert eng.counts.sum() == 20 * 6
    assert rel_err(eng.values, want) <= 1e-10     # the ledger sums the steps by id


def test_values_match_the_oracle_with_per_group_learning_rates():
    model = TokenMixer().double()
    opt = torch.optim.SGD([{"params": model.up.parameters(), "lr": 0.3},
                           {"params": list(model.down.parameters()) + list(model.head.parameters()),
                            "lr": 0.01}])
    train, val = make_data(5, (13, 17), 4, seed=1), make_data(3, (13, 17), 4, seed=2)
    orc = Oracle(model, ce_loss, train, val)
    lrs = {n: (0.3 if n.startswith("up.") else 0.01) for n, _ in model.named_parameters()}
    want = sum(lrs[n] / (5 * 3) * orc.dot(name=n) for n in lrs)
    eng = ik.InRunShapley(model, opt, ce_loss, val)
    eng.step(train, torch.tensor([4, 0, 2, 9, 1]))
    opt.step()   # values are committed by the optimizer step
    assert rel_err(eng.last_values, want) < 1e-10
    assert rel_err(eng.values[[4, 0, 2, 9, 1]], want) < 1e-10
    assert eng.values.shape == (10,) and eng.counts.tolist() == [1, 1, 1, 0, 1, 0, 0, 0, 0, 1]


def _val_loss(model, val):
    with torch.no_grad():
        return ce_loss(model, val).mean()


def test_efficiency_sum_of_values_is_the_predicted_and_real_drop():
    model = MLP().double()
    lr = 1e-4
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    train, val = make_data(8, (17,), 5, seed=3), make_data(4, (17,), 5, seed=4)
    eng = ik.InRunShapley(model, opt, ce_loss, val)
    before = _val_loss(model, val)
    # first-order predicted drop: lr * <mean train gradient, mean val gradient>
    g_val = torch.autograd.grad(ce_loss(model, val).mean(), list(model.parameters()))
    eng.step(train, torch.arange(8))
    predicted = lr * sum((p.grad * gv).sum() for p, gv in zip(model.parameters(), g_val))
    opt.step()
    real = before - _val_loss(model, val)
    total = eng.last_values.sum()
    assert rel_err(total, predicted) < 1e-10
    assert abs(float(total - real)) < 1e-3 * abs(float(real))


def test_identical_samples_equal_values_and_zero_gradient_sample_gets_zero():
    model = MLP(bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), val = make_data(5, (17,), 5, seed=5), make_data(3, (17,), 5, seed=6)
    x[3] = x[1]
    y[3] = y[1]
    x[4] = 0.0    # no bias: every layer input is 0, so every weight gradient is 0
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=10)
    eng.step((x, y), torch.tensor([0, 1, 2, 3, 4]))
    eng.commit()
    v = eng.last_values
    assert v[1] == v[3] and v[1] != 0
    assert v[4] == 0
    # duplicate ids both add
    opt.zero_grad()
    eng.step((x, y), torch.tensor([7, 7, 7, 7, 7]))
    eng.commit()
    assert torch.allclose(eng.values[7], eng.last_values.sum())
    assert eng.counts[7] == 5


def test_state_dict_round_trip(tmp_path):
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2)
    eng = ik.InRunShapley(model, opt, ce_loss, val)
    eng.step(train, [3, 1, 3, 0])
    opt.step()
    state = eng.state_dict()
    eng2 = ik.InRunShapley(model, opt, ce_loss, val)
    eng2.load_state_dict(state)
    assert torch.equal(eng2.values, eng.values) and torch.equal(eng2.counts, eng.counts)
    assert eng2.steps == 1
    eng.ledger.save(str(tmp_path / "v.pt"))
    led = ik.ValueLedger.load(str(tmp_path / "v.pt"))
    assert torch.equal(led.values, eng.values) and torch.equal(led.counts, eng.counts)


def test_bad_ids_are_clear_errors():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = make_data(4, (17,), 5), make_data(2, (17,), 5)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=10)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        eng.step(train, torch.arange(3))
    with pytest.raises(ValueError, match=">= 0"):
        eng.step(train, torch.tensor([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="< num_samples=10"):
        eng.step(train, torch.tensor([0, 1, 2, 10]))
    with pytest.raises(TypeError, match="integer"):
        eng.step(train, torch.tensor([0.0, 1, 2, 3]))
    assert eng.counts.sum() == 0 and eng.steps == 0


def test_non_finite_values_name_step_and_ids_and_add_nothing():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = make_data(4, (17,), 5), make_data(2, (17,), 5)
    poison = {"on": False}

    def loss(m, b):
        out = ce_loss(m, b)
        if poison["on"]:
            scale = torch.ones_like(out)
            scale[2] = float("inf")
            out = out * scale
        return out

    eng = ik.InRunShapley(model, opt, loss, val, num_samples=20)
    eng.step(train, torch.arange(4))
    opt.step()
    before = eng.values.clone()
    poison["on"] = True
    opt.zero_grad()
    with pytest.raises(FloatingPointError, match=r"step 1: .*ids \[12\]"):
        eng.step(train, torch.tensor([10, 11, 12, 13]))
    assert torch.equal(eng.values, before) and eng.counts.sum() == 4


def test_strict_false_keeps_uncovered_gradients_right():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.linspace(0.5, 1.5, 17, dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(0)
    plain = nn.Sequential(Scale(), MLP()).double()
    ghost = copy.deepcopy(plain)
    with pytest.warns(UserWarning):
        ik.patch(ghost, strict=False)
    train, val = make_data(5, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2)
    eng = ik.InRunShapley(ghost, torch.optim.SGD(ghost.parameters(), lr=0.1), ce_loss, val)
    eng.step(train, torch.arange(5))
    eng.commit()
    ce_loss(plain, train).mean().backward()
    for (n, p), q in zip(ghost.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
    # the values leave the uncovered parameter out, and say so through coverage
    orc = Oracle(plain, ce_loss, train, val)
    want = sum(0.1 / 10 * orc.dot(name=n) for n, _ in plain.named_parameters() if n != "0.s")
    assert rel_err(eng.last_values, want) < 1e-10


def test_a_gradient_left_from_before_the_step_is_an_error():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train, val = make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2)
    eng = ik.InRunShapley(model, opt, ce_loss, val)
    ce_loss(model, train).mean().backward()        # the user forgot zero_grad()
    with pytest.raises(RuntimeError, match=r"already holds a gradient.*zero_grad"):
        eng.step(train, torch.arange(4))
    opt.zero_grad(set_to_none=False)                # zero tensors are fine
    eng.step(train, torch.arange(4))
    opt.step()
    assert eng.steps == 1


@pytest.mark.parametrize("update,estimator", [("sgd", "first"), ("optimizer", "first"), ("optimizer", "midpoint")])
def test_non_reentrant_checkpointing_gives_the_same_values(update, estimator):
    from torch.utils.checkpoint import checkpoint

    class Ck(nn.Module):
        def __init__(self, ck):
            super().__init__()
            self.fc, self.head, self.ck = nn.Linear(9, 9), nn.Linear(9, 3), ck
            self.attn = nn.MultiheadAttention(9, 3, batch_first=True)

        def forward(self, x):
            def f(z):
                return torch.tanh(self.fc(z)) + self.attn(z, z, z, need_weights=False)[0]
            return self.head((checkpoint(f, x, use_reentrant=False) if self.ck else f(x)).mean(1))

    g = torch.Generator().manual_seed(1)
    tr = (torch.randn(4, 7, 9, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    va = (torch.randn(2, 7, 9, generator=g, dtype=torch.float64), torch.randint(0, 3, (2,), generator=g))
    out = []
    for ck in (False, True):
        torch.manual_seed(0)
        m = Ck(ck).double()
        opt = torch.optim.AdamW(m.parameters(), lr=0.01)
        eng = ik.InRunShapley(m, opt, ce_loss, va, num_samples=4, update=update, estimator=estimator)
        eng.step(tr, torch.arange(4))
        opt.step()
        out.append(eng.values)
    assert rel_err(out[1], out[0]) < 1e-12
