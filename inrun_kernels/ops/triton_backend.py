"""Registers the "triton" backend with the dispatcher.

Importing this module raises ImportError when triton is not installed (ops/__init__.py then
leaves the backend unregistered, and the dispatcher says so when it is asked for).
Eligible when every tensor is on CUDA, or, with TRITON_INTERPRET=1 AND INRUN_BACKEND=triton,
on any device (CPU included: the kernels run in Triton's interpreter). The impls look the launchers up at call time, so
they can be wrapped (tests count calls). fp64 inputs are passed on by the launchers to the exact
reference.
"""
from __future__ import annotations

import os

import triton  # noqa: F401  (ImportError here leaves the backend unregistered)
from torch import Tensor

from ..kernels import ghost_dot as _gd
from ..kernels import ghost_gram as _gg
from ..kernels import ghost_split as _gs
from .dispatch import register_backend, requested_backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def eligible(tensors: tuple[Tensor, ...]) -> str | None:
    """None when the Triton kernels can run on these tensors, else why not."""
    if _interpreting():
        # The interpreter is for verifying the kernels without a GPU: slow, so only on request.
        if requested_backend() == "triton":
            return None
        return "TRITON_INTERPRET=1 runs the kernels in the (slow) interpreter: only with INRUN_BACKEND=triton"
    not_cuda = sorted({str(t.device) for t in tensors if t is not None and not t.is_cuda})
    if not_cuda:
        return f"tensors on {', '.join(not_cuda)}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return None


def _dot_gram(A, B, Av, Bv, *, bias, per_val, lengths=None, val_lengths=None):
    return _gd.dot_gram(A, B, Av, Bv, bias=bias, per_val=per_val, lengths=lengths, val_lengths=val_lengths)


def _dot_dense(A, B, V, v_bias=None, lengths=None):
    return _gd.dot_dense(A, B, V, v_bias, lengths=lengths)


def _gram(A, B, *, bias, lengths=None):
    return _gg.gram(A, B, bias=bias, lengths=lengths)


def _norms_sq(A, B, *, bias, lengths=None):
    return _gg.norms_sq(A, B, bias=bias, lengths=lengths)


def _split_dot(A, B, V, v_bias=None, lengths=None, scale=1.0, *, bias=None):
    return _gs.split_dot(A, B, V, v_bias, lengths, scale, bias=bias)


def _split_norms(A, B, lengths=None, scale=1.0, *, bias=False):
    return _gs.split_norms(A, B, lengths, scale, bias=bias)


register_backend("triton", eligible, {"dot_gram": _dot_gram, "dot_dense": _dot_dense,
                                      "gram": _gram, "norms_sq": _norms_sq,
                                      "split_dot": _split_dot, "split_norms": _split_norms})
