"""Rotary embedding on the new q/k, fused with writing k/v into a static KV cache: one launch.

A decode step otherwise costs three kernels per layer before attention (rotate q, rotate k,
copy k and v into the cache at each sequence's position), each re-reading what the previous one
wrote. Here each new token (b, t) of a sequence has its q, k and v heads read once: q and k
rotated, rotated q written to a fresh tensor, rotated k and raw v into the cache slot
``cache_seqlens[b] + t``. A program owns one block of (token, head) rows of q, of k or of v (of
one token on a GPU, of a run of them under the interpreter), so a one-token decode step runs a
few programs side by side, not one walking every head in turn.

Rotary (HF convention, the head dim is two halves x1 | x2, ``rotate_half(x) = (-x2, x1)``):

    out[:half] = x1 * cos[:half] - x2 * sin[:half]
    out[half:] = x2 * cos[half:] + x1 * sin[half:]

computed in fp32 and rounded once. ``INTERLEAVED``: GLM's pairing instead, adjacent dims
(x[2i], x[2i + 1]) rotated by cos[i], sin[i] (the tables' first half; see kernels/rotary.py).
Partial rotary (cos/sin of R < D dims, e.g. Phi-4-mini's 96
of 128): the first R dims are the two halves above (``HALF = R / 2``), the last D - R dims are
copied as they are (``TAIL_HALF = (D - R) / 2``, a second pass over each row's tail; v is
always all copy). cos/sin come either as a table (P, R) indexed by position
(``position = positions[b] + t``, or the cache slot when no positions are given: a cache without
padding has slot == position), or as HF's per-token (B, T, R) tensors. Positions and slots are
read on the device (no host sync, CUDA-graph safe). A slot past the cache end is not written and
a position past the table is clamped to its last row: never an out-of-bounds access; callers
size the cache (fastllama.generate checks capacity before it starts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rotary_cache_append_forward", "rotary_cache_kernel", "rotary_cache_grid", "block_r", "tail_pad"]


@triton.jit
def _rotate_rows(X, OUT, x_base, out_base, stride_xh, stride_xt, stride_oh, stride_ot, n_heads, t0, r0, n_tok, start,
                 COS, SIN, cos_base, sin_base, stride_ct, stride_st, POS, b, max_len, n_pos, q_len,
                 offs_d, d_ok, HALF: tl.constexpr, BLOCK_R: tl.constexpr, ROTATE: tl.constexpr,
                 TO_CACHE: tl.constexpr, TABLE: tl.constexpr, HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotates (ROTATE=False: copies) the (token, head) rows r0 .. r0 + BLOCK_R - 1 of the n_tok
    tokens starting at t0, row r = t * n_heads + h. TO_CACHE: the destination row is the cache
    slot ``start + t`` (skipped past the cache end), else the token row t. The pairs (x1, x2)
    are dims (i, i + HALF), or (2i, 2i + 1) with INTERLEAVED (a copy moves the same dims either way)."""
    r = r0 + tl.arange(0, BLOCK_R)
    t = t0 + r // n_heads
    h = r % n_heads
    ok = (r < n_tok * n_heads) & (t < q_len)
    # the rows first: their loads do not wait for ``start`` (the cos/sin rows below may)
    if INTERLEAVED:
        first = 2 * offs_d
        second = first + 1
    else:
        first = offs_d
        second = offs_d + HALF
    src = x_base + h[:, None].to(tl.int64) * stride_xh + t[:, None].to(tl.int64) * stride_xt
    x1 = tl.load(src + first[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    x2 = tl.load(src + second[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
    if ROTATE:
        # cos/sin row of each token: the table row of its position, or HF's (b, t) row.
        if TABLE:
            if HAS_POS:
                pos = tl.load(POS + b) + t
            else:
                pos = start + t
            c_row = tl.minimum(tl.maximum(pos, 0), n_pos - 1).to(tl.int64)
        else:
            c_row = t.to(tl.int64)
        c_ptrs = cos_base + c_row[:, None] * stride_ct + offs_d[None, :]
        s_ptrs = sin_base + c_row[:, None] * stride_st + offs_d[None, :]
        cs_ok = ok[:, None] & d_ok[None, :]  # rows past the last token have no (b, t) row
        c1 = tl.load(c_ptrs, mask=cs_ok, other=0.0).to(tl.float32)
        s1 = tl.load(s_ptrs, mask=cs_ok, other=0.0).to(tl.float32)
        if INTERLEAVED:  # HF reads only the first half of the table
            c2 = c1
            s2 = s1
        else:
            c2 = tl.load(c_ptrs + HALF, mask=cs_ok, other=0.0).to(tl.float32)
            s2 = tl.load(s_ptrs + HALF, mask=cs_ok, other=0.0).to(tl.float32)
        a = x1.to(tl.float32)
        bb = x2.to(tl.float32)
        x1 = a * c1 - bb * s1
        x2 = bb * c2 + a * s2
    if TO_CACHE:
        dst_row = start + t
        ok = ok & (dst_row >= 0) & (dst_row < max_len)  # nothing past the cache end
        dst_row = tl.minimum(tl.maximum(dst_row, 0), max_len - 1)  # the address stays in bounds
    else:
        dst_row = t
    dst = out_base + h[:, None].to(tl.int64) * stride_oh + dst_row[:, None].to(tl.int64) * stride_ot
    tl.store(dst + first[None, :], x1.to(OUT.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    tl.store(dst + second[None, :], x2.to(OUT.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])


@triton.jit
def _rows_with_tail(X, OUT, x_base, out_base, stride_xh, stride_xt, stride_oh, stride_ot, n_heads, t0, r0, n_tok,
                    start, COS, SIN, cos_base, sin_base, stride_ct, stride_st, POS, b, max_len, n_pos, q_len,
                    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr, ROTATE: tl.constexpr,
                    TO_CACHE: tl.constexpr, TABLE: tl.constexpr, HAS_POS: tl.constexpr, TAIL_HALF: tl.constexpr,
                    TAIL_PAD: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One block of rows: the rotated (or copied) first 2 HALF dims, then, with partial rotary,
    the tail dims [2 HALF, 2 HALF + 2 TAIL_HALF) copied (as two halves: the same code)."""
    offs_d = tl.arange(0, HALF_PAD)
    _rotate_rows(X, OUT, x_base, out_base, stride_xh, stride_xt, stride_oh, stride_ot, n_heads, t0, r0, n_tok,
                 start, COS, SIN, cos_base, sin_base, stride_ct, stride_st, POS, b, max_len, n_pos, q_len,
                 offs_d, offs_d < HALF, HALF, BLOCK_R, ROTATE, TO_CACHE, TABLE, HAS_POS, INTERLEAVED)
    if TAIL_HALF > 0:
        offs_t = tl.arange(0, TAIL_PAD)
        _rotate_rows(X, OUT, x_base + 2 * HALF, out_base + 2 * HALF, stride_xh, stride_xt, stride_oh, stride_ot,
                     n_heads, t0, r0, n_tok, start, COS, SIN, cos_base, sin_base, stride_ct, stride_st, POS, b,
                     max_len, n_pos, q_len, offs_t, offs_t < TAIL_HALF, TAIL_HALF, BLOCK_R, False, TO_CACHE,
                     TABLE, HAS_POS, False)


# Lengths and head counts stay unspecialised at launch (see decode_attention.SPLIT_UNSPECIALISED);
# q_len keeps its == 1 specialisation, the one-token decode step's own build.
@triton.jit(do_not_specialize=["n_q_heads", "n_kv_heads", "max_len", "n_pos", "tokens_per_program"],
            do_not_specialize_on_alignment=["q_len"])
def rotary_cache_kernel(
    Q, K, V, COS, SIN, QO, KC, VC, SEQLENS, POS,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_kcb, stride_kch, stride_kct,
    stride_vcb, stride_vch, stride_vct,
    stride_cb, stride_ct, stride_sb, stride_st,
    n_q_heads, n_kv_heads, q_len, max_len, n_pos, tokens_per_program,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
    TABLE: tl.constexpr, HAS_POS: tl.constexpr, TAIL_HALF: tl.constexpr, TAIL_PAD: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Grid (B, cdiv(T, tokens_per_program), row blocks): one block of BLOCK_R (token, head) rows
    of q, of k or of v (``rotary_cache_grid``), of a run of new tokens of one sequence.

    One program per block, not one looping over q, k and v: a decode step at batch 1 is one token,
    and its single program walked the blocks one after another, each a round trip to memory
    (length, cos/sin rows, the rows, the stores): 4-6 programs in parallel wait for two (the
    length, then the cos/sin rows at the position it gives).

    TABLE: cos/sin are (P, R) tables read at row ``position``; else (B, T, R) read at (b, t).
    HAS_POS: positions come from POS (B,) + t, else they equal the cache slot.
    TAIL_HALF > 0: partial rotary; dims [2 HALF, 2 HALF + 2 TAIL_HALF) of q and k are copied.
    """
    b = tl.program_id(0)
    t0 = tl.program_id(1) * tokens_per_program
    blk = tl.program_id(2)
    q_blocks = tl.cdiv(tokens_per_program * n_q_heads, BLOCK_R)
    kv_blocks = tl.cdiv(tokens_per_program * n_kv_heads, BLOCK_R)
    b64 = b.to(tl.int64)
    start = tl.load(SEQLENS + b)  # the cache slot of the run's first token
    cos_base = COS + b64 * stride_cb  # stride_cb = 0 for tables
    sin_base = SIN + b64 * stride_sb
    if blk < q_blocks:  # (a uniform branch: the whole program takes one side)
        _rows_with_tail(Q, QO, Q + b64 * stride_qb, QO + b64 * stride_ob, stride_qh, stride_qt, stride_oh, stride_ot,
                        n_q_heads, t0, blk * BLOCK_R, tokens_per_program, start, COS, SIN, cos_base, sin_base,
                        stride_ct, stride_st, POS, b, max_len, n_pos, q_len, HALF, HALF_PAD, BLOCK_R, True, False,
                        TABLE, HAS_POS, TAIL_HALF, TAIL_PAD, INTERLEAVED)
    elif blk < q_blocks + kv_blocks:
        _rows_with_tail(K, KC, K + b64 * stride_kb, KC + b64 * stride_kcb, stride_kh, stride_kt, stride_kch,
                        stride_kct, n_kv_heads, t0, (blk - q_blocks) * BLOCK_R, tokens_per_program, start, COS, SIN,
                        cos_base, sin_base, stride_ct, stride_st, POS, b, max_len, n_pos, q_len, HALF, HALF_PAD,
                        BLOCK_R, True, True, TABLE, HAS_POS, TAIL_HALF, TAIL_PAD, INTERLEAVED)
    else:  # v: copied into its cache, never rotated
        _rows_with_tail(V, VC, V + b64 * stride_vb, VC + b64 * stride_vcb, stride_vh, stride_vt, stride_vch,
                        stride_vct, n_kv_heads, t0, (blk - q_blocks - kv_blocks) * BLOCK_R, tokens_per_program,
                        start, COS, SIN, cos_base, sin_base, stride_ct, stride_st, POS, b, max_len, n_pos, q_len,
                        HALF, HALF_PAD, BLOCK_R, False, True, TABLE, HAS_POS, TAIL_HALF, TAIL_PAD, False)


def rotary_cache_grid(batch: int, q_len: int, n_q_heads: int, n_kv_heads: int, tokens_per_program: int,
                      rows: int) -> tuple[int, int, int]:
    """The launch grid: (sequence, run of tokens, row block), the row blocks of q, then k, then v.
    (The third axis, like the second, may not pass 65535: at 1-2 tokens per run it holds a few
    dozen blocks; it would take prompts of tens of millions of tokens.)"""
    per_run = triton.cdiv(tokens_per_program * n_q_heads, rows) + 2 * triton.cdiv(tokens_per_program * n_kv_heads, rows)
    return batch, triton.cdiv(q_len, tokens_per_program), per_run


def block_r(half_pad: int) -> int:
    """(token, head) rows per step: 512 elements per half-tile (8 heads of D = 128; 1K-element
    tiles spilled 8-16 bytes on sm_80 at D = 80/96/256); a function of the head dim only, so the
    compiled variants are few."""
    return max(1, min(64, 512 // half_pad))


def tail_pad(tail_half: int) -> int:
    """The tail's tile width: a power of two (1 when there is no tail: full rotary)."""
    return triton.next_power_of_2(max(tail_half, 1))


def rotary_cache_append_forward(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions=None,
                                tokens_per_program: int = 1, rows: int | None = None, num_warps: int = 4,
                                interleaved: bool = False):
    """Rotates q (B, Hq, T, D) and k (B, Hk, T, D), writes rotated k and v into
    k_cache/v_cache (B, Hk, Tmax, D) at slots ``cache_seqlens[b] + t`` (in place); returns
    rotated q (a new tensor, same memory layout as q when q is dense).

    cos/sin: (P, R) tables (row = position) or (B, T, R) per token, R = D or an even R < D
    (partial rotary: the last D - R dims are copied). ``positions`` (B,) int32:
    the position of each sequence's first new token when it differs from its cache slot (tables
    only). ``tokens_per_program`` new tokens per program (1 on a GPU; more under the interpreter,
    where a program is a Python-level step); ``rows`` overrides :func:`block_r`. ``interleaved``:
    adjacent pairs rotate (GLM's rotary).
    """
    B, Hq, T, D = q.shape
    Hk = k.shape[1]
    qo = torch.empty_like(q)
    if q.numel() == 0:
        return qo
    half = cos.shape[-1] // 2  # R / 2: D / 2 unless partial rotary
    half_pad = triton.next_power_of_2(half)
    tail_half = D // 2 - half
    table = cos.dim() == 2
    if table:
        cos_strides = (0, cos.stride(0), 0, sin.stride(0))
    else:
        cos_strides = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1))
    # the token axis is the grid's second, which CUDA caps at 65535 programs: a longer prompt
    # gives each program more tokens
    tokens_per_program = max(tokens_per_program, triton.cdiv(T, 65535))
    rows = rows or block_r(half_pad)
    with torch.cuda.device_of(q):  # Triton launches on the current device
        rotary_cache_kernel[rotary_cache_grid(B, T, Hq, Hk, tokens_per_program, rows)](
            q, k, v, cos, sin, qo, k_cache, v_cache, cache_seqlens,
            positions if positions is not None else cache_seqlens,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *qo.stride()[:3],
            *k_cache.stride()[:3], *v_cache.stride()[:3], *cos_strides,
            Hq, Hk, T, k_cache.shape[2], cos.shape[0] if table else T, tokens_per_program,
            HALF=half, HALF_PAD=half_pad, BLOCK_R=rows, TABLE=table,
            HAS_POS=positions is not None, TAIL_HALF=tail_half, TAIL_PAD=tail_pad(tail_half), INTERLEAVED=interleaved,
            num_warps=num_warps,
        )
    return qo
