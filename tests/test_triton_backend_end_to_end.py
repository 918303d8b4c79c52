"""The functional API, the engine and Hugging Face models THROUGH the Triton kernels
(INRUN_BACKEND=triton), against float64 oracles, with every test asserting that kernels were
launched (tests/conftest.py `triton_launches`).

Where it runs: here (CI) on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py); on a CUDA machine, with TRITON_INTERPRET=0 (benchmarks/gpu_check.sh), the same tests
run the compiled kernels on the GPU (DEVICE), bf16 autocast included. The float64 oracles always
run on the CPU. Tolerances: ~3x the error measured here under the interpreter (in the comments);
the GPU's fp32 kernels use tf32x3 (about fp32 accuracy), its bf16 ones bf16 x bf16 products
accumulated in fp32, which is what the interpreter's upcast computes."""
import copy

import pytest
import torch
from torch import nn

import inrun_kernels as ik
from inrun_kernels import ops
from tests.models import Tied, TokenMixer, ce_loss, make_data
from tests.oracle import Oracle, _cast, flat, loop_grads, rel_err
from tests.test_estimators import AttnNet, StepOracle

pytest.importorskip("triton")
from inrun_kernels.kernels import configs  # noqa: E402

transformers = pytest.importorskip("transformers")

GPU = torch.cuda.is_available() and not configs.interpreting()
DEVICE = torch.device("cuda" if GPU else "cpu")
if not GPU and not configs.interpreting():
    pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytestmark = pytest.mark.triton
FP32 = 2e-6   # fp32 through the kernels against float64: measured <= 4.1e-7 (see each test)


@pytest.fixture
def triton_backend(monkeypatch, triton_launches):
    monkeypatch.setenv("INRUN_BACKEND", "triton")
    yield triton_launches
    assert sum(triton_launches.values()) > 0, "no Triton kernel was launched"


def on(batch, device=DEVICE):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        return type(batch)(on(t, device) for t in batch)
    return {k: on(v, device) for k, v in batch.items()}


def test_auto_backend(monkeypatch, triton_launches):
    """auto: the compiled kernels for CUDA tensors; never the slow interpreter on CPU tensors."""
    monkeypatch.setenv("INRUN_BACKEND", "auto")
    model = TokenMixer().to(DEVICE)
    train, val = make_data(3, (5, 17), 4, torch.float32), make_data(2, (5, 17), 4, torch.float32)
    assert ops.resolve_backend(torch.zeros(1, device=DEVICE)) == ("triton" if GPU else "torch")
    ik.grad_dot(model, ce_loss, on(train), on(val))
    assert bool(triton_launches) == GPU, triton_launches


# ---- functional API (fp32) -------------------------------------------------------------------
class EmbNorm(nn.Module):
    """Embedding + LayerNorm + a Linear head: kernels for the Linear layers, the sparse and
    direct rules for the others, all in one model."""

    def __init__(self, V=23, d=12, classes=3):
        super().__init__()
        self.emb, self.ln = nn.Embedding(V, d), nn.LayerNorm(d)
        self.fc, self.head = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.ln(self.emb(ids)))).mean(1))


def _ids_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 23, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g)


MODELS = {
    "mixer": (TokenMixer, lambda n, s: make_data(n, (13, 17), 4, torch.float32, seed=s)),
    "tied": (Tied, lambda n, s: make_data(n, (9,), 3, torch.float32, seed=s)),
    "emb_norm": (EmbNorm, _ids_data),
    "mha": (AttnNet, lambda n, s: make_data(n, (7, 12), 3, torch.float32, seed=s)),
}


@pytest.mark.parametrize("route", ["gram", "dense"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_functional_api_through_triton(kind, route, monkeypatch, triton_backend):
    cls, data = MODELS[kind]
    torch.manual_seed(0)
    model = cls()
    train, val = data(5, 1), data(3, 2)
    orc = Oracle(model, ce_loss, train, val)            # float64, CPU, unpatched copy
    monkeypatch.setenv("INRUN_ROUTE", route)
    model = model.to(DEVICE)
    tr, va = on(train), on(val)
    dot, shares = ik.grad_dot(model, ce_loss, tr, va, per_param=True)
    got = {"dot": dot, "per_val": ik.grad_dot(model, ce_loss, tr, va, per_val=True),
           "gram": ik.grad_gram(model, ce_loss, tr), "norms": ik.grad_norms(model, ce_loss, tr)}
    want = {"dot": orc.dot(), "per_val": orc.dot(per_val=True), "gram": orc.gram(), "norms": orc.norms()}
    for key in got:   # fp32: measured <= 4.1e-7 (totals and shares, every model and route)
        assert got[key].dtype == torch.float32 and got[key].device.type == DEVICE.type
        assert rel_err(got[key].cpu(), want[key]) <= FP32, (key, rel_err(got[key].cpu(), want[key]))
    for name, share in shares.items():
        assert rel_err(share.cpu(), orc.dot(name=name)) <= FP32, name
    assert triton_backend.get("_ghost_gram_rows_kernel" if route == "gram" else "_ghost_dense_rows_kernel")


# ---- the engine (fp32), every step against a float64 shadow run ------------------------------
@pytest.mark.parametrize("opt_name,estimator", [("sgd_momentum", "first"), ("adamw", "first"),
                                                ("adamw", "midpoint"), ("sgd_momentum", "second")])
def test_engine_through_triton(opt_name, estimator, triton_backend):
    """fp32 model on DEVICE through the kernels; a float64 copy on the CPU trained by plain
    autograd on the same batches (the shadow) and the step oracle of tests/test_estimators.py at
    the shadow's state give each step's values."""
    make = {"sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}[opt_name]
    torch.manual_seed(0)
    shadow = TokenMixer().double()
    model = copy.deepcopy(shadow).float().to(DEVICE)
    ref = copy.deepcopy(shadow)
    opt, opt_s = make(model.parameters()), make(shadow.parameters())
    for m, o in ((model, opt), (shadow, opt_s)):   # plain steps first: past Adam's first steps,
        for s in range(3):                          # where the oracle's finite differences are poor
            o.zero_grad()
            b = make_data(4, (7, 17), 4, seed=60 + s)
            ce_loss(m, on(_f32(b)) if m is model else b).mean().backward()
            o.step()
    val = make_data(3, (7, 17), 4, seed=3)
    eng = ik.InRunShapley(model, opt, ce_loss, on(_f32(val)), num_samples=12, estimator=estimator)
    for step in range(3):
        batch = make_data(4, (7, 17), 4, seed=10 + step)
        with torch.no_grad():   # the fp32 run follows the shadow's weights (no fp32 drift)
            for p, q in zip(model.parameters(), shadow.parameters()):
                p.copy_(q)
        opt.zero_grad()
        eng.step(on(_f32(batch)), torch.arange(4) + 4 * step)
        opt_s.zero_grad()
        ce_loss(shadow, batch).mean().backward()
        orc = StepOracle(ref, shadow, opt_s, ce_loss, batch, val)
        want = orc.values(estimator)
        for p, q in zip(model.parameters(), shadow.parameters()):   # .grad: the mean training gradient
            assert rel_err(p.grad.cpu(), q.grad) <= FP32                  # measured <= 2.9e-7
        opt.step()
        opt_s.step()
        err = rel_err(eng.last_values.cpu(), want)
        assert err <= FP32, (step, err)                                   # measured <= 2.9e-7


def _f32(batch):
    return tuple(t.float() if t.is_floating_point() else t for t in batch)


# ---- Hugging Face models under bf16 autocast --------------------------------------------------
# Against the float64 oracle the bf16 forward dominates (measured under the interpreter, worst
# relative error of the total / a parameter's share / norms / values: gpt2_tied 1.4e-2 / 1.9e-2 /
# 7.3e-4 / 1.4e-2, llama 4.0e-3 / 2.2e-2 / 1.1e-3 / 4.0e-3, gpt2_cls 3.0e-3 / 2.3e-2 / 1.6e-3 /
# 3.0e-3): tolerances 2.5x that. Against the torch backend on the same device under the same
# autocast (the same bf16 reps, products accumulated in fp32 by both): measured <= 3.5e-7.
# (Before products ran with autocast off, the torch backend's bf16 matmuls made that 7.5e-3.)
HF_TOL = {"gpt2_tied": dict(dot=3.5e-2, share=5e-2, norms=2e-3, values=3.5e-2),
          "llama": dict(dot=1e-2, share=5.5e-2, norms=3e-3, values=1e-2),
          "gpt2_cls": dict(dot=8e-3, share=6e-2, norms=4e-3, values=8e-3)}
SAME_REPS = 2e-6


def _hf_run(model, loss_fn, tr, va):
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        dot, shares = ik.grad_dot(model, loss_fn, tr, va, per_param=True)
        norms = ik.grad_norms(model, loss_fn, tr)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    eng = ik.InRunShapley(m, opt, loss_fn, va)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        eng.step(tr, torch.arange(4))
    opt.step()
    return dict(dot=dot.cpu(), norms=norms.cpu(), values=eng.last_values.cpu(),
                **{f"share:{n}": v.cpu() for n, v in shares.items()})


@pytest.mark.parametrize("kind", list(HF_TOL))
def test_hf_models_under_bf16_autocast_through_triton(kind, monkeypatch, triton_backend):
    from tests.test_hf_models import build, loss_for, make_batch
    loss_fn = loss_for(kind)
    cls = kind == "gpt2_cls"
    train, val = make_batch(4, seed=1, cls=cls), make_batch(3, seed=2, cls=cls)
    model = build(kind)
    ref = copy.deepcopy(model).double()
    gt, gv = loop_grads(ref, loss_fn, _cast(train)), loop_grads(ref, loss_fn, _cast(val))
    want = {"dot": flat(gt) @ flat(gv).sum(0), "norms": flat(gt).norm(dim=1)}
    want["values"] = 0.1 / (4 * 3) * want["dot"]
    want.update({f"share:{n}": gt[n].flatten(1) @ gv[n].flatten(1).sum(0) for n in gt})
    model = model.to(DEVICE)
    got = _hf_run(model, loss_fn, on(train), on(val))
    tol = HF_TOL[kind]
    for key, w in want.items():
        err = rel_err(got[key], w)
        assert err <= tol[key.split(":")[0]], (key, err)
    launched = sum(triton_backend.values())
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    same = _hf_run(model, loss_fn, on(train), on(val))
    assert sum(triton_backend.values()) == launched      # the torch run launched nothing
    for key in want:
        assert rel_err(got[key], same[key]) <= SAME_REPS, (key, rel_err(got[key], same[key]))
