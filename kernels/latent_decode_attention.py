"""Decode attention over a latent KV cache: multi-head latent attention (DeepSeek-V2/V3 ...).

Multi-head latent attention keeps one vector per token instead of a key and a value per head:
the latent c (``RANK`` dims, 512 in DeepSeek-V3, normed) and one rotary key k_r (``ROPE`` dims,
64) that every head shares. Head h's key and value are linear maps of the latent,

    k_h = [W_UK_h c, k_r],   v_h = W_UV_h c.

Folding W_UK_h into the query (q_nope_h . W_UK_h c = (W_UK_h^T q_nope_h) . c) and W_UV_h into
what follows the attention turns each head's attention into one over the latent itself:

    s_h = (q_lat_h . c + q_rope_h . k_r) * scale,   o_lat_h = sum_keys softmax(s_h) c,
    q_lat_h = W_UK_h^T q_nope_h,   o_h = W_UV_h o_lat_h

(the caller does both products). Every head reads the same cache rows, as in multi-query
attention, so the heads (times the Tq new rows) are the rows of a tile and each block of the
cache is read once per tile (of up to 32 rows on a GPU: DeepSeek-V2-Lite's 16 heads take one
tile, DeepSeek-V3's 128 four); and the value is the latent itself, so the block loaded for the
scores is the one the output sums (no second load). The cache holds ``RANK + ROPE`` elements per
token and layer (576 in DeepSeek-V3) where expanded heads would need
``heads x (qk_head_dim + v_head_dim)`` (128 x (192 + 128) = 40960 in DeepSeek-V3).

Layout: q_lat (B, H, Tq, RANK), q_rope (B, H, Tq, ROPE), the latent cache (B, Tmax, RANK) and
the rotary key cache (B, Tmax, ROPE), all with unit last strides (the two caches may be two views
of one (B, Tmax, RANK + ROPE) buffer, as fastllama's generator keeps them, or two tensors, as
Hugging Face's cache does). ``cache_seqlens`` (B,) int32 on the device and the causal alignment
are those of ``decode_attention`` (query t sits at slot ``L - Tq + t``), and so are the key
splits and their combine (``decode_combine_kernel``). Optional ``cache_leftpad`` (B,) int32: the
first slot of each sequence (a left-padded batch); the slots before it are never read, and the
key splits divide [start, L).
The score is two tensor-core products, one over the latent and one over the rotary key, so
neither part is padded to the next power of two of their sum (576 would run as 1024).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import decode_attention as _decode  # (its combine kernel, looked up at launch)
from .decode_attention import padded_head_dim

__all__ = ["latent_decode_attention_forward", "latent_decode_kernel", "tile_rows", "LATENT_UNSPECIALISED"]

# Integers left unspecialised at launch (see decode_attention.SPLIT_UNSPECIALISED): lengths,
# head counts, tile counts and the LSE strides; q_len keeps its == 1 variant (the decode step);
# use_leftpad is a runtime flag (0 or 1), so a left-padded batch runs the builds of any other.
LATENT_UNSPECIALISED = ["stride_lb", "stride_lh", "stride_lt", "n_heads", "max_len", "use_leftpad"]


@triton.jit(do_not_specialize=LATENT_UNSPECIALISED, do_not_specialize_on_alignment=["q_len"])
def latent_decode_kernel(
    QL, QR, C, KR, SEQLENS, LEFTPAD, O, LSE,
    sm_scale,
    stride_qb, stride_qh, stride_qt,
    stride_rb, stride_rh, stride_rt,
    stride_cb, stride_ct,
    stride_kb, stride_kt,
    stride_ob, stride_oh, stride_ot, stride_os,
    stride_lb, stride_lh, stride_lt,
    q_len, n_heads, max_len, use_leftpad,
    RANK: tl.constexpr, R_PAD: tl.constexpr, ROPE: tl.constexpr, P_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program: BLOCK_M (head, query row) pairs of one sequence, one chunk of its keys.

    Grid (B, cdiv(H * Tq, BLOCK_M), num_splits). SPLIT=False: O is the final output
    (B, H, Tq, RANK) in the input dtype; SPLIT=True: O the fp32 partial outputs
    (B, H, Tq, splits, RANK) and LSE (B, H, Tq, splits) each chunk's natural-log log-sum-exp.
    The online softmax is decode_attention's (log2 domain, normalised once at the end):

        s = (q_lat c^T + q_rope k_r^T) * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
        l' = l * 2^(m - m') + rowsum p;  acc' = acc * 2^(m - m') + p c
    """
    b = tl.program_id(0)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # r = head * Tq + t
    row_ok = rows < n_heads * q_len
    head = rows // q_len
    t = rows % q_len
    offs_r = tl.arange(0, R_PAD)
    offs_p = tl.arange(0, P_PAD)
    offs_n = tl.arange(0, BLOCK_N)

    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), max_len)  # (clamped: never out of bounds)
    first = 0  # the sequence's first slot: keys [first, seqlen)
    if use_leftpad:
        first = tl.minimum(tl.maximum(tl.load(LEFTPAD + b), 0), seqlen)
    q_pos = seqlen - q_len + t  # each row's slot (bottom-right alignment)
    # The splits share [first, seqlen) block by block; every key a program loads is >= first, so
    # no mask is needed for the start. A row before it (a padding query) sees no key: output 0.
    blocks_per_split = tl.cdiv(tl.cdiv(seqlen - first, BLOCK_N), n_splits)
    lo = first + split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, seqlen)

    # 64-bit sequence bases, 32-bit offsets inside one sequence's rows
    q_lat = tl.load(QL + b.to(tl.int64) * stride_qb + (head[:, None] * stride_qh + t[:, None] * stride_qt
                                                         + offs_r[None, :]),
                    mask=row_ok[:, None] & (offs_r[None, :] < RANK), other=0.0)
    q_rope = tl.load(QR + b.to(tl.int64) * stride_rb + (head[:, None] * stride_rh + t[:, None] * stride_rt
                                                          + offs_p[None, :]),
                     mask=row_ok[:, None] & (offs_p[None, :] < ROPE), other=0.0)
    c_base = C + b.to(tl.int64) * stride_cb
    kr_base = KR + b.to(tl.int64) * stride_kb

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + offs_n
        c_rows = c_base + tl.cast(start, tl.int64) * stride_ct + offs_n[:, None] * stride_ct
        kr_rows = kr_base + tl.cast(start, tl.int64) * stride_kt + offs_n[:, None] * stride_kt
        # slots past the sequence's length may hold anything (stale, NaN): never loaded, since a
        # NaN in c would survive 0 * NaN in the p c product
        in_cache = keys[:, None] < seqlen
        c = tl.load(c_rows + offs_r[None, :], mask=in_cache & (offs_r[None, :] < RANK), other=0.0)
        k_rope = tl.load(kr_rows + offs_p[None, :], mask=in_cache & (offs_p[None, :] < ROPE), other=0.0)
        s = tl.dot(q_rope, tl.trans(k_rope), input_precision=PRECISION)
        s = tl.dot(q_lat, tl.trans(c), s, input_precision=PRECISION) * qk_scale
        s = tl.where(keys[None, :] <= q_pos[:, None], s, float("-inf"))  # causal (and the cache's end)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key keeps m = -inf: subtracting 0 keeps NaN out of p, alpha
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # the value is the latent block already loaded for the scores (p rounded to its dtype)
        acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    # a row with no visible key in this chunk (or at all): output 0, lse = -inf
    empty = m_i == float("-inf")
    l_safe = tl.where(empty, 1.0, l_i)
    o_ptrs = O + b.to(tl.int64) * stride_ob + (head[:, None] * stride_oh + t[:, None] * stride_ot
                                                + split * stride_os + offs_r[None, :])
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_r[None, :] < RANK))
    if SPLIT:
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(LSE + b.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + t.to(tl.int64) * stride_lt
                 + split, lse, mask=row_ok)


def tile_rows(heads: int, q_len: int, max_rows: int) -> int:
    """Rows per tile: heads * Tq padded to a power of two >= 16 (tl.dot's minimum), at most
    ``max_rows`` (more rows take several tiles, each reading the cache again)."""
    return min(max_rows, max(16, triton.next_power_of_2(heads * q_len)))


def latent_decode_attention_forward(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, *, scale: float,
                                    num_splits: int, block_n: int, block_m: int, num_warps: int, num_stages: int,
                                    cache_leftpad=None, combine_warps: int = 4, precision: str = "ieee",
                                    combine_rows: int = 1):
    """Launches the latent decode kernel (and, with ``num_splits`` > 1, the combine); returns
    (B, H, Tq, RANK) in q_latent's dtype. ``block_m`` rows (head, query row) per tile (a power of
    two >= 16: :func:`tile_rows`), ``block_n`` keys per block; ``cache_leftpad`` None (every
    sequence starts at slot 0) or (B,) int32; the rest as in ``decode_attention_forward``. The
    combine runs ``combine_warps`` warps (its tile is splits x RANK fp32)."""
    B, H, Tq, R = q_latent.shape
    P = q_rope.shape[-1]
    out = torch.empty((B, H, Tq, R), device=q_latent.device, dtype=q_latent.dtype)
    if out.numel() == 0:
        return out
    grid = (B, triton.cdiv(H * Tq, block_m), num_splits)
    meta = dict(RANK=R, R_PAD=padded_head_dim(R), ROPE=P, P_PAD=padded_head_dim(P), BLOCK_M=block_m,
                BLOCK_N=block_n, PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    # (without left padding the lengths stand in for its pointer: the kernel does not read it)
    leftpad = cache_seqlens if cache_leftpad is None else cache_leftpad
    inputs = (q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, leftpad)
    common = (scale, *q_latent.stride()[:3], *q_rope.stride()[:3], *latent_cache.stride()[:2],
              *rope_cache.stride()[:2])
    lengths = (Tq, H, latent_cache.shape[1], int(cache_leftpad is not None))
    with torch.cuda.device_of(q_latent):  # Triton launches on the current device
        if num_splits == 1:
            latent_decode_kernel[grid](*inputs, out, out, *common, *out.stride()[:3], 0, 0, 0, 0, *lengths,
                                       SPLIT=False, **meta)
            return out
        part = torch.empty((B, H, Tq, num_splits, R), device=q_latent.device, dtype=torch.float32)
        lse = torch.empty((B, H, Tq, num_splits), device=q_latent.device, dtype=torch.float32)
        latent_decode_kernel[grid](*inputs, part, lse, *common, *part.stride()[:4], *lse.stride()[:3], *lengths,
                                   SPLIT=True, **meta)
        n_rows = B * H * Tq
        _decode.decode_combine_kernel[(triton.cdiv(n_rows, combine_rows),)](
            part, lse, out, *out.stride()[:3], n_rows, H, Tq, num_splits,
            HEAD_DIM=R, D_PAD=padded_head_dim(R), S_PAD=max(2, triton.next_power_of_2(num_splits)),
            ROWS=combine_rows, num_warps=combine_warps)
    return out
