"""Native ghost convolutions (layers/conv.py): nn.Conv1d / nn.Conv2d with stride, padding (int,
'same', reflect / replicate / circular), dilation, groups (1, 2, depthwise with multiplier 2),
with and without bias, a frozen weight, and a convolution used twice (tied). float64 against the
batch-size-1 oracle (tests/oracle.py) to <= 1e-10 relative: grad_dot (sum and per validation
row, per parameter), grad_gram, grad_norms in the Gram and the dense route, for both exact reps
of a grouped convolution (Direct per-sample gradients, Outer block embedding); the engine's
values in its three routes (joined, prefetched with accumulation, deferred midpoint) and .grad
equal to plain autograd; torch.compile; outside a session the original module. The checks are
shown to fail on deliberately wrong layers (test_the_checks_catch_wrong_layers)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun_kernels as ik
from inrun_kernels.layers import conv
from inrun_kernels.ops.budget import temp_budget
from inrun_kernels.session import GhostSession
from tests.oracle import Oracle, loop_grads, rel_err

_unfold_rows = conv.unfold_rows
TOL = 1e-10   # float64 vs float64 oracle (measured ~1e-16)
LR = 0.1


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv1d(6, 4, 2, dilation=2, groups=2, bias=False)
        self.c3 = nn.Conv1d(4, 8, 3, groups=4, padding="same", padding_mode="circular")  # depthwise x2
        self.head = nn.Linear(8, 3)

    def forward(self, x):                       # [n, 3, 15] -> L 8 -> 6 -> 6
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        return self.head(self.c3(h).mean(2))


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(1, 0))
        # 'same' with an even kernel height: asymmetric padding (0 above, 1 below)
        self.c2 = nn.Conv2d(6, 6, (2, 3), groups=2, padding="same", padding_mode="reflect", dilation=(1, 2))
        self.c3 = nn.Conv2d(6, 12, 3, groups=6, padding=1, padding_mode="replicate", bias=False)
        self.c4 = nn.Conv2d(12, 5, 1)
        self.c4.weight.requires_grad_(False)    # frozen weight, trainable bias
        self.head = nn.Linear(5, 3)

    def forward(self, x):                       # [n, 2, 7, 9] -> [4, 8] throughout
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))
        return self.head(self.c4(h).mean((2, 3)))


class TiedConv(nn.Module):
    """Each convolution used twice, the second use on a pooled (smaller) map."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.d = nn.Conv2d(3, 3, 3, groups=3, padding=1, bias=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):                       # [n, 3, 6, 6]
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.d(h))
        h = torch.tanh(self.a(h))
        h2 = self.d(F.avg_pool2d(h, 2))
        return self.head(torch.cat([h.mean((2, 3)), h2.mean((2, 3))], 1))


MODELS = {"conv1d": (Net1d, (3, 15)), "conv2d": (Net2d, (2, 7, 9)), "tied": (TiedConv, (3, 6, 6))}
N, M = 5, 3


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *MODELS[kind][1], generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def build(kind):
    torch.manual_seed(0)
    return MODELS[kind][0]().double()


@pytest.fixture
def grouped_rep(request, monkeypatch):
    """Force the rep of grouped convolutions: 'direct', 'outer' (block embedding) or 'auto'."""
    rep = getattr(request, "param", "auto")
    if rep != "auto":
        monkeypatch.setattr(conv, "_use_direct", lambda *a: rep == "direct")
    return rep


@pytest.fixture
def primitives_run(primitives_run, monkeypatch):
    """conftest's counter of reference primitive calls, with the torch backend forced."""
    monkeypatch.setenv("INRUN_BACKEND", "torch")
    return primitives_run


def check_products(model, train, val, orc):
    assert rel_err(ik.grad_dot(model, ce, train, val), orc.dot()) <= TOL
    got, share = ik.grad_dot(model, ce, train, val, per_val=True, per_param=True)
    assert rel_err(got, orc.dot(per_val=True)) <= TOL
    assert sorted(share) == sorted(orc.train)
    for name in share:   # each parameter's own share: no error hidden by another's
        assert rel_err(share[name], orc.dot(per_val=True, name=name)) <= TOL, name
    assert rel_err(ik.grad_gram(model, ce, train), orc.gram()) <= TOL
    assert rel_err(ik.grad_norms(model, ce, train), orc.norms()) <= TOL


def check_engine(model, train, val, orc, verify=True):
    """One step, estimator='first', update='sgd' (the joined route): value_i = (lr / N) <g_i,
    mean_v g_v>; .grad = the mean training gradient."""
    ref = copy.deepcopy(model)
    ik.patch(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    eng = ik.InRunShapley(model, opt, ce, val, num_samples=N, update="sgd", verify=verify)
    opt.zero_grad()
    eng.step(train, torch.arange(N))
    plain = loop_grads(ref, ce, train)   # plain autograd, one row at a time, unpatched copy
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, plain[name].mean(0)) <= TOL, name
    opt.step()
    assert rel_err(eng.last_values, LR * orc.dot() / (N * M)) <= TOL
    ik.unpatch(model)


@pytest.mark.parametrize("grouped_rep", ["auto", "direct", "outer"], indirect=True)
@pytest.mark.parametrize("route", ["gram", "dense", "split"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_products_and_engine_match_the_oracle(kind, route, grouped_rep, monkeypatch, primitives_run):
    monkeypatch.setenv("INRUN_ROUTE", route)
    model = build(kind)
    train, val = data(kind, N, 1), data(kind, M, 2)
    orc = Oracle(model, ce, train, val)
    check_products(model, train, val, orc)
    # split: the groups=1 convolutions' dots, per-val dots and norms inside the weight-gradient pass
    ran = {"gram": {"dot_gram", "gram"}, "dense": {"dot_dense", "gram_materialised"},
           "split": {"split_dot", "split_norms"}}[route]
    assert ran <= set(primitives_run), primitives_run   # the forced route did run
    check_engine(model, train, val, orc)


def _mean_val_grad(model, val) -> dict[str, torch.Tensor]:
    g = loop_grads(model, ce, val)
    return {n: v.mean(0) for n, v in g.items()}


def check_midpoint(model, train, val, verify=True):
    """estimator='midpoint' keeps the reps and dots them with V of the weight's shape
    [C_out, C_in/g, kh, kw] at commit: value_i = (lr / N) <g_i, grad L_val(w - lr/2 g_bar)>."""
    ref = copy.deepcopy(model)
    g_tr = loop_grads(ref, ce, train)
    mid = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in mid.named_parameters():
            if p.requires_grad:
                p -= LR / 2 * g_tr[n].mean(0)
    v = _mean_val_grad(mid, val)
    want = LR / N * sum(g_tr[n].flatten(1) @ v[n].flatten() for n in g_tr)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    eng = ik.InRunShapley(model, opt, ce, val, num_samples=N, estimator="midpoint", update="sgd",
                          verify=verify)
    opt.zero_grad()
    eng.step(train, torch.arange(N))
    opt.step()
    assert rel_err(eng.last_values, want) <= TOL
    ik.unpatch(model)


@pytest.mark.parametrize("grouped_rep", ["direct", "outer"], indirect=True)
@pytest.mark.parametrize("kind", ["conv2d", "tied"])
def test_engine_midpoint_dots_kept_reps_with_a_dense_vector(kind, grouped_rep):
    model = build(kind)
    check_midpoint(model, data(kind, N, 1), data(kind, M, 2))


@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
def test_engine_accumulation_dots_with_the_prefetched_vector(kind):
    """accumulation_steps=2 (estimator 'first', SGD): each micro-batch's backward dots its rows
    with V = lr g_val of the weight's shape (session dense_v): value = lr <g_i, g_val> / (2 n)."""
    model = build(kind)
    parts = [data(kind, N, 1), data(kind, N, 3)]
    val = data(kind, M, 2)
    ref = copy.deepcopy(model)
    v = _mean_val_grad(ref, val)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    eng = ik.InRunShapley(model, opt, ce, val, num_samples=2 * N, update="sgd", accumulation_steps=2)
    opt.zero_grad()
    for j, part in enumerate(parts):
        eng.step(part, torch.arange(j * N, (j + 1) * N))
    grads = [loop_grads(ref, ce, part) for part in parts]
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, torch.cat([g[name] for g in grads]).mean(0)) <= TOL, name
    opt.step()
    want = torch.cat([LR / (2 * N) * sum(g[n].flatten(1) @ v[n].flatten() for n in g) for g in grads])
    assert rel_err(eng.values, want) <= TOL


def test_grouped_rep_is_picked_by_size(monkeypatch):
    """Depthwise: Direct ([n, C_out, 1, k, k] is tiny). Many channels at few positions with a
    tiny temp budget: the Outer block embedding. Both exact."""
    seen = []
    add = GhostSession.add

    def recording(self, ps, tr, va):
        seen.append((ps[0].dim(), type(tr).__name__))
        return add(self, ps, tr, va)

    monkeypatch.setattr(GhostSession, "add", recording)
    torch.manual_seed(0)
    for model, shape, want in [
            (nn.Sequential(nn.Conv2d(4, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 9, 3)), (4, 5, 5), "Direct"),
            (nn.Sequential(nn.Conv2d(16, 16, 3, groups=2), nn.Flatten(), nn.Linear(16, 3)), (16, 3, 3), "Outer")]:
        model = model.double()
        g = torch.Generator().manual_seed(1)
        train = (torch.randn(N, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))
        val = (torch.randn(M, *shape, generator=g, dtype=torch.float64), torch.randint(0, 3, (M,), generator=g))
        orc = Oracle(model, ce, train, val)
        seen.clear()
        with temp_budget(1e-3):
            got = ik.grad_dot(model, ce, train, val, per_val=True)
        assert [t for d, t in seen if d == 4] == [want], seen
        assert rel_err(got, orc.dot(per_val=True)) <= TOL


def _kernel_major_unfold(x, kernel, stride, padding, dilation):
    """A plausible bug: kernel positions slowest instead of channels (the weight's layout)."""
    A = _unfold_rows(x, kernel, stride, padding, dilation)
    C, k = x.shape[1], A.shape[-1] // x.shape[1]
    return A.view(*A.shape[:2], C, k).transpose(-1, -2).reshape(A.shape)


def _scaled_first_rep(self, ps, tr, va, _add=GhostSession.add):
    """Sample 0's per-sample gradient of every conv weight off by 1e-5 relative."""
    if ps[0].dim() >= 3:
        tr = copy.copy(tr)
        if hasattr(tr, "G"):
            tr.G = torch.cat([tr.G[:1] * (1 + 1e-5), tr.G[1:]])
        else:
            tr.B = torch.cat([tr.B[:1] * (1 + 1e-5), tr.B[1:]])
    return _add(self, ps, tr, va)


def _val_rows_in_grad(real):
    def wrong(sess, name, x, gy, weight, *args):
        gw, gb = real(sess, name, x, gy, weight, *args)
        if gw is not None:   # what .grad would get if one validation row leaked into it
            gw = gw + 1e-6 * gw.abs().max()
        return gw, gb
    return wrong


# bug -> does (check_products, check_engine, check_midpoint) fail
BUGS = {"kernel_major_unfold": (False, True, True),       # .grad and dots with a dense V of the
        #   weight's shape (a column order shared by all rows is invisible to train x val products)
        "per_sample_off_by_1e-5": (True, True, True),
        "validation_row_in_grad": (False, True, True)}    # .grad (midpoint's V reads it too)


@pytest.mark.parametrize("bug", sorted(BUGS))
def test_the_checks_catch_wrong_layers(bug, monkeypatch):
    """The checks above fail on a wrong layer (each bug alone), and only where they should."""
    if bug == "kernel_major_unfold":
        monkeypatch.setattr(conv, "unfold_rows", _kernel_major_unfold)
        monkeypatch.setenv("INRUN_ROUTE", "dense")
    elif bug == "per_sample_off_by_1e-5":
        monkeypatch.setattr(GhostSession, "add", _scaled_first_rep)
    else:
        monkeypatch.setattr(conv, "conv_backward", _val_rows_in_grad(conv.conv_backward))
    model = build("conv2d")
    train, val = data("conv2d", N, 1), data("conv2d", M, 2)
    orc = Oracle(model, ce, train, val)
    failed = []
    # (the engine's own self-check off: ours must see the bug)
    for check in (check_products, lambda *a: check_engine(*a, verify=False),
                  lambda m, t, v, o: check_midpoint(m, t, v, verify=False)):
        try:
            check(model, train, val, orc)
            failed.append(False)
        except AssertionError:
            failed.append(True)
        ik.unpatch(model)
    assert tuple(failed) == BUGS[bug]


def test_outside_a_session_it_is_the_original_module():
    for mod, shape in [(nn.Conv2d(3, 4, (2, 3), padding="same", padding_mode="reflect", groups=1), (2, 3, 5, 6)),
                       (nn.Conv1d(4, 8, 3, stride=2, dilation=2, groups=4, padding=2,
                                  padding_mode="circular"), (2, 4, 9)),
                       (nn.Conv1d(4, 8, 3), (4, 9))]:   # unbatched input is fine outside a session
        mod = mod.double()
        ref = copy.deepcopy(mod)
        keys, params = list(mod.state_dict()), dict(mod.named_parameters())
        model = nn.Sequential(mod)
        ik.patch(model)
        assert type(mod) in (ik.layers.GhostConv1d, ik.layers.GhostConv2d) and isinstance(mod, type(ref))
        assert list(mod.state_dict()) == keys and dict(mod.named_parameters()) == params
        cov = ik.coverage(model)
        assert cov.complete and not cov.fallback and sorted(cov.covered) == ["0.bias", "0.weight"]
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        y, y_ref = mod(x), ref(x)
        assert torch.equal(y, y_ref)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, mod.weight, mod.bias), gy)
        want = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), gy)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        ik.unpatch(model)
        assert type(mod) is type(ref)


def test_inside_a_session_wrong_layouts_are_errors_naming_the_module():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(0), nn.Linear(3 * 4, 2)).double()
    train = (torch.randn(N, 2, 6, dtype=torch.float64), torch.randint(0, 2, (N,)))
    val = (torch.randn(M, 2, 6, dtype=torch.float64), torch.randint(0, 2, (M,)))

    def unbatched(m, b):   # one sample at a time, [C, L], inside the session
        return torch.stack([F.cross_entropy(m(x), y) for x, y in zip(*b)])

    with pytest.raises(ValueError, match=r"module '0' \(Conv1d\).*\(2, 6\).*batched input \[N, C, L\]"):
        ik.grad_dot(model, unbatched, train, val)
    model2 = nn.Sequential(nn.Conv2d(2, 3, 3)).double()
    with pytest.raises(ValueError, match=r"module '0' \(Conv2d\).*batch dimension has 10 rows"):
        ik.grad_norms(model2, lambda m, b: m(b[0].reshape(-1, 2, 4, 4)).sum((1, 2, 3))[:N],
                      (torch.randn(N, 2, 2, 4, 4, dtype=torch.float64),))


def test_conv3d_goes_to_the_fallback_next_to_native_convs():
    """nn.Conv3d has no native rule: the exact per-sample fallback covers it; Conv2d is native."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.c3d = nn.Conv3d(1, 2, 2)
            self.c2d = nn.Conv2d(2, 3, 2)
            self.head = nn.Linear(3, 2)

        def forward(self, x):                   # [n, 1, 3, 4, 4]
            h = torch.tanh(self.c3d(x)).mean(2)  # [n, 2, 3, 3]
            return self.head(self.c2d(h).mean((2, 3)))

    torch.manual_seed(0)
    model = Mixed().double()
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(N, 1, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (N,), generator=g))
    val = (torch.randn(M, 1, 3, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (M,), generator=g))
    orc = Oracle(model, ce, train, val)
    assert rel_err(ik.grad_dot(model, ce, train, val, per_val=True), orc.dot(per_val=True)) <= TOL
    assert rel_err(ik.grad_gram(model, ce, train), orc.gram()) <= TOL
    ik.patch(model)
    cov = ik.coverage(model)
    assert cov.complete and list(cov.fallback) == ["c3d"], cov
    assert type(model.c2d) is ik.layers.GhostConv2d


def test_compiled_conv_model_matches_the_oracle():
    """torch.compile(fullgraph=True): the custom ops inrun::ghost_conv / ghost_conv_bw, no graph
    break; grad_dot and one engine step (gradient-path guard included) as eager."""
    import torch._dynamo as dynamo
    dynamo.reset()
    try:
        model = build("conv2d")
        train, val = data("conv2d", N, 1), data("conv2d", M, 2)
        orc = Oracle(model, ce, train, val)
        cm = torch.compile(ik.patch(model), backend="aot_eager", fullgraph=True, dynamic=False)
        assert rel_err(ik.grad_dot(cm, ce, train, val, per_val=True), orc.dot(per_val=True)) <= TOL
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        eng = ik.InRunShapley(cm, opt, ce, val, num_samples=N, update="sgd")
        opt.zero_grad()
        eng.step(train, torch.arange(N))
        opt.step()
        assert rel_err(eng.last_values, LR * orc.dot() / (N * M)) <= TOL
    finally:
        dynamo.reset()
