"""The C++ CPU extension (csrc/split.cpp at the repository root): the fused split route.

How it is found, first success wins:
1. built ahead of time: `INRUN_BUILD_EXT=1 pip install --no-build-isolation -e .` compiles it
   as `inrun_kernels._split_ext`; used when it was built from the current source (hash check);
2. built just in time on first use with torch.utils.cpp_extension.load (ninja and a C++
   compiler needed) into INRUN_EXT_DIR or ~/.cache/inrun_kernels/<torch, python, source hash>/,
   under a file lock so that concurrent processes build it once. Later processes load it from
   there in well under a second.

When neither works, `why_unavailable()` says why (the compiler's message included): with
INRUN_BACKEND=auto the dispatcher then runs the PyTorch reference and warns ONCE; with
INRUN_BACKEND=cpp it is an error carrying that message.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch



def _source() -> Path:
    """csrc/split.cpp: inside the package in an installed wheel (setup.py copies it there), at the
    repository root in a source checkout or an editable install."""
    pkg = Path(__file__).resolve().parent.parent
    shipped = pkg / "csrc" / "split.cpp"
    return shipped if shipped.exists() else pkg.parent / "csrc" / "split.cpp"


SOURCE = _source()
# -march=native: the JIT build runs on the machine that uses it (the cache key includes the
# CPU's flags); -ffp-contract=fast lets the compiler fuse multiply-adds under -std=c++17.
# -fopenmp (Linux, where torch is built with OpenMP and ships libgomp.so.1, which the extension
# then shares): at::parallel_for is a header template that parallelises with `#pragma omp
# parallel`; compiled without it the pragma is dropped and the kernel ran on one thread whatever
# torch.get_num_threads() said. Elsewhere (macOS clang has no -fopenmp) it runs on one thread.
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []
CFLAGS = ["-O3", "-march=native", "-ffp-contract=fast"] + OPENMP
LDFLAGS = OPENMP

_lock = threading.Lock()
_state: dict = {}          # "module" or "error", once tried
build_seconds: float | None = None   # wall time of this process's JIT build (None: not built here)


def source_hash() -> str:
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def build_dir() -> Path:
    root = Path(os.environ.get("INRUN_EXT_DIR") or Path.home() / ".cache" / "inrun_kernels")
    tag = (f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{platform.machine()}-cpu{_cpu_key()}-src{source_hash()}")
    return root / tag.replace("+", "_")


@contextlib.contextmanager
def _file_lock(path: Path):
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _aot():
    try:
        from .. import _split_ext  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _split_ext if getattr(_split_ext, "src_hash", "") == source_hash() else None


def _jit():
    global build_seconds
    from torch.utils import cpp_extension
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    name = f"inrun_split_{source_hash()}"
    t0 = time.perf_counter()
    with _file_lock(d / "build.lock"):
        built = any(d.glob(f"{name}*.so"))
        mod = cpp_extension.load(name=name, sources=[str(SOURCE)], build_directory=str(d),
                                 extra_cflags=CFLAGS + [f"-DINRUN_SRC_HASH={source_hash()}"],
                                 extra_ldflags=LDFLAGS,
                                 verbose=False)
    if not built:
        build_seconds = time.perf_counter() - t0
    return mod


def load():
    """The extension module; raises RuntimeError saying why it cannot be had."""
    with _lock:
        if "module" not in _state and "error" not in _state:
            try:
                _state["module"] = _aot() or _jit()
            except Exception as e:   # no compiler, no ninja, a failed build: keep the reason
                _state["error"] = f"{type(e).__name__}: {e}".strip()
        if "error" in _state:
            raise RuntimeError("the C++ CPU extension could not be built or loaded: " + _state["error"])
        return _state["module"]


def why_unavailable() -> str | None:
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


def eligible(tensors) -> str | None:
    """None when the C++ kernels can run on these tensors, else why not."""
    on = sorted({str(t.device) for t in tensors if t is not None and t.device.type != "cpu"})
    if on:
        return f"tensors on {', '.join(on)}; the C++ kernels run on CPU tensors"
    return why_unavailable()


def _prep(A, B):
    from .split import as_rows_tokens
    return as_rows_tokens(A, B, "split")


def split_dot(A, B, V, v_bias=None, lengths=None, scale=1.0, *, bias=None):
    from .split import check_operands
    A, B = _prep(A, B)
    check_operands("split_dot", A, B, V, v_bias, lengths)
    bias = (v_bias is not None) if bias is None else bias
    return tuple(load().split(A, B, V, v_bias, lengths, float(scale), bool(bias)))


def split_norms(A, B, lengths=None, scale=1.0, *, bias=False):
    from .split import check_operands
    A, B = _prep(A, B)
    check_operands("split_norms", A, B, lengths=lengths)
    return tuple(load().split(A, B, None, None, lengths, float(scale), bool(bias)))
