"""Gradient-path guard: a covered parameter reached by an op outside the ghost layers is an
error before any gradient is computed (nothing changed), for the engine and the functional API."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.guard import GradientPathError
from tests.models import MLP, ce_loss, make_data
from tests.oracle import Oracle, rel_err


class HandTiedHead(nn.Module):
    """A hand-written GPT-style tied head: logits = h @ emb.weight.T (not through a module)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        h = torch.tanh(self.lin(self.emb(x)))
        return (h @ self.emb.weight.T).mean(1)


class FunctionalUse(nn.Module):
    """A covered Linear whose weight is also used functionally elsewhere in forward."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(17, 17)
        self.head = nn.Linear(17, 5)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + F.linear(x, self.a.weight)   # second use bypasses GhostLinear
        return self.head(h)


class WeightScaledOutput(nn.Module):
    """A parameter term inside forward (a weight-norm-like rescale of the output)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(17, 5)

    def forward(self, x):
        return self.a(x) / self.a.weight.norm()


def l2_loss(model, batch):
    return ce_loss(model, batch) + 1e-2 * model.fc1.weight.pow(2).sum()


def _tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 5), generator=g), torch.randint(0, 11, (n,), generator=g)


CASES = {
    "hand_tied_head": (HandTiedHead, ce_loss, lambda n, s: _tokens(n, s), "'emb.weight'"),
    "l2_penalty_in_loss": (MLP, l2_loss, lambda n, s: make_data(n, (17,), 5, seed=s), "'fc1.weight'"),
    "functional_use": (FunctionalUse, ce_loss, lambda n, s: make_data(n, (17,), 5, seed=s), "'a.weight'"),
    "param_in_forward_term": (WeightScaledOutput, ce_loss, lambda n, s: make_data(n, (17,), 5, seed=s),
                              "'a.weight'"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("estimator", ["first", "midpoint"])
def test_engine_refuses_foreign_paths_and_changes_nothing(case, estimator):
    cls, loss_fn, data, name = CASES[case]
    model = cls().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = ik.InRunShapley(model, opt, loss_fn, data(2, 2), num_samples=8, estimator=estimator)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(GradientPathError, match=name) as err:
        eng.step(data(4, 1), torch.arange(4))
    assert "outside the ghost layers" in str(err.value)
    assert all(p.grad is None for p in model.parameters())
    assert eng.steps == 0 and eng.counts.sum() == 0 and eng.last_values is None
    opt.step()   # nothing pending: the optimizer step is a no-op on None grads
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("case", list(CASES))
def test_functional_api_refuses_foreign_paths(case):
    cls, loss_fn, data, name = CASES[case]
    model = cls().double()
    grads = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    with pytest.raises(GradientPathError, match=name):
        ik.grad_dot(model, loss_fn, data(4, 1), data(2, 2))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


def test_parameter_shared_by_an_uncovered_module_and_a_ghost_layer_is_an_error():
    class Scale(nn.Module):   # no ghost rule: uncovered under strict=False
        def __init__(self, w):
            super().__init__()
            self.w = w

        def forward(self, x):
            return x * self.w.sum(0)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(17, 17)
            self.scale = Scale(self.a.weight)
            self.head = nn.Linear(17, 5)

        def forward(self, x):
            return self.head(torch.tanh(self.a(self.scale(x))))

    model = Shared().double()
    with pytest.warns(UserWarning):
        ik.patch(model, strict=False)
    with pytest.raises(GradientPathError, match="'a.weight' is used by a ghost layer and by an uncovered"):
        ik.grad_dot(model, ce_loss, make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2))


def test_ordinary_models_pass_the_guard_at_negligible_cost():
    """Tied modules (a Linear sharing an Embedding's weight) are ghost uses, not foreign paths."""
    class ModuleTied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6)
            self.head = nn.Linear(6, 11, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.tanh(self.emb(x))).mean(1)

    model = ModuleTied().double()
    want = 0.1 / (4 * 2) * Oracle(model, ce_loss, _tokens(4, 1), _tokens(2, 2)).dot()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, _tokens(2, 2))
    eng.step(_tokens(4, 1), torch.arange(4))
    opt.step()
    assert eng.steps == 1 and rel_err(eng.last_values, want) <= 1e-10
