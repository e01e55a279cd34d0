"""Flash attention backward: three deterministic kernels by default, or two with atomic dQ adds
(or two, deterministic, with dQ partials).

With s = q k^T * scale, p = exp(s - lse) (lse saved by the forward) and dO the upstream gradient:

    dV = p^T dO                          dP = dO V^T
    dS = p * (dP - delta),  delta = rowsum(dO * O) - dlse        (dlse: gradient of the lse output)
    dQ = scale * dS K                    dK = scale * dS^T Q

Soft-capped scores (``SOFTCAP``, Gemma 2), s = cap * tanh(s_raw / cap): p and dS above are
those of the capped s, and the chain rule through the cap multiplies dS by its derivative before
the two products, dS_raw = dS * (1 - tanh^2) (``capped_scores`` returns the tanh).

1. ``_bwd_preprocess``: delta per query row, in fp32.
2. ``_attn_bwd_dkdv``: one program owns a block of keys of one KV head, keeps K, V and the fp32
   dK/dV accumulators on chip and streams the query blocks that can see it, for EVERY query head
   of its GQA group in turn. The group sum happens in registers: no repeat_kv copy, no reduction
   pass, no atomics.
3. ``_attn_bwd_dq``: one program owns a block of queries and streams keys, like the forward.
   Recomputing p here costs two extra matmuls against a fused kernel with atomic dQ adds, and
   buys bit-identical gradients run to run (the order of every sum is fixed).

``deterministic=False`` (16-bit inputs) is that fused kernel: the dK/dV kernel also forms
dS K for each block of query rows it visits and adds it into an fp32 dQ buffer with atomic adds,
and kernel 3 does not run: five matmuls per (query block, key block) pair instead of seven, as in
flash-attn 2 and SDPA's flash backend. The key blocks add to a row in whatever order they
finish, so dQ varies in its last bits from run to run.

``dq_partials=P`` (16-bit inputs; ``set_deterministic_backward("partials")`` in the op) is the
same five-matmul kernel made deterministic: P programs per (sequence, KV head), each owning the
key blocks p, p + P, ..., add into P fp32 partials of dQ, one each, and the partials are summed
in a fixed order (see ``_attn_bwd_dkdv``: why the adds into one partial land in a fixed order).

Masks and block skipping are the forward's (see ``flash_attention.py``): the dK/dV kernel asks
:func:`block_span` the transposed question (which query rows can see this key block).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash_attention import (_TUNE_KEY, CONFIG_TABLES, LAUNCH_VARYING_INTS, ArchAutotuner, aligned16, block_span,
                              capped_scores, checked_head_group, key_bucket, load_rows, ordered_program,
                              padded_head_dim, seqlen_bucket, sequence_bounds, softcap_config, store_rows,
                              strides_aligned, untuned_config)

__all__ = ["flash_attention_backward"]


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "n_heads", "seqlen"])  # see LAUNCH_VARYING_INTS
def _bwd_preprocess(O, DO, DLSE, DELTA,
                    stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot, stride_lb, stride_lh,
                    n_heads, seqlen,
                    HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dlse over the rows of one (batch, head). Varlen needs nothing
    special: every row of the packed T axis belongs to exactly one sequence."""
    start_m = tl.program_id(0) * BLOCK_M
    b = (tl.program_id(1) // n_heads).to(tl.int64)
    h = (tl.program_id(1) % n_heads).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    o = load_rows(O + b * stride_ob + h * stride_oh + tl.cast(start_m, tl.int64) * stride_ot, offs_m, stride_ot,
                  offs_d, seqlen - start_m, HEAD_DIM, D_PAD)
    do = load_rows(DO + b * stride_dob + h * stride_doh + tl.cast(start_m, tl.int64) * stride_dot, offs_m, stride_dot,
                   offs_d, seqlen - start_m, HEAD_DIM, D_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = b * stride_lb + h * stride_lh + start_m + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=start_m + offs_m < seqlen, other=0.0)
    tl.store(DELTA + row, delta, mask=start_m + offs_m < seqlen)


@triton.jit
def _load_row_stats(stat_base, stride_lp, delta_base, rows, q_len):
    """(m, log2 l, delta) of a block of rows, as the forward saved them (base 2). A row that saw
    no key (m = -inf) and a padding row get m = +inf, so p = 2^(s - inf) = 0, not inf or NaN."""
    m = tl.load(stat_base + rows, mask=rows < q_len, other=float("inf"))
    log2_l = tl.load(stat_base + stride_lp + rows, mask=rows < q_len, other=0.0)
    delta = tl.load(delta_base + rows, mask=rows < q_len, other=0.0)
    m = tl.where(m == float("-inf"), float("inf"), m)
    return m, log2_l, delta


# ----------------------------------------------------------------------------------------------
# dK, dV
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, stat_ptr, stride_lp, delta_ptr, dq_ptr, stride_qt, stride_dot,
                stride_dqt, q_len, k_len, start_m, k_pos, offset, offs_m, offs_d, qk_scale, sm_scale, softcap,
                before, after, edge, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr):
    """Adds one block of query rows [start_m, start_m + BLOCK_M) to dV += p^T dO, dK += dS^T Q
    (and, with ``ATOMIC_DQ``, dS K to those rows of the fp32 dQ buffer, unscaled).

    ``edge``: the block straddles a mask border (diagonal, window side, sequence end) and pays for
    the mask; every other block is fully visible and skips it (a uniform branch, no divergence).

    fp16/bf16: the scores are recomputed transposed, s^T = K Q^T, so p^T and dS^T come out as
    the left operands of the next two products directly (no layout conversion, fewer registers).
    fp32: they are recomputed as Q K^T, the forward's orientation, so each element repeats the
    forward's dot bit for bit and p = 2^((s - m) - log2 l) is exact even where |s| is 1e4 (one
    ulp of s there is 1e-3 in p: far below a 16-bit p's own rounding, not below fp32's).
    16-bit: the row's two statistics are added first, lse2 = m + log2 l (once per row), so each
    score costs one fused multiply-add before the exp2: p = 2^(dot * scale - lse2). Rounding lse2
    moves p by at most an ulp of |m| (3e-4 relative where |s| is 1e4, the size of the error s
    itself carries there; 1e-7 at ordinary logits), below the 16-bit rounding p then gets.
    """
    rows = start_m + offs_m
    q = load_rows(q_ptr, offs_m, stride_qt, offs_d, q_len - start_m, HEAD_DIM, D_PAD)
    do = load_rows(do_ptr, offs_m, stride_dot, offs_d, q_len - start_m, HEAD_DIM, D_PAD)
    m, log2_l, delta = _load_row_stats(stat_ptr, stride_lp, delta_ptr, offs_m, q_len - start_m)
    q_pos = rows + offset
    if q.dtype == tl.float32:
        tl.static_assert(not ATOMIC_DQ, "fp32 runs the deterministic backward only")
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP:
            s, th = capped_scores(s, sm_scale, softcap)
        else:
            s = s * qk_scale
        if edge:  # hidden scores may exceed the row max: -inf keeps 2^(s - m) from overflowing
            visible = ((rows[:, None] < q_len) & (k_pos[None, :] >= q_pos[:, None] - before)
                       & (k_pos[None, :] <= q_pos[:, None] + after))
            s = tl.where(visible, s, float("-inf"))
        p = tl.math.exp2((s - m[:, None]) - log2_l[:, None])
        dv = tl.dot(tl.trans(p), do, dv, input_precision=PRECISION)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
    else:
        lse2 = m + log2_l  # +inf for padding rows and rows without keys: p = 0
        qk_t = tl.dot(k, tl.trans(q))  # unscaled; -inf stays -inf through the fma below
        if SOFTCAP:
            qk_t, th_t = capped_scores(qk_t, sm_scale, softcap)  # scaled, capped, log2 domain
        if edge:
            visible = ((rows[None, :] < q_len) & (k_pos[:, None] >= q_pos[None, :] - before)
                       & (k_pos[:, None] <= q_pos[None, :] + after))
            qk_t = tl.where(visible, qk_t, float("-inf"))
        if SOFTCAP:
            p_t = tl.math.exp2(qk_t - lse2[None, :])
        else:
            # explicit: a scaled tile that passes the mask branch is not fused (sm_90 SASS: FMUL, FADD)
            p_t = tl.math.exp2(tl.fma(qk_t, qk_scale, -lse2[None, :]))
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - th_t * th_t)
        ds_t = ds_t.to(q.dtype)
        dk = tl.dot(ds_t, q, dk)
        if ATOMIC_DQ:
            # Keys past k_len (a partial key block) repeat the last key (load_rows), and no mask
            # hides them from an interior block's rows: their dS rows, garbage (even inf or NaN:
            # the repeated key may outscore a row's max), must not reach dQ. Their own dK/dV rows
            # are never stored. Padding query rows have p = 0 and masked addresses.
            ds_t = tl.where(k_pos[:, None] < k_len, ds_t, tl.zeros_like(ds_t))
            # relaxed: only the sum matters, no ordering against other memory (no fence per add)
            dq = tl.dot(tl.trans(ds_t), k)
            ptrs = dq_ptr + offs_m[:, None].to(tl.int64) * stride_dqt + offs_d[None, :]
            tl.atomic_add(ptrs, dq, mask=(offs_m[:, None] < q_len - start_m) & (offs_d[None, :] < HEAD_DIM),
                          sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, sm_scale, softcap,
               stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
               stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
               stride_dvb, stride_dvh, stride_dvt, stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh, stride_lp,
               group, b, hk, q_start, q_len, k_start, k_len, start_n, before, after,
               HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, SOFTCAP: tl.constexpr):
    """dK and dV of the keys [start_n, start_n + BLOCK_N) of one (sequence, KV head), stored
    (``ATOMIC_DQ``: their dS K added into DQ too).

    ONE loop runs over (query head of the group, query block) pairs, the edge blocks included:
    a loop per mask phase and per head (the obvious structure) made three copies of the body,
    each with its own pipeline prologue and hoisted loop invariants, all live at once inside the
    head loop. That cost 50-90 registers per thread and made every tile with 64 keys spill; as one
    loop the software pipeline also keeps streaming across the head boundary.
    """
    b = b.to(tl.int64)
    k_row0 = (k_start + start_n).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    k = load_rows(K + b * stride_kb + hk.to(tl.int64) * stride_kh + k_row0 * stride_kt, offs_n, stride_kt, offs_d,
                  k_len - start_n, HEAD_DIM, D_PAD)
    v = load_rows(V + b * stride_vb + hk.to(tl.int64) * stride_vh + k_row0 * stride_vt, offs_n, stride_vt, offs_d,
                  k_len - start_n, HEAD_DIM, D_PAD)

    # Key j is seen by rows at absolute positions [j - after, j + before]; row index = pos - offset.
    offset = k_len - q_len
    k_pos = start_n + offs_n
    n_real = tl.minimum(k_len - start_n, BLOCK_N)  # keys past k_len are never stored
    lo, mid_lo, mid_hi, hi = block_span(start_n - offset, start_n + n_real - 1 - offset, after, before,
                                        q_len, BLOCK_M)
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)  # query blocks per head (0: no row sees a key)

    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # The GQA sum: every query head that reads this KV head, in registers (no atomics, fixed order).
    # A step's rows are those of (query head, block start_m): their pointers advance a block per
    # step and jump to the next head's first block after its last. Recomputed from the step index
    # (a division, 64-bit products of head and row by their strides), a step compiled to 478 SASS
    # instructions beside 12 tensor-core ops at d64 on sm_90, 426 this way (d128: 535 and 492).
    h0 = (hk * group).to(tl.int64)
    row0 = (q_start + lo).to(tl.int64)
    q_ptr = Q + b * stride_qb + h0 * stride_qh + row0 * stride_qt
    do_ptr = DO + b * stride_dob + h0 * stride_doh + row0 * stride_dot
    dq_ptr = DQ + b * stride_dqb + h0 * stride_dqh + row0 * stride_dqt
    stats = b * stride_lb + h0 * stride_lh + row0
    back = ((n_blocks - 1) * BLOCK_M).to(tl.int64)  # from a head's last block to its first row
    end_m = lo + n_blocks * BLOCK_M
    start_m = lo
    for it in range(0, group * n_blocks):
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, LSE + stats, stride_lp, DELTA + stats, dq_ptr,
                             stride_qt, stride_dot, stride_dqt, q_len, k_len, start_m, k_pos, offset, offs_m, offs_d,
                             qk_scale, sm_scale, softcap, before, after, (start_m < mid_lo) | (start_m >= mid_hi),
                             HEAD_DIM, D_PAD, PRECISION, ATOMIC_DQ, SOFTCAP)
        start_m += BLOCK_M
        next_head = start_m >= end_m
        start_m = tl.where(next_head, lo, start_m)
        q_ptr += tl.where(next_head, stride_qh - back * stride_qt, BLOCK_M * stride_qt.to(tl.int64))
        do_ptr += tl.where(next_head, stride_doh - back * stride_dot, BLOCK_M * stride_dot.to(tl.int64))
        dq_ptr += tl.where(next_head, stride_dqh - back * stride_dqt, BLOCK_M * stride_dqt.to(tl.int64))
        stats += tl.where(next_head, stride_lh - back, BLOCK_M)
    store_rows(DK + b * stride_dkb + hk.to(tl.int64) * stride_dkh + k_row0 * stride_dkt, dk * sm_scale,
               offs_n, stride_dkt, offs_d, k_len - start_n, HEAD_DIM)
    store_rows(DV + b * stride_dvb + hk.to(tl.int64) * stride_dvh + k_row0 * stride_dvt, dv,
               offs_n, stride_dvt, offs_d, k_len - start_n, HEAD_DIM)


@triton.jit(do_not_specialize=LAUNCH_VARYING_INTS + ["n_kv_heads", "stride_dqs"])
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, CU_Q, CU_K,
    sm_scale, softcap,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_dqb, stride_dqh, stride_dqt, stride_dqs,
    stride_lb, stride_lh, stride_lp,
    n_kv_heads, group, seqlen_q, seqlen_k, before, after, head_group,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DQ_PARTIALS: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_N keys of one (sequence, KV head); all query heads of its group.
    ``ATOMIC_DQ``: also adds dS K into the fp32 buffer DQ (unscaled; DQ is unused otherwise).

    ``DQ_PARTIALS`` (with ``ATOMIC_DQ``): program p of P along axis 0 owns the key blocks p,
    p + P, p + 2P, ... and the fp32 partial p of DQ (``stride_dqs`` apart), which no other
    program touches. Each element of a partial is added to by one thread only, in program order
    (key block by key block, head by head), so the sums come out the same on every run without
    any ordering between programs; the launcher sums the P partials in a fixed order. Five
    matmuls per (query block, key block) pair like the atomic kernel, deterministic like the
    separate dQ pass, for P partials of memory.
    """
    stride_qb, stride_qh, stride_qt = aligned16(stride_qb, stride_qh, stride_qt, ALIGNED)
    stride_kb, stride_kh, stride_kt = aligned16(stride_kb, stride_kh, stride_kt, ALIGNED)
    stride_vb, stride_vh, stride_vt = aligned16(stride_vb, stride_vh, stride_vt, ALIGNED)
    stride_dob, stride_doh, stride_dot = aligned16(stride_dob, stride_doh, stride_dot, ALIGNED)
    stride_dkb, stride_dkh, stride_dkt = aligned16(stride_dkb, stride_dkh, stride_dkt, ALIGNED)
    stride_dvb, stride_dvh, stride_dvt = aligned16(stride_dvb, stride_dvh, stride_dvt, ALIGNED)
    stride_dqb, stride_dqh, stride_dqt = aligned16(stride_dqb, stride_dqh, stride_dqt, ALIGNED)
    if DQ_PARTIALS:  # (P programs per row, each over key blocks across the sequence: no order to pick)
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
    else:  # (key block 0 is the longest under a causal mask: most query rows see it)
        pid_n, row = ordered_program(head_group, False)
    seq = row // n_kv_heads
    hk = row % n_kv_heads
    b, q_start, q_len, k_start, k_len = sequence_bounds(CU_Q, CU_K, seq, seqlen_q, seqlen_k, IS_VARLEN)
    if DQ_PARTIALS:
        tl.static_assert(ATOMIC_DQ, "dQ partials are added by the atomic-dQ path")
        if ALIGNED:  # (B * Hq * Tq * D, a multiple of 16: without the hint the adds were scalar, not v4)
            stride_dqs = (stride_dqs // 16) * 16
        dq_partial = DQ + pid_n.to(tl.int64) * stride_dqs
        for start_n in range(pid_n * BLOCK_N, k_len, tl.num_programs(0) * BLOCK_N):
            _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, dq_partial, sm_scale, softcap,
                       stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                       stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
                       stride_dvb, stride_dvh, stride_dvt, stride_dqb, stride_dqh, stride_dqt,
                       stride_lb, stride_lh, stride_lp, group, b, hk, q_start, q_len, k_start, k_len, start_n,
                       before, after, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, PRECISION, ATOMIC_DQ, SOFTCAP)
    else:
        start_n = pid_n * BLOCK_N
        if start_n >= k_len:
            return
        _dkdv_keys(Q, K, V, DO, LSE, DELTA, DK, DV, DQ, sm_scale, softcap,
                   stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
                   stride_dvb, stride_dvh, stride_dvt, stride_dqb, stride_dqh, stride_dqt,
                   stride_lb, stride_lh, stride_lp, group, b, hk, q_start, q_len, k_start, k_len, start_n,
                   before, after, HEAD_DIM, D_PAD, BLOCK_M, BLOCK_N, PRECISION, ATOMIC_DQ, SOFTCAP)


# ----------------------------------------------------------------------------------------------
# dQ
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=LAUNCH_VARYING_INTS + ["n_heads"])
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    sm_scale, softcap,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh, stride_lp,
    n_heads, group, seqlen_q, seqlen_k, before, after, head_group,
    Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (sequence, query head); K/V stream through.

        dQ = scale * sum over key blocks of dS K,  dS = p * (dO V^T - delta),  p = 2^(s - m - log2 l)

    One loop over the key blocks the rows can see; only the edge blocks (``block_span``) apply
    the mask, behind a uniform branch (one copy of the loop body: see ``_attn_bwd_dkdv``).
    16-bit inputs use lse2 = m + log2 l, fixed for the program's rows (see ``_dkdv_block``).
    Query blocks run last-first like the forward's, in its order (``ordered_program``); dK/dV
    needs no reversal, its first key blocks are already the ones most query rows see.
    """
    stride_qb, stride_qh, stride_qt = aligned16(stride_qb, stride_qh, stride_qt, ALIGNED)
    stride_kb, stride_kh, stride_kt = aligned16(stride_kb, stride_kh, stride_kt, ALIGNED)
    stride_vb, stride_vh, stride_vt = aligned16(stride_vb, stride_vh, stride_vt, ALIGNED)
    stride_dob, stride_doh, stride_dot = aligned16(stride_dob, stride_doh, stride_dot, ALIGNED)
    stride_dqb, stride_dqh, stride_dqt = aligned16(stride_dqb, stride_dqh, stride_dqt, ALIGNED)
    pid_m, row = ordered_program(head_group, True)  # longest first, as in the forward
    seq = row // n_heads
    h = row % n_heads
    b, q_start, q_len, k_start, k_len = sequence_bounds(CU_Q, CU_K, seq, seqlen_q, seqlen_k, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return
    b = b.to(tl.int64)
    hq = h.to(tl.int64)
    hk = (h // group).to(tl.int64)
    row0 = (q_start + start_m).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    q = load_rows(Q + b * stride_qb + hq * stride_qh + row0 * stride_qt, offs_m, stride_qt, offs_d,
                  q_len - start_m, HEAD_DIM, D_PAD)
    do = load_rows(DO + b * stride_dob + hq * stride_doh + row0 * stride_dot, offs_m, stride_dot, offs_d,
                   q_len - start_m, HEAD_DIM, D_PAD)
    stats = b * stride_lb + hq * stride_lh + q_start + start_m
    m, log2_l, delta = _load_row_stats(LSE + stats, stride_lp, DELTA + stats, offs_m, q_len - start_m)
    lse2 = m + log2_l  # the 16-bit statistic: one fused multiply-add per score (fp32 keeps both)
    k_base = K + b * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kt
    v_base = V + b * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vt

    q_pos = start_m + offs_m + (k_len - q_len)
    n_real = tl.minimum(q_len - start_m, BLOCK_M)
    lo, mid_lo, mid_hi, hi = block_span(start_m + k_len - q_len, start_m + n_real - 1 + k_len - q_len,
                                        before, after, k_len, BLOCK_N)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        k = load_rows(k_base + tl.cast(start_n, tl.int64) * stride_kt, offs_n, stride_kt, offs_d, k_len - start_n,
                      HEAD_DIM, D_PAD)
        v = load_rows(v_base + tl.cast(start_n, tl.int64) * stride_vt, offs_n, stride_vt, offs_d, k_len - start_n,
                      HEAD_DIM, D_PAD)
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # s / scale (16-bit) or s (fp32)
        if SOFTCAP:
            t, th = capped_scores(t, sm_scale, softcap)
        elif q.dtype == tl.float32:
            t = t * qk_scale  # the forward's s bit for bit (the mask branch keeps it unfused)
        if (start_n < mid_lo) | (start_n >= mid_hi):  # edge block: hidden scores may exceed the row
            k_pos = start_n + offs_n                    # max, -inf keeps 2^(s - m) from overflowing
            visible = ((k_pos[None, :] < k_len) & (k_pos[None, :] >= q_pos[:, None] - before)
                       & (k_pos[None, :] <= q_pos[:, None] + after))
            t = tl.where(visible, t, float("-inf"))
        if q.dtype == tl.float32:
            p = tl.math.exp2((t - m[:, None]) - log2_l[:, None])
        elif SOFTCAP:
            p = tl.math.exp2(t - lse2[:, None])
        else:
            p = tl.math.exp2(tl.fma(t, qk_scale, -lse2[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    store_rows(DQ + b * stride_dqb + hq * stride_dqh + row0 * stride_dqt, dq * sm_scale, offs_m, stride_dqt,
               offs_d, q_len - start_m, HEAD_DIM)


_attn_bwd_dkdv_tuned = ArchAutotuner(_attn_bwd_dkdv, CONFIG_TABLES["dkdv"], _TUNE_KEY)
_attn_bwd_dq_tuned = ArchAutotuner(_attn_bwd_dq, CONFIG_TABLES["dq"], _TUNE_KEY)
# The atomic variant has its own tiles (it holds a dQ tile too) and its own tuning cache. Each
# timed run adds into DQ: the autotuner zeroes it before each (and before the run that counts;
# restore_value would add a clone and a copy-back of the fp32 buffer to every timed run).
_attn_bwd_dkdv_atomic_tuned = ArchAutotuner(_attn_bwd_dkdv, CONFIG_TABLES["dkdv_atomic"], _TUNE_KEY,
                                            reset_to_zero=["DQ"])
# The partials kernel: tiles and a tuning cache of its own (its loop over key blocks holds more
# registers than the atomic kernel's step alone: see _DKDV_PARTIALS).
_attn_bwd_dkdv_partials_tuned = ArchAutotuner(_attn_bwd_dkdv, CONFIG_TABLES["dkdv_partials"], _TUNE_KEY,
                                              reset_to_zero=["DQ"])


def dq_partial_count(n_programs: int, max_keys: int, dq_elements: int, device: torch.device) -> int:
    """How many fp32 dQ partials the partials backward (``dq_partials``) gives each (sequence, KV
    head), i.e. its programs per (sequence, KV head): enough for about four programs per SM
    across the ``n_programs`` (sequences x KV heads) (a program holds most of an SM's registers,
    and with four waves the last one idles at most a quarter of the GPU); at most one per 64
    keys (a program owns whole key blocks); at most 16, and at most 2 GiB of partials beyond the
    first (each is ``dq_elements`` fp32 numbers). 0 where even that leaves SMs without a program
    (long sequences of few heads: the recompute backward's one program per key block fills the
    GPU there); 1 off the GPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * sms, max(n_programs, 1))
    count = max(1, min(wanted, 16, triton.cdiv(max_keys, 64), 1 + (2 << 30) // max(4 * dq_elements, 1)))
    return count if count * n_programs >= sms else 0


def preprocess_block(d_pad: int, aligned: bool = True) -> int:
    """Rows per preprocess program: two (rows x D) tiles of about 8K elements each, 4K when a
    stride of O or dO is not a multiple of 16 (element-wise loads, a 64-bit address each: the 8K
    tiles at d80/96 spilled 8 bytes on sm_86, 168 registers; 4K: 62-80 on every arch)."""
    return max(16, (8192 if aligned else 4096) // d_pad)


def flash_attention_backward(do, q, k, v, out, lse, *, scale: float, before: int, after: int, dlse=None,
                             cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q: int = 0, max_seqlen_k: int = 0,
                             precision: str = "ieee", config_dq: tuple | None = None,
                             config_dkdv: tuple | None = None, autotune: bool = True,
                             deterministic: bool = True, softcap: float = 0.0, dq_partials: int = 0,
                             head_groups: tuple[int, int] = (1, 1)):
    """Launches the three backward kernels; returns (dq, dk, dv) with the layouts of q, k, v.

    ``do`` and ``out`` need a unit last stride; ``lse`` is the forward's (2, B, Hq, Tq) fp32
    statistics and ``dlse`` (optional, (B, Hq, Tq)) the gradient of the loss with respect to the
    natural-log lse, ``(lse[0] + lse[1]) * ln 2``. Other arguments as in
    ``flash_attention_forward``; ``config_*`` bypass the autotuner, and ``autotune=False`` takes
    each kernel's first candidate instead. ``deterministic=False`` (fp16/bf16 only) adds dQ with
    atomics inside the dK/dV kernel (``config_dkdv`` then picks its tile; see the module doc).
    ``softcap`` > 0: the forward's soft-capped scores (deterministic only; tiles from
    ``softcap_config``). ``dq_partials`` = P > 0 (fp16/bf16, deterministic, no softcap): the
    deterministic alternative to the dQ pass, two kernels with five matmuls a block pair like the
    atomic path: the dK/dV kernel runs P programs per (sequence, KV head), each adding its key
    blocks' dS K into an fp32 partial of its own (P x dQ's size in fp32, zeroed), and the P
    partials are summed in a fixed order (``dq_partial_count`` picks P; ``config_dkdv`` its tile).
    ``head_groups``: the ``head_group`` of the dQ kernel's (query heads) and of the dK/dV
    kernel's (KV heads) program order (``ordered_program``; the partials kernel keeps grid
    order). It changes when each program runs, never what it computes.
    """
    if not deterministic and q.dtype == torch.float32:
        raise ValueError("deterministic=False needs fp16/bf16 inputs; fp32 runs the deterministic backward")
    if not deterministic and softcap > 0:
        raise ValueError("deterministic=False does not take softcap; soft-capped scores run the deterministic backward")
    if dq_partials and (q.dtype == torch.float32 or softcap > 0 or not deterministic):
        raise ValueError("dq_partials needs fp16/bf16 inputs, no softcap and deterministic=True")
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    varlen = cu_seqlens_q is not None
    n_seq = cu_seqlens_q.numel() - 1 if varlen else B
    mq, mk = (max_seqlen_q, max_seqlen_k) if varlen else (Tq, Tk)
    if q.numel() == 0 or k.numel() == 0 or n_seq == 0 or mq == 0 or mk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    d_pad = padded_head_dim(D)

    delta = torch.empty_like(lse[0])
    assert lse.is_contiguous() and (dlse is None or dlse.is_contiguous())
    bm = preprocess_block(d_pad, strides_aligned(out, do))
    with torch.cuda.device_of(do):  # Triton launches (and the autotuner times) on the current device
        _bwd_preprocess[(triton.cdiv(Tq, bm), B * Hq)](
            out, do, dlse if dlse is not None else delta, delta, *out.stride()[:3], *do.stride()[:3],
            *delta.stride()[:2],
            Hq, Tq, HAS_DLSE=dlse is not None, HEAD_DIM=D, D_PAD=d_pad, BLOCK_M=bm,
            num_warps=4, num_stages=1)  # no loop to pipeline; the build report's build

        cu_q = cu_seqlens_q if varlen else delta
        cu_k = cu_seqlens_k if varlen else delta
        buckets = (seqlen_bucket(mq), key_bucket(mk, mq, before, after))
        common_q = (Hq // Hk, Tq, Tk, before, after,
                    checked_head_group(head_groups[0], n_seq * Hq, triton.cdiv(mq, 16)), *buckets)
        common_kv = (Hq // Hk, Tq, Tk, before, after,
                     checked_head_group(head_groups[1], n_seq * Hk, triton.cdiv(mk, 16)), *buckets)
        # atomic: dS K accumulates unscaled in fp32 rows of D elements, converted once at the end;
        # partials: the same, in P buffers (P, B, Hq, Tq, D), one per program along the key axis
        atomic = not deterministic or dq_partials > 0
        dq_acc = torch.zeros((max(dq_partials, 1), *q.shape[:3], D), device=q.device,
                             dtype=torch.float32) if atomic else dq[None]
        meta = dict(HEAD_DIM=D, D_PAD=d_pad, IS_VARLEN=varlen, PRECISION=precision,
                    ALIGNED=strides_aligned(q, k, v, do, dq, dk, dv, dq_acc[0]), SOFTCAP=softcap > 0)
        dkdv_args = (q, k, v, do, lse, delta, dk, dv, dq_acc, cu_q, cu_k, scale, softcap,
                     *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3],
                     *dv.stride()[:3], *dq_acc.stride()[1:4], dq_acc.stride(0) if dq_partials else 0,
                     *lse.stride()[1:3], lse.stride(0), Hk, *common_kv)
        dkdv_kind = "dkdv_partials" if dq_partials else "dkdv" if deterministic else "dkdv_atomic"
        if softcap > 0:
            config_dkdv = config_dkdv or softcap_config("dkdv", q, meta["ALIGNED"], precision)
            config_dq = config_dq or softcap_config("dq", q, meta["ALIGNED"], precision)
        if not autotune:
            config_dkdv = config_dkdv or untuned_config(dkdv_kind, q, meta["ALIGNED"], precision)
            config_dq = config_dq or untuned_config("dq", q, meta["ALIGNED"], precision)
        # one program per key block, or (partials) P programs that stride over the key blocks
        dkdv_grid = lambda block_n: (dq_partials or triton.cdiv(mk, block_n), n_seq * Hk)
        if config_dkdv is not None:
            bm, bn, w, s = config_dkdv
            _attn_bwd_dkdv[dkdv_grid(bn)](*dkdv_args, **meta, ATOMIC_DQ=atomic, DQ_PARTIALS=dq_partials > 0,
                                          BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
        else:
            tuned = {"dkdv": _attn_bwd_dkdv_tuned, "dkdv_atomic": _attn_bwd_dkdv_atomic_tuned,
                     "dkdv_partials": _attn_bwd_dkdv_partials_tuned}[dkdv_kind].for_device(q.device)
            tuned[lambda m: dkdv_grid(m["BLOCK_N"])](*dkdv_args, **meta, ATOMIC_DQ=atomic,
                                                     DQ_PARTIALS=dq_partials > 0)
        if atomic:
            # the partials summed in a fixed order (torch's sum over a leading axis: no atomics)
            dq_sum = dq_acc.sum(0) if dq_partials > 1 else dq_acc[0]
            return torch.mul(dq_sum, scale, out=dq), dk, dv  # (one pass: scaled, rounded to dq's dtype)
        dq_args = (q, k, v, do, lse, delta, dq, cu_q, cu_k, scale, softcap,
                   *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
                   *lse.stride()[1:3], lse.stride(0), Hq, *common_q)
        if config_dq is not None:
            bm, bn, w, s = config_dq
            _attn_bwd_dq[(triton.cdiv(mq, bm), n_seq * Hq)](*dq_args, **meta, BLOCK_M=bm, BLOCK_N=bn,
                                                            num_warps=w, num_stages=s)
        else:
            _attn_bwd_dq_tuned.for_device(q.device)[lambda m: (triton.cdiv(mq, m["BLOCK_M"]), n_seq * Hq)](
                *dq_args, **meta)
    return dq, dk, dv
