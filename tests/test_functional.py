"""grad_dot / grad_gram / grad_norms against the batch-size-1 and torch.func oracles."""
import copy

import pytest
import torch

import inrun_kernels as ik
from tests.models import MLP, Tied, TokenMixer, ce_loss, make_data
from tests.oracle import Oracle, flat, func_grads, loop_grads, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-6}   # measured: 7e-16 / 2.5e-7


def setup_case(kind, bias, dtype, n=6, m=3):
    if kind == "mlp":
        model, shape, classes = MLP(bias=bias), (17,), 5
    elif kind == "tokens":
        model, shape, classes = TokenMixer(bias=bias), (13, 17), 4
    else:
        model, shape, classes = Tied(), (9,), 3
    model = model.to(dtype)
    train = make_data(n, shape, classes, dtype)
    val = make_data(m, shape, classes, dtype)
    return model, train, val


def test_oracles_agree():
    model, train, _ = setup_case("tokens", True, torch.float64)
    a, b = flat(loop_grads(model, ce_loss, train)), flat(func_grads(model, ce_loss, train))
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("kind,bias", [("mlp", True), ("mlp", False), ("tokens", True), ("tokens", False),
                                       ("tied", True)])   # the tied model always has biases
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("route", ["auto", "gram", "dense"])
def test_products_match_oracle(kind, bias, dtype, route, monkeypatch):
    monkeypatch.setenv("INRUN_ROUTE", route)
    model, train, val = setup_case(kind, bias, dtype)
    orc = Oracle(model, ce_loss, train, val, method="func" if kind == "tokens" else "loop")
    tol = TOL[dtype]
    dot = ik.grad_dot(model, ce_loss, train, val)
    assert dot.dtype == dtype and dot.shape == (6,)
    assert rel_err(dot, orc.dot()) < tol
    pv = ik.grad_dot(model, ce_loss, train, val, per_val=True)
    assert pv.shape == (6, 3)
    assert rel_err(pv, orc.dot(per_val=True)) < tol
    assert rel_err(pv.sum(1), dot) < tol
    assert rel_err(ik.grad_gram(model, ce_loss, train), orc.gram()) < tol
    assert rel_err(ik.grad_norms(model, ce_loss, train), orc.norms()) < tol


@pytest.mark.parametrize("kind", ["tokens", "tied"])
def test_per_parameter_shares(kind):
    model, train, val = setup_case(kind, True, torch.float64)
    orc = Oracle(model, ce_loss, train, val)
    total, shares = ik.grad_dot(model, ce_loss, train, val, per_param=True)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(shares) == sorted(names)
    for name in names:
        assert rel_err(shares[name], orc.dot(name=name)) < 1e-10, name
    _, gshares = ik.grad_gram(model, ce_loss, train, per_param=True)
    _, nshares = ik.grad_norms(model, ce_loss, train, per_param=True)
    for name in names:
        assert rel_err(gshares[name], orc.gram(name=name)) < 1e-10, name
        assert rel_err(nshares[name], orc.norms(name=name)) < 1e-10, name


def test_tiny_budget_chunks_give_same_result():
    model, train, val = setup_case("tokens", True, torch.float64)
    want = ik.grad_dot(model, ce_loss, train, val, per_val=True)
    with ik.temp_budget(0.002):
        got = ik.grad_dot(model, ce_loss, train, val, per_val=True)
    assert rel_err(got, want) < 1e-12


def test_grads_and_model_left_untouched():
    model, train, val = setup_case("mlp", True, torch.float64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = copy.deepcopy(model.state_dict())
    ik.grad_dot(model, ce_loss, train, val)
    ik.grad_gram(model, ce_loss, train)
    for p in model.parameters():
        assert torch.equal(p.grad, torch.full_like(p, 0.5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.fc1) is torch.nn.Linear   # patched for the call only


def test_frozen_parameters_are_left_out():
    model, train, val = setup_case("mlp", True, torch.float64)
    model.fc1.requires_grad_(False)
    orc = Oracle(model, ce_loss, train, val)
    assert rel_err(ik.grad_dot(model, ce_loss, train, val), orc.dot()) < 1e-10


def test_dict_batches_and_passthrough():
    model, (x, y), (xv, yv) = setup_case("mlp", True, torch.float64)

    def loss(model, batch):
        assert batch["note"] == "kept"
        return ce_loss(model, (batch["x"], batch["y"]))

    got = ik.grad_dot(model, loss, {"x": x, "y": y, "note": "kept"}, {"x": xv, "y": yv, "note": "kept"})
    assert rel_err(got, Oracle(model, ce_loss, (x, y), (xv, yv)).dot()) < 1e-10


def test_mismatched_shapes_are_clear_errors():
    model, (x, y), (xv, yv) = setup_case("tokens", True, torch.float64)
    with pytest.raises(ValueError, match=r"train\[0\] has shape \(6, 13, 17\) but val\[0\] has \(3, 12, 17\)"):
        ik.grad_dot(model, ce_loss, (x, y), (xv[:, :12], yv))
    with pytest.raises(ValueError, match="disagree on the number of samples"):
        ik.grad_dot(model, ce_loss, (x, y[:5]), (xv, yv))
    with pytest.raises(ValueError, match="different keys"):
        ik.grad_dot(model, lambda m, b: None, {"x": x}, {"z": xv})
    with pytest.raises(ValueError, match=r"per-sample losses of shape \[9\]"):
        ik.grad_dot(model, lambda m, b: ce_loss(m, b).mean(), (x, y), (xv, yv))
