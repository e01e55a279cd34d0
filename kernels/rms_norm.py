"""RMSNorm, optionally fused with the residual add that precedes it, forward and backward.

A Llama decoder layer computes, twice per layer::

    s = x + residual                      (in the input dtype)
    y = w * (s * rstd).to(dtype),   rstd = 1 / sqrt(mean(s^2) + eps)   (statistics in fp32)

Gemma's RMSNorm (``UNIT_OFFSET``) scales by (1 + w) and rounds once, at the end; OLMo 2/3's
(``ROUND_ONCE``) scales by w and rounds once::

    y = ((s * rstd) * (1 + w)).to(dtype)      y = ((s * rstd) * w).to(dtype)   (all in fp32)

Both kernels work on tiles of BLOCK_M rows. A row of up to BLOCK_N (<= 8192) columns is read
once and held in registers. Wider rows are CHUNKED: a first loop over 4096-wide chunks reduces
the statistics, a second re-reads the chunks (from L1/L2: the row was just read) to write the
output. Holding 16K columns at once spills registers; the loops are runtime loops on purpose,
since an unrolled (static) loop lets the compiler keep the first pass's loads live, and spill.
Rows may have any stride; columns must be contiguous (vectorised 16-byte loads). Row offsets are
int64: rows * stride can pass 2**31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BLOCK_N = 8192  # widest row the forward holds in registers (fp32: 16 values a thread at 16 warps)
MAX_BLOCK_N_BWD = 4096  # the backward holds x and dy: 8192-wide rows spilled on sm_90
CHUNK_N = 4096  # chunk width for wider rows (8192 chunks spilled in the two-pass loops)


@triton.jit
def _sum_input(X, R, S, rows64, cols, mask, stride_x, stride_r, stride_s, HAS_RESIDUAL: tl.constexpr):
    """Loads x (+ residual: stores the sum s), returns s in fp32."""
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # HF adds in the input dtype: the sum is rounded before it is normalised, and that
        # rounded sum is what the next residual branch receives.
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _normalise_store(s, rstd, W, Y, rows64, cols, mask, n_cols, stride_y, UNIT_OFFSET: tl.constexpr,
                     ROUND_ONCE: tl.constexpr):
    """y = w * (s * rstd).to(dtype): HF's Llama casts BEFORE the weight multiply; Gemma's
    (UNIT_OFFSET) multiplies by 1 + w in fp32 and casts after, OLMo's (ROUND_ONCE) by w."""
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = (s * rstd[:, None]) * (1.0 + w[None, :])
    elif ROUND_ONCE:
        y = (s * rstd[:, None]) * w[None, :]
    else:
        y = (s * rstd[:, None]).to(Y.dtype.element_ty).to(tl.float32) * w[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows"])  # row counts: see ops/rms_norm._build_configs
def rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    n_rows, n_cols,
    stride_x, stride_r, stride_s, stride_y,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
    ROUND_ONCE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)

    if not CHUNKED:
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        s = _sum_input(X, R, S, rows64, cols, mask, stride_x, stride_r, stride_s, HAS_RESIDUAL)
        sum_sq = tl.sum(s * s, axis=1)
    else:
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, n_cols, BLOCK_N):
            cc = c0 + cols
            mask = row_ok[:, None] & (cc < n_cols)[None, :]
            s = _sum_input(X, R, S, rows64, cc, mask, stride_x, stride_r, stride_s, HAS_RESIDUAL)
            sum_sq += tl.sum(s * s, axis=1)

    # rstd = 1 / sqrt(mean(s^2) + eps). sqrt_rn/div_rn: one scalar per row, so the correctly
    # rounded versions cost nothing and keep fp32 output as exact as torch.rsqrt.
    rstd = tl.div_rn(1.0, tl.sqrt_rn(sum_sq / n_cols + eps))
    tl.store(RSTD + rows, rstd, mask=row_ok)

    if not CHUNKED:
        _normalise_store(s, rstd, W, Y, rows64, cols, mask, n_cols, stride_y, UNIT_OFFSET, ROUND_ONCE)
    else:
        # Second pass: re-read s (the stored sum, or x) chunk by chunk.
        if HAS_RESIDUAL:
            SRC = S
            stride_src = stride_s
        else:
            SRC = X
            stride_src = stride_x
        for c0 in range(0, n_cols, BLOCK_N):
            cc = c0 + cols
            mask = row_ok[:, None] & (cc < n_cols)[None, :]
            s = tl.load(SRC + rows64 * stride_src + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            _normalise_store(s, rstd, W, Y, rows64, cc, mask, n_cols, stride_y, UNIT_OFFSET, ROUND_ONCE)


def block_cols(n_cols: int, backward: bool = False, unit_offset: bool = False) -> tuple[int, bool]:
    """(BLOCK_N, CHUNKED) for rows of ``n_cols``. The unit-offset backward chunks by 2048: at
    4096 it spilled 8-16 bytes on sm_90/100/120 whatever the warp count (4, 8 or 16)."""
    if n_cols > (MAX_BLOCK_N_BWD if backward else MAX_BLOCK_N):
        return (CHUNK_N // 2 if backward and unit_offset else CHUNK_N), True
    return max(16, triton.next_power_of_2(n_cols)), False


def rms_norm_forward(x, weight, eps, residual=None, *, block_m, num_warps, unit_offset=False, round_once=False,
                     out_shape=None):
    """x, residual: (M, N) with unit column stride; weight (N,). Returns (y, s, rstd).
    ``unit_offset``: Gemma's (1 + w) scale, rounded once; ``round_once``: OLMo's w scale, rounded
    once (the backward is Llama's: the two differ only in the forward's rounding).

    ``s`` is ``x + residual`` (an empty tensor without residual); ``rstd`` is (M,) fp32. ``y`` and
    ``s`` are allocated in ``out_shape`` (M x N elements; default (M, N)): returned as views of
    (M, N) buffers, autograd would refuse in-place ops on a custom op's outputs.
    """
    n_rows, n_cols = x.shape
    out_shape = (n_rows, n_cols) if out_shape is None else out_shape
    y_out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    s_out = torch.empty(out_shape if residual is not None else (0,), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y_out, s_out, rstd
    y = y_out.view(n_rows, n_cols)
    s = s_out.view(n_rows, n_cols) if residual is not None else s_out
    r = residual if residual is not None else x
    block_n, chunked = block_cols(n_cols)
    with torch.cuda.device_of(x):  # Triton launches on the current device
        rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x, r, s if residual is not None else y, y, weight, rstd,
            n_rows, n_cols,
            x.stride(0), r.stride(0), s.stride(0) if residual is not None else 0, y.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            CHUNKED=chunked,
            UNIT_OFFSET=unit_offset,
            ROUND_ONCE=round_once and not unit_offset,
            num_warps=num_warps,
        )
    return y_out, s_out, rstd


# Backward. With n = s * rstd (the normalised row, n_cols = N) and y = w * n (Gemma: (1 + w) * n):
#     dn = dy * w                                  (Gemma: dy * (1 + w))
#     ds = rstd * (dn - n * mean(dn * n))          (the projection that keeps |n| fixed)
#     dw = sum over rows of dy * n
# With the residual fused, s fed both y and the second output, so its gradient adds ds_out, and
# x and residual both receive that same ds. Each program owns a contiguous run of rows and keeps
# its share of dw in fp32 (registers; for chunked rows, its own zero-initialised row of the
# partial buffer, which nobody else touches and so stays in L1/L2); the (programs, N) partial
# sums are reduced afterwards.
@triton.jit
def _load_grad_inputs(X, DY, W, RSTD, rows, rows64, cols, row_ok, n_cols, stride_x, stride_dy,
                      UNIT_OFFSET: tl.constexpr):
    """Masked rows load zeros everywhere (rstd too), so they add nothing to dw."""
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # w is re-read per tile (an L1/L2 hit) rather than held across the row loop: registers are
    # better spent on x and dy, and holding it made wide rows spill.
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    return x * rstd[:, None], dy * w[None, :], dy, rstd, mask


@triton.jit
def _store_dx(n, dn, dot, rstd, DS_OUT, DX, rows64, cols, mask, stride_ds, stride_dx, HAS_DS_OUT: tl.constexpr):
    dx = rstd[:, None] * (dn - n * dot[:, None])
    if HAS_DS_OUT:
        dx += tl.load(DS_OUT + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "rows_per_program"])  # row counts: see ops/rms_norm._build_configs
def rms_norm_bwd_kernel(
    DY, DS_OUT, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_ds, stride_x, stride_dx,
    HAS_DS_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKED: tl.constexpr,
    UNIT_OFFSET: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)

    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        rows64 = rows.to(tl.int64)[:, None]
        if not CHUNKED:
            n, dn, dy, rstd, mask = _load_grad_inputs(X, DY, W, RSTD, rows, rows64, cols, row_ok, n_cols,
                                                      stride_x, stride_dy, UNIT_OFFSET)
            dot = tl.sum(dn * n, axis=1) / n_cols
            _store_dx(n, dn, dot, rstd, DS_OUT, DX, rows64, cols, mask, stride_ds, stride_dx, HAS_DS_OUT)
            dw += tl.sum(dy * n, axis=0)
        else:
            dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, n_cols, BLOCK_N):
                n, dn, dy, rstd, mask = _load_grad_inputs(X, DY, W, RSTD, rows, rows64, c0 + cols, row_ok, n_cols,
                                                          stride_x, stride_dy, UNIT_OFFSET)
                dot += tl.sum(dn * n, axis=1)
            dot = dot / n_cols
            for c0 in range(0, n_cols, BLOCK_N):
                cc = c0 + cols
                n, dn, dy, rstd, mask = _load_grad_inputs(X, DY, W, RSTD, rows, rows64, cc, row_ok, n_cols,
                                                          stride_x, stride_dy, UNIT_OFFSET)
                _store_dx(n, dn, dot, rstd, DS_OUT, DX, rows64, cc, mask, stride_ds, stride_dx, HAS_DS_OUT)
                partial = DW_PARTIAL + pid * n_cols + cc
                tl.store(partial, tl.load(partial, mask=cc < n_cols) + tl.sum(dy * n, axis=0), mask=cc < n_cols)

    if not CHUNKED:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=cols < n_cols)


def rms_norm_backward(dy, x, weight, rstd, ds_out=None, *, block_m, num_programs, num_warps, unit_offset=False):
    """dy, x, ds_out: (M, N) with unit column stride (x is the normalised input: s with the
    residual fused). Returns (dx, dweight); dx is also the residual's gradient."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    num_programs = max(1, min(num_programs, triton.cdiv(n_rows, block_m)))
    # Whole BLOCK_M tiles per program, so no tile straddles two programs.
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, num_programs), block_m) * block_m
    num_programs = triton.cdiv(n_rows, rows_per_program)
    block_n, chunked = block_cols(n_cols, backward=True, unit_offset=unit_offset)
    alloc = torch.zeros if chunked else torch.empty  # chunked rows accumulate in place
    partial = alloc((num_programs, n_cols), dtype=torch.float32, device=x.device)
    ds = ds_out if ds_out is not None else dy
    with torch.cuda.device_of(x):
        rms_norm_bwd_kernel[(num_programs,)](
            dy, ds, x, weight, rstd, dx, partial,
            n_rows, n_cols, rows_per_program,
            dy.stride(0), ds.stride(0), x.stride(0), dx.stride(0),
            HAS_DS_OUT=ds_out is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            CHUNKED=chunked,
            UNIT_OFFSET=unit_offset,
            num_warps=num_warps,
        )
    return dx, partial.sum(0).to(weight.dtype)
