"""Ghost primitives: exact PyTorch references and the dispatcher that picks a backend."""
from . import reference
from .budget import temp_budget, temp_budget_mb
from .dispatch import (ghost_dot, ghost_dot_dense, ghost_gram, ghost_norms_sq, register_backend,
                       requested_backend, resolve_backend)

__all__ = ["reference", "temp_budget", "temp_budget_mb", "ghost_dot", "ghost_dot_dense",
           "ghost_gram", "ghost_norms_sq", "register_backend", "requested_backend", "resolve_backend"]
