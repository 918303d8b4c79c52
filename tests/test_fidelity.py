"""fidelity_check: exact Shapley by enumeration, the real one-step utility, no side effects, and
the estimators against the exact values where the closed forms are exact (quadratic utility)."""
import copy
import itertools
import math

import pytest
import torch
from torch import nn

from inrun_kernels import fidelity as fid
from tests.models import MLP, Tied, ce_loss, make_data


def _has_estimators() -> bool:
    import inspect

    from inrun_kernels.shapley import InRunShapley
    params = inspect.signature(InRunShapley.__init__).parameters
    return "estimator" in params and hasattr(InRunShapley, "commit")


needs_engine = pytest.mark.skipif(not _has_estimators(), reason="InRunShapley(estimator=, update=) not in yet")


# ---- shapley_by_enumeration -------------------------------------------------------------------
def _permutation_shapley(U, n):
    phi = torch.zeros(n, dtype=torch.float64)
    perms = list(itertools.permutations(range(n)))
    for perm in perms:
        m = 0
        for i in perm:
            phi[i] += U[m | (1 << i)] - U[m]
            m |= 1 << i
    return phi / len(perms)


def test_enumeration_matches_permutations_n4():
    U = torch.randn(16, dtype=torch.float64)
    torch.testing.assert_close(fid.shapley_by_enumeration(U), _permutation_shapley(U, 4), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n", [1, 3, 7, 10])
def test_efficiency_and_symmetry(n):
    U = torch.randn(2 ** n, dtype=torch.float64)
    phi = fid.shapley_by_enumeration(U)
    torch.testing.assert_close(phi.sum(), U[-1] - U[0], rtol=1e-10, atol=1e-12)
    # a symmetric game (U depends on |S| only): equal values
    bits = fid.subset_bits(n)
    f = torch.randn(n + 1, dtype=torch.float64)
    phi = fid.shapley_by_enumeration(f[bits.sum(1)])
    torch.testing.assert_close(phi, torch.full((n,), float(f[n] - f[0]) / n, dtype=torch.float64))


def test_linear_and_pairwise_games():
    n = 6
    bits = fid.subset_bits(n).to(torch.float64)
    a = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(fid.shapley_by_enumeration(3.0 + bits @ a), a, rtol=1e-12, atol=1e-13)
    # quadratic game x_S^T Q x_S: pairwise terms split equally -> phi_i = sum_j Q_ij (Q symmetric)
    Q = torch.randn(n, n, dtype=torch.float64)
    Q = Q + Q.T
    U = torch.einsum("mi,ij,mj->m", bits, Q, bits)
    torch.testing.assert_close(fid.shapley_by_enumeration(U), Q.sum(1), rtol=1e-12, atol=1e-12)
    # a null player
    U = bits[:, 1:] @ a[1:]
    assert fid.shapley_by_enumeration(U)[0].abs() < 1e-14


def test_enumeration_rejects_bad_length():
    with pytest.raises(ValueError):
        fid.shapley_by_enumeration(torch.zeros(6))


# ---- correlations -----------------------------------------------------------------------------
def test_spearman_pearson():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert fid.pearson(a, 2 * a + 1) == pytest.approx(1.0)
    assert fid.pearson(a, -a) == pytest.approx(-1.0)
    assert fid.spearman(a, a ** 3) == pytest.approx(1.0)
    assert fid.spearman(a, torch.exp(-a)) == pytest.approx(-1.0)
    # ties: average ranks (scipy.stats.spearmanr([1,2,2,3],[1,2,3,4]) = 0.9486832980505138)
    assert fid.spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486832980505138)
    x, y = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    xc, yc = x - x.mean(), y - y.mean()
    assert fid.pearson(x, y) == pytest.approx(float(xc @ yc / (xc.norm() * yc.norm())))
    assert math.isnan(fid.pearson(torch.ones(3), a[:3]))
    assert fid.rel_err(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


# ---- the real utility -------------------------------------------------------------------------
def _opts(m):
    return {
        "sgd": torch.optim.SGD(m.parameters(), lr=0.1),
        "sgd_mom_wd": torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
        "adamw": torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        "adam_groups": torch.optim.Adam([{"params": list(m.parameters())[:2], "lr": 3e-3},
                                         {"params": list(m.parameters())[2:], "lr": 1e-2, "amsgrad": True}]),
    }


def _warm(m, opt, steps=3, seed=5):
    """A few real steps so that the optimizer has momentum / Adam state."""
    for s in range(steps):
        x, y = make_data(8, (17,), 5, seed=seed + s)
        opt.zero_grad()
        ce_loss(m, (x, y)).mean().backward()
        opt.step()


def _real_utility(model, opt, train, val, n, mask):
    """U(S) by a real optimizer.step() on copies (the definition, no update map)."""
    m2 = copy.deepcopy(model)
    o2 = fid.copy_optimizer(opt, model, m2)
    base = ce_loss(m2, val).mean().item()
    idx = [i for i in range(n) if mask >> i & 1]
    for p in m2.parameters():
        p.grad = torch.zeros_like(p)
    if idx:
        x, y = train
        (ce_loss(m2, (x[idx], y[idx])).sum() / n).backward()
    o2.step()
    return base - ce_loss(m2, val).mean().item()


@pytest.mark.parametrize("opt_name", ["sgd", "sgd_mom_wd", "adamw", "adam_groups"])
def test_exact_utility_is_the_real_step(opt_name):
    torch.manual_seed(0)
    model = MLP().double()
    opt = _opts(model)[opt_name]
    _warm(model, opt)
    n = 5
    train, val = make_data(n, (17,), 5, seed=1), make_data(7, (17,), 5, seed=2)
    ex = fid._Exact(model, opt, ce_loss, train, val, n, chunk=7)
    base = ex.base_loss()
    U = base - ex.val_losses(fid.subset_bits(n).to(torch.float64) / n)
    for mask in [0, 1, 6, 19, 31]:
        assert U[mask].item() == pytest.approx(_real_utility(model, opt, train, val, n, mask), rel=1e-9, abs=1e-13)
    assert fid._update_check(model, opt, ex) < 1e-10


def test_vmap_and_loop_agree_and_tied_weights():
    torch.manual_seed(0)
    model = Tied().double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _warm_t = make_data(6, (9,), 3, seed=3)
    opt.zero_grad()
    ce_loss(model, _warm_t).mean().backward()
    opt.step()
    n = 4
    train, val = make_data(n, (9,), 3, seed=1), make_data(5, (9,), 3, seed=2)
    ex = fid._Exact(model, opt, ce_loss, train, val, n, chunk=5)
    coeff = fid.subset_bits(n).to(torch.float64) / n
    a = ex.val_losses(coeff)
    assert ex.use_vmap
    ex.use_vmap = False
    b = ex.val_losses(coeff)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for mask in [0, 5, 15]:
        assert (ex.base_loss() - a[mask]).item() == pytest.approx(
            _real_utility(model, opt, train, val, n, mask), rel=1e-9, abs=1e-13)


def _linear_setup(n=8, d=6, M=5, lr=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1).double()
    x, y = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    xv, yv = torch.randn(M, d, generator=g, dtype=torch.float64), torch.randn(M, generator=g, dtype=torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, opt, (x, y), (xv, yv)


def mse(model, batch):
    x, y = batch
    return (model(x).squeeze(-1) - y) ** 2


def test_exact_values_of_a_quadratic_utility_are_the_midpoint_formula():
    """Linear model + squared error + SGD: U is quadratic in the subset's gradient, so the exact
    Shapley values are (lr/n) <g_i, grad L_val(w - lr g_bar / 2)> (independent of the engine)."""
    n, lr = 8, 0.3
    model, opt, train, val = _linear_setup(n=n, lr=lr)
    ex = fid._Exact(model, opt, mse, train, val, n)
    U = ex.base_loss() - ex.val_losses(fid.subset_bits(n).to(torch.float64) / n)
    exact = fid.shapley_by_enumeration(U)
    G = torch.cat([ex.updated[k][3].reshape(n, -1) for k in range(len(ex.updated))], 1)
    m2 = copy.deepcopy(model)
    with torch.no_grad():
        for p, (_, _, _, Gp) in zip(m2.parameters(), ex.updated):
            p -= lr / 2 * Gp.mean(0)
    mid = torch.autograd.grad(mse(m2, val).mean(), list(m2.parameters()))
    want = lr / n * G @ torch.cat([t.reshape(-1) for t in mid])
    torch.testing.assert_close(exact, want, rtol=1e-9, atol=1e-14)


# ---- no side effects ----------------------------------------------------------------------------
def _state(model, opt):
    return (copy.deepcopy([t.detach().clone() for t in model.parameters()]),
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()],
            copy.deepcopy(opt.state_dict()), model.training)


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    for x, y in zip(a[2], b[2]):
        assert torch.equal(x, y)
    sa, sb = a[3], b[3]
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for key, v in sa["state"][k].items():
            w = sb["state"][k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w
    assert a[4] == b[4]


def test_exact_part_has_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(17, 9), nn.BatchNorm1d(9), nn.Tanh(), nn.Linear(9, 5)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _warm(model, opt)
    model.eval()      # buffers in use (running stats), batch-size-1 gradients well defined
    train, val = make_data(6, (17,), 5, seed=1), make_data(7, (17,), 5, seed=2)
    ce_loss(model, train).mean().backward()   # a pending .grad
    before = _state(model, opt)
    grads = [p.grad for p in model.parameters()]
    rng = torch.get_rng_state()
    ex = fid._Exact(model, opt, ce_loss, train, val, 6)
    ex.val_losses(fid.subset_bits(6).to(torch.float64) / 6)
    fid._update_check(model, opt, ex)
    _assert_same(before, _state(model, opt))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert torch.equal(rng, torch.get_rng_state())


def test_arguments_are_checked():
    model, opt, train, val = _linear_setup(n=4)
    with pytest.raises(ValueError):
        fid.fidelity_check(model, opt, mse, train, val, n=5)
    with pytest.raises(ValueError):
        fid.fidelity_check(model, opt, mse, train, val, n=13)
    with pytest.raises(TypeError):
        fid.fidelity_check(model, torch.optim.LBFGS(model.parameters()), mse, train, val, n=4)


# ---- with the engine ----------------------------------------------------------------------------
@needs_engine
def test_fidelity_check_quadratic_midpoint_and_second_are_exact():
    model, opt, train, val = _linear_setup(n=8, lr=0.3)
    rep = fid.fidelity_check(model, opt, mse, train, val, n=8)
    assert set(rep.values) == {f"{e}/{u}" for e in ("first", "midpoint", "second") for u in ("optimizer", "sgd")}
    for key in ("midpoint/optimizer", "second/optimizer", "midpoint/sgd", "second/sgd"):
        assert rep.metrics[key]["rel_err"] < 1e-8, (key, rep.metrics[key])
    assert rep.metrics["first/sgd"]["rel_err"] > 1e-4     # first order is not exact here
    torch.testing.assert_close(rep.exact.sum(), torch.tensor(rep.utility, dtype=torch.float64))
    assert rep.update_check < 1e-12
    assert "midpoint/optimizer" in str(rep)


@needs_engine
@pytest.mark.parametrize("opt_name", ["sgd_mom_wd", "adamw"])
def test_fidelity_check_no_side_effects_and_small_step_agreement(opt_name):
    """A tiny step. SGD: every optimizer-aware estimator is close to exact. AdamW (its map stays
    nonlinear in g however small lr is, so no estimator is exact): close once the second-moment
    state is no longer dominated by the new gradient (200 warm steps)."""
    torch.manual_seed(0)
    model = MLP().double()
    opt = _opts(model)[opt_name]
    _warm(model, opt, steps=3 if opt_name == "sgd_mom_wd" else 200)
    for g in opt.param_groups:
        g["lr"] = g["lr"] * 1e-3
    train, val = make_data(6, (17,), 5, seed=1), make_data(7, (17,), 5, seed=2)
    ce_loss(model, train).mean().backward()
    before = _state(model, opt)
    grads = [p.grad for p in model.parameters()]
    hooks = (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks))
    rep = fid.fidelity_check(model, opt, ce_loss, train, val, n=6, reference=True)
    _assert_same(before, _state(model, opt))
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)) == hooks
    torch.testing.assert_close(rep.exact.sum(), torch.tensor(rep.utility, dtype=torch.float64))
    assert rep.update_check < 1e-10
    for key, d in rep.engine_vs_reference.items():      # the engine = the estimators' definitions
        assert d < 1e-10, (key, d)
    tol = 1e-2 if opt_name == "sgd_mom_wd" else 2e-2
    for e in ("first", "midpoint", "second"):
        m = rep.metrics[f"{e}/optimizer"]
        assert m["rel_err"] < tol and m["pearson"] > 0.999, (e, m)
    if opt_name == "sgd_mom_wd":     # the SGD proxy misses nesterov momentum's factor 1 + mu
        assert rep.metrics["first/sgd"]["rel_err"] > 0.4


@needs_engine
def test_fidelity_check_on_a_model_already_under_an_engine():
    """The model is patched and the optimizer carries the user's engine hook: the check runs on
    copies, and the user's engine still commits the user's next step."""
    import inrun_kernels as ik
    torch.manual_seed(0)
    model = MLP().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _warm(model, opt)
    train, val = make_data(6, (17,), 5, seed=1), make_data(7, (17,), 5, seed=2)
    eng = ik.InRunShapley(model, opt, ce_loss, val, num_samples=6, estimator="midpoint")
    opt.zero_grad()
    eng.step(train, torch.arange(6))
    rep = fid.fidelity_check(model, opt, ce_loss, train, val, n=6, estimators=("midpoint",), updates=("optimizer",))
    assert eng.counts.sum() == 0          # the user's pending step was not committed by the check
    opt.step()
    assert eng.counts.sum() == 6
    torch.testing.assert_close(eng.last_values, rep.values["midpoint/optimizer"], rtol=1e-10, atol=1e-15)


@needs_engine
def test_fidelity_check_float32_model_runs():
    """float32: the check runs end to end (values in float64; exact values limited by float32
    loss differences, so only a loose agreement is asserted)."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _warm_batch = make_data(8, (17,), 5, dtype=torch.float32, seed=5)
    opt.zero_grad()
    ce_loss(model, _warm_batch).mean().backward()
    opt.step()
    train = make_data(6, (17,), 5, dtype=torch.float32, seed=1)
    val = make_data(7, (17,), 5, dtype=torch.float32, seed=2)
    rep = fid.fidelity_check(model, opt, ce_loss, train, val, n=6, reference=True)
    assert rep.exact.dtype == torch.float64 and rep.exact.shape == (6,)
    for key, v in rep.values.items():
        assert v.dtype == torch.float64 and torch.isfinite(v).all(), key
        assert rep.engine_vs_reference[key] < 1e-4, (key, rep.engine_vs_reference[key])
    assert rep.metrics["midpoint/optimizer"]["pearson"] > 0.9


def test_benchmark_rewrites_only_its_results_section(tmp_path):
    from benchmarks.fidelity import BEGIN, END, write_results_md
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nother section\n")
    write_results_md(str(path), "table v1\n")
    assert path.read_text() == f"# Results\n\nother section\n\n{BEGIN}\ntable v1\n{END}\n"
    path.write_text(path.read_text() + "\n## after\n")
    write_results_md(str(path), "table v2\n")
    assert path.read_text() == f"# Results\n\nother section\n\n{BEGIN}\ntable v2\n{END}\n\n## after\n"
