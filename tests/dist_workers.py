"""Worker bodies of tests/test_distributed.py: each runs in a spawned process of a 2-rank gloo
group and asserts against a float64 oracle of the GLOBAL step (the single-process StepOracle of
the union of every rank's rows, each row weighted as the data-parallel mean weights it)."""
from __future__ import annotations

import copy
import gc

import torch
import torch.distributed as dist
from torch import nn

import inrun_kernels as ik
from tests.models import TokenMixer, ce_loss, make_data
from tests.oracle import rel_err
from tests.test_accumulation import AccOracle
from tests.test_estimators import TOL

SIZES = {0: (3, 2), 1: (4, 3)}   # per rank: rows of micro-batch 0 and 1 (unequal on purpose)
OPTS = {"sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)}


def init(rank: int, world: int, rendezvous: str) -> None:
    # a file rendezvous: no free-port race between picking a port and binding it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def batches(step: int, rank: int, k: int):
    """This rank's micro-batches of `step` and their ids (every rank can build every rank's)."""
    out, start = [], 1000 * step + 100 * rank
    for j in range(k):
        n = SIZES[rank][j]
        out.append((make_data(n, (7, 17), 4, seed=1000 * step + 10 * rank + j),
                    torch.arange(start, start + n)))
        start += n
    return out


def global_oracle(ref, live, opt, step, world, k, val):
    """Oracle inputs of the global step: all ranks' rows, row weight 1 / (W k n_rj)."""
    xs, ys, ids, w = [], [], [], []
    for r in range(world):
        for (x, y), i in batches(step, r, k):
            xs.append(x), ys.append(y), ids.append(i)
            w.append(torch.full((len(i),), 1.0 / (world * k * len(i)), dtype=torch.float64))
    train = (torch.cat(xs), torch.cat(ys))
    return AccOracle(ref, live, opt, ce_loss, train, val, weights=torch.cat(w)), torch.cat(ids)


def val_for(rank: int, sharded: bool):
    return make_data(3 + rank if sharded else 3, (7, 17), 4, seed=99 + (rank if sharded else 0))


def union_val(world: int, sharded: bool):
    if not sharded:
        return val_for(0, False)
    parts = [val_for(r, True) for r in range(world)]
    return tuple(torch.cat([p[t] for p in parts]) for t in range(2))


def _warm(*pairs, rank):
    """Three plain data-parallel steps first: the optimizer state exists (Adam's map is twice
    differentiable only where exp_avg_sq > 0), and the float64 oracle's finite differences of
    Adam's map are accurate (after one step: second order 1.4e-7 off, after three: 4e-10)."""
    for s in range(3):
        b = make_data(4, (7, 17), 4, seed=777 + rank + 10 * s)
        for m, o in pairs:
            ce_loss(m, b).mean().backward()
            o.step()
            o.zero_grad()


def _step_and_check(eng, want, gids, opts, where, tol):
    """Both optimizers step (the engine's commits); the step's ids and values are the global
    step's, in rank order."""
    for o in opts:
        o.step()
    assert torch.equal(eng.last_ids, gids), where
    err = rel_err(eng.last_values, want)
    assert err <= tol, (*where, err)


def _same_on_all_ranks(t: torch.Tensor) -> None:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t)
    for g in got[1:]:
        assert torch.equal(g, got[0]), "ranks disagree"


def ddp_case(rank, world, *, opt_name, estimator, k, sharded_val, clip=None):
    torch.manual_seed(0)
    model = TokenMixer().double()
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)                 # DDP training without the engine
    ddp = nn.parallel.DistributedDataParallel(model)
    ddp_plain = nn.parallel.DistributedDataParallel(plain)
    opt, opt_p = OPTS[opt_name](ddp.parameters()), OPTS[opt_name](ddp_plain.parameters())
    if opt_name == "adamw":
        _warm((ddp, opt), (ddp_plain, opt_p), rank=rank)
    eng = ik.InRunShapley(ddp, opt, ce_loss, val_for(rank, sharded_val), num_samples=3000,
                          estimator=estimator, accumulation_steps=k)
    assert eng.dp.kind == "ddp" and eng.dp.val_sharded == sharded_val
    for step in range(2):
        opt.zero_grad()
        opt_p.zero_grad()
        micro = batches(step, rank, k)
        for j, (b, ids) in enumerate(micro):
            sync = j == k - 1
            with (ddp.no_sync() if not sync else _null()), (ddp_plain.no_sync() if not sync else _null()):
                eng.step(b, ids)
                (ce_loss(ddp_plain, b).mean() / k).backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
        c = 1.0
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
            c = min(1.0, clip / (float(norm) + 1e-6))
        orc, gids = global_oracle(ref, model, opt, step, world, k, union_val(world, sharded_val))
        orc.c = c
        _step_and_check(eng, orc.values(estimator), gids, (opt, opt_p), where=(rank, step, opt_name, estimator),
                        tol=TOL[estimator])
    _same_on_all_ranks(eng.values)
    _same_on_all_ranks(eng.counts)
    assert int(eng.counts.sum()) == 2 * sum(len(i) for r in range(world) for _, i in batches(0, r, k))
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fsdp2_case(rank, world, *, opt_name, estimator, k, sharded_val):
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = TokenMixer().double()
    ref = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    for m in (model, plain):
        for layer in (m.up, m.down):
            fully_shard(layer)
        fully_shard(m)
    opt, opt_p = OPTS[opt_name](model.parameters()), OPTS[opt_name](plain.parameters())
    if opt_name == "adamw":
        _warm((model, opt), (plain, opt_p), rank=rank)
    eng = ik.InRunShapley(model, opt, ce_loss, val_for(rank, sharded_val), num_samples=3000,
                          estimator=estimator, accumulation_steps=k)
    assert eng.dp.kind == "fsdp2" and eng.dp.world == world
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t   # noqa: E731
    for step in range(2):
        opt.zero_grad()
        opt_p.zero_grad()
        for b, ids in batches(step, rank, k):
            eng.step(b, ids)
            (ce_loss(plain, b).mean() / k).backward()
        for (name, p), q in zip(model.named_parameters(), plain.parameters()):
            torch.testing.assert_close(full(p.grad), full(q.grad), rtol=1e-12, atol=1e-14, msg=name)
        live = _FullView(model)
        orc, gids = global_oracle(ref, live, _full_opt(opt, live), step, world, k,
                                  union_val(world, sharded_val))
        _step_and_check(eng, orc.values(estimator), gids, (opt, opt_p), where=(rank, step, opt_name, estimator),
                        tol=TOL[estimator])
    _same_on_all_ranks(eng.values)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(full(p), full(q), rtol=1e-12, atol=1e-14)


class _FullView(nn.Module):
    """The sharded model's parameters as whole tensors (all-gathered), under the same names:
    what the oracle reads (weights and .grad)."""

    def __init__(self, model):
        super().__init__()
        self._src = model
        self._full = {}
        for n, p in model.named_parameters():
            t = nn.Parameter(p.detach().full_tensor().clone())
            t.grad = None if p.grad is None else p.grad.full_tensor().clone()
            self._full[n] = t

    def named_parameters(self, *a, **kw):
        return iter(self._full.items())


def _full_opt(opt, view):
    """An optimizer of opt's class over the view's whole tensors, with opt's hyperparameters
    and its state all-gathered: what the oracle clones."""
    fulls = dict(view._full)
    by_id = {id(p): fulls[n] for n, p in view._src.named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_id[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    new = type(opt)(groups)
    for p, st in opt.state.items():
        new.state[by_id[id(p)]] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
                                   for k, v in st.items()}
    return new


def refusals_case(rank, world):
    """What the engine refuses under torch.distributed, each with an error naming why."""
    import pytest
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    val = val_for(0, False)
    class Fsdp1(FullyShardedDataParallel):   # FSDP1 needs an accelerator to be built here;
        __init__ = nn.Module.__init__           # the engine's check is on the wrapper's class
        __getattr__ = nn.Module.__getattr__
        named_parameters = nn.Module.named_parameters
        forward = TokenMixer.forward
    fsdp1 = Fsdp1()
    for name, mod in TokenMixer().double().named_children():
        fsdp1.add_module(name, mod)
    with pytest.raises(TypeError, match="FSDP1"):
        ik.InRunShapley(fsdp1, torch.optim.SGD(fsdp1.parameters(), lr=0.1), ce_loss, val)
    plain = TokenMixer().double()
    with pytest.warns(UserWarning, match="neither DistributedDataParallel nor FSDP2"):
        ik.InRunShapley(plain, torch.optim.SGD(plain.parameters(), lr=0.1), ce_loss, val)
    partly = TokenMixer().double()
    partly.scale = nn.Parameter(torch.ones(()))   # a parameter no ghost layer covers
    orig = partly.forward
    partly.forward = lambda x: orig(x) * partly.scale
    ddp = nn.parallel.DistributedDataParallel(partly)
    with pytest.raises(ValueError, match="every trainable parameter must be covered"):
        ik.InRunShapley(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), ce_loss, val, strict=False)
    sharded = TokenMixer().double()
    fully_shard(sharded)
    with pytest.raises(ValueError, match="second"):
        ik.InRunShapley(sharded, torch.optim.SGD(sharded.parameters(), lr=0.1), ce_loss, val,
                        estimator="second")
    ddp = nn.parallel.DistributedDataParallel(TokenMixer().double())
    odd = val if rank == 0 else val[0]   # a tuple on one rank, a tensor on the other
    with pytest.raises(ValueError, match="different structure"):
        ik.InRunShapley(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), ce_loss, odd)


def run(rank: int, world: int, rendezvous: str, case: str, kwargs_list: list[dict]) -> None:
    init(rank, world, rendezvous)
    try:
        for kw in kwargs_list:
            {"ddp": ddp_case, "fsdp2": fsdp2_case, "refusals": refusals_case}[case](rank, world, **kw)
        # DDP reducers / FSDP states of the cases go before the group, and both ranks reach the
        # end before it is destroyed (a rank tearing gloo down under the other aborted, once)
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
