"""Rotary embedding on the new q/k, fused with writing k/v into a static KV cache: one launch.

A decode step otherwise costs three kernels per layer before attention (rotate q, rotate k,
copy k and v into the cache at each sequence's position), each re-reading what the previous one
wrote. Here one program owns one new token (b, t) of one sequence: it reads that token's q, k and
v heads once, rotates q and k, writes rotated q to a fresh tensor and rotated k and raw v into the
cache slot ``cache_seqlens[b] + t``.

Rotary (HF convention, the head dim is two halves x1 | x2, ``rotate_half(x) = (-x2, x1)``):

    out[:half] = x1 * cos[:half] - x2 * sin[:half]
    out[half:] = x2 * cos[half:] + x1 * sin[half:]

computed in fp32 and rounded once. cos/sin come either as a table (P, D) indexed by position
(``position = positions[b] + t``, or the cache slot when no positions are given: a cache without
padding has slot == position), or as HF's per-token (B, T, D) tensors. Positions and slots are
read on the device (no host sync, CUDA-graph safe). A slot past the cache end is not written and
a position past the table is clamped to its last row: never an out-of-bounds access; callers
size the cache (fastllama.generate checks capacity before it starts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary_cache_append_forward", "rotary_cache_kernel"]


@triton.jit
def _rotate_heads(X, OUT, x_base, out_base, stride_xh, stride_oh, n_heads, n_write, c1, c2, s1, s2, offs_d, d_ok,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, ROTATE: tl.constexpr):
    """Rotates (or, ROTATE=False, copies) n_heads rows of head_dim = 2 * HALF and writes the
    first ``n_write`` of them (0 for a cache slot past the end, else n_heads)."""
    for h0 in range(0, n_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        ok = (heads[:, None] < n_heads) & d_ok[None, :]
        write = (heads[:, None] < n_write) & d_ok[None, :]
        src = x_base + heads[:, None].to(tl.int64) * stride_xh + offs_d[None, :]
        dst = out_base + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
        x1 = tl.load(src, mask=ok, other=0.0)
        x2 = tl.load(src + HALF, mask=ok, other=0.0)
        if ROTATE:
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            x1 = a * c1[None, :] - b * s1[None, :]
            x2 = b * c2[None, :] + a * s2[None, :]
        tl.store(dst, x1.to(OUT.dtype.element_ty), mask=write)
        tl.store(dst + HALF, x2.to(OUT.dtype.element_ty), mask=write)


@triton.jit
def rotary_cache_kernel(
    Q, K, V, COS, SIN, QO, KC, VC, SEQLENS, POS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kcb, stride_kch, stride_kct,
    stride_vcb, stride_vch, stride_vct,
    stride_cb, stride_ct, stride_sb, stride_st,
    n_q_heads, n_kv_heads, max_len, n_pos,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    TABLE: tl.constexpr, HAS_POS: tl.constexpr,
):
    """Grid (B, T): one new token of one sequence, all its heads.

    TABLE: cos/sin are (P, D) tables read at row ``position``; else (B, T, D) read at (b, t).
    HAS_POS: positions come from POS (B,) + t, else they equal the cache slot.
    """
    b = tl.program_id(0)
    t = tl.program_id(1)
    slot = tl.load(SEQLENS + b) + t
    if TABLE:
        if HAS_POS:
            pos = tl.load(POS + b) + t
        else:
            pos = slot
        row = tl.minimum(tl.maximum(pos, 0), n_pos - 1).to(tl.int64)
        c_base = COS + row * stride_ct
        s_base = SIN + row * stride_st
    else:
        c_base = COS + b.to(tl.int64) * stride_cb + t.to(tl.int64) * stride_ct
        s_base = SIN + b.to(tl.int64) * stride_sb + t.to(tl.int64) * stride_st
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    c1 = tl.load(c_base + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(c_base + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(s_base + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(s_base + HALF + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    n_kv_write = tl.where((slot >= 0) & (slot < max_len), n_kv_heads, 0)  # nothing past the cache end
    slot64 = tl.minimum(tl.maximum(slot, 0), max_len - 1).to(tl.int64)  # address stays in bounds
    _rotate_heads(Q, QO, Q + b64 * stride_qb + t64 * stride_qt, QO + b64 * stride_ob + t64 * stride_ot,
                  stride_qh, stride_oh, n_q_heads, n_q_heads, c1, c2, s1, s2, offs_d, d_ok, HALF, BLOCK_H, True)
    _rotate_heads(K, KC, K + b64 * stride_kb + t64 * stride_kt, KC + b64 * stride_kcb + slot64 * stride_kct,
                  stride_kh, stride_kch, n_kv_heads, n_kv_write, c1, c2, s1, s2, offs_d, d_ok, HALF, BLOCK_H, True)
    _rotate_heads(V, VC, V + b64 * stride_vb + t64 * stride_vt, VC + b64 * stride_vcb + slot64 * stride_vct,
                  stride_vh, stride_vch, n_kv_heads, n_kv_write, c1, c2, s1, s2, offs_d, d_ok, HALF, BLOCK_H, False)


def block_h(n_heads: int, half_pad: int) -> int:
    """Heads per tile: all of them up to ~4K elements per half-tile (registers), at least 1."""
    return max(1, min(triton.next_power_of_2(n_heads), 4096 // half_pad))


def rotary_cache_append_forward(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions=None,
                                num_warps: int = 4):
    """Rotates q (B, Hq, T, D) and k (B, Hk, T, D), writes rotated k and v into
    k_cache/v_cache (B, Hk, Tmax, D) at slots ``cache_seqlens[b] + t`` (in place); returns
    rotated q (a new tensor, same memory layout as q when q is dense).

    cos/sin: (P, D) tables (row = position) or (B, T, D) per token. ``positions`` (B,) int32:
    the position of each sequence's first new token when it differs from its cache slot (tables
    only).
    """
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    qo = torch.empty_like(q)
    if q.numel() == 0:
        return qo
    half = D // 2
    half_pad = triton.next_power_of_2(half)
    table = cos.dim() == 2
    if table:
        cos_strides = (0, cos.stride(0), 0, sin.stride(0))
    else:
        cos_strides = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
    bh = block_h(max(Hq, Hk), half_pad)
    rotary_cache_kernel[(B, T)](
        q, k, v, cos, sin, qo, k_cache, v_cache, cache_seqlens,
        positions if positions is not None else cache_seqlens,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *qo.stride()[:3],
        *k_cache.stride()[:3], *v_cache.stride()[:3], *cos_strides,
        Hq, Hk, k_cache.shape[2], cos.shape[0] if table else 1,
        HALF=half, HALF_PAD=half_pad, BLOCK_H=bh, TABLE=table, HAS_POS=positions is not None,
        num_warps=num_warps,
    )
    return qo
