"""GhostLinear and patch/unpatch."""
import copy
import warnings

import pytest
import torch
from torch import nn

import inrun_kernels as ik
from inrun_kernels.session import ghost_session
from tests.models import MLP, TokenMixer, ce_loss, make_data


@pytest.mark.parametrize("shape", [(7, 17), (5, 13, 17), (2, 3, 4, 17)])
@pytest.mark.parametrize("bias", [True, False])
def test_ghost_linear_is_linear_outside_a_session(shape, bias):
    lin = nn.Linear(17, 33, bias=bias)
    ghost = ik.patch(copy.deepcopy(lin))
    assert isinstance(ghost, ik.GhostLinear) and isinstance(ghost, nn.Linear)
    x = torch.randn(shape, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = lin(x), ghost(x2)
    assert torch.equal(y, y2)
    gy = torch.randn_like(y)
    y.backward(gy)
    y2.backward(gy)
    assert torch.equal(x.grad, x2.grad)
    for p, q in zip(lin.parameters(), ghost.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("model_cls,shape", [(MLP, (17,)), (TokenMixer, (13, 17))])
def test_in_a_session_grad_is_the_train_only_gradient(model_cls, shape):
    model = model_cls().double()
    ref = copy.deepcopy(model)
    ik.patch(model)
    train, val = make_data(5, shape, 4, seed=1), make_data(3, shape, 4, seed=2)
    for p, q in zip(model.parameters(), ref.parameters()):   # accumulate onto existing grads
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    x = torch.cat([train[0], val[0]])
    y = torch.cat([train[1], val[1]])
    with ghost_session(5, 3, dot=True, grad_scale=1 / 5) as sess:
        ce_loss(model, (x, y)).sum().backward()
    ce_loss(ref, train).mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)
    assert sess.dot is not None and sess.dot.shape == (5,)


def test_patch_keeps_parameters_names_and_state_dict():
    model = TokenMixer()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ik.patch(model) is model
    assert all(type(m) is ik.GhostLinear for m in (model.up, model.down, model.head))
    assert {n: p for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    assert opt.param_groups[0]["params"][0] is model.up.weight
    ik.unpatch(model)
    assert all(type(m) is nn.Linear for m in (model.up, model.down, model.head))
    assert {n: p for n, p in model.named_parameters()} == params


def test_unsupported_trainable_module_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(1, 1, 3), nn.Linear(2, 2))
    with pytest.raises(ik.UnsupportedModuleError, match=r"'1' \(Conv3d\).*1\.weight, 1\.bias"):
        ik.patch(model, fallback=False)   # (the default covers it by the per-sample fallback)
    assert type(model[0]) is nn.Linear   # nothing half-patched


def test_strict_false_warns_and_reports_coverage():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.s

    model = nn.Sequential(nn.Linear(4, 4), Scale())
    with pytest.warns(UserWarning, match=r"'1' \(Scale\)"):
        ik.patch(model, strict=False)
    cov = ik.coverage(model)
    assert cov.uncovered == ["1.s"] and cov.covered == ["0.weight", "0.bias"]
    assert not cov.complete and "1.s" in str(cov)


def test_frozen_unsupported_module_is_fine():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv3d(1, 1, 3).requires_grad_(False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ik.patch(model)
    assert ik.coverage(model).complete


def test_subclass_with_its_own_forward_is_not_covered():
    """Not a scaled rearrangement of the parent's output: the probe refuses it (a scaled one,
    super().forward(x) * 2, is native: tests/test_subclass_matchers.py)."""
    class Odd(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1

    with pytest.raises(ik.UnsupportedModuleError, match="Odd"):
        ik.patch(nn.Sequential(Odd(3, 3)), fallback=False)
    model = nn.Sequential(Odd(3, 3))
    ik.patch(model)   # by default: the exact per-sample fallback
    assert list(ik.coverage(model).fallback) == ["0"]


def test_batchnorm_in_training_mode_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False))
    with pytest.raises(ik.BatchCouplingError, match=r"'1' \(BatchNorm1d\).*couples"):
        ik.patch(model)
    model.eval()
    ik.patch(model)
    model.train()
    x = torch.randn(5, 4)
    with pytest.raises(ik.BatchCouplingError):
        ik.grad_dot(model, lambda m, b: m(b).sum(1), x[:3], x[3:])


def test_wrong_batch_dimension_is_named():
    lin = ik.patch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"Linear: batch dimension has 7 rows.*3 training \+ 2 validation"):
        ik.grad_dot(lin, lambda m, b: m(b.reshape(7, -1, 4)).sum((1, 2))[:5], torch.randn(3, 7, 4),
                    torch.randn(2, 7, 4))
