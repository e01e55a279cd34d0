"""RMSNorm, optionally fused with the residual add that precedes it, forward and backward.

A Llama decoder layer computes, twice per layer::

    s = x + residual                      (in the input dtype)
    y = w * (s * rstd).to(dtype),   rstd = 1 / sqrt(mean(s^2) + eps)   (statistics in fp32)

Both kernels work on tiles of BLOCK_M whole rows (BLOCK_N >= n_cols): a row is read once, its
statistics reduced in registers, and written once. Rows may have any stride; columns must be
contiguous (vectorised 16-byte loads). Row offsets are int64: rows * stride can pass 2**31.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def rms_norm_fwd_kernel(
    X, R, S, Y, W, RSTD,
    n_rows, n_cols,
    stride_x, stride_r, stride_s, stride_y,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # HF adds in the input dtype: the sum is rounded before it is normalised, and that
        # rounded sum is what the next residual branch receives.
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], x, mask=mask)

    xf = x.to(tl.float32)
    # rstd = 1 / sqrt(sum(x^2) / n + eps). sqrt_rn/div_rn: one scalar per row, so the correctly
    # rounded versions cost nothing and keep fp32 output as exact as torch.rsqrt.
    mean_sq = tl.sum(xf * xf, axis=1) / n_cols
    rstd = tl.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    tl.store(RSTD + rows, rstd, mask=row_ok)

    # HF casts the normalised value to the input dtype BEFORE the weight multiply.
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    normed = (xf * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)


def rms_norm_forward(x, weight, eps, residual=None, *, block_m, num_warps):
    """x, residual: (M, N) with unit column stride; weight (N,). Returns (y, s, rstd).

    ``s`` is ``x + residual`` (an empty tensor without residual); ``rstd`` is (M,) fp32.
    """
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    s = torch.empty((n_rows, n_cols) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    r = residual if residual is not None else x
    rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
        x, r, s if residual is not None else y, y, weight, rstd,
        n_rows, n_cols,
        x.stride(0), r.stride(0), s.stride(0) if residual is not None else 0, y.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(n_cols),
        num_warps=num_warps,
    )
    return y, s, rstd


# Backward. With n = s * rstd (the normalised row, n_cols = N) and y = w * n:
#     dn = dy * w
#     ds = rstd * (dn - n * mean(dn * n))          (the projection that keeps |n| fixed)
#     dw = sum over rows of dy * n
# With the residual fused, s fed both y and the second output, so its gradient adds ds_out, and
# x and residual both receive that same ds. Each program owns a contiguous run of rows and keeps
# its share of dw in fp32 registers; the (programs, N) partial sums are reduced afterwards.
@triton.jit
def rms_norm_bwd_kernel(
    DY, DS_OUT, X, W, RSTD, DX, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy, stride_ds, stride_x, stride_dx,
    HAS_DS_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)

    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]

        # Masked rows load zeros everywhere (rstd too), so they add nothing to dw.
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        n = x * rstd[:, None]
        dn = dy * w[None, :]
        dot = tl.sum(dn * n, axis=1) / n_cols
        dx = rstd[:, None] * (dn - n * dot[:, None])
        if HAS_DS_OUT:
            dx += tl.load(DS_OUT + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * n, axis=0)

    tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)


def rms_norm_backward(dy, x, weight, rstd, ds_out=None, *, block_m, num_programs, num_warps):
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
    partial = torch.empty((num_programs, n_cols), dtype=torch.float32, device=x.device)
    ds = ds_out if ds_out is not None else dy
    rms_norm_bwd_kernel[(num_programs,)](
        dy, ds, x, weight, rstd, dx, partial,
        n_rows, n_cols, rows_per_program,
        dy.stride(0), ds.stride(0), x.stride(0), dx.stride(0),
        HAS_DS_OUT=ds_out is not None,
        BLOCK_M=block_m,
        BLOCK_N=triton.next_power_of_2(n_cols),
        num_warps=num_warps,
    )
    return dx, partial.sum(0).to(weight.dtype)
