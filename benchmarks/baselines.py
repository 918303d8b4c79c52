"""Peer methods of computing first-order In-Run Data Shapley, written from their published
descriptions (our own code, not theirs), for side-by-side benchmarks.

Each engine does one full training step (forward, backward, p.grad = gradient of the MEAN
training loss, no optimizer.step) and returns the per-sample products with the validation
gradient in grad_dot's convention: s_i = <g_i, sum_v g_v> ([N]; [N, M] with per_val), g_i the
gradient of sample i's loss over all trainable parameters. (InRunShapley's value is
phi_i = lr/(N*M) * s_i for a single param group.)

(a) AuthorsEngine: the authors' reference engine as described in the paper/BACKGROUND.md s.4:
    forward hooks on every Linear / HF Conv1D / Embedding (and LayerNorm, which we add so the
    values are complete) capture the layer inputs, tensor hooks capture the output gradients in
    ONE backward of the concatenated train+val batch; the train x val products are formed from
    fully materialised (N*T) x (M*T) Gram matrices with matmul; autograd computes the weight
    gradients of the concatenated batch, and the hooks recompute the train-only weight
    gradients, which replace .grad (twice the weight-gradient work, as in the original).
    Deviations, on purpose: fp32 throughout (the original casts to bf16, which is not exact);
    validation samples are never summed before the outer product (a bug of the original for
    M > 1); tied weights (GPT-2 wte = lm_head) get their cross terms (the original lets the uses
    overwrite each other). With those fixes the values are exact up to fp32 rounding.
(b) per_sample_vmap: torch.func per-sample gradients, vmap(grad(functional_call)), dotted with
    the validation gradient; the training gradient is their mean. Exact.
(c) per_sample_loop: a batch-size-1 loop of forward/backward per training sample. Exact.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:   # HF GPT-2's linear layer (y = x @ W + b, W [in, out])
    from transformers.pytorch_utils import Conv1D
except Exception:   # pragma: no cover
    Conv1D = None

Batch = Any


def _rows(batch: Batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return next(v for v in batch.values() if isinstance(v, Tensor)).shape[0]
    return next(v for v in batch if isinstance(v, Tensor)).shape[0]


def _cat(a: Batch, b: Batch) -> Batch:
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) if isinstance(a[k], Tensor) else a[k] for k in a}
    return type(a)(torch.cat([x, y]) if isinstance(x, Tensor) else x for x, y in zip(a, b))


def _index(batch: Batch, sl) -> Batch:
    if isinstance(batch, Tensor):
        return batch[sl]
    if isinstance(batch, dict):
        return {k: v[sl] if isinstance(v, Tensor) else v for k, v in batch.items()}
    return type(batch)(v[sl] if isinstance(v, Tensor) else v for v in batch)


# ==== (a) the authors' hook engine ==========================================================
class _Factor:
    """One side of a per-token outer product, flattened over (rows, tokens): dense [R*T, k],
    token ids [R*T] (a one-hot factor, for embeddings) or None (the constant 1, for biases)."""
    __slots__ = ("dense", "ids")

    def __init__(self, dense: Tensor | None = None, ids: Tensor | None = None):
        self.dense, self.ids = dense, ids

    def split(self, rows_tr: int) -> tuple["_Factor", "_Factor"]:
        if self.dense is not None:
            return _Factor(self.dense[:rows_tr]), _Factor(self.dense[rows_tr:])
        if self.ids is not None:
            return _Factor(ids=self.ids[:rows_tr]), _Factor(ids=self.ids[rows_tr:])
        return self, self


def _gram(x: _Factor, y: _Factor) -> Tensor | float:
    """Materialised [rows_x, rows_y] matrix of per-token inner products of two factors."""
    if x.dense is None and x.ids is None or y.dense is None and y.ids is None:
        return 1.0
    if x.dense is not None and y.dense is not None:
        return x.dense @ y.dense.T
    if x.ids is not None and y.ids is not None:
        return (x.ids[:, None] == y.ids[None, :]).to(torch.float32)
    if x.ids is not None:            # one-hot(x) . y = y[:, x]
        return y.dense[:, x.ids].T
    return x.dense[:, y.ids]


class _Use:
    """One use of a parameter by one layer in the concatenated batch: per-sample gradient
    g_r = sum_t L_rt (x) R_rt in the parameter's layout (rows from L, columns from R), or a
    per-sample vector `direct` [R, numel] (LayerNorm)."""

    def __init__(self, L: _Factor | None = None, R: _Factor | None = None,
                 direct: Tensor | None = None, tokens: int = 1):
        self.L, self.R, self.direct, self.tokens = L, R, direct, tokens


class AuthorsEngine:
    """Hook-based In-Run Data Shapley with materialised Gram matrices (see module doc)."""

    def __init__(self, model: nn.Module, loss_fn: Callable, val: Batch, *, per_val: bool = False,
                 compute_dtype: torch.dtype = torch.float32):
        self.model, self.loss_fn, self.val = model, loss_fn, val
        self.n_val = _rows(val)
        self.per_val = per_val
        self.dtype = compute_dtype
        self.active = False
        self._handles = []
        self._counts: dict[int, int] = defaultdict(int)
        hooked: set[int] = set()
        kinds = [nn.Linear, nn.Embedding, nn.LayerNorm] + ([Conv1D] if Conv1D is not None else [])
        for mod in model.modules():
            if type(mod) in kinds or any(isinstance(mod, k) for k in kinds):
                self._handles.append(mod.register_forward_hook(self._fwd_hook))
                for p in mod.parameters(recurse=False):
                    if p.requires_grad:
                        self._counts[id(p)] += 1
                        hooked.add(id(p))
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in hooked]
        if missing:
            raise NotImplementedError(f"AuthorsEngine: no hook rule for parameters {missing}")

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- hooks ------------------------------------------------------------------------
    def _fwd_hook(self, mod: nn.Module, inp, out) -> None:
        if not self.active or not isinstance(out, Tensor) or not out.requires_grad:
            return
        x = inp[0].detach()
        out.register_hook(lambda g, mod=mod, x=x: self._bwd(mod, x, g))

    def _bwd(self, mod: nn.Module, x: Tensor, gy: Tensor) -> None:
        dt = self.dtype
        rows = gy.shape[0]
        if x.shape[0] != rows:
            raise ValueError(f"AuthorsEngine: {type(mod).__name__} input has {x.shape[0]} rows but its "
                             f"output gradient {rows} (a broadcast input, e.g. position_ids [1, T]: expand it)")
        B = gy.detach().reshape(-1, gy.shape[-1]).to(dt)
        tokens = B.shape[0] // rows
        uses: list[tuple[nn.Parameter, _Use]] = []
        if isinstance(mod, nn.Embedding):
            uses.append((mod.weight, _Use(_Factor(ids=x.reshape(-1)), _Factor(B), tokens=tokens)))
        elif isinstance(mod, nn.LayerNorm):
            xf = x.reshape(rows, tokens, -1).to(dt)
            xhat = F.layer_norm(xf, xf.shape[-1:], eps=mod.eps)
            Bs = B.view(rows, tokens, -1)
            if mod.weight is not None:
                uses.append((mod.weight, _Use(direct=(Bs * xhat).sum(1))))
            if mod.bias is not None:
                uses.append((mod.bias, _Use(direct=Bs.sum(1))))
        else:
            A = _Factor(x.reshape(-1, x.shape[-1]).to(dt))
            if Conv1D is not None and isinstance(mod, Conv1D):   # W [in, out]: rows from A
                uses.append((mod.weight, _Use(A, _Factor(B), tokens=tokens)))
            else:                                                # nn.Linear W [out, in]
                uses.append((mod.weight, _Use(_Factor(B), A, tokens=tokens)))
            if mod.bias is not None:
                uses.append((mod.bias, _Use(_Factor(B), _Factor(), tokens=tokens)))
        for p, use in uses:
            if not p.requires_grad:
                continue
            if self._counts[id(p)] > 1:          # tied: wait for every use (cross terms)
                self._stash[id(p)].append(use)
                self._params[id(p)] = p
                if len(self._stash[id(p)]) == self._counts[id(p)]:
                    self._flush(id(p))
            else:
                self._accumulate(p, [use])

    def _flush(self, key: int) -> None:
        uses = self._stash.pop(key, [])
        if uses:
            self._accumulate(self._params[key], uses)

    def _accumulate(self, p: nn.Parameter, uses: list[_Use]) -> None:
        N, M = self.n_train, self.n_val
        dots = torch.zeros(N, M, dtype=self.dtype, device=p.device)
        grad = torch.zeros(p.shape, dtype=self.dtype, device=p.device)
        for u in uses:
            if u.direct is not None:
                g_tr, g_va = u.direct[:N], u.direct[N:]
                grad += g_tr.sum(0).view(p.shape)
                for w in uses:
                    if w.direct is None:
                        raise NotImplementedError("mixed direct/outer uses of one parameter")
                    dots += g_tr @ w.direct[N:].T
                continue
            T = u.tokens
            Ltr, _ = u.L.split(N * T)
            Rtr, _ = u.R.split(N * T)
            grad += self._train_grad(p, Ltr, Rtr)
            for w in uses:                      # all pairs (use u of i, use w of v)
                S = w.tokens
                _, Lva = w.L.split(N * S)
                _, Rva = w.R.split(N * S)
                G = _gram(Ltr, Lva)             # (N*T) x (M*S), materialised
                H = _gram(Rtr, Rva)
                dots += (G * H).view(N, T, M, S).sum((1, 3))
        self.dots = self.dots + dots
        self.train_grads[id(p)] = self.train_grads.get(id(p), 0) + grad

    @staticmethod
    def _train_grad(p: nn.Parameter, L: _Factor, R: _Factor) -> Tensor:
        if L.ids is not None:                    # embedding rows
            out = torch.zeros(p.shape, dtype=R.dense.dtype, device=p.device)
            return out.index_add_(0, L.ids, R.dense)
        if R.dense is None and R.ids is None:    # bias
            return L.dense.sum(0)
        return L.dense.T @ R.dense

    # ---- step ---------------------------------------------------------------------------
    def step(self, train: Batch) -> Tensor:
        """Forward + backward of train+val; .grad = train-only mean gradient (recomputed in the
        hooks, replacing autograd's concatenated-batch gradient). Returns the products."""
        self.n_train = N = _rows(train)
        dev = next(self.model.parameters()).device
        self.dots = torch.zeros(N, self.n_val, dtype=self.dtype, device=dev)
        self.train_grads: dict[int, Tensor] = {}
        self._stash: dict[int, list[_Use]] = defaultdict(list)
        self._params: dict[int, nn.Parameter] = {}
        self.active = True
        try:
            losses = self.loss_fn(self.model, _cat(train, self.val))
            losses.sum().backward()    # autograd also forms the (train+val) weight gradients
        finally:
            self.active = False
        for key in list(self._stash):
            self._flush(key)
        self.last_loss = losses[:N].detach().mean()
        for p in self.model.parameters():
            g = self.train_grads.get(id(p))
            if g is not None:
                p.grad = (g / N).to(p.dtype)
        return self.dots if self.per_val else self.dots.sum(1)


# ==== (b) torch.func per-sample gradients ====================================================
class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def per_sample_vmap(model: nn.Module, loss_fn: Callable, train: Batch, val: Batch, *,
                    chunk_size: int | None = None, set_grad: bool = True) -> Tensor:
    """vmap(grad(functional_call)) per-sample gradients; dots with the summed validation
    gradient; .grad = mean of the per-sample gradients. Exact (fp32 rounding)."""
    from torch.func import functional_call, grad, vmap
    wrap = _LossModule(model, loss_fn)
    params = {k: v.detach() for k, v in wrap.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in wrap.named_buffers()}

    def one(p, sample):
        batch = _index(sample, slice(None))
        batch = {k: v.unsqueeze(0) for k, v in batch.items()} if isinstance(batch, dict) else \
            (batch.unsqueeze(0) if isinstance(batch, Tensor) else type(batch)(v.unsqueeze(0) for v in batch))
        return functional_call(wrap, (p, buffers), (batch,))[0]

    def total(p, batch):
        return functional_call(wrap, (p, buffers), (batch,)).sum()

    g_val = grad(total)(params, val)
    per = vmap(grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, train)
    N = _rows(train)
    dots = sum(per[k].reshape(N, -1) @ g_val[k].reshape(-1) for k in params)
    if set_grad:
        named = dict(wrap.named_parameters())
        for k in params:
            named[k].grad = per[k].mean(0)
    return dots


# ==== (c) batch-size-1 loop ===================================================================
def per_sample_loop(model: nn.Module, loss_fn: Callable, train: Batch, val: Batch, *,
                    set_grad: bool = True) -> Tensor:
    """One forward/backward per training sample (and one for the validation batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_val = torch.autograd.grad(loss_fn(model, val).sum(), params)
    N = _rows(train)
    dots = torch.zeros(N, dtype=params[0].dtype, device=params[0].device)
    acc = [torch.zeros_like(p) for p in params]
    for i in range(N):
        gi = torch.autograd.grad(loss_fn(model, _index(train, slice(i, i + 1))).sum(), params)
        dots[i] = sum((a * b).sum() for a, b in zip(gi, g_val))
        for a, g in zip(acc, gi):
            a += g
    if set_grad:
        for p, a in zip(params, acc):
            p.grad = a / N
    return dots
