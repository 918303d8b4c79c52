"""The ghost primitives as torch.library custom ops (namespace "inrun").

    torch.ops.inrun.dot_gram(A, B, Av, Bv, bias, per_val, lengths=None, val_lengths=None)
    torch.ops.inrun.dot_dense(A, B, V, v_bias=None, lengths=None)
    torch.ops.inrun.gram(A, B, bias, lengths=None)
    torch.ops.inrun.norms_sq(A, B, bias, lengths=None)
    torch.ops.inrun.split_dot / split_norms (the split route, see the end of this file)

The exact PyTorch reference is the default implementation (CPU and any other device); the
Triton launcher is registered for "cuda" and falls back to the reference when Triton is not
installed. `register_fake` gives shapes/dtypes, so torch.compile(fullgraph=True) traces through
the ops and `torch.library.opcheck` passes. Optional tensors are `Tensor?` in the schema.
The ops have no autograd formula (the values are not differentiated).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference as ref


def _out_dtype(*ts: Tensor) -> torch.dtype:
    return ref.acc_dtype(*ts)


def _triton(name: str):
    """The Triton launcher `name`, or None when Triton cannot be imported."""
    try:
        from ..kernels import ghost_dot, ghost_gram
    except ImportError:
        return None
    return {"dot_gram": ghost_dot.dot_gram, "dot_dense": ghost_dot.dot_dense,
            "gram": ghost_gram.gram, "norms_sq": ghost_gram.norms_sq}[name]


def _fresh(t: Tensor) -> Tensor:
    # custom ops must not return views of their inputs; the references never do, but a view of
    # their own temporary (dot_dense's out[:, 0]) is made contiguous for a clean schema.
    return t.contiguous()


# ---- dot_gram ------------------------------------------------------------------------------
@torch.library.custom_op("inrun::dot_gram", mutates_args=())
def dot_gram(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, bias: bool, per_val: bool,
             lengths: Optional[Tensor] = None, val_lengths: Optional[Tensor] = None) -> Tensor:
    return _fresh(ref.dot_gram(A, B, Av, Bv, bias=bias, per_val=per_val, lengths=lengths,
                               val_lengths=val_lengths))


@dot_gram.register_kernel("cuda")
def _dot_gram_cuda(A, B, Av, Bv, bias, per_val, lengths=None, val_lengths=None):
    fn = _triton("dot_gram") or ref.dot_gram
    return _fresh(fn(A, B, Av, Bv, bias=bias, per_val=per_val, lengths=lengths, val_lengths=val_lengths))


@dot_gram.register_fake
def _dot_gram_fake(A, B, Av, Bv, bias, per_val, lengths=None, val_lengths=None):
    shape = (A.shape[0], Av.shape[0]) if per_val else (A.shape[0],)
    return A.new_empty(shape, dtype=_out_dtype(A, B, Av, Bv))


# ---- dot_dense -----------------------------------------------------------------------------
@torch.library.custom_op("inrun::dot_dense", mutates_args=())
def dot_dense(A: Tensor, B: Tensor, V: Tensor, v_bias: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None) -> Tensor:
    return _fresh(ref.dot_dense(A, B, V, v_bias, lengths=lengths))


@dot_dense.register_kernel("cuda")
def _dot_dense_cuda(A, B, V, v_bias=None, lengths=None):
    fn = _triton("dot_dense") or ref.dot_dense
    return _fresh(fn(A, B, V, v_bias, lengths=lengths))


@dot_dense.register_fake
def _dot_dense_fake(A, B, V, v_bias=None, lengths=None):
    ts = (A, B, V) if v_bias is None else (A, B, V, v_bias)
    shape = (A.shape[0], V.shape[0]) if V.dim() == 3 else (A.shape[0],)
    return A.new_empty(shape, dtype=_out_dtype(*ts))


# ---- gram ----------------------------------------------------------------------------------
@torch.library.custom_op("inrun::gram", mutates_args=())
def gram(A: Tensor, B: Tensor, bias: bool, lengths: Optional[Tensor] = None) -> Tensor:
    return _fresh(ref.gram(A, B, bias=bias, lengths=lengths))


@gram.register_kernel("cuda")
def _gram_cuda(A, B, bias, lengths=None):
    fn = _triton("gram") or ref.gram
    return _fresh(fn(A, B, bias=bias, lengths=lengths))


@gram.register_fake
def _gram_fake(A, B, bias, lengths=None):
    return A.new_empty((A.shape[0], A.shape[0]), dtype=_out_dtype(A, B))


# ---- norms_sq ------------------------------------------------------------------------------
@torch.library.custom_op("inrun::norms_sq", mutates_args=())
def norms_sq(A: Tensor, B: Tensor, bias: bool, lengths: Optional[Tensor] = None) -> Tensor:
    return _fresh(ref.norms_sq(A, B, bias=bias, lengths=lengths))


@norms_sq.register_kernel("cuda")
def _norms_sq_cuda(A, B, bias, lengths=None):
    fn = _triton("norms_sq") or ref.norms_sq
    return _fresh(fn(A, B, bias=bias, lengths=lengths))


@norms_sq.register_fake
def _norms_sq_fake(A, B, bias, lengths=None):
    return A.new_empty((A.shape[0],), dtype=_out_dtype(A, B))


OPS = {"dot_gram": dot_gram, "dot_dense": dot_dense, "gram": gram, "norms_sq": norms_sq}


# ---- the split route (ops/split.py): weight gradient + per-sample products in one pass ------
# torch.ops.inrun.split_dot(A, B, V, v_bias=None, lengths=None, scale=1.0, bias=False)
# torch.ops.inrun.split_norms(A, B, lengths=None, scale=1.0, bias=False)
# -> (weight grad [p, d], bias grad [p] (empty [0] when not bias), dots / norms [N]; dots [N, K]
# for V [K, p, d]), all in the accumulation dtype. The implementation is the dispatcher's: the
# C++ kernel on CPU when it is built (INRUN_BACKEND=auto|cpp), else the PyTorch reference.
def _split_out(res, p: int, like: Tensor):
    W, gb, out = res
    if gb is None:
        gb = like.new_empty((0,), dtype=W.dtype)
    return W.contiguous(), gb.contiguous(), out.contiguous()


@torch.library.custom_op("inrun::split_dot", mutates_args=())
def split_dot(A: Tensor, B: Tensor, V: Tensor, v_bias: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, scale: float = 1.0,
              bias: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    from .dispatch import ghost_split_dot
    return _split_out(ghost_split_dot(A, B, V, v_bias, lengths, scale, bias=bias), B.shape[-1], A)


@split_dot.register_fake
def _split_dot_fake(A, B, V, v_bias=None, lengths=None, scale=1.0, bias=False):
    dt = _out_dtype(A, B, V)
    p, d = B.shape[-1], A.shape[-1]
    dots = (A.shape[0], V.shape[0]) if V.dim() == 3 else (A.shape[0],)   # V [K, p, d]: [N, K]
    return (A.new_empty((p, d), dtype=dt), A.new_empty((p,) if bias else (0,), dtype=dt),
            A.new_empty(dots, dtype=dt))


@torch.library.custom_op("inrun::split_norms", mutates_args=())
def split_norms(A: Tensor, B: Tensor, lengths: Optional[Tensor] = None, scale: float = 1.0,
                bias: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    from .dispatch import ghost_split_norms
    return _split_out(ghost_split_norms(A, B, lengths, scale, bias=bias), B.shape[-1], A)


@split_norms.register_fake
def _split_norms_fake(A, B, lengths=None, scale=1.0, bias=False):
    dt = _out_dtype(A, B)
    p, d = B.shape[-1], A.shape[-1]
    return (A.new_empty((p, d), dtype=dt), A.new_empty((p,) if bias else (0,), dtype=dt),
            A.new_empty((A.shape[0],), dtype=dt))


OPS.update({"split_dot": split_dot, "split_norms": split_norms})
