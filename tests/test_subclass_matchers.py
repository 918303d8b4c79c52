"""Probe-checked natives (issue 14): subclasses of supported layers with their own forward
(layers/subclass.py), (1 + weight) RMSNorm and T5LayerNorm (layers/norm.py), and raw parameters
broadcast over the batch (layers/rawparam.py). Each accepted case is native (not in
ik.coverage().fallback) and exact against the float64 batch-size-1 oracle (tests/oracle.py);
each refused case goes to the per-sample fallback and stays exact (or is refused loudly)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers import GhostEmbedding, GhostLayerNorm, GhostLinear
from inrun_kernels.layers.fallback import GhostFallback
from inrun_kernels.layers.norm import GhostHFRMSNorm
from inrun_kernels.layers.rawparam import GhostRawParams
from tests.oracle import Oracle, rel_err

transformers = pytest.importorskip("transformers")

TOL = 1e-10   # float64 against the float64 oracle (measured ~1e-16)
N, M = 3, 2


def check_exact(model, loss_fn, train, val):
    """dot (per_val), Gram and norms of the patched model equal the oracle's (an unpatched
    float64 copy run one sample at a time)."""
    orc = Oracle(model, loss_fn, train, val)
    errs = {"per_val": rel_err(ik.grad_dot(model, loss_fn, train, val, per_val=True), orc.dot(per_val=True)),
            "gram": rel_err(ik.grad_gram(model, loss_fn, train), orc.gram()),
            "norms": rel_err(ik.grad_norms(model, loss_fn, train), orc.norms())}
    assert max(errs.values()) <= TOL, errs


def fallback_after_patch(model):
    ik.patch(model)
    try:
        return dict(ik.coverage(model).fallback)
    finally:
        ik.unpatch(model)


def seq_loss(m, b):
    x, t = b
    y = m(x)
    return (torch.tanh(y) * t).flatten(1).sum(1) + 0.1 * y.square().flatten(1).sum(1)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def lin_batch(n, d_in, d_out, T=4, seed=0):
    return rand(n, T, d_in, seed=seed), rand(n, T, d_out, seed=seed + 100)


# ---- subclasses of nn.Linear -------------------------------------------------------------------
class ScaledLinear(nn.Linear):          # route A: super() * constant
    def forward(self, x):
        return super().forward(x) * 2.5


class MatmulLinear(nn.Linear):          # route B: FalconLinear's form, no super()
    def forward(self, x):
        h = x @ self.weight.T
        return h if self.bias is None else h + self.bias


class PlusOneLinear(nn.Linear):         # not a scaled rearrangement: refused
    def forward(self, x):
        return super().forward(x) + 1


class PerFeatureLinear(nn.Linear):      # a per-feature scale is not one constant: refused
    def forward(self, x):
        return super().forward(x) * torch.arange(1, self.out_features + 1, dtype=x.dtype)


class TwiceLinear(nn.Linear):           # two parent calls: refused
    def forward(self, x):
        return super().forward(x) + super().forward(2 * x)


class WeightOutsideLinear(nn.Linear):   # the weight used outside the parent call: refused
    def forward(self, x):
        return super().forward(x) * self.weight.sum()


def _linear_model(cls, bias=True):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), cls(7, 3, bias=bias)).double()


@pytest.mark.parametrize("cls,bias", [(ScaledLinear, True), (MatmulLinear, True), (MatmulLinear, False)])
def test_linear_subclass_native_and_exact(cls, bias):
    model = _linear_model(cls, bias)
    assert fallback_after_patch(model) == {}
    ik.patch(model)
    assert isinstance(model[2], GhostLinear) and isinstance(model[2], cls)
    ik.unpatch(model)
    assert type(model[2]) is cls
    check_exact(model, seq_loss, lin_batch(N, 5, 3, seed=1), lin_batch(M, 5, 3, seed=2))


@pytest.mark.parametrize("cls", [PlusOneLinear, PerFeatureLinear, TwiceLinear, WeightOutsideLinear])
def test_linear_subclass_that_differs_goes_to_the_fallback_and_stays_exact(cls):
    model = _linear_model(cls)
    assert list(fallback_after_patch(model)) == ["2"]
    check_exact(model, seq_loss, lin_batch(N, 5, 3, seed=1), lin_batch(M, 5, 3, seed=2))


class FlipLinear(nn.Linear):            # mixes the samples: refused by the probe
    def forward(self, x):
        return super().forward(x).flip(0)


def test_row_mixing_subclass_is_not_native():
    model = _linear_model(FlipLinear)
    assert list(fallback_after_patch(model)) == ["2"]
    with pytest.raises(ik.BatchCouplingError, match="'2'"):   # the fallback refuses it at forward
        ik.grad_dot(model, seq_loss, lin_batch(N, 5, 3, seed=1), lin_batch(M, 5, 3, seed=2))


# ---- subclasses of nn.Embedding ----------------------------------------------------------------
V, D, T = 11, 6, 5


class PositionEmbedding(nn.Embedding):  # OPT's form: positions from a mask, an offset, and a scale
    def forward(self, mask):
        pos = (torch.cumsum(mask, 1) * mask - 1).long()
        return super().forward(pos + 2) * 1.5


class ScaledEmbedding(nn.Embedding):    # Gemma's form
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.embed_scale = nn.Buffer(torch.tensor(D ** 0.5), persistent=False)

    def forward(self, ids):
        return super().forward(ids) * self.embed_scale.to(self.weight.dtype)


class RemappedEmbedding(nn.Embedding):  # other ids through super(): the ghost sees the real ids
    def forward(self, ids):
        return super().forward((ids * 2) % self.num_embeddings)


class DirectRemapEmbedding(nn.Embedding):   # other ids WITHOUT super(): refused
    def forward(self, ids):
        return F.embedding((ids * 2) % self.num_embeddings, self.weight)


class WeightOutsideEmbedding(nn.Embedding):
    def forward(self, ids):
        return super().forward(ids) + self.weight.mean()


class EmbModel(nn.Module):
    def __init__(self, emb_cls, mask_input=False):
        super().__init__()
        torch.manual_seed(2)
        self.emb = emb_cls(V + 2 if mask_input else V, D, padding_idx=None if mask_input else 1)
        self.head = nn.Linear(D, 3)
        self.mask_input = mask_input

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def emb_batch(n, seed, mask=False):
    g = torch.Generator().manual_seed(seed)
    if mask:
        ids = torch.ones(n, T, dtype=torch.long)
        ids[-1, -2:] = 0
    else:
        ids = torch.randint(0, V, (n, T), generator=g)
        ids[0, :2] = 1   # padding_idx and repeats
    return ids, torch.randn(n, T, 3, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("cls,mask", [(PositionEmbedding, True), (ScaledEmbedding, False), (RemappedEmbedding, False)])
def test_embedding_subclass_native_and_exact(cls, mask):
    model = EmbModel(cls, mask).double()
    assert fallback_after_patch(model) == {}
    ik.patch(model)
    assert isinstance(model.emb, GhostEmbedding) and isinstance(model.emb, cls)
    ik.unpatch(model)
    check_exact(model, seq_loss, emb_batch(N, 1, mask), emb_batch(M, 2, mask))


@pytest.mark.parametrize("cls", [DirectRemapEmbedding, WeightOutsideEmbedding])
def test_embedding_subclass_that_differs_goes_to_the_fallback_and_stays_exact(cls):
    model = EmbModel(cls).double()
    assert list(fallback_after_patch(model)) == ["emb"]
    check_exact(model, seq_loss, emb_batch(N, 1), emb_batch(M, 2))


# ---- subclasses of nn.LayerNorm ----------------------------------------------------------------
class ChannelsFirstLayerNorm(nn.LayerNorm):   # ConvNeXt's: a permute on both sides of super()
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def test_channels_first_layernorm_native_and_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 5, 1), ChannelsFirstLayerNorm(5), nn.Flatten(), nn.Linear(5 * 9, 2)).double()
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    assert [k for k, (t, _) in fallback_after_patch(model).items() if t == "ChannelsFirstLayerNorm"] == []
    ik.patch(model)
    assert isinstance(model[1], GhostLayerNorm)
    ik.unpatch(model)
    train = (rand(N, 2, 3, 3, seed=4), rand(N, 2, seed=5))
    val = (rand(M, 2, 3, 3, seed=6), rand(M, 2, seed=7))
    check_exact(model, seq_loss, train, val)


class CountingLinear(nn.Linear):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        return torch.randn(()) * 0 + super().forward(x) * 3   # draws from the global RNG


def test_probe_leaves_rng_parameters_and_buffers_as_they_were():
    model = nn.Sequential(CountingLinear(4, 3), PlusOneLinear(3, 2))
    params = [(p, p.detach().clone()) for p in model.parameters()]
    rng = torch.get_rng_state()
    ik.patch(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert int(model[0].calls) == 0
    assert all(a is b and torch.equal(a, c) for (a, c), b in zip(params, model.parameters()))
    assert isinstance(model[0], GhostLinear) and isinstance(model[1], GhostFallback)
    ik.unpatch(model)
    assert [type(m) for m in model] == [CountingLinear, PlusOneLinear]


# ---- Hugging Face models -----------------------------------------------------------------------
def _hf(name, **kw):
    cfg = getattr(transformers, name + "Config")(**kw)
    torch.manual_seed(0)
    return getattr(transformers, name + "ForCausalLM")(cfg).eval().double()


HF = {
    "opt": lambda: _hf("OPT", vocab_size=61, hidden_size=16, num_hidden_layers=1, ffn_dim=24, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=16, dropout=0.0),
    "falcon": lambda: _hf("Falcon", vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          hidden_dropout=0.0, attention_dropout=0.0, bias=True),
    "gemma": lambda: _hf("Gemma", vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24, num_key_value_heads=1, head_dim=8),
    "gemma2": lambda: _hf("Gemma2", vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=24, num_key_value_heads=1, head_dim=8),
}
EXPECTED = {   # class name -> the ghost layer it must be patched into
    "OPTLearnedPositionalEmbedding": GhostEmbedding, "FalconLinear": GhostLinear,
    "GemmaTextScaledWordEmbedding": GhostEmbedding, "Gemma2TextScaledWordEmbedding": GhostEmbedding,
    "GemmaRMSNorm": GhostHFRMSNorm, "Gemma2RMSNorm": GhostHFRMSNorm,
}


@pytest.mark.parametrize("kind", sorted(HF))
def test_hf_subclasses_and_norms_are_native(kind):
    """Exactness of these models against the oracle: tests/test_models_coverage.py."""
    model = HF[kind]()
    names = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__name__ in EXPECTED}
    assert names, kind
    ik.patch(model)
    cov = ik.coverage(model)
    assert cov.complete and not cov.fallback, cov
    mods = dict(model.named_modules())
    for n, cname in names.items():
        assert isinstance(mods[n], EXPECTED[cname]), (n, cname)
        if EXPECTED[cname] is GhostHFRMSNorm:
            assert mods[n]._inrun_form == "unit"
    ik.unpatch(model)
    assert {n: type(m).__name__ for n, m in model.named_modules() if n in names} == names


# ---- (1 + weight) RMSNorm and T5LayerNorm ------------------------------------------------------
def _norm(kind, d):
    if kind == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
        norm = GemmaRMSNorm(d, eps=1e-5)
    else:
        from transformers.models.t5.modeling_t5 import T5LayerNorm
        norm = T5LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    return norm


@pytest.mark.parametrize("kind", ["gemma", "t5"])
@pytest.mark.parametrize("d,T", [(7, 3), (13, 0), (8, 5)])
def test_unit_and_t5_rms_norms_native_and_exact(kind, d, T):
    """2-D ([n, d], T=0) and 3-D inputs, odd sizes; the input gradient through the norm is
    checked by the Linear before it."""
    torch.manual_seed(d + T)
    norm = _norm(kind, d)
    model = nn.Sequential(nn.Linear(5, d), norm, nn.Linear(d, 3)).double()
    shape = (T,) if T else ()
    train = (rand(N, *shape, 5, seed=1), rand(N, *shape, 3, seed=2))
    val = (rand(M, *shape, 5, seed=3), rand(M, *shape, 3, seed=4))
    assert fallback_after_patch(model) == {}
    ik.patch(model)
    assert isinstance(norm, GhostHFRMSNorm) and norm._inrun_form == {"gemma": "unit", "t5": "t5"}[kind]
    ik.unpatch(model)
    check_exact(model, seq_loss, train, val)
    norm_only = nn.Sequential(norm)   # the norm alone: its weight's per-sample gradients
    check_exact(norm_only, seq_loss, (rand(N, *shape, d, seed=5), train[1][..., :1].expand(N, *shape, d).contiguous()),
                (rand(M, *shape, d, seed=6), val[1][..., :1].expand(M, *shape, d).contiguous()))


class MeanSubtractingLayerNorm(nn.Module):   # a weight-only LayerNorm: none of the RMS forms
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.eps = 1e-5

    def forward(self, x):
        x = x - x.mean(-1, keepdim=True)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def test_mean_subtracting_norm_is_not_matched_as_an_rms_norm():
    """None of the RMS forms: the norm matcher refuses it; its weight, a broadcast parameter
    multiplied elementwise, is then covered by the raw-parameter rule, exactly."""
    model = nn.Sequential(nn.Linear(5, 7), MeanSubtractingLayerNorm(7)).double()
    check_exact(model, seq_loss, lin_batch(N, 5, 7, seed=1), lin_batch(M, 5, 7, seed=2))
    ik.patch(model)
    assert not isinstance(model[1], GhostHFRMSNorm) and isinstance(model[1], GhostRawParams)
    ik.grad_dot(model, seq_loss, lin_batch(N, 5, 7, seed=1), lin_batch(M, 5, 7, seed=2))
    assert not ik.coverage(model).fallback
    ik.unpatch(model)


# ---- raw parameters broadcast over the batch ---------------------------------------------------
class TokenBlock(nn.Module):
    """A cls token concatenated, a position table added, a layer scale multiplied, a child Linear."""

    def __init__(self, d=6, t=4):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, t + 1, d))
        self.scale = nn.Parameter(torch.randn(d))
        self.proj = nn.Linear(d, d)
        self.mode = "plain"

    def forward(self, x):
        h = torch.cat((self.cls.expand(x.shape[0], -1, -1), x), 1)
        if self.mode == "sliced":
            h = h + self.pos[:, : h.shape[1]]
        else:
            h = h + self.pos
        return h + self.scale * self.proj(torch.tanh(h))


def _token_model():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 6), TokenBlock(), nn.Linear(6, 2)).double()


def token_batch(n, seed):
    return rand(n, 4, 3, seed=seed), rand(n, 5, 2, seed=seed + 50)


def test_broadcast_parameters_native_and_exact():
    model = _token_model()
    check_exact(model, seq_loss, token_batch(N, 1), token_batch(M, 2))
    ik.patch(model)
    assert isinstance(model[1], GhostRawParams) and isinstance(model[1].proj, GhostLinear)
    ik.grad_dot(model, seq_loss, token_batch(N, 1), token_batch(M, 2))
    cov = ik.coverage(model)
    assert cov.complete and not cov.fallback, cov   # the check passed: the native route ran
    ik.unpatch(model)
    assert type(model[1]) is TokenBlock and type(model[1].proj) is nn.Linear


def test_engine_with_broadcast_parameters_matches_the_oracle():
    model = _token_model()
    train, val = token_batch(N, 1), token_batch(M, 2)
    orc = Oracle(model, seq_loss, train, val)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, seq_loss, val, num_samples=N, update="sgd")
    opt.zero_grad()
    eng.step(train, torch.arange(N))
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, orc.train[n].mean(0), rtol=1e-10, atol=1e-12, msg=n)
    opt.step()
    assert rel_err(eng.last_values, 0.1 * orc.dot() / (N * M)) <= TOL
    assert not ik.coverage(model).fallback


def test_unsplittable_use_falls_back_per_signature_and_stays_exact():
    """An indexed table (pos[:, :T]) is not split natively: that call signature runs the
    per-sample fallback (children included) and coverage() lists the module."""
    model = _token_model()
    model[1].mode = "sliced"
    check_exact(model, seq_loss, token_batch(N, 1), token_batch(M, 2))
    ik.patch(model)
    ik.grad_dot(model, seq_loss, token_batch(N, 1), token_batch(M, 2))
    assert list(ik.coverage(model).fallback) == ["1"]
    assert "pos" in model[1]._inrun_raw_fallback and "getitem" in model[1]._inrun_raw_fallback
    ik.unpatch(model)


def test_a_changed_path_after_the_check_is_an_error():
    model = _token_model()
    ik.patch(model)
    ik.grad_dot(model, seq_loss, token_batch(N, 1), token_batch(M, 2))   # checked: native
    model[1].mode = "sliced"   # same signature, another path (a data-dependent branch)
    with pytest.raises(RuntimeError, match=r"'1' \(TokenBlock\) uses its parameter 'pos' in __getitem__"):
        ik.grad_dot(model, seq_loss, token_batch(N, 1), token_batch(M, 2))


class CouplingBlock(nn.Module):
    def __init__(self, d=3):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.scale * (x - x.mean(0))


def test_sample_coupling_module_with_broadcast_parameter_is_refused():
    model = nn.Sequential(nn.Linear(3, 3), CouplingBlock()).double()
    with pytest.raises(ik.BatchCouplingError, match="'1'"):
        ik.grad_dot(model, seq_loss, lin_batch(N, 3, 3, seed=1), lin_batch(M, 3, 3, seed=2))


def test_fallback_off_still_refuses_modules_with_own_parameters():
    with pytest.raises(ik.UnsupportedModuleError, match="TokenBlock"):
        ik.patch(_token_model(), fallback=False)


def test_vit_at_another_image_size_falls_back_for_that_signature():
    """ViT's position table interpolated (interpolate_pos_encoding=True, 12x12 images on an
    8x8 model): indexed and resized, so that signature runs the fallback, exactly."""
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=24, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval().double()

    def loss(m, b):
        logits = m(pixel_values=b[0], interpolate_pos_encoding=b[0].shape[-1] != 8).logits
        return F.cross_entropy(logits, b[1], reduction="none")

    g = torch.Generator().manual_seed(5)

    def images(n, size):
        return (torch.randn(n, 3, size, size, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=g))

    big, small = (lambda n: images(n, 12)), (lambda n: images(n, 8))  # noqa: E731
    ik.patch(model)
    s_tr, s_va = small(N), small(M)
    ik.grad_dot(model, loss, s_tr, s_va)
    assert not ik.coverage(model).fallback            # 8x8: native
    ik.unpatch(model)
    tr, va = big(N), big(M)
    orc = Oracle(model, loss, tr, va)
    ik.patch(model)
    got = ik.grad_dot(model, loss, tr, va, per_val=True)
    assert rel_err(got, orc.dot(per_val=True)) <= 1e-9
    assert list(ik.coverage(model).fallback) == ["vit.embeddings"]
    ik.unpatch(model)
