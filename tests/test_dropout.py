"""Dropout: the training rows get exactly plain training's dropout, the validation gradient is
the one of the model as evaluated (no dropout), for every estimator (issue 9, item 4)."""
import copy

import pytest
import torch
from torch import nn

import inrun_kernels as ik
from tests.models import ce_loss, make_data
from tests.oracle import rel_err


class DropMLP(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.a = nn.Linear(17, 33)
        self.drop = nn.Dropout(p)
        self.b = nn.Linear(33, 5)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


def _oracle_first_sgd(model, train, val, lr, seed):
    """(lr / (N M)) <g_i, sum_v g_v>: g_i through the masks plain training draws with `seed`,
    g_v of the model in eval mode; on an unpatched float64 copy."""
    ref = copy.deepcopy(model)
    ik.unpatch(ref)
    params = list(ref.parameters())
    torch.manual_seed(seed)
    losses = ce_loss(ref, train)
    g = [torch.cat([t.flatten() for t in torch.autograd.grad(l, params, retain_graph=True)]) for l in losses]
    ref.eval()
    gv = torch.cat([t.flatten() for t in torch.autograd.grad(ce_loss(ref, val).sum(), params)])
    N, M = len(g), val[0].shape[0]
    return torch.stack(g) @ gv * lr / (N * M)


def test_training_with_dropout_is_plain_training_and_values_use_eval_validation():
    """The same dropout masks as plain training: parameters equal to rounding (the split route
    sums the weight gradient in another order than one GEMM; a different mask is ~1e-2 off)."""
    torch.manual_seed(0)
    model = DropMLP().double()
    plain = copy.deepcopy(model)
    opt, opt_p = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, plain))
    val = make_data(3, (17,), 5, seed=9)
    eng = ik.InRunShapley(model, opt, ce_loss, val)
    for s in range(3):
        train = make_data(4, (17,), 5, seed=s)
        want = _oracle_first_sgd(model, train, val, 0.1, 100 + s)
        torch.manual_seed(100 + s)
        opt.zero_grad()
        eng.step(train, torch.arange(4))
        opt.step()
        torch.manual_seed(100 + s)
        opt_p.zero_grad()
        ce_loss(plain, train).mean().backward()
        opt_p.step()
        assert rel_err(eng.last_values, want) < 1e-10
    for p, q in zip(model.parameters(), plain.parameters()):
        assert rel_err(p, q) <= 1e-14


@pytest.mark.parametrize("estimator", ["first", "midpoint"])
def test_validation_pass_runs_in_eval_mode_and_restores_modes(estimator):
    torch.manual_seed(0)
    model = DropMLP(p=0.5).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    val = make_data(3, (17,), 5, seed=9)
    eng = ik.InRunShapley(model, opt, ce_loss, val, estimator=estimator)
    runs = []
    for seed in (1, 2):   # the training rows' masks are fixed by the seed; the validation side has none
        m2 = copy.deepcopy(model)
        o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
        e2 = ik.InRunShapley(m2, o2, ce_loss, val, estimator=estimator)
        torch.manual_seed(7)
        e2.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
        torch.manual_seed(seed)   # RNG at commit differs: values must not depend on it
        o2.step()
        runs.append(e2.last_values)
        assert m2.training and m2.drop.training
    assert torch.equal(runs[0], runs[1])
    del eng


def test_a_dropout_that_cannot_be_split_by_rows_warns_once_and_names_it():
    class MaskDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(17, 5)
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            mask = self.drop(torch.ones(1, 5, dtype=x.dtype))   # no batch dim: applied to all rows
            return self.a(x) * mask

    model = MaskDrop().double()
    with pytest.warns(UserWarning, match="dropout 'drop'.*validation rows too"):
        ik.grad_dot(model, ce_loss, make_data(4, (17,), 5, seed=1), make_data(2, (17,), 5, seed=2))


def test_functional_dropout_in_the_joint_pass_warns_and_names_the_module():
    from transformers import LlamaConfig, LlamaForCausalLM
    conf = LlamaConfig(vocab_size=31, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.1)
    conf._attn_implementation = "eager"
    model = LlamaForCausalLM(conf).double().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    batch = lambda n: {"input_ids": torch.randint(0, 31, (n, 6), generator=g)}  # noqa: E731
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, batch(2))
    with pytest.warns(UserWarning, match=r"self_attn.attention_dropout=0.1.*estimator='midpoint'"):
        eng.step(batch(3), torch.arange(3))
    opt.step()
