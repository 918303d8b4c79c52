"""ik.causal_lm_loss and ik.sequence_classification_loss (README "Supported layers and models"
and the Trainer section): every batch format the README names, each row's loss against the
Hugging Face model's own loss for that row alone, and the engine's values with explicit labels
against a float64 batch-size-1 oracle.

- causal LM: explicit `labels` (not a copy of input_ids, with -100 entries), labels absent
  (input_ids with attention_mask == 0 ignored), right padding, a row without any labelled token;
- sequence classification: single-label (int labels), regression (num_labels=1, and
  problem_type="regression" with several outputs), multi-label (float labels).

Measured (float64): loss vs a float64 reference <= 4e-16 relative (vs the model's own loss, which
HF computes in float32 for causal LMs: 7e-8); engine vs oracle <= 3e-15."""
from __future__ import annotations

import pytest
import torch

import inrun_kernels as ik
from tests.oracle import Oracle, rel_err
from tests.test_hf_models import PAD, V, build, gpt2_config, make_batch

transformers = pytest.importorskip("transformers")

TOL = 1e-10   # float64 everywhere here


def _rows(batch):
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)]


def _lm_reference(model, batch, labels):
    """Each row alone: float64 next-token cross-entropy, mean over its labelled tokens (what the
    model's own loss computes, in float32 there), and that float32 loss of the model."""
    ours, theirs = [], []
    for i, row in enumerate(_rows(batch)):
        row = {k: v for k, v in row.items() if k != "labels"}
        out = model(**row, labels=labels[i:i + 1])
        logits, y = out.logits[0, :-1], labels[i, 1:]
        ours.append(torch.nn.functional.cross_entropy(logits[y != -100], y[y != -100]))
        theirs.append(out.loss)
    return torch.stack(ours), torch.stack(theirs)


def _lm_labels(batch, seed):
    """Labels that are NOT input_ids: other token ids, -100 on padding and on a few real tokens."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, V, batch["input_ids"].shape, generator=g)
    labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, 3] = -100
    return labels


def _engine_matches_the_oracle(model, loss_fn, train, val, lr=0.1):
    """One SGD step of the engine: values (lr / (N M)) <g_i, sum_v g_v> of the float64 oracle."""
    orc = Oracle(model, loss_fn, train, val)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    eng = ik.InRunShapley(model, opt, loss_fn, val)
    n = train["input_ids"].shape[0]
    eng.step(train, torch.arange(n))
    opt.step()
    want = lr / (n * val["input_ids"].shape[0]) * orc.dot()
    assert rel_err(eng.last_values, want) <= TOL, rel_err(eng.last_values, want)


@torch.no_grad()
def test_causal_lm_loss_uses_explicit_labels_with_ignored_tokens():
    model = build("gpt2_tied").double()
    batch = make_batch(4, seed=3)
    batch["labels"] = _lm_labels(batch, 4)
    got = ik.causal_lm_loss(model, batch)
    assert got.shape == (4,) and got.dtype == torch.float64
    want, hf = _lm_reference(model, batch, batch["labels"])
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    assert rel_err(got, hf) <= 1e-6, rel_err(got, hf)   # HF's loss is float32: measured 7e-8
    # the labels matter: without them the helper predicts input_ids (different numbers)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert rel_err(ik.causal_lm_loss(model, no_labels), want) > 1e-2


@torch.no_grad()
def test_causal_lm_loss_without_labels_ignores_padding():
    model = build("gpt2_tied").double()
    batch = make_batch(4, seed=5)
    got = ik.causal_lm_loss(model, batch)
    want, hf = _lm_reference(model, batch, batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert rel_err(got, want) <= TOL, rel_err(got, want)
    assert rel_err(got, hf) <= 1e-6, rel_err(got, hf)
    # a row's loss does not depend on the padding it carries (mask and labels -100)
    longer = {k: torch.cat([v, torch.full_like(v[:, :3], PAD if k == "input_ids" else 0)], 1)
              for k, v in batch.items()}
    assert rel_err(ik.causal_lm_loss(model, longer), got) <= TOL


def test_a_row_without_labelled_tokens_has_loss_zero_and_zero_gradient():
    model = build("gpt2_tied").double()
    batch = make_batch(3, seed=6)
    batch["labels"] = _lm_labels(batch, 7)
    batch["labels"][1] = -100
    loss = ik.causal_lm_loss(model, batch)
    assert loss[1] == 0 and (loss[[0, 2]] > 0).all()
    val = make_batch(2, seed=8)
    val["labels"] = _lm_labels(val, 9)
    dots = ik.grad_dot(model, ik.causal_lm_loss, batch, val)
    assert dots[1] == 0 and (dots[[0, 2]] != 0).all()


def test_engine_values_with_explicit_labels_and_other_lengths():
    """Labels travel with the rows: the engine pads the shorter batch (labels with -100) and the
    values equal the oracle's (each batch at its own length)."""
    model = build("gpt2_tied").double()
    train, val = make_batch(5, T=9, seed=1), make_batch(3, T=6, seed=2)
    train["labels"], val["labels"] = _lm_labels(train, 3), _lm_labels(val, 4)
    _engine_matches_the_oracle(model, ik.causal_lm_loss, train, val)


# ---- sequence classification -------------------------------------------------------------------
def _cls_model(num_labels, problem_type=None):
    torch.manual_seed(0)
    cfg = gpt2_config(num_labels=num_labels)
    if problem_type is not None:
        cfg.problem_type = problem_type
    return transformers.GPT2ForSequenceClassification(cfg).double().eval()


def _cls_batch(n, kind, num_labels, seed):
    b = make_batch(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    if kind == "single":
        b["labels"] = torch.randint(0, num_labels, (n,), generator=g)
    elif kind == "regression":
        y = torch.randn(n, num_labels, generator=g, dtype=torch.float64)
        b["labels"] = y[:, 0] if num_labels == 1 else y
    else:   # multi-label: 0/1 targets per label, as floats
        b["labels"] = torch.randint(0, 2, (n, num_labels), generator=g).double()
    return b


CLS_CASES = {
    "single_label": (3, None, "single"),
    "regression_1": (1, None, "regression"),            # num_labels == 1: regression by default
    "regression_3": (3, "regression", "regression"),
    "multi_label": (4, "multi_label_classification", "multi"),
    "multi_label_inferred": (4, None, "multi"),         # float labels: multi-label by default
}


@pytest.mark.parametrize("case", list(CLS_CASES))
@torch.no_grad()
def test_sequence_classification_loss_matches_the_models_own_loss(case):
    num_labels, problem, kind = CLS_CASES[case]
    model = _cls_model(num_labels, problem)
    batch = _cls_batch(4, kind, num_labels, seed=11)
    got = ik.sequence_classification_loss(model, batch)
    assert got.shape == (4,) and got.dtype == torch.float64
    want = torch.stack([model(**row).loss for row in _rows(batch)])
    assert rel_err(got, want) <= TOL, (case, rel_err(got, want))
    # and the mean over the batch is the model's loss of the whole batch
    assert abs(float(got.mean() - model(**batch).loss)) <= TOL * abs(float(got.mean()))


@pytest.mark.parametrize("case", ["regression_3", "multi_label"])
def test_engine_values_for_regression_and_multi_label(case):
    num_labels, problem, kind = CLS_CASES[case]
    model = _cls_model(num_labels, problem)
    train, val = _cls_batch(5, kind, num_labels, seed=1), _cls_batch(3, kind, num_labels, seed=2)
    _engine_matches_the_oracle(model, ik.sequence_classification_loss, train, val)


def test_helpers_refuse_what_they_cannot_use():
    model = _cls_model(3)
    with pytest.raises(ValueError, match="labels"):
        ik.sequence_classification_loss(model, make_batch(2, seed=1))
    with pytest.raises(TypeError, match="dict batch"):
        ik.causal_lm_loss(build("gpt2_tied"), (torch.zeros(2, 3, dtype=torch.long),))
    with pytest.raises(ValueError, match="labels.*input_ids"):
        ik.causal_lm_loss(build("gpt2_tied"), {"attention_mask": torch.ones(2, 3, dtype=torch.long)})
    model.config.problem_type = "ranking"
    with pytest.raises(ValueError, match="problem_type"):
        ik.sequence_classification_loss(model, _cls_batch(2, "single", 3, seed=1))
