"""Embedding (Rows reps, padding_idx, tied weights), LayerNorm / RMSNorm (torch and HF-style),
and transformers' Conv1D, each alone, against a float64 batch-size-1 oracle on the ORIGINAL
module: dot, per_val dot, Gram, norms; odd and power-of-2 sizes; >= 2 validation points."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers.registry import GhostModule

RTOL = {torch.float64: 1e-10, torch.float32: 1e-6}   # measured: 1e-15 / 1.5e-7


# ---- oracle ------------------------------------------------------------------------------------
def _take(batch, i):
    return tuple(t[i:i + 1] for t in batch)


def per_sample_grads(model, loss_fn, batch):
    """[B, P] flattened per-sample gradients of the unpatched model (tied parameters once)."""
    assert not any(isinstance(m, GhostModule) for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(batch[0].shape[0]):
        loss = loss_fn(model, _take(batch, i))[0]
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double()
                               for g, p in zip(gs, params)]))
    return torch.stack(rows)


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


def check_all(model, loss_fn, train, val, dtype=torch.float64):
    ref_model = copy.deepcopy(model).double()
    to64 = lambda b: tuple(t.double() if t.is_floating_point() else t for t in b)  # noqa: E731
    Gt = per_sample_grads(ref_model, loss_fn, to64(train))
    Gv = per_sample_grads(ref_model, loss_fn, to64(val))
    tol = RTOL[dtype]
    errs = {
        "dot": rel_err(ik.grad_dot(model, loss_fn, train, val), Gt @ Gv.sum(0)),
        "per_val": rel_err(ik.grad_dot(model, loss_fn, train, val, per_val=True), Gt @ Gv.T),
        "gram": rel_err(ik.grad_gram(model, loss_fn, train), Gt @ Gt.T),
        "norms": rel_err(ik.grad_norms(model, loss_fn, train), Gt.norm(dim=1)),
    }
    assert max(errs.values()) <= tol, errs
    assert not any(isinstance(m, GhostModule) for m in model.modules())   # restored after calls
    return errs


def out_loss(model, batch):
    """A per-sample loss that is not linear in the output: sum(tanh(y) * target) + 0.1 sum(y^2)."""
    x, target = batch
    y = model(x)
    return (torch.tanh(y) * target).flatten(1).sum(1) + 0.1 * y.square().flatten(1).sum(1)


# ---- embedding ---------------------------------------------------------------------------------
def _ids(n, T, V, pad=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n,) + ((T,) if T else ()), generator=g)
    if pad is not None and T:
        ids[::2, -2:] = pad % V    # some padding tokens, and repeats of ids inside one sample
    return ids


@pytest.mark.parametrize("V,d,T,pad", [(16, 8, 4, None), (97, 17, 7, 3), (13, 5, 0, None), (11, 6, 9, -1)])
def test_embedding(V, d, T, pad):
    emb = nn.Embedding(V, d, padding_idx=pad).double()
    N, M = 5, 3
    shape = (T, d) if T else (d,)
    train = (_ids(N, T, V, pad, 1), torch.randn(N, *shape, dtype=torch.float64))
    val = (_ids(M, T, V, pad, 2), torch.randn(M, *shape, dtype=torch.float64))
    check_all(emb, out_loss, train, val)
    with ik.temp_budget(1e-4):    # chunked sparse tables
        check_all(emb, out_loss, train, val)


def test_embedding_float32():
    emb = nn.Embedding(31, 12)
    train = (_ids(4, 6, 31, seed=1), torch.randn(4, 6, 12))
    val = (_ids(2, 6, 31, seed=2), torch.randn(2, 6, 12))
    check_all(emb, out_loss, train, val, dtype=torch.float32)


def test_embedding_weight_grad_train_only():
    """The engine's train-only gradient: equals the mean training loss's gradient."""
    emb = nn.Embedding(23, 7, padding_idx=0).double()
    train = (_ids(4, 5, 23, 0, 1), torch.randn(4, 5, 7, dtype=torch.float64))
    val = (_ids(3, 5, 23, 0, 2), torch.randn(3, 5, 7, dtype=torch.float64))
    ref = copy.deepcopy(emb)
    out_loss(ref, train).mean().backward()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    eng = ik.InRunShapley(emb, opt, out_loss, val)
    eng.step(train, torch.arange(4))
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", [{"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}],
                         ids=["max_norm", "scale_grad_by_freq", "sparse"])
def test_embedding_unsupported_options(kw):
    """README "Not covered": an error naming the module and the option, in the functional API
    and in the engine (nothing recorded, no .grad)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4, **kw)
            self.head = nn.Linear(4, 4)

        def forward(self, ids):
            return self.head(self.tok(ids))

    model = Net().double()
    train = (_ids(2, 3, 10, seed=1), torch.randn(2, 3, 4, dtype=torch.float64))
    val = (_ids(2, 3, 10, seed=2), torch.randn(2, 3, 4, dtype=torch.float64))
    match = f"'tok'.*{next(iter(kw))}"
    with pytest.raises(NotImplementedError, match=match):
        ik.grad_norms(model, out_loss, train)
    with pytest.raises(NotImplementedError, match=match):
        ik.grad_dot(model, out_loss, train, val)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, out_loss, val, verify=False)
    with pytest.raises(NotImplementedError, match=match):
        eng.step(train, torch.arange(2))
    assert eng.steps == 0 and all(p.grad is None for p in model.parameters())


class TiedLM(nn.Module):
    """Embedding and output head share one [V, d] weight (GPT-2 style), plus a position table
    that is looked up with a [1, T] index broadcast over the batch."""

    def __init__(self, V=19, d=6, T=5, tied=True):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Embedding(T, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1])[None])
        return self.head(torch.tanh(self.mix(h)))


def lm_loss(model, batch):
    ids, target = batch
    logits = model(ids)
    return F.cross_entropy(logits.transpose(1, 2), target, reduction="none").mean(1)


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embedding_head(tied):
    torch.manual_seed(0)
    model = TiedLM(tied=tied).double()
    V, T = 19, 5
    train = (_ids(6, T, V, seed=1), _ids(6, T, V, seed=3))
    val = (_ids(3, T, V, seed=2), _ids(3, T, V, seed=4))
    check_all(model, lm_loss, train, val)
    with ik.temp_budget(1e-4):
        check_all(model, lm_loss, train, val)


def test_tied_never_materialises(monkeypatch):
    """Tied products go through the sparse Rows x Outer rules, never dense per-sample [V, d]."""
    from inrun_kernels.reps import Outer, Rows

    def boom(self):
        raise AssertionError(f"{type(self).__name__}.materialise called")

    model = TiedLM(tied=True).double()
    train = (_ids(4, 5, 19, seed=1), _ids(4, 5, 19, seed=3))
    val = (_ids(2, 5, 19, seed=2), _ids(2, 5, 19, seed=4))
    monkeypatch.setattr(Rows, "materialise", boom)
    monkeypatch.setattr(Outer, "materialise", boom)
    ik.grad_dot(model, lm_loss, train, val)
    ik.grad_dot(model, lm_loss, train, val, per_val=True)
    ik.grad_gram(model, lm_loss, train)
    ik.grad_norms(model, lm_loss, train)


def test_tied_per_param_shares():
    """A tied weight is one parameter: one share (named by its first name), shares sum to the total."""
    model = TiedLM(tied=True).double()
    train = (_ids(4, 5, 19, seed=1), _ids(4, 5, 19, seed=3))
    val = (_ids(2, 5, 19, seed=2), _ids(2, 5, 19, seed=4))
    total, shares = ik.grad_dot(model, lm_loss, train, val, per_param=True)
    assert set(shares) == {"emb.weight", "pos.weight", "mix.weight", "mix.bias"}
    torch.testing.assert_close(sum(shares.values()), total, rtol=1e-12, atol=1e-14)


# ---- norms -------------------------------------------------------------------------------------
@pytest.mark.parametrize("d,T,bias", [(8, 4, True), (17, 3, False), (9, 0, True)])
def test_layernorm(d, T, bias):
    ln = nn.LayerNorm(d, bias=bias).double()
    with torch.no_grad():
        ln.weight.normal_()
        if bias:
            ln.bias.normal_()
    shape = (T, d) if T else (d,)
    train = (torch.randn(5, *shape, dtype=torch.float64), torch.randn(5, *shape, dtype=torch.float64))
    val = (torch.randn(2, *shape, dtype=torch.float64), torch.randn(2, *shape, dtype=torch.float64))
    check_all(ln, out_loss, train, val)


def test_layernorm_2d_normalized_shape_float32():
    ln = nn.LayerNorm((3, 5))
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    train = (torch.randn(4, 7, 3, 5), torch.randn(4, 7, 3, 5))
    val = (torch.randn(3, 7, 3, 5), torch.randn(3, 7, 3, 5))
    check_all(ln, out_loss, train, val, dtype=torch.float32)


@pytest.mark.parametrize("d,T,eps", [(16, 4, None), (13, 5, 1e-5)])
def test_rmsnorm(d, T, eps):
    rn = nn.RMSNorm(d, eps=eps).double()
    with torch.no_grad():
        rn.weight.normal_()
    train = (torch.randn(5, T, d, dtype=torch.float64), torch.randn(5, T, d, dtype=torch.float64))
    val = (torch.randn(2, T, d, dtype=torch.float64), torch.randn(2, T, d, dtype=torch.float64))
    check_all(rn, out_loss, train, val)


def _rms_class(name, offset=False, eps_outside=False):
    """An HF-style RMSNorm class defined outside transformers (matched by name + probe)."""
    def __init__(self, d, eps=1e-6):
        nn.Module.__init__(self)
        self.weight = nn.Parameter(torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dt = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        if eps_outside:
            h = h / (h.pow(2).mean(-1, keepdim=True).sqrt() + self.variance_epsilon)
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        w = 1.0 + self.weight if offset else self.weight
        return w * h.to(dt)

    return type(name, (nn.Module,), {"__init__": __init__, "forward": forward})


MyRMSNorm = _rms_class("MyRMSNorm")
GemmaStyleRMSNorm = _rms_class("GemmaStyleRMSNorm", offset=True)
EpsOutsideRMSNorm = _rms_class("EpsOutsideRMSNorm", eps_outside=True)


def test_hf_style_rmsnorm_matched_by_probe():
    rn = MyRMSNorm(11).double()
    train = (torch.randn(4, 3, 11, dtype=torch.float64), torch.randn(4, 3, 11, dtype=torch.float64))
    val = (torch.randn(2, 3, 11, dtype=torch.float64), torch.randn(2, 3, 11, dtype=torch.float64))
    check_all(rn, out_loss, train, val)
    ik.patch(rn)
    assert isinstance(rn, MyRMSNorm) and isinstance(rn, GhostModule)
    ik.unpatch(rn)
    assert type(rn) is MyRMSNorm


def test_eps_outside_rmsnorm_is_not_covered():
    """eps outside the sqrt fails the probe: uncovered (an error naming the module), never
    silently wrong. ((1 + weight), Gemma's form, is matched: tests/test_subclass_matchers.py.)"""
    for cls in (EpsOutsideRMSNorm,):
        rn = cls(7)
        with pytest.raises(ik.UnsupportedModuleError, match=cls.__name__):
            ik.patch(rn, fallback=False)
        assert type(rn) is cls


def test_llama_rmsnorm():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    rn = llama.LlamaRMSNorm(10, eps=1e-6).double()
    with torch.no_grad():
        rn.weight.normal_()
    train = (torch.randn(3, 4, 10, dtype=torch.float64), torch.randn(3, 4, 10, dtype=torch.float64))
    val = (torch.randn(2, 4, 10, dtype=torch.float64), torch.randn(2, 4, 10, dtype=torch.float64))
    check_all(rn, out_loss, train, val)


# ---- transformers Conv1D -----------------------------------------------------------------------
@pytest.mark.parametrize("nx,nf,T", [(8, 16, 4), (13, 7, 3), (5, 9, 0)])
def test_conv1d(nx, nf, T):
    pu = pytest.importorskip("transformers.pytorch_utils")
    conv = pu.Conv1D(nf, nx).double()
    with torch.no_grad():
        conv.bias.normal_()
    s_in, s_out = ((T,) if T else ()) + (nx,), ((T,) if T else ()) + (nf,)
    train = (torch.randn(5, *s_in, dtype=torch.float64), torch.randn(5, *s_out, dtype=torch.float64))
    val = (torch.randn(3, *s_in, dtype=torch.float64), torch.randn(3, *s_out, dtype=torch.float64))
    check_all(conv, out_loss, train, val)
    # per-parameter shares and the train-only weight gradient in the [in, out] layout
    ref = copy.deepcopy(conv)
    out_loss(ref, train).mean().backward()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    ik.InRunShapley(conv, opt, out_loss, val).step(train, torch.arange(5))
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv.bias.grad, ref.bias.grad, rtol=1e-12, atol=1e-14)


def test_conv1d_shared_with_linear_materialises_in_param_layout():
    """A Conv1D weight [in, out] tied to a Linear weight [out', in'] of the same shape: the
    cross terms go through materialised gradients, which must use the parameter's layout."""
    pu = pytest.importorskip("transformers.pytorch_utils")

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = pu.Conv1D(6, 6)
            self.lin = nn.Linear(6, 6, bias=False)
            self.lin.weight = self.conv.weight

        def forward(self, x):
            return self.lin(torch.tanh(self.conv(x)))

    model = Shared().double()
    train = (torch.randn(4, 3, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64))
    val = (torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64))
    check_all(model, out_loss, train, val)
