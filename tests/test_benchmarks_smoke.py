"""Smoke tests of the benchmark code (benchmarks/): the peer baselines must give the same
per-sample products as ik.grad_dot, and the harness must run end to end on a micro config.

Exact (fp64 here, fp32 rounding in the benchmarks): (a) our re-implementation of the authors'
engine in fp32/fp64 (the original casts to bf16 and is not exact; it also mis-handles M > 1 on
Conv1D and tied weights, which ours fixes), (b) torch.func vmap per-sample gradients, (c) the
batch-size-1 loop. All three also leave .grad = the mean training gradient.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

pytest.importorskip("transformers")
import inrun_kernels as ik  # noqa: E402
from benchmarks import baselines as bl  # noqa: E402
from benchmarks.common import StepConfig, causal_lm_loss, make_data, make_model  # noqa: E402

TINY = StepConfig(n_layer=2, d=32, T=13, N=4, M=3, vocab=67, n_head=2, dtype="float64")


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture()
def tiny():
    model = make_model(TINY)
    train, val = make_data(TINY)
    mean_grad = torch.autograd.grad(causal_lm_loss(model, train).mean(), list(model.parameters()))
    return model, train, val, dict(zip([n for n, _ in model.named_parameters()], mean_grad))


def _check_grads(model, ref):
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_loop_matches_grad_dot(tiny):
    model, train, val, mean_grad = tiny
    ref = ik.grad_dot(model, causal_lm_loss, train, val)
    got = bl.per_sample_loop(model, causal_lm_loss, train, val)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    _check_grads(model, mean_grad)


def test_vmap_matches_grad_dot(tiny):
    model, train, val, mean_grad = tiny
    ref = ik.grad_dot(model, causal_lm_loss, train, val)
    got = bl.per_sample_vmap(model, causal_lm_loss, train, val)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    _check_grads(model, mean_grad)


@pytest.mark.parametrize("per_val", [False, True])
def test_authors_matches_grad_dot(tiny, per_val):
    model, train, val, mean_grad = tiny
    ref = ik.grad_dot(model, causal_lm_loss, train, val, per_val=per_val)
    eng = bl.AuthorsEngine(model, causal_lm_loss, val, per_val=per_val, compute_dtype=torch.float64)
    got = eng.step(train)
    eng.remove()
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-12)
    _check_grads(model, mean_grad)


def test_authors_fp32_close():
    cfg = StepConfig(**{**TINY.to_dict(), "dtype": "float32"})
    model = make_model(cfg)
    train, val = make_data(cfg)
    ref = ik.grad_dot(model, causal_lm_loss, train, val)
    eng = bl.AuthorsEngine(model, causal_lm_loss, val)
    torch.testing.assert_close(eng.step(train), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_harness_runs_every_method():
    from benchmarks import harness as H
    from benchmarks import methods as M
    cfg = StepConfig(n_layer=1, d=32, T=16, N=2, M=2, vocab=64, n_head=2)
    res = H.time_config(cfg, M.method_names(), rounds=2, cap_s=60, log=lambda *a: None)
    for name in ("plain", "plain_concat", "inrun[torch]", "authors", "vmap", "loop"):
        assert "ratio" in res[name], (name, res[name])
    assert res["plain"]["ratio"] == 1.0
    for name in ("inrun[triton]", "inrun[cpp]"):   # on CPU: skipped with a reason, not omitted
        assert name in res and ("ratio" in res[name] or res[name]["skipped"])
