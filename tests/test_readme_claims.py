"""README claims that no other file guards (tests/README.md maps every claim to its test):
batch formats, pad_values=, the second-order estimator's error without a double backward,
one weight-gradient GEMM per layer in the engine's backward, SDPA attention under "second", and
the digits demo's output."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import inrun_kernels as ik
from tests.models import MLP, ce_loss, make_data
from tests.oracle import Oracle, rel_err

transformers = pytest.importorskip("transformers")


# ---- "A batch is a Tensor, a tuple/list of Tensors or a dict of Tensors (non-tensor entries are
# passed through); the first dim indexes samples."
class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(9, 4), nn.Linear(4, 9)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def recon_loss(model, x):          # a Tensor batch: the model reconstructs its input
    return (model(x) - x).square().mean(1)


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_every_batch_form(form):
    g = torch.Generator().manual_seed(0)
    xt, xv = torch.randn(5, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    model = AutoEncoder().double()
    want = Oracle(model, recon_loss, xt, xv).dot(per_val=True)
    wrap = {"tensor": lambda x: x, "tuple": lambda x: (x,), "list": lambda x: [x],
            "dict": lambda x: {"x": x, "note": "passed through"}}[form]
    unwrap = {"tensor": lambda b: b, "tuple": lambda b: b[0], "list": lambda b: b[0], "dict": lambda b: b["x"]}[form]

    def loss(m, b):
        if form == "dict":
            assert b["note"] == "passed through"
        return recon_loss(m, unwrap(b))

    assert rel_err(ik.grad_dot(model, loss, wrap(xt), wrap(xv), per_val=True), want) <= 1e-10
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, loss, wrap(xv))
    eng.step(wrap(xt), torch.arange(5))
    opt.step()
    assert rel_err(eng.last_values, 0.1 / (5 * 3) * want.sum(1)) <= 1e-10


# ---- "right-padded to a common length (input_ids with the model config's pad_token_id or
# pad_values=, attention_mask 0, labels -100); the values do not change"
def test_pad_values_pads_a_model_without_a_pad_id():
    from tests.test_hf_models import build, make_batch
    model = build("gpt2_tied").double()
    model.config.pad_token_id = None
    train, val = make_batch(4, T=9, seed=1), make_batch(3, T=6, seed=2)
    want = 0.1 / (4 * 3) * Oracle(model, ik.causal_lm_loss, train, val).dot()   # each at its length
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, val, pad_values={"input_ids": 0})
    eng.step(train, torch.arange(4))
    opt.step()
    assert rel_err(eng.last_values, want) <= 1e-10


# ---- "estimator='second' on a model with an op that has no double backward: an error suggesting
# midpoint (fused attention kernels are switched to PyTorch's math kernel for that pass)"
class CdistNet(nn.Module):
    """torch.cdist: its backward (_cdist_backward) has no derivative."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(17, 9), nn.Linear(6, 5)
        self.register_buffer("centers", torch.randn(6, 9, generator=torch.Generator().manual_seed(3)))

    def forward(self, x):
        return self.b(torch.cdist(torch.tanh(self.a(x)), self.centers))


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class OnceNet(nn.Module):
    """A custom Function marked once_differentiable (the usual way to say "no double backward")."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(17, 9), nn.Linear(9, 5)

    def forward(self, x):
        return self.b(_OnceDifferentiableTanh.apply(self.a(x)))


def _second_order_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val, train = make_data(2, (17,), 5, seed=1), make_data(4, (17,), 5, seed=2)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator="second", verify=False)
    eng.step(train, torch.arange(4))
    return eng, opt


def test_second_order_without_a_double_backward_is_an_error_suggesting_midpoint():
    eng, opt = _second_order_step(CdistNet().double())
    with pytest.raises(RuntimeError, match="double backward.*_cdist_backward.*estimator='midpoint'"):
        opt.step()
    assert eng.steps == 0


def test_second_order_through_a_once_differentiable_op_is_an_error():
    eng, opt = _second_order_step(OnceNet().double())
    with pytest.raises(RuntimeError, match=r"double backward \(autograd Functions marked "
                       r"@once_differentiable: \['_OnceDifferentiableTanh'\]\).*estimator='midpoint'"):
        opt.step()
    assert eng.steps == 0


def test_second_order_through_sdpa_attention_equals_eager():
    """An SDPA (fused kernel) model under estimator='second': the Hessian-vector pass runs on the
    math kernel; the values equal those of the same model in eager attention."""
    from tests.test_hf_models import build, make_batch
    out = []
    for attn in ("sdpa", "eager"):
        model = build("gpt2_tied").double()
        model.config._attn_implementation = attn
        train, val = make_batch(4, seed=1), make_batch(3, seed=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, val, estimator="second")
        eng.step(train, torch.arange(4))
        opt.step()
        out.append(eng.last_values)
    assert rel_err(out[0], out[1]) <= 1e-10


# ---- "each ghost layer's backward ... accumulates into .grad only the training rows' gradient
# ...: exactly one weight-gradient GEMM per layer"
class WeightShapedOutputs(TorchDispatchMode):
    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default) \
                and tuple(out.shape) in self.shapes:
            self.count += 1
        return out


def test_one_weight_gradient_gemm_per_layer(monkeypatch):
    monkeypatch.setenv("INRUN_ROUTE", "gram")    # the dense route forms G_val [p, d] too
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    model = MLP(d_in=17, hidden=33, classes=5).double()
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}
    assert len(shapes) == 3
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(3, (17,), 5, seed=1), verify=False)
    train = make_data(4, (17,), 5, seed=2)
    with WeightShapedOutputs(shapes) as gemms:
        eng.step(train, torch.arange(4))
    assert gemms.count == 3, gemms.count
    opt.step()


# ---- "Run the demo (finds flipped labels in scikit-learn's digits; prints AUROC and overhead)"
def test_digits_demo_prints_auroc_and_overhead():
    from inrun_kernels import demo
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        demo.main(["--epochs", "1", "--threads", "1"])
    text = buf.getvalue()
    assert "flipped-label detection AUROC" in text and "time per step" in text, text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("In-Run value"))
    assert float(line.split()[-1]) > 0.7, line     # measured 0.85 after one epoch
