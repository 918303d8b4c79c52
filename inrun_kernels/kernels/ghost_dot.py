"""Triton launchers for the train x validation dot products.

dot_gram  (Gram route): the fused Gram kernel of ghost_gram.py in MODE 0, see its docstring.
dot_dense (dense route): s_ik = sum_t b_it^T V_k a_it (+ b_it . vb_k).

Dense kernel design. Grid: axis 0 = tiles of BT training tokens over the flattened N*T axis,
axis 1 = (k, p-split) pairs: V's p rows (output features) are cut into SPLIT_LEN ranges so a
small N still fills the GPU. A program loops over BP-wide chunks of its p range; per chunk it
accumulates the GEMM tile A_tile V_k[chunk]^T [BT, BP] over d in fp32 registers (tl.dot), adds
the bias row, multiplies by the B tile and reduces over p into a per-row vector (the epilogue),
so the N*T x p product is never stored. The row vector is written once to OUT[split, row, k];
the host sums over splits and each sample's rows (deterministic, no atomics). Padded tokens are
masked on load, and all-padding tiles are skipped.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import reference as ref
from . import configs as C
from .tiles import row_tile
from .ghost_gram import MAX_GRID_Y, launch_rows, plan_splits

# Validation samples shorter than this are flattened into one column group when the values
# are summed over v (per_val=False): fewer, fuller column tiles.
_FLATTEN_BELOW = 64


def dot_gram(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, *, bias: bool, per_val: bool,
             lengths: Tensor | None = None, val_lengths: Tensor | None = None) -> Tensor:
    """Gram route s_iv = sum_{t,s} (a_it . a_vs + bias)(b_it . b_vs); [N, M] if per_val else [N].
    Same contract as reference.dot_gram; fp32 result (fp64 inputs are passed to the reference)."""
    C.check_inputs("dot_gram", A, B, Av, Bv)
    if A.dim() != 3 or B.dim() != 3 or Av.dim() != 3 or Bv.dim() != 3:
        raise ValueError("dot_gram: expected 3-D [samples, tokens, features] tensors")
    N, T, d = A.shape
    M, S, _ = Av.shape
    p = B.shape[-1]
    if B.shape[:2] != (N, T) or Av.shape[-1] != d or Bv.shape != (M, S, p):
        raise ValueError(f"dot_gram: inconsistent shapes A{tuple(A.shape)} B{tuple(B.shape)} "
                         f"Av{tuple(Av.shape)} Bv{tuple(Bv.shape)}")
    if ref.acc_dtype(A, B, Av, Bv) == torch.float64:
        return ref.dot_gram(A, B, Av, Bv, bias=bias, per_val=per_val, lengths=lengths,
                            val_lengths=val_lengths)
    lens = C.lengths_arg(lengths, N, A.device, "lengths")
    vlens = C.lengths_arg(val_lengths, M, A.device, "val_lengths")
    if N * T == 0 or M * S == 0:
        z = torch.zeros(N, M, dtype=torch.float32, device=A.device)
        return z if per_val else z.sum(1)
    per_sample = per_val or M == 1 or S >= _FLATTEN_BELOW
    groups, s_grp = (M, S) if per_sample else (1, M * S)
    part = launch_rows(A, B, Av, Bv, lens, vlens, bias=bias, mode=0, groups=groups, s_grp=s_grp,
                       group_is_sample=per_sample)
    res = part.sum(0).view(N, T, groups).sum(1)
    return res if per_val else res.sum(1)


@triton.jit
def _ghost_dense_rows_kernel(
    A, B, V, VB, LEN, OUT,
    s_an, s_at, s_ad, s_bn, s_bt, s_bp,
    s_vk, s_vp, s_vd, s_bk, s_bb,
    s_os, s_or, s_ok,
    T, d, p, P_SPLITS, SPLIT_LEN,
    ROWS, COLS_HINT, RED_HINT,
    HAS_VB: tl.constexpr, HAS_LEN: tl.constexpr, CDT: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    split = pid_c % P_SPLITS
    kidx = pid_c // P_SPLITS

    rows, n_r, t_r, in_range, rmask = row_tile(pid_r, T, ROWS, LEN, HAS_LEN, BT)
    active = tl.max(rmask.to(tl.int32), axis=0) > 0

    p_lo = split * SPLIT_LEN
    p_hi = tl.minimum(p_lo + SPLIT_LEN, p)
    p_hi = tl.where(active, p_hi, p_lo)            # zero-trip loop for all-padding tiles

    a_row = A + n_r[:, None] * s_an + t_r[:, None] * s_at
    b_row = B + n_r[:, None] * s_bn + t_r[:, None] * s_bt
    v_k = V + kidx * s_vk
    kk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros([BT], dtype=tl.float32)
    for p0 in range(p_lo, p_hi, BP):
        pp = p0 + tl.arange(0, BP).to(tl.int64)
        pm = pp < p_hi
        y = tl.zeros([BT, BP], dtype=tl.float32)
        for k0 in range(0, d, BK):
            k = k0 + kk
            km = k < d
            a = tl.load(a_row + k[None, :] * s_ad, mask=rmask[:, None] & km[None, :], other=0.0)
            v = tl.load(v_k + pp[None, :] * s_vp + k[:, None] * s_vd, mask=km[:, None] & pm[None, :], other=0.0)
            y = tl.dot(a.to(CDT), v.to(CDT), y, input_precision=PREC)
        if HAS_VB:
            vb = tl.load(VB + kidx * s_bk + pp * s_bb, mask=pm, other=0.0).to(tl.float32)
            y = y + vb[None, :]
        b = tl.load(b_row + pp[None, :] * s_bp, mask=rmask[:, None] & pm[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(y * b, axis=1)
    tl.store(OUT + split * s_os + rows * s_or + kidx * s_ok, acc, mask=in_range)


_autotuned = None


def _tuned_kernel():
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=C.configs("dense"),
            key=["ROWS", "COLS_HINT", "RED_HINT", "P_SPLITS", "HAS_VB", "HAS_LEN", "CDT"],
            prune_configs_by={"early_config_prune": C.prune("dense")},
        )(_ghost_dense_rows_kernel)
    return _autotuned


def dot_dense(A: Tensor, B: Tensor, V: Tensor, v_bias: Tensor | None = None,
              lengths: Tensor | None = None) -> Tensor:
    """s_i = sum_t b_it^T V a_it (+ b_it . v_bias); V [p, d] -> [N], V [K, p, d] -> [N, K].
    Same contract as reference.dot_dense; fp32 result (fp64 inputs are passed to the reference)."""
    ts = (A, B, V) if v_bias is None else (A, B, V, v_bias)
    C.check_inputs("dot_dense", *ts)
    if A.dim() != 3 or B.dim() != 3 or B.shape[:2] != A.shape[:2]:
        raise ValueError(f"dot_dense: expected A [N,T,d] and B [N,T,p], got {tuple(A.shape)} and {tuple(B.shape)}")
    N, T, d = A.shape
    p = B.shape[-1]
    if V.dim() not in (2, 3) or V.shape[-2:] != (p, d):
        raise ValueError(f"dot_dense: V{tuple(V.shape)} does not match p={p}, d={d}")
    if ref.acc_dtype(*ts) == torch.float64:
        return ref.dot_dense(A, B, V, v_bias, lengths=lengths)
    Vs = V.reshape(-1, p, d)
    K = Vs.shape[0]
    vbs = None
    if v_bias is not None:
        if v_bias.numel() != K * p:
            raise ValueError(f"dot_dense: v_bias{tuple(v_bias.shape)} does not match K={K}, p={p}")
        vbs = v_bias.reshape(K, p)
    lens = C.lengths_arg(lengths, N, A.device, "lengths")
    rows = N * T
    if rows == 0 or K == 0:
        out = torch.zeros(N, K, dtype=torch.float32, device=A.device)
        return out if V.dim() == 3 else out[:, 0]
    shape = {"rows": rows, "cols": p, "red": d}
    cfgs = C.configs("dense", shape)
    single = len(cfgs) == 1
    align = cfgs[0].kwargs["BP"] if single else C.SPLIT_ALIGN
    est_bt = cfgs[0].kwargs["BT"] if single else 64
    splits, split_len = plan_splits(triton.cdiv(rows, est_bt) * K, p, align, A.device)
    if K * splits > MAX_GRID_Y:
        raise ValueError(f"dot_dense: K={K} matrices x {splits} splits exceed the grid limit {MAX_GRID_Y}")
    out = C.empty((splits, rows, K), A.device)
    args = (A, B, Vs, vbs if vbs is not None else Vs, lens if lens is not None else A, out,
            *A.stride(), *B.stride(), *Vs.stride(),
            *(vbs.stride() if vbs is not None else (0, 0)),
            *out.stride(), T, d, p, splits, split_len, rows, p, d)
    cdt = C.compute_dtype(A, Vs)
    flags = dict(HAS_VB=vbs is not None, HAS_LEN=lens is not None, CDT=cdt, PREC=C.dot_precision(cdt))

    def grid(meta):
        return (triton.cdiv(rows, meta["BT"]), K * splits)

    C.launch(_ghost_dense_rows_kernel, _tuned_kernel, grid, cfgs, args, flags)
    res = out.sum(0).view(N, T, K).sum(1)
    return res if V.dim() == 3 else res[:, 0]
