"""Cross-entropy over a chunk of logits, and the fp32-accumulating GEMM of its weight gradient.

The fused linear cross-entropy (``fastllama.ops.linear_cross_entropy``) computes the logits
with a torch matmul, either a chunk of rows at a time (row-major) or, with few tokens, inside
the weight gradient's buffer (transposed: column-major), and hands them to the kernels here.

* :func:`cross_entropy_chunk` reads each logits row twice. The first read runs an online
  log-sum-exp over the vocabulary and picks up the target logit, giving the loss. The second
  read turns the row into the gradient of the loss with respect to the logits (softmax minus
  one-hot, times the reduction's scale) and writes it OVER the logits, so the chunk needs no
  second buffer and the backward becomes two matmuls. With few rows the vocabulary is split
  among several programs per row block (a partial log-sum-exp kernel, then the loss-and-
  gradient kernel), so that the GPU still runs enough programs.
* :func:`accumulate_at_b` computes ``C += A^T @ B`` with ``C`` in fp32 and ``A``, ``B`` in bf16 /
  fp16: the weight gradient summed over the chunks without rounding each chunk's share to
  bf16. (torch's ``addmm`` wants the addend in the operands' dtype, so it cannot do this.)

All statistics are fp32. Tile starts are int64 (rows * vocab exceeds 2**31 at 16k rows x 128k).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_chunk", "accumulate_at_b", "vocab_splits", "MAX_SPLITS"]


@triton.jit
def _tanh(x):
    # tanh without libdevice (the interpreter has none). (1 - e) / (1 + e) with e = exp(-2|x|)
    # never overflows, but 1 - e loses digits for small |x|, so there the odd Taylor series
    # (its first omitted term is below 1e-8 relative at |x| = 0.25) takes over.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)


# For a row of logits x (after optional soft-capping c = s * tanh(x / s)) and target y:
#   lse  = log(sum_j exp(c_j))
#   loss = lse - c_y + z * lse^2                                  (z: the z-loss weight)
#   dloss/dc_j = softmax_j * (1 + 2 z lse) - [j == y]
#   dloss/dx_j = dloss/dc_j * (1 - (c_j / s)^2)                   (tanh' = 1 - tanh^2)
# and the kernels store scale_row * dloss/dx_j in place of x_j. An ignored row (y ==
# ignore_index) has loss 0 and gradient 0. A label outside [0, V) (only possible when the op's
# label check is off) gives NaN loss and gradient, never a silently wrong number.
#
# A program owns BLOCK_M rows and a range of vocabulary columns (a "split"). With one split per
# row block, one launch of _loss_and_grad_kernel does everything. When that would be too few
# programs to keep the GPU's memory system busy (4096 rows of column-major logits are only 128
# row blocks), the vocabulary is split: _lse_partials_kernel writes each split's running
# (max, sum of exp), and _loss_and_grad_kernel combines them into the row's log-sum-exp
# before writing its split's gradient. Same two reads of the logits, one more small launch.


@triton.jit
def _tile_pointers(logits_ptr, stride_row, stride_col, first_row, first_col,
                   BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    # A tile's position is one 64-bit scalar pointer (rows * V, or V * rows column-major, passes
    # 2**31 at 16k x 128k), stepped by BLOCK_V columns; the offsets inside a tile are 32-bit and
    # the same for every step. (A carried tile of 64-bit pointers took ~250 registers and spilled.)
    start = logits_ptr + first_row.to(tl.int64) * stride_row + first_col.to(tl.int64) * stride_col
    in_tile = tl.arange(0, BLOCK_M)[:, None] * stride_row + tl.arange(0, BLOCK_V)[None, :] * stride_col
    return start, in_tile


@triton.jit
def _online_lse(logits_ptr, stride_row, stride_col, first_row, row_ok, col_begin, col_end, softcap,
                HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """Running (max, sum of exp(x - max)) of each row over columns [col_begin, col_end). One max
    and one sum reduction per tile (not per element): the sum is rescaled by exp(m_old - m_new)
    whenever the max grows. An empty range, or one of -inf logits only, gives (-inf, 0)."""
    tile, in_tile = _tile_pointers(logits_ptr, stride_row, stride_col, first_row, col_begin, BLOCK_M, BLOCK_V)
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(col_begin, col_end, BLOCK_V):
        col_ok = (start + cols0)[None, :] < col_end
        # Rows past the end read 0 (masked): finite, so the max never subtracts -inf from -inf.
        x = tl.load(tile + in_tile, mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            x = softcap * _tanh(x / softcap)
        x = tl.where(col_ok, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # While a row has seen only -inf logits (a -inf bias masking part of the vocabulary),
        # m_new is -inf and x - m_new would be -inf + inf = NaN: subtract 0 instead (exp gives 0).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), axis=1)
        m = m_new
        tile += BLOCK_V * stride_col
    return m, s


@triton.jit
def _target_logit(logits_ptr, stride_row, stride_col, labels_ptr, rows, row_ok, n_cols, ignore_index, softcap,
                  HAS_SOFTCAP: tl.constexpr):
    """Each row's (soft-capped) target logit: one gather per row (an ignored row or a label out
    of range reads column 0; the loss masks the first and turns the second into NaN)."""
    rows64 = rows.to(tl.int64)
    labels = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
    col = tl.where((labels != ignore_index) & (labels >= 0) & (labels < n_cols), labels, 0)
    target = tl.load(logits_ptr + rows64 * stride_row + col * stride_col, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        target = softcap * _tanh(target / softcap)
    return target


@triton.jit(do_not_specialize=["ignore_index"])  # see ops/cross_entropy._build_configs
def _lse_partials_kernel(
    logits_ptr, stride_row, stride_col,  # (rows, V): row-major (stride_col 1) or column-major
    labels_ptr,                          # (rows,) int32/int64
    target_ptr,                          # (rows,) fp32 out: the target logits (split 0 gathers them)
    part_ptr,                            # (2, splits, rows) fp32 out: max, then sum of exp
    n_rows, n_cols, cols_per_split, ignore_index, softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    first_row = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    if split == 0:
        # Gathered here, while nothing overwrites the logits: in the next kernel the target's
        # column may belong to another split's program, which turns it into a gradient.
        target = _target_logit(logits_ptr, stride_row, stride_col, labels_ptr, rows, row_ok, n_cols, ignore_index,
                               softcap, HAS_SOFTCAP)
        tl.store(target_ptr + rows, target, mask=row_ok)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)
    m, s = _online_lse(logits_ptr, stride_row, stride_col, first_row, row_ok, col_begin, col_end, softcap,
                       HAS_SOFTCAP, BLOCK_M, BLOCK_V)
    n_splits = tl.num_programs(1)
    tl.store(part_ptr + split * n_rows + rows, m, mask=row_ok)
    tl.store(part_ptr + (n_splits + split) * n_rows + rows, s, mask=row_ok)


@triton.jit(do_not_specialize=["ignore_index", "stride_scale"])  # see ops/cross_entropy._build_configs
def _loss_and_grad_kernel(
    logits_ptr, stride_row, stride_col,  # (rows, V): row-major (stride_col 1) or column-major
    labels_ptr,                    # (rows,) int32/int64
    loss_ptr,                      # (rows,) fp32 out
    lse_ptr,                       # (rows,) fp32 out
    scale_ptr, stride_scale,       # per-row gradient scale (stride 0: one scalar for all rows)
    part_ptr,                      # (2, splits, rows) fp32 from _lse_partials_kernel (SPLIT_PAD > 0);
                                   # loss_ptr then holds its target logits on entry
    n_rows, n_cols, cols_per_split, ignore_index,
    z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SPLIT_PAD: tl.constexpr,       # 0: one split, the log-sum-exp is computed here; else >= splits
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Rows stay a plain arange (masked, never clamped): the compiler then knows they are
    # contiguous, which is what coalesces the column-major tiles along the rows.
    first_row = tl.program_id(0) * BLOCK_M
    split = tl.program_id(1)
    rows = first_row + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_cols)

    if SPLIT_PAD == 0:
        m, s = _online_lse(logits_ptr, stride_row, stride_col, first_row, row_ok, col_begin, col_end, softcap,
                           HAS_SOFTCAP, BLOCK_M, BLOCK_V)
    else:
        # lse = M + log(sum_i s_i * exp(m_i - M)), M = max_i m_i over the splits (padding splits
        # and empty ones hold (-inf, 0) and add exactly 0).
        n_splits = tl.num_programs(1)
        splits = tl.arange(0, SPLIT_PAD)
        part = part_ptr + splits[None, :] * n_rows + rows[:, None]
        ok = row_ok[:, None] & (splits[None, :] < n_splits)
        m_i = tl.load(part, mask=ok, other=float("-inf"))
        s_i = tl.load(part + n_splits * n_rows, mask=ok, other=0.0)
        m = tl.max(m_i, axis=1)
        m = tl.where(row_ok, m, 0.0)  # rows past the end: no partials; any finite value will do
        s = tl.sum(s_i * tl.exp(m_i - m[:, None]), axis=1)
        s = tl.where(row_ok, s, 1.0)
    # lse = m + log s, but the loss and p use m and s apart: a confident row (target logit ~ m,
    # loss ~ 1e-5) would otherwise take lse's rounding at the size of m (2e-6 at m = 30), far
    # above what PyTorch's log_softmax (x - m first) makes in fp32.
    log_s = tl.log(s)
    lse = m + log_s

    # Rows past the end act as ignored rows.
    labels = tl.load(labels_ptr + rows64, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = labels != ignore_index
    in_range = (labels >= 0) & (labels < n_cols)
    if split == 0:
        if SPLIT_PAD == 0:
            # This program owns all of its rows' columns: the target is still a logit here.
            target = _target_logit(logits_ptr, stride_row, stride_col, labels_ptr, rows, row_ok, n_cols,
                                   ignore_index, softcap, HAS_SOFTCAP)
        else:
            target = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)  # _lse_partials_kernel's gather
        loss = (m - target) + log_s + z_loss * lse * lse
        loss = tl.where(valid, loss, 0.0)
        loss = tl.where(valid & ~in_range, float("nan"), loss)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    if WRITE_GRAD:
        # The gradient, overwriting the logits (the second and last read of them). Warps of a
        # program are not ordered on global memory: without the barrier another warp could
        # overwrite a target logit with its gradient before the gather above has read it.
        if SPLIT_PAD == 0:
            tl.debug_barrier()
        coef = tl.load(scale_ptr + rows64 * stride_scale, mask=row_ok, other=0.0).to(tl.float32)
        coef = tl.where(valid, coef, 0.0)
        coef = tl.where(valid & ~in_range, float("nan"), coef)
        # p = exp(x - m) / s; the 1 / s joins the z-loss factor per row, so each element costs
        # what exp(x - lse) did (exp(x - m - log s) took two subtractions and 8 more registers)
        p_factor = (1.0 + 2.0 * z_loss * lse) / s
        # One-hot in 32 bits (labels < V < 2**31): an int64 compare tile doubles its registers.
        label32 = tl.where(valid & in_range, labels, -1).to(tl.int32)
        tile, in_tile = _tile_pointers(logits_ptr, stride_row, stride_col, first_row, col_begin, BLOCK_M, BLOCK_V)
        cols0 = tl.arange(0, BLOCK_V)
        for start in range(col_begin, col_end, BLOCK_V):
            cols = start + cols0
            mask = row_ok[:, None] & (cols[None, :] < col_end)
            x = tl.load(tile + in_tile, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            g = tl.exp(x - m[:, None]) * p_factor[:, None]
            g = g - tl.where(cols[None, :] == label32[:, None], 1.0, 0.0)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * coef[:, None]
            tl.store(tile + in_tile, g.to(logits_ptr.dtype.element_ty), mask=mask)
            tile += BLOCK_V * stride_col


MAX_SPLITS = 32


def vocab_splits(n_rows: int, n_cols: int, block_m: int, block_v: int, programs: int) -> int:
    """Vocabulary splits so that about ``programs`` programs run (0 or 1: no split). A split
    keeps at least 8 tiles of columns; at most :data:`MAX_SPLITS`."""
    row_blocks = triton.cdiv(max(n_rows, 1), block_m)
    want = triton.cdiv(max(programs, 1), row_blocks)
    return max(1, min(want, MAX_SPLITS, triton.cdiv(n_cols, 8 * block_v)))


def cross_entropy_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor,
    *,
    ignore_index: int = -100,
    z_loss: float = 0.0,
    softcap: float | None = None,
    write_grad: bool = True,
    block_m: int = 1,
    block_v: int = 2048,
    num_warps: int = 8,
    splits: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of ``logits`` (rows, V); with ``write_grad`` the logits are
    overwritten by ``scale_row * dloss/dlogits``.

    ``logits`` is row-major (unit stride along V, any row stride) or column-major (unit stride
    along the rows, e.g. the transpose of a contiguous (V, rows) matrix); a column-major chunk
    wants a tile of several rows (``block_m``) so that its loads are contiguous. ``scale`` is
    fp32, one element (the same scale for every row) or one per row. ``splits`` > 1 divides the
    vocabulary among that many programs per row block (see :func:`vocab_splits`). Returns fp32
    ``(loss, lse)`` of shape (rows,).
    """
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1 and logits.stride(0) != 1 and n_rows > 1 and n_cols > 1:
        raise ValueError(f"logits must have unit stride along one dim, got strides {logits.stride()}")
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits must be in [1, {MAX_SPLITS}], got {splits}")
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    if n_rows == 0:
        return loss, lse
    stride_scale = 0 if scale.numel() == 1 else scale.stride(0)
    cols_per_split = triton.cdiv(triton.cdiv(n_cols, splits), block_v) * block_v
    splits = triton.cdiv(n_cols, cols_per_split)  # no empty split
    grid = (triton.cdiv(n_rows, block_m), splits)
    strides = (logits.stride(0), logits.stride(1))
    softcap_arg = float(softcap or 1.0)
    part = loss  # placeholder pointer when there is one split (never read)
    with torch.cuda.device_of(logits):  # Triton launches on the current device, not the tensors'
        if splits > 1:
            part = torch.empty((2, splits, n_rows), device=logits.device, dtype=torch.float32)
            _lse_partials_kernel[grid](
                logits, *strides, labels, loss, part, n_rows, n_cols, cols_per_split, ignore_index, softcap_arg,
                HAS_SOFTCAP=softcap is not None, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps)
        _loss_and_grad_kernel[grid](
            logits, *strides, labels, loss, lse, scale, stride_scale, part,
            n_rows, n_cols, cols_per_split, ignore_index, float(z_loss), softcap_arg,
            HAS_SOFTCAP=softcap is not None, WRITE_GRAD=write_grad,
            SPLIT_PAD=0 if splits == 1 else MAX_SPLITS, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
        )
    return loss, lse


# C (M, N) fp32 += A^T @ B with A (K, M) and B (K, N): M is the vocabulary, N the hidden size
# and K the rows of the chunk. Each program owns one (BLOCK_M, BLOCK_N) tile of C, loads it once,
# adds the K-loop of tile products to it in registers and stores it once: one read and one write
# of the fp32 accumulator per chunk, as a GEMM with beta = 1 does. Programs are ordered
# in groups of GROUP_M tile-rows so that neighbouring programs share B tiles in L2.
@triton.jit(do_not_specialize=["K"])  # see ops/cross_entropy._build_configs
def _accumulate_at_b_kernel(
    a_ptr, stride_ak, stride_am,
    b_ptr, stride_bk, stride_bn,
    c_ptr, stride_cm, stride_cn,
    M, N, K,
    ACCUMULATE: tl.constexpr,      # False on the first chunk: C is overwritten, not read
    PRECISION: tl.constexpr,       # "ieee" for fp32 operands (torch does not use tf32 either)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size

    # 64-bit scalar bases (M * N and K * M can pass 2**31), 32-bit offsets inside a tile:
    # 64-bit offset tiles would double the registers the pointers take and make the kernel spill.
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    col0 = (pid_n * BLOCK_N).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    c_ptrs = c_ptr + row0 * stride_cm + col0 * stride_cn + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (row0 + offs_m < M)[:, None] & (col0 + offs_n < N)[None, :]
    # The accumulator starts as C itself (beta = 1), so C and the running sum never need
    # registers at the same time.
    if ACCUMULATE:
        acc = tl.load(c_ptrs, mask=c_mask, other=0.0)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # Rows / columns past the edge read a valid row / column again (wrapped with %) instead of
    # carrying an M or N mask through the loop; their results are never stored.
    rows = (row0 + offs_m) % M - row0
    cols = (col0 + offs_n) % N - col0
    # A^T tile (BLOCK_M, BLOCK_K) read straight from A's (K, M) layout: no transposed copy.
    a_ptrs = a_ptr + row0 * stride_am + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + col0 * stride_bn + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    tl.store(c_ptrs, acc, mask=c_mask)


def accumulate_at_b(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    *,
    accumulate: bool = True,
    block_m: int = 64,
    block_n: int = 128,
    block_k: int = 32,
    group_m: int = 8,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """``c += a.T @ b`` (or ``c = a.T @ b`` with ``accumulate=False``), in place; returns ``c``.

    ``a`` (K, M) and ``b`` (K, N) share a dtype; ``c`` (M, N) is fp32. Any strides.
    """
    K, M = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c if accumulate else c.zero_()
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    with torch.cuda.device_of(c):
        _accumulate_at_b_kernel[grid](
            a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1), c, c.stride(0), c.stride(1),
            M, N, K, ACCUMULATE=accumulate, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            num_warps=num_warps, num_stages=num_stages,
        )
    return c
