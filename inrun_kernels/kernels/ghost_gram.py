"""Fused Gram-route kernel: sum_{t,s} (a_t . a'_s + bias) (b_t . b'_s) without writing any Gram.

One kernel serves three primitives (MODE constexpr):
  MODE 0  train x val   (dot_gram, launched from ghost_dot.py): columns are validation tokens
  MODE 1  train x train (gram):     columns are the tokens of training sample j >= the tile's
          first sample (upper triangle at sample level); lower pairs are never computed
  MODE 2  norms        (norms_sq):  columns are the tokens of the row's own sample

Grid: axis 0 = tiles of BT training tokens over the flattened N*T token axis (a tile lies in one
sample when BT divides T; for short sequences one tile holds several samples, so T=1 wastes no
rows), axis 1 = (column group, column split) pairs. A column group is one validation sample
(per_val, or long S), all M*S validation tokens flattened (not per_val, short S), or one
training sample (MODE 1/2). Splits cut a group's columns into SPLIT_LEN ranges so a small N
still fills the GPU.

Each program loops over BS-column tiles of its range; per tile it accumulates the A-Gram tile
(loop over d, tl.dot) and the B-Gram tile (loop over p, tl.dot) in fp32 registers, multiplies
them and reduces over the columns into a per-row vector, then writes that row vector once to
OUT[split, row, group]. The host sums OUT over splits and over each sample's rows (a fixed-order
torch reduction: deterministic, no atomics). Padded tokens (t >= lengths) are masked on load;
tiles of padding only are skipped (zero-trip loops), and per-sample column loops stop at the
column sample's length.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops import reference as ref
from . import configs as C
from .tiles import row_tile


@triton.jit
def _ghost_gram_rows_kernel(
    A, B, AV, BV, LEN, VLEN, OUT,
    s_an, s_at, s_ad, s_bn, s_bt, s_bp,
    s_vn, s_vt, s_vd, s_wn, s_wt, s_wp,
    s_os, s_or, s_og,
    N, T, S, d, p,
    S_GRP, S_SPLITS, SPLIT_LEN, G0, N_GROUPS,
    ROWS, COLS_HINT, RED_HINT,
    BIAS: tl.constexpr, MODE: tl.constexpr, HAS_LEN: tl.constexpr, HAS_VLEN: tl.constexpr,
    GROUP_IS_SAMPLE: tl.constexpr, CDT_A: tl.constexpr, CDT_B: tl.constexpr,
    PREC_A: tl.constexpr, PREC_B: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)

    # ---- training rows of this tile (flattened N*T axis) -----------------------------------
    rows, n_r, t_r, in_range, rmask = row_tile(pid_r, T, ROWS, LEN, HAS_LEN, BT)
    n_lo = (pid_r * BT) // T

    # ---- column group and split ------------------------------------------------------------
    split = pid_c % S_SPLITS
    g = pid_c // S_SPLITS
    if MODE == 1:
        g = g + G0                  # column-sample chunk offset
        active = g >= n_lo          # sample-level upper triangle only
    elif MODE == 2:
        g = n_lo + g                # the samples that appear in this row tile
        rmask = rmask & (n_r == g)
        active = g < N
    else:
        active = g < N_GROUPS
    active = active & (tl.max(rmask.to(tl.int32), axis=0) > 0)   # skip all-padding tiles

    col_lo = split * SPLIT_LEN
    col_hi = tl.minimum(col_lo + SPLIT_LEN, S_GRP)
    if HAS_VLEN:
        if GROUP_IS_SAMPLE:
            col_hi = tl.minimum(col_hi, tl.load(VLEN + g, mask=active, other=0))
    col_hi = tl.where(active, col_hi, col_lo)      # zero-trip loop when inactive

    a_row = A + n_r[:, None] * s_an + t_r[:, None] * s_at
    b_row = B + n_r[:, None] * s_bn + t_r[:, None] * s_bt
    kk = tl.arange(0, BK).to(tl.int64)
    acc = tl.zeros([BT], dtype=tl.float32)
    for c0 in range(col_lo, col_hi, BS):
        cols = c0 + tl.arange(0, BS).to(tl.int64)
        gc = g * S_GRP + cols
        m_c = gc // S
        s_c = gc - m_c * S
        cmask = cols < col_hi
        if HAS_VLEN:
            if not GROUP_IS_SAMPLE:
                vl = tl.load(VLEN + m_c, mask=cmask, other=0)
                cmask = cmask & (s_c < vl)
        av_col = AV + m_c[None, :] * s_vn + s_c[None, :] * s_vt
        bv_col = BV + m_c[None, :] * s_wn + s_c[None, :] * s_wt

        ga = tl.zeros([BT, BS], dtype=tl.float32)
        for k0 in range(0, d, BK):
            k = k0 + kk
            km = k < d
            a = tl.load(a_row + k[None, :] * s_ad, mask=rmask[:, None] & km[None, :], other=0.0)
            av = tl.load(av_col + k[:, None] * s_vd, mask=km[:, None] & cmask[None, :], other=0.0)
            ga = tl.dot(a.to(CDT_A), av.to(CDT_A), ga, input_precision=PREC_A)
        gb = tl.zeros([BT, BS], dtype=tl.float32)
        for k0 in range(0, p, BK):
            k = k0 + kk
            km = k < p
            b = tl.load(b_row + k[None, :] * s_bp, mask=rmask[:, None] & km[None, :], other=0.0)
            bv = tl.load(bv_col + k[:, None] * s_wp, mask=km[:, None] & cmask[None, :], other=0.0)
            gb = tl.dot(b.to(CDT_B), bv.to(CDT_B), gb, input_precision=PREC_B)
        # masked rows/columns have gb == 0, so the +bias there contributes nothing
        if BIAS:
            ga = ga + 1.0
        acc += tl.sum(ga * gb, axis=1)

    out = OUT + split * s_os + rows * s_or + (g - G0) * s_og    # G0 = 0 except MODE 1 chunks
    if MODE == 2:
        tl.store(out, acc, mask=in_range & (n_r == g))
    else:
        tl.store(out, acc, mask=in_range)


_autotuned = None
MAX_GRID_Y = 65535          # CUDA limit of grid axis 1


def _tuned_kernel():
    """The autotuned wrapper, built on first GPU launch (building it needs an active driver)."""
    global _autotuned
    if _autotuned is None:
        _autotuned = triton.autotune(
            configs=C.configs("gram"),
            key=["ROWS", "COLS_HINT", "RED_HINT", "N_GROUPS", "S_SPLITS", "MODE", "BIAS",
                 "HAS_LEN", "HAS_VLEN", "CDT_A", "CDT_B"],
            prune_configs_by={"early_config_prune": C.prune("gram")},
        )(_ghost_gram_rows_kernel)
    return _autotuned


def plan_splits(base_programs: int, cols: int, align: int, device: torch.device) -> tuple[int, int]:
    """(splits, split_len): cut `cols` columns into splits (aligned to `align`) until
    base_programs * splits reaches the device's target program count."""
    want = max(1, -(-C.target_programs(device) // max(1, base_programs)))
    max_splits = max(1, -(-cols // align))
    splits = min(want, max_splits)
    split_len = -(-cols // splits)
    split_len = max(align, -(-split_len // align) * align)
    splits = max(1, -(-cols // split_len))
    return splits, split_len


def launch_rows(A: Tensor, B: Tensor, Av: Tensor, Bv: Tensor, lengths: Tensor | None,
                val_lengths: Tensor | None, *, bias: bool, mode: int, groups: int, s_grp: int,
                group_is_sample: bool, g0: int = 0, grid_groups: int | None = None) -> Tensor:
    """Launch the kernel and return the per-row partials OUT [splits, N*T, groups] (fp32)."""
    N, T, d = A.shape
    S = Av.shape[1]
    p = B.shape[-1]
    rows = N * T
    dev = A.device
    shape = {"rows": rows, "cols": s_grp, "red": max(d, p)}
    cfgs = C.configs("gram", shape)
    single = len(cfgs) == 1
    align = cfgs[0].kwargs["BS"] if single else C.SPLIT_ALIGN
    est_bt = cfgs[0].kwargs["BT"] if single else 64
    grid_groups = groups if grid_groups is None else grid_groups
    splits, split_len = plan_splits(triton.cdiv(rows, est_bt) * grid_groups, s_grp, align, dev)
    if grid_groups * splits > MAX_GRID_Y:
        raise ValueError(f"{grid_groups} column groups x {splits} splits exceed the grid limit {MAX_GRID_Y}")
    out_groups = 1 if mode == 2 else groups
    out = C.empty((splits, rows, out_groups), dev)
    cdt_a = C.compute_dtype(A, Av)
    cdt_b = C.compute_dtype(B, Bv)
    args = (A, B, Av, Bv,
            lengths if lengths is not None else A, val_lengths if val_lengths is not None else A, out,
            *A.stride(), *B.stride(), *Av.stride(), *Bv.stride(),
            out.stride(0), out.stride(1), 0 if mode == 2 else out.stride(2),
            N, T, S, d, p, s_grp, splits, split_len, g0, groups,
            rows, s_grp, max(d, p))
    flags = dict(BIAS=bool(bias), MODE=mode, HAS_LEN=lengths is not None, HAS_VLEN=val_lengths is not None,
                 GROUP_IS_SAMPLE=group_is_sample, CDT_A=cdt_a, CDT_B=cdt_b,
                 PREC_A=C.dot_precision(cdt_a), PREC_B=C.dot_precision(cdt_b))
    if mode == 2:
        def grid(meta):
            span = min(N, (meta["BT"] - 1) // T + 2)   # samples one row tile can touch
            return (triton.cdiv(rows, meta["BT"]), span * splits)
    else:
        def grid(meta):
            return (triton.cdiv(rows, meta["BT"]), grid_groups * splits)
    C.launch(_ghost_gram_rows_kernel, _tuned_kernel, grid, cfgs, args, flags)
    return out


def _prep(name: str, A: Tensor, B: Tensor, lengths: Tensor | None):
    C.check_inputs(name, A, B)
    if A.dim() != 3 or B.dim() != 3 or B.shape[:2] != A.shape[:2]:
        raise ValueError(f"{name}: expected A [N,T,d] and B [N,T,p], got {tuple(A.shape)} and {tuple(B.shape)}")
    return C.lengths_arg(lengths, A.shape[0], A.device, "lengths")


def gram(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Train x train Gram [N, N] of per-sample gradients (same contract as reference.gram).
    Only sample pairs i <= j are computed; the result is mirrored. fp64 inputs use the reference."""
    lens = _prep("gram", A, B, lengths)
    if ref.acc_dtype(A, B) == torch.float64:
        return ref.gram(A, B, bias=bias, lengths=lengths)
    N, T, _ = A.shape
    if N * T == 0:
        return torch.zeros(N, N, dtype=torch.float32, device=A.device)
    # Chunk the column samples so OUT [splits, N*T, chunk] stays within the temp budget.
    from ..ops.budget import temp_budget_elems
    chunk = max(1, min(N, MAX_GRID_Y // C.SPLIT_ALIGN, temp_budget_elems() // max(1, N * T)))
    full = torch.empty(N, N, dtype=torch.float32, device=A.device)
    for j0 in range(0, N, chunk):
        nj = min(chunk, N - j0)
        part = launch_rows(A, B, A, B, lens, lens, bias=bias, mode=1, groups=nj, s_grp=T,
                           group_is_sample=True, g0=j0)
        full[:, j0:j0 + nj] = part.sum(0).view(N, T, nj).sum(1)
    upper = torch.triu(full)
    return upper + torch.triu(full, 1).T


def norms_sq(A: Tensor, B: Tensor, *, bias: bool, lengths: Tensor | None = None) -> Tensor:
    """Squared norms [N] of the per-sample gradients (diagonal blocks only); fp64 -> reference."""
    lens = _prep("norms_sq", A, B, lengths)
    if ref.acc_dtype(A, B) == torch.float64:
        return ref.norms_sq(A, B, bias=bias, lengths=lengths)
    N, T, _ = A.shape
    if N * T == 0:
        return torch.zeros(N, dtype=torch.float32, device=A.device)
    part = launch_rows(A, B, A, B, lens, lens, bias=bias, mode=2, groups=N, s_grp=T,
                       group_is_sample=True, grid_groups=1)
    return part.sum(0).view(N, T).sum(1)
