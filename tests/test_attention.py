"""GhostMultiheadAttention and the Transformer rules: same forward/backward as PyTorch, and
per-sample products against the float64 batch-size-1 oracle of the ORIGINAL modules."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers.attention import GhostMultiheadAttention
from inrun_kernels.layers.registry import lookup
from inrun_kernels.session import ghost_session
from tests.oracle import Oracle, rel_err

E, H = 16, 2
HAS_NORM_RULE = lookup(nn.LayerNorm(4)) is not None
need_norm_rule = pytest.mark.skipif(not HAS_NORM_RULE, reason="no ghost rule for nn.LayerNorm yet")


def _jitter(mod, scale=0.1, seed=0):
    """Random non-zero biases (PyTorch initialises them to 0) so every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return mod


# ---- 1. same forward and backward as nn.MultiheadAttention ----------------------------------
N, L, S = 4, 5, 7


def _x(bf, T, d=E):
    return torch.randn(N, T, d, dtype=torch.float64) if bf else torch.randn(T, N, d, dtype=torch.float64)


def _case(name, bf):
    """(module kwargs, (query, key, value) with the identities that matter, call kwargs)."""
    s, q, kv = _x(bf, L), _x(bf, L), _x(bf, S)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)
    kpm = torch.rand(N, S) < 0.3
    kpm[:, 0] = False
    kpm_self = torch.rand(N, L) < 0.3
    kpm_self[:, 0] = False
    return {
        "self": ({}, (s, s, s), {}),
        "self_no_weights": ({}, (s, s, s), dict(need_weights=False)),
        "cross_kpm_bool": ({}, (q, kv, kv), dict(key_padding_mask=kpm)),
        "cross_kpm_float": ({}, (q, kv, kv), dict(key_padding_mask=kpm.double() * -1e4, need_weights=False)),
        "qkv_mask2d_bool": ({}, (q, kv, _x(bf, S)), dict(attn_mask=torch.rand(L, S) < 0.3, need_weights=False)),
        "qkv_mask2d_float": ({}, (q, kv, _x(bf, S)), dict(attn_mask=torch.randn(L, S, dtype=torch.float64))),
        "kvdim_mask3d": (dict(kdim=6, vdim=9), (q, _x(bf, S, 6), _x(bf, S, 9)),
                         dict(attn_mask=torch.randn(N * H, L, S, dtype=torch.float64), average_attn_weights=False)),
        "mask3d_bool_kpm": ({}, (q, kv, kv), dict(attn_mask=torch.rand(N * H, L, S) < 0.2,
                                                  key_padding_mask=kpm)),
        "causal_sdpa": ({}, (s, s, s), dict(attn_mask=causal, is_causal=True, need_weights=False)),
        "causal_kpm": ({}, (s, s, s), dict(attn_mask=causal < 0, is_causal=True, key_padding_mask=kpm_self,
                                           need_weights=False)),
        "causal_weights": ({}, (s, s, s), dict(attn_mask=causal, is_causal=True)),
        "bias_kv_zero_attn": (dict(add_bias_kv=True, add_zero_attn=True), (q, kv, kv),
                              dict(key_padding_mask=kpm, attn_mask=torch.rand(L, S) < 0.2)),
        "no_bias": (dict(bias=False), (s, s, s), {}),
    }[name]


CASES = ["self", "self_no_weights", "cross_kpm_bool", "cross_kpm_float", "qkv_mask2d_bool",
         "qkv_mask2d_float", "kvdim_mask3d", "mask3d_bool_kpm", "causal_sdpa", "causal_kpm",
         "causal_weights", "bias_kv_zero_attn", "no_bias"]


def _fwd_bwd(mha, inputs, kwargs, session):
    mha.zero_grad()
    leaves = {}
    for t in inputs:   # fresh leaves, keeping which inputs are the same tensor
        if id(t) not in leaves:
            leaves[id(t)] = t.detach().clone().requires_grad_()
    xs = [leaves[id(t)] for t in inputs]
    ctx = ghost_session(N, 0, norms=True, grad_scale=1.0) if session else torch.enable_grad()
    with ctx:
        out, w = mha(*xs, **kwargs)
        loss = out.square().sum() + out.sum()
        if w is not None:
            loss = loss + (w * torch.linspace(-1, 1, w.numel(), dtype=w.dtype).reshape(w.shape)).sum()
        loss.backward()
    return out.detach(), w, [x.grad for x in leaves.values()], {n: p.grad.clone() for n, p in mha.named_parameters()}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_same_outputs_and_gradients_as_pytorch(case, batch_first):
    mod_kw, inputs, kwargs = _case(case, batch_first)
    ref = _jitter(nn.MultiheadAttention(E, H, batch_first=batch_first, **mod_kw).double())
    ghost = ik.patch(copy.deepcopy(ref))
    assert type(ghost) is GhostMultiheadAttention
    want = _fwd_bwd(ref, inputs, kwargs, session=False)
    # outside a session (delegates to PyTorch) and inside one (the ghost forward): the same
    for session in (False, True):
        got = _fwd_bwd(ghost, inputs, kwargs, session=session)
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
        if want[1] is None:
            assert got[1] is None
        else:
            torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
        for a, b in zip(got[2], want[2]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert got[3].keys() == want[3].keys()
        for name in want[3]:
            torch.testing.assert_close(got[3][name], want[3][name], rtol=1e-10, atol=1e-12, msg=name)


def test_parameters_state_dict_and_unpatch():
    ref = nn.MultiheadAttention(E, H, kdim=6, vdim=9, add_bias_kv=True)
    params = dict(ref.named_parameters())
    ik.patch(ref)
    assert isinstance(ref, GhostMultiheadAttention) and isinstance(ref, nn.MultiheadAttention)
    assert {n: id(p) for n, p in ref.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert sorted(params) == sorted(["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                                     "out_proj.weight", "out_proj.bias", "bias_k", "bias_v"])
    ik.unpatch(ref)
    assert type(ref) is nn.MultiheadAttention and type(ref.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear

    src = _jitter(nn.MultiheadAttention(E, H))
    dst = ik.patch(nn.MultiheadAttention(E, H))
    dst.load_state_dict(src.state_dict())
    assert list(dst.state_dict()) == list(src.state_dict()) == [
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    x = torch.randn(L, 3, E)
    torch.testing.assert_close(dst(x, x, x)[0], src(x, x, x)[0], rtol=0, atol=0)
    assert ik.coverage(dst).complete


def test_unbatched_input_in_a_session_is_an_error():
    mha = ik.patch(nn.MultiheadAttention(E, H))
    x = torch.randn(L, E)
    with ghost_session(1, 0, norms=True), pytest.raises(ValueError, match="batched 3-D"):
        mha(x, x, x)


# ---- 2. products against the oracle: MHA ------------------------------------------------------
class AttnModel(nn.Module):
    """Samples on dim 0 of every batch tensor; transposed for a seq-first MHA."""

    def __init__(self, mode, batch_first=True, **kw):
        super().__init__()
        self.mode, self.bf = mode, batch_first
        kd = dict(kdim=6, vdim=9) if mode == "kvdim" else {}
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, **kd, **kw)

    def forward(self, q, k, v, kpm):
        if self.mode in ("self", "self_kpm"):
            k = v = q
        elif self.mode == "cross":
            v = k
        if not self.bf:   # keep the identities (query is key is value / key is value)
            if q is k is v:
                q = k = v = q.transpose(0, 1)
            elif k is v:
                q, k = q.transpose(0, 1), k.transpose(0, 1)
                v = k
            else:
                q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        mask = None
        if self.mode == "self_kpm":
            T = q.shape[1 if self.bf else 0]
            mask = torch.ones(T, T, dtype=torch.bool).triu(1)
        out, _ = self.attn(q, k, v, key_padding_mask=kpm if self.mode in ("self_kpm", "cross", "kvdim") else None,
                           attn_mask=mask, is_causal=mask is not None, need_weights=self.mode == "qkv")
        return out if self.bf else out.transpose(0, 1)


def attn_loss(model, batch):
    q, k, v, kpm, y = batch
    out = model(q, k, v, kpm)
    return (torch.tanh(out) - y).square().mean((1, 2))


def attn_data(n, mode, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    T, Sk = 7, (7 if mode.startswith("self") else 5)
    kd, vd = (6, 9) if mode == "kvdim" else (E, E)
    kpm = torch.rand(n, Sk, generator=g) < 0.3
    kpm[:, 0] = False
    return (torch.randn(n, T, E, generator=g, dtype=dtype), torch.randn(n, Sk, kd, generator=g, dtype=dtype),
            torch.randn(n, Sk, vd, generator=g, dtype=dtype), kpm, torch.randn(n, T, E, generator=g, dtype=dtype))


def _check_products(model, loss_fn, train, val, tol_param=1e-10, tol_total=1e-10, per_param=True):
    orc = Oracle(model, loss_fn, train, val)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    errs = []

    def check(got, want, tol, what):
        err = rel_err(got, want)
        errs.append(err)
        assert err <= tol, f"{what}: rel err {err:.2e}"

    for per_val in (False, True):
        tot = ik.grad_dot(model, loss_fn, train, val, per_val=per_val)
        check(tot, orc.dot(per_val=per_val), tol_total, f"dot per_val={per_val}")
    check(ik.grad_gram(model, loss_fn, train), orc.gram(), tol_total, "gram")
    check(ik.grad_norms(model, loss_fn, train), orc.norms(), tol_total, "norms")
    if per_param:
        _, dshare = ik.grad_dot(model, loss_fn, train, val, per_val=True, per_param=True)
        _, gshare = ik.grad_gram(model, loss_fn, train, per_param=True)
        _, nshare = ik.grad_norms(model, loss_fn, train, per_param=True)
        assert sorted(dshare) == sorted(gshare) == sorted(nshare) == sorted(names)
        for n in names:
            check(dshare[n], orc.dot(per_val=True, name=n), tol_param, f"dot[{n}]")
            check(gshare[n], orc.gram(name=n), tol_param, f"gram[{n}]")
            check(nshare[n], orc.norms(name=n), tol_param, f"norms[{n}]")
    return max(errs)


@pytest.mark.parametrize("mode,batch_first,kw", [
    ("self", True, {}), ("self", False, {}), ("self_kpm", True, {}), ("cross", True, {}),
    ("cross", False, {}), ("qkv", True, {}), ("kvdim", False, {}), ("cross", True, dict(add_bias_kv=True)),
    ("self", True, dict(bias=False)),
])
def test_mha_products_match_oracle(mode, batch_first, kw):
    model = _jitter(AttnModel(mode, batch_first, **kw).double())
    train, val = attn_data(5, mode, torch.float64, 1), attn_data(3, mode, torch.float64, 2)
    _check_products(model, attn_loss, train, val)


@pytest.mark.parametrize("route", ["gram", "dense"])
def test_mha_cross_attention_routes_float32(route, monkeypatch):
    monkeypatch.setenv("INRUN_ROUTE", route)
    model = _jitter(AttnModel("cross")).float()
    train, val = attn_data(5, "cross", torch.float32, 1), attn_data(3, "cross", torch.float32, 2)
    _check_products(model, attn_loss, train, val, tol_total=1e-6, per_param=False)   # measured 1.7e-7


# ---- 3. products against the oracle: Transformer modules ----------------------------------
D, FF = 16, 24


def _layer_kw(bf, norm_first):
    return dict(d_model=D, nhead=H, dim_feedforward=FF, dropout=0.0, batch_first=bf, norm_first=norm_first)


class EncoderModel(nn.Module):
    def __init__(self, bf, norm_first=False, layers=2, classes=3):
        super().__init__()
        self.bf = bf
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(**_layer_kw(bf, norm_first)), layers,
                                         norm=nn.LayerNorm(D), enable_nested_tensor=False)
        self.head = nn.Linear(D, classes)

    def forward(self, x, kpm):
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        h = self.enc(x if self.bf else x.transpose(0, 1), mask=mask, src_key_padding_mask=kpm, is_causal=True)
        h = h if self.bf else h.transpose(0, 1)
        return self.head(h.mean(1))


class DecoderModel(nn.Module):
    def __init__(self, bf, norm_first=False, layers=2):
        super().__init__()
        self.bf = bf
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(**_layer_kw(bf, norm_first)), layers)
        self.head = nn.Linear(D, 3)

    def forward(self, tgt, mem, kpm):
        mask = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).triu(1)
        t, m = (tgt, mem) if self.bf else (tgt.transpose(0, 1), mem.transpose(0, 1))
        h = self.dec(t, m, tgt_mask=mask, memory_key_padding_mask=kpm, tgt_is_causal=True)
        h = h if self.bf else h.transpose(0, 1)
        return self.head(h.mean(1))


class FullTransformer(nn.Module):
    def __init__(self, bf):
        super().__init__()
        self.bf = bf
        self.tr = nn.Transformer(d_model=D, nhead=H, num_encoder_layers=1, num_decoder_layers=1,
                                 dim_feedforward=FF, dropout=0.0, batch_first=bf)
        self.head = nn.Linear(D, 3)

    def forward(self, tgt, mem, kpm):
        t, m = (tgt, mem) if self.bf else (tgt.transpose(0, 1), mem.transpose(0, 1))
        h = self.tr(m, t, src_key_padding_mask=kpm, memory_key_padding_mask=kpm,
                    tgt_mask=torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).triu(1))
        h = h if self.bf else h.transpose(0, 1)
        return self.head(h.mean(1))


def enc_loss(model, batch):
    x, kpm, y = batch
    return F.cross_entropy(model(x, kpm), y, reduction="none")


def dec_loss(model, batch):
    tgt, mem, kpm, y = batch
    return F.cross_entropy(model(tgt, mem, kpm), y, reduction="none")


def enc_data(n, dtype, seed, T=7):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(n, T, generator=g) < 0.3
    kpm[:, 0] = False
    return torch.randn(n, T, D, generator=g, dtype=dtype), kpm, torch.randint(0, 3, (n,), generator=g)


def dec_data(n, dtype, seed, T=5, Sm=7):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(n, Sm, generator=g) < 0.3
    kpm[:, 0] = False
    return (torch.randn(n, T, D, generator=g, dtype=dtype), torch.randn(n, Sm, D, generator=g, dtype=dtype),
            kpm, torch.randint(0, 3, (n,), generator=g))


def _freeze_norms(model):
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.requires_grad_(False)
    return model


NORMS = [pytest.param("frozen", id="frozen_norms"), pytest.param("trained", id="trained_norms", marks=need_norm_rule)]


def _build(kind, bf, norms, norm_first=False):
    torch.manual_seed(0)
    model = {"enc": lambda: EncoderModel(bf, norm_first), "dec": lambda: DecoderModel(bf, norm_first),
             "full": lambda: FullTransformer(bf)}[kind]()
    model = _jitter(model, 0.05)
    if norms == "frozen":
        _freeze_norms(model)
    if kind == "enc":
        return model, enc_loss, enc_data
    return model, dec_loss, dec_data


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norms", NORMS)
@pytest.mark.parametrize("kind,bf,norm_first", [("enc", True, False), ("enc", False, True),
                                                ("dec", True, True), ("dec", False, False), ("full", False, False)])
def test_transformer_products_match_oracle(kind, bf, norm_first, norms):
    model, loss_fn, data = _build(kind, bf, norms, norm_first)
    model = model.double()
    train, val = data(5, torch.float64, 1), data(3, torch.float64, 2)
    _check_products(model, loss_fn, train, val)


@pytest.mark.parametrize("norms", NORMS)
@pytest.mark.parametrize("bf", [True, False])
def test_transformer_encoder_float32_totals(bf, norms):
    model, loss_fn, data = _build("enc", bf, norms)
    train, val = data(5, torch.float32, 1), data(3, torch.float32, 2)
    _check_products(model, loss_fn, train, val, tol_total=1e-6, per_param=False)   # measured 1.1e-7


def test_seq_first_transformer_sets_and_restores_batch_dims():
    model = ik.patch(_freeze_norms(EncoderModel(bf=False)))
    layer = model.enc.layers[0]
    assert type(layer).__name__ == "GhostTransformerEncoderLayer"
    assert layer.linear1.ghost_batch_dim == 1 and model.enc.norm.ghost_batch_dim == 1
    assert model.head.ghost_batch_dim == 0   # outside the transformer: batch-first
    ik.unpatch(model)
    assert type(layer) is nn.TransformerEncoderLayer and "ghost_batch_dim" not in layer.linear1.__dict__
    assert type(layer.linear1) is nn.Linear
    bf_model = ik.patch(_freeze_norms(EncoderModel(bf=True)))
    assert bf_model.enc.layers[0].linear1.ghost_batch_dim == 0


def test_fast_path_is_off_inside_a_session(monkeypatch):
    """In eval mode without grad PyTorch runs torch._transformer_encoder_layer_fwd, which would
    bypass the ghost children; inside a session the patched layers must not take it."""
    model = ik.patch(_freeze_norms(EncoderModel(bf=True)).eval())
    fused = torch._transformer_encoder_layer_fwd
    calls = []
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(2, 7, D)
    layer = model.enc.layers[0]
    with torch.no_grad():
        want = layer(x)
    assert calls   # outside a session the fused fast path really is taken
    calls.clear()
    with ghost_session(2, 0, norms=True) as sess, torch.no_grad():
        got = layer(x)
    assert not calls and sess.is_shared(layer.linear1.weight) is False
    assert sess._expected[id(layer.linear1.weight)] == 1   # the ghost linear ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()


# ---- 4. the engine trains exactly like plain training ------------------------------------
@pytest.mark.parametrize("norms", NORMS)
def test_engine_training_unchanged_on_transformer(norms):
    plain, loss_fn, data = _build("enc", False, norms)
    plain = plain.double()
    from tests.test_estimators import StepOracle
    ghost = copy.deepcopy(plain)
    ref = copy.deepcopy(plain)   # unpatched, for the float64 step oracle
    opt_p = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2)
    opt_g = torch.optim.AdamW([p for p in ghost.parameters() if p.requires_grad], lr=1e-2)
    val = data(3, torch.float64, 99)
    eng = ik.InRunShapley(ghost, opt_g, loss_fn, val, num_samples=40)
    g = torch.Generator().manual_seed(5)
    want = torch.zeros(40, dtype=torch.float64)
    for step in range(10):
        batch = data(6, torch.float64, 100 + step)
        ids = torch.randint(0, 40, (6,), generator=g)
        opt_p.zero_grad()
        loss_p = loss_fn(plain, batch).mean()
        loss_p.backward()
        opt_p.step()
        opt_g.zero_grad()
        loss_g = eng.step(batch, ids)
        orc = StepOracle(ref, ghost, opt_g, loss_fn, batch, val)   # values of this step's update
        opt_g.step()
        torch.testing.assert_close(loss_g, loss_p.detach(), rtol=1e-10, atol=1e-12)
        assert rel_err(eng.last_values, orc.values("first")) <= 1e-10, step   # measured <= 1e-13
        want.index_add_(0, ids, orc.values("first"))
    for (name, p), q in zip(ghost.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=name)
    assert rel_err(eng.values, want) <= 1e-10
