"""Index arithmetic shared by the kernels."""
import triton
import triton.language as tl


@triton.jit
def row_tile(pid_r, T, ROWS, LEN, HAS_LEN: tl.constexpr, BT: tl.constexpr):
    """Training rows of tile `pid_r` over the flattened N*T token axis: (rows, sample n_r,
    token t_r, rows in range, rows that carry data: in range and t < lengths[n])."""
    rows = pid_r * BT + tl.arange(0, BT).to(tl.int64)
    n_r = rows // T
    t_r = rows - n_r * T
    in_range = rows < ROWS
    rmask = in_range
    if HAS_LEN:
        ln = tl.load(LEN + n_r, mask=in_range, other=0)
        rmask = rmask & (t_r < ln)
    return rows, n_r, t_r, in_range, rmask
