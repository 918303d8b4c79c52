"""ik.verify: the self-check against plain batch-size-1 autograd (issue 9, item 2).

Passing models (MLP, TokenMixer, a tied Hugging Face GPT-2 with eager attention) must not raise;
each known way of making the ghost numbers silently wrong must raise VerificationError with the
right diagnosis: an op that mixes samples (h - h.mean(0)), a hand-written batch norm with batch
statistics, a tied head written h @ self.emb.weight.T, an L2 penalty on a parameter inside
loss_fn, a custom autograd Function that mixes the batch in backward. A verify() that always
passes fails every one of these tests (each asserts the raise). The cases that break the ghost
pass itself (batch dim not first, BatchNorm in training mode) raise VerificationError with the
original error chained. After every call, passing or raising, nothing changed: parameters,
buffers, every p.grad (same objects, same values), training flags, patched state, RNG states.

The tied-head and L2 cases run twice: with the package's gradient-path guard (if present the
ghost pass refuses them and verify chains its error) and with the guard switched off (verify's
numeric comparison and graph diagnosis catch them)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
import inrun_kernels.ghost_pass as gp
from inrun_kernels.layers.registry import GhostModule
from inrun_kernels.verify import LOSSES, VerifyReport
from tests.models import MLP, TokenMixer, ce_loss, make_data

D = torch.float64


# ---- models -------------------------------------------------------------------------------------
class MeanCentred(MLP):
    """h - h.mean(0): every sample's activation depends on the others."""

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h - h.mean(0)
        return self.head(torch.tanh(self.fc2(h)))


class HandBatchNorm(nn.Module):
    """A hand-written batch norm: batch statistics in training mode, running ones in eval."""

    def __init__(self, d):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, h):
        if self.training:
            mu, var = h.mean(0), h.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * mu)
                self.running_var.mul_(0.9).add_(0.1 * var)
        else:
            mu, var = self.running_mean, self.running_var
        return (h - mu) / torch.sqrt(var + 1e-5)


class WithHandBN(MLP):
    def __init__(self):
        super().__init__()
        self.bn = HandBatchNorm(33)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(self.bn(self.fc1(x)))))


class TinyLM(nn.Module):
    """Token LM; head="module": tied through an nn.Linear sharing the embedding's weight
    (covered); head="matmul": h @ self.emb.weight.T (a use outside the ghost layer)."""

    def __init__(self, head="module", V=23, d=8):
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.fc = nn.Linear(d, d)
        self.head_kind = head
        if head == "module":
            self.lm_head = nn.Linear(d, V, bias=False)
            self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids)))
        return self.lm_head(h) if self.head_kind == "module" else h @ self.emb.weight.T


def lm_loss(model, ids):
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return ce.view(ids.shape[0], -1).mean(1)


def l2_loss(model, batch):
    """An L2 penalty on fc1.weight written into the per-sample loss."""
    return ce_loss(model, batch) + 0.05 * model.fc1.weight.square().sum()


class MixBackward(torch.autograd.Function):
    """Identity in forward; the backward mixes the batch (adds the mean output gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g + g.mean(0, keepdim=True)


class WithMixFn(MLP):
    def forward(self, x):
        return self.head(torch.tanh(self.fc2(MixBackward.apply(torch.tanh(self.fc1(x))))))


class SeqFirst(nn.Module):
    """Feeds a Linear with the batch on dim 1: the ghost layer sees T rows, not N + M."""

    def __init__(self, d=17, classes=4):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):                       # x [B, T, d]
        h = torch.tanh(self.fc(x.transpose(0, 1)))   # [T, B, d]
        return self.head(h.mean(0))


class WithDropout(MLP):
    def __init__(self, functional=False):
        super().__init__()
        self.functional = functional
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = F.dropout(h, 0.5, self.training) if self.functional else self.drop(h)
        return self.head(torch.tanh(self.fc2(h)))


V, PAD = 97, 0


def gpt2_tied():
    transformers = pytest.importorskip("transformers")
    conf = transformers.GPT2Config(
        vocab_size=V, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        pad_token_id=PAD, attn_implementation="eager")
    torch.manual_seed(0)
    m = transformers.GPT2LMHeadModel(conf).double()
    assert m.lm_head.weight is m.transformer.wte.weight
    return m


def hf_batch(n, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for i in range(n):
        L = T - (0, 1, 3)[i % 3]
        ids[i, L:] = PAD
        mask[i, L:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def case(name):
    """(model, loss_fn, train, val) of a named case, float64."""
    torch.manual_seed(0)
    vec = lambda n, s: make_data(n, (17,), 5, D, seed=s)  # noqa: E731
    if name == "mlp":
        return MLP().to(D), ce_loss, vec(6, 1), vec(3, 2)
    if name == "tokens":
        return (TokenMixer().to(D), ce_loss, make_data(6, (7, 17), 4, D, seed=1),
                make_data(3, (7, 17), 4, D, seed=2))
    if name == "gpt2_tied":
        return gpt2_tied(), ik.causal_lm_loss, hf_batch(5, seed=1), hf_batch(3, seed=2)
    if name in ("lm_tied_module", "lm_tied_matmul"):
        ids = lambda n, s: torch.randint(0, 23, (n, 6), generator=torch.Generator().manual_seed(s))  # noqa: E731
        return TinyLM(name.rsplit("_", 1)[1]).to(D), lm_loss, ids(5, 1), ids(3, 2)
    if name == "mean_centred":
        return MeanCentred().to(D), ce_loss, vec(6, 1), vec(3, 2)
    if name == "hand_bn":
        return WithHandBN().to(D), ce_loss, vec(6, 1), vec(3, 2)
    if name == "l2_in_loss":
        return MLP().to(D), l2_loss, vec(6, 1), vec(3, 2)
    if name == "mix_fn":
        return WithMixFn().to(D), ce_loss, vec(6, 1), vec(3, 2)
    if name == "seq_first":
        return (SeqFirst().to(D), ce_loss, make_data(6, (5, 17), 4, D, seed=1),
                make_data(3, (5, 17), 4, D, seed=2))
    if name == "batchnorm_train":
        m = nn.Sequential(nn.Linear(17, 8), nn.BatchNorm1d(8, affine=False), nn.Linear(8, 5)).to(D)
        return m, ce_loss, vec(6, 1), vec(3, 2)
    raise ValueError(name)


# ---- "nothing changed" ----------------------------------------------------------------------------
class Snapshot:
    """Everything verify must leave as it was."""

    def __init__(self, model):
        self.model = model
        for i, p in enumerate(model.parameters()):   # some .grad present, some not
            p.grad = None if i % 3 == 2 else torch.randn_like(p)
        self.params = [(p, p.detach().clone()) for p in model.parameters()]
        self.grads = [(p, p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
        self.buffers = {n: b.clone() for n, b in model.named_buffers()}
        self.flags = {n: m.training for n, m in model.named_modules()}
        self.classes = {n: type(m) for n, m in model.named_modules()}
        self.patched = "_inrun_coverage" in model.__dict__
        self.rng = torch.get_rng_state()

    def check(self):
        m = self.model
        assert all(torch.equal(p, v) for p, v in self.params)
        for p, g, v in self.grads:
            assert p.grad is g
            if g is not None:
                assert torch.equal(g, v)
        now = dict(m.named_buffers())
        assert set(now) == set(self.buffers)
        assert all(torch.equal(now[n], b) for n, b in self.buffers.items())
        assert {n: x.training for n, x in m.named_modules()} == self.flags
        assert {n: type(x) for n, x in m.named_modules()} == self.classes
        assert ("_inrun_coverage" in m.__dict__) == self.patched
        assert torch.equal(torch.get_rng_state(), self.rng)


# ---- passing cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp", "tokens", "gpt2_tied", "lm_tied_module"])
@pytest.mark.parametrize("train_mode", [True, False])
def test_passes(name, train_mode):
    model, loss_fn, train, val = case(name)
    model.train(train_mode)
    snap = Snapshot(model)
    rep = ik.verify(model, loss_fn, train, val)
    snap.check()
    assert isinstance(rep, VerifyReport) and rep.ok and not rep.mismatches
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(rep.grad_err) == names                   # every trainable parameter compared
    assert all(v is not None and v <= 1e-8 for v in rep.prod_err.values())
    assert max(rep.grad_err.values()) <= 1e-8
    assert (rep.n_train, rep.n_val, rep.rtol) == (4, 2, 1e-8)
    text = str(rep)
    assert "all match" in text and names[0] in text and LOSSES in text


def test_passes_on_a_patched_model_and_few_rows():
    model, loss_fn, train, val = case("tokens")
    ik.patch(model)
    snap = Snapshot(model)
    rep = ik.verify(model, loss_fn, (train[0][:2], train[1][:2]), val, n_train=4, n_val=1)
    snap.check()
    assert rep.ok and (rep.n_train, rep.n_val) == (2, 1)
    assert all(isinstance(m, GhostModule) for m in [model.up, model.down, model.head])


def test_float32_and_dtype_tolerance():
    model, loss_fn, train, val = case("tokens")
    model = model.float()
    f = lambda b: (b[0].float(), b[1])  # noqa: E731
    rep = ik.verify(model, loss_fn, f(train), f(val))
    assert rep.ok and rep.rtol == 1e-4 and rep.dtype == "float32"
    assert ik.verify(model, loss_fn, f(train), f(val), rtol=1e-3).rtol == 1e-3


def test_does_not_disturb_a_pending_engine_step():
    """verify between eng.step() and optimizer.step(): same values and weights as without."""
    results = []
    for with_verify in (False, True):
        model, loss_fn, train, val = case("mlp")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        eng = ik.InRunShapley(model, opt, loss_fn, val, num_samples=6)
        opt.zero_grad()
        eng.step(train, torch.arange(6))
        if with_verify:
            ik.verify(model, loss_fn, train, val)
        opt.step()
        results.append((eng.values.clone(), [p.detach().clone() for p in model.parameters()],
                        copy.deepcopy(opt.state_dict()["state"])))
    (v0, w0, s0), (v1, w1, s1) = results
    assert torch.equal(v0, v1) and all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(s0[k]["momentum_buffer"], s1[k]["momentum_buffer"]) for k in s0)


class Checkpointed(nn.Module):
    """A block under reentrant torch.utils.checkpoint (plain autograd.grad cannot run it)."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc, self.head = nn.Linear(17, 17), nn.Linear(17, 17), nn.Linear(17, 5)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda z: torch.tanh(self.fc(z)),
                                              torch.tanh(self.fc0(x)), use_reentrant=True)
        return self.head(h)


def test_reentrant_checkpointing_and_inputs_that_require_grad():
    _, loss_fn, (x, y), val = case("mlp")
    torch.manual_seed(0)
    model = Checkpointed().to(D)
    x = x.clone().requires_grad_(True)
    x.grad = torch.ones_like(x)
    before = x.grad.clone()
    snap = Snapshot(model)
    rep = ik.verify(model, loss_fn, (x, y), val)
    snap.check()
    assert rep.ok and rep.grad_err["fc.weight"] <= 1e-8
    assert torch.equal(x.grad, before)


# ---- randomness --------------------------------------------------------------------------------
def test_dropout_modules_are_switched_off_in_auto_mode():
    model, loss_fn, train, val = case("mlp")
    torch.manual_seed(0)
    model = WithDropout().to(D).train()
    snap = Snapshot(model)
    rep = ik.verify(model, loss_fn, train, val)
    snap.check()
    assert rep.ok and rep.mode == "train, dropout modules off"
    with pytest.raises(ik.VerificationError):   # left on, batch and single masks differ
        ik.verify(model, loss_fn, train, val, mode="train")
    snap.check()


def test_functional_dropout_falls_back_to_eval():
    _, loss_fn, train, val = case("mlp")
    model = WithDropout(functional=True).to(D).train()
    snap = Snapshot(model)
    rep = ik.verify(model, loss_fn, train, val)
    snap.check()
    assert rep.ok and rep.mode == "eval" and any("random" in n for n in rep.notes)


# ---- failing cases ------------------------------------------------------------------------------
def raises(name, *, mode="auto", train=True, **kw):
    model, loss_fn, tr, va = case(name)
    model.train(train)
    snap = Snapshot(model)
    with pytest.raises(ik.VerificationError) as info:
        ik.verify(model, loss_fn, tr, va, mode=mode, **kw)
    snap.check()
    err = info.value
    assert isinstance(err, AssertionError)
    return err, str(err)


def test_sample_mixing_op():
    err, msg = raises("mean_centred")
    assert "mixes samples" in msg and "x - x.mean(0)" in msg
    rep = err.report
    losses = next(c for c in rep.checks if c.name == LOSSES)
    assert not losses.ok                                      # caught in the forward already
    assert {c.name for c in rep.mismatches} >= {"fc1.weight", "head.weight"}
    assert "fc1.weight" in msg and "grad err" in msg


def test_hand_written_batch_norm():
    err, msg = raises("hand_bn")
    assert "mixes samples" in msg and "batch norm" in msg
    assert "fc1.weight" in msg
    assert "running_mean" not in msg
    # in eval mode the same module uses its running statistics: per-sample, exact
    model, loss_fn, tr, va = case("hand_bn")
    model.train()
    snap = Snapshot(model)
    assert ik.verify(model, loss_fn, tr, va, mode="eval").ok
    snap.check()                         # running stats untouched by the training-mode probe


@pytest.fixture(params=["guard", "no_guard"])
def guard(request, monkeypatch):
    """With the package's gradient-path guard (when present), and with it switched off."""
    if request.param == "no_guard":
        monkeypatch.setattr(gp, "check_paths", lambda *a, **k: None, raising=False)
    return request.param


def test_tied_head_written_as_matmul(guard):
    err, msg = raises("lm_tied_matmul")
    assert "emb.weight" in msg
    assert "forward" in msg and "h @ emb.weight.T" in msg
    if err.report is not None:           # numbers compared (no guard): the gradient is off
        bad = {c.name: c for c in err.report.mismatches}
        assert "emb.weight" in bad and bad["emb.weight"].grad_err > 1e-3
        assert "used outside its ghost layer in the model's forward" in bad["emb.weight"].cause
    else:                                # the ghost pass refused it: chained, same diagnosis
        assert err.__cause__ is not None
        assert any("'emb.weight'" in d and "in the model's forward" in d for d in err.diagnosis)


def test_l2_penalty_in_loss_fn(guard):
    err, msg = raises("l2_in_loss")
    assert "fc1.weight" in msg and "loss_fn" in msg and "L2 penalty" in msg
    if err.report is not None:
        bad = {c.name: c for c in err.report.mismatches}
        assert set(bad) == {"fc1.weight"}                   # only the penalised parameter
        assert bad["fc1.weight"].grad_err > 1e-3
        assert "gets gradient from loss_fn outside the model's forward" in bad["fc1.weight"].cause
    else:
        assert err.__cause__ is not None
        assert any("'fc1.weight'" in d and "in loss_fn" in d for d in err.diagnosis)
        assert not any("fc2" in d for d in err.diagnosis)


def test_custom_function_mixing_the_batch_in_backward():
    err, msg = raises("mix_fn")
    assert "custom autograd Function" in msg and "MixBackward" in msg
    rep = err.report
    assert next(c for c in rep.checks if c.name == LOSSES).ok   # forward is per-sample
    assert {c.name for c in rep.mismatches} >= {"fc1.weight", "fc1.bias"}
    assert {"fc2.weight", "head.weight"}.isdisjoint(c.name for c in rep.mismatches)


def test_shape_error_in_the_ghost_pass_is_chained():
    err, msg = raises("seq_first")
    assert isinstance(err.__cause__, ValueError) and "batch dimension" in msg
    assert err.report is None and "ghost pass" in msg


def test_batchnorm_in_training_mode_is_chained():
    err, msg = raises("batchnorm_train")
    assert isinstance(err.__cause__, ik.BatchCouplingError) and "BatchNorm" in msg


def test_uncovered_parameter_is_named():
    model, loss_fn, train, val = case("mlp")
    model.extra = nn.PReLU(num_parameters=1).to(D)
    model.forward = lambda x: model.head(model.extra(torch.tanh(model.fc2(torch.tanh(model.fc1(x))))))
    snap = Snapshot(model)
    with pytest.raises(ik.VerificationError, match="not covered") as info:
        ik.verify(model, loss_fn, train, val)
    snap.check()
    assert [c.name for c in info.value.report.mismatches] == ["extra.weight"]
    rep = ik.verify(model, loss_fn, train, val, allow_uncovered=True)   # gradient still exact
    assert rep.ok and rep.prod_err["extra.weight"] is None and rep.grad_err["extra.weight"] <= 1e-8
    snap.check()


def test_arguments():
    model, loss_fn, train, val = case("mlp")
    with pytest.raises(ValueError, match="mode"):
        ik.verify(model, loss_fn, train, val, mode="bogus")
    with pytest.raises(ValueError, match="n_train"):
        ik.verify(model, loss_fn, train, val, n_train=0)
