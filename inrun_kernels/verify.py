"""Self-check of the ghost machinery on YOUR model against plain per-sample autograd.

    rep = ik.verify(model, loss_fn, train, val)    # raises VerificationError on a mismatch
    print(rep)                                     # per-parameter errors, one row each

What no static rule can see (an op that mixes the samples of a batch, a custom autograd
Function, a parameter used outside its ghost layer, a parameter term inside loss_fn) makes the
engine's numbers silently wrong: the engine runs ONE forward and ONE backward of the sum of the
training and validation losses of the concatenated batch, and only the ghost layers split it
into per-sample gradients. `verify` takes the first `n_train` training and `n_val` validation
rows and computes, per trainable parameter p,

  (a) with the package, exactly as the engine would: one ghost pass (ghost_pass.run with
      train_grad=True, dot=True, per_param=True) giving the training gradient the engine
      leaves in p.grad and the products <g_i^p, sum_v g_v^p> of every training row i;
  (b) with plain autograd, outside any ghost session (ghost layers then are plain layers, and
      an unpatched model is checked in its original classes): one forward and backward per
      sample alone (batch size 1, the model's dtype), the mean training gradient and the same
      products;

and compares them: gradient error ||g_pkg - g_ref|| / scale and product error
||d_pkg - d_ref|| / scale, scale = the reference's norm or, for a parameter whose gradient or
products cancel, a floor of sqrt(rtol) times the norms they are made of (||g_i||, ||g_i|| x
||sum_v g_v||); rtol from the lowest precision among the trainable parameters (or the autocast
dtype when autocast is on): float64 1e-8, float32 1e-4, bfloat16/float16 2e-2. The per-sample
losses of the batched forward are also compared with the batch-size-1 ones. During the ghost
pass the autograd graph is walked once (no tensor work) to name what a mismatch comes from:
non-ghost ops feeding a parameter's gradient (in the model's forward or in loss_fn) and custom
autograd Functions.

On a mismatch it raises VerificationError (a subclass of AssertionError: verify is an
assertion about the model) whose message names each mismatching parameter with its errors and
the likely cause:
  - the batched per-sample losses differ from batch-size-1 ones: the forward mixes samples
    (batch statistics, a hand-written batch norm, x - x.mean(0), attention across the batch
    dim, or a loss_fn that normalises by the batch);
  - a non-ghost op feeds a covered parameter's gradient: the parameter is used outside its
    ghost layer (a tied head written h @ emb.weight.T) or a term of loss_fn depends on it
    (an L2 penalty): the validation rows' share of that path reaches .grad;
  - a custom autograd Function in the graph and mismatching numbers: its backward mixes
    samples (or is otherwise not per-sample);
  - products keyed by a tensor that is not the parameter object (a ghost backward that got its
    weight back through saved-tensor hooks, e.g. non-reentrant checkpointing): a package bug;
  - gradient matches but products do not: an op that mixes samples in backward only;
    gradient does not match: a gradient path outside the ghost layers that the graph does not
    show (inside a reentrant-checkpointed block, .data tricks) or a sample-mixing op;
  - a parameter no ghost rule covers (ik.coverage): its products are left out of every value
    (allow_uncovered=True compares only its gradient).
If the package's ghost pass or the plain pass raises (a shape error, BatchCouplingError, the
gradient-path guard), verify raises VerificationError with that error chained (__cause__).
`VerifyReport` holds the per-parameter errors (str(report) is a table); verify returns it when
everything matches; the exception carries the report as `.report` (None if a pass failed).

Randomness. The RNG state is restored before every forward, but a dropout mask drawn for a
batch of 6 is not the one drawn for a batch of 1, so a model that is random when verified
would report mismatches. mode="auto" (default) keeps every module's training flag but puts
nn.Dropout-type modules in eval mode; if the model is still random (functional dropout, e.g.
some Hugging Face attention code, stochastic depth) the whole model goes to eval mode for the
check (`report.mode` says which). mode="eval": the whole model in eval mode; mode="train":
nothing switched. Training flags are restored afterwards. "auto" keeps the training flags
because code that mixes samples only in training (a hand-written batch norm using batch
statistics when self.training) is invisible in eval mode; nn.BatchNorm in training mode is
refused by the package in any case (BatchCouplingError, chained).

Side effects: none. Parameters, buffers (restored if a forward changed them), every p.grad (the
same tensor objects, unchanged), training flags, the patched state (an unpatched model is
patched for the call and unpatched after), and the CPU and CUDA RNG states are left as they
were; no optimizer is touched, so verify may run between eng.step() and optimizer.step().
Grad mode is enabled for the check whatever the caller's.

What it does not check: only the first n_train x n_val rows (a sample-mixing op shows on any
batch, a data-dependent branch only on rows that take it); products in the per-parameter
(unfused) route of the ghost backward, not the fused weight+bias one nor the kept-rep dense
route of estimator='midpoint'/'second' or Adam (same per-sample gradients, other arithmetic);
dropout itself (see above). Low precision: in bfloat16 the batched and batch-size-1 forwards
round differently; a 2-layer d128 GPT-2 in bf16 reached errors of 1.3e-2 against rtol 2e-2, so
deeper bf16 models may need a larger rtol (or verify a float32 copy).

Cost, one-off: one ghost pass of n_train + n_val rows, n_train + n_val batch-size-1
forward+backward passes, and in mode="auto" on a model in training mode two batch-size-1
forwards without grad (the randomness probe); memory: two parameter-sized accumulators. It is
fixed by n_train and n_val, not by the training batch. Measured on the benchmark GPT-2
(benchmarks.common.make_model, StepConfig(d=256, T=128, N=16, M=1): 4 layers, vocab 8192,
float32, tied; CPU, median of 5, same process, two runs on a shared 2-core machine; defaults,
i.e. 4 training x 1 validation rows as M=1): 0.72-0.81 s with 2 threads, i.e. 0.6-0.75 of one
engine step (`first`, update='sgd', 1.1-1.2 s), 0.35-0.65 of the default AdamW step (`first`,
update='optimizer', 1.3-2.2 s), 0.75-0.9 of a plain training step; with 1 thread 1.43 s =
0.54 / 0.45 / 0.70 of them. In short: less than one engine step, once.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import ghost_pass as gp
from . import session as _session
from .batch import batch_size
from .patch import coverage, is_patched, unpatch

__all__ = ["verify", "VerifyReport", "ParamCheck", "VerificationError", "default_rtol"]

_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
_GHOST_PREFIX = __name__.rsplit(".", 1)[0] + ".layers"
_MODES = ("auto", "eval", "train")
LOSSES = "<per-sample losses>"


class VerificationError(AssertionError):
    """ik.verify found that the package's numbers differ from plain per-sample autograd on this
    model (or a pass failed; the original error is chained as __cause__). `.report` is the
    VerifyReport (None when a pass raised), `.diagnosis` the list of likely causes."""

    def __init__(self, message: str, report: "VerifyReport | None" = None,
                 diagnosis: list[str] | None = None):
        super().__init__(message)
        self.report = report
        self.diagnosis = diagnosis or []


@dataclass
class ParamCheck:
    """One compared quantity: a trainable parameter, or the per-sample losses (name LOSSES)."""
    name: str
    numel: int
    grad_err: float          # training-gradient error (the loss error for the LOSSES row)
    prod_err: float | None   # product error; None where not compared
    covered: bool = True
    ok: bool = True
    cause: str = ""          # diagnosis when not ok


@dataclass
class VerifyReport:
    """Result of ik.verify: one ParamCheck per trainable parameter plus the losses row."""
    checks: list[ParamCheck]
    rtol: float
    dtype: str
    mode: str
    n_train: int
    n_val: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def mismatches(self) -> list[ParamCheck]:
        return [c for c in self.checks if not c.ok]

    @property
    def grad_err(self) -> dict[str, float]:
        return {c.name: c.grad_err for c in self.checks if c.name != LOSSES}

    @property
    def prod_err(self) -> dict[str, float | None]:
        return {c.name: c.prod_err for c in self.checks if c.name != LOSSES}

    def __str__(self) -> str:
        head = (f"ik.verify: {self.n_train} training x {self.n_val} validation rows, {self.dtype}, "
                f"rtol {self.rtol:.0e}, mode {self.mode}, {self.seconds:.2f} s: "
                f"{'all match' if self.ok else f'{len(self.mismatches)} mismatch(es)'}")
        w = max([len(c.name) for c in self.checks] + [9])
        lines = [head, f"  {'parameter':<{w}} {'numel':>10} {'grad err':>9} {'prod err':>9}  status"]
        for c in self.checks:
            prod = "-" if c.prod_err is None else _fmt(c.prod_err)
            numel = "" if c.name == LOSSES else str(c.numel)
            status = "ok" if c.ok else "MISMATCH"
            if not c.covered:
                status += " (not covered)"
            lines.append(f"  {c.name:<{w}} {numel:>10} {_fmt(c.grad_err):>9} {prod:>9}  {status}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else ("nan" if math.isnan(x) else f"{x:.1e}")


def default_rtol(model: nn.Module) -> float:
    """The tolerance verify uses: from the lowest precision among the trainable floating
    parameters, or the autocast dtype of their device type when autocast is on."""
    params = [p for p in model.parameters() if p.requires_grad and p.is_floating_point()]
    rtol = max((_RTOL.get(p.dtype, 2e-2) for p in params), default=1e-4)
    for dev in {p.device.type for p in params}:
        try:
            if torch.is_autocast_enabled(dev):
                rtol = max(rtol, _RTOL.get(torch.get_autocast_dtype(dev), 2e-2))
        except (RuntimeError, TypeError):   # a device type autocast does not know
            pass
    return rtol


# ---- state kept and restored --------------------------------------------------------------------
class _RNG:
    """CPU and CUDA (devices of the model and the batches) generator states."""

    def __init__(self, devices: set[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in sorted(devices)}

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda.items():
            torch.cuda.set_rng_state(s, d)

    def advance(self) -> None:
        """Move every generator on (for the randomness probe)."""
        torch.rand(1)
        for d in self.cuda:
            torch.rand(1, device=f"cuda:{d}")


class _Buffers:
    """Buffers as they were (objects and values), put back if a forward changed them."""

    def __init__(self, model: nn.Module):
        self.saved = [(mod, name, buf, buf._version, buf.detach().clone())
                      for mod in model.modules() for name, buf in mod._buffers.items()
                      if buf is not None]

    def restore(self) -> None:
        with torch.no_grad():
            for mod, name, buf, version, value in self.saved:
                if mod._buffers.get(name) is not buf:
                    mod._buffers[name] = buf
                if buf._version != version:
                    buf.copy_(value)


def _cuda_devices(model: nn.Module, *batches) -> set[int]:
    devs = {t.device.index or 0 for t in list(model.parameters()) + list(model.buffers()) if t.is_cuda}
    for b in batches:
        devs |= {t.device.index or 0 for t in _leaves(b) if t.is_cuda}
    return devs


# ---- batches ------------------------------------------------------------------------------------
def _leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for t in batch if isinstance(t, Tensor)]
    if isinstance(batch, dict):
        return [t for t in batch.values() if isinstance(t, Tensor)]
    return []


def _rows(batch: Any, start: int, stop: int) -> Any:
    sl = slice(start, stop)
    if isinstance(batch, Tensor):
        return batch[sl]
    if isinstance(batch, (tuple, list)):
        return type(batch)(t[sl] if isinstance(t, Tensor) else t for t in batch)
    return {k: (t[sl] if isinstance(t, Tensor) else t) for k, t in batch.items()}


# ---- autograd graph ---------------------------------------------------------------------------
def _is_ghost(node) -> bool:
    fwd = getattr(type(node), "_forward_cls", None)
    return fwd is not None and getattr(fwd, "__module__", "").startswith(_GHOST_PREFIX)


def _grad_fns(out: Any, acc: list) -> None:
    if isinstance(out, Tensor):
        if out.grad_fn is not None:
            acc.append(out.grad_fn)
    elif isinstance(out, (tuple, list)):
        for o in out:
            _grad_fns(o, acc)
    elif isinstance(out, dict):
        for o in out.values():
            _grad_fns(o, acc)


def _walk(roots: list, visit: Callable[[Any], None] | None = None,
          edge: Callable[[Any, Tensor], None] | None = None) -> set:
    seen: set = set()
    stack = [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if visit is not None:
            visit(node)
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)   # AccumulateGrad: the leaf it feeds
            if var is not None:
                if edge is not None:
                    edge(node, var)
            elif nxt not in seen:
                stack.append(nxt)
    return seen


@dataclass
class _Graph:
    """What the graph of the ghost pass shows: non-ghost ops feeding each parameter's gradient,
    split by where they sit (the model's forward, loss_fn, or unknown when no forward output
    was seen), and the custom autograd Functions in it."""
    in_forward: dict[int, set[str]] = field(default_factory=dict)
    in_loss: dict[int, set[str]] = field(default_factory=dict)
    unknown: dict[int, set[str]] = field(default_factory=dict)
    customs: set[str] = field(default_factory=set)


def _inspect(losses: Tensor, outputs: list, params: dict[int, nn.Parameter]) -> _Graph:
    g = _Graph()
    fwd_nodes = _walk(outputs) if outputs else set()
    where = g.in_forward if outputs else g.unknown

    def visit(node):
        fwd = getattr(type(node), "_forward_cls", None)
        if fwd is not None and not _is_ghost(node):
            g.customs.add(getattr(fwd, "__qualname__", type(node).__name__))

    def edge(node, var):
        if id(var) in params and not _is_ghost(node):
            target = (where if node in fwd_nodes else g.in_loss) if outputs else g.unknown
            target.setdefault(id(var), set()).add(type(node).__name__)

    _walk([losses.grad_fn], visit, edge)
    return g


# ---- the two passes -----------------------------------------------------------------------------
class _Failed(Exception):
    def __init__(self, stage: str, error: BaseException, graph: "_Graph | None" = None):
        super().__init__(stage)
        self.stage, self.error, self.graph = stage, error, graph


def _package_pass(model, loss_fn, train_k, val_k, params, names, rng):
    """(train gradient {name: Tensor|None}, products {name: [n] float64}, losses [n+m], graph)."""
    info: dict[str, Any] = {}
    pmap = {id(p): p for p in params}

    def probe_loss_fn(m, batch):
        outs: list = []
        hook = model.register_forward_hook(lambda mod, args, out: _grad_fns(out, outs))
        try:
            losses = loss_fn(m, batch)
        finally:
            hook.remove()
        if isinstance(losses, Tensor):
            info["losses"] = losses.detach()
            if losses.grad_fn is not None:
                info["graph"] = _inspect(losses, outs, pmap)
        return losses

    for p in params:      # (every .grad is restored by verify)
        p.grad = None
    rng.restore()
    try:
        sess = gp.run(model, probe_loss_fn, train_k, val_k, train_grad=True, dot=True,
                      per_param=True)[0]
    except Exception as e:   # noqa: BLE001  (chained into VerificationError)
        raise _Failed("the package's ghost pass", e, info.get("graph")) from e
    grads = {names[id(p)]: (None if p.grad is None else p.grad.detach()) for p in params}
    for p in params:
        p.grad = None
    prods = {n: v["dot"].double() for n, v in sess.by_param.items() if "dot" in v}
    known = set(names.values())
    unnamed = sorted(k for k in prods if k not in known)
    return grads, prods, info["losses"], info.get("graph"), unnamed


def _reference_pass(model, loss_fn, train_k, val_k, params, n, m, rng):
    """Batch-size-1 forward+backward per row, plain autograd: mean training gradient, products
    <g_i, sum_v g_v>, floors (||g_i|| mean, sqrt(sum ||g_i||^2) ||G_v||), losses [n+m]."""
    acc = lambda p: torch.float64 if p.dtype == torch.float64 else torch.float32  # noqa: E731
    gv = [torch.zeros(p.shape, dtype=acc(p), device=p.device) for p in params]
    mean = [torch.zeros(p.shape, dtype=acc(p), device=p.device) for p in params]
    dots = torch.zeros(len(params), n, dtype=torch.float64)
    sq = torch.zeros(len(params), n, dtype=torch.float64)
    losses = []

    def one(batch, i, where):
        rng.restore()
        try:
            loss = loss_fn(model, _rows(batch, i, i + 1))
            if not isinstance(loss, Tensor) or loss.shape != (1,):
                raise ValueError(f"loss_fn must return per-sample losses [1] for one sample, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            if not loss.requires_grad:
                raise RuntimeError("the loss does not require grad: no trainable parameter reaches it")
            for p in params:
                p.grad = None
            # .backward(), not autograd.grad: reentrant checkpointing supports only the former
            loss[0].backward()
            gs = [p.grad for p in params]
            for p in params:
                p.grad = None
        except Exception as e:   # noqa: BLE001
            raise _Failed(f"plain autograd on {where} row {i} alone (batch size 1)", e) from e
        losses.append(loss.detach().reshape(()).double().cpu())
        return gs

    for j in range(m):
        for k, g in enumerate(one(val_k, j, "validation")):
            if g is not None:
                gv[k] += g
    for i in range(n):
        for k, g in enumerate(one(train_k, i, "training")):
            if g is not None:
                mean[k] += g.to(acc(params[k])) / n
                dots[k, i] = torch.dot(g.flatten().double(), gv[k].flatten().double()).cpu()
                sq[k, i] = g.double().square().sum().cpu()
    vnorm = torch.stack([v.double().norm().cpu() for v in gv]) if gv else torch.zeros(0)
    losses = torch.stack(losses[m:] + losses[:m])   # training rows first, as in the batch
    return mean, dots, sq, vnorm, losses


def _is_random(model, loss_fn, train_k, rng) -> bool:
    """Does one sample's loss change with the RNG state (dropout left somewhere)?"""
    one = _rows(train_k, 0, 1)
    with torch.no_grad(), warnings.catch_warnings():   # the passes below show the model's warnings
        warnings.simplefilter("ignore")
        rng.restore()
        a = loss_fn(model, one)
        rng.restore()
        rng.advance()
        b = loss_fn(model, one)
    rng.restore()
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape:
        return False
    return not torch.allclose(a.double(), b.double(), rtol=1e-6, atol=0.0, equal_nan=True)


# ---- comparison and diagnosis ---------------------------------------------------------------
def _err(diff: float, ref: float, floor: float) -> float:
    scale = max(ref, floor)
    if scale > 0:
        return diff / scale
    return 0.0 if diff == 0 else math.inf


def _ops(ops: set[str]) -> str:
    return ", ".join(sorted(ops))


def _cause(c: ParamCheck, pid: int, graph: _Graph | None, mixing: bool, grad_bad: bool,
           prod_bad: bool, unnamed: list[str]) -> str:
    if not c.covered:
        return ("not covered by any ghost rule (ik.coverage(model) lists it): its per-sample "
                "products are left out of every value; register a rule for its module or freeze "
                "it (allow_uncovered=True compares only its gradient)")
    if graph is not None:
        parts = []
        if pid in graph.in_forward:
            parts.append(f"used outside its ghost layer in the model's forward by "
                         f"{_ops(graph.in_forward[pid])} (e.g. a tied head written h @ emb.weight.T, "
                         "or a functional use of a module's weight)")
        if pid in graph.in_loss:
            parts.append(f"gets gradient from loss_fn outside the model's forward via "
                         f"{_ops(graph.in_loss[pid])} (a parameter term in the loss, e.g. an L2 "
                         "penalty: use the optimizer's weight_decay instead)")
        if pid in graph.unknown:
            parts.append(f"gets gradient through {_ops(graph.unknown[pid])} outside the ghost "
                         "layers (a use outside its module, or a parameter term in loss_fn)")
        if parts:
            return ("; ".join(parts) + ": that path carries the validation rows into .grad and "
                    "has no per-sample product")
    if prod_bad and not grad_bad and unnamed and not mixing:
        return (f"the ghost backward handed over products for tensors that are not the model's "
                f"parameter objects ({', '.join(unnamed[:3])}{' ...' if len(unnamed) > 3 else ''}), "
                "e.g. a weight that came back through saved-tensor hooks (non-reentrant "
                "torch.utils.checkpoint): a package bug; the engine's per-parameter scaling and "
                "tied-weight cross terms miss them")
    if mixing:
        return ("the forward mixes samples (see the losses row): batch statistics, a hand-written "
                "batch norm, x - x.mean(0), attention across the batch dim")
    if graph is not None and graph.customs:
        return (f"a custom autograd Function in the graph ({', '.join(sorted(graph.customs))}) "
                "probably mixes samples in its backward (or is not per-sample)")
    if prod_bad and not grad_bad:
        return ("the training gradient matches but the products do not: an op that mixes samples "
                "(batch statistics, x - x.mean(0), attention across the batch dim) or a "
                "batch-coupling custom autograd Function")
    return ("the gradient does not match: a gradient path outside the ghost layers (a parameter "
            "used outside its module, e.g. h @ emb.weight.T, or a parameter term in the loss; "
            "hidden from the graph, e.g. by reentrant checkpointing) or a sample-mixing op")


def _failure_diagnosis(f: _Failed, graph: _Graph | None, names: dict[int, str]) -> list[str]:
    e = f.error
    kind = type(e).__name__
    out = []
    if kind == "BatchCouplingError":
        out.append("BatchNorm in training mode normalises with batch statistics and couples the "
                   "samples; the engine refuses it too (eval mode, GroupNorm or LayerNorm instead)")
    elif kind == "GradientPathError":
        out.append("the package's gradient-path guard refused a parameter used outside the ghost "
                   "layers (the engine refuses it too)")
    elif "batch dimension has" in str(e):
        out.append("a ghost layer saw a batch dimension other than the concatenated rows: the "
                   "model reshapes or mixes the sample dimension, or a layer's samples are not "
                   "on its input's first dim")
    elif "alone" in f.stage:
        out.append("the model or loss_fn does not run on one sample alone, so per-sample "
                   "gradients are not defined for it (e.g. batch statistics need > 1 row)")
    if graph is not None:
        for label, d in (("in the model's forward", graph.in_forward), ("in loss_fn", graph.in_loss),
                         ("outside the ghost layers", graph.unknown)):
            for pid, ops in d.items():
                out.append(f"'{names.get(pid, '?')}' gets gradient through {_ops(ops)} {label}"
                           + (" (a parameter term in the loss, e.g. an L2 penalty)"
                              if d is graph.in_loss else
                              " (a use outside its ghost layer, e.g. h @ emb.weight.T)"))
        if graph.customs:
            out.append(f"custom autograd Function(s) in the graph: {', '.join(sorted(graph.customs))}")
    return out


# ---- entry point ----------------------------------------------------------------------------------
def verify(model: nn.Module, loss_fn: Callable, train: Any, val: Any, *, n_train: int = 4,
           n_val: int = 2, rtol: float | None = None, mode: str = "auto",
           allow_uncovered: bool = False) -> VerifyReport:
    """Check the package's training gradient and per-sample products on this model against
    plain batch-size-1 autograd; return a VerifyReport, or raise VerificationError naming the
    mismatching parameters and the likely cause. See the module docstring for what is compared,
    the tolerances, randomness (mode) and the one-off cost (less than one engine step on a
    small GPT-2). A torch.compile'd model (model.compile() or a wrapper) is checked with
    compilation off (torch.compiler.set_stance("force_eager")): the same layers, eagerly."""
    with torch.compiler.set_stance("force_eager"):
        return _verify(model, loss_fn, train, val, n_train=n_train, n_val=n_val, rtol=rtol, mode=mode,
                       allow_uncovered=allow_uncovered)


def _verify(model: nn.Module, loss_fn: Callable, train: Any, val: Any, *, n_train: int, n_val: int,
            rtol: float | None, mode: str, allow_uncovered: bool) -> VerifyReport:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if n_train < 1 or n_val < 1:
        raise ValueError(f"n_train and n_val must be >= 1, got {n_train}, {n_val}")
    if _session.current() is not None:
        raise RuntimeError("ik.verify cannot run inside an open ghost session")
    t0 = time.perf_counter()
    n = min(n_train, batch_size(train, "train"))
    m = min(n_val, batch_size(val, "val"))
    train_k, val_k = _rows(train, 0, n), _rows(val, 0, m)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("ik.verify: the model has no trainable parameter")
    names = gp.param_names(model)
    tol = default_rtol(model) if rtol is None else float(rtol)
    dtype = ", ".join(sorted({str(p.dtype).replace("torch.", "") for p in params}))

    # every .grad (parameters, and batch tensors that require grad: the plain backward of the
    # reference reaches them) is put back as it was, the same objects
    leaves = [t for t in _leaves(train) + _leaves(val) if t.requires_grad]
    grads_before = [(t, t.grad) for t in list(model.parameters()) + leaves]
    training = {mod: mod.training for mod in model.modules()}
    buffers = _Buffers(model)
    rng = _RNG(_cuda_devices(model, train_k, val_k))
    was_patched = is_patched(model)
    used_mode, notes = mode, []
    graph = None
    try:
        for t in leaves:          # a backward would add into an existing .grad in place
            t.grad = None
        with torch.enable_grad():
            if mode == "eval":
                model.eval()
            elif mode == "auto":
                for mod in model.modules():
                    if isinstance(mod, nn.modules.dropout._DropoutNd):
                        mod.eval()
                if any(mod.training for mod in model.modules()):
                    used_mode = "train, dropout modules off"
                    try:
                        random = _is_random(model, loss_fn, train_k, rng)
                    except Exception:   # noqa: BLE001  (the passes below report it)
                        random = False
                    if random:
                        model.eval()
                        used_mode = "eval"
                        notes.append("the model is random in training mode even with its dropout "
                                     "modules off (functional dropout?): checked in eval mode")
                else:
                    used_mode = "eval"
            try:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        gp.ensure_patched(model, strict=False)
                except Exception as e:   # noqa: BLE001
                    raise _Failed("patching the model", e) from e
                cov = coverage(model)
                uncovered = set(cov.uncovered)
                pkg_grads, pkg_prods, pkg_losses, graph, unnamed = _package_pass(
                    model, loss_fn, train_k, val_k, params, names, rng)
            finally:
                if not was_patched:
                    unpatch(model)
            ref_mean, ref_dots, ref_sq, ref_vnorm, ref_losses = _reference_pass(
                model, loss_fn, train_k, val_k, params, n, m, rng)
    except _Failed as f:
        diag = _failure_diagnosis(f, graph or f.graph, names)
        msg = (f"ik.verify: {f.stage} raised {type(f.error).__name__}: {f.error}"
               + "".join(f"\n  likely cause: {d}" for d in diag))
        raise VerificationError(msg, None, diag) from f.error
    finally:
        for t, g in grads_before:
            t.grad = g
        rng.restore()
        buffers.restore()
        for mod, flag in training.items():
            mod.training = flag

    # ---- compare -----------------------------------------------------------------------------
    sq_floor = math.sqrt(tol)
    checks: list[ParamCheck] = []
    loss_diff = float((pkg_losses.double().cpu() - ref_losses).norm())
    loss_err = _err(loss_diff, float(ref_losses.norm()), 0.0)
    mixing = not loss_err <= tol
    checks.append(ParamCheck(LOSSES, n + m, loss_err, None, ok=not mixing,
                             cause="the batched forward's per-sample losses differ from each sample "
                                   "run alone: the forward (or loss_fn) mixes samples" if mixing else ""))
    for k, p in enumerate(params):
        name = names[id(p)]
        g_pkg = pkg_grads[name]
        g_ref = ref_mean[k].double()
        diff = float((g_ref - (0 if g_pkg is None else g_pkg.double())).norm())
        per_norm = float(ref_sq[k].sqrt().mean())
        grad_err = _err(diff, float(g_ref.norm()), sq_floor * per_norm)
        covered = name not in uncovered
        d_ref = ref_dots[k]
        d_pkg = pkg_prods.get(name)
        d_pkg = torch.zeros_like(d_ref) if d_pkg is None else d_pkg.cpu()
        prod_err = None
        if covered or not allow_uncovered:
            prod_err = _err(float((d_pkg - d_ref).norm()), float(d_ref.norm()),
                            sq_floor * float(ref_sq[k].sum().sqrt()) * float(ref_vnorm[k]))
        grad_bad = not grad_err <= tol
        prod_bad = prod_err is not None and not prod_err <= tol
        c = ParamCheck(name, p.numel(), grad_err, prod_err, covered=covered,
                       ok=not (grad_bad or prod_bad))
        if not c.ok:
            c.cause = _cause(c, id(p), graph, mixing, grad_bad, prod_bad, unnamed)
        checks.append(c)
    if unnamed:
        notes.append(f"products under unknown parameter keys: {', '.join(unnamed[:5])}")
    if graph is not None and graph.customs:
        notes.append(f"custom autograd Function(s) in the graph: {', '.join(sorted(graph.customs))}")
    report = VerifyReport(checks, tol, dtype, used_mode, n, m, time.perf_counter() - t0, notes)
    if report.ok:
        return report
    bad = report.mismatches
    diag = sorted({c.cause for c in bad})
    lines = [f"ik.verify: the package's numbers differ from plain per-sample autograd for "
             f"{len(bad)} of {len(checks)} checks (rtol {tol:.0e}, {n} training x {m} validation "
             f"rows, mode {used_mode}); the engine's values and/or .grad would be wrong:"]
    for c in bad[:12]:
        errs = f"loss err {_fmt(c.grad_err)}" if c.name == LOSSES else (
            f"grad err {_fmt(c.grad_err)}, prod err {'-' if c.prod_err is None else _fmt(c.prod_err)}")
        lines.append(f"  {c.name}: {errs}: {c.cause}")
    if len(bad) > 12:
        lines.append(f"  ... and {len(bad) - 12} more (see .report)")
    if len(checks) <= 40:
        lines.append(str(report))
    else:
        lines.append(f"(the full table of {len(checks)} checks: str(err.report))")
    raise VerificationError("\n".join(lines), report, diag)
