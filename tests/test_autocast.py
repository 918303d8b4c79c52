"""Mixed precision: the engine under torch.autocast (bf16 on CPU here; the same code path as
CUDA autocast) trains like plain autocast training and gives values close to float32's."""
import copy

import pytest
import torch

import inrun_kernels as ik

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=61, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 61, (n, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_engine_under_bf16_autocast():
    model = tiny_gpt2()
    plain = copy.deepcopy(model)
    ref32 = copy.deepcopy(model)
    val = batch(3, 1)
    train = batch(5, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, val)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eng.step(train, torch.arange(5))
        loss = ik.causal_lm_loss(plain, train).mean()
    loss.backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32, n
        torch.testing.assert_close(p.grad, q.grad, rtol=0.05, atol=2e-3, msg=n)
    eng32 = ik.InRunShapley(ref32, torch.optim.SGD(ref32.parameters(), lr=0.1), ik.causal_lm_loss, val)
    eng32.step(train, torch.arange(5))
    eng.commit(), eng32.commit()
    v16, v32 = eng.last_values, eng32.last_values
    assert torch.isfinite(v16).all()
    assert float((v16 - v32).norm() / v32.norm()) < 0.1
