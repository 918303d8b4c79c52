"""Mixed precision: the functional API and the engine under torch.autocast (bf16 and fp16 on CPU
here; the same code path as CUDA autocast) against a float64 oracle of the same float32 model
on the same inputs (batch-size-1 loop, no autocast).

Tolerances are ~2-2.5x the error measured here (the table below: max over parameters of the
relative error of a parameter's share, 2-norm over the batch), so that a 1-2% error in any one
parameter's per-sample gradient (a bias, say) fails at least the fp16 checks, and the larger
ones the bf16 checks too."""
import copy

import pytest
import torch

import inrun_kernels as ik
from tests.models import TokenMixer, ce_loss, make_data
from tests.oracle import _cast, flat, loop_grads, rel_err

transformers = pytest.importorskip("transformers")

BF16, FP16 = torch.bfloat16, torch.float16

# (model, dtype) -> {check: (measured, tolerance)}
#   dot: grad_dot total (fused weight+bias route); norms: grad_norms;
#   weight / bias: the worst parameter's share of grad_dot(per_param=True) (unfused route);
#   grad: the worst parameter's engine .grad against the float64 mean gradient;
#   values: the engine's first-order values (SGD).
TOL = {
    ("gpt2", BF16): dict(dot=(2.1e-3, 5e-3), norms=(5.4e-4, 1.2e-3), weight=(1.2e-2, 2.5e-2),
                         bias=(7.8e-3, 1.6e-2), grad=(6.5e-3, 1.5e-2), values=(2.1e-3, 5e-3)),
    ("mixer", BF16): dict(dot=(1.5e-3, 3.5e-3), norms=(1.2e-3, 3e-3), weight=(4.8e-3, 1.1e-2),
                          bias=(3.8e-3, 9e-3), grad=(1.1e-2, 2.5e-2), values=(1.5e-3, 3.5e-3)),
    ("gpt2", FP16): dict(dot=(3.6e-4, 8e-4), norms=(7.1e-5, 1.6e-4), weight=(1.2e-3, 2.5e-3),
                         bias=(8.6e-4, 2e-3), grad=(9.9e-4, 2.5e-3), values=(3.6e-4, 8e-4)),
    ("mixer", FP16): dict(dot=(1.3e-4, 3e-4), norms=(1.7e-4, 4e-4), weight=(5.7e-4, 1.3e-3),
                          bias=(3.0e-4, 7e-4), grad=(1.2e-3, 3e-3), values=(1.3e-4, 3e-4)),
}


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=1, eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (n, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def case(kind):
    if kind == "gpt2":
        return tiny_gpt2(), ik.causal_lm_loss, batch(5, 2), batch(3, 1)
    torch.manual_seed(0)
    return (TokenMixer(), ce_loss, make_data(5, (7, 17), 4, torch.float32, seed=1),
            make_data(3, (7, 17), 4, torch.float32, seed=2))


_ORACLE: dict = {}


def oracle(kind):
    """float64 per-sample gradients {name: [B, ...]} of train and val, no autocast."""
    if kind not in _ORACLE:
        model, loss_fn, train, val = case(kind)
        ref = copy.deepcopy(model).double()
        _ORACLE[kind] = (loop_grads(ref, loss_fn, _cast(train)), loop_grads(ref, loss_fn, _cast(val)))
    return _ORACLE[kind]


def _dot(gt, gv, name=None):
    if name is None:
        return flat(gt) @ flat(gv).sum(0)
    return gt[name].flatten(1) @ gv[name].flatten(1).sum(0)


def _check(what, err, tol):
    measured, limit = tol
    assert err <= limit, f"{what}: error {err:.2e} > {limit:.1e} (measured {measured:.1e})"


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gpt2", "mixer"])
def test_products_under_autocast_match_the_float64_oracle(kind, dtype):
    model, loss_fn, train, val = case(kind)
    gt, gv = oracle(kind)
    tol = TOL[kind, dtype]
    with torch.autocast("cpu", dtype=dtype):
        dot = ik.grad_dot(model, loss_fn, train, val)
        total, shares = ik.grad_dot(model, loss_fn, train, val, per_param=True)
        norms = ik.grad_norms(model, loss_fn, train)
    assert dot.dtype == torch.float32
    _check("dot", rel_err(dot, _dot(gt, gv)), tol["dot"])
    _check("per_param total", rel_err(total, _dot(gt, gv)), tol["dot"])
    _check("norms", rel_err(norms, flat(gt).norm(dim=1)), tol["norms"])
    assert sorted(shares) == sorted(gt)
    for name, share in shares.items():
        kind_ = "bias" if name.endswith("bias") else "weight"
        _check(f"share of {name}", rel_err(share, _dot(gt, gv, name)), tol[kind_])


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["gpt2", "mixer"])
def test_engine_under_autocast_trains_like_float64_and_values_match(kind, dtype):
    model, loss_fn, train, val = case(kind)
    gt, gv = oracle(kind)
    tol = TOL[kind, dtype]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, loss_fn, val)
    with torch.autocast("cpu", dtype=dtype):
        eng.step(train, torch.arange(5))
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, n
        _check(f".grad of {n}", rel_err(p.grad, gt[n].mean(0)), tol["grad"])
    opt.step()
    _check("values", rel_err(eng.last_values, 0.1 / (5 * 3) * _dot(gt, gv)), tol["values"])


@pytest.mark.parametrize("dtype", [BF16, FP16], ids=["bf16", "fp16"])
def test_products_of_reps_do_not_follow_the_callers_autocast(dtype):
    """The reps hold what autocast made of the activations (bf16 / fp16); their products
    accumulate in fp32 whether the caller's autocast is on or not (they used to run as bf16 /
    fp16 matmuls there: 2e-3 relative lost on the torch backend, 7e-3 on a parameter's share,
    while the Triton kernels accumulated in fp32)."""
    from inrun_kernels import products
    from inrun_kernels.reps import Direct, Outer
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    tr, va = Outer(r(4, 9, 32), r(4, 9, 48), bias=True), Outer(r(3, 9, 32), r(3, 9, 48), bias=True)
    dtr, dva = Direct(r(4, 40)), Direct(r(3, 40))
    V, vb = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    calls = {"dot": lambda: products.dot(tr, va, per_val=True), "gram": lambda: products.gram(tr),
             "norms": lambda: products.norms_sq(tr), "direct": lambda: products.dot(dtr, dva, per_val=False),
             "dense": lambda: products.dense_dot(tr, V, vb)}
    for name, fn in calls.items():
        want = fn()
        assert want.dtype == torch.float32, name
        with torch.autocast("cpu", dtype=dtype):
            got = fn()
        assert torch.equal(got, want), (name, rel_err(got, want))
