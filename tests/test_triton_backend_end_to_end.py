"""The functional API and the engine through the Triton kernels (interpreter, CPU tensors)
equal the torch backend; `auto` never picks the slow interpreter."""
import copy

import pytest
import torch

import inrun_kernels as ik
from inrun_kernels import ops
from tests.models import Tied, TokenMixer, ce_loss, make_data
from tests.oracle import rel_err

pytest.importorskip("triton")
from inrun_kernels.kernels import ghost_dot, ghost_gram  # noqa: E402


@pytest.fixture
def launches(monkeypatch):
    calls = {}
    for mod, name in ((ghost_dot, "dot_gram"), (ghost_dot, "dot_dense"), (ghost_gram, "gram"),
                      (ghost_gram, "norms_sq")):
        real = getattr(mod, name)

        def wrapper(*a, _real=real, _name=name, **k):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, wrapper)
    return calls


def test_auto_does_not_pick_the_interpreter(monkeypatch, launches):
    monkeypatch.setenv("INRUN_BACKEND", "auto")
    assert ops.resolve_backend(torch.zeros(1)) == "torch"
    model = TokenMixer()
    ik.grad_dot(model, ce_loss, make_data(3, (5, 17), 4, torch.float32), make_data(2, (5, 17), 4, torch.float32))
    assert launches == {}


@pytest.mark.parametrize("model_cls,shape", [(TokenMixer, (13, 17)), (Tied, (9,))])
def test_functional_api_through_triton(model_cls, shape, monkeypatch, launches):
    model = model_cls()
    train, val = make_data(5, shape, 3, torch.float32, seed=1), make_data(3, shape, 3, torch.float32, seed=2)
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    want = [ik.grad_dot(model, ce_loss, train, val), ik.grad_dot(model, ce_loss, train, val, per_val=True),
            ik.grad_gram(model, ce_loss, train), ik.grad_norms(model, ce_loss, train)]
    assert launches == {}
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    for route in ("gram", "dense"):
        monkeypatch.setenv("INRUN_ROUTE", route)
        got = [ik.grad_dot(model, ce_loss, train, val), ik.grad_dot(model, ce_loss, train, val, per_val=True),
               ik.grad_gram(model, ce_loss, train), ik.grad_norms(model, ce_loss, train)]
        for g, w in zip(got, want):
            assert g.dtype == torch.float32 and rel_err(g, w) < 1e-4
    assert launches.get("dot_gram") and launches.get("dot_dense") and launches.get("gram")
    assert launches.get("norms_sq")


def test_engine_through_triton(monkeypatch, launches):
    torch.manual_seed(0)
    model = TokenMixer()
    other = copy.deepcopy(model)
    val = make_data(2, (7, 17), 4, torch.float32, seed=3)
    runs = []
    for backend, m in (("torch", model), ("triton", other)):
        monkeypatch.setenv("INRUN_BACKEND", backend)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        eng = ik.InRunShapley(m, opt, ce_loss, val, num_samples=12)
        for step in range(3):
            batch = make_data(4, (7, 17), 4, torch.float32, seed=10 + step)
            opt.zero_grad()
            eng.step(batch, torch.arange(4) + 4 * step)
            opt.step()
        runs.append(eng.values)
    assert launches.get("dot_gram", 0) + launches.get("dot_dense", 0) >= 3
    assert rel_err(runs[1], runs[0]) < 1e-4
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
