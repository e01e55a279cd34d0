"""Decoding ops: ``decode_attention`` over a static KV cache and ``rotary_cache_append``.

Both are forward-only (inference): they refuse inputs that require grad while grad mode is on.
Both read per-sequence lengths from a device tensor, launch a grid that depends only on shapes
and never synchronise with the host, so a decode step made of them can be captured once as a
CUDA graph and replayed. Each is one ``torch.library`` custom op (``fastllama::decode_attention``,
``fastllama::rotary_cache_append``, the latter declaring the caches it mutates), so
``torch.compile(fullgraph=True)`` sees one op and no graph break.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import triton

from .._interpreter import interpreter_active
from ..kernels import decode_attention as _dk
from ..kernels import rotary_cache as _rk
from ..kernels.flash_attention import table_arch
from ..optable import KernelBuild, OpCase, OpSpec, by_arch
from ..reference import functional as _ref
from ._checks import (check_attention_device, check_last_dim_contiguous, check_same, check_sinks, check_softcap,
                      check_tensor, check_window_form, check_write_targets, num_sms, tile_rows_fit_int32)

__all__ = ["decode_attention", "rotary_cache_append", "default_num_splits", "takes_softcap", "MAX_SPLITS",
           "MAX_QUERY_LEN", "MAX_HEAD_DIM", "MAX_16BIT_SOFTCAP"]

MAX_SPLITS = _dk.MAX_SPLITS
MAX_QUERY_LEN = 16  # decode / speculative verification sizes; longer chunks belong to flash_attention
MAX_HEAD_DIM = 256
# The largest softcap taken with 16-bit inputs: the kernel's capped scores carry an absolute
# error of about 1e-7 of the cap (see kernels/decode_attention.py, _capped_scores), which above
# this would pass the error 16-bit q and k put into a score (measured: 1.4x PyTorch's fp16 error
# at a cap of 1e4 on scores of 0.1, 14x at 1e5).
MAX_16BIT_SOFTCAP = 1e4


def takes_softcap(softcap: float | None, dtype: torch.dtype) -> bool:
    """Whether :func:`decode_attention` takes ``softcap`` with inputs of ``dtype``: any cap in
    fp32, up to :data:`MAX_16BIT_SOFTCAP` in fp16/bf16 (None always)."""
    return softcap is None or dtype == torch.float32 or softcap <= MAX_16BIT_SOFTCAP


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _stages(elem_bytes: int, sm: int = 80) -> int:
    """Software-pipelining depth: fp32 1 (2 spilled 32 bytes on sm_80 at 96 registers); 16-bit 2,
    3 on sm_90. With 2, the compiled loop waits for all of its K/V copies at its top and issues
    the next tile's only after the p V product (sm_90 SASS: DEPBAR.LE SB0, 0x0, the LDGSTS at the
    end of the body), so nothing streams while the tile computes: at batch 1 (one program per
    SM) decoding waited a memory round trip per 64 keys. With 3 the next tile is in flight
    during the current one (two 32 KB K+V tiles at D = 128); sm_90's shared memory holds that
    for every tile (up to 128 KB), none spills. (sm_100 with 3: 14 tiles spilled 8 bytes, the
    soft-capped split d80-128 and some d256 ones; it keeps 2, as do the 99 KB GPUs.)"""
    if elem_bytes >= 4:
        return 1
    return 3 if sm == 90 else 2


def _gpu_config(group: int, q_len: int, d_pad: int, elem_bytes: int, aligned: bool = True,
                sm: int = 80, split: bool = True, window: bool = False, softcap: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) on a GPU, sized from sm_80/86/90/100/120 compiles (ptxas
    registers, with the 16-divisible strides an aligned launch gets specialised on): 16-bit
    inputs take up to 64 rows and 64 keys (32 at D = 256), 8 warps from 4K-element tiles on, at
    most ~240 registers and no spills; fp32 (ieee dots on FMA units, register-hungry operand
    layouts) 16 rows and 2048 / D keys (D = 128 with 32 keys spilled 352 bytes), 8 warps, one
    pipeline stage. Strides that are not multiples of 16 (no vector loads: one 64-bit pointer
    per element) get 16 x 16 tiles, 8 warps from fp32 D = 128 and at D = 256 (fp32 D = 64 with
    8 warps spilled 8 bytes on sm_90: ptxas squeezed it to 80 registers for a third block).
    A one-token step (q_len = 1) compiles its own variant (the "tq1" builds): fp32 D = 256 there
    takes 32 keys (16 spilled 4-16 bytes on sm_90 with a GQA group, again at 80 registers; 32
    keys: 106-128 registers, 82 KB of shared memory, no spills).

    ``sm`` is the device's table arch (``kernels.flash_attention.table_arch``), ``split`` whether
    the launch splits the keys (num_splits > 1). On 99 KB GPUs (sm_86, sm_120) ptxas holds four of the
    fp32 tiles at 8 warps to 64-128 registers and spills 8-40 bytes; there they take 4 warps (the
    one-token D = 128 tile, the split D = 256 one (the single pass spills 32 bytes with 4) and the
    unaligned D = 256 one: 80-255 registers, no spill) or 16 keys (the one-token D = 256 tile: 80-86
    registers). sm_100 gives the unaligned fp32 D = 256 tile 4 warps too (8 spilled 8 bytes).

    ``window``: a sliding window over several query rows (q_len > 1), whose per-row mask holds one
    more value in the loop: ptxas capped the 8-warp tiles at 128 (16-bit) or 64 (fp32) registers
    and spilled 8-16 bytes in 12 of them (16-bit 32 x 64 tiles at D 80/96, fp32 D 64-128 on
    sm_80/100). There 16-bit tiles take half the keys (108-120 registers) and fp32 tiles up to
    D = 128 4 warps (80-96), except on 99 KB GPUs (sm_86/120), where 4 warps spilled the
    single-pass D = 128 tile and 8 do not (58-64 registers). One-token windows need no mask (the
    chunk bound applies them) and keep their tiles.

    (The kernel's ``softcap`` argument, unread without a cap, moved ptxas's registers enough that
    sm_120's single-pass 64 x 32 window tile at D = 80/96 spilled 16 bytes; that tile (D = 80-128)
    takes 4 warps there: 238 registers.)

    ``softcap``: capped scores (Gemma 2), whose tanh keeps about one more value per score live:
    the same tiles, but for those of :data:`_SOFTCAP_FLIP_WARPS`."""
    if softcap:
        bm, bn, warps = _gpu_config(group, q_len, d_pad, elem_bytes, aligned, sm, split, window)
        key = (sm, q_len == 1, split, window and q_len > 1, elem_bytes, d_pad, bm, bn)
        return bm, bn, 12 - warps if aligned and key in _SOFTCAP_FLIP_WARPS else warps
    if window and q_len > 1 and aligned:
        bm, bn, warps = _gpu_config(group, q_len, d_pad, elem_bytes, aligned, sm, split)
        if elem_bytes < 4:
            return bm, max(16, bn // 2), 4 if (sm, split, bm, d_pad) == (120, False, 64, 128) else warps
        return bm, bn, 4 if d_pad <= 128 and sm not in (86, 120) else warps
    if not aligned:
        big = d_pad * elem_bytes >= 512 and not (sm in (86, 100, 120) and elem_bytes >= 4 and d_pad == 256)
        return _dk.block_m(group, q_len, 16), 16, 8 if big else 4
    if elem_bytes >= 4:  # 8 warps (4 spilled 16-24 bytes on sm_80)
        keys = 32 if q_len == 1 and d_pad == 256 and sm not in (86, 120) else max(16, min(64, 2048 // d_pad))
        four = sm in (86, 120) and (d_pad == 256 and q_len > 1 and split or d_pad == 128 and q_len == 1)
        return _dk.block_m(group, q_len, 16), keys, 4 if four else 8
    bm = _dk.block_m(group, q_len, 64)
    # 8 warps from 4K-element tiles on (32 x 128 with 4 warps spilled 16 bytes on sm_80); the
    # one-token variant only above them (its 32 x 128 tile, a GQA group of 17-32, spilled 8
    # bytes with 8 warps: ptxas held it to 128 registers; 4 warps: 168-182, no spill). The single
    # pass's 32-row tile (Tq >= 2) spilled 16 bytes the same way at D = 256 on sm_120 and at
    # D = 128 on sm_100; there it takes 4 warps (236 and 242 registers).
    big = bm * d_pad > 4096 if q_len == 1 else bm * d_pad >= 4096
    if not split and q_len > 1 and (sm, bm, d_pad) in ((120, 32, 256), (100, 32, 128)):
        big = False
    return bm, min(64, 16384 // (d_pad * 2)), 8 if big else 4


# The capped tiles that differ from the uncapped ones. On the uncapped tiles, 51 of the 1700
# capped builds spilled 8-24 bytes (ptxas holding them at its 64 to 168 register steps, the tanh
# keeping about one more value per score live); every one compiled without spills with the other
# warp count (8 <-> 4). (Halving every capped tile's keys, the first rule tried, left 32 spilling,
# 28 of them clean on the uncapped tiles.) Keys, of aligned launches: (sm, one-token step, split,
# windowed rows, input bytes, D_PAD, BLOCK_M, BLOCK_N).
_SOFTCAP_FLIP_WARPS = frozenset({
    (86, False, False, False, 2, 128, 32, 64),  # 8 bytes at D 80/96 (128 registers)
    (86, True, False, False, 4, 256, 16, 16),  # 16 bytes (80 registers)
    (86, True, True, False, 2, 128, 64, 64),  # 8 bytes (128 registers)
    (86, True, True, False, 4, 256, 16, 16),  # 16 bytes (64 registers)
    (90, False, False, False, 4, 64, 16, 32),  # 8 bytes (64 registers)
    (90, False, False, True, 2, 256, 32, 16),  # 8 bytes (128 registers)
    (90, False, True, False, 2, 128, 32, 64),  # 8 bytes (128 registers)
    (100, False, False, True, 2, 64, 32, 32),  # 8 bytes (96 registers, 4 warps)
    (100, False, True, False, 4, 64, 16, 32),  # 8 bytes (80 registers)
    (100, True, False, False, 2, 256, 32, 32),  # 16 bytes (128 registers)
    (100, True, True, False, 2, 128, 32, 64),  # 8 bytes (168 registers, 4 warps)
    (120, False, True, False, 2, 128, 32, 64),  # 24 bytes (128 registers)
    (120, False, True, False, 4, 64, 16, 32),  # 8 bytes (64 registers)
})

# Under the interpreter every program and every loop step is a Python-level step: fewer, larger
# ones (a key block of 128 still leaves several blocks at length 1000 for the split tests).
_INTERPRETER_BLOCK_N = 128
_INTERPRETER_ROWS = 64  # combine rows per program
_INTERPRETER_TOKENS = 64  # rotary: new tokens per program (and up to 1024 (token, head) rows each)


def default_num_splits(batch: int, kv_heads: int, m_tiles: int, max_len: int, device: torch.device) -> int:
    """How many key chunks per (sequence, KV head): enough programs for about two waves of the
    GPU when batch x KV heads alone cannot fill it, each chunk at least 256 keys of a full cache,
    at most MAX_SPLITS. Depends only on shapes (so a CUDA graph's grid stays valid). Under the
    interpreter: 1 (fewest Python-level programs, no combine)."""
    if interpreter_active() or device.type != "cuda":
        return 1
    programs = batch * kv_heads * m_tiles
    sms = num_sms(device)
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, triton.cdiv(2 * sms, programs), triton.cdiv(max_len, 256)))


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllama::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                      cache_leftpad: Optional[torch.Tensor], scale: float, num_splits: int,
                      window_left: int, softcap: float, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``softcap`` 0 means no soft-capping."""
    if interpreter_active():
        return _dk.decode_attention_forward(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale=scale,
                                            num_splits=num_splits, window_left=window_left,
                                            block_n=_INTERPRETER_BLOCK_N,
                                            combine_rows=_INTERPRETER_ROWS, softcap=softcap, sinks=sinks)
    group = q.shape[1] // k_cache.shape[1]
    aligned = _dk.strides_aligned(q, k_cache, v_cache)
    sm = table_arch(q.device)
    split = num_splits > 1 or sinks is not None  # (sinks: always the split kernel, see the launcher)
    bm, bn, warps = _gpu_config(group, q.shape[2], _dk.padded_head_dim(q.shape[-1]), q.element_size(), aligned,
                                sm, split, 0 <= window_left < k_cache.shape[2], softcap > 0)
    return _dk.decode_attention_forward(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale=scale,
                                        num_splits=num_splits, window_left=window_left, block_n=bn, max_block_m=bm,
                                        num_warps=warps, num_stages=_stages(q.element_size(), sm), softcap=softcap,
                                        sinks=sinks)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale, num_splits, window_left, softcap, sinks=None):
    return torch.empty_like(q)


@torch.library.custom_op("fastllama::rotary_cache_append", mutates_args=("k_cache", "v_cache"))
def _rotary_cache_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_seqlens: torch.Tensor,
                         positions: Optional[torch.Tensor], interleaved: bool) -> torch.Tensor:
    if interpreter_active():
        return _rk.rotary_cache_append_forward(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions,
                                               tokens_per_program=_INTERPRETER_TOKENS, rows=1024,
                                               interleaved=interleaved)
    return _rk.rotary_cache_append_forward(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions,
                                           interleaved=interleaved)


@_rotary_cache_append.register_fake
def _(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions, interleaved):
    return torch.empty_like(q)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_forward_only(op: str, **tensors) -> None:
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"{op} is forward-only (inference) but {name} requires grad; "
                                 f"call it under torch.no_grad() / torch.inference_mode() or detach {name}")


def _check_lengths(name: str, t, batch: int, ref: torch.Tensor, ref_name: str = "q") -> None:
    check_tensor(name, t, dtypes=(torch.int32,), ndim=1)
    check_same(ref_name, ref, name, t, "device")
    if t.shape[0] != batch:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: ({batch},), one entry per sequence")
    if batch > 1 and t.stride(0) != 1:  # the kernels read entry b at base + b
        raise ValueError(f"{name} must be contiguous, got stride {t.stride(0)} (call .contiguous())")


def _check_cache(name: str, cache, q: torch.Tensor, kv_heads: int | None = None) -> None:
    check_tensor(name, cache, ndim=4)
    check_same("q", q, name, cache, "dtype")
    check_same("q", q, name, cache, "device")
    B, _, _, D = q.shape
    if cache.shape[0] != B or cache.shape[3] != D or (kv_heads is not None and cache.shape[1] != kv_heads):
        want = f"({B}, {kv_heads if kv_heads is not None else 'Hk'}, Tmax, {D})"
        raise ValueError(f"{name} has shape {tuple(cache.shape)}; accepted: {want} (batch and head_dim of q)")
    check_last_dim_contiguous(name, cache)


def _check_num_splits(num_splits) -> None:
    """None, or an int in [1, MAX_SPLITS] (the split kernels' fixed bound)."""
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")


def _window_left(window) -> int:
    """``window=(left, 0)`` as the kernel's ``window_left`` (-1: unlimited); refuses other forms."""
    if window is None:
        return -1
    left, right = check_window_form(window)
    if right != 0:
        raise ValueError(f"window={(left, right)}: decode attention is causal, so the right bound must be 0")
    if left < -1:
        raise ValueError(f"window={(left, right)}: the left bound must be >= 0 or -1 (unlimited)")
    return min(left, 2**31 - 1)


def _validate_decode(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale, num_splits, softcap=None) -> None:
    check_tensor("q", q, ndim=4)
    B, Hq, Tq, D = q.shape
    if not 1 <= Tq <= MAX_QUERY_LEN:
        raise ValueError(f"q has {Tq} query rows (shape {tuple(q.shape)}); accepted: 1 to {MAX_QUERY_LEN} "
                         f"(use flash_attention for longer chunks)")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {D}; accepted: 1 to {MAX_HEAD_DIM}")
    check_last_dim_contiguous("q", q)
    check_attention_device(q)
    _check_cache("k_cache", k_cache, q)
    _check_cache("v_cache", v_cache, q)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
                         f"they must match")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not tile_rows_fit_int32(cache, 2):  # (a cache is not copied per step: refused)
            raise ValueError(f"{name} has a token stride of {cache.stride(2)} elements; accepted: at most "
                             f"{(2**31 - 1) // 255} (the kernel's int32 row offsets) or 2**31 and more, e.g. a "
                             f"(B, Hk, Tmax, D)-contiguous cache")
    if k_cache.shape[1] == 0 or Hq % k_cache.shape[1]:
        raise ValueError(f"q has {Hq} heads and k_cache {k_cache.shape[1]}; accepted: a multiple (GQA/MQA)")
    _check_lengths("cache_seqlens", cache_seqlens, B, q)
    if cache_leftpad is not None:
        _check_lengths("cache_leftpad", cache_leftpad, B, q)
    # (math.isfinite cannot read a float traced symbolically under torch.compile(dynamic=True))
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or (not torch.compiler.is_compiling() and not math.isfinite(scale))):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    _check_num_splits(num_splits)
    check_softcap(softcap, q.shape[-1] ** -0.5 if scale is None else scale)
    if not takes_softcap(softcap, q.dtype):
        raise ValueError(f"softcap={softcap} with {q.dtype} inputs; accepted: at most {MAX_16BIT_SOFTCAP:g} (the "
                         f"kernel's capped scores are exact to about 1e-7 of the cap, beyond 16-bit's own error "
                         f"above that); use flash_attention, or fp32 inputs")
    _check_forward_only("decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)


def _validate_rotary(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions) -> None:
    check_tensor("q", q, ndim=4)
    B, Hq, T, D = q.shape
    if D % 2 or not 2 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {D}; accepted: even, 2 to {MAX_HEAD_DIM} (rotary pairs the two halves)")
    check_last_dim_contiguous("q", q)
    check_tensor("k", k, ndim=4)
    check_same("q", q, "k", k, "dtype")
    check_same("q", q, "k", k, "device")
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k has shape {tuple(k.shape)}; accepted: ({B}, Hk, {T}, {D}) like q")
    if Hq == 0 or k.shape[1] == 0:  # (with no q heads nothing would reach the cache)
        raise ValueError(f"q has {Hq} heads and k {k.shape[1]}; accepted: at least one of each")
    check_last_dim_contiguous("k", k)
    check_tensor("v", v, ndim=4)
    check_same("k", k, "v", v, "dtype")
    check_same("k", k, "v", v, "device")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}; accepted: {tuple(k.shape)} like k")
    check_last_dim_contiguous("v", v)
    _check_cache("k_cache", k_cache, q, k.shape[1])
    _check_cache("v_cache", v_cache, q, k.shape[1])
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}; "
                         f"they must match")
    # each slot is written by one program: aliased caches would lose writes
    check_write_targets({"k_cache": k_cache, "v_cache": v_cache}, {"q": q, "k": k, "v": v},
                        why=" (each cache slot by one program): writes would be lost")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=(2, 3))
        if t.dtype != torch.float32:  # (fp32 tables with 16-bit q: Ernie 4.5's, kept in full precision)
            check_same("q", q, name, t, "dtype")
        check_same("q", q, name, t, "device")
        check_last_dim_contiguous(name, t)
        R = t.shape[-1]
        if not 0 < R <= D or R % 2 or (t.dim() == 3 and tuple(t.shape[:2]) != (B, T)) or t.shape[0] == 0:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: a table (P, R) indexed by position, "
                             f"or per-token ({B}, {T}, R) as HF's rotary embedding returns, with R = {D} or an even "
                             f"R < {D} (partial rotary)")
    check_same("cos", cos, "sin", sin, "dtype")
    if sin.shape != cos.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}; they must match")
    _check_lengths("cache_seqlens", cache_seqlens, B, q)
    if positions is not None:
        if cos.dim() == 3:
            raise ValueError("positions is only accepted with (P, R) cos/sin tables; per-token (B, T, R) cos/sin "
                             "already encode the positions")
        _check_lengths("positions", positions, B, q)
    _check_forward_only("rotary_cache_append", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     scale: float | None = None, num_splits: int | None = None,
                     cache_leftpad: torch.Tensor | None = None,
                     window: tuple[int, int] | None = None, softcap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a few new queries against a static KV cache (flash-decoding), forward only.

    Args:
        q: (B, Hq, Tq, D) with 1 <= Tq <= 16, fp32/fp16/bf16, any strides with a unit last stride
            (e.g. the transposed view of a (B, Tq, Hq * D) projection).
        k_cache, v_cache: (B, Hk, Tmax, D), Hq % Hk == 0, same dtype/device as q; any strides
            with a unit last stride (a slice of a larger buffer, an HF ``StaticCache`` layer) and
            a token stride below 8M elements (the kernel's int32 row offsets; larger ones are refused).
        cache_seqlens: (B,) int32 on q's device: sequence b uses the first ``L_b`` slots, the
            new tokens' keys/values INCLUDED (write them first, e.g. with
            :func:`rotary_cache_append`). Read on the device: no host sync; values outside
            [0, Tmax] are clamped to it.
        scale: softmax scale, default ``D ** -0.5``.
        num_splits: key chunks per (sequence, KV head), 1 to ``MAX_SPLITS``; default
            :func:`default_num_splits` (shapes only). 1 is a single pass with no combine kernel.
            Every split count is deterministic (fixed-order reductions, no atomics).
        cache_leftpad: optional (B,) int32: sequence b's keys start at slot ``cache_leftpad[b]``
            (a left-padded cache, e.g. HF's static cache of a left-padded batch; flash-attn's
            ``cache_leftpad``). Slots before it are never read. Default: 0.
        window: ``(left, 0)``, a sliding window as in :func:`flash_attention`: the query at slot
            p sees keys ``p - left .. p`` only (HF's ``sliding_window=W`` is ``(W - 1, 0)``); the
            older slots are never read, so a windowed layer costs ``left + Tq`` keys at most.
            ``(-1, 0)`` or None (default): unlimited. The right bound must be 0 (causal).
        softcap: soft-caps the scores to ``softcap * tanh(s / softcap)`` before the mask (Gemma
            2's ``attn_logit_softcapping``, as in :func:`flash_attention`); None: off. With
            fp16/bf16 inputs at most ``MAX_16BIT_SOFTCAP`` (1e4; Gemma 2's is 50).
        sinks: optional (Hq,) floating tensor on q's device: attention sinks, as in
            :func:`flash_attention` (gpt-oss). They are merged with the key chunks' partial
            results in PyTorch, so a call with sinks always runs the split kernel (also at
            ``num_splits=1``) and a few small PyTorch ops in place of the combine kernel.

    Returns:
        (B, Hq, Tq, D) like q (q's memory layout when q is dense): query t of sequence b, at slot
        ``p = L_b - Tq + t`` (bottom-right alignment, the queries are the last Tq tokens), attends
        causally to keys ``max(leftpad_b, p - left) .. p`` (``left``: the window's; unlimited
        without one); a query with no key (``L_b == 0`` or ``p < 0``) gives zeros.
    """
    _validate_decode(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale, num_splits, softcap)
    check_sinks(sinks, q)
    _check_forward_only("decode_attention", sinks=sinks)
    window_left = _window_left(window)
    # the kernel addresses q's rows as head * stride + token * stride in int32: a q that could
    # pass 2**31 elements that way runs from a copy (a few tokens: cheap)
    if (q.shape[1] - 1) * q.stride(1) + (q.shape[2] - 1) * q.stride(2) >= 2**31:
        q = q.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if num_splits is None:
        group = q.shape[1] // k_cache.shape[1]
        bm = _gpu_config(group, q.shape[2], _dk.padded_head_dim(q.shape[-1]), q.element_size(),
                         _dk.strides_aligned(q, k_cache, v_cache), table_arch(q.device))[0]
        m_tiles = triton.cdiv(group * q.shape[2], bm)
        keys = k_cache.shape[2] if window_left < 0 else min(k_cache.shape[2], window_left + q.shape[2])
        num_splits = default_num_splits(q.shape[0], k_cache.shape[1], m_tiles, keys, q.device)
    return _decode_attention(q, k_cache, v_cache, cache_seqlens, cache_leftpad, scale, num_splits, window_left,
                             float(softcap or 0.0), sinks)


def rotary_cache_append(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_seqlens: torch.Tensor,
                        positions: torch.Tensor | None = None, interleaved: bool = False) -> torch.Tensor:
    """HF rotary on the new q/k plus the KV-cache write, one kernel; returns rotated q.

    Writes rotated k and raw v into ``k_cache``/``v_cache`` IN PLACE at slots
    ``cache_seqlens[b] + t``; does not change ``cache_seqlens`` (the caller advances it, e.g.
    passes ``cache_seqlens + T`` to :func:`decode_attention`). A slot past the cache end is not
    written (no host check here: size the cache first).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hk, T, D); any strides with a unit last stride; D even.
        k_cache, v_cache: (B, Hk, Tmax, D), same dtype as q, any strides with unit last stride.
        cos, sin: q's dtype or fp32 (read as fp32 either way); a (P, R) table read at row
            ``position`` (clamped to P - 1),
            or per-token (B, T, R) as HF's rotary embedding returns them. R = D, or an even
            R < D: partial rotary (Phi-4-mini), the first R dims rotated as HF's
            ``apply_rotary_pos_emb`` does, the rest written as they are.
        cache_seqlens: (B,) int32, the slot of each sequence's first new token.
        positions: optional (B,) int32, the rotary position of each sequence's first new token
            when it is not the slot (a left-padded cache); tables only. Default: the slot.
        interleaved: adjacent pairs (2i, 2i + 1) rotate, by cos/sin[..., i] (GLM's, GLM-4's,
            Helium's and Ernie 4.5's rotary; see :func:`fastllama.ops.apply_rotary_pos_emb`).

    Returns:
        rotated q, a new tensor shaped like q (q's memory layout when q is dense).
    """
    _validate_rotary(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions)
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    return _rotary_cache_append(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions, interleaved)


# ----------------------------------------------------------------------------------------------
# Op table (forward-only: no argument requires grad)
# ----------------------------------------------------------------------------------------------
def _decode_args(p: dict, dtype: torch.dtype, device: str):
    """Params: B, Hq, Hk, Tq, D, lens (per sequence), Tmax, splits; ``cache_view``: the caches
    are a slice of a larger (2B, Hk, Tmax + 13, D) buffer (HF StaticCache-like strided views).
    Slots past each length hold NaN: they must never be read. ``window``, ``leftpad``, ``softcap``
    as the op takes them (``q_scale`` multiplies q with a cap, so that a small one binds)."""
    B, Hq, Hk, Tq, D, Tmax = p["B"], p["Hq"], p["Hk"], p["Tq"], p["D"], p["Tmax"]
    q = torch.randn(B, Tq, Hq, D, device=device, dtype=dtype).transpose(1, 2)
    if p.get("cache_view"):
        k = torch.randn(2 * B, Hk, Tmax + 13, D, device=device, dtype=dtype)[1::2, :, 5:5 + Tmax]
        v = torch.randn(2 * B, Hk, Tmax + 13, D, device=device, dtype=dtype)[1::2, :, 5:5 + Tmax]
    else:
        k = torch.randn(B, Hk, Tmax, D, device=device, dtype=dtype)
        v = torch.randn(B, Hk, Tmax, D, device=device, dtype=dtype)
    for b, n in enumerate(p["lens"]):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    lens = torch.tensor(p["lens"], device=device, dtype=torch.int32)
    kwargs = {"num_splits": p.get("splits")}
    if p.get("softcap"):
        kwargs["softcap"] = p["softcap"]
        q = q * p.get("q_scale", 1.0)  # (3: scores of std 3, which a cap of 2 binds)
    if p.get("window"):  # slots older than every query's window hold NaN: they must never be read
        kwargs["window"] = p["window"]
        for b, n in enumerate(p["lens"]):
            k[b, :, :max(0, n - Tq - p["window"][0])] = float("nan")
            v[b, :, :max(0, n - Tq - p["window"][0])] = float("nan")
    if p.get("leftpad"):  # slots before the start hold NaN too: they must never be read
        for b, n in enumerate(p["leftpad"]):
            k[b, :, :n] = float("nan")
            v[b, :, :n] = float("nan")
        kwargs["cache_leftpad"] = torch.tensor(p["leftpad"], device=device, dtype=torch.int32)
    if "sinks" in p:  # attention sinks (gpt-oss): (Hq,) scores around p["sinks"]
        kwargs["sinks"] = torch.randn(Hq, device=device, dtype=dtype) + p["sinks"]
    return (q, k, v, lens), kwargs


def _decode_reference(q, k_cache, v_cache, cache_seqlens, num_splits=None, scale=None, cache_leftpad=None,
                      window=None, softcap=None, sinks=None):
    return _ref.decode_attention(q, k_cache, v_cache, cache_seqlens, scale=scale, cache_leftpad=cache_leftpad,
                                 window=window, softcap=softcap, sinks=sinks)


def _dcase(id_, cuda_only=False, **p):
    return OpCase(id_, p, cuda_only=cuda_only)


_DECODE_CASES = (
    _dcase("B3-H8/2-Tq1-D64-len1,77,1000-s8", B=3, Hq=8, Hk=2, Tq=1, D=64, lens=(1, 77, 1000), Tmax=1024, splits=8),
    _dcase("B3-H8/1-Tq4-D128-len77,1,1000-s1", B=3, Hq=8, Hk=1, Tq=4, D=128, lens=(77, 1, 1000), Tmax=1000,
           splits=1),
    _dcase("B3-H2/2-Tq4-D64-len0,3,77-s5", B=3, Hq=2, Hk=2, Tq=4, D=64, lens=(0, 3, 77), Tmax=80, splits=5),
    _dcase("B2-H4/4-Tq1-D128-len77,50-default-view", B=2, Hq=4, Hk=4, Tq=1, D=128, lens=(77, 50), Tmax=96,
           cache_view=True),
    _dcase("B2-H16/2-Tq16-D80-len200,16-s3", B=2, Hq=16, Hk=2, Tq=16, D=80, lens=(200, 16), Tmax=256, splits=3),
    _dcase("B3-H4/1-Tq2-D64-leftpad5,0,300-s4", B=3, Hq=4, Hk=1, Tq=2, D=64, lens=(77, 1, 300), leftpad=(5, 0, 300),
           Tmax=320, splits=4),
    # sliding windows (Mistral's, Gemma 3's local layers): a window shorter than some lengths,
    # one of a single key (0), and one reaching back past a left padding
    _dcase("B3-H4/2-Tq1-D64-len1,77,300-window20-s4", B=3, Hq=4, Hk=2, Tq=1, D=64, lens=(1, 77, 300), Tmax=320,
           splits=4, window=(20, 0)),
    _dcase("B2-H8/2-Tq3-D128-len9,200-window0-s1", B=2, Hq=8, Hk=2, Tq=3, D=128, lens=(9, 200), Tmax=256,
           splits=1, window=(0, 0)),
    _dcase("B2-H4/1-Tq4-D80-len150,60-leftpad40,10-window100-default", B=2, Hq=4, Hk=1, Tq=4, D=80, lens=(150, 60),
           leftpad=(40, 10), Tmax=160, window=(100, 0)),
    # soft-capped scores (Gemma 2): a cap that binds, one token and several, split and single pass,
    # and Gemma 2's own cap (50) on plain scores
    _dcase("B3-H8/4-Tq1-D256-len1,77,300-softcap2-s4", B=3, Hq=8, Hk=4, Tq=1, D=256, lens=(1, 77, 300), Tmax=320,
           splits=4, softcap=2.0, q_scale=3.0),
    _dcase("B2-H4/2-Tq3-D128-len9,200-window50-softcap2-s1", B=2, Hq=4, Hk=2, Tq=3, D=128, lens=(9, 200), Tmax=256,
           splits=1, window=(50, 0), softcap=2.0, q_scale=3.0),
    _dcase("B2-H8/8-Tq2-D96-len300,1-softcap50-s3", B=2, Hq=8, Hk=8, Tq=2, D=96, lens=(300, 1), Tmax=300, splits=3,
           softcap=50.0),
    # attention sinks (gpt-oss): one split (the split kernel all the same) and several, an empty
    # sequence (all mass on the sink), a window, and the sink outweighing the keys
    _dcase("B3-H8/2-Tq1-D64-len0,77,300-sinks-s1", B=3, Hq=8, Hk=2, Tq=1, D=64, lens=(0, 77, 300), Tmax=320,
           splits=1, sinks=0.0),
    _dcase("B2-H4/1-Tq3-D64-len9,200-window20-sinks-heavy-s4", B=2, Hq=4, Hk=1, Tq=3, D=64, lens=(9, 200), Tmax=256,
           splits=4, window=(20, 0), sinks=4.0),
    *(
        _dcase(f"B4-H64/8-Tq{tq}-D64-window{w}-sinks-s{s}", cuda_only=True, B=4, Hq=64, Hk=8, Tq=tq, D=64,
               lens=(0, 77, 1000, 4097), Tmax=4224, splits=s, window=None if w is None else (w, 0), sinks=0.0)
        for tq in (1, 4) for w in (None, 127) for s in (1, 32, None)
    ),
    *(
        _dcase(f"B4-H32/8-Tq{tq}-D128-window{w}-s{s}", cuda_only=True, B=4, Hq=32, Hk=8, Tq=tq, D=128,
               lens=(1, 77, 1000, 4097), Tmax=4224, splits=s, window=(w, 0))
        for tq in (1, 4) for w in (511, 4095) for s in (1, 32, None)
    ),
    *(
        _dcase(f"B4-H{8 * g}/8-Tq{tq}-D{d}-s{s}", cuda_only=True, B=4, Hq=8 * g, Hk=8, Tq=tq, D=d,
               lens=(1, 77, 1000, 4097), Tmax=4224, splits=s, cache_view=(s == 7),
               leftpad=(0, 13, 999, 200) if s == 32 else None)
        for g in (1, 4, 8) for tq in (1, 4, 16) for d in (64, 128) for s in (1, 7, 32, None)
    ),
    *(
        _dcase(f"B4-H16/8-Tq{tq}-D{d}-softcap{cap:g}-s{s}", cuda_only=True, B=4, Hq=16, Hk=8, Tq=tq, D=d,
               lens=(1, 77, 1000, 4097), Tmax=4224, splits=s, softcap=cap, q_scale=3.0 if cap == 2 else 1.0,
               window=(4095, 0) if s == 32 else None)
        for tq in (1, 4) for d in (128, 256) for s in (1, 32, None) for cap in (2.0, 50.0)
    ),
)


def _rotary_args(p: dict, dtype: torch.dtype, device: str):
    """Params: B, Hq, Hk, T, D, Tmax, seqlens; ``positions`` (B,) or None; ``per_token``: HF-style
    (B, T, R) cos/sin at positions ``positions[b] + t``; ``R``: rotary dim (default D)."""
    B, Hq, Hk, T, D, Tmax = p["B"], p["Hq"], p["Hk"], p["T"], p["D"], p["Tmax"]
    q = torch.randn(B, T, Hq, D, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, T, Hk, D, device=device, dtype=dtype).transpose(1, 2)
    kc = torch.randn(B, Hk, Tmax, D, device=device, dtype=dtype)
    vc = torch.randn(B, Hk, Tmax, D, device=device, dtype=dtype)
    inv_freq = _ref.rope_inv_freq(p.get("R", D), 500000.0)
    seqlens = torch.tensor(p["seqlens"], device=device, dtype=torch.int32)
    pos = torch.tensor(p["positions"], device=device, dtype=torch.int32) if p.get("positions") else None
    if p.get("per_token"):
        ids = (pos if pos is not None else seqlens).long()[:, None] + torch.arange(T, device=device)
        cos, sin = _ref.rope_cos_sin(ids, inv_freq, dtype)
        pos = None
    else:
        cos, sin = _ref.rope_cos_sin(torch.arange(p.get("P", Tmax), device=device)[None], inv_freq, dtype)
        cos, sin = cos[0], sin[0]
    if p.get("fp32_tables"):
        cos, sin = _ref.rope_cos_sin(torch.arange(p.get("P", Tmax), device=device)[None], inv_freq, torch.float32)
        cos, sin = cos[0], sin[0]
    return (q, k, v, kc, vc, cos, sin, seqlens, pos), ({"interleaved": True} if p.get("pairs") else {})


def _rotary_op(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions=None, interleaved=False):
    """Functional form for the table: appends into copies and returns (q, k_cache, v_cache)."""
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    return (rotary_cache_append(q, k, v, k_cache, v_cache, cos, sin, cache_seqlens, positions, interleaved),
            k_cache, v_cache)


_ROTARY_CASES = (
    OpCase("decode-B3-H8/2-T1-D64-table", dict(B=3, Hq=8, Hk=2, T=1, D=64, Tmax=96, seqlens=(0, 40, 95))),
    OpCase("prefill-B2-H4/2-T77-D80-table", dict(B=2, Hq=4, Hk=2, T=77, D=80, Tmax=100, seqlens=(0, 10))),
    OpCase("B2-H4/1-T3-D128-positions", dict(B=2, Hq=4, Hk=1, T=3, D=128, Tmax=24, seqlens=(4, 9), positions=(0, 3))),
    OpCase("B2-H4/4-T3-D64-hf-per-token", dict(B=2, Hq=4, Hk=4, T=3, D=64, Tmax=20, seqlens=(5, 2), positions=(1, 0),
                                                per_token=True)),
    OpCase("overflow-B1-T3-D32", dict(B=1, Hq=2, Hk=1, T=3, D=32, Tmax=20, seqlens=(18,), P=24)),
    # partial rotary: Phi-4-mini rotates 96 of 128 dims (tq1: a decode step), others half a head
    OpCase("partial-B2-H6/2-T1-D128-R96-table", dict(B=2, Hq=6, Hk=2, T=1, D=128, R=96, Tmax=40, seqlens=(0, 33))),
    OpCase("partial-B2-H4/1-T5-D64-R32-hf-per-token", dict(B=2, Hq=4, Hk=1, T=5, D=64, R=32, Tmax=20, seqlens=(3, 0),
                                                            positions=(3, 0), per_token=True)),
    # adjacent pairs (GLM-4: half of each head; Helium, Ernie 4.5: all of it)
    OpCase("pairs-B2-H4/2-T1-D128-R64-table", dict(B=2, Hq=4, Hk=2, T=1, D=128, R=64, Tmax=40, seqlens=(0, 33),
                                                   pairs=True)),
    OpCase("pairs-B2-H4/1-T5-D64-hf-per-token", dict(B=2, Hq=4, Hk=1, T=5, D=64, Tmax=20, seqlens=(3, 0),
                                                     positions=(3, 0), per_token=True, pairs=True)),
    # Ernie 4.5 keeps its tables in fp32 whatever the model's dtype
    OpCase("pairs-B2-H4/2-T3-D64-fp32-table", dict(B=2, Hq=4, Hk=2, T=3, D=64, Tmax=24, seqlens=(4, 9), pairs=True,
                                                   fp32_tables=True)),
    OpCase("B8-H32/8-T1-D128", dict(B=8, Hq=32, Hk=8, T=1, D=128, Tmax=4096, seqlens=(0, 1, 77, 1000, 4095, 7, 8, 9)),
           cuda_only=True),
    OpCase("B2-H32/8-T1024-D128", dict(B=2, Hq=32, Hk=8, T=1024, D=128, Tmax=2048, seqlens=(0, 1000)), cuda_only=True),
)

_S_PADS = [2 ** i for i in range(1, (MAX_SPLITS - 1).bit_length() + 1)]  # the combine's padded split counts
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}
_HEAD_DIMS = (64, 80, 96, 128, 256)  # the head dims of real Llama-family models
# (head dim, rotary dim) of partial rotary: Phi-4-mini's 96 of 128, and half a head
_PARTIAL_ROTARY = ((128, 96), (128, 64), (64, 32))


def _split_signature(ptr: str, split: bool, st: str, lse_st: str, lengths: dict) -> dict:
    """The split kernel's argument types: pointers, strides ``st`` (LSE strides ``lse_st``), and
    ``lengths`` for q_len / group / max_len / m_tiles. The single pass passes 0 for the split
    stride (a multiple of 16 to Triton)."""
    return {"Q": ptr, "K": ptr, "V": ptr, "SEQLENS": "*i32", "LEFTPAD": "*i32",
            "O": "*fp32" if split else ptr, "LSE": "*fp32" if split else ptr, "sm_scale": "fp32", "softcap": "fp32",
            "use_leftpad": "i32", "window_left": "i32",
            **{f"stride_{n}{s}": st for n in "qkvo" for s in "bht"}, "stride_os": st if split else "i32:16",
            **{f"stride_l{s}": lse_st for s in "bht"}, **lengths}


def _combine_signature(ptr: str, st: str, q_len: str) -> dict:
    return {"O_PART": "*fp32", "LSE": "*fp32", "OUT": ptr, "stride_ob": st, "stride_oh": st, "stride_ot": st,
            "n_rows": "i32", "n_heads": "i32", "q_len": q_len, "n_splits": "i32"}


# A one-token decode step (Tq = 1, as fastllama.generate and a patched HF model run it): Triton's
# JIT compiles an integer argument equal to 1 as a constant ("constexpr" in its signature, the
# parameter gone from the PTX), so the step launches variants of its own. The kernels keep that
# specialisation for q_len only and leave every other length unspecialised (their
# do_not_specialize lists), so a launch compiles one of these builds whatever the group, cache
# size, split count or batch; tests/test_build_report.py dry-runs the ops at decode shapes and
# requires it. Real head dims (64 to 256) make every stride a multiple of 16: aligned builds
# only for the one-token step.
_ONE = {"q_len": 1}
# The combine and rotary + cache launches pass no num_stages: they compile with Triton's default.
# (The report built them with 1 until a dry run of the launches showed the difference.)
_DEFAULT_STAGES = 3


def _decode_builds() -> list[KernelBuild]:
    """Split kernel: dtype x head dim x (aligned strides: BLOCK_M 16/32/64, fp32 16; unaligned:
    16 x 16 tiles) x (single pass, split) x (no window, windowed rows: WINDOW 0 / 2); combine
    kernel: dtype x head dim x S_PAD. Plus the Tq = 1 decode-step variants ("tq1", see
    ``_ONE``): split kernel x tile (GQA groups up to 16, 17-32, 33-64) x (single pass, split) x
    (no window, window bound: WINDOW 0 / 1) and combine x S_PAD, aligned. Every split-kernel
    build is repeated with soft-capped scores (``SOFTCAP``, Gemma 2's), on its capped tile.

    An aligned launch (:func:`~fastllama.kernels.decode_attention.strides_aligned`) has every
    q/k/v/output stride a multiple of 16, which Triton specialises on at launch: those builds
    say "i32:16" (the single pass passes 0 for the partial output's split stride, a multiple of 16
    too). The LSE strides and the lengths (Tq >= 2, group, Tmax, m_tiles) are never specialised
    (the kernel's do_not_specialize lists): plain "i32"."""
    builds = []
    general = {"q_len": "i32", "group": "i32", "max_len": "i32", "m_tiles": "i32"}
    for dtype, ptr in _PTR.items():
        for D in _HEAD_DIMS:
            d_pad = _dk.padded_head_dim(D)
            variants = [(rows, True) for rows in ((16,) if dtype == torch.float32 else (16, 32, 64))] + [(16, False)]
            for rows, aligned in variants:
                # A general build serves Tq >= 2 (Tq = 1 launches the tq1 variant below): a tile
                # of `rows` rows as rows / 2 heads x 2 query rows.
                st = "i32:16" if aligned else "i32"
                for split, window, softcap in itertools.product((False, True), (0, 2), (False, True)):
                    for (bm, bn, warps, stages), archs in by_arch(
                            lambda sm: (*_gpu_config(rows // 2, 2, d_pad, dtype.itemsize, aligned, sm, split,
                                                     window > 0, softcap), _stages(dtype.itemsize, sm))):
                        builds.append(KernelBuild(
                            _dk.decode_split_kernel, _split_signature(ptr, split, st, "i32", general),
                            {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": split,
                             "PRECISION": "ieee", "WINDOW": window, "SOFTCAP": softcap},
                            num_warps=warps, num_stages=stages, archs=archs,
                            label=f"decode_attention {'split' if split else 'single'} {ptr[1:]} d{D} M{bm} N{bn}"
                                  f"{'' if aligned else ' unaligned'}{' window' if window else ''}"
                                  f"{' softcap' if softcap else ''}"))
            # Tq = 1: the tile of a GQA group of up to 16 heads (MHA too) is 16 rows, as _gpu_config
            # picks; 16-bit groups of 17-32 and 33-64 heads take one tile of 32 and 64 rows, fp32
            # several 16-row tiles.
            groups = (16,) if dtype == torch.float32 else (16, 32, 64)
            for group, split, window, softcap in itertools.product(groups, (False, True), (0, 1), (False, True)):
                lengths = {"q_len": "constexpr", "group": "i32", "max_len": "i32", "m_tiles": "i32"}
                for (bm, bn, warps, stages), archs in by_arch(
                        lambda sm: (*_gpu_config(group, 1, d_pad, dtype.itemsize, True, sm, split, softcap=softcap),
                                    _stages(dtype.itemsize, sm))):
                    builds.append(KernelBuild(
                        _dk.decode_split_kernel, _split_signature(ptr, split, "i32:16", "i32", lengths),
                        {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT": split,
                         "PRECISION": "ieee", "WINDOW": window, "SOFTCAP": softcap, **_ONE},
                        num_warps=warps, num_stages=stages, archs=archs,
                        label=f"decode_attention tq1 {'split' if split else 'single'} {ptr[1:]} d{D} M{bm} N{bn}"
                              f"{' window' if window else ''}{' softcap' if softcap else ''}"))
            for s_pad, aligned in itertools.product(_S_PADS, (True, False)):
                st = "i32:16" if aligned else "i32"  # the output's strides (q's layout)
                builds.append(KernelBuild(
                    _dk.decode_combine_kernel, _combine_signature(ptr, st, "i32"),
                    {"HEAD_DIM": D, "D_PAD": d_pad, "S_PAD": s_pad, "ROWS": 1},
                    num_warps=4, num_stages=_DEFAULT_STAGES,
                    label=f"decode_attention combine {ptr[1:]} d{D} S{s_pad}{'' if aligned else ' unaligned'}"))
            for s_pad in _S_PADS:
                builds.append(KernelBuild(
                    _dk.decode_combine_kernel, _combine_signature(ptr, "i32:16", "constexpr"),
                    {"HEAD_DIM": D, "D_PAD": d_pad, "S_PAD": s_pad, "ROWS": 1, **_ONE}, num_warps=4,
                    num_stages=_DEFAULT_STAGES,
                    label=f"decode_attention combine tq1 {ptr[1:]} d{D} S{s_pad}"))
    return builds


def _rotary_builds() -> list[KernelBuild]:
    """dtype x head dim (and the partial rotary dims of ``_PARTIAL_ROTARY``) x (table at the slot,
    table at given positions, HF per-token cos/sin) x pairing (halves, adjacent pairs) x table
    dtype (q's, fp32) x
    (aligned, unaligned strides), plus the Tq = 1 decode step ("tq1", see ``_ONE``): q_len = 1
    as a constant, each cos/sin mode, aligned.

    Aligned: every stride a multiple of 16, as in every dense or HF layout with head_dim % 16 == 0
    (table builds pass 0 for the cos/sin batch strides, a multiple too); Triton specialises on
    that at launch, so those builds say "i32:16". Unaligned: a strided view can be launched with
    any strides, compiled with none known (the most registers). The lengths are never
    specialised but q_len's == 1 (the kernel's do_not_specialize lists): plain "i32"."""
    builds = []
    names = [f"stride_{n}{s}" for n in ("q", "k", "v", "o", "kc", "vc") for s in ("b", "h", "t")]
    names += ["stride_cb", "stride_ct", "stride_sb", "stride_st"]
    for ptr in _PTR.values():
        for D, R in [(D, D) for D in _HEAD_DIMS] + list(_PARTIAL_ROTARY):
            half_pad = triton.next_power_of_2(R // 2)
            tail = D // 2 - R // 2
            partial = {"TAIL_HALF": tail, "TAIL_PAD": _rk.tail_pad(tail)}
            modes = ((True, False), (True, True), (False, False))  # (TABLE, HAS_POS)
            variants = [(False, aligned) for aligned in (True, False)] + [(True, True)]  # (tq1, aligned)
            # each pairing with tables of q's dtype, and of fp32 beside 16-bit q (Ernie 4.5's)
            tables = [(pairs, t) for pairs in (False, True) for t in dict.fromkeys((ptr, "*fp32"))]
            for (tq1, aligned), (table, has_pos), (pairs, cos_ptr) in itertools.product(variants, modes, tables):
                st = "i32:16" if aligned else "i32"
                sig = {"Q": ptr, "K": ptr, "V": ptr, "COS": cos_ptr, "SIN": cos_ptr, "QO": ptr, "KC": ptr, "VC": ptr,
                       "SEQLENS": "*i32", "POS": "*i32", **{n: st for n in names},
                       "n_q_heads": "i32", "n_kv_heads": "i32", "q_len": "constexpr" if tq1 else "i32",
                       "max_len": "i32", "n_pos": "i32", "tokens_per_program": "i32"}
                builds.append(KernelBuild(
                    _rk.rotary_cache_kernel, sig,
                    {"HALF": R // 2, "HALF_PAD": half_pad, "BLOCK_R": _rk.block_r(half_pad), "TABLE": table,
                     "HAS_POS": has_pos, **partial, "INTERLEAVED": pairs, **(_ONE if tq1 else {})},
                    num_warps=4, num_stages=_DEFAULT_STAGES,
                    label=f"rotary_cache_append{' tq1' if tq1 else ''} {ptr[1:]} d{D}{f' r{R}' if tail else ''} "
                          f"{'table' if table else 'per-token'}{' positions' if has_pos else ''}"
                          f"{'' if aligned else ' unaligned'}{' pairs' if pairs else ''}"
                          f"{' fp32-tables' if cos_ptr != ptr else ''}"))
    return builds


OP_SPECS = [
    OpSpec("decode_attention", decode_attention, _decode_reference, _decode_args, _DECODE_CASES,
           kernels=("decode_attention",), names=("q", "k_cache", "v_cache", "cache_seqlens"), output_names=("out",),
           build_configs=_decode_builds),
    OpSpec("rotary_cache_append", _rotary_op, _ref.rotary_cache_append, _rotary_args, _ROTARY_CASES,
           kernels=("rotary_cache",), bench_op=rotary_cache_append,
           names=("q", "k", "v", "k_cache", "v_cache", "cos", "sin", "cache_seqlens", "positions"),
           output_names=("q_rotated", "k_cache", "v_cache"), build_configs=_rotary_builds),
]
