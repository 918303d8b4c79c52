"""Triton kernels for the ghost products (imported lazily by ops.dispatch)."""
