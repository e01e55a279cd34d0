"""Decode attention (flash-decoding): a few new query rows against a long, static KV cache.

Layout: q (B, Hq, Tq, D) with small Tq (1 to 16), k_cache/v_cache (B, Hk, Tmax, D), any strides
with a unit last stride (a transposed (B, T, H, D) projection, a slice of a bigger cache buffer).
``cache_seqlens`` (B,) int32 lives on the device: sequence b has ``L = cache_seqlens[b]`` valid
keys (the new tokens included) and its Tq queries are the LAST Tq of them (bottom-right causal
alignment: query t sits at slot ``L - Tq + t`` and reads keys ``0 .. L - Tq + t``; with
``cache_leftpad`` the keys of sequence b start at slot ``cache_leftpad[b]`` instead of 0, as in
flash-attn's ``flash_attn_with_kvcache``, for left-padded caches such as HF's static cache).
A sliding window of ``window_left`` keys (Mistral's, Gemma's local layers) narrows query t's keys
to ``q_pos - window_left .. q_pos``; the key blocks before the first row's bound are never read,
so a windowed layer reads at most ``window_left + Tq`` keys however long the cache is. The window
is a compile-time variant (``WINDOW``), so the kernels of full-attention layers are unchanged by it.
Soft-capped scores (Gemma 2's ``attn_logit_softcapping``, s = cap * tanh(s / cap) before the
mask) are one too (``SOFTCAP``).

Why a separate kernel from flash attention. With Tq = 1 a flash-attention program owns one
query row of one head, so every query head re-reads its KV head, and a batch of 1 launches only
B * Hq programs that each walk the whole cache serially. Decoding is bound by reading the cache,
so this kernel

* packs the ``group = Hq // Hk`` query heads that share a KV head (times the Tq rows) into ONE
  tile of rows: each K/V block is loaded once per group and used by a (group * Tq, D) x (D, N)
  tensor-core product (rows padded to 16, the smallest tl.dot);
* splits the key axis into ``num_splits`` chunks (grid: batch x KV head x split) so a batch of 1
  still fills the GPU, each chunk writing a partial output and its log-sum-exp in fp32; a small
  combine kernel then merges the chunks exactly:

      out = sum_s exp(lse_s - lse) * out_s,   lse = log sum_s exp(lse_s)

The lengths are read on the device (no host sync, CUDA-graph safe): the grid depends only on
shapes and the (fixed) number of splits; a chunk is ``cdiv(cdiv(L - leftpad, BLOCK_N), splits)``
blocks, so it adapts to the true length, and chunks past the end write lse = -inf and leave. A
length outside [0, Tmax] is clamped to it (never an out-of-bounds read). With one split the kernel
writes the normalised output directly and no combine runs. Every reduction is in a fixed order
(no atomics), so results are deterministic for a given ``num_splits``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .cross_entropy import _tanh as tanh

__all__ = ["decode_attention_forward", "decode_split_kernel", "decode_combine_kernel", "MAX_SPLITS",
           "strides_aligned", "block_m", "padded_head_dim"]

MAX_SPLITS = 32  # fixed upper bound: the combine tile holds them all, and CUDA graphs fix the grid

# Integers Triton must not specialise at launch. It would compile a variant for each value class
# (== 1, a multiple of 16, other) of every length, so launches compiled builds the build report
# never made (a dry run at decode shapes: 1838 of 1842 launches). Lengths, the window, the GQA
# group, the tile count and the LSE strides (0 in the single pass, split-count multiples
# otherwise) stay plain; q_len keeps only its == 1 specialisation
# ("do_not_specialize_on_alignment"): the one-token step is its own, simpler compile (the "tq1"
# builds). Strides keep their hints, which is what makes the K/V loads vectors.
SPLIT_UNSPECIALISED = ["use_leftpad", "window_left", "stride_lb", "stride_lh", "stride_lt", "group", "max_len",
                       "m_tiles"]


@triton.jit
def _capped_scores(qk, cap_scale, cap_log2, EXACT: tl.constexpr):
    """cap * tanh(qk * scale / cap) * log2(e), given ``cap_scale`` = scale / cap and ``cap_log2``
    = cap * log2(e).

    16-bit inputs: tanh(x) = 1 - 2 / (2^(2x log2 e) + 1), one exp2 and a division, no branch
    (2^... = inf or 0 gives +-cap exactly). Its absolute error, about 1e-7 of the cap, stays
    within what 16-bit q and k already put into a score for caps up to 1e4 (there, on scores of
    0.1: 1.4x PyTorch's fp16 output error; ops.decode_attention refuses larger caps). It does
    not keep tanh's relative accuracy near 0, which flash attention's tanh pays for with a
    series computed beside the exponential for every score: those extra live values made 53
    decode builds spill 8-72 bytes. fp32 inputs (EXACT), whose scores carry 1e-7 of their own
    size, take that tanh (the cheap one gave 7x PyTorch's fp32 error at Gemma 2's cap of 50).
    """
    if EXACT:
        return tanh(qk * cap_scale) * cap_log2
    return cap_log2 - (2.0 * cap_log2) / (tl.math.exp2(qk * (cap_scale * 2.8853900817779268)) + 1.0)


@triton.jit
def _attend_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, seqlen, q_pos, window,
                   offs_n, offs_d, qk_scale, cap_log2,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                   ROW_WINDOWS: tl.constexpr, SOFTCAP: tl.constexpr):
    """Online softmax over the key blocks [lo, hi), in the log2 domain:

        s = q k^T * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
        l' = l * 2^(m - m') + rowsum p;  acc' = acc * 2^(m - m') + p v

    With SOFTCAP the scores are capped first, s = cap * tanh(q k^T * scale / cap) * log2(e)
    (``qk_scale`` is then scale / cap, ``cap_log2`` cap * log2(e)); see :func:`_capped_scores`.

    Every block checks the causal bound ``key <= q_pos`` (with ROW_WINDOWS also the window's,
    ``q_pos - window <= key``) and the cache end ``key < seqlen``; the slots past ``seqlen`` may
    hold anything (stale or NaN), so they are not even loaded: a NaN in v would survive
    ``0 * NaN`` in the p v product.

    One loop, masked throughout, on purpose. Peeling the unmasked blocks into a loop of their
    own (as flash attention does) saves a compare and a select per score, which decode never
    notices (it waits on the K/V bytes, not on the ALU), but the second copy of the pipelined
    loop kept more values live and ptxas spilled 8-24 bytes on sm_80 to reach its occupancy
    step (64 registers at 8 warps, 128 at 4).
    """
    d_ok = offs_d[None, :] < HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        # A 64-bit block base plus 32-bit offsets inside the block: int64 offset tiles would
        # double the registers of every pointer tile (the cause of spills at 64 x 128 tiles).
        k_ptrs = k_base + tl.cast(start, tl.int64) * stride_kt + (offs_n[:, None] * stride_kt + offs_d[None, :])
        v_ptrs = v_base + tl.cast(start, tl.int64) * stride_vt + (offs_n[:, None] * stride_vt + offs_d[None, :])
        in_cache = (keys[:, None] < seqlen) & d_ok
        k = tl.load(k_ptrs, mask=in_cache, other=0.0)
        v = tl.load(v_ptrs, mask=in_cache, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = _capped_scores(s, qk_scale, cap_log2, q.dtype == tl.float32) if SOFTCAP else s * qk_scale
        if ROW_WINDOWS:
            # q_pos - window <= key <= q_pos as one unsigned compare: a key after q_pos (or a
            # row before the first key, q_pos < 0) wraps to a distance above any window
            distance = (q_pos[:, None] - keys[None, :]).to(tl.uint32, bitcast=True)
            s = tl.where(distance <= window, s, float("-inf"))
        else:
            s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key keeps m = -inf; subtracting 0 instead keeps
        # 2^(-inf - -inf) = NaN out (its p and alpha come out 0).
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # p is rounded to the cache dtype for the tensor-core product, as in flash attention.
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=SPLIT_UNSPECIALISED, do_not_specialize_on_alignment=["q_len"])
def decode_split_kernel(
    Q, K, V, SEQLENS, LEFTPAD, O, LSE,
    sm_scale, softcap, use_leftpad, window_left,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot, stride_os,
    stride_lb, stride_lh, stride_lt,
    q_len, group, max_len, m_tiles,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_M (query head, query row) pairs of one KV head, one chunk of keys.

    Grid (B, Hk * m_tiles, num_splits). SPLIT=False (one split): O is the final output
    (B, Hq, Tq, D) in the input dtype. SPLIT=True: O is the fp32 partial output
    (B, Hq, Tq, splits, D) and LSE (B, Hq, Tq, splits) the natural-log log-sum-exp per chunk.

    Strides arrive as they are. A launch whose strides are all multiples of 16 elements (every
    dense or HF layout with head_dim % 16 == 0) gets Triton's divisibility specialisation, so
    rows are known 16-element aligned and K/V load as vectors (one pointer per vector, not per
    element); the build report compiles that variant with "i32:16" strides.

    WINDOW: 0 no sliding window (``window_left`` unread); 1 a window over one query row per
    head (Tq = 1): the chunks' start bound alone applies it, as every row sits at the same
    slot; 2 a window over several rows: each score is masked per row too. (A per-score mask
    in every variant cost one more live register, and 15 builds spilled 8-32 bytes.)
    SOFTCAP: scores capped at ``softcap`` (> 0; unread without it), before the mask.
    """
    b = tl.program_id(0)
    hk = tl.program_id(1) // m_tiles
    m_tile = tl.program_id(1) % m_tiles
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)

    # Rows of the tile: r = g * Tq + t (query head hk * group + g, query row t).
    rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group * q_len
    head = hk * group + rows // q_len
    t = rows % q_len
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)

    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), max_len)
    # Left padding (an HF static cache of a left-padded batch): keys start at slot `first`.
    first = tl.minimum(tl.maximum(tl.load(LEFTPAD + b) * use_leftpad, 0), seqlen)
    q_pos = seqlen - q_len + t  # absolute slot of each row (bottom-right alignment)
    if WINDOW > 0:
        # Sliding window: row t sees keys q_pos - window_left .. q_pos. The chunks below start
        # at the FIRST row's bound (the last row's when Tq = 1): older keys are not read.
        first = tl.maximum(first, seqlen - q_len - window_left)

    # This program's chunk of keys, in whole blocks from `first`: [lo, hi).
    blocks_per_split = tl.cdiv(tl.cdiv(seqlen - first, BLOCK_N), n_splits)
    lo = first + split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, seqlen)

    # int64 offsets: batch * stride_b alone can pass 2**31 for a large cache.
    # 64-bit sequence base, 32-bit offsets within one sequence's heads x Tq rows.
    q_ptrs = Q + b.to(tl.int64) * stride_qb + (head[:, None] * stride_qh + t[:, None] * stride_qt + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh

    qk_scale = sm_scale * 1.4426950408889634
    cap_log2 = 0.0
    if SOFTCAP:
        qk_scale = sm_scale / softcap
        cap_log2 = softcap * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc, m_i, l_i = _attend_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, lo, hi, seqlen,
                                   q_pos, window_left.to(tl.uint32), offs_n, offs_d, qk_scale, cap_log2, HEAD_DIM,
                                   BLOCK_N, PRECISION, WINDOW == 2, SOFTCAP)

    # A row with no visible key in this chunk (or at all) has l = 0: output 0, lse = -inf.
    empty = m_i == float("-inf")
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b.to(tl.int64) * stride_ob + (head[:, None] * stride_oh + t[:, None] * stride_ot
                                                + split * stride_os + offs_d[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if SPLIT:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        lse_ptrs = (LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
                    + t.to(tl.int64) * stride_lt + split)
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows", "n_heads", "n_splits"], do_not_specialize_on_alignment=["q_len"])
def decode_combine_kernel(
    O_PART, LSE, OUT,
    stride_ob, stride_oh, stride_ot,
    n_rows, n_heads, q_len, n_splits,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, ROWS: tl.constexpr,
):
    """Merges the splits of ROWS output rows (row = (b * Hq + h) * Tq + t):

        lse = log sum_s exp(lse_s);  out = sum_s exp(lse_s - lse) * out_s

    computed with the max subtracted; a row whose every split is empty (-inf) comes out 0.
    ROWS is 1 on a GPU (a (S, D) fp32 tile per program is already plenty of registers) and
    large under the interpreter, where each program costs a Python-level step.
    """
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    b = rows // (n_heads * q_len)
    h = (rows // q_len) % n_heads
    t = rows % q_len
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_ok = row_ok[:, None] & (offs_s[None, :] < n_splits)
    lse = tl.load(LSE + rows[:, None].to(tl.int64) * n_splits + offs_s[None, :], mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe[:, None])  # 0 for empty splits
    denom = tl.sum(w, 1)
    part_ptrs = (O_PART + ((rows[:, None, None].to(tl.int64) * n_splits + offs_s[None, :, None]) * HEAD_DIM)
                 + offs_d[None, None, :])
    part = tl.load(part_ptrs, mask=s_ok[:, :, None] & (offs_d[None, None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(part * w[:, :, None], 1) / tl.where(denom == 0.0, 1.0, denom)[:, None]
    o_ptrs = (OUT + b[:, None].to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh
              + t[:, None].to(tl.int64) * stride_ot + offs_d[None, :])
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


def padded_head_dim(head_dim: int) -> int:
    """tl.arange needs a power of two and tl.dot a K of at least 16."""
    return max(16, triton.next_power_of_2(head_dim))


def strides_aligned(q, k_cache, v_cache) -> bool:
    """head_dim and every batch/head/token stride of q and the caches are multiples of 16
    elements (then so are the output's, laid out like q or contiguous, and the partials'): the
    launch gets Triton's divisibility specialisation (vector loads), and the ops pick larger
    tiles for it."""
    strides = [*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3]]
    return q.shape[-1] % 16 == 0 and all(s % 16 == 0 for s in strides)


def block_m(group: int, q_len: int, max_rows: int = 64) -> int:
    """Rows per tile: group * Tq padded to a power of two >= 16 (tl.dot's minimum), at most
    ``max_rows`` (larger groups take several tiles, each re-reading K/V)."""
    return min(max_rows, max(16, triton.next_power_of_2(group * q_len)))


def decode_attention_forward(q, k_cache, v_cache, cache_seqlens, cache_leftpad=None, *, scale: float,
                             num_splits: int, window_left: int = -1, softcap: float = 0.0,
                             block_n: int, max_block_m: int = 64, num_warps: int = 4,
                             num_stages: int = 2,
                             precision: str = "ieee", combine_rows: int = 1, sinks=None):
    """Launches decode attention; returns out shaped like q (same memory layout when q is dense).

    ``cache_leftpad`` (B,) int32 or None: sequence b's keys are slots [leftpad_b, L_b).
    ``window_left``: query slot p sees keys p - window_left .. p; -1 (default) unlimited (a
    window of the cache length or more is too, and launches the kernel without one).
    ``softcap`` > 0 caps the scores at it (``cap * tanh(s / cap)``); 0 (default): no cap.

    ``num_splits`` (1 .. MAX_SPLITS) fixes the grid; 1 runs the single-pass kernel only.
    ``block_n`` keys per block, ``max_block_m`` rows per tile at most; ``precision`` is tl.dot's
    input precision for fp32 ("ieee");
    ``combine_rows`` output rows per combine program (a power of two).
    ``sinks`` (Hq,) or None: attention sinks, one more score per query head whose value is zero
    (gpt-oss). They join the splits' log-sum-exps where the splits are merged, in PyTorch (the
    combine kernel has no sink input), so every launch with sinks runs the split kernel, even
    with ``num_splits`` 1.
    """
    B, Hq, Tq, D = q.shape
    Hk, Tmax = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hk
    out = torch.empty_like(q)
    if q.numel() == 0:
        return out
    bm = block_m(group, Tq, max_block_m)
    m_tiles = triton.cdiv(group * Tq, bm)
    grid = (B, Hk * m_tiles, num_splits)
    leftpad = cache_leftpad if cache_leftpad is not None else cache_seqlens  # read x 0 when None
    meta = dict(HEAD_DIM=D, D_PAD=padded_head_dim(D), BLOCK_M=bm, BLOCK_N=block_n, PRECISION=precision,
                num_warps=num_warps, num_stages=num_stages)
    strides = (*q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3])
    if window_left >= Tmax:
        window_left = -1
    window = 0 if window_left < 0 else (1 if Tq == 1 else 2)
    meta["WINDOW"] = window
    meta["SOFTCAP"] = softcap > 0
    common = (scale, float(softcap), int(cache_leftpad is not None), max(window_left, 0), *strides)
    with torch.cuda.device_of(q):  # Triton launches on the current device
        if num_splits == 1 and sinks is None:
            decode_split_kernel[grid](q, k_cache, v_cache, cache_seqlens, leftpad, out, out, *common,
                                      *out.stride()[:3], 0, 0, 0, 0, Tq, group, Tmax, m_tiles,
                                      SPLIT=False, **meta)
            return out
        part = torch.empty((B, Hq, Tq, num_splits, D), device=q.device, dtype=torch.float32)
        lse = torch.empty((B, Hq, Tq, num_splits), device=q.device, dtype=torch.float32)
        decode_split_kernel[grid](q, k_cache, v_cache, cache_seqlens, leftpad, part, lse, *common,
                                  *part.stride()[:4], *lse.stride()[:3], Tq, group, Tmax, m_tiles,
                                  SPLIT=True, **meta)
        if sinks is not None:
            # the sink is one more split whose output is zero:
            #   lse = log(sum_s exp(lse_s) + exp(sink)),  out = sum_s exp(lse_s - lse) * out_s
            total = torch.logaddexp(torch.logsumexp(lse, -1), sinks.float()[None, :, None])
            weights = torch.where(lse == float("-inf"), 0.0, torch.exp(lse - total[..., None]))
            out.copy_((part * weights[..., None]).sum(-2))
            return out
        n_rows = B * Hq * Tq
        decode_combine_kernel[(triton.cdiv(n_rows, combine_rows),)](
            part, lse, out, *out.stride()[:3], n_rows, Hq, Tq, num_splits,
            HEAD_DIM=D, D_PAD=padded_head_dim(D), S_PAD=max(2, triton.next_power_of_2(num_splits)), ROWS=combine_rows,
            num_warps=4)
    return out
