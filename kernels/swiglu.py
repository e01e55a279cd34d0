"""SwiGLU, the Llama MLP activation: out = silu(gate) * up, forward and backward; with ``GELU``,
GeGLU (Gemma's): out = gelu_tanh(gate) * up.

Elementwise over (rows, I) with any row strides and unit column stride, so the two halves of a
merged gate_up projection (..., 2I) are just two strided views of one buffer: no split copy,
and the backward can write both gradients into one (..., 2I) buffer the same way.
Math in fp32, one rounding to the output dtype. Row offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(pid_m, pid_n, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return rows.to(tl.int64)[:, None], cols[None, :], mask


# The tanh approximation of GELU, written with a sigmoid: 0.5 * (1 + tanh(z)) = sigmoid(2 z), so
#     gelu_tanh(g) = 0.5 g (1 + tanh(k (g + c g^3))) = g * sigmoid(2 k (g + c g^3)),
# k = sqrt(2 / pi), c = 0.044715 (what torch's gelu(approximate="tanh") computes).
@triton.jit
def _gate(g, GELU: tl.constexpr):
    """(s, d act / dg) in fp32, where act(g) = g * s: s = sigmoid(g) for SiLU."""
    if GELU:
        k2 = 1.5957691216057308  # 2 k
        s = tl.sigmoid(k2 * (g + 0.044715 * g * g * g))
        # d/dg [g s(z)] = s + g s (1 - s) dz/dg,  z = 2k (g + c g^3),  dz/dg = 2k (1 + 3c g^2)
        d_act = s + g * s * (1.0 - s) * (k2 * (1.0 + 3.0 * 0.044715 * g * g))
    else:
        s = tl.sigmoid(g)
        d_act = s * (1.0 + g * (1.0 - s))  # d silu / dg
    return s, d_act


@triton.jit(do_not_specialize=["n_rows"])  # see ops/swiglu._build_configs
def swiglu_fwd_kernel(
    G, U, OUT,
    n_rows, n_cols,
    stride_g, stride_u, stride_o,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GELU: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s, _ = _gate(g, GELU)
    out = g * s * u
    tl.store(OUT + rows * stride_o + cols, out.to(OUT.dtype.element_ty), mask=mask)


# Backward, with sig = sigmoid(g) and silu(g) = g * sig recomputed from the saved inputs:
#     d_up   = d_out * silu(g)
#     d_gate = d_out * up * sig * (1 + g * (1 - sig))        (d silu / dg; GeGLU: d gelu_tanh / dg)
# DG/DU may alias G/U (in-place gradients): each element is read before the same program
# writes it, and no other program touches it.
@triton.jit(do_not_specialize=["n_rows"])  # see ops/swiglu._build_configs
def swiglu_bwd_kernel(
    DOUT, G, U, DG, DU,
    n_rows, n_cols,
    stride_do, stride_g, stride_u, stride_dg, stride_du,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GELU: tl.constexpr,
):
    rows, cols, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, n_cols, BLOCK_M, BLOCK_N)
    d_out = tl.load(DOUT + rows * stride_do + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s, d_act = _gate(g, GELU)
    d_up = d_out * g * s
    d_gate = d_out * u * d_act
    tl.store(DG + rows * stride_dg + cols, d_gate.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows * stride_du + cols, d_up.to(DU.dtype.element_ty), mask=mask)


def swiglu_forward(gate, up, out, *, block_m, block_n, num_warps, gelu=False):
    """gate, up, out: (M, I) with unit column stride; writes silu(gate) * up (``gelu``:
    gelu_tanh(gate) * up) into out."""
    n_rows, n_cols = gate.shape
    if gate.numel() == 0:
        return out
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with torch.cuda.device_of(gate):  # Triton launches on the current device
        swiglu_fwd_kernel[grid](
            gate, up, out, n_rows, n_cols, gate.stride(0), up.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, GELU=gelu, num_warps=num_warps,
        )
    return out


def swiglu_backward(d_out, gate, up, d_gate, d_up, *, block_m, block_n, num_warps, gelu=False):
    """All (M, I) with unit column stride; d_gate/d_up may be gate/up (in place)."""
    n_rows, n_cols = gate.shape
    if gate.numel() == 0:
        return d_gate, d_up
    grid = (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n))
    with torch.cuda.device_of(gate):
        swiglu_bwd_kernel[grid](
            d_out, gate, up, d_gate, d_up, n_rows, n_cols,
            d_out.stride(0), gate.stride(0), up.stride(0), d_gate.stride(0), d_up.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, GELU=gelu, num_warps=num_warps,
        )
    return d_gate, d_up
