"""In-Run Data Shapley: values of the update the optimizer really applies.

    eng = InRunShapley(model, optimizer, loss_fn, val, num_samples=None,
                       estimator="first", update="optimizer")
    loss = eng.step(train, ids)   # forward + backward of the training rows; p.grad = train gradient
    optimizer.step()              # the step's values are committed here (a step pre-hook)
    eng.values                    # float64 [num_samples], summed over steps; > 0 = helpful

The engine composes two parts: an update map (updates.py: Delta(g), what optimizer.step() does
with gradient g, state fixed) and an estimator (estimators.py: the vector V each training
sample's gradient is dotted with). Values are committed in an optimizer step pre-hook, against
the gradient the optimizer is about to apply: a uniform rescale of .grad in between (gradient
clipping) scales the step's share of every sample, and anything else is an error.

Data path of a step: one ghost forward+backward. When the values are per-parameter scalars times
<g_i, g_val> (first order with an SGD-type update: the slope of Delta is one number per
parameter), the validation rows join the batch and the ghost backward computes the products by
the cheapest route. Otherwise the ghost backward runs on the training rows only and keeps their
per-sample gradient representations; at commit the estimator runs its validation pass and every
sample's <g_i, V> is a dense-V ghost product over the kept representations (no per-sample
gradient is formed).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import ghost_pass as gp
from . import products
from .batch import batch_size, check_same_structure, pad_common
from .distributed import ParamAliases, data_parallel, full, local_shard, unwrap
from .estimators import StepContext, make_estimator
from .history import StepRecorder, check_groups
from .layers.dropout import functional_dropouts
from .ledger import ValueLedger, atomic_save, check_ids
from .updates import make_update
from .verify import verify as verify_model


class _Pending:
    """The values of one optimizer step, waiting for optimizer.step(): one entry per micro-batch
    (accumulation_steps > 1), and p.grad as the last of them left it."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.ids: list[Tensor] = []
        self.raw: list[Tensor] = []   # values computed in the backward (for c = 1), per micro-batch
        self.kept: list = []          # [(params, rep, weight, row offset)] for the dense-V products
        self.v: dict | None = None    # the "prefetched" route's V, from the window's validation pass
        self.val_loss: Tensor | None = None   # mean validation loss at the step's weights, if seen
        self.slopes: list | None = None   # in-backward routes: each parameter's update slope used
        self.n = self.micro = 0

    def add(self, ids: Tensor, raw: Tensor | None, kept: list, weight: float) -> None:
        """One micro-batch: its ids, and either its values or its kept reps; a sample's share
        of the step is weight * g_i (weight = 1 / (k * micro-batch size))."""
        if raw is not None:
            self.raw.append(raw)
        self.kept += [(ps, rep, weight, self.n) for ps, rep in kept]
        self.ids.append(ids)
        self.n += ids.numel()
        self.micro += 1
        # p.grad as the step left it: object, version and (sum, sum of squares) per parameter
        self.grads = [(p.grad, None if p.grad is None else p.grad._version) for p in self.params]
        self.fingerprint = _fingerprint(self.params)

    @property
    def all_ids(self) -> Tensor:
        return torch.cat(self.ids)


def _fingerprint(params: list[nn.Parameter]) -> Tensor:
    """[len(params), 2] float64 (sum, sum of squares) of each p.grad (zeros where None), left on
    the gradients' device (no sync here). A handful of ops whatever the parameter count: this
    runs every step, and small models feel every op."""
    grads = [None if p.grad is None else local_shard(p.grad.detach()) for p in params]
    live = [k for k, g in enumerate(grads) if g is not None]
    out = torch.zeros(len(grads), 2, dtype=torch.float64,
                      device=grads[live[0]].device if live else torch.device("cpu"))
    if live:
        gs = [grads[k] for k in live]
        sums = [g.sum(dtype=torch.float64).to(out.device) for g in gs]
        sq = [n.to(out.device) for n in torch._foreach_norm(gs, 2, dtype=torch.float64)]
        out[live] = torch.stack([torch.stack(sums), torch.stack(sq).square()], 1)
    return out


def _check_no_stale_grad(params: list[nn.Parameter], names: dict[int, str]) -> None:
    """A gradient left from before the step would be applied with this step's but valued by
    nobody: an error (one reduction, one sync, only when some .grad exists)."""
    grads = [local_shard(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm([g.detach() for g in grads])
    live = torch.stack([n.to(grads[0].device, torch.float32) for n in norms]) != 0
    if bool(live.any()):
        held = [names.get(id(p), "?") for p in params if p.grad is not None]
        bad = [n for n, x in zip(held, live.tolist()) if x]
        raise RuntimeError(
            f"InRunShapley.step: .grad of {bad[:5]}{' ...' if len(bad) > 5 else ''} already holds a "
            "gradient; the optimizer would apply it together with this step's, and no sample's value "
            "would account for it. Call optimizer.zero_grad() before eng.step()")


def _check_optimizer_holds(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer must update the model's trainable parameters: none is an error (every value
    would be 0), some missing is a warning naming them (their share of the values is 0)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if id(p) not in held]
    if trainable and len(missing) == len(trainable):
        raise ValueError("the optimizer holds none of the model's trainable parameters: build it from "
                         "model.parameters() (of this model object)")
    if missing:
        warnings.warn(f"the optimizer does not update {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                      "they contribute nothing to the values", stacklevel=3)


class InRunShapley:
    """Per-sample In-Run Data Shapley values, accumulated over training steps.

    estimator: "first" (one pass), "midpoint" (one extra validation pass at the midpoint of the
    step; the most faithful), "second" (validation Hessian-vector product; needs double
    backward). update: "optimizer" (the update your optimizer really applies: SGD with momentum/
    nesterov/weight decay/maximize, Adam, AdamW) or "sgd" (the paper's SGD-form value).
    verify=True (default): the first step first runs ik.verify on a few of its rows (a one-off
    cost below one engine step) and raises VerificationError with a diagnosis if the ghost
    products disagree with plain autograd. See README "Which estimator".

    model may be wrapped in DistributedDataParallel, sharded by FSDP2's fully_shard, or
    compiled (torch.compile): values then use the global batch, and every rank's ledger holds
    every rank's samples (README "Distributed training")."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                 val: Any, num_samples: int | None = None, *, estimator: str = "first",
                 update: str = "optimizer", strict: bool = True, pad_values=None,
                 verify: bool = True, accumulation_steps: int = 1, groups=None,
                 group_names=None, history_every: int = 0):
        # every argument is checked before the model is patched: a refused engine changes nothing
        self._pending: _Pending | None = None
        self.accumulation_steps = accumulation_steps
        self.recorder = StepRecorder(None if groups is None else check_groups(groups, num_samples),
                                     history_every, group_names)
        self._val_loss_at_w: Tensor | None = None   # set by a validation pass at the step's weights
        self.estimator = make_estimator(estimator)
        self.update = make_update(optimizer, update)
        self._val, self.n_val = val, batch_size(val, "val")
        inner = unwrap(model)   # DDP's .module, torch.compile's ._orig_mod
        _check_optimizer_holds(inner, optimizer)
        self.dp = data_parallel(model, inner)
        self.model = gp.ensure_patched(inner, strict=strict)
        self._forward_model = model   # the training forward goes through the wrapper (grad sync)
        uncovered = gp.uncovered_params(self.model)
        if self.dp.active and uncovered:
            names = {id(p): n for n, p in self.model.named_parameters()}
            raise ValueError(
                f"under {self.dp.kind} every trainable parameter must be covered by a ghost layer "
                f"(uncovered: {[names[id(p)] for p in uncovered][:5]}): their exact gradient needs "
                "a second backward, which the data-parallel gradient sync does not allow")
        if self.dp.kind == "fsdp2" and self.estimator.name == "second":
            raise ValueError("estimator='second' needs a Hessian-vector product, which FSDP2's "
                             "sharded parameters do not give; use estimator='midpoint' (at least as "
                             "accurate, no Hessian)")
        self.dp.check_val(val, self.n_val)
        self._aliases = ParamAliases(self.model, enabled=self.dp.kind == "fsdp2")
        if self.dp.kind == "fsdp2":
            verify = False   # ik.verify's batch-size-1 passes would all-gather per row; off
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        # HF dict batches of another sequence length than the validation batch are right-padded
        # to a common one (input_ids with this pad id, attention_mask 0, labels -100)
        if pad_values is None:
            pad_values = getattr(getattr(model, "config", None), "pad_token_id", None)
        self.pad_values = pad_values
        self._verify_pending = verify   # ik.verify on the first step's rows, once
        self._dropout_checked = False   # functional dropout looked for, once
        self.ledger = ValueLedger(num_samples)
        self.steps = 0
        self.last_losses: Tensor | None = None   # per-sample training losses of the last eng.step()
        self.last_values: Tensor | None = None   # the last step's values, of the ids last_ids
        self.last_ids: Tensor | None = None
        self._names = {id(p): n for n, p in self.model.named_parameters()}
        self._hook = optimizer.register_step_pre_hook(self._before_optimizer_step)

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step; may change between optimizer steps (e.g. a shorter
        last window of an epoch), not within one."""
        return self._k

    @accumulation_steps.setter
    def accumulation_steps(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1, got {k!r}")
        if self._pending is not None and k != self._k:
            raise RuntimeError(f"accumulation_steps: {self._pending.micro} micro-batch(es) of this "
                               "optimizer step are in; change it after optimizer.step()")
        self._k = k

    @property
    def micro_batches_pending(self) -> int:
        """Micro-batches of the current optimizer step already in (0: the next eng.step() opens
        a new step; accumulation_steps may be changed only then)."""
        return 0 if self._pending is None else self._pending.micro

    @property
    def values(self) -> Tensor:
        """float64 [num_samples]: each sample's values summed over the committed steps."""
        return self.ledger.values

    @property
    def counts(self) -> Tensor:
        """long [num_samples]: in how many committed steps each sample appeared."""
        return self.ledger.counts

    def close(self) -> None:
        """Detach from the optimizer (no more commits at optimizer.step())."""
        self._hook.remove()
        self._aliases.remove()

    # ---- one training step ------------------------------------------------------------------
    def step(self, train: Any, ids) -> Tensor:
        """One forward and one backward; leaves p.grad as loss_fn(model, train).mean().backward()
        would. Returns the mean training loss (detached). The step's values are recorded when
        optimizer.step() runs next (or by commit())."""
        k, pend = self.accumulation_steps, self._pending
        if pend is not None and pend.micro >= k:
            raise RuntimeError(
                f"InRunShapley.step: {pend.micro} micro-batch(es) of accumulation_steps={k} are in and "
                "their values are pending: they are committed by optimizer.step(), which values the "
                "update it really applies. Call optimizer.step() after every optimizer step's "
                "eng.step() calls (or eng.commit() to record them now)")
        if not gp.is_patched(self.model):
            raise RuntimeError("InRunShapley.step: the model is no longer patched (ik.unpatch was called "
                               "after the engine was built); every value would be 0. Build a new engine")
        n = batch_size(train, "train")
        check_same_structure(train, self.val)
        ids = check_ids(ids, n, self.ledger.num_samples)
        self.update.refresh()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if pend is None:   # a new optimizer step: .grad must be None or zero
            _check_no_stale_grad(params, self._names)
            before = [p.grad for p in params]
        else:              # accumulating: keep copies to restore if this micro-batch fails
            before = [None if p.grad is None else p.grad.clone() for p in params]
        # sample i's share of the step: weight * g_i (the data-parallel gradient is the mean of
        # the W ranks' gradients)
        weight = 1.0 / (n * k * self.dp.world)
        grad_scale = 1.0 / (n * k)   # .grad before the sync: this rank's mean (/ k)
        what = f"InRunShapley step {self.steps}"
        run = dict(forward_model=self._forward_model, grad_scale=grad_scale, ids=ids, what=what,
                   canonical=self._aliases.canonical if self._aliases else None)
        route = self._route(params)
        slopes = None if route == "deferred" else [self.update.constant_slope(p) for p in params]
        try:
            if route == "prefetched":   # V = slope (.) g_val, from one validation pass per window
                v = pend.v if pend is not None else self._prefetch_v(params)
                val_loss = self._val_loss_at_w
                sess, losses = gp.run(self.model, self.loss_fn, train, None, train_grad=True,
                                      dense_v=v, **run)
                raw = sess.result("dot").to(torch.float64) * weight
                gp.check_finite(raw, what, ids)
            elif route == "joined":
                self._warn_functional_dropout()
                scale = {p: s * weight / self.n_val for p, s in zip(params, slopes)}
                train, val = pad_common(train, self.val, self.pad_values)
                sess, losses = gp.run(self.model, self.loss_fn, train, val, train_grad=True,
                                      dot=True, dot_scale=scale, **run)
                raw = sess.result("dot").to(torch.float64)
                gp.check_finite(raw, what, ids)
                val_loss = losses[n:].mean()
            else:
                val_loss = None
                sess, losses = gp.run(self.model, self.loss_fn, train, None, train_grad=True,
                                      keep=True, **run)
                raw = None
            if self._verify_pending:   # one-off self-check against plain autograd (restores all state)
                verify_model(self.model, self.loss_fn, *pad_common(train, self.val, self.pad_values),
                             allow_uncovered=True)
                self._verify_pending = False
        except BaseException:
            for p, g in zip(params, before):   # every .grad as before this call
                p.grad = None if g is None else g.zero_() if pend is None else g
            raise
        if pend is None:
            pend = self._pending = _Pending(params)
            if route == "prefetched":
                pend.v = v
            pend.slopes = slopes
            pend.val_loss = None if self.dp.val_sharded else val_loss
        pend.add(ids, raw, sess.kept, weight)
        self.last_losses = losses[:n]
        return losses[:n].mean()

    def _route(self, params: list[nn.Parameter]) -> str:
        """How this step's values are computed. "joined": the validation rows join the training
        pass and the ghost backward computes per-parameter scalars times <g_i, g_val> by the
        cheapest product route (first order with an SGD-type update, one micro-batch per step,
        the same validation batch on every rank). "prefetched": the same values, but g_val comes
        from one validation pass per optimizer step (accumulation, or validation rows sharded
        across ranks) and the backward dots each sample with V = slope (.) g_val. "deferred":
        V needs the whole step's gradient; the backward keeps the per-sample reps and the dots
        are formed at commit."""
        if not self.estimator.in_backward(self.update, params):
            return "deferred"
        return "joined" if self.accumulation_steps == 1 and not self.dp.val_sharded else "prefetched"

    def _prefetch_v(self, params: list[nn.Parameter]) -> dict[int, Tensor]:
        g_val, _ = self._val_grads()
        return {id(p): full(self.update.constant_slope(p) * g_val[id(p)]) for p in params}

    def _warn_functional_dropout(self) -> None:
        """Validation rows join this pass: dropout applied functionally would reach them."""
        if self._dropout_checked:
            return
        self._dropout_checked = True
        found = functional_dropouts(self.model)
        if found:
            warnings.warn(
                f"inrun_kernels: {found[:4]}{' ...' if len(found) > 4 else ''} apply dropout inside "
                "their forward, which cannot be limited to the training rows: with estimator='first' "
                "and an SGD-type update the validation rows join the training pass and get that "
                "dropout too. Set it to 0, or use estimator='midpoint' (its validation pass runs in "
                "eval mode)", stacklevel=3)

    def commit(self) -> Tensor | None:
        """Record the pending step's values against p.grad as it stands now (what the optimizer
        is about to apply). Called by the optimizer step pre-hook; returns the values or None."""
        pend, self._pending = self._pending, None
        if pend is None:
            return None
        c = self._rescale(pend) * self._slope_change(pend)
        self._val_loss_at_w = None
        ids = pend.all_ids
        values = (torch.cat(pend.raw) if pend.raw else self._dense_values(pend)) * c
        gp.check_finite(values, f"InRunShapley step {self.steps}", ids)
        ids, values = self.dp.gather_step(ids, values)   # every rank's samples, on every rank
        self.ledger.add(ids, values)
        val_loss = pend.val_loss if pend.val_loss is not None else self._val_loss_at_w
        self.recorder.add(ids, values, None if self.dp.val_sharded else val_loss, self.steps + 1)
        self.last_ids = ids
        self.last_values = values
        self.steps += 1
        return values

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        if self._pending is not None:
            self.commit()

    # ---- commit internals ---------------------------------------------------------------------
    def _rescale(self, pend: _Pending) -> float:
        """c such that p.grad == c * (the gradient the step produced) for every parameter."""
        if all(p.grad is g and (g is None or g._version == v) for p, (g, v) in zip(pend.params, pend.grads)):
            return 1.0
        before, now = pend.fingerprint.cpu(), _fingerprint(pend.params).cpu()
        total = float(before[:, 1].sum())
        if total == 0.0:
            return 1.0
        c = math.sqrt(float(now[:, 1].sum()) / total)
        if float((before[:, 0] * now[:, 0]).sum()) < 0:
            c = -c
        bad = []
        for k, p in enumerate(pend.params):
            tol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-4
            s1, s2 = before[k]
            n1, n2 = now[k]
            ok = abs(float(n2 - c * c * s2)) <= tol * c * c * float(s2) + 1e-30
            ok = ok and abs(float(n1 - c * s1)) <= tol * abs(c) * math.sqrt(p.numel() * float(s2)) + 1e-30
            if not ok:
                bad.append(self._names.get(id(p), f"param@{id(p):x}"))
        if bad:
            raise RuntimeError(
                f"InRunShapley: .grad of {bad[:5]}{' ...' if len(bad) > 5 else ''} was changed between "
                "eng.step() and optimizer.step() in a way that is not one uniform rescale of all "
                "gradients (clip_grad_norm_ is one; per-parameter or per-entry clipping is not), so "
                f"the update no longer splits into per-sample shares. Nothing was recorded for ids "
                f"{pend.all_ids.tolist()[:8]}{' ...' if pend.n > 8 else ''}")
        return c

    def _slope_change(self, pend: _Pending) -> float:
        """The in-backward routes formed the values with each parameter's update slope (lr,
        momentum, sign) as it was at eng.step(). A scheduler stepped before optimizer.step()
        changes the update: one common factor over all parameters is followed; anything else
        would need per-parameter values, which those routes do not keep: an error."""
        if pend.slopes is None:
            return 1.0
        self.update.refresh()
        now = [self.update.constant_slope(p) for p in pend.params]
        if now == pend.slopes:
            return 1.0
        factors: dict[float | None, list[str]] = {}
        for p, then, new in zip(pend.params, pend.slopes, now):
            if then == new == 0:
                continue
            r = None if new is None or then == 0 else new / then
            near = next((f for f in factors if f is not None and r is not None
                         and abs(r - f) <= 1e-12 * abs(f)), r)
            factors.setdefault(near, []).append(self._names.get(id(p), f"param@{id(p):x}"))
        if len(factors) > 1 or None in factors:
            ids = pend.all_ids.tolist()
            seen = "; ".join(f"{'not affine' if f is None else f'x{f:.4g}'}: {ns[:3]}"
                             f"{' ...' if len(ns) > 3 else ''}" for f, ns in factors.items())
            raise RuntimeError(
                "InRunShapley: the update changed between eng.step() and optimizer.step() (lr or "
                "momentum set in between, e.g. a scheduler stepped before the optimizer) by factors "
                f"that differ between parameters ({seen}). With estimator='first' and an SGD-type "
                "update the values are formed in eng.step()'s backward with that moment's slopes, "
                "summed over parameters, so they cannot follow it: step the scheduler after "
                "optimizer.step(), or use estimator='midpoint'. Nothing was recorded for ids "
                f"{ids[:8]}{' ...' if len(ids) > 8 else ''}")
        return next(iter(factors), 1.0)

    def _dense_values(self, pend: _Pending) -> Tensor:
        """weight_i * sum over kept reps of <g_i, V_p>, V from the estimator at the applied gradient
        (c is applied by the caller)."""
        params = pend.params
        x = {id(p): (torch.zeros_like(p) if p.grad is None else p.grad.detach()) for p in params}
        ctx = StepContext(params, x, self.update, self._val_grads)
        vector = self.estimator.prepare(ctx)
        skip = {id(p) for p in gp.uncovered_params(self.model)}
        by_param: dict[tuple, list] = {}
        for ps, rep, weight, row in pend.kept:
            if not any(id(p) in skip for p in ps):
                by_param.setdefault(tuple(ps), []).append((rep, weight, row))
        values = torch.zeros(pend.n, dtype=torch.float64)
        with torch.no_grad():
            for ps, reps in by_param.items():
                V = [full(vector(p)) for p in ps]   # FSDP2: all-gather the shard
                for rep, weight, row in reps:
                    values[row:row + rep.n] += weight * products.dense_dot(rep, *V).to("cpu", torch.float64)
        return values

    def _val_grads(self, shift: Callable[[nn.Parameter], Tensor] | None = None,
                   hvp: dict[int, Tensor] | None = None):
        """Gradient of the mean validation loss at w (+ shift), and with `hvp` the Hessian-vector
        product H_val u. A plain forward+backward of the validation rows (no ghost session) in
        eval mode (the model as evaluated: no dropout), RNG forked so training randomness is
        unchanged; parameters and train/eval flags restored exactly; .grad untouched."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = None
        if shift is not None:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(shift(p).to(p.dtype))
        devices = sorted({p.device.index or 0 for p in params if p.is_cuda})
        # the validation gradient of the model as evaluated: eval mode (no dropout), flags restored
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        # fused attention kernels have no double backward; the math one does (same values)
        attention = sdpa_kernel([SDPBackend.MATH]) if hvp is not None else contextlib.nullcontext()
        # a model compiled in place (model.compile()) has no double backward: that pass runs eager
        eager = torch.compiler.set_stance("force_eager") if hvp is not None else contextlib.nullcontext()
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad(), attention, eager:
                losses = gp.check_losses(self.loss_fn(self.model, self.val), self.n_val)
                gp.check_finite_losses(losses, 0, what=f"InRunShapley step {self.steps} (validation pass)")
                hv = None
                if self.dp.kind == "fsdp2":
                    grads = self._sharded_val_grads(losses, params)
                else:
                    grads = torch.autograd.grad(losses.mean(), params, allow_unused=True,
                                                create_graph=hvp is not None)
                    if hvp is not None:
                        live = [(g, p) for g, p in zip(grads, params) if g is not None and g.requires_grad]
                        hv = _hessian_vector(live, params, hvp, losses)
                        hv = dict(zip(hv, self.dp.val_mean(list(hv.values()), self.n_val)))
                    grads = self.dp.val_mean([None if g is None else g.detach() for g in grads], self.n_val)
        finally:
            for m, mode in modes:
                m.training = mode
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
        if shift is None:
            self._val_loss_at_w = losses.detach().mean()
        zeros = lambda p: torch.zeros_like(p)  # noqa: E731
        g_val = {id(p): (zeros(p) if g is None else g.detach()) for p, g in zip(params, grads)}
        return g_val, hv

    def _sharded_val_grads(self, losses: Tensor, params: list[nn.Parameter]) -> list[Tensor | None]:
        """FSDP2: the layers see unsharded parameters that autograd.grad cannot reach from the
        sharded ones, so the validation gradient comes from a plain backward, reduce-scattered
        (averaged over ranks) by FSDP into .grad, which is then put back as it was. The loss is
        weighted so that the average over ranks is the mean over the union of validation rows."""
        dp = self.dp
        scale = self.n_val * dp.world / sum(dp.val_rows) if dp.val_sharded else 1.0
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            (losses.mean() * scale).backward()
            return [None if p.grad is None else p.grad.detach() for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g

    @property
    def val(self) -> Any:
        """The validation batch; assigning it is set_val."""
        return self._val

    @val.setter
    def val(self, batch: Any) -> None:
        self.set_val(batch)

    def set_val(self, val: Any) -> None:
        """Replace the validation batch (any number of rows) between steps."""
        if self._pending is not None:
            raise RuntimeError("set_val: a step is pending; call optimizer.step() (or commit()) first")
        n = batch_size(val, "val")
        self.dp.check_val(val, n)   # same on every rank, or shards (a collective: call on all)
        self._val, self.n_val = val, n

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Values, counts, the number of committed steps, group history and validation losses
        (plain tensors and ints)."""
        return {"ledger": self.ledger.state_dict(), "steps": self.steps,
                "recorder": self.recorder.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; a different num_samples or groups is an error and changes
        nothing."""
        if "recorder" in state:
            self.recorder.check_state(state["recorder"])
        self.ledger.load_state_dict(state["ledger"])
        self.steps = int(state.get("steps", 0))
        if "recorder" in state:
            self.recorder.load_state_dict(state["recorder"])

    # ---- results ------------------------------------------------------------------------------
    @property
    def groups(self) -> Tensor | None:
        return self.recorder.groups

    @property
    def group_names(self) -> list[str] | None:
        return self.recorder.group_names

    @property
    def history(self) -> Tensor | None:
        """[R, G] float64: each group's summed value every history_every steps (None: off)."""
        return self.recorder.history

    @property
    def history_steps(self) -> Tensor | None:
        return self.recorder.history_steps

    @property
    def val_loss(self) -> Tensor:
        """[steps] float64: mean validation loss at the start of each step (NaN where unseen)."""
        return self.recorder.val_loss

    @property
    def meta(self) -> dict:
        """What the values are of: JSON-able facts saved beside them."""
        from . import __version__
        shapes = [f"{n}:{tuple(p.shape)}" for n, p in self.model.named_parameters() if p.requires_grad]
        return {"package_version": __version__, "estimator": self.estimator.name,
                "update": type(self.update).__name__, "optimizer": type(self.optimizer).__name__,
                "num_samples": self.ledger.num_samples, "accumulation_steps": self.accumulation_steps,
                "data_parallel": self.dp.kind, "world_size": self.dp.world,
                "model": {"class": type(self.model).__name__, "parameters": len(shapes),
                          "fingerprint": _digest(";".join(shapes))},
                "validation": {"rows": self.n_val, "fingerprint": _batch_digest(self.val)}}

    def results(self):
        """The values as an ik.Values (top/bottom, by_group, exports, save/load, report)."""
        from .results import Values
        return Values.from_engine(self)

    def save(self, path: str) -> None:
        """Crash-safe save of state_dict() (temp file beside `path`, fsync, rename)."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str) -> None:
        """Load what save() wrote into this engine."""
        self.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))


def _digest(data: str | bytes) -> str:
    import hashlib
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _batch_digest(batch: Any) -> str:
    """Content hash of a batch's tensors (names, shapes, dtypes, bytes)."""
    from .batch import _leaves
    parts = []
    for name, t in _leaves(batch, "val"):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{_digest(raw)}")
    return _digest("|".join(parts))


def _graph_nodes(roots: list) -> Iterator:
    """Every autograd node reachable from `roots` (grad_fn objects), each once."""
    seen, stack = set(), [r for r in roots if r is not None]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        yield fn
        stack.extend(f for f, _ in fn.next_functions if f is not None)


def _once_differentiable(fn) -> bool:
    """A custom autograd.Function node whose backward is wrapped by @once_differentiable."""
    code = getattr(getattr(getattr(fn, "_forward_cls", None), "backward", None), "__code__", None)
    return code is not None and "once_differentiable" in code.co_qualname


def _check_twice_differentiable(grads: list[Tensor], losses: Tensor) -> None:
    """A backward marked @once_differentiable returns its gradient through an Error node fed by
    detached copies: autograd.grad never reaches it, so the Hessian-vector product would silently
    miss every term through that op. Any Error node in the gradient's graph is refused."""
    if not any(fn.name() == "torch::autograd::Error" for fn in _graph_nodes([g.grad_fn for g in grads])):
        return
    once = sorted({fn._forward_cls.__qualname__ for fn in _graph_nodes([losses.grad_fn])
                   if _once_differentiable(fn)})
    what = f"autograd Functions marked @once_differentiable: {once}" if once else \
        "an op whose backward is not differentiable"
    raise RuntimeError(
        "estimator='second' needs the validation loss to be twice differentiable (a Hessian-vector "
        f"product), and the model has an op without a double backward ({what}): the terms through "
        "it would be dropped. Use estimator='midpoint' (no Hessian, at least as accurate), or a "
        "twice-differentiable implementation of that op")


def _hessian_vector(live: list[tuple[Tensor, nn.Parameter]], params: list[nn.Parameter],
                    u: dict[int, Tensor], losses: Tensor) -> dict[int, Tensor]:
    zeros = {id(p): torch.zeros_like(p) for p in params}
    if not live:
        return zeros
    _check_twice_differentiable([g for g, _ in live], losses)
    try:
        hv = torch.autograd.grad([g for g, _ in live], params, allow_unused=True,
                                 grad_outputs=[u[id(p)].to(g.dtype) for g, p in live])
    except RuntimeError as e:
        raise RuntimeError(
            "estimator='second' needs the validation loss to be twice differentiable (a Hessian-"
            f"vector product), and the model has an op without a double backward: {e}. Use "
            "estimator='midpoint' (no Hessian, at least as accurate), or a twice-differentiable "
            "implementation (e.g. attn_implementation='eager' for Hugging Face models)") from e
    return {id(p): (zeros[id(p)] if h is None else h.detach()) for p, h in zip(params, hv)}
