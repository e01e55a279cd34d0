"""A linear layer for the few rows of a decode step, with what surrounds it in a Llama layer.

At batch 1 a decode step is a chain of matrix-vector products, each bound by reading its weight,
and between them small elementwise kernels (the RMSNorm before q/k/v and gate/up, the SwiGLU
after gate/up, the residual adds after o_proj and down_proj). In a captured step each of those
costs a few microseconds of launch and ramp-up for almost no bytes: at the Llama-3.2-1B shape a
layer's weights take ~25 us to read at 4.8 TB/s, and five small kernels about as long. This
kernel folds them into the products that need them::

    prologue   h = norm(x) = w_n * (x * rstd).to(dtype),  rstd = 1 / sqrt(mean(x^2) + eps)
               (Gemma's ``(x * rstd) * (1 + w_n)`` and OLMo's ``(x * rstd) * w_n`` rounded once)
    product    y = h @ W^T (+ b)                           (fp32 accumulation, one rounding)
    gated      y = act(g) * u,  g = h @ W[:N]^T, u = h @ W[N:]^T   (W holds gate rows, then up rows)
    epilogue   y = (residual + y).to(dtype)

with every rounding where fastllama's unfused kernels round (the normed row as HF's RMSNorm
rounds it, each linear's output, ``act(g) * u`` once as kernels/swiglu.py does, the sum), so the
result differs from theirs only in the summation order of the products.

One program computes BLOCK_N output columns for BLOCK_M rows: it streams its BLOCK_N weight rows
(twice BLOCK_N when gated) once, K in steps of BLOCK_K. Each program also reads all of x (from
L2), twice with the norm (its squares first): M / BLOCK_N of the weight's bytes (M / 8 with the
norm), little at batch 1, as much as the weight itself at 16 rows with the norm, where the
weight's GEMV stops being the whole cost anyway. The product is a ``tl.dot`` with the
rows padded to 16 (tensor cores need 16; the padding rows are masked zeros, never loaded or
stored), which costs no memory traffic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .swiglu import _gate

# NORM: which RMSNorm, if any, the prologue applies
NO_NORM, LLAMA_NORM, UNIT_OFFSET_NORM, ROUND_ONCE_NORM = 0, 1, 2, 3
# ACTIVATION: 0 none (plain linear), else the gated MLP's: SiLU (SwiGLU) or GELU-tanh (GeGLU)
NO_ACTIVATION, SILU, GELU_TANH = 0, 1, 2

NORM_BLOCK = 1024  # the norm's pass over x: elements per load (8 fp32 values a thread at 4 warps; 2048 spilled 8-16 B)

# The integers that change from launch to launch or model to model, compiled as plain i32 (see
# kernels/flash_attention.LAUNCH_VARYING_INTS): with ALIGNED the kernel restores the divisibility
# the vector loads need itself, so the build report's builds are the launched ones.
LAUNCH_VARYING_INTS = ["n_rows", "n_out", "n_in", "stride_x", "stride_w", "stride_r", "stride_y"]


@triton.jit(do_not_specialize=LAUNCH_VARYING_INTS)
def decode_linear_kernel(
    X, NORM_W, W, BIAS, RES, Y,
    n_rows, n_out, n_in,
    stride_x, stride_w, stride_r, stride_y,
    eps,
    NORM: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ALIGNED: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK: tl.constexpr,
):
    if ALIGNED:
        # The launcher checked these are multiples of 16 elements; written so the compiler sees
        # it (a divisibility hint on an unspecialised scalar argument is dropped), which lets the
        # weight rows load as 16-byte vectors. Without it every element is its own load.
        n_in = (n_in // 16) * 16
        stride_x = (stride_x // 16) * 16
        stride_w = (stride_w // 16) * 16
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Weight rows past the end are clamped, not masked (they repeat the last row, are never
    # stored, and only the last program has them). The padding rows of x are masked too (their
    # addresses clamped to stay in bounds): at batch 1, 15 of 16 rows, and each would re-read the
    # real row, as many bytes from L2 per step as the weight tile itself.
    row_ok = rows < n_rows
    x_rows = X + tl.minimum(rows, n_rows - 1).to(tl.int64)[:, None] * stride_x
    w_rows = W + tl.minimum(cols, n_out - 1).to(tl.int64)[:, None] * stride_w

    if NORM != 0:
        # rstd = 1 / sqrt(mean(x^2) + eps) of each real row, as kernels/rms_norm.py computes it,
        # before the weight streams. Row by row in NORM_BLOCK-wide vectors: at batch 1 that is
        # K / NORM_BLOCK loads (4 at K = 4096), where (BLOCK_M, BLOCK_K) tiles of the padded
        # rows took K / BLOCK_K dependent trips to L2 before the first weight byte moved.
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)  # (padding rows: 0, never stored)
        offs_c = tl.arange(0, NORM_BLOCK)
        row0 = tl.program_id(1) * BLOCK_M
        for r in range(0, tl.minimum(BLOCK_M, n_rows - row0)):
            x_row = X + (row0 + r).to(tl.int64) * stride_x
            sum_sq = tl.zeros([NORM_BLOCK], dtype=tl.float32)
            for k0 in range(0, n_in, NORM_BLOCK):
                x = tl.load(x_row + k0 + offs_c, mask=k0 + offs_c < n_in, other=0.0).to(tl.float32)
                sum_sq += x * x
            row_rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(sum_sq, axis=0) / n_in + eps))
            rstd = tl.where(tl.arange(0, BLOCK_M) == r, row_rstd, rstd)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if ACTIVATION != 0:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < n_in
        h = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM != 0:
            w_n = tl.load(NORM_W + k, mask=k_ok, other=0.0).to(tl.float32)
            xn = h.to(tl.float32) * rstd[:, None]
            if NORM == 1:  # HF's Llama rounds the normed row, then multiplies by the weight
                h = (xn.to(h.dtype).to(tl.float32) * w_n[None, :]).to(h.dtype)
            elif NORM == 2:  # Gemma: (1 + w), rounded once
                h = (xn * (1.0 + w_n[None, :])).to(h.dtype)
            else:  # OLMo 2/3: w, rounded once
                h = (xn * w_n[None, :]).to(h.dtype)
        w = tl.load(w_rows + k[None, :], mask=k_ok[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        if ACTIVATION != 0:  # the up rows sit n_out rows below the gate rows
            w_up = tl.load(w_rows + n_out.to(tl.int64) * stride_w + k[None, :], mask=k_ok[None, :], other=0.0)
            acc_up = tl.dot(h, tl.trans(w_up), acc_up, input_precision=PRECISION)

    col_ok = cols < n_out
    if HAS_BIAS:  # added in fp32 before the one rounding, as cuBLAS's bias epilogue does
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(Y.dtype.element_ty)
    if ACTIVATION != 0:
        if HAS_BIAS:
            acc_up += tl.load(BIAS + n_out + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # act(g) * u from the rounded g and u, in fp32, rounded once (kernels/swiglu.py)
        g = y.to(tl.float32)
        s, _ = _gate(g, ACTIVATION == 2)
        y = (g * s * acc_up.to(Y.dtype.element_ty).to(tl.float32)).to(Y.dtype.element_ty)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_RESIDUAL:  # HF adds in the model's dtype: one rounding of the sum
        r = tl.load(RES + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        y = (r.to(tl.float32) + y.to(tl.float32)).to(Y.dtype.element_ty)
    tl.store(Y + rows64 * stride_y + cols[None, :], y, mask=mask)


def strides_aligned(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a launch on x (M, K) and weight runs the ALIGNED build: K and both row strides
    multiples of 16 elements (every real model's hidden and intermediate sizes)."""
    return all(n % 16 == 0 for n in (x.shape[1], x.stride(0), weight.stride(0)))


def decode_linear_forward(x, weight, bias, norm_weight, residual, out, *, eps: float, norm: int, activation: int,
                          block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int):
    """x (M, K), weight (N or 2N, K), out and residual (M, N), all with unit last stride;
    ``norm``/``activation`` the module constants above. Writes and returns ``out``."""
    n_rows, n_in = x.shape
    n_out = out.shape[1]
    if n_rows == 0 or n_out == 0:
        return out
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(n_rows, block_m))
    with torch.cuda.device_of(x):
        decode_linear_kernel[grid](
            x, norm_weight if norm_weight is not None else x, weight, bias if bias is not None else x,
            residual if residual is not None else out, out,
            n_rows, n_out, n_in,
            x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            float(eps),
            NORM=norm, ACTIVATION=activation, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            ALIGNED=strides_aligned(x, weight), PRECISION="ieee", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            NORM_BLOCK=NORM_BLOCK,
            num_warps=num_warps, num_stages=num_stages,
        )
    return out
