"""Flash attention forward: softmax(Q K^T * scale + mask) V without materialising the scores
(optionally soft-capped first: cap * tanh(Q K^T * scale / cap), Gemma 2's).

Layout is SDPA's: q (B, Hq, Tq, D), k/v (B, Hk, Tk, D), any strides with a unit last stride
(the transposed views of a (B, T, H, D) projection work as they are). Query head h reads key/value
head h // (Hq // Hk): GQA/MQA needs no repeat_kv copy.

Masks, in one form. Query row i of a sequence sits at absolute position p = i + Tk - Tq (bottom-
right alignment: the queries are the LAST Tq positions, as in chunked prefill against a KV cache;
SDPA's ``is_causal`` aligns top-left instead, the two agree when Tq == Tk). Row p may read key j
when ``p - before <= j <= p + after`` and ``0 <= j < Tk``. The launcher folds everything into
``before``/``after``: causal is ``after = 0``, a sliding window (left, right) bounds both sides,
"unlimited" is any number larger than the sequences. So one runtime mask covers causal,
non-causal, windows and Tq != Tk, and no mask flavour is a separate compiled kernel.

Work skipping. For a tile of rows, :func:`block_span` splits the key axis into blocks that no row
may read (never visited: causal blocks above the diagonal cost nothing), blocks every row may
read completely (no mask arithmetic), and the few edge blocks on the diagonal / window borders /
sequence end, which pay for the mask. Both kinds run in ONE loop, the mask behind a uniform
branch: separate loops per kind tripled the loop body and its live registers (see the config
table below for what that cost).

Varlen: with ``IS_VARLEN`` the sequences are packed along the T axis of batch 0 and
``cu_seqlens_q/k`` (int32, N + 1) give their starts; each program reads its sequence's bounds,
so padding costs nothing.

Saved for the backward: per query row the max m and log2 of the softmax denominator (base 2),
never the probabilities. The backward kernels live in ``flash_attention_backward.py``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .cross_entropy import _tanh as tanh

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * log2(e)): the scale is folded into one multiply

# Integer arguments whose values vary from launch to launch, compiled as plain i32 at every
# launch, exactly as the build report compiles them. Left to the JIT, a value of 1 becomes a
# constant and a multiple of 16 a divisibility hint, one more compile per class of lengths, and
# a variant the report never saw: fp32 dQ at head dim 128 on sm_90 spilled 440 B with
# seqlen_q % 16 == 0 (136 registers, no spill, without the hint), fp32 dK/dV, dQ and the head
# dim 256 forward spilled with one query or key. (Strides of q/k/v/o/dO/dQ/dK/dV keep theirs:
# the launcher checks they are multiples of 16 and the report compiles that variant.)
LAUNCH_VARYING_INTS = ["stride_lb", "stride_lh", "stride_lp", "group", "seqlen_q", "seqlen_k", "before", "after",
                       "head_group", "Q_BUCKET", "K_BUCKET"]

__all__ = [
    "flash_attention_forward", "mask_bounds", "strides_aligned", "fwd_configs", "dkdv_configs", "dq_configs",
    "padded_head_dim", "seqlen_bucket", "INTERPRETER_CONFIG", "capped_scores", "softcap_config",
    "softcap_tile", "grouped_heads", "checked_head_group",
]


# ----------------------------------------------------------------------------------------------
# Shared device helpers (also used by the backward kernels)
# ----------------------------------------------------------------------------------------------
@triton.jit
def block_span(x_first, x_last, before, after, n_y, BLOCK_Y: tl.constexpr):
    """Which blocks of the y axis a tile of x positions [x_first, x_last] must visit.

    Each x sees y in [x - before, x + after] (and 0 <= y < n_y). Returns block-aligned
    (lo, mid_lo, mid_hi, hi): blocks in [lo, mid_lo) and [mid_hi, hi) are partly visible and need
    the mask; blocks in [mid_lo, mid_hi) are fully visible to every x and lie inside [0, n_y), so
    they need neither mask nor bounds checks. Everything outside [lo, hi) is skipped.
    Divisions only ever see non-negative numbers (integer // rounds differently on GPU and in
    the interpreter for negatives).
    """
    lo = tl.maximum(x_first - before, 0)
    hi = tl.minimum(x_last + after + 1, n_y)
    full_lo = tl.maximum(x_last - before, 0)  # every x in the tile sees y >= full_lo ...
    full_hi = tl.maximum(tl.minimum(x_first + after + 1, n_y), 0)  # ... and y < full_hi
    lo = (lo // BLOCK_Y) * BLOCK_Y
    mid_lo = tl.maximum(lo, tl.minimum(tl.cdiv(full_lo, BLOCK_Y) * BLOCK_Y, hi))
    mid_hi = tl.maximum(mid_lo, (full_hi // BLOCK_Y) * BLOCK_Y)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def load_rows(base, offs_row, stride_row, offs_d, n_rows, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    """A (rows, D_PAD) tile of rows [0, n_rows) of ``base`` (n_rows >= 1); padded head-dim columns
    read 0. Rows past n_rows repeat row n_rows - 1 instead of being masked: every caller either
    never stores them or multiplies them by a probability that is exactly 0 (a masked score, or a
    padding row's m = +inf), and an unmasked load needs no per-row predicates across the software
    pipeline (a row mask cost 40-90 registers per thread in the sm_80 tiles)."""
    rows = tl.minimum(offs_row, n_rows - 1)
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if HEAD_DIM == D_PAD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def store_rows(base, tile, offs_row, stride_row, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    """Stores the real rows (< n_rows) and head-dim columns of a tile, cast to the tensor's dtype."""
    ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(offs_row[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def aligned16(stride_b, stride_h, stride_t, ALIGNED: tl.constexpr):
    """Declares a tensor's (batch, head, row) strides multiples of 16 elements when the launcher
    checked they are (every layout HF makes for head dims that are multiples of 16). That lets
    rows load as 16-byte vectors (cp.async into the software pipeline); without it each element
    needs its own address, the 64-bit address tensors stay live across the loop and the dK/dV
    tile spills 650 bytes per thread.

    Written as (s // 16) * 16, not tl.multiple_of(s, 16): Triton 3.9 drops a divisibility hint
    set on a scalar argument (it has no defining op to carry the attribute), while the compiler's
    alignment analysis reads "times 16" directly. The value is unchanged for aligned strides (the
    only case ALIGNED is set), and costs two scalar instructions. The JIT also specialises an
    integer argument that is a multiple of 16 at launch; this makes the kernel not depend on that."""
    if ALIGNED:
        return (stride_b // 16) * 16, (stride_h // 16) * 16, (stride_t // 16) * 16
    return stride_b, stride_h, stride_t


@triton.jit
def sequence_bounds(CU_Q, CU_K, seq, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(batch index, first row of the sequence in T, q length, first key, k length)."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + seq)
        k_start = tl.load(CU_K + seq)
        return seq * 0, q_start, tl.load(CU_Q + seq + 1) - q_start, k_start, tl.load(CU_K + seq + 1) - k_start
    return seq, seq * 0, seqlen_q, seq * 0, seqlen_k


@triton.jit
def ordered_program(head_group, REVERSE: tl.constexpr):
    """This program's (tile, row) in a (tiles, rows) grid, rows being (sequence, head) pairs, so
    that the GPU, which starts programs in grid order (axis 0 fastest), meets them in this order:

        rows in groups of ``head_group``; within a group, tile by tile, each over the group's rows
        (``REVERSE``: last tile first).

    Under a causal mask the tiles of a row differ in length (query block i of the forward visits
    i + 1 key blocks), and the grid should start the longest first and end on short ones, or the
    other SMs wait out the last long one. With ``head_group`` = 1 (a row's tiles one after
    another) each row starts its longest tile first, but the last row's longest tile still starts
    shortly before the end, when little else is left to run beside it (an SM-level simulation at
    B 4, 16 heads, 4k tokens, 128-row tiles: 7% longer than perfectly balanced). A group of rows
    whose programs fill the GPU twice over ends on short tiles only (0.1%), while the programs
    running together still read only the group's rows' keys and values, which stay in L2 (every
    row at once would not: :func:`grouped_heads` sizes the group)."""
    n_tiles = tl.num_programs(0)
    # Programs start in the order of program_id(1) * n_tiles + program_id(0); that product may
    # pass 2**31 (a long varlen pack of many sequences), so the group is found from axis 1 alone
    # and only the place within the group, below head_group * n_tiles (bounded by the launcher),
    # is formed.
    first = (tl.program_id(1) // head_group) * head_group  # the group's first row
    rows = tl.minimum(head_group, tl.num_programs(1) - first)  # (the last group may be short)
    within = (tl.program_id(1) - first) * n_tiles + tl.program_id(0)
    tile = within // rows
    if REVERSE:
        tile = n_tiles - 1 - tile
    return tile, first + (within - (within // rows) * rows)


@triton.jit
def capped_scores(qk, sm_scale, softcap):
    """Soft-capped scores in the log2 domain, and the tanh they came from (for the backward):

        s = cap * tanh(qk * scale / cap)           (Gemma 2's attn_logit_softcapping)
        returns (s * log2(e), tanh(qk * scale / cap));   ds / d(qk * scale) = 1 - tanh^2

    The cap is applied before the mask, as HF applies it: a masked score is -inf after it, not
    -cap. |s| <= cap, so the exponentials never see the huge logits an uncapped row may have.
    """
    th = tanh(qk * (sm_scale / softcap))
    return th * (softcap * 1.4426950408889634), th


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LAUNCH_VARYING_INTS + ["n_heads"])
def _attn_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K,
    sm_scale, softcap,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    stride_lb, stride_lh, stride_lp,
    n_heads, group, seqlen_q, seqlen_k, before, after, head_group,
    Q_BUCKET, K_BUCKET,  # autotune key only (bucketed lengths)
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (sequence, query head); K/V stream through.
    ``SOFTCAP``: the scores are soft-capped first (see :func:`capped_scores`).

    Query blocks run last-first (longest first under a causal mask), over groups of
    ``head_group`` (sequence, head) pairs: see :func:`ordered_program`.
    """
    stride_qb, stride_qh, stride_qt = aligned16(stride_qb, stride_qh, stride_qt, ALIGNED)
    stride_kb, stride_kh, stride_kt = aligned16(stride_kb, stride_kh, stride_kt, ALIGNED)
    stride_vb, stride_vh, stride_vt = aligned16(stride_vb, stride_vh, stride_vt, ALIGNED)
    stride_ob, stride_oh, stride_ot = aligned16(stride_ob, stride_oh, stride_ot, ALIGNED)
    pid_m, row = ordered_program(head_group, True)
    seq = row // n_heads
    h = row % n_heads
    b, q_start, q_len, k_start, k_len = sequence_bounds(CU_Q, CU_K, seq, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:  # varlen: this sequence is shorter than the longest one
        return
    # int64 bases: batch * stride_b + t * stride_t can pass 2**31 for long or wide tensors.
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + (q_start + start_m).to(tl.int64) * stride_qt
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + (q_start + start_m).to(tl.int64) * stride_ot
    hk = (h // group).to(tl.int64)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vt

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = load_rows(q_base, offs_m, stride_qt, offs_d, q_len - start_m, HEAD_DIM, D_PAD)

    q_pos = start_m + offs_m + (k_len - q_len)  # absolute positions (bottom-right alignment)
    n_real = tl.minimum(q_len - start_m, BLOCK_M)  # rows past q_len are never stored
    lo, mid_lo, mid_hi, hi = block_span(start_m + k_len - q_len, start_m + n_real - 1 + k_len - q_len,
                                        before, after, k_len, BLOCK_N)

    # Online softmax over the visible key blocks, all in the log2 domain:
    #     s = q k^T * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
    #     l' = l * 2^(m - m') + rowsum p;  acc' = acc * 2^(m - m') + p v
    # One loop; only the edge blocks (diagonal, window sides, sequence end) apply the mask, behind
    # a uniform branch. A loop per mask phase (three copies of the body, each with its own
    # pipeline prologue and hoisted invariants) cost up to 60 registers per thread and spilled.
    #
    # 16-bit inputs apply the scale late: the row max of s is max(q k^T) * scale exactly
    # (rounding is monotonic, the scale positive), BLOCK_M multiplies instead of a tile of them,
    # and s - m' is one explicit fused multiply-add per score (a scaled tile that feeds the mask
    # branch and the row max is not fused: the sm_90 SASS had a multiply and a subtraction per
    # score). fp32 keeps s rounded on its own, as the backward recomputes it; that s has those
    # other uses too, so the compiler leaves its subtraction unfused (checked in the PTX).
    # Soft-capped scores are scaled up front whatever the dtype (the cap is not linear).
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k = load_rows(k_base + tl.cast(start_n, tl.int64) * stride_kt, offs_n, stride_kt, offs_d,
                      k_len - start_n, HEAD_DIM, D_PAD)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # s / scale (16-bit) or s (fp32)
        if SOFTCAP:
            t, _ = capped_scores(t, sm_scale, softcap)
        elif q.dtype == tl.float32:
            t = t * qk_scale
        if (start_n < mid_lo) | (start_n >= mid_hi):
            k_pos = start_n + offs_n
            visible = ((k_pos[None, :] < k_len) & (k_pos[None, :] >= q_pos[:, None] - before)
                       & (k_pos[None, :] <= q_pos[:, None] + after))
            t = tl.where(visible, t, float("-inf"))
        if SOFTCAP or q.dtype == tl.float32:  # t is s * log2(e) already
            m_new = tl.maximum(m_i, tl.max(t, 1))
        else:
            m_new = tl.maximum(m_i, tl.max(t, 1) * qk_scale)
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead keeps
        # 2^(-inf - -inf) = NaN out: its p and alpha come out 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        if SOFTCAP or q.dtype == tl.float32:
            p = tl.math.exp2(t - m_sub[:, None])
        else:
            p = tl.math.exp2(tl.fma(t, qk_scale, -m_sub[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_rows(v_base + tl.cast(start_n, tl.int64) * stride_vt, offs_n, stride_vt, offs_d,
                      k_len - start_n, HEAD_DIM, D_PAD)
        # p is rounded to the input dtype for the tensor-core product (fp32 stays fp32).
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # Normalise once. A row without any visible key has l = 0: it returns 0 (and m = -inf).
    # The softmax statistics are saved as two planes, m and log2(l) (lse = (m + log2 l) ln 2):
    # the fp32 backward forms p = 2^((s - m) - log2 l), where s - m is exact. One fp32 lse would
    # round log2(l) to an ulp of |m|: 3e-4 in p at logits of 1e4. The 16-bit backward does fold
    # them (lse2, once per row): there that is below p's own 16-bit rounding.
    empty = (m_i == float("-inf")) & (l_i == 0.0)  # (NaN scores: max skips them, l is NaN)
    l_safe = tl.where(empty, 1.0, l_i)
    store_rows(o_base, acc / l_safe[:, None], offs_m, stride_ot, offs_d, q_len - start_m, HEAD_DIM)
    stat_ptrs = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + start_m + offs_m
    tl.store(stat_ptrs, m_i, mask=offs_m < q_len - start_m)
    tl.store(stat_ptrs + stride_lp, tl.math.log2(l_safe), mask=offs_m < q_len - start_m)


# ----------------------------------------------------------------------------------------------
# Configs: autotuned on a GPU (keyed on bucketed lengths), one large-block config under the
# interpreter (fewer Python-level steps; autotuning there would only measure numpy).
# ----------------------------------------------------------------------------------------------
INTERPRETER_CONFIG = {"fwd": (256, 256, 4, 1), "dq": (256, 256, 4, 1), "dkdv": (256, 256, 4, 1)}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates by (padded head dim, "16-bit" or the
# fp32 dot precision). One list serves every arch, except the rows an arch replaces
# (``REPLACEMENTS``, below): the build report compiles every entry for each arch that launches
# it (with the multiple-of-16 strides an aligned launch specialises on), so an entry must fit
# without spilling. Largest registers per thread over fp16/bf16, d64/80/96/128/256, dense/varlen,
# sm_80 / sm_90 (tensor cores: mma.sync on sm_80; wgmma on sm_90 unless said):
#   forward  d64 (128,64,8,3) 168/127, (128,128,8,2) 214/171; d80-128 (128,64,8,3) 210/168,
#            (128,128,8,2) 249/240; d256 (64,32,8,2) 160/120, (64,64,8,2) 164/163.
#            Rejected: d256 (128,64,8,2) 255/240 (no margin), (64,64,4,2) 208 B spill.
#   dQ       d64 (128,64,8,2|3) 255/128; d80-128 (64,64,4,2|3) 239/168; d256 (64,32,8,2) 170/182,
#            (64,64,8,2) 207/221. Rejected at d128: (128,32,8,3) sm_80 16 B spill, (128,64,8,2)
#            sm_80 1.5 KB (it keeps q and dO as 128-row mma operands in registers).
#   dK/dV    d64 (32,64,8,2) 255/125, (32,128,8,2) 255/180; d80-128 (32,64,8,2) 168/186,
#            (64,64,8,2) 171/233; d256 (32,32,8,2) 170/170 on mma.sync: every 64-key tile spills
#            at d256 ((16,64,8,2) 24 B, (32,64,8,2) 104 B on sm_90), and a warpgroup MMA needs 64
#            rows. Rejected at d128: (32,128,8,2) sm_80 336 B, (64,128,8,2) 240 B on sm_90.
#   What made these fit (the same tiles spilled 500-650 B before): one key/query-block loop
#   instead of one per mask phase (and, in dK/dV, per GQA head), stride hints that reach the
#   compiler (``aligned16``), and clamped instead of masked tile rows (``load_rows``).
#   fp32 rows are keyed by the dot precision too. Exact ("ieee") products run on FMA units,
#     which hold operand rows in registers: small tiles, and erratic (forward (64,32,4,2) is
#     255/168 at d128 but spills 80 B on sm_80 at d64, so d64 keeps only (16,32,4,1) 72/80;
#     d128 (16,32,4,1) 196/198; d256 (32,16,4,1) 162/196; dQ (32,32,4,1) 146/136, d256
#     (16,32,4,1) 198/179; dK/dV (16,32,4,1) 159/136 ((32,16,4,1) 264 B spill on sm_90), d256
#     (16,32,8,1) 155/128). The tf32 opt-in runs on tensor cores with larger tiles: forward
#     (64,32,4,2) 163/128 and (64,64,4,2) 211/194, d256 (64,32,8,2) 166/219; dQ (64,32,4,2)
#     218/172, d256 (32,32,4,2) 232/221 (mma; (64,32,8,2) needs 257 KB of shared memory); dK/dV
#     (32,64,8,2) 160/251, d256 (16,16,8,1) 106/80 ((32,32,8,2) needs 164 KB on sm_80).
# The exceptions to "smaller head dim, smaller registers" are the reason the build report
# compiles every head dim. Entries with one candidate skip the autotuner's timing; the others
# are timed once per bucketed length (seqlen_bucket).
_FWD = {
    (64, "16-bit"): [(128, 64, 8, 3), (128, 128, 8, 2)],
    (128, "16-bit"): [(128, 64, 8, 3), (128, 128, 8, 2)],
    (256, "16-bit"): [(64, 32, 8, 2), (64, 64, 8, 2)],
    (64, "ieee"): [(16, 32, 4, 1)],
    (128, "ieee"): [(16, 32, 4, 1), (64, 32, 4, 2)],
    (256, "ieee"): [(32, 16, 4, 1)],
    (64, "tf32"): [(64, 32, 4, 2), (64, 64, 4, 2)],
    (128, "tf32"): [(64, 32, 4, 2), (64, 64, 4, 2)],
    (256, "tf32"): [(64, 32, 8, 2)],
}
_DQ = {
    (64, "16-bit"): [(128, 64, 8, 2), (128, 64, 8, 3)],
    (128, "16-bit"): [(64, 64, 4, 2), (64, 64, 4, 3)],
    (256, "16-bit"): [(64, 32, 8, 2), (64, 64, 8, 2)],
    (64, "ieee"): [(32, 32, 4, 1)],
    (128, "ieee"): [(32, 32, 4, 1)],
    (256, "ieee"): [(16, 32, 4, 1)],
    (64, "tf32"): [(64, 32, 4, 2)],
    (128, "tf32"): [(64, 32, 4, 2)],
    (256, "tf32"): [(32, 32, 4, 2)],
}
_DKDV = {
    (64, "16-bit"): [(32, 64, 8, 2), (32, 128, 8, 2)],
    (128, "16-bit"): [(32, 64, 8, 2), (64, 64, 8, 2)],
    (256, "16-bit"): [(32, 32, 8, 2)],
    (64, "ieee"): [(16, 32, 4, 1)],
    (128, "ieee"): [(16, 32, 4, 1)],
    (256, "ieee"): [(16, 32, 8, 1)],
    (64, "tf32"): [(32, 64, 8, 2)],
    (128, "tf32"): [(32, 64, 8, 2)],
    (256, "tf32"): [(16, 16, 8, 1)],
}


# Unaligned launches (a batch/head/row stride not a multiple of 16 elements: head dims such as
# 24/40/72/136, odd views) run the ALIGNED=False builds. Rows then load element by element and
# their 64-bit address tensors stay live across the loop, so the aligned tiles spill (forward
# (128,128,8,2) 160 B on sm_80, (64,64,4,2) 16-96 B at d80-128; dQ d256 (64,32,8,2) 40 B on
# sm_90). These are rare, slow-path shapes: one tile each (no autotuner timing), chosen from 2-4
# candidates per row compiled unaligned ("i32" strides) for every head dim / dense+varlen / sm_80
# and sm_90. Registers per thread sm_80/sm_90, worst over those (fp16 and bf16 agree):
#   16-bit   forward d64 (128,64,8,2) 231/194, d80-128 (64,64,8,2) 200/232, d256 (64,32,8,2)
#            226/214; dQ d64 (64,64,4,2) 250/168, d80-128 (64,32,8,2) 202/154, d256 (32,32,8,2)
#            174/184; dK/dV d64 (32,32,4,2) 218/167, d80-256 (32,32,8,2) 225/209.
#            Rejected: forward d80-128 (64,64,4,2) 16-96 B spill; dK/dV d128 (16,32,4,2) 8 B varlen.
#   ieee     forward (16,32,4,1) 204/168 (d64: 16 B spill on sm_90 once the kernels took a soft-cap
#            argument: (16,16,4,1)), d256 (16,16,4,1) 128/110 ((32,16,4,1) 56 B varlen on sm_80);
#            dQ (32,32,4,1) 121/104 at d64, (16,32,4,1) 128/128 at d80-128 and 255/254 at d256
#            ((16,16,4,1) spills 8 B there); dK/dV d64 (16,32,4,1) 203/120, d80-128 (16,16,8,1)
#            64/65 ((16,16,4,1), 168/128 before, spilled 8 B varlen on sm_80 once the kernels took
#            the program order's head_group; (16,32,4,1) 8-16 B on sm_90), d256 (16,32,8,1) 238/184.
#   tf32     forward (64,32,4,2) 254/252, d256 (64,32,8,2) 254/243; dQ (64,32,4,2) 254/255 (d80-128:
#            24 B varlen on sm_90 with the soft-cap argument: (32,32,4,2), sm_86's tile before),
#            d256 (16,32,8,2) 118/102; dK/dV d64 (32,64,8,2) 248/184, d80-128 (32,32,8,2) 128/128,
#            d256 (16,16,8,1) 175/128. Rejected: dQ d256 (32,32,4,2) 40 B, (16,32,4,2) 8 B;
#            dK/dV d128 (32,64,8,2) 8 B varlen on sm_90, (32,32,4,2) 16 B on sm_90.
_FWD_UNALIGNED = {
    (64, "16-bit"): [(128, 64, 8, 2)],
    (128, "16-bit"): [(64, 64, 8, 2)],
    (256, "16-bit"): [(64, 32, 8, 2)],
    (64, "ieee"): [(16, 16, 4, 1)],
    (128, "ieee"): [(16, 32, 4, 1)],
    (256, "ieee"): [(16, 16, 4, 1)],
    (64, "tf32"): [(64, 32, 4, 2)],
    (128, "tf32"): [(64, 32, 4, 2)],
    (256, "tf32"): [(64, 32, 8, 2)],
}
_DQ_UNALIGNED = {
    (64, "16-bit"): [(64, 64, 4, 2)],
    (128, "16-bit"): [(64, 32, 8, 2)],
    (256, "16-bit"): [(32, 32, 8, 2)],
    (64, "ieee"): [(32, 32, 4, 1)],
    (128, "ieee"): [(16, 32, 4, 1)],
    (256, "ieee"): [(16, 32, 4, 1)],
    (64, "tf32"): [(64, 32, 4, 2)],
    (128, "tf32"): [(32, 32, 4, 2)],
    (256, "tf32"): [(16, 32, 8, 2)],
}
_DKDV_UNALIGNED = {
    (64, "16-bit"): [(32, 32, 4, 2)],
    (128, "16-bit"): [(32, 32, 8, 2)],
    (256, "16-bit"): [(32, 32, 8, 2)],
    (64, "ieee"): [(16, 32, 4, 1)],
    (128, "ieee"): [(16, 16, 8, 1)],
    (256, "ieee"): [(16, 32, 8, 1)],
    (64, "tf32"): [(32, 64, 8, 2)],
    (128, "tf32"): [(32, 32, 8, 2)],
    (256, "tf32"): [(16, 16, 8, 1)],
}


# Hopper (sm_90: H100/H200) adds these to the aligned 16-bit forward rows. Its register file and
# shared memory hold tiles that spill or do not fit on sm_80, and its warpgroup MMA wants 64-row
# multiples. The autotuner times them beside the shared candidates only on an sm_90 device; the
# build report compiles them for sm_90 only. Registers per thread on sm_90, worst over fp16/bf16,
# dense / varlen:
#   forward  d64 (128,64,8,4) 127/126, (128,128,8,3) 167/171, (64,64,4,3) 127/125;
#            d128 (128,64,8,4) 167/166, (128,32,8,3) 125, (64,64,4,3) 167/165.
#   (fp16 and d80/96 are in the build report; none spills.)
#   Rejected (sm_90 spills): forward d128 (128,64,4,3) 96 B.
# The dQ and dK/dV rows of sm_90 (16-bit, aligned, d64-128) are all its own: ``_SM90_ROWS``.
# Nothing here is measured yet: the autotuner keeps a shared candidate wherever it is faster.
_SM90_EXTRA_16BIT = {
    "fwd": {64: [(128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 4, 3)]},
    "dq": {},
    "dkdv": {},
}

# dK/dV with atomic dQ adds (``deterministic=False``, fp16/bf16 only). The program also forms a
# (BLOCK_M, D) dQ tile per step and stages dS^T through shared memory for it, so it gets tiles
# of its own: the deterministic kernel's d128 tiles spill here. Registers per thread, worst over
# fp16/bf16, dense/varlen and the head dims of the row, sm_80 / sm_90 (sm_90 as compiled before it
# took rows of its own at d64-128):
#   aligned  d64 (32,64,8,2) 253/165, (32,128,8,2) 255/196, (16,64,4,2) 232/158; d80-128
#            (32,64,8,2) 255/222, (32,32,4,2) 250/246; d256 (32,32,8,2) 232/220, (16,32,8,2) 199/192.
#            sm_90 runs rows of its own at d64-128 (``_SM90_ROWS``: these serialized its MMAs).
#            Rejected (an earlier build of this kernel): d64 (64,64,8,2) 272 B spill on sm_80,
#            (64,128,8,2) 32 B on sm_90; d128 (16,64,4,2) 72 B, (32,128,8,2) 56 B, (64,64,8,2|3)
#            64-152 B, (64,128,8,2) 416 B, (64,128,8,1) 136 B, (16|32,128,4,2) 0.8-1.1 KB;
#            d256 (16,64,8,2) 16-256 B.
#   unaligned d64 (16,32,4,2) 215/198 ((32,32,4,2) 32 B on sm_90); d80-128 (32,32,8,2) 225/250;
#            d256 (16,32,8,2) 228/194.
# Unmeasured: which of them is fastest, and whether the atomics beat the separate dQ pass.
_DKDV_ATOMIC = {
    (64, "16-bit"): [(32, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2)],
    (128, "16-bit"): [(32, 64, 8, 2), (32, 32, 4, 2)],
    (256, "16-bit"): [(32, 32, 8, 2), (16, 32, 8, 2)],
}
_DKDV_ATOMIC_UNALIGNED = {
    (64, "16-bit"): [(16, 32, 4, 2)],
    (128, "16-bit"): [(32, 32, 8, 2)],
    (256, "16-bit"): [(16, 32, 8, 2)],
}
_SM90_EXTRA_ATOMIC: dict = {}  # (sm_90's aligned 16-bit rows: _SM90_ROWS)

# dK/dV with dQ partials (``set_deterministic_backward("partials")``, fp16/bf16 only): the atomic
# kernel's step inside a loop over the program's key blocks, which keeps more registers live
# than the step alone. On the atomic tiles it spilled 8-208 B on every arch (the worst: sm_90 d64
# (64,64,8,2|3) 16-32 B and d128 (32,32,4,2) 40 B, sm_80 d80 (32,64,8,2) 8 B and (32,32,4,2)
# 16 B, sm_90 d256 (32,32,8,2) 8 B). These tiles spill on no arch (sm_80/86/90/100/120, dense and
# varlen, fp16; d80 and d128 for the middle row) and no sm_90 MMA is serialized. Registers worst
# over the archs other than sm_90 / on sm_90:
#   aligned   d64 (32,64,8,2|3) 255/212, (32,128,8,2) 255/214, (16,64,4,2) 255/240;
#             d80-128 (32,32,8,2) 250/226, (64,16,8,2) 255/254, (16,64,8,2) 255/246;
#             d256 (16,32,8,2) 247/238.
#   unaligned d64 (16,32,4,2) 255/226, (32,32,8,2) 254/248; d80-128 (32,16,8,2) 255/186;
#             d256 (32,16,8,2) 255/180, (16,16,4,2) 255/180.
# Unmeasured, like the atomic rows: which is fastest, and whether this backward beats the dQ pass.
_DKDV_PARTIALS = {
    (64, "16-bit"): [(32, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 3), (16, 64, 4, 2)],
    (128, "16-bit"): [(32, 32, 8, 2), (64, 16, 8, 2), (16, 64, 8, 2)],
    (256, "16-bit"): [(16, 32, 8, 2)],
}
_DKDV_PARTIALS_UNALIGNED = {
    (64, "16-bit"): [(16, 32, 4, 2), (32, 32, 8, 2)],
    (128, "16-bit"): [(32, 16, 8, 2)],
    (256, "16-bit"): [(32, 16, 8, 2), (16, 16, 4, 2)],
}

# GPUs with 99 KB of shared memory per block (sm_86: A10, A40, RTX 30; sm_89: L4, L40S, RTX 40;
# sm_120: RTX 50) run the tables above except where a row's tiles need more, which Triton refuses
# to launch there ("out of resource: shared memory"): the 16-bit forward at d80-128 needed 112.5
# and 128 KB, so a patched Llama did not run on those GPUs at all. Those rows are replaced here,
# keyed (aligned, padded head dim, kind), and so are the few whose tiles spill there although
# they do not on sm_80 (ptxas for sm_86 caps registers at 64-128 to fit more blocks: fp32 dK/dV
# (16,32,4,1) 8 B at d80/96, (16,32,8,1) 8 B at d256 varlen; unaligned fp32 dQ (16,32,4,1) 184-200
# B; atomic dK/dV (32,128,8,2) 8 B at d64). Compiled for sm_86 (the build report's "sm_86" arch),
# registers / shared KB, worst over fp16/bf16, dense/varlen and the head dims of the row:
#   forward  16-bit d80-128 (128,64,8,2) 172 / 80.5, (64,64,4,3) 204 / 88.2, (128,32,8,3) 169 / 72.5;
#            tf32 d256 (32,16,4,2) 127 / 66.3 (unaligned 156). Rejected: 16-bit (128,32,4,2) and
#            (128,64,4,2) spill 8-112 B; tf32 d256 (32,32,4|8,2) 100.3 KB, (64,32,8,1) 104 KB.
#   dQ       16-bit d256 (32,32,8,2) 128 / 68, (64,32,8,1) 197 / 96; tf32 d80-128 (64,32,4,1)
#            228 / 96, (32,32,4,2) 143 / 72 (unaligned: every arch's tile now); tf32 d256 (16,32,8,1) 147 / 96,
#            (16,16,4,2) 116 / 80 (unaligned 147). Rejected: tf32 d80-128 (64,16,4,2) 8 B varlen
#            spill; d256 (32,32,4,1) 104 B spill, (16,32,4,2) and (32,16,4,2) 112-128 KB.
#            ieee unaligned d80-128 (16,32,8,1) 76 / 48. Rejected: (16,16,4,1) 16 B varlen spill.
#   dK/dV    tf32 d80-128 (32,32,8,2) 128 / 84.4; ieee d80-128 (16,32,8,1) 84 / 50, d256
#            (16,16,8,1) 80 / 65. Rejected: (32,64,8,1) 128 KB.
# Rows that are a subset of their sm_80 row keep its order (the first is what autotune=False runs).
_SM86_ROWS = {
    "fwd": {(True, 128, "16-bit"): [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
            (True, 256, "16-bit"): [(64, 32, 8, 2)],
            (True, 128, "tf32"): [(64, 32, 4, 2)],
            (True, 256, "tf32"): [(32, 16, 4, 2)],
            (False, 256, "tf32"): [(32, 16, 4, 2)]},
    "dq": {(True, 128, "16-bit"): [(64, 64, 4, 2)],
           (True, 256, "16-bit"): [(32, 32, 8, 2), (64, 32, 8, 1)],
           (True, 128, "tf32"): [(64, 32, 4, 1), (32, 32, 4, 2)],
           (True, 256, "tf32"): [(16, 32, 8, 1), (16, 16, 4, 2)],
           (False, 256, "tf32"): [(16, 16, 4, 2)],
           (False, 128, "ieee"): [(16, 32, 8, 1)]},
    "dkdv": {(True, 128, "tf32"): [(32, 32, 8, 2)],
             (True, 128, "ieee"): [(16, 32, 8, 1)],
             (True, 256, "ieee"): [(16, 16, 8, 1)]},
    "dkdv_atomic": {(True, 64, "16-bit"): [(32, 64, 8, 2), (16, 64, 4, 2)]},
    "dkdv_partials": {},
}

# RTX 50 (sm_120) runs the 99 KB tables above, except where they spill there: its ptxas holds
# some tiles to fewer registers than sm_86's (the build report's "sm_120" arch). Registers worst
# over fp16/bf16, dense/varlen and the head dims of the row, on sm_120:
#   dQ       16-bit d64: (128,64,8,2|3) spilled 32 B at 255 registers, and so did every 64 x 64 tile
#            (24 B); (128,32,8,2|3) 210, (64,32,4,2|3) 208 do not. Taken: the 128-row pair.
#   forward  ieee d80-128: the second candidate (64,32,4,2) spilled 8 B; the first stays alone.
#   dK/dV with atomic dQ, unaligned 16-bit d64: (16,32,4,2) spilled 8-24 B; with 8 warps 158.
_SM120_ROWS = {
    "fwd": {(True, 128, "ieee"): [(16, 32, 4, 1)]},
    "dq": {(True, 64, "16-bit"): [(128, 32, 8, 2), (128, 32, 8, 3)]},
    "dkdv": {},
    "dkdv_atomic": {(False, 64, "16-bit"): [(16, 32, 8, 2)]},
    "dkdv_partials": {},
}

# B200 (sm_100) runs the sm_80 tables (its 227 KB hold every tile), except where they spill there
# (the build report's "sm_100" arch; Triton's Blackwell path puts the 16-bit dots on tcgen05).
# Registers / shared KB, worst over fp16/bf16, dense/varlen and the head dims of the row:
#   forward  16-bit d80-128: (128,128,8,2) spilled 24 B varlen at 255 registers, (128,128,8,3) 40 B;
#            (128,64,8,3) fits, and with 4 stages 228 / 162 (the second candidate).
#            unaligned tf32 d256: (64,32,8,2) spilled 112-152 B; (32,32,8,2) 128 / 101.5.
_SM100_ROWS = {
    "fwd": {(True, 128, "16-bit"): [(128, 64, 8, 3), (128, 64, 8, 4)],
            (False, 256, "tf32"): [(32, 32, 8, 2)]},
    "dq": {}, "dkdv": {}, "dkdv_atomic": {}, "dkdv_partials": {},
}

# Hopper (sm_90) rows that replace the shared ones where ptxas serialized the warpgroup MMAs of
# a tile ("(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized":
# every tensor-core op waits for the one before; the build report now flags it, a problem like
# a spill). Serialized were dK/dV (32,64,8,2) and (64,64,8,2) at d64-128 (the first candidate,
# what autotune=False ran), dQ (64,128,8,2) at d64 and (64,64,8,2) at d80-128, atomic dK/dV
# (32,64,8,2), (32,128,8,2|3), (16,64,4,2) at d64 and (32,64,8,2), (16,128,8,2) at d80-128, the
# d256 forward and dQ (64,32|64,8,2) (Gemma's head dim), and tf32 dK/dV (32,64,8,2) and forward
# d256 (64,32,8,2). The 2-stage backward tiles also had no load in flight across an iteration
# (cp.async waited to 0 at its top): these prefer 3-4 stages. Registers on sm_90, worst over
# fp16/bf16, dense/varlen and the head dims of the row; none spills or is serialized:
#   forward  d256 (128,32,8,2) 222, (64,32,4,2) 242, (128,64,8,2) 240, (64,16,4,3) 217;
#            tf32 d256 (32,32,8,2) 93 (unaligned 128).
#   dQ       d64 (128,64,8,3|4) 124, (64,128,4,3) 206, (128,128,8,3) 201; d80-128 (128,32,8,3|4) 128,
#            (128,64,8,3) 175, (64,32,4,3) 133; d256 (128,32,8,2) 230, (64,32,4,2) 237, (128,16,8,2) 214.
#   dK/dV    d64 (32,128,8,3|4) 184, (64,128,8,3) 238, (32,64,4,3) 164; d80-128 (32,128,8,3|4|5) 245,
#            (32,64,4,3) 242; tf32 d64 (32,32,8,2) 125, (32,64,4,2) 228; tf32 d80-128 (32,32,4,2) 162,
#            (32,16,8,2) 128 (unaligned d64: (32,32,8,2) 128).
#   atomic   d64 (64,64,8,3) 246, (64,64,8,2) 238; d80-128 (64,16,8,2|3) 236, (32,32,4,2) 246 (its
#            dQ product has 16-32 rows there: mma.sync, Hopper's MMA needs 64).
#   Rejected: dK/dV d128 (64,64,4,3) 152-176 B spill; tf32 (32,32,8,2) at d80-128 8 B, (16,64,4,2)
#   and (32,64,4,2) serialized (4 warps too); atomic d64 (64,128,8,3) 40-72 B, (64,64,4,2) 48-80 B,
#   d80-128 every 4-warp 64-row tile 32-512 B, (64,32,8,2) 8 B, (64,32,8,1) 255 registers.
# Unmeasured, like the rest of the Hopper candidates: the autotuner picks among them on the GPU.
_SM90_ROWS = {
    "fwd": {(True, 256, "16-bit"): [(128, 32, 8, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 16, 4, 3)],
            (True, 256, "tf32"): [(32, 32, 8, 2)],
            (False, 256, "tf32"): [(32, 32, 8, 2)]},
    "dq": {(True, 64, "16-bit"): [(128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3)],
           (True, 128, "16-bit"): [(128, 32, 8, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3)],
           (True, 256, "16-bit"): [(128, 32, 8, 2), (64, 32, 4, 2), (128, 16, 8, 2)]},
    "dkdv": {(True, 64, "16-bit"): [(32, 128, 8, 3), (32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 3)],
             (True, 128, "16-bit"): [(32, 128, 8, 3), (32, 128, 8, 4), (32, 128, 8, 5), (32, 64, 4, 3)],
             (True, 64, "tf32"): [(32, 32, 8, 2), (32, 64, 4, 2)],
             (True, 128, "tf32"): [(32, 32, 4, 2), (32, 16, 8, 2)],
             (False, 64, "tf32"): [(32, 32, 8, 2)]},
    "dkdv_atomic": {(True, 64, "16-bit"): [(64, 64, 8, 3), (64, 64, 8, 2)],
                    (True, 128, "16-bit"): [(64, 16, 8, 2), (64, 16, 8, 3), (32, 32, 4, 2)]},
    "dkdv_partials": {},
}

# The replacement rows each table arch applies, in order, to the shared tables: sm_120 is a 99 KB
# GPU too (the sm_86 rows first, then its own).
REPLACEMENTS = {86: (_SM86_ROWS,), 90: (_SM90_ROWS,), 100: (_SM100_ROWS,), 120: (_SM86_ROWS, _SM120_ROWS)}

# (aligned table, unaligned table, sm_90 additions, {table arch: its replacement rows}) per kernel.
CONFIG_TABLES = {name: (aligned, unaligned, sm90, {sm: [rows[name] for rows in chain]
                                                   for sm, chain in REPLACEMENTS.items()})
                 for name, aligned, unaligned, sm90 in (
    ("fwd", _FWD, _FWD_UNALIGNED, _SM90_EXTRA_16BIT["fwd"]), ("dq", _DQ, _DQ_UNALIGNED, _SM90_EXTRA_16BIT["dq"]),
    ("dkdv", _DKDV, _DKDV_UNALIGNED, _SM90_EXTRA_16BIT["dkdv"]),
    ("dkdv_atomic", _DKDV_ATOMIC, _DKDV_ATOMIC_UNALIGNED, _SM90_EXTRA_ATOMIC),
    ("dkdv_partials", _DKDV_PARTIALS, _DKDV_PARTIALS_UNALIGNED, {}))}


def padded_head_dim(head_dim: int) -> int:
    """tl.arange needs a power of two and tl.dot K >= 16: 80 and 96 run as 128 (masked)."""
    return max(16, triton.next_power_of_2(head_dim))


def seqlen_bucket(n: int) -> int:
    """Autotune key: next power of two, clamped to [128, 16384], so new lengths reuse a tuning."""
    return min(max(triton.next_power_of_2(max(n, 1)), 128), 16384)


def checked_head_group(head_group: int, n_rows: int, max_tiles: int) -> int:
    """A launcher's ``head_group`` made safe for :func:`ordered_program`: at least 1 (0 would
    divide by zero), at most the rows, and small enough that ``head_group * tiles`` stays in 32
    bits for up to ``max_tiles`` tiles (the smallest block's count)."""
    if isinstance(head_group, bool) or not isinstance(head_group, int) or head_group < 1:
        raise ValueError(f"head_group must be a positive int, got {head_group!r}")
    return max(1, min(head_group, n_rows, (2**31 - 1) // max(max_tiles, 1)))


def grouped_heads(n_tiles: int, n_rows: int, row_bytes: int, sms: int, l2_bytes: int) -> int:
    """The ``head_group`` of :func:`ordered_program`'s grouped order for a grid of ``n_tiles`` x
    ``n_rows`` programs whose rows each stream ``row_bytes`` (a head's keys and values, shared by
    the query heads of a GQA group): the fewest rows, a power of two, whose programs fill ``sms``
    SMs twice over (a program holds most of an SM), but no more than keep their streamed bytes
    within half of L2, and never more rows than there are. 1 where one row's tiles already fill
    the GPU twice (plain grid order is then balanced), or where one row's bytes alone fill L2."""
    want = triton.next_power_of_2(max(1, triton.cdiv(2 * sms, max(n_tiles, 1))))
    fit = max(1, (l2_bytes // 2) // max(row_bytes, 1))
    return max(1, min(want, 1 << (fit.bit_length() - 1), triton.next_power_of_2(max(n_rows, 1))))


def key_bucket(mk: int, mq: int, before: int, after: int) -> int:
    """The K_BUCKET autotune key: the keys' length bucket, plus which sides of the mask bind (bit
    20: ``after``, i.e. causal; bit 21: ``before``, a window). Causal and full attention at one
    length do different work per query block and may want different tiles. The flags sit above
    every bucket value and are multiples of 16, so the launch's integer specialisation (Triton
    specialises ints divisible by 16) is the same for every kind: no extra compile."""
    reach = mq + mk  # a bound at least this far never masks anything
    return seqlen_bucket(mk) | (int(after < reach) << 20) | (int(before < reach) << 21)


def _lookup(tables, d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
            sm: int = 80) -> list[tuple]:
    """The candidates of one launch: ``tables`` is (aligned, unaligned, sm_90 additions, {table
    arch: its replacement rows}); ``sm`` the device's table arch (:func:`table_arch`: 80, 86, 90,
    100 or 120)."""
    kind = precision if elem_bytes >= 4 else "16-bit"  # fp16/bf16 ignore the fp32 dot precision
    row = max(64, d_pad)
    configs = tables[0 if aligned else 1][(row, kind)]
    if sm == 90 and aligned and kind == "16-bit":
        configs = configs + tables[2].get(row, [])
    for rows in tables[3].get(sm, ()):
        configs = rows.get((aligned, row, kind), configs)
    return configs


def fwd_configs(d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
                sm: int = 80) -> list[tuple]:
    """Forward autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); ``aligned``: the
    strides are multiples of 16 elements (:func:`strides_aligned`), else the unaligned table;
    ``sm`` (:func:`table_arch`) 90 adds the Hopper-only tiles (see ``_SM90_EXTRA_16BIT``); 86,
    90, 100 and 120 swap in their replacement rows (``REPLACEMENTS``)."""
    return _lookup(CONFIG_TABLES["fwd"], d_pad, elem_bytes, precision, aligned, sm)


def dkdv_configs(d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
                 sm: int = 80) -> list[tuple]:
    """dK/dV autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); see :func:`fwd_configs`."""
    return _lookup(CONFIG_TABLES["dkdv"], d_pad, elem_bytes, precision, aligned, sm)


def dq_configs(d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
               sm: int = 80) -> list[tuple]:
    """dQ autotune candidates (BLOCK_M, BLOCK_N, num_warps, num_stages); see :func:`fwd_configs`."""
    return _lookup(CONFIG_TABLES["dq"], d_pad, elem_bytes, precision, aligned, sm)


def dkdv_atomic_configs(d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
                        sm: int = 80) -> list[tuple]:
    """Candidates of the dK/dV kernel with atomic dQ adds (16-bit inputs only); see :func:`fwd_configs`."""
    if elem_bytes >= 4:
        raise ValueError("the atomic-dQ backward runs fp16/bf16 only")
    return _lookup(CONFIG_TABLES["dkdv_atomic"], d_pad, elem_bytes, precision, aligned, sm)


def dkdv_partials_configs(d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
                          sm: int = 80) -> list[tuple]:
    """Candidates of the dK/dV kernel with dQ partials (16-bit inputs only); see :func:`fwd_configs`."""
    if elem_bytes >= 4:
        raise ValueError("the dQ-partials backward runs fp16/bf16 only")
    return _lookup(CONFIG_TABLES["dkdv_partials"], d_pad, elem_bytes, precision, aligned, sm)


@functools.lru_cache(maxsize=None)
def table_arch(device: torch.device) -> int:
    """Which config tables a device runs, named by the arch the build report compiles them for
    (``fastllama.optable.device_arch``): 90 on sm_90 (H100/H200: the shared tables plus the
    Hopper-only tiles); 86 on sm_86/sm_89 (A10, L4, RTX 30/40: 99 KB of shared memory per block,
    ``_SM86_ROWS``), 120 on RTX 50 (sm_120: the same plus ``_SM120_ROWS``); 100 on B200 (sm_100:
    the sm_80 tables with ``_SM100_ROWS``); 80 on the others (A100); 0 for a device that is not
    CUDA (the interpreter: the sm_80 tables). A GPU with less than 99 KB per block (sm_75, sm_70)
    is refused with a ValueError."""
    if device.type != "cuda":
        return 0
    from ..optable import SHARED_MEMORY_SM86, device_arch, shared_memory_per_block

    shared = shared_memory_per_block(device)
    if shared < SHARED_MEMORY_SM86:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"fastllama's attention kernels need 99 KB of shared memory per block; {device} "
                         f"({torch.cuda.get_device_properties(device).name}, sm_{major}{minor}) has {shared // 1024} "
                         "KB. Supported: compute capability 8.0 and newer (A100, A10, L4, RTX 30/40/50, H100, "
                         "B200, ...). On this GPU, fastllama.patch(model, attention=False) leaves a model's "
                         "attention to PyTorch")
    return device_arch(device)


class ArchAutotuner:
    """``kernel`` autotuned over ``tables`` (aligned, unaligned, sm_90 additions, replacement
    rows per table arch), with one Triton autotuner per table arch (:func:`table_arch`).

    Why per arch: Triton keys its tuning cache on the launch's arguments, not on the device, so
    in one process with an A100 and an H100 a Hopper-only tile tuned on the H100 would then be
    launched on the A100, where it spills or does not fit (and an A100's tile on an L4). Each
    launch also keeps only the candidates of its own (ALIGNED, padded head dim, dtype, fp32
    precision) row of its arch, so a config that the build report did not compile for that row
    and arch can not be chosen.
    ``autotune_kwargs`` go to ``triton.autotune`` (e.g. ``restore_value``).
    """

    def __init__(self, kernel, tables, key, **autotune_kwargs):
        self.kernel, self.tables, self.key, self.autotune_kwargs = kernel, tables, key, autotune_kwargs
        self._by_sm: dict[int, object] = {}
        self.latest = None  # the autotuner of the latest launch (its best_config: what it chose)

    def for_sm(self, sm: int):
        """The autotuner of table arch ``sm`` (80, 86, 90, 100 or 120: :func:`table_arch`)."""
        if sm not in self._by_sm:
            tables = self.tables
            union = sorted({c for aligned in (True, False) for row, kind in tables[0]
                            for c in _lookup(tables, row, 4 if kind in ("ieee", "tf32") else 2, kind, aligned, sm)})
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                       for bm, bn, w, s in union]

            def prune(configs, named_args, **kwargs):
                wanted = set(_lookup(tables, kwargs["D_PAD"], named_args["Q"].element_size(),
                                     kwargs.get("PRECISION", "ieee"), kwargs["ALIGNED"], sm))
                return [c for c in configs
                        if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted]

            self._by_sm[sm] = triton.autotune(configs, key=self.key, prune_configs_by={"early_config_prune": prune},
                                              **self.autotune_kwargs)(self.kernel)
        return self._by_sm[sm]

    def for_device(self, device: torch.device):
        """The autotuner of ``device``'s arch; launch it as ``tuner.for_device(q.device)[grid](...)``."""
        self.latest = self.for_sm(table_arch(device))
        return self.latest


_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "IS_VARLEN", "PRECISION", "ALIGNED"]
_attn_fwd_tuned = ArchAutotuner(_attn_fwd, CONFIG_TABLES["fwd"], _TUNE_KEY)


def untuned_config(which: str, q: torch.Tensor, aligned: bool, precision: str) -> tuple:
    """The first candidate of a launch's row ("fwd", "dq", "dkdv", "dkdv_atomic" or
    "dkdv_partials"): what runs, launched directly and
    untimed, when a launcher gets ``autotune=False``. (Pruning the autotuner to one candidate is
    not enough: Triton before 3.7 still times a lone candidate.)"""
    configs = {"fwd": fwd_configs, "dq": dq_configs, "dkdv": dkdv_configs, "dkdv_atomic": dkdv_atomic_configs,
               "dkdv_partials": dkdv_partials_configs}[which]
    return configs(padded_head_dim(q.shape[-1]), q.element_size(), precision, aligned, table_arch(q.device))[0]


# Soft-capped launches (Gemma 2's attention) run one tile per row, untimed: the row's first
# candidate (what autotune=False runs), except where the tanh and, in the backward, the tile of
# 1 - tanh^2 kept beside p push that tile into spilling. The build report compiles these tiles
# with SOFTCAP; the backward with soft-capping is always the deterministic one. Keyed (kernel, aligned, padded head dim row, kind[, table arch]) -> tile.
# What spilled with the cap (bytes of stack, dense/varlen) and took the tile below instead:
#   forward  16-bit d64 (128,64,8,3) 8-16 B on sm_100.
#   dQ       16-bit d64 (128,64,8,2) 8-24 B on sm_80/86 (128 keys x 64 rows of tanh held);
#            d80-128 (64,64,4,2) 24 B on sm_120, and 8 B varlen on sm_100 once the kernels took
#            the program order's head_group ((64,32,8,2): 73 registers there); unaligned tf32 d64
#            (64,32,4,2) 8 B on sm_120.
#   dK/dV    16-bit d64 (32,64,8,2) 8-16 B on sm_120; d80-128 (32,64,8,2) 16 B on sm_100; ieee
#            d80/96 (16,32,4,1) 208-416 B on sm_90/100. (tf32 d80-128 on sm_90 ran (32,32,8,2) here
#            until it spilled 8 B varlen once the kernel's body became a helper: it runs its row's
#            first candidate, (32,32,4,2), 165 registers.)
#            With the loop's row pointers carried (not recomputed per step), ptxas held two 4-warp
#            tiles at 128 registers and spilled 8 B: unaligned 16-bit d64 (32,32,4,2) on sm_100
#            (8 warps: 160-161 registers) and ieee d64 varlen (16,32,4,1) on sm_90 (8 warps: 66-69).
_SOFTCAP_TILES: dict[tuple, tuple] = {
    ("fwd", True, 64, "16-bit", 100): (64, 64, 4, 3),
    ("dq", True, 64, "16-bit"): (128, 32, 8, 2),
    ("dq", True, 128, "16-bit", 120): (64, 32, 8, 2),
    ("dq", True, 128, "16-bit", 100): (64, 32, 8, 2),
    ("dq", False, 64, "tf32"): (32, 32, 4, 2),
    ("dkdv", True, 64, "16-bit", 120): (32, 32, 8, 2),
    ("dkdv", False, 64, "16-bit", 100): (32, 32, 8, 2),
    ("dkdv", True, 64, "ieee", 90): (16, 32, 8, 1),
    ("dkdv", True, 128, "16-bit", 100): (32, 32, 8, 2),
    ("dkdv", True, 128, "ieee"): (16, 16, 4, 1),
}


def softcap_tile(which: str, d_pad: int, elem_bytes: int, precision: str = "ieee", aligned: bool = True,
                 sm: int = 80) -> tuple:
    """The tile (BLOCK_M, BLOCK_N, num_warps, num_stages) a soft-capped launch of kernel
    ``which`` ("fwd", "dq" or "dkdv") runs on table arch ``sm``; arguments as :func:`fwd_configs`."""
    kind = precision if elem_bytes >= 4 else "16-bit"
    row = (which, aligned, max(64, d_pad), kind)
    tile = _SOFTCAP_TILES.get((*row, sm), _SOFTCAP_TILES.get(row))
    if tile is not None:
        return tile
    configs = {"fwd": fwd_configs, "dq": dq_configs, "dkdv": dkdv_configs}[which]
    return configs(d_pad, elem_bytes, precision, aligned, sm)[0]


def softcap_config(which: str, q: torch.Tensor, aligned: bool, precision: str) -> tuple:
    """:func:`softcap_tile` for a launch on ``q``'s device."""
    return softcap_tile(which, padded_head_dim(q.shape[-1]), q.element_size(), precision, aligned,
                        table_arch(q.device))


def strides_aligned(*tensors) -> bool:
    """True when every batch/head/row stride is a multiple of 16 elements (see ``aligned16``).
    Otherwise the kernels run their ALIGNED=False specialisation with the smaller tiles of the
    ``*_UNALIGNED`` tables (slower, still correct; the build report lists those builds too): only
    unusual views (head dims not a multiple of 16, odd slices) get it."""
    return all(s % 16 == 0 for t in tensors for s in t.stride()[:3])


def mask_bounds(causal: bool, window: tuple[int, int] | None, limit: int) -> tuple[int, int]:
    """(before, after) of the kernels' mask from causal + window=(left, right), -1 = unlimited."""
    before, after = limit, limit
    if window is not None:
        left, right = window
        # clamped: the kernels add these to positions in 32 bits, and a huge "unlimited" window
        # such as 2**31 - 1 would wrap (no key visited, zero gradients, silently)
        before = min(left, limit) if left >= 0 else limit
        after = min(right, limit) if right >= 0 else limit
    if causal:
        after = min(after, 0)
    return before, after


def flash_attention_forward(q, k, v, *, scale: float, before: int, after: int, cu_seqlens_q=None,
                            cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                            precision: str = "ieee", config: tuple | None = None, autotune: bool = True,
                            softcap: float = 0.0, head_group: int = 1):
    """Launches the forward; returns (out like q, stats (2, B, Hq, Tq) fp32).

    ``stats[0]`` is the row max m of the scores in base 2 (s * scale * log2 e, soft-capped when
    ``softcap`` > 0), ``stats[1]``
    log2 of the softmax denominator; the natural-log lse is ``(stats[0] + stats[1]) * ln 2``
    (-inf for a row without any visible key).

    ``before``/``after`` come from :func:`mask_bounds`. Varlen: q/k/v are (1, H, total, D) and
    ``cu_seqlens_q/k`` int32 (N + 1,); ``max_seqlen_*`` size the grid. ``config``
    (BLOCK_M, BLOCK_N, num_warps, num_stages) bypasses the autotuner (the interpreter, tests).
    ``precision`` is tl.dot's input precision for fp32 inputs ("ieee" or "tf32"). ``scale`` must
    be > 0: 16-bit scores are scaled after the row max (``ops.flash_attention`` maps other scales).
    ``autotune=False`` launches the row's first candidate untimed (:func:`untuned_config`).
    ``softcap`` > 0 caps the scores to ``softcap * tanh(s / softcap)`` (0: off); such launches
    run :func:`softcap_config`'s tile, untimed. ``head_group``: the programs' order (see
    :func:`ordered_program`; 1: a (sequence, head)'s query blocks one after another). It changes
    when each program runs, never what it computes: the results are the same bits.
    """
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    out = torch.empty_like(q)  # same memory layout as q: a (B,T,H,D)-backed q gives a (B,T,H,D)-backed out
    lse = torch.empty((2, B, Hq, Tq), device=q.device, dtype=torch.float32)
    varlen = cu_seqlens_q is not None
    n_seq = cu_seqlens_q.numel() - 1 if varlen else B
    mq, mk = (max_seqlen_q, max_seqlen_k) if varlen else (Tq, Tk)
    if q.numel() == 0 or n_seq == 0 or mq == 0:
        lse[0].fill_(float("-inf"))
        lse[1].fill_(0.0)
        return out.zero_(), lse
    cu_q = cu_seqlens_q if varlen else lse  # any pointer; unused when not IS_VARLEN
    cu_k = cu_seqlens_k if varlen else lse
    args = (q, k, v, out, lse, cu_q, cu_k, scale, softcap,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[1:3], lse.stride(0),
            Hq, Hq // Hk, Tq, Tk, before, after, checked_head_group(head_group, n_seq * Hq, triton.cdiv(mq, 16)),
            seqlen_bucket(mq), key_bucket(mk, mq, before, after))
    meta = dict(HEAD_DIM=D, D_PAD=padded_head_dim(D), IS_VARLEN=varlen, PRECISION=precision,
                ALIGNED=strides_aligned(q, k, v, out), SOFTCAP=softcap > 0)
    with torch.cuda.device_of(q):  # Triton launches (and the autotuner times) on the current device
        if config is None and softcap > 0:
            config = softcap_config("fwd", q, meta["ALIGNED"], precision)
        if config is None and not autotune:
            config = untuned_config("fwd", q, meta["ALIGNED"], precision)
        if config is not None:
            bm, bn, w, s = config
            _attn_fwd[(triton.cdiv(mq, bm), n_seq * Hq)](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=w,
                                                        num_stages=s)
        else:
            _attn_fwd_tuned.for_device(q.device)[lambda m: (triton.cdiv(mq, m["BLOCK_M"]), n_seq * Hq)](*args, **meta)
    return out, lse
