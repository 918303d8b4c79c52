"""How close are the In-Run values to the exact Shapley values of the step that really happens?

    rep = ik.fidelity_check(model, optimizer, loss_fn, train, val, n=10)
    print(rep)            # Spearman / Pearson / relative error of every estimator vs exact
    rep.exact             # float64 [n] exact Shapley values (all 2^n subsets enumerated)
    rep.values["midpoint/optimizer"], rep.metrics["first/sgd"]["spearman"], rep.drop, ...

Ground truth. Take the first n rows of `train` (n <= 12), their per-sample gradients g_i at the
current weights w, and the real one-step utility of a subset S of them

    U(S) = L_val(w) - L_val(w + Delta(g_S)),      g_S = (1/n) sum_{i in S} g_i

where L_val is the mean of loss_fn over `val` and Delta is the update the optimizer's step()
would make with p.grad = g_S, its state (momentum, exp_avg, exp_avg_sq, step, lr, weight decay)
fixed as it is now. Delta is the package's update map, make_update(optimizer, "optimizer")
(inrun_kernels/updates.py); the tests check that map against the real torch.optim step, and
every report carries `update_check`, the relative difference between Delta(g_bar) and what a
real optimizer.step() on a copy does with p.grad = g_bar. U is evaluated at all 2^n subsets
(torch.func.functional_call + vmap over chunks of stacked parameter dicts; a plain loop for a
model that vmap cannot run), and its Shapley values by the standard weights
(`shapley_by_enumeration`). They sum to U(B) - U(empty), which is not U(B) when Delta(0) != 0
(momentum, weight decay).

Estimates. For every (estimator, update) pair, `InRunShapley(copy, optimizer copy, ...,
estimator=e, update=u)` takes one step on the same n rows of a fresh deep copy of the model and
of the optimizer (same class, param groups and state_dict) and commits; its `last_values` are
compared to the exact values: Spearman, Pearson and rel_err = ||values - exact|| / ||exact||.

Side effects: none. The model, its parameters, buffers and .grad, the optimizer and its state,
and the RNG state are left as they were (everything runs on copies). Use a deterministic model
(dropout off) and, to resolve small steps, a float64 one: in float32 the loss differences of a
0.01% step are near rounding.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .batch import batch_size
from .updates import make_update

MAX_N = 12


# ---- exact Shapley ----------------------------------------------------------------------------
def subset_bits(n: int, device=None) -> Tensor:
    """[2^n, n] bool: row m is the subset with bitmask m (bit i set = sample i in the subset)."""
    masks = torch.arange(2 ** n, device=device)
    return ((masks[:, None] >> torch.arange(n, device=device)) & 1).bool()


def shapley_by_enumeration(utility: Tensor) -> Tensor:
    """Exact Shapley values of a game given as utility[m] = U(subset with bitmask m), m < 2^n.

        phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n!  (U(S + i) - U(S))

    Vectorised over subsets and players; float64; sum(phi) = U(all) - U(empty)."""
    u = torch.as_tensor(utility).to(torch.float64).reshape(-1)
    size = u.numel()
    n = size.bit_length() - 1
    if size != 2 ** n or n < 1:
        raise ValueError(f"utility must have 2^n entries (indexed by subset bitmask), got {size}")
    bits = subset_bits(n, u.device)
    card = bits.sum(1)                                   # |S|
    k = torch.arange(n + 1, dtype=torch.float64, device=u.device)
    lg = torch.lgamma(k + 1)                             # log k!
    # weight of a subset of size s that does not contain i: s! (n-s-1)! / n!   (s <= n-1)
    s = card.clamp(max=n - 1)
    w = torch.exp(lg[s] + lg[n - 1 - s] - lg[n])         # [2^n]
    masks = torch.arange(size, device=u.device)
    with_i = masks[:, None] | (1 << torch.arange(n, device=u.device))[None, :]   # [2^n, n]
    marginal = (u[with_i] - u[:, None]) * (~bits)        # zero where i already in S
    return (w[:, None] * marginal).sum(0)


# ---- rank statistics without scipy --------------------------------------------------------------
def _rank(x: Tensor) -> Tensor:
    """Ranks 0..n-1, ties get their average rank."""
    x = x.to(torch.float64).reshape(-1)
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two vectors (nan if one is constant)."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a @ b) / den) if den > 0 else float("nan")


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (Pearson of the average-tie ranks)."""
    return pearson(_rank(torch.as_tensor(a)), _rank(torch.as_tensor(b)))


def rel_err(values: Tensor, exact: Tensor) -> float:
    exact = torch.as_tensor(exact, dtype=torch.float64)
    d = torch.as_tensor(values, dtype=torch.float64) - exact
    nrm = exact.norm()
    return float(d.norm() / nrm) if nrm > 0 else float("inf") if d.norm() > 0 else 0.0


def compare(values: Tensor, exact: Tensor) -> dict[str, float]:
    return {"spearman": spearman(values, exact), "pearson": pearson(values, exact),
            "rel_err": rel_err(values, exact)}


# ---- report -----------------------------------------------------------------------------------
@dataclass
class FidelityReport:
    exact: Tensor                                   # float64 [n]
    values: dict[str, Tensor]                       # "estimator/update" -> float64 [n]
    metrics: dict[str, dict[str, float]]            # same keys -> spearman, pearson, rel_err
    utility: float                                  # U(B) - U(empty) = sum(exact)
    val_loss: float                                 # L_val(w)
    drop: float                                     # U(B) / L_val(w)
    n: int
    utility_empty: float = 0.0                      # U(empty) = L_val(w) - L_val(w + Delta(0))
    update_check: float = float("nan")              # |real step - Delta(g_bar)| / |Delta(g_bar)|
    errors: dict[str, str] = field(default_factory=dict)   # estimator/update -> error (on_error="record")
    reference: dict[str, Tensor] = field(default_factory=dict)       # reference=True: engine-free values
    engine_vs_reference: dict[str, float] = field(default_factory=dict)   # rel. difference engine vs those
    seconds: float = 0.0

    def __str__(self) -> str:
        ref = bool(self.engine_vs_reference)
        lines = [f"fidelity_check: n={self.n}, L_val(w)={self.val_loss:.6g}, full step lowers L_val by "
                 f"{100 * self.drop:.4g}%, U(B)-U(empty)={self.utility:.4g} (U(empty)={self.utility_empty:.3g}), "
                 f"update map vs real step {self.update_check:.1e}",
                 f"{'estimator/update':<22}{'spearman':>10}{'pearson':>10}{'rel_err':>10}"
                 + (f"{'vs_reference':>14}" if ref else "")]
        for key, m in self.metrics.items():
            lines.append(f"{key:<22}{m['spearman']:>10.4f}{m['pearson']:>10.4f}{m['rel_err']:>10.4f}"
                         + (f"{self.engine_vs_reference.get(key, float('nan')):>14.1e}" if ref else ""))
        for key, err in self.errors.items():
            lines.append(f"{key:<22}  failed: {err}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain Python numbers and lists (for JSON)."""
        return {"exact": self.exact.tolist(), "values": {k: v.tolist() for k, v in self.values.items()},
                "metrics": self.metrics, "utility": self.utility, "val_loss": self.val_loss,
                "drop": self.drop, "n": self.n, "utility_empty": self.utility_empty,
                "update_check": self.update_check, "errors": self.errors,
                "reference": {k: v.tolist() for k, v in self.reference.items()},
                "engine_vs_reference": self.engine_vs_reference, "seconds": self.seconds}


# ---- helpers ----------------------------------------------------------------------------------
def _rows(batch: Any, idx) -> Any:
    """Rows `idx` (a slice or an index tensor) of every tensor of a batch; others passed through."""
    if isinstance(batch, Tensor):
        return batch[idx]
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[idx] if isinstance(t, Tensor) else t for t in batch)
    if isinstance(batch, dict):
        return {k: (t[idx] if isinstance(t, Tensor) else t) for k, t in batch.items()}
    raise TypeError(f"a batch must be a Tensor, a tuple/list or a dict of Tensors, got {type(batch).__name__}")


class _LossOf(nn.Module):
    """forward(batch) = loss_fn(model, batch), so that functional_call can swap the model's
    parameters (names prefixed by "model.") while loss_fn calls the model itself."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def copy_optimizer(optimizer: torch.optim.Optimizer, src: nn.Module, dst: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of the same class over dst's parameters (dst = a deep copy of src):
    same param-group structure, hyper-parameters and state. The optimizer itself is not deep
    copied (it may carry hooks, e.g. an engine's step pre-hook)."""
    src_params = list(src.parameters())
    dst_params = list(dst.parameters())
    if len(src_params) != len(dst_params):
        raise RuntimeError("the model copy does not have the model's parameters")
    to_dst = {id(p): q for p, q in zip(src_params, dst_params)}
    groups = []
    for g in optimizer.param_groups:
        missing = [p for p in g["params"] if id(p) not in to_dst]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} parameter(s) that are not the model's; "
                             "fidelity_check needs an optimizer over the model's parameters")
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": [to_dst[id(p)] for p in g["params"]]})
    cls = type(optimizer)
    sig = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in sig}
    opt2 = cls(groups, **kwargs)
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return opt2


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    return {
        "tensors": [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())],
        "grads": [(p, None if p.grad is None else p.grad, None if p.grad is None else p.grad.detach().clone())
                  for p in model.parameters()],
        "training": [(m, m.training) for m in model.modules()],
        "opt_state": [(p, k, v, v.detach().clone()) for p, st in optimizer.state.items() for k, v in st.items()
                      if isinstance(v, Tensor)],
    }


def _restore(snap) -> None:
    """Put back whatever a side effect might have changed (everything runs on copies; this is
    a safety net, and restores in place so that references held elsewhere stay valid)."""
    with torch.no_grad():
        for t, v in snap["tensors"]:
            if not torch.equal(t, v):
                t.copy_(v)
        for p, g, v in snap["grads"]:
            if p.grad is not g:
                p.grad = g
            if g is not None and not torch.equal(g, v):
                g.copy_(v)
        for _, _, t, v in snap["opt_state"]:
            if not torch.equal(t, v):
                t.copy_(v)
    for m, tr in snap["training"]:
        m.training = tr


# ---- the check --------------------------------------------------------------------------------
class _Exact:
    """Per-sample gradients of n rows and the real one-step utility of all 2^n subsets."""

    def __init__(self, model, optimizer, loss_fn, train, val, n, *, chunk=None, mem_budget=2 ** 28):
        self.orig = model
        self.n = n
        self.val = val
        self.umap = make_update(optimizer, "optimizer")
        self.work = copy.deepcopy(model)
        for p in self.work.parameters():
            p.grad = None
        self.wrap = _LossOf(self.work, loss_fn)
        names = [nm for nm, _ in model.named_parameters()]
        orig_params = list(model.parameters())
        work_params = list(self.work.parameters())
        trainable = [i for i, p in enumerate(work_params) if p.requires_grad]
        # per-sample gradients, batch-size-1 loop on the copy (autograd.grad: no .grad written)
        grads: list[list[Tensor | None]] = []
        for i in range(n):
            loss = loss_fn(self.work, _rows(train, slice(i, i + 1)))
            if loss.numel() != 1:
                raise ValueError(f"loss_fn returned {loss.numel()} losses for one sample; it must return one per sample")
            gs = torch.autograd.grad(loss.sum(), [work_params[j] for j in trainable],
                                     allow_unused=True)
            grads.append(list(gs))
        # updated = in the optimizer and reached by the loss (a parameter whose .grad stays None
        # is skipped by optimizer.step())
        self.updated = []   # (name, original param, work param, G [n, *shape] float64)
        for col, j in enumerate(trainable):
            per = [grads[i][col] for i in range(n)]
            if all(g is None for g in per) or self.umap.group(orig_params[j]) is None:
                continue
            p = work_params[j]
            G = torch.stack([torch.zeros_like(p, dtype=torch.float64) if g is None else g.detach().to(torch.float64)
                             for g in per])
            self.updated.append(("model." + names[j], orig_params[j], p, G))
        upd = {nm for nm, *_ in self.updated}
        self.fixed = {"model." + nm: t.detach() for nm, t in self.work.named_parameters() if "model." + nm not in upd}
        self.fixed.update({"model." + nm: b for nm, b in self.work.named_buffers()})
        numel = sum(p.numel() for _, _, p, _ in self.updated)
        self.chunk = chunk or max(1, min(256, mem_budget // max(1, 10 * 8 * numel)))
        self.use_vmap = True
        self.device = self.updated[0][3].device if self.updated else torch.device("cpu")

    def g_bar(self) -> dict[str, Tensor]:
        return {nm: G.mean(0) for nm, _, _, G in self.updated}

    def _loss(self, params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(self.wrap, {**self.fixed, **params}, (self.val,),
                                          tie_weights=True, strict=False).mean()

    def val_losses(self, coeff: Tensor) -> Tensor:
        """coeff [C, n] float64 -> L_val(w + Delta(coeff @ g)) for each row, [C] float64."""
        out = []
        with torch.no_grad():
            for s in range(0, coeff.shape[0], self.chunk):
                c = coeff[s:s + self.chunk].to(self.device)
                stacked = {}
                for nm, po, pw, G in self.updated:
                    gs = torch.tensordot(c, G, dims=([1], [0]))          # [c, *shape]
                    stacked[nm] = (pw.detach().to(torch.float64) + self.umap.delta(po, gs)).to(pw.dtype)
                out.append(self._eval(stacked, c.shape[0]))
        return torch.cat(out).to("cpu", torch.float64)

    def _eval(self, stacked: dict[str, Tensor], c: int) -> Tensor:
        if self.use_vmap:
            try:
                return torch.func.vmap(self._loss)(stacked).reshape(c)
            except Exception:      # a model vmap cannot run (data-dependent control flow, ...)
                self.use_vmap = False
        return torch.stack([self._loss({k: v[j] for k, v in stacked.items()}) for j in range(c)])

    def base_loss(self) -> float:
        with torch.no_grad():
            return float(self._loss({nm: pw.detach() for nm, _, pw, _ in self.updated}))

    # ---- an independent reference for the estimators (torch.func on the copy, no engine) --------
    def _val_grad(self, shift: dict[str, Tensor] | None = None, hvp: dict[str, Tensor] | None = None):
        """grad L_val at w (+ shift), float64 per updated name; with `hvp` also H_val @ hvp."""
        prm = {}
        for nm, _, pw, _ in self.updated:
            t = pw.detach().to(torch.float64)
            if shift is not None:
                t = t + shift[nm]
            prm[nm] = t.to(pw.dtype).requires_grad_(True)
        with torch.enable_grad():
            loss = self._loss(prm)
            gs = torch.autograd.grad(loss, list(prm.values()), create_graph=hvp is not None)
            g = {nm: t.detach().to(torch.float64) for nm, t in zip(prm, gs)}
            if hvp is None:
                return g, None
            dot = sum((t * hvp[nm].to(t.dtype)).sum() for nm, t in zip(prm, gs))
            hs = torch.autograd.grad(dot, list(prm.values()), allow_unused=True)
        return g, {nm: (torch.zeros_like(g[nm]) if h is None else h.detach().to(torch.float64))
                   for nm, h in zip(prm, hs)}

    def reference(self, estimator: str, umap) -> Tensor:
        """phi_i = <g_i / n, V> with V of estimators.py computed here from its definition (c = 1):
        first V = S (.) g_val (secant S), midpoint V = -D1(x_B/2) (.) grad L_val(w + Delta(x_B/2)),
        second V = -D1(0) (.) (g_val + H_val u) - 1/2 D2(0) (.) x_B (.) g_val, u = Delta(0) + 1/2 D1(0) (.) x_B."""
        x = self.g_bar()
        po = {nm: q for nm, q, _, _ in self.updated}
        if estimator == "first":
            gv, _ = self._val_grad()
            V = {nm: umap.secant(po[nm], x[nm]) * gv[nm] for nm in x}
        elif estimator == "midpoint":
            gm, _ = self._val_grad(shift={nm: umap.delta(po[nm], x[nm] / 2) for nm in x})
            V = {nm: -umap.d1(po[nm], x[nm] / 2) * gm[nm] for nm in x}
        elif estimator == "second":
            z = {nm: torch.zeros_like(x[nm]) for nm in x}
            d1 = {nm: umap.d1(po[nm], z[nm]) for nm in x}
            u = {nm: umap.delta(po[nm], z[nm]) + 0.5 * d1[nm] * x[nm] for nm in x}
            gv, hu = self._val_grad(hvp=u)
            V = {nm: -d1[nm] * (gv[nm] + hu[nm]) - 0.5 * umap.d2(po[nm], z[nm]) * x[nm] * gv[nm] for nm in x}
        else:
            raise ValueError(f"unknown estimator {estimator!r}")
        return (sum(G.reshape(self.n, -1) @ V[nm].reshape(-1).to(G) for nm, _, _, G in self.updated) / self.n).cpu()


def _update_check(model, optimizer, ex: _Exact) -> float:
    """Relative difference between Delta(g_bar) (the map) and a real optimizer.step() on copies."""
    m2 = copy.deepcopy(model)
    opt2 = copy_optimizer(optimizer, model, m2)
    gbar = ex.g_bar()
    names = {"model." + nm: p for nm, p in m2.named_parameters()}
    for p in m2.parameters():
        p.grad = None
    before = {}
    for nm, po, _, _ in ex.updated:
        q = names[nm]
        q.grad = gbar[nm].to(q.dtype).clone()
        before[nm] = q.detach().to(torch.float64).clone()
    opt2.step()
    num = den = 0.0
    for nm, po, _, _ in ex.updated:
        real = names[nm].detach().to(torch.float64) - before[nm]
        mapped = ex.umap.delta(po, gbar[nm])
        num = max(num, float((real - mapped).abs().max()))
        den = max(den, float(mapped.abs().max()))
    return num / den if den > 0 else num


def _engine_values(model, optimizer, loss_fn, train_n, val, n, estimator, update) -> Tensor:
    from .shapley import InRunShapley
    m2 = copy.deepcopy(model)
    for p in m2.parameters():
        p.grad = None
    opt2 = copy_optimizer(optimizer, model, m2)
    eng = InRunShapley(m2, opt2, loss_fn, val, num_samples=n, estimator=estimator, update=update)
    eng.step(train_n, torch.arange(n))
    eng.commit()
    if eng.last_values is None:
        raise RuntimeError("the engine committed no values")
    return eng.last_values.detach().to(torch.float64).cpu().clone()


def fidelity_check(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, train: Any,
                   val: Any, n: int = 10, estimators: Sequence[str] = ("first", "midpoint", "second"),
                   updates: Sequence[str] = ("optimizer", "sgd"), *, chunk: int | None = None,
                   on_error: str = "raise", reference: bool = False) -> FidelityReport:
    """Exact Shapley values of the real one-step utility of the first n rows of `train` (all 2^n
    subsets, n <= 12) next to every estimator/update's In-Run values; see the module docstring.
    Changes neither the model, the optimizer, their state nor any .grad. `chunk`: subsets
    evaluated per vmap call (default from a memory budget); on_error="record" keeps going when
    one estimator fails and puts its error in `report.errors`. reference=True also computes every
    estimator from its definition without the engine (torch.func on a copy), in
    `report.reference`, and `report.engine_vs_reference` = relative difference to the engine's
    values: a harness-independent check of the engine."""
    t0 = time.perf_counter()
    if on_error not in ("raise", "record"):
        raise ValueError(f"on_error must be 'raise' or 'record', got {on_error!r}")
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be in 1..{MAX_N} (2^n subsets are enumerated), got {n}")
    rows = batch_size(train, "train")
    if rows < n:
        raise ValueError(f"train has {rows} rows, fewer than n={n}")
    batch_size(val, "val")
    make_update(optimizer, "optimizer")      # a clear error for an optimizer without a modelled map
    train_n = _rows(train, slice(0, n))
    snap = _snapshot(model, optimizer)
    try:
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=devices):
            ex = _Exact(model, optimizer, loss_fn, train_n, val, n, chunk=chunk)
            base = ex.base_loss()
            bits = subset_bits(n).to(torch.float64)
            ls = ex.val_losses(bits / n)
            U = base - ls
            exact = shapley_by_enumeration(U)
            full, empty = float(U[-1]), float(U[0])
            upd_check = _update_check(model, optimizer, ex)
            values, metrics, errors = {}, {}, {}
            for u in updates:
                for e in estimators:
                    key = f"{e}/{u}"
                    try:
                        v = _engine_values(model, optimizer, loss_fn, train_n, val, n, e, u)
                    except Exception as err:
                        if on_error == "raise":
                            raise
                        errors[key] = f"{type(err).__name__}: {err}"
                        continue
                    values[key] = v
                    metrics[key] = compare(v, exact)
            refs, vs_ref = {}, {}
            if reference:
                for u in updates:
                    umap = make_update(optimizer, u)
                    for e in estimators:
                        key = f"{e}/{u}"
                        refs[key] = ex.reference(e, umap)
                        if key in values:
                            vs_ref[key] = rel_err(values[key], refs[key])
    finally:
        _restore(snap)
    return FidelityReport(exact=exact, values=values, metrics=metrics, utility=full - empty, val_loss=base,
                          drop=full / base if base else float("nan"), n=n, utility_empty=empty,
                          update_check=upd_check, errors=errors, reference=refs, engine_vs_reference=vs_ref,
                          seconds=time.perf_counter() - t0)
