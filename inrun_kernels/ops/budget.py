"""The memory budget for temporaries of the reference (chunked) primitives.

INRUN_TEMP_MB (default 256) caps the size of any one temporary; `temp_budget(mb)` changes it
for a block of code (tests use a tiny budget to exercise the chunked paths)."""
from __future__ import annotations

import contextlib
import os

_DEFAULT_MB = 256.0
_override: list[float] = []


def temp_budget_mb() -> float:
    if _override:
        return _override[-1]
    raw = os.environ.get("INRUN_TEMP_MB", "")
    try:
        mb = float(raw) if raw else _DEFAULT_MB
    except ValueError:
        raise ValueError(f"INRUN_TEMP_MB must be a number of MiB, got {raw!r}") from None
    if mb <= 0:
        raise ValueError(f"INRUN_TEMP_MB must be positive, got {raw!r}")
    return mb


def temp_budget_elems(bytes_per_elem: int = 4) -> int:
    """Elements allowed in one temporary (fp32 by default)."""
    return max(1, int(temp_budget_mb() * 2**20) // bytes_per_elem)


@contextlib.contextmanager
def temp_budget(mb: float):
    """Context manager: bound every ghost temporary to `mb` MiB inside the block (overrides
    INRUN_TEMP_MB, default 256)."""
    if mb <= 0:
        raise ValueError(f"temp_budget needs a positive size in MiB, got {mb}")
    _override.append(float(mb))
    try:
        yield
    finally:
        _override.pop()
