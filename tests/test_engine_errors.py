"""Engine error paths (issue 9): each is a clear error, and nothing changed afterwards."""
import pytest
import torch
from torch import nn

import inrun_kernels as ik
from tests.models import MLP, ce_loss, make_data


def _engine(estimator="first", opt_cls=torch.optim.SGD, **kw):
    model = MLP().double()
    opt = opt_cls(model.parameters(), lr=0.1)
    return model, opt, ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2),
                                       num_samples=10, estimator=estimator, **kw)


def _unchanged(model, eng):
    assert all(p.grad is None for p in model.parameters())
    assert eng.steps == 0 and eng.counts.sum() == 0 and eng._pending is None


def test_empty_batches_are_named():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        ik.InRunShapley(model, opt, ce_loss, make_data(0, (17,), 5))
    model, opt, eng = _engine()
    with pytest.raises(ValueError, match="training batch.*empty"):
        eng.step(make_data(0, (17,), 5), torch.arange(0))
    _unchanged(model, eng)


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_step_without_autograd_says_so(ctx):
    model, opt, eng = _engine()
    with ctx(), pytest.raises(RuntimeError, match="no_grad"):
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
    _unchanged(model, eng)


def test_unpatched_model_is_an_error_not_zero_values():
    model, opt, eng = _engine()
    ik.unpatch(model)
    with pytest.raises(RuntimeError, match="no longer patched"):
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
    _unchanged(model, eng)


def test_optimizer_holding_none_or_part_of_the_parameters():
    model = MLP().double()
    other = MLP().double()
    with pytest.raises(ValueError, match="holds none of the model's trainable parameters"):
        ik.InRunShapley(model, torch.optim.SGD(other.parameters(), lr=0.1), ce_loss, make_data(2, (17,), 5))
    with pytest.warns(UserWarning, match="does not update .*'head.weight'"):
        ik.InRunShapley(model, torch.optim.SGD(list(model.fc1.parameters()) + list(model.fc2.parameters()),
                                               lr=0.1), ce_loss, make_data(2, (17,), 5))


@pytest.mark.parametrize("estimator", ["first", "midpoint"])
def test_non_finite_losses_name_their_rows_and_change_nothing(estimator):
    model, opt, eng = _engine(estimator)
    x, y = make_data(4, (17,), 5, seed=1)
    x[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"training ids \[7\]"):
        eng.step((x, y), torch.tensor([3, 7, 5, 9]))
    _unchanged(model, eng)
    xv, yv = make_data(3, (17,), 5, seed=3)
    xv[2, 3] = float("nan")
    eng.val = (xv, yv)   # assigning is set_val: the row count follows
    with pytest.raises(FloatingPointError, match=r"validation rows \[2\]") as err:
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
        opt.step()   # midpoint: the validation pass runs at commit
    assert "training" not in str(err.value)
    assert eng.steps == 0 and eng.counts.sum() == 0


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom in backward")


def test_a_step_that_raises_leaves_every_grad_as_before():
    class Failing(MLP):
        def forward(self, x):
            return self.head(_FailingBackward.apply(torch.tanh(self.fc2(torch.tanh(self.fc1(x))))))

    model = Failing().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2))
    with pytest.raises(RuntimeError, match="boom"):
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))   # head's grad was accumulated first
    assert all(p.grad is None for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="boom"):
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


class _Mixing(MLP):
    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.head(torch.tanh(self.fc2(h - h.mean(0))))   # mixes the samples of the batch


def test_first_step_self_check_catches_sample_mixing_and_can_be_skipped():
    model = _Mixing().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2))
    with pytest.raises(ik.VerificationError, match="mix"):
        eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
    _unchanged(model, eng)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2), verify=False)
    eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))   # the user's call: no check
    opt.step()
    assert eng.steps == 1


def test_a_refused_engine_leaves_the_model_unpatched():
    from inrun_kernels.patch import is_patched
    model = MLP().double()
    for kw in ({"estimator": "bogus"}, {"update": "bogus"}):
        with pytest.raises(ValueError):
            ik.InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss,
                            make_data(2, (17,), 5), **kw)
    with pytest.raises(ValueError, match="empty"):
        ik.InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss, make_data(0, (17,), 5))
    with pytest.raises(ValueError, match="holds none"):
        ik.InRunShapley(model, torch.optim.SGD(MLP().parameters(), lr=0.1), ce_loss, make_data(2, (17,), 5))
    assert not is_patched(model) and type(model.fc1) is nn.Linear
