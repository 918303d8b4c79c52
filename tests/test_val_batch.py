"""The validation batch (issue 9, item 3): set_val between steps (any row count), HF dict
batches of another sequence length padded automatically with values unchanged, crash-safe
engine save/load."""
import pytest
import torch

import inrun_kernels as ik
from inrun_kernels.batch import pad_to
from tests.models import MLP, ce_loss, make_data
from tests.oracle import Oracle, rel_err

transformers = pytest.importorskip("transformers")
from tests.test_hf_models import build, make_batch  # noqa: E402


def test_set_val_replaces_the_validation_batch_with_any_row_count():
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2))
    eng.step(make_data(4, (17,), 5, seed=1), torch.arange(4))
    with pytest.raises(RuntimeError, match="pending"):
        eng.set_val(make_data(5, (17,), 5, seed=3))
    opt.step()
    opt.zero_grad()
    val, train = make_data(5, (17,), 5, seed=3), make_data(4, (17,), 5, seed=4)
    want = 0.1 / (4 * 5) * Oracle(model, ce_loss, train, val).dot()
    eng.set_val(val)
    eng.step(train, torch.arange(4))
    opt.step()
    assert rel_err(eng.last_values, want) < 1e-10
    with pytest.raises(ValueError, match="empty"):
        eng.set_val(make_data(0, (17,), 5))
    eng.val = make_data(2, (17,), 5, seed=5)   # plain assignment is set_val too
    assert eng.n_val == 2


@pytest.mark.parametrize("val_T,train_T", [(5, 9), (9, 6)])
@pytest.mark.parametrize("estimator", ["first", "midpoint"])
def test_dict_batches_of_other_lengths_are_padded_and_values_unchanged(val_T, train_T, estimator):
    model = build("gpt2_tied").double().train()
    train, val = make_batch(5, T=train_T, seed=1), make_batch(3, T=val_T, seed=2)
    orc = Oracle(model, ik.causal_lm_loss, train, val)   # each batch at its own length
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, val, estimator=estimator)  # pad id from config
    eng.step(train, torch.arange(5))
    opt.step()
    if estimator == "first":
        assert rel_err(eng.last_values, 0.1 / (5 * 3) * orc.dot()) < 1e-10
    # the same values with the validation batch padded by hand to a longer length
    model2 = build("gpt2_tied").double().train()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    longer = pad_to(val, max(val_T, train_T) + 2, 0)
    eng2 = ik.InRunShapley(model2, opt2, ik.causal_lm_loss, longer, estimator=estimator)
    eng2.step(train, torch.arange(5))
    opt2.step()
    assert rel_err(eng2.last_values, eng.last_values) < 1e-10


def test_dict_batch_without_a_pad_id_is_a_clear_error():
    model = build("gpt2_tied").double()
    model.config.pad_token_id = None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ik.causal_lm_loss, {"input_ids": make_batch(3, T=5)["input_ids"]})
    with pytest.raises(ValueError, match="pad id"):
        eng.step({"input_ids": make_batch(4, T=8)["input_ids"]}, torch.arange(4))
    assert all(p.grad is None for p in model.parameters())


def test_engine_save_and_load_round_trip(tmp_path):
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2), num_samples=10)
    eng.step(make_data(4, (17,), 5, seed=1), torch.tensor([1, 3, 3, 9]))
    opt.step()
    path = str(tmp_path / "eng.pt")
    eng.save(path)
    eng2 = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2), num_samples=10)
    eng2.load(path)
    assert torch.equal(eng2.values, eng.values) and torch.equal(eng2.counts, eng.counts)
    assert eng2.steps == 1
    eng3 = ik.InRunShapley(model, opt, ce_loss, make_data(2, (17,), 5, seed=2), num_samples=11)
    with pytest.raises(ValueError, match="num_samples"):
        eng3.load(path)
    assert eng3.steps == 0 and eng3.counts.sum() == 0
    assert [f.name for f in tmp_path.iterdir()] == ["eng.pt"]
