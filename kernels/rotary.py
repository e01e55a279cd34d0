"""Rotary position embedding (HF ``apply_rotary_pos_emb``) on q and k in one launch.

HF splits the head dim D into halves x = (x1, x2) and computes, with cos = (c1, c2) and
sin = (s1, s2) split the same way (normally c1 == c2, s1 == s2: HF concatenates the freqs twice)::

    out1 = x1 * c1 - x2 * s1
    out2 = x2 * c2 + x1 * s2

That is a rotation of each pair (x1[i], x2[i]) by theta_i. GLM, GLM-4, Helium and Ernie 4.5 pair
adjacent dims instead (``INTERLEAVED``): x1 = x[0::2], x2 = x[1::2], each pair rotated by the angle
of cos/sin's first half (HF repeat_interleaves cos[..., :R/2]), so c2 = c1 and s2 = s1 there; the
rotated pairs go back to the same dims. Its transpose, the backward, is the
rotation by -theta: dx1 = g1 * c1 + g2 * s2, dx2 = g2 * c2 - g1 * s1, i.e. the same formula with
(s1, s2) replaced by (-s2, -s1). So one kernel does both directions (BACKWARD), and the backward
saves nothing but cos/sin.

A program owns BLOCK_T positions of one batch row and a run of heads: it loads cos/sin once (or
computes them from position ids and inverse frequencies, FROM_POSITIONS) and applies them to
every head of q and then of k. All tensors are strided views: q (B, Hq, T, D) transposed from
(B, T, Hq, D) needs no copy. Batch and position offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_head(X, OUT, x_base, out_base, t64, d, mask, half, stride_xt, stride_ot, c1, c2, s1, s2,
                 INTERLEAVED: tl.constexpr):
    """Rotates one head's (BLOCK_T, D) slice; x and out may be the same memory (in place):
    each element is read before the same program writes it."""
    if INTERLEAVED:  # (dims 2i and 2i + 1: two loads with a stride of 2 that share their cache lines)
        first = 2 * d
        second = first + 1
    else:
        first = d
        second = d + half
    x_ptr = X + x_base + t64[:, None] * stride_xt
    x1 = tl.load(x_ptr + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + second[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ptr = OUT + out_base + t64[:, None] * stride_ot
    tl.store(out_ptr + first[None, :], (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out_ptr + second[None, :], (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


# Integers Triton must not specialise at launch (it would compile a variant per value class:
# == 1, a multiple of 16, other): lengths, head counts and the position-id strides (contiguous ids
# pass stride 1; batch strides follow T). Their hints buy nothing, and unspecialised, a launch
# compiles what the build report compiled. The q/k/out and cos/sin strides and ``half`` keep their
# hints: a multiple of 16 is what lets the loads and stores be vectorised.
LAUNCH_VARYING_INTS = ["seq_len", "n_q_heads", "n_k_heads", "heads_per_program", "stride_pb", "stride_pt"]


@triton.jit(do_not_specialize=LAUNCH_VARYING_INTS)
def rotary_kernel(
    Q, K, Q_OUT, K_OUT, COS, SIN, POS, INV_FREQ,
    seq_len, n_q_heads, n_k_heads, heads_per_program, half,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot,
    stride_kob, stride_koh, stride_kot,
    stride_cb, stride_ct, stride_sb, stride_st,
    stride_pb, stride_pt,
    FROM_POSITIONS: tl.constexpr,
    BACKWARD: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < seq_len
    mask = t_ok[:, None] & (d < half)[None, :]
    t64 = t.to(tl.int64)

    if FROM_POSITIONS:
        # HF: freqs = position.float() * inv_freq in fp32, then cos/sin in fp32 (tl.cos/tl.sin
        # compile to libdevice's accurate cosf/sinf, not the approximate instructions).
        pos = tl.load(POS + b * stride_pb + t64 * stride_pt, mask=t_ok, other=0).to(tl.float32)
        inv_freq = tl.load(INV_FREQ + d, mask=d < half, other=0.0)
        freqs = pos[:, None] * inv_freq[None, :]
        c1 = tl.cos(freqs)
        s1 = tl.sin(freqs)
        c2 = c1
        s2 = s1
    else:
        cs = COS + b * stride_cb + t64[:, None] * stride_ct + d[None, :]
        sn = SIN + b * stride_sb + t64[:, None] * stride_st + d[None, :]
        c1 = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sn, mask=mask, other=0.0).to(tl.float32)
        if INTERLEAVED:  # HF reads only the first half of the table
            c2 = c1
            s2 = s1
        else:
            c2 = tl.load(cs + half, mask=mask, other=0.0).to(tl.float32)
            s2 = tl.load(sn + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # rotate by -theta: (s1, s2) -> (-s2, -s1)
        s1, s2 = -s2, -s1

    # This program's heads: a run of [0, Hq + Hk), q heads first, then k heads.
    h_start = tl.program_id(2) * heads_per_program
    h_end = tl.minimum(h_start + heads_per_program, n_q_heads + n_k_heads)
    for h in range(h_start, tl.minimum(h_end, n_q_heads)):
        h64 = tl.cast(h, tl.int64)
        _rotate_head(Q, Q_OUT, b * stride_qb + h64 * stride_qh, b * stride_qob + h64 * stride_qoh,
                     t64, d, mask, half, stride_qt, stride_qot, c1, c2, s1, s2, INTERLEAVED)
    for h in range(tl.maximum(h_start, n_q_heads), h_end):
        h64 = tl.cast(h - n_q_heads, tl.int64)
        _rotate_head(K, K_OUT, b * stride_kb + h64 * stride_kh, b * stride_kob + h64 * stride_koh,
                     t64, d, mask, half, stride_kt, stride_kot, c1, c2, s1, s2, INTERLEAVED)


def rotary(q, k, q_out, k_out, cos=None, sin=None, position_ids=None, inv_freq=None, *,
           backward, block_t, heads_per_program, num_warps, interleaved=False):
    """Writes the rotated q, k into q_out, k_out (which may be q, k: in place).

    q (B, Hq, T, D), k (B, Hk, T, D) and the outputs: any strides, unit stride in D. Either
    cos/sin (B or 1, T, D) (unit stride in D), or position_ids (B or 1, T) with inv_freq (D/2,)
    fp32. ``backward`` rotates by -theta; ``interleaved`` pairs dims (2i, 2i + 1).
    """
    batch, n_q_heads, seq_len, head_dim = q.shape
    n_k_heads = k.shape[1]
    if q.numel() == 0 and k.numel() == 0:
        return q_out, k_out
    from_positions = position_ids is not None
    if from_positions:
        COS = SIN = inv_freq  # unused pointers: something typed and valid
        POS, INV = position_ids, inv_freq
        stride_cb = stride_ct = stride_sb = stride_st = 0
        stride_pb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        stride_pt = position_ids.stride(1)
    else:
        COS, SIN, POS, INV = cos, sin, cos, cos
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_ct = cos.stride(1)
        stride_sb = sin.stride(0) if sin.shape[0] > 1 else 0
        stride_st = sin.stride(1)
        stride_pb = stride_pt = 0
    n_heads = n_q_heads + n_k_heads
    grid = (triton.cdiv(seq_len, block_t), batch, triton.cdiv(n_heads, heads_per_program))
    with torch.cuda.device_of(q):  # Triton launches on the current device
        rotary_kernel[grid](
            q, k, q_out, k_out, COS, SIN, POS, INV,
            seq_len, n_q_heads, n_k_heads, heads_per_program, head_dim // 2,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            stride_cb, stride_ct, stride_sb, stride_st,
            stride_pb, stride_pt,
            FROM_POSITIONS=from_positions,
            BACKWARD=backward,
            INTERLEAVED=interleaved,
            BLOCK_T=block_t,
            BLOCK_D=max(16, triton.next_power_of_2(head_dim // 2)),
            num_warps=num_warps,
        )
    return q_out, k_out
