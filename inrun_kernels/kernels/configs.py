"""Launch configuration for the Triton ghost kernels, in one place.

* `autotune_enabled()`: autotuning is off under the Triton interpreter (more than one config
  crashes it) and when INRUN_AUTOTUNE=0; one shape-derived config is used instead.
* `configs(kind, shape)`: THE config function. With autotuning on it returns the full list
  (tensor-core friendly tiles 64-128, 4-8 warps, 2-4 stages) pruned by `_keep`; with it off,
  exactly one config whose blocks come from next_power_of_2 of the sizes with caps.
* `target_programs(device)`: how many programs fill the machine (the launchers split the
  validation / feature axis until the grid reaches it). Tests monkeypatch it to force splits.
* `empty(...)`: the one allocator for kernel outputs (tests patch it to NaN-fill, so an entry
  a kernel forgets to write fails the test).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Smallest tile a tl.dot accepts, and the caps of the single (non-autotuned) config.
MIN_BLOCK = 16
CAP_ROWS = 64      # training tokens per program
CAP_COLS = 64      # validation tokens per inner tile
CAP_K = 64         # reduction chunk over d or p
# Column splits are aligned to this many tokens / features when autotuning (>= largest tile).
SPLIT_ALIGN = 128


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("INRUN_AUTOTUNE", "1") not in ("0", "false", "off")


def block(n: int, cap: int, lo: int = MIN_BLOCK) -> int:
    """next_power_of_2(n) clamped to [lo, cap]."""
    if cap < lo or cap & (cap - 1):
        raise ValueError(f"block cap must be a power of two >= {lo}, got {cap}")
    return max(lo, min(cap, triton.next_power_of_2(max(1, int(n)))))


def target_programs(device: torch.device) -> int:
    """Programs needed to fill the device (4 waves of SMs); 1 under the interpreter (each program
    instance costs time there, so never split unless a test asks for it)."""
    if device.type != "cuda" or interpreting():
        return 1
    return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def empty(shape, device, dtype=torch.float32) -> torch.Tensor:
    """Allocator for kernel outputs; every entry must be written by the kernel."""
    return torch.empty(shape, device=device, dtype=dtype)


# ---- configs ------------------------------------------------------------------------------
# kind "gram"  (dot_gram / gram / norms): BT training rows, BS validation columns, BK chunk of
#              d and of p.
# kind "dense" (dot_dense): BT rows, BP chunk of p (output features), BK chunk of d.
_TILES = {
    "gram": [  # (BT, BS, BK, warps, stages)
        (128, 128, 32, 8, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 64, 4, 3),
        (128, 128, 64, 8, 2), (64, 64, 32, 4, 4), (128, 64, 32, 4, 4), (64, 32, 64, 4, 3),
        (32, 64, 64, 4, 3), (32, 32, 64, 4, 2), (16, 64, 64, 4, 3),
    ],
    "dense": [  # (BT, BP, BK, warps, stages); wider BP spills registers (B-tile pointers) on sm_90
        (128, 64, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 128, 32, 8, 3),
        (128, 64, 32, 8, 4), (64, 64, 32, 4, 4), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3),
    ],
}
_NAMES = {"gram": ("BT", "BS", "BK"), "dense": ("BT", "BP", "BK")}


def _keep(kind: str, cfg: tuple, shape: dict) -> bool:
    """Prune predicate: no tile much larger than the problem (it only adds masked work)."""
    bt, bc, bk = cfg[:3]
    rows, cols, red = shape["rows"], shape["cols"], shape["red"]
    return (bt <= max(MIN_BLOCK, triton.next_power_of_2(rows))
            and bc <= max(MIN_BLOCK, triton.next_power_of_2(cols))
            and bk <= max(MIN_BLOCK, 2 * triton.next_power_of_2(red)))


def _all_configs(kind: str) -> list[triton.Config]:
    names = _NAMES[kind]
    return [triton.Config(dict(zip(names, c[:3])), num_warps=c[3], num_stages=c[4]) for c in _TILES[kind]]


def configs(kind: str, shape: dict | None = None) -> list[triton.Config]:
    """The launch configs for a kernel kind. shape: {"rows": training rows, "cols": columns per
    group (validation tokens, or p for the dense kernel), "red": largest reduction length}."""
    if kind not in _TILES:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if autotune_enabled():
        cfgs = _all_configs(kind)
        if shape is not None:
            kept = [c for c, t in zip(cfgs, _TILES[kind]) if _keep(kind, t, shape)]
            cfgs = kept or [min(cfgs, key=lambda c: tuple(c.kwargs.values()))]
        return cfgs
    shape = shape or {"rows": CAP_ROWS, "cols": CAP_COLS, "red": CAP_K}
    bt = block(shape["rows"], CAP_ROWS)
    bc = block(shape["cols"], CAP_COLS if kind == "gram" else 2 * CAP_COLS)
    bk = block(shape["red"], CAP_K)
    return [triton.Config(dict(zip(_NAMES[kind], (bt, bc, bk))), num_warps=4, num_stages=2)]


def prune(kind: str):
    """early_config_prune hook for triton.autotune (shape read from the kernel's arguments)."""
    def _prune(cfgs, named_args, **kwargs):
        shape = {"rows": named_args["ROWS"], "cols": named_args["COLS_HINT"], "red": named_args["RED_HINT"]}
        names = _NAMES[kind]
        kept = [c for c in cfgs if _keep(kind, tuple(c.kwargs[n] for n in names), shape)]
        return kept or [min(cfgs, key=lambda c: tuple(c.kwargs[n] for n in names))]
    return _prune


def compute_dtype(*ts: torch.Tensor):
    """tl dtype the tl.dot operands are cast to: the promoted input dtype; bf16 becomes fp32 when
    interpreting (bf16 tl.dot is wrong under the interpreter)."""
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    if dt == torch.bfloat16 and interpreting():
        dt = torch.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dt]


def dot_precision(cdt) -> str:
    """input_precision of tl.dot for operands of tl dtype `cdt`. fp32: tf32 when PyTorch allows it
    for matmuls, else tf32x3 (about fp32 accuracy on tensor cores). fp16/bf16: the default
    ("tf32", which only matters for fp32 operands)."""
    if cdt == tl.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def check_inputs(name: str, *ts: torch.Tensor) -> None:
    dev = ts[0].device
    for t in ts:
        if t.device != dev:
            raise ValueError(f"{name}: all tensors must be on one device, got {dev} and {t.device}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name}: unsupported dtype {t.dtype}; expected fp16, bf16, fp32 or fp64")
    if dev.type != "cuda" and not interpreting():
        raise RuntimeError(f"{name}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def lengths_arg(lengths: torch.Tensor | None, n: int, device: torch.device, what: str) -> torch.Tensor | None:
    if lengths is None:
        return None
    if lengths.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {tuple(lengths.shape)}")
    return lengths.to(device=device, dtype=torch.int64).contiguous()


def launch(kernel, tuned, grid, cfgs, args, flags) -> None:
    """Run `kernel` with its one config (interpreter / INRUN_AUTOTUNE=0), else the autotuned
    wrapper `tuned()` picks among `cfgs`. `grid(meta)` maps a config's block sizes to the grid."""
    if len(cfgs) == 1:
        cfg = cfgs[0]
        kernel[grid(cfg.kwargs)](*args, **flags, **cfg.kwargs,
                                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        tuned()[grid](*args, **flags)
