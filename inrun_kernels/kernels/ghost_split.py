"""Triton kernel of the split route (ops/split.py is its exact PyTorch reference).

A linear layer's weight gradient is sum_i g_i with g_i = B_i^T A_i (A [N, T, d] inputs, B [N, T, p]
output gradients). The split route computes it in one pass and, on the way, each sample's
<g_i, V> (split_dot; V [p, d], or K dense vectors V [K, p, d] giving <g_i, V[k]>) or ||g_i||^2
(split_norms), without ever storing a g_i.

Kernel design. Grid: axis 0 = (p-tile, d-tile) pairs of the [p, d] output, axis 1 = sample
splits (only when the output has too few tiles to fill the GPU once: each split then owns a
contiguous range of samples). A program loops over its samples i and, for each, over BK-token
chunks of sample i (one flattened loop over (sample, chunk), so the software pipeline runs across
sample boundaries), accumulating acc_i = B_i[:, ptile]^T A_i[:, dtile] in fp32 registers
(tl.dot). Tokens t >= T or t >= lengths[i] are masked on load (never read). After a sample's last
chunk (the epilogue): partial_i,k = sum(acc_i * V[k]_tile) for each k, or sum(acc_i^2), is
written to PART[tile, i, k] (K = 1 for one V and for the norms), acc_i is added into the
weight-gradient tile W (kept in registers) and reset. With one vector, V's tile is loaded once per
program; with K > 1 the epilogue loops over k and reloads V[k]'s tile for every sample (K tiles
would not fit in registers): N * K * p * d reads of V, served by L2 when V fits there. W is
stored once, scaled, to WP[split]. The host sums PART over tiles and WP over splits (fixed-order
torch reductions: deterministic, no atomics).

The bias part (B_i^T 1 per sample, [N, p]) costs one read of B: it is a torch reduction over
tokens in fp32 (B.sum(1, dtype=float32), which reads bf16/fp16 without an fp32 copy on CUDA);
padded tokens are excluded with torch.where, so padding is never read into a result. Its dots
are one [N, p] x [p, K] matmul with v_bias.

Dtypes (ops/split.py's conventions): fp32/bf16/fp16 inputs accumulate in fp32 and every output
is fp32; fp64 inputs (any of A, B, V) are passed to the exact reference ops/split.py, as the
other launchers do. `scale` multiplies the weight and bias gradients only, never the products.
Empty problems (no sample, token, input or output feature) also go to the reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import reference as ref
from ..ops import split as sp
from . import configs as C

# (BP, BD, BK, warps, stages). Three [BP, BD] fp32 tiles (the sample tile, W and V) live in
# registers: 128x128 needs 8 warps (64 registers per thread per tile).
_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3),
    (128, 64, 64, 4, 3), (64, 64, 64, 4, 4), (64, 64, 32, 4, 3), (64, 64, 16, 4, 4),
]
_NAMES = ("BP", "BD", "BK")
# Tile that plans the sample splits when autotuning (the config is not known before the launch).
_PLAN_TILE = 128


def _keep(cfg: tuple, T: int, d: int, p: int) -> bool:
    """Prune predicate: no tile much larger than the problem (it only adds masked work)."""
    bp, bd, bk = cfg[:3]
    return (bp <= max(C.MIN_BLOCK, triton.next_power_of_2(p))
            and bd <= max(C.MIN_BLOCK, triton.next_power_of_2(d))
            and bk <= max(C.MIN_BLOCK, triton.next_power_of_2(T)))


def configs(T: int, d: int, p: int) -> list[triton.Config]:
    """Autotuning on: the tile list pruned for this shape. Off (interpreter, INRUN_AUTOTUNE=0):
    exactly one config from next_power_of_2 of the sizes, capped."""
    if C.autotune_enabled():
        kept = [t for t in _TILES if _keep(t, T, d, p)] or [min(_TILES)]
        return [triton.Config(dict(zip(_NAMES, t[:3])), num_warps=t[3], num_stages=t[4]) for t in kept]
    bp, bd, bk = C.block(p, C.CAP_COLS), C.block(d, C.CAP_COLS), C.block(T, C.CAP_K)
    return [triton.Config(dict(zip(_NAMES, (bp, bd, bk))), num_warps=4, num_stages=2)]


def _prune(cfgs, named_args, **kwargs):
    T, d, p = named_args["T"], named_args["d"], named_args["p"]
    kept = [c for c in cfgs if _keep(tuple(c.kwargs[n] for n in _NAMES), T, d, p)]
    return kept or [min(cfgs, key=lambda c: tuple(c.kwargs[n] for n in _NAMES))]


@triton.jit
def _ghost_split_kernel(
    A, B, V, LEN, WP, PART,
    s_an, s_at, s_ad, s_bn, s_bt, s_bp, s_vk, s_vp, s_vd,
    s_ws, s_wp, s_wd, s_pt, s_pn, s_pk,
    N, T, d, p, K, SPL, scale,
    DOT: tl.constexpr, MULTI: tl.constexpr, HAS_LEN: tl.constexpr, CDT: tl.constexpr,
    PREC: tl.constexpr,
    BP: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
):
    tile = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_dt = tl.cdiv(d, BD)
    pid_p = tile // n_dt
    pid_d = tile - pid_p * n_dt
    pp = pid_p * BP + tl.arange(0, BP).to(tl.int64)
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    pm = pp < p
    dm = dd < d
    kk = tl.arange(0, BK).to(tl.int64)

    i_lo = split * SPL
    n_i = tl.minimum(N - i_lo, SPL)            # samples of this split (<= 0: none)
    KT = tl.cdiv(T, BK)                         # token chunks per sample
    v_tile = V + pp[:, None] * s_vp + dd[None, :] * s_vd
    pdm = pm[:, None] & dm[None, :]
    if DOT and not MULTI:                       # one vector: its tile stays in registers
        v = tl.load(v_tile, mask=pdm, other=0.0).to(tl.float32)
    a_col = A + dd[None, :] * s_ad
    b_col = B + pp[None, :] * s_bp
    acc = tl.zeros([BP, BD], dtype=tl.float32)  # the sample's tile of g_i
    w = tl.zeros([BP, BD], dtype=tl.float32)    # the weight-gradient tile
    for it in range(0, n_i * KT):
        i = i_lo + it // KT
        kc = it % KT
        t = kc * BK + kk
        tm = t < T
        if HAS_LEN:
            tm = tm & (t < tl.load(LEN + i))
        a = tl.load(a_col + i * s_an + t[:, None] * s_at, mask=tm[:, None] & dm[None, :], other=0.0)
        b = tl.load(b_col + i * s_bn + t[:, None] * s_bt, mask=tm[:, None] & pm[None, :], other=0.0)
        acc = tl.dot(tl.trans(b.to(CDT)), a.to(CDT), acc, input_precision=PREC)
        if kc == KT - 1:                        # sample i complete: its products, then into W
            part_i = PART + tile * s_pt + i * s_pn
            if MULTI:                           # K vectors: V[k]'s tile reloaded (L2) per k
                for k in range(0, K):
                    vk = tl.load(v_tile + k * s_vk, mask=pdm, other=0.0).to(tl.float32)
                    tl.store(part_i + k * s_pk, tl.sum(tl.sum(acc * vk, axis=1), axis=0))
            else:
                if DOT:
                    prod = acc * v
                else:
                    prod = acc * acc
                tl.store(part_i, tl.sum(tl.sum(prod, axis=1), axis=0))
            w += acc
            acc = tl.zeros([BP, BD], dtype=tl.float32)
    tl.store(WP + split * s_ws + pp[:, None] * s_wp + dd[None, :] * s_wd, w * scale, mask=pdm)


_autotuned = None


def _tuned_kernel():
    """The autotuned wrapper, built on first GPU launch. PART's row count depends on the tile
    (one row per tile): it is sized for the smallest tile, zero-filled, and reset to zero
    before the timed runs and before the final run, so rows past a config's tiles stay 0."""
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=configs(1 << 20, 1 << 20, 1 << 20),
            key=["N", "T", "d", "p", "K", "SPL", "DOT", "HAS_LEN", "CDT"],
            prune_configs_by={"early_config_prune": _prune},
            reset_to_zero=["PART"],
        )(_ghost_split_kernel)
    return _autotuned


def _sm_target(device: torch.device) -> int:
    """Programs that fill the device once (one per SM); 1 under the interpreter (tests patch it)."""
    if device.type != "cuda" or C.interpreting():
        return 1
    return C._sm_count(device.index if device.index is not None else torch.cuda.current_device())


def plan_sample_splits(N: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, samples per split): split the samples only while tiles * splits fits the device
    once -- each split adds a [p, d] fp32 partial of the weight gradient to write and re-read."""
    want = max(1, min(N, _sm_target(device) // max(1, tiles)))
    spl = -(-N // want)
    return -(-N // spl), spl


def _launch(A: Tensor, B: Tensor, V: Tensor | None, lens: Tensor | None, scale: float):
    """Run the kernel: (weight gradient * scale [p, d] fp32, products [N, K] fp32); V [p, d] runs
    as K = 1, as do the norms (V None)."""
    N, T, d = A.shape
    p = B.shape[-1]
    dot = V is not None
    V3 = V if not dot or V.dim() == 3 else V[None]
    K = V3.shape[0] if dot else 1
    dev = A.device
    cfgs = configs(T, d, p)
    single = len(cfgs) == 1
    bp = cfgs[0].kwargs["BP"] if single else _PLAN_TILE
    bd = cfgs[0].kwargs["BD"] if single else _PLAN_TILE
    splits, spl = plan_sample_splits(N, triton.cdiv(p, bp) * triton.cdiv(d, bd), dev)
    wp = C.empty((splits, p, d), dev)
    if single:
        part = C.empty((triton.cdiv(p, bp) * triton.cdiv(d, bd), N, K), dev)
    else:
        min_bp = min(c.kwargs["BP"] for c in cfgs)
        min_bd = min(c.kwargs["BD"] for c in cfgs)
        part = torch.zeros(triton.cdiv(p, min_bp) * triton.cdiv(d, min_bd), N, K,
                           dtype=torch.float32, device=dev)
    cdt = C.compute_dtype(A, B)
    args = (A, B, V3 if dot else A, lens if lens is not None else A, wp, part,
            *A.stride(), *B.stride(), *(V3.stride() if dot else (0, 0, 0)),
            *wp.stride(), *part.stride(),
            N, T, d, p, K, spl, float(scale))
    flags = dict(DOT=dot, MULTI=K != 1, HAS_LEN=lens is not None, CDT=cdt, PREC=C.dot_precision(cdt))

    def grid(meta):
        return (triton.cdiv(p, meta["BP"]) * triton.cdiv(d, meta["BD"]), splits)

    C.launch(_ghost_split_kernel, _tuned_kernel, grid, cfgs, args, flags)
    W = wp[0] if splits == 1 else wp.sum(0)
    return W, part.sum(0)


def _bias_rows(B: Tensor, lens: Tensor | None) -> Tensor:
    """Per-sample bias gradients B_i^T 1 over valid tokens, [N, p] fp32 (padding never read)."""
    if lens is not None:
        keep = torch.arange(B.shape[1], device=B.device)[None, :] < lens[:, None]
        B = torch.where(keep[..., None], B, torch.zeros((), dtype=B.dtype, device=B.device))
    return B.sum(1, dtype=torch.float32)


def _split(A: Tensor, B: Tensor, V: Tensor | None, lengths: Tensor | None, scale: float,
           bias: bool, v_bias: Tensor | None):
    lens = C.lengths_arg(lengths, A.shape[0], A.device, "lengths")
    W, out = _launch(A, B, V, lens, scale)
    if V is None or V.dim() == 2:
        out = out[:, 0]                         # one vector (or the norms): [N], as the reference
    gb = None
    if bias:
        bs = _bias_rows(B, lens)
        gb = bs.sum(0) * scale
        if V is None:
            out = out + bs.square().sum(1)
        elif v_bias is not None:
            vb = v_bias.to(torch.float32)
            out = out + bs @ (vb.T if vb.dim() == 2 else vb)   # [N, p] x [p(, K)]
    return W, gb, out


def _empty_problem(A: Tensor, B: Tensor) -> bool:
    return A.shape[0] * A.shape[1] * A.shape[2] * B.shape[2] == 0


def split_dot(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
              lengths: Tensor | None = None, scale: float = 1.0, *, bias: bool | None = None):
    """(scale * sum_i g_i [p, d], scale * sum_i B_i^T 1 [p] or None, dots) with
    dots_i = <g_i, V> (+ <B_i^T 1, v_bias> when bias): [N] for V [p, d], [N, K] for K vectors
    V [K, p, d] (v_bias [K, p]). Same contract as ops.split.split_dot: the bias gradient is
    returned when `bias` (default: whether v_bias is given)."""
    A, B = sp.as_rows_tokens(A, B, "split_dot")
    sp.check_operands("split_dot", A, B, V, v_bias, lengths)
    C.check_inputs("split_dot", *((A, B, V) if v_bias is None else (A, B, V, v_bias)))
    bias = (v_bias is not None) if bias is None else bias
    if ref.acc_dtype(A, B, V) == torch.float64 or _empty_problem(A, B):
        return sp.split_dot(A, B, V, v_bias, lengths, scale, bias=bias)
    return _split(A, B, V, lengths, scale, bias, v_bias)


def split_norms(A: Tensor, B: Tensor, lengths: Tensor | None = None, scale: float = 1.0, *,
                bias: bool = False):
    """(scale * sum_i g_i [p, d], bias gradient [p] or None, ||g_i||^2 (+ ||B_i^T 1||^2 with
    bias) [N]). Same contract as ops.split.split_norms."""
    A, B = sp.as_rows_tokens(A, B, "split_norms")
    sp.check_operands("split_norms", A, B, lengths=lengths)
    C.check_inputs("split_norms", A, B)
    if ref.acc_dtype(A, B) == torch.float64 or _empty_problem(A, B):
        return sp.split_norms(A, B, lengths, scale, bias=bias)
    return _split(A, B, None, lengths, scale, bias, None)
