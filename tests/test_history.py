"""Group history and validation losses recorded by the engine (issue 11, item 2): per-group
sums every k steps whose rows add up to the ledger, validation loss at each step's weights
equal to a plain evaluation, both surviving save/load."""
import pytest
import torch

import inrun_kernels as ik
from tests.models import TokenMixer, ce_loss, make_data

GROUPS = torch.tensor([0, 1, 1, 0, 2, -1, 0, 1, 2, 2, 0, 1])


def _run(steps, estimator="first", opt_cls=torch.optim.SGD, history_every=2, **kw):
    torch.manual_seed(0)
    model = TokenMixer().double()
    opt = opt_cls(model.parameters(), lr=0.05)
    val = make_data(3, (7, 17), 4, seed=1)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=12, groups=GROUPS,
                          group_names=["a", "b", "c"], history_every=history_every,
                          estimator=estimator, **kw)
    seen, per_step = [], []
    for s in range(steps):
        ids = torch.randperm(12)[:5]
        with torch.no_grad():
            model.eval()
            seen.append(float(ce_loss(model, val).mean()))
            model.train()
        opt.zero_grad()
        eng.step(make_data(5, (7, 17), 4, seed=10 + s), ids)
        opt.step()
        per_step.append(torch.zeros(3, dtype=torch.float64).index_add_(
            0, GROUPS[ids].clamp_min(0), eng.last_values * (GROUPS[ids] >= 0)))
    eng.per_step_groups = torch.stack(per_step) if per_step else None   # [steps, groups]
    return eng, seen


@pytest.mark.parametrize("estimator, opt_cls", [("first", torch.optim.SGD), ("first", torch.optim.AdamW),
                                                ("midpoint", torch.optim.SGD)])
def test_history_rows_sum_to_the_group_totals_and_val_loss_is_recorded(estimator, opt_cls):
    eng, seen = _run(5, estimator, opt_cls)
    assert eng.history_steps.tolist() == [2, 4, 5]   # the last row: the step since the last record
    want = torch.stack([eng.values[GROUPS == g].sum() for g in range(3)])
    torch.testing.assert_close(eng.history.sum(0), want, rtol=1e-12, atol=1e-15)
    assert eng.history.shape == (3, 3)
    # each row holds the steps of its own record: 1-2, 3-4, 5
    by_step = eng.per_step_groups
    rows = torch.stack([by_step[0:2].sum(0), by_step[2:4].sum(0), by_step[4:5].sum(0)])
    torch.testing.assert_close(eng.history, rows, rtol=1e-12, atol=1e-15)
    if estimator == "midpoint":   # its validation pass runs at shifted weights: not recorded
        assert torch.isnan(eng.val_loss).all() and eng.val_loss.numel() == 5
    else:
        torch.testing.assert_close(eng.val_loss, torch.tensor(seen, dtype=torch.float64), rtol=1e-12, atol=0)


def test_history_and_val_loss_survive_save_and_load(tmp_path):
    eng, _ = _run(3)
    eng.save(tmp_path / "v.pt")
    other, _ = _run(0)
    other.load(tmp_path / "v.pt")
    assert torch.equal(other.history, eng.history) and torch.equal(other.history_steps, eng.history_steps)
    assert torch.equal(other.val_loss, eng.val_loss) and torch.equal(other.values, eng.values)
    model = TokenMixer().double()
    two_groups = ik.InRunShapley(model, torch.optim.SGD(model.parameters(), lr=0.1), ce_loss,
                                 make_data(3, (7, 17), 4, seed=1), num_samples=12,
                                 groups=torch.zeros(12, dtype=torch.long), history_every=2)
    with pytest.raises(ValueError, match="same groups"):
        two_groups.load(tmp_path / "v.pt")
    assert two_groups.steps == 0 and not two_groups.values.any()   # nothing changed


def test_bad_groups_are_errors():
    model = TokenMixer().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    val = make_data(3, (7, 17), 4, seed=1)
    with pytest.raises(ValueError, match="num_samples"):
        ik.InRunShapley(model, opt, ce_loss, val, groups=GROUPS)
    with pytest.raises(ValueError, match=r"shape \[num_samples\]"):
        ik.InRunShapley(model, opt, ce_loss, val, num_samples=11, groups=GROUPS)
    with pytest.raises(TypeError, match="integer"):
        ik.InRunShapley(model, opt, ce_loss, val, num_samples=12, groups=GROUPS.double())
    with pytest.raises(ValueError, match="history_every"):
        ik.InRunShapley(model, opt, ce_loss, val, num_samples=12, history_every=-1)
