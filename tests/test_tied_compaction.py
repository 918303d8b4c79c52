"""A weight tied between an output head and an embedding (GPT-2's lm_head = wte) keeps, until
the embedding's backward, only the logits-gradient columns of the token ids the cross terms
read: exact (checked against the oracle) and without holding the [rows, T, vocab] gradient."""
import pytest
import torch

import inrun_kernels as ik
from inrun_kernels import session as session_mod
from inrun_kernels.reps import Outer
from tests.oracle import Oracle, rel_err
from tests.test_layers_embedding_norm import TiedLM, _ids, lm_loss

V, T = 97, 5


@pytest.fixture
def kept_widths(monkeypatch):
    widths = []
    real = session_mod.GhostSession._compact

    def spy(self, key, tr, va):
        out = real(self, key, tr, va)
        if isinstance(tr, Outer):
            widths.append((out[0].B.shape[-1], out[1].B.shape[-1]))
        return out
    monkeypatch.setattr(session_mod.GhostSession, "_compact", spy)
    return widths


@pytest.mark.parametrize("kind", ["dot", "per_val", "gram", "norms"])
def test_tied_head_keeps_only_needed_columns(kind, kept_widths):
    torch.manual_seed(0)
    model = TiedLM(V=V, T=T, tied=True).double()
    train = (_ids(6, T, 20, seed=1), _ids(6, T, V, seed=3))       # ids < 20: few distinct rows
    val = (_ids(3, T, 20, seed=2) + 20, _ids(3, T, V, seed=4))    # 20 <= ids < 40
    orc = Oracle(model, lm_loss, train, val)
    if kind in ("dot", "per_val"):
        got = ik.grad_dot(model, lm_loss, train, val, per_val=kind == "per_val")
        want = orc.dot(per_val=kind == "per_val")
    elif kind == "gram":
        got, want = ik.grad_gram(model, lm_loss, train), orc.gram()
    else:
        got, want = ik.grad_norms(model, lm_loss, train), orc.norms()
    assert rel_err(got, want) < 1e-10
    (w_tr, w_va), = kept_widths    # the head's use, compacted
    assert w_tr <= 40 and w_va <= 20, (w_tr, w_va)
