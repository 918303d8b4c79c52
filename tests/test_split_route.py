"""The split route inside the layers (issue 12): a linear-type layer's backward forms the
training rows' weight gradient and their dots with a dense V in one pass (ops.ghost_split_dot),
V the validation rows' summed gradient (first order, SGD-type update: the "joined" route) or the
prefetched V = slope (.) g_val (accumulation: the "prefetched" route). Checked through every
backend that has it (torch reference, C++, Triton in the interpreter) against the independent
float64 step oracle of tests/test_estimators.py, with .grad equal to plain training, on
Linear (2-D and 3-D inputs, bias and none), HF Conv1D and attention projections (GPT-2, tied
embedding / head: the tied weight keeps the Gram/dense products for its cross terms), and
that the route really ran (split primitive calls counted, no second weight-gradient GEMM).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import inrun_kernels as ik
from inrun_kernels.ops import dispatch
from tests.models import MLP, TokenMixer, ce_loss, make_data
from tests.oracle import rel_err
from tests.test_estimators import TOL, StepOracle


@pytest.fixture
def split_calls(monkeypatch):
    """{backend: split_dot calls} while the test runs."""
    calls: dict[str, int] = {}
    real = dispatch._impl

    def counting(primitive, tensors):
        if primitive == "split_dot":
            b = dispatch.resolve_backend(*tensors, primitive=primitive)
            calls[b] = calls.get(b, 0) + 1
        return real(primitive, tensors)
    monkeypatch.setattr(dispatch, "_impl", counting)
    return calls


def _plain_grads(model, train):
    m = copy.deepcopy(model)
    ik.unpatch(m)
    m.zero_grad()
    ce_loss(m, train).mean().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def _one_step(model, train, val, k=1, dtype=torch.float64):
    """One optimizer step of the engine (k micro-batches); returns (values, oracle values,
    max relative .grad error vs plain training of the same rows)."""
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator="first", accumulation_steps=k)
    n = next(iter(train.values())).shape[0] if isinstance(train, dict) else train[0].shape[0]
    parts = [slice(j * n // k, (j + 1) * n // k) for j in range(k)]
    for sl in parts:
        eng.step(tuple(t[sl] for t in train), torch.arange(n)[sl])
    want = _plain_grads(model, train)
    gerr = max(rel_err(p.grad, want[name]) for name, p in model.named_parameters())
    orc = StepOracle(ref, model, opt, ce_loss, train, val)
    opt.step()
    return eng.last_values, orc.values("first"), gerr


MODELS = {
    "mlp_2d": (lambda: MLP(d_in=11, hidden=13, classes=3), (11,), 3),
    "mixer_3d": (lambda: TokenMixer(), (7, 17), 4),
}


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("k", [1, 2])
def test_split_route_values_equal_the_oracle(backend, kind, k, monkeypatch, split_calls):
    monkeypatch.setenv("INRUN_BACKEND", backend)
    monkeypatch.setenv("INRUN_ROUTE", "split")
    build, shape, classes = MODELS[kind]
    torch.manual_seed(0)
    model = build().double()
    train, val = make_data(6, shape, classes, seed=1), make_data(3, shape, classes, seed=2)
    got, want, gerr = _one_step(model, train, val, k=k)
    assert rel_err(got, want) <= TOL["first"]
    assert gerr <= 1e-12
    assert split_calls.get(backend, 0) > 0 and set(split_calls) == {backend}, split_calls


def test_split_route_off_gives_the_same_values(monkeypatch, split_calls):
    """The same step with the route forced off (gram) and on (split): equal values, and the
    forced-off run never calls the split primitive (the counter can tell them apart)."""
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    out = {}
    for route in ("gram", "split"):
        monkeypatch.setenv("INRUN_ROUTE", route)
        split_calls.clear()
        torch.manual_seed(0)
        model = TokenMixer().double()
        out[route] = _one_step(model, make_data(5, (7, 17), 4, seed=1), make_data(2, (7, 17), 4, seed=2))[0]
        assert bool(split_calls) == (route == "split")
    assert rel_err(out["split"], out["gram"]) <= 1e-12


@pytest.mark.triton
def test_split_route_through_the_triton_kernel(monkeypatch, split_calls, triton_launches):
    """fp32 model through the Triton kernel (interpreter) vs the same step in float64 through
    the torch reference (which the tests above hold to the oracle): fp32 tolerance."""
    torch.manual_seed(0)
    model = TokenMixer()
    model64 = copy.deepcopy(model).double()
    train, val = make_data(4, (5, 17), 4, seed=1), make_data(2, (5, 17), 4, seed=2)
    monkeypatch.setenv("INRUN_ROUTE", "split")
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    want = _one_step(model64, train, val)[0]
    split_calls.clear()
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    f32 = lambda b: tuple(t.float() if t.is_floating_point() else t for t in b)  # noqa: E731
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = ik.InRunShapley(model, opt, ce_loss, f32(val), estimator="first")
    eng.step(f32(train), torch.arange(4))
    opt.step()
    assert rel_err(eng.last_values, want) <= 1e-4
    assert split_calls.get("triton", 0) > 0, split_calls
    assert any("split" in name for name in triton_launches), triton_launches


# ---- HF GPT-2: Conv1D, attention projections, a tied embedding / head ----------------------
def _lm_step(model, train, val, k):
    ref = copy.deepcopy(model).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, val, estimator="first", accumulation_steps=k)
    n = train["input_ids"].shape[0]
    for j in range(k):
        sl = slice(j * n // k, (j + 1) * n // k)
        eng.step({key: t[sl] for key, t in train.items()}, torch.arange(n)[sl])
    orc = StepOracle(ref, model, opt, ik.causal_lm_loss, train, val)
    opt.step()
    return rel_err(eng.last_values, orc.values("first"))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("k", [1, 2])
def test_split_route_on_gpt2_equals_the_oracle(backend, k, monkeypatch, split_calls):
    from tests.test_hf_models import build, make_batch
    monkeypatch.setenv("INRUN_BACKEND", backend)
    monkeypatch.setenv("INRUN_ROUTE", "split")
    model = build("gpt2_tied").double()
    err = _lm_step(model, make_batch(4, seed=1), make_batch(3, seed=2), k)
    assert err <= TOL["first"], err
    # every Conv1D (4 per block) takes it; the tied head only in the prefetched route (k > 1)
    assert split_calls.get(backend, 0) >= 8 * k, split_calls


class _WeightShapedMMs(TorchDispatchMode):
    """Counts matrix products whose output has a given weight shape."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(out.shape) == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("route,k,mms", [("dense", 1, 2), ("split", 1, 1), ("dense", 2, 1), ("split", 2, 0)])
def test_the_weight_gradient_gemm_is_replaced_not_repeated(route, k, mms, monkeypatch):
    """Products of the weight's shape [13, 11] in one micro-batch's pass. Joined step (k = 1):
    the dense route runs the weight-gradient GEMM and the validation rows' summed gradient (2),
    the split route only the latter (1). Prefetched step (k = 2, second micro-batch: V is
    known): the dense route runs the GEMM (1), the split route none (the C++ kernel forms the
    weight gradient)."""
    monkeypatch.setenv("INRUN_BACKEND", "cpp")
    monkeypatch.setenv("INRUN_ROUTE", route)
    torch.manual_seed(0)
    model = ik.patch(nn.Sequential(nn.Linear(11, 13), nn.Tanh(), nn.Linear(13, 3)).double())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(3, (11,), 3, seed=2), estimator="first",
                          accumulation_steps=k, verify=False)
    if k == 2:   # the first micro-batch runs the validation pass
        eng.step(make_data(4, (11,), 3, seed=1), torch.arange(4))
    with _WeightShapedMMs((13, 11)) as counter:
        eng.step(make_data(4, (11,), 3, seed=3), torch.arange(4, 8))
    assert counter.count == mms, counter.count


# ---- per-validation dots and the functional API (.grad left alone) -------------------------
def _loop_per_val(model, train, val):
    """[N, M] <g_i, g_v> from batch-size-1 loops over the unpatched model, in float64."""
    from tests.oracle import loop_grads
    m = copy.deepcopy(model)
    ik.unpatch(m)
    gt, gv = loop_grads(m, ce_loss, train), loop_grads(m, ce_loss, val)
    return sum(gt[n].flatten(1) @ gv[n].flatten(1).T for n in gt)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_per_val_dots_by_the_split_route(backend, kind, monkeypatch, split_calls):
    """ik.grad_dot(per_val=True): each layer's training rows dotted with each validation row's
    gradient inside one split pass (V [M, p, d]); [N, M] and its row sums vs the loop oracle,
    and .grad untouched (the functional API drops the weight gradient the route forms)."""
    monkeypatch.setenv("INRUN_BACKEND", backend)
    monkeypatch.setenv("INRUN_ROUTE", "split")
    build, shape, classes = MODELS[kind]
    torch.manual_seed(0)
    model = ik.patch(build().double())
    train, val = make_data(5, shape, classes, seed=1), make_data(3, shape, classes, seed=2)
    want = _loop_per_val(model, train, val)
    got = ik.grad_dot(model, ce_loss, train, val, per_val=True)
    assert got.shape == (5, 3)
    assert rel_err(got, want) <= 1e-10
    assert rel_err(ik.grad_dot(model, ce_loss, train, val), want.sum(1)) <= 1e-10
    assert all(p.grad is None for p in model.parameters())
    assert split_calls.get(backend, 0) > 0 and set(split_calls) == {backend}, split_calls


def test_per_val_split_respects_the_temp_budget(monkeypatch, split_calls):
    """auto route: M [p, d] validation gradients that exceed INRUN_TEMP_MB are not formed (the
    Gram / dense routes run instead) and the values do not change."""
    from inrun_kernels.ops.budget import temp_budget
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    torch.manual_seed(0)
    model = ik.patch(TokenMixer().double())
    train, val = make_data(4, (7, 17), 4, seed=1), make_data(3, (7, 17), 4, seed=2)
    want = _loop_per_val(model, train, val)
    with temp_budget(1e-5):
        got = ik.grad_dot(model, ce_loss, train, val, per_val=True)
    assert not split_calls
    assert rel_err(got, want) <= 1e-10


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_norms_by_the_split_route(backend, kind, monkeypatch, split_calls):
    """ik.grad_norms: ||g_i||^2 from the same tiles (ops.ghost_split_norms) vs the loop oracle,
    per parameter too; the bias fused or not (per_param keeps them apart)."""
    from tests.oracle import loop_grads
    monkeypatch.setenv("INRUN_BACKEND", backend)
    monkeypatch.setenv("INRUN_ROUTE", "split")
    from inrun_kernels import ops
    norm_calls = []
    real = ops.ghost_split_norms
    monkeypatch.setattr(ops, "ghost_split_norms", lambda *a, **k: (norm_calls.append(1), real(*a, **k))[1])
    build, shape, classes = MODELS[kind]
    torch.manual_seed(0)
    model = ik.patch(build().double())
    train = make_data(5, shape, classes, seed=1)
    m = copy.deepcopy(model)
    ik.unpatch(m)
    gt = loop_grads(m, ce_loss, train)
    want = sum(g.flatten(1).square().sum(1) for g in gt.values())
    assert rel_err(ik.grad_norms(model, ce_loss, train) ** 2, want) <= 1e-10
    norms, share = ik.grad_norms(model, ce_loss, train, per_param=True)
    assert rel_err(norms ** 2, want) <= 1e-10
    for name, g in gt.items():
        assert rel_err(share[name] ** 2, g.flatten(1).square().sum(1)) <= 1e-10, name
    assert norm_calls and all(p.grad is None for p in model.parameters())


@pytest.mark.triton
def test_per_val_and_norms_through_the_triton_kernel(monkeypatch, split_calls, triton_launches):
    """fp32 model, INRUN_BACKEND=triton (interpreter): per-validation dots and norms by the split
    route vs the float64 loop oracle, fp32 tolerance."""
    from tests.oracle import loop_grads
    monkeypatch.setenv("INRUN_ROUTE", "split")
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    torch.manual_seed(0)
    model = ik.patch(TokenMixer())
    train, val = make_data(4, (5, 17), 4, seed=1), make_data(2, (5, 17), 4, seed=2)
    f32 = lambda b: tuple(t.float() if t.is_floating_point() else t for t in b)  # noqa: E731
    want = _loop_per_val(copy.deepcopy(model).double(), train, val)
    assert rel_err(ik.grad_dot(model, ce_loss, f32(train), f32(val), per_val=True), want) <= 1e-4
    m = copy.deepcopy(model).double()
    ik.unpatch(m)
    want_n = sum(g.flatten(1).square().sum(1) for g in loop_grads(m, ce_loss, train).values())
    assert rel_err(ik.grad_norms(model, ce_loss, f32(train)) ** 2, want_n) <= 1e-4
    assert split_calls.get("triton", 0) > 0, split_calls
    assert any("split" in name for name in triton_launches), triton_launches


@pytest.mark.triton
def test_split_route_on_gpt2_through_the_triton_kernel(monkeypatch, split_calls, triton_launches):
    """fp32 GPT-2 (Conv1D, attention projections, tied head) through the Triton interpreter vs
    the same step in float64 through the torch reference (held to the oracle above): fp32
    tolerance; the Conv1D layers took the split route on the Triton kernel."""
    from tests.test_hf_models import build, make_batch
    monkeypatch.setenv("INRUN_ROUTE", "split")
    model = build("gpt2_tied")
    train, val = make_batch(3, seed=1), make_batch(2, seed=2)
    vals = {}
    for backend, m in (("torch", copy.deepcopy(model).double()), ("triton", model.float())):
        monkeypatch.setenv("INRUN_BACKEND", backend)
        split_calls.clear()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        eng = ik.InRunShapley(m, opt, ik.causal_lm_loss, val, estimator="first")
        eng.step(train, torch.arange(3))
        opt.step()
        vals[backend] = eng.last_values
    assert rel_err(vals["triton"], vals["torch"]) <= 1e-4
    assert split_calls.get("triton", 0) >= 8, split_calls
    assert any("split" in name for name in triton_launches), triton_launches
