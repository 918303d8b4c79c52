"""torch.compile: the ghost layers trace without graph breaks (custom ops, layers/compiled.py),
and a compiled model gives the eager numbers, in the functional API and in the engine.

Compilation is slow on CPU: small models, fullgraph=True, Inductor where buffer reuse matters
(the tied GPT-2 and the estimator route keep reps past the backward op), "aot_eager" (the same
AOTAutograd graphs, run eagerly) elsewhere."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import inrun_kernels as ik
from inrun_kernels.batch import concat
from inrun_kernels.guard import GradientPathError
from inrun_kernels.patch import is_patched
from inrun_kernels.session import GhostSession, ghost_session
from tests.models import MLP, TokenMixer, ce_loss, make_data
from tests.oracle import Oracle, flat, rel_err

transformers = pytest.importorskip("transformers")
from tests.test_hf_models import build, make_batch  # noqa: E402

PKG = "inrun_kernels"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _ops_in(gm) -> set[str]:
    """Names of the ops a graph calls, without the overload (Dynamo records the packet)."""
    return {str(n.target).removesuffix("") for n in gm.graph.nodes if n.op == "call_function"}


class _Capture:
    """A Dynamo backend that records the graphs it is given and runs them eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


# ---- (a) fullgraph compilation, products equal the eager ones and the float64 oracle ---------
def test_mlp_fullgraph_inductor_products_match_eager_and_oracle(monkeypatch):
    model = MLP().double()
    train, val = make_data(5, (17,), 5, seed=1), make_data(3, (17,), 5, seed=2)
    orc = Oracle(model, ce_loss, train, val)
    eager = copy.deepcopy(model)
    cm = torch.compile(ik.patch(model), fullgraph=True, dynamic=False)
    assert ik.patch(cm) is cm and is_patched(cm)
    seen = []   # what the compiled ops hand the session: the Parameter objects themselves
    add, add_dots = GhostSession.add, GhostSession.add_dots   # (add_dots: the split route)
    monkeypatch.setattr(GhostSession, "add", lambda self, ps, *a: (seen.extend(ps), add(self, ps, *a))[1])
    monkeypatch.setattr(GhostSession, "add_dots", lambda self, ps, *a: (seen.extend(ps), add_dots(self, ps, *a))[1])
    got, share = ik.grad_dot(cm, ce_loss, train, val, per_val=True, per_param=True)
    assert {id(p) for p in seen if p is not None} == {id(p) for p in model.parameters()}
    want, want_share = ik.grad_dot(eager, ce_loss, train, val, per_val=True, per_param=True)
    assert rel_err(got, want) <= 1e-12
    assert rel_err(got, orc.dot(per_val=True)) <= 1e-6
    assert sorted(share) == sorted(want_share)   # names as in the compiled module
    for n, _ in eager.named_parameters():
        assert rel_err(share[n], want_share[n]) <= 1e-12
        assert rel_err(share[n], orc.dot(per_val=True, name=n)) <= 1e-6
    # Gram and norms of all 8 rows: the same compiled graph (same shapes, a session is open)
    G = torch.cat([flat(orc.train), flat(orc.val)])
    rows = concat(train, val)
    assert rel_err(ik.grad_gram(cm, ce_loss, rows), G @ G.T) <= 1e-6
    assert rel_err(ik.grad_norms(cm, ce_loss, rows), G.norm(dim=1)) <= 1e-6
    assert all(p.grad is None for p in model.parameters())   # the functional API leaves .grad


def test_gpt2_tied_fullgraph_products_match_eager_and_oracle():
    """Embedding (sparse Rows reps, broadcast position ids), Conv1D, LayerNorm and the tied
    wte / lm_head (shared-parameter cross terms) inside one compiled graph."""
    model = build("gpt2_tied").double()
    loss_fn = ik.causal_lm_loss
    train, val = make_batch(4, seed=1), make_batch(3, seed=2)
    orc = Oracle(model, loss_fn, train, val)
    eager = copy.deepcopy(model)
    cm = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    got = ik.grad_dot(cm, loss_fn, train, val, per_val=True)
    assert rel_err(got, ik.grad_dot(eager, loss_fn, train, val, per_val=True)) <= 1e-12
    assert rel_err(got, orc.dot(per_val=True)) <= 1e-6
    assert not is_patched(cm)   # grad_dot patched it for the call only


# ---- (b) the engine with a compiled model: the eager values and .grad ------------------------
def _engine_run(model, fwd, opt, loss_fn, val, batches, **kw):
    eng = ik.InRunShapley(fwd, opt, loss_fn, val, num_samples=64, **kw)
    grads = []
    for batch, ids in batches:
        opt.zero_grad()
        eng.step(batch, ids)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return eng.values.clone(), grads


def _close(a, b, tol):
    assert rel_err(a, b) <= tol, rel_err(a, b)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_engine_compiled_token_mixer_matches_eager(opt_name):
    """sgd: the validation rows join the ghost backward, model passed as torch.compile(model);
    adamw: the training rows' reps are kept for the dense products after the backward, model
    compiled in place by model.compile(). verify=True runs ik.verify on the compiled model."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batches = [((torch.randn(6, 13, 17, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)),
                torch.arange(6) + 6 * s) for s in range(3)]
    val = make_data(3, (13, 17), 4, seed=9)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = TokenMixer().double()
        opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
               else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01))
        fwd = model
        if compiled and opt_name == "sgd":
            fwd = torch.compile(model, backend="aot_eager", fullgraph=True)
        elif compiled:
            model.compile(backend="aot_eager", fullgraph=True)
        runs.append((model, _engine_run(model, fwd, opt, ce_loss, val, batches, verify=compiled)))
    (m0, (v0, g0)), (m1, (v1, g1)) = runs
    assert counters["stats"]["unique_graphs"] >= 1   # the compiled run did compile
    _close(v1, v0, 1e-12)
    for s0, s1 in zip(g0, g1):
        for a, b in zip(s1, s0):
            _close(a, b, 1e-12)
    for p, q in zip(m1.parameters(), m0.parameters()):
        _close(p.detach(), q.detach(), 1e-12)


class TinyTiedLM(nn.Module):
    """Token + broadcast position embeddings, LayerNorm, a Linear, and a head tied to the token
    embedding: the shared-parameter path of GPT-2 at a fraction of its compile time."""

    def __init__(self, V=40, T=6, d=16):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, d), nn.Embedding(T, d)
        self.ln, self.fc = nn.LayerNorm(d), nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])[None]          # [1, T]: expanded to the rows in a session
        h = self.wte(ids) + self.wpe(pos)
        return self.head(torch.tanh(self.fc(self.ln(h))))


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


def test_engine_compiled_tied_lm_inductor_matches_eager():
    """Inductor (it may reuse an op's input memory once the op returns), a tied weight (reps
    wait for the other use), AdamW (the training rows' reps are kept past the backward)."""
    g = torch.Generator().manual_seed(5)
    val = torch.randint(0, 40, (3, 7), generator=g)
    batches = [(torch.randint(0, 40, (4, 7), generator=g), torch.arange(4) + 4 * s) for s in range(3)]
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = TinyTiedLM().double()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        fwd = torch.compile(model, fullgraph=True, dynamic=False) if compiled else model
        runs.append((model, _engine_run(model, fwd, opt, lm_loss, val, batches, verify=False)))
    (m0, (v0, g0)), (m1, (v1, g1)) = runs
    assert (v0 != 0).sum() == 12
    _close(v1, v0, 1e-10)
    for s0, s1 in zip(g0, g1):
        for a, b in zip(s1, s0):
            _close(a, b, 1e-10)
    assert m1.head.weight is m1.wte.weight


@pytest.mark.parametrize("mode,kw", [("kvdim", {}), ("cross", dict(add_bias_kv=True))])
def test_engine_compiled_multihead_attention_matches_eager(mode, kw):
    """The in-projection op (three weights; or one packed weight in two row blocks) and the
    bias_k / bias_v token op: values and every .grad as eager."""
    from tests.test_attention import AttnModel, _jitter, attn_data, attn_loss
    torch.manual_seed(0)
    base = _jitter(AttnModel(mode, True, **kw).double())
    val = attn_data(3, mode, torch.float64, 2)
    batches = [(attn_data(5, mode, torch.float64, 10 + s), torch.arange(5) + 5 * s) for s in range(2)]
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fwd = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        runs.append(_engine_run(model, fwd, opt, attn_loss, val, batches, verify=False))
    (v0, g0), (v1, g1) = runs
    _close(v1, v0, 1e-12)
    for s0, s1 in zip(g0, g1):
        for a, b in zip(s1, s0):
            _close(a, b, 1e-12)


# ---- (c) no graph break from the ghost layers ---------------------------------------------------
def _breaks_from_package(explained) -> list[str]:
    """Graph breaks whose innermost frame is in this package."""
    return [f"{br.reason[:120]} @ {br.user_stack[-1].filename}:{br.user_stack[-1].lineno}"
            for br in explained.break_reasons if f"/{PKG}/" in br.user_stack[-1].filename]


@pytest.mark.parametrize("kind", ["gpt2_tied", "gpt2_untied", "llama"])
def test_hf_models_trace_as_one_graph_in_a_session(kind):
    model = ik.patch(build(kind))
    batch = concat(make_batch(4, seed=1), make_batch(3, seed=2))
    with ghost_session(4, 3, dot=True):
        ex = dynamo.explain(lambda b: ik.causal_lm_loss(model, b))(batch)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [br.reason for br in ex.break_reasons]
    ops = set().union(*(_ops_in(g) for g in ex.graphs))
    assert {"inrun.ghost_linear", "inrun.ghost_embedding", "inrun.ghost_affine"} <= ops


def test_torch_transformer_breaks_only_in_torch_code():
    """nn.Transformer's own _detect_is_causal_mask calls .item() (a break in PyTorch code);
    MultiheadAttention and the encoder/decoder layers trace."""
    from tests.test_attention import _build
    model, loss_fn, data = _build("full", False, "trained")
    ik.patch(model)
    batch = concat(data(5, torch.float32, 1), data(3, torch.float32, 2))
    with ghost_session(5, 3, dot=True):
        ex = dynamo.explain(lambda b: loss_fn(model, b))(batch)
    assert not _breaks_from_package(ex)
    ops = set().union(*(_ops_in(g) for g in ex.graphs))
    assert {"inrun.ghost_in_proj", "inrun.ghost_linear", "inrun.ghost_affine"} <= ops


def test_outside_a_session_the_compiled_model_is_the_plain_one():
    cap = _Capture()
    model = ik.patch(MLP())
    cm = torch.compile(model, backend=cap, fullgraph=True)
    x = torch.randn(4, 17)
    torch.testing.assert_close(cm(x), model(x))
    assert not any(o.startswith("inrun.") for o in _ops_in(cap.graphs[-1]))
    with ghost_session(2, 2, dot=True):   # one recompile: the session is open
        y = cm(x)
    assert len(cap.graphs) == 2 and "inrun.ghost_linear" in _ops_in(cap.graphs[-1])
    torch.testing.assert_close(y, model(x))


# ---- the gradient-path guard looks inside compiled graphs --------------------------------------
def test_guard_names_a_foreign_path_inside_a_compiled_graph():
    from tests.test_guard import FunctionalUse   # a.weight also used by F.linear in forward
    cm = torch.compile(FunctionalUse(), backend="aot_eager", fullgraph=True)
    train, val = make_data(4, (17,), 5, dtype=torch.float32, seed=1), make_data(2, (17,), 5, dtype=torch.float32, seed=2)
    with pytest.raises(GradientPathError, match=r"'a\.weight' gets gradient through aten\.\w+.*in a compiled graph"):
        ik.grad_dot(cm, ce_loss, train, val)
    ok = torch.compile(MLP(), backend="aot_eager", fullgraph=True)   # no foreign path: accepted
    ik.grad_dot(ok, ce_loss, make_data(4, (17,), 5, dtype=torch.float32), make_data(2, (17,), 5, dtype=torch.float32))


def test_patch_unpatch_coverage_of_a_compiled_wrapper():
    model = MLP()
    cm = torch.compile(model)
    assert ik.patch(cm) is cm
    assert is_patched(cm) and is_patched(model)
    assert type(model.fc1) is ik.GhostLinear and model.fc1._inrun_name == "fc1"
    assert ik.coverage(cm).covered[0].startswith("_orig_mod.") and ik.coverage(model).covered[0] == "fc1.weight"
    assert ik.unpatch(cm) is cm
    assert type(model.fc1) is nn.Linear and not is_patched(cm)


def test_autocast_in_a_compiled_session_is_refused():
    model = ik.patch(MLP())
    cm = torch.compile(model, backend="eager", fullgraph=True)
    with ghost_session(2, 2, dot=True), torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(Exception, match="autocast inside a compiled ghost session"):
            cm(torch.randn(4, 17))


def test_what_the_session_keeps_does_not_share_memory_with_op_inputs():
    """Inductor may reuse an op input's memory once the op returned: reps the session keeps past
    the backward op (keep=True; a shared weight's first use) must not alias the inputs. Here the
    inputs are overwritten right after each op, as a reused buffer would be."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 3).double()
    xs = [torch.randn(6, 7, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    gys = [torch.randn(6, 7, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    ops = torch.ops.inrun

    def run(clobber, **kw):
        with ghost_session(4, 2, **kw) as sess:
            for x in xs:   # two uses of one weight: the first waits for the second
                ops.ghost_linear(x, lin.weight, lin.bias, "lin", 0, False)
            for x, gy in zip(xs, gys):
                x, gy = x.clone(), gy.clone()
                ops.ghost_linear_bw(x, gy, lin.weight, lin.bias, "lin", 0, False, True, True)
                if clobber:
                    x.fill_(float("nan"))
                    gy.fill_(float("nan"))
            sess.finish()
        return sess

    torch.testing.assert_close(run(True, dot=True).dot, run(False, dot=True).dot, rtol=0, atol=0)
    kept, ref = run(True, keep=True).kept, run(False, keep=True).kept
    assert len(kept) == 4
    for (_, a), (_, b) in zip(kept, ref):   # Outer reps of the weight, Direct of the bias
        for f in dataclasses.fields(a):
            if isinstance(getattr(a, f.name), torch.Tensor):
                torch.testing.assert_close(getattr(a, f.name), getattr(b, f.name), rtol=0, atol=0)


def test_second_order_with_a_model_compiled_in_place_runs_its_hvp_eagerly():
    """model.compile() has no double backward through the compiled graph: the engine's
    Hessian-vector pass runs with compilation off, and the values equal the eager engine's."""
    from tests.models import TokenMixer, ce_loss, make_data
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TokenMixer().double()
    twin = copy.deepcopy(model)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, twin)]
    for m, o in zip((model, twin), opts):   # Adam state first: second order is defined there
        ce_loss(m, make_data(4, (7, 17), 4, seed=7)).mean().backward()
        o.step()
        o.zero_grad()
    model.compile(backend="aot_eager")
    val = make_data(3, (7, 17), 4, seed=1)
    engines = [ik.InRunShapley(m, o, ce_loss, val, estimator="second") for m, o in zip((model, twin), opts)]
    for s in range(2):
        batch = make_data(4, (7, 17), 4, seed=s)
        for e, o in zip(engines, opts):
            o.zero_grad()
            e.step(batch, torch.arange(4) + 4 * s)
            o.step()
    torch.testing.assert_close(engines[0].values, engines[1].values, rtol=1e-12, atol=0)
