"""Architectures beyond the native ghost layers, patched in place on tiny random configs (no
downloads): every trainable parameter is covered (natively or by the exact per-sample fallback,
layers/fallback.py), and grad_dot (per_val) and one engine step's values equal the float64
batch-size-1 oracle (tests/oracle.py) to <= 1e-6 relative."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tests.oracle import Oracle, rel_err

transformers = pytest.importorskip("transformers")

import inrun_kernels as ik  # noqa: E402
from inrun_kernels.layers.registry import GhostModule  # noqa: E402

V, T, N, M = 61, 6, 3, 2


def _lm(cfg_name, model_name, **kw):
    def build():
        cfg = getattr(transformers, cfg_name)(**kw)
        return getattr(transformers, model_name)(cfg)
    return build


def _perturb_norms(m):
    with torch.no_grad():   # norm weights start at 0/1: make them informative
        for n, p in m.named_parameters():
            if "norm" in n.lower() or "layer_scale" in n or "lambda" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
LMS = {
    "opt": _lm("OPTConfig", "OPTForCausalLM", vocab_size=V, hidden_size=16, num_hidden_layers=1,
               ffn_dim=24, num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=16,
               dropout=0.0, attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "falcon": _lm("FalconConfig", "FalconForCausalLM", vocab_size=V, hidden_size=16, num_hidden_layers=1,
                  num_attention_heads=2, hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2),
    "gemma": _lm("GemmaConfig", "GemmaForCausalLM", intermediate_size=24, num_key_value_heads=1,
                 head_dim=8, **COMMON),
    "gemma2": _lm("Gemma2Config", "Gemma2ForCausalLM", intermediate_size=24, num_key_value_heads=1,
                  head_dim=8, **COMMON),
    "mixtral": _lm("MixtralConfig", "MixtralForCausalLM", intermediate_size=24, num_key_value_heads=1,
                   num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
                   output_router_logits=False, experts_implementation="eager", **COMMON),
    "mamba": _lm("MambaConfig", "MambaForCausalLM", vocab_size=V, hidden_size=16, state_size=4,
                 num_hidden_layers=1, expand=2, conv_kernel=3, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, use_mambapy=False, use_cache=False),
}
VISION = {
    "vit": _lm("ViTConfig", "ViTForImageClassification", image_size=8, patch_size=4, num_channels=3,
               hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3),
    "convnext": _lm("ConvNextConfig", "ConvNextForImageClassification", num_channels=3, patch_size=2,
                    num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=8, num_labels=3,
                    drop_path_rate=0.0),
    "swin": _lm("SwinConfig", "SwinForImageClassification", image_size=8, patch_size=2, num_channels=3,
                embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=2, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, drop_path_rate=0.0, num_labels=3),
}


def lm_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[-1, T - 2:] = 0          # one right-padded row
    ids[-1, T - 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (n,), generator=g)}


def image_loss(model, b):
    return F.cross_entropy(model(pixel_values=b["pixel_values"]).logits.float(), b["labels"], reduction="none")


def t5_loss(model, b):
    labels = b["labels"]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels).logits
    return ik.hf.token_mean_cross_entropy(logits, labels)


def t5_batch(n, seed):
    b = lm_batch(n, seed)
    b["labels"] = torch.randint(3, V, (n, 4), generator=torch.Generator().manual_seed(seed + 7))
    return b


CASES = {k: (v, ik.causal_lm_loss, lm_batch) for k, v in LMS.items()}
# no module left to the per-sample fallback (FalconLinear, OPT's and Gemma's embeddings, Gemma's
# (1 + w) RMSNorm: probe-checked natives; ViT's cls/position parameters, ConvNeXt's layer scale:
# broadcast parameters, layers/rawparam.py)
ALL_NATIVE = {"opt", "falcon", "gemma", "gemma2", "vit", "convnext"}
CASES.update({k: (v, image_loss, image_batch) for k, v in VISION.items()})
T5 = (_lm("T5Config", "T5ForConditionalGeneration", vocab_size=V, d_model=16, d_kv=8, d_ff=24,
                   num_layers=1, num_decoder_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1), t5_loss, t5_batch)


def build(kind):
    torch.manual_seed(0)
    return _perturb_norms(CASES[kind][0]().eval())


def test_t5_is_refused_loudly():
    """T5's relative position bias is computed once per stack, [1, H, q, k], and shared by every
    block and every sample: per-sample gradients of its table cannot be split where it is used
    by the fallback (its module's output has no per-sample layout). An error, never a silent gap."""
    build_t5, loss_fn, make = T5
    torch.manual_seed(0)
    model = build_t5().eval().double()
    with pytest.raises(ik.BatchCouplingError, match="SelfAttention.*no per-sample layout"):
        ik.grad_dot(model, loss_fn, make(N, 1), make(M, 2))


def test_t5_layernorm_and_gemma_norm_native():
    """(1 + weight) RMSNorm (Gemma) and T5LayerNorm as standalone modules: native ghost norms
    (matched by probe, layers/norm.py), exact against the oracle."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    for norm, form in ((T5LayerNorm(7), "t5"), (GemmaRMSNorm(7), "unit")):
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), norm, torch.nn.Linear(7, 2)).double()
        with torch.no_grad():
            norm.weight.normal_()
        loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum((1, 2))  # noqa: E731
        g = torch.Generator().manual_seed(3)
        train = (torch.randn(N, 4, 5, generator=g, dtype=torch.float64), torch.randn(N, 4, 2, generator=g, dtype=torch.float64))
        val = (torch.randn(M, 4, 5, generator=g, dtype=torch.float64), torch.randn(M, 4, 2, generator=g, dtype=torch.float64))
        orc = Oracle(model, loss_fn, train, val)
        assert rel_err(ik.grad_dot(model, loss_fn, train, val, per_val=True), orc.dot(per_val=True)) <= 1e-10
        assert rel_err(ik.grad_gram(model, loss_fn, train), orc.gram()) <= 1e-10
        ik.patch(model)
        cov = ik.coverage(model)
        assert cov.complete and not cov.fallback, cov
        assert isinstance(norm, GhostModule) and norm._inrun_form == form
        ik.unpatch(model)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_products_and_engine_match_oracle(kind):
    _, loss_fn, make = CASES[kind]
    train, val = make(N, 1), make(M, 2)
    model = build(kind).double()
    orc = Oracle(model, loss_fn, train, val)   # float64 copy, batch-size-1 loop, unpatched
    got = ik.grad_dot(model, loss_fn, train, val, per_val=True)
    assert rel_err(got, orc.dot(per_val=True)) <= 1e-6, rel_err(got, orc.dot(per_val=True))
    # one engine step (update='sgd': value = -lr <g_i, mean_v g_v> / N) and the training update
    ref = copy.deepcopy(model)
    ik.patch(model)
    cov = ik.coverage(model)
    assert cov.complete, cov
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # verify=False: the key bias of ViT, Swin and OPT has an exactly-zero gradient (softmax is shift
    # invariant), which ik.verify's relative check reads as rounding noise against zero
    eng = ik.InRunShapley(model, opt, loss_fn, val, num_samples=N, update="sgd",
                          verify=kind not in ("vit", "swin", "opt"))
    opt.zero_grad()
    eng.step(train, torch.arange(N))
    if kind in ALL_NATIVE:   # after a step: a broadcast-parameter module may fall back at a call
        assert not ik.coverage(model).fallback, ik.coverage(model).fallback
    want_grad = orc.train  # per-sample gradients by name
    for n, p in model.named_parameters():
        if p.requires_grad and n in want_grad:
            torch.testing.assert_close(p.grad, want_grad[n].mean(0), rtol=1e-6, atol=1e-9, msg=n)
    opt.step()
    want = 0.1 * orc.dot() / (N * M)   # (lr / N) <g_i, mean_v g_v>
    assert rel_err(eng.last_values, want) <= 1e-6, (rel_err(eng.last_values, want), eng.last_values, want)
    ik.unpatch(model)
    assert all(type(a) is type(b) for a, b in zip(model.modules(), ref.modules()))
