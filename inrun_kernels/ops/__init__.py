"""Ghost primitives: exact PyTorch references and the dispatcher that picks a backend."""
from . import custom  # noqa: F401  torch.library ops "inrun::*" (reference on CPU, Triton on CUDA)
from . import reference
from .budget import temp_budget, temp_budget_mb
from .dispatch import (ghost_dot, ghost_dot_dense, ghost_gram, ghost_norms_sq, ghost_split_dot,
                       ghost_split_norms, prefer_split, register_backend, requested_backend, resolve_backend)
from . import cpp_backend as _cpp

# The C++ CPU backend: registered always, built on its first use (cpp_backend.py); it implements
# the split route only (other primitives run the reference when INRUN_BACKEND=cpp).
register_backend("cpp", _cpp.eligible, {"split_dot": _cpp.split_dot, "split_norms": _cpp.split_norms})

try:  # the Triton backend registers itself; without triton it stays unregistered
    from . import triton_backend  # noqa: F401
except ImportError:
    pass

__all__ = ["reference", "temp_budget", "temp_budget_mb", "ghost_dot", "ghost_dot_dense",
           "ghost_gram", "ghost_norms_sq", "ghost_split_dot", "ghost_split_norms", "prefer_split", "register_backend", "requested_backend", "resolve_backend"]
