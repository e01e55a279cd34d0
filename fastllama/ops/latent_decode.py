"""``latent_decode_attention``: decode attention over a multi-head latent attention cache.

DeepSeek-V2/V3, GLM-4.7-Flash, Mistral 4 and MiniCPM3 keep one latent vector and one shared
rotary key per token; their decode step attends over those directly, every head against the same
rows (``fastllama/kernels/latent_decode_attention.py`` explains the algebra). Forward only, one
``torch.library`` custom op (``fastllama::latent_decode_attention``), lengths read on the device:
a step made of it can be captured as a CUDA graph, as ``decode_attention``'s can.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton

from .._interpreter import interpreter_active
from ..kernels import decode_attention as _dk
from ..kernels import latent_decode_attention as _lk
from ..kernels.flash_attention import table_arch
from ..optable import KernelBuild, OpCase, OpSpec, by_arch
from ..reference import functional as _ref
from ._checks import check_attention_device, check_last_dim_contiguous, check_same, check_tensor
from .decode import (_DEFAULT_STAGES, _ONE, _PTR, _S_PADS, MAX_QUERY_LEN, _check_forward_only,
                     _check_lengths, _check_num_splits, _combine_signature, _stages, default_num_splits)

__all__ = ["latent_decode_attention", "MAX_LATENT_DIM", "MAX_ROPE_DIM"]

MAX_LATENT_DIM = 512  # DeepSeek-V2/V3's and GLM-4.7-Flash's kv_lora_rank (Mistral 4's, MiniCPM3's: 256)
MAX_ROPE_DIM = 128  # their qk_rope_head_dim is 64 (MiniCPM3's 32)


def _gpu_config(heads: int, q_len: int, r_pad: int, p_pad: int, elem_bytes: int, sm: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) on a GPU of table arch ``sm``. The accumulator is BLOCK_M x
    RANK fp32 and each key block a BLOCK_N x (RANK + ROPE) tile, 2-4x a regular decode head's, so
    the tiles are small and the warps many; sized from sm_80/86/90/100/120 compiles (ptxas
    registers and shared memory; no spills on any):

    * 16-bit, RANK 512: 32 rows (heads x new tokens; fewer are padded) and 16 keys, 8 warps, at
      most 183 registers. 16 rows spilled 8 bytes on sm_90 (ptxas held them to 128 registers),
      and 32 keys on sm_100/120 (16 bytes); 4 warps spilled 8-40, and 64 rows 32-576 (8 or 16
      warps, 16 or 32 keys): DeepSeek-V3's 128 heads take four tiles;
    * 16-bit, RANK 256 and below: 16 or 32 rows and 32 keys, 8 warps (at most 140 registers;
      64 keys spilled 8 bytes on sm_100/120); 16 keys for 32 rows with a rotary key of 64 (32
      spilled 8 bytes on sm_80);
    * fp32: 16 rows, 16 keys, 32 warps at RANK 512 (64 registers; 16 warps spilled 8-24 bytes on
      sm_86/90/120 once the rotary keys had a pointer of their own, 8 and 4 warps 16-32; 32 keys
      need 110 KB of shared memory, past the 99 KB of sm_86/120); 32 keys and 8
      warps below (127 registers; 16 keys spilled 8 bytes at ptxas's 80-register step, 16 warps
      too); with a 64-dim rotary key, 64 keys and 16 warps where 103 KB of shared memory fits
      (32 keys spilled 16 bytes on sm_90; sm_86/120 keep 32, which do not spill there)."""
    if elem_bytes >= 4:
        if r_pad >= 512:
            return 16, 16, 32
        return (16, 64, 16) if p_pad >= 64 and sm not in (86, 120) else (16, 32, 8)
    if r_pad >= 512:
        return 32, 16, 8
    bm = _lk.tile_rows(heads, q_len, 32)
    return bm, 16 if bm == 32 and p_pad >= 64 else 32, 8


def _combine_warps(r_pad: int) -> int:
    """The combine's (splits x RANK) fp32 tile: 8 warps at RANK 512 (4 held 128 registers)."""
    return 8 if r_pad >= 512 else 4


_INTERPRETER_BLOCK_N = 128  # fewer, larger Python-level steps under the interpreter
_INTERPRETER_ROWS = 64


@torch.library.custom_op("fastllama::latent_decode_attention", mutates_args=())
def _latent_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                             rope_cache: torch.Tensor, cache_seqlens: torch.Tensor, cache_leftpad: torch.Tensor | None,
                             scale: float, num_splits: int) -> torch.Tensor:
    r_pad = _dk.padded_head_dim(q_latent.shape[-1])
    caches = (q_latent, q_rope, latent_cache, rope_cache, cache_seqlens)
    if interpreter_active():
        bm = _lk.tile_rows(q_latent.shape[1], q_latent.shape[2], 64)
        return _lk.latent_decode_attention_forward(*caches, scale=scale, num_splits=num_splits,
                                                   cache_leftpad=cache_leftpad, block_n=_INTERPRETER_BLOCK_N,
                                                   block_m=bm, num_warps=4, num_stages=1,
                                                   combine_rows=_INTERPRETER_ROWS)
    sm = table_arch(q_latent.device)
    bm, bn, warps = _gpu_config(q_latent.shape[1], q_latent.shape[2], r_pad, _dk.padded_head_dim(q_rope.shape[-1]),
                                q_latent.element_size(), sm)
    return _lk.latent_decode_attention_forward(*caches, scale=scale, num_splits=num_splits, cache_leftpad=cache_leftpad,
                                               block_n=bn, block_m=bm, num_warps=warps,
                                               num_stages=_stages(q_latent.element_size(), sm),
                                               combine_warps=_combine_warps(r_pad))


@_latent_decode_attention.register_fake
def _(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, cache_leftpad, scale, num_splits):
    return q_latent.new_empty(q_latent.shape)


def _validate(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, cache_leftpad, scale, num_splits) -> None:
    check_tensor("q_latent", q_latent, ndim=4)
    B, H, Tq, R = q_latent.shape
    if not 1 <= Tq <= MAX_QUERY_LEN:
        raise ValueError(f"q_latent has {Tq} query rows (shape {tuple(q_latent.shape)}); accepted: 1 to "
                         f"{MAX_QUERY_LEN} (prefill longer chunks with flash_attention on the expanded heads)")
    if not 1 <= R <= MAX_LATENT_DIM:
        raise ValueError(f"q_latent has {R} latent dims; accepted: 1 to {MAX_LATENT_DIM}")
    check_tensor("q_rope", q_rope, ndim=4)
    check_same("q_latent", q_latent, "q_rope", q_rope, "dtype")
    check_same("q_latent", q_latent, "q_rope", q_rope, "device")
    if q_rope.shape[:3] != (B, H, Tq) or not 1 <= q_rope.shape[3] <= MAX_ROPE_DIM:
        raise ValueError(f"q_rope has shape {tuple(q_rope.shape)}; accepted: ({B}, {H}, {Tq}, P) with 1 <= P <= "
                         f"{MAX_ROPE_DIM} (batch, heads and rows of q_latent)")
    P = q_rope.shape[3]
    for name, cache, width, what in (("latent_cache", latent_cache, R, "latent"),
                                     ("rope_cache", rope_cache, P, "rotary key")):
        check_tensor(name, cache, ndim=3)
        check_same("q_latent", q_latent, name, cache, "dtype")
        check_same("q_latent", q_latent, name, cache, "device")
        if cache.shape[0] != B or cache.shape[2] != width or cache.shape[1] != latent_cache.shape[1]:
            raise ValueError(f"{name} has shape {tuple(cache.shape)}; accepted: ({B}, {latent_cache.shape[1]}, "
                             f"{width}) (each token's {what}; batch and slots of latent_cache)")
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent_cache", latent_cache),
                    ("rope_cache", rope_cache)):
        check_last_dim_contiguous(name, t)
    # the kernel's 32-bit offsets inside one sequence: a tile of 128 tokens, a row of heads x rows
    token_stride = max(latent_cache.stride(1), rope_cache.stride(1))
    if (token_stride * 128 >= 2**31 or (H - 1) * max(q_latent.stride(1), q_rope.stride(1))
            + (Tq - 1) * max(q_latent.stride(2), q_rope.stride(2)) + max(R, P) >= 2**31):
        raise ValueError(f"q_latent, q_rope or a cache has strides past the kernel's int32 offsets within a "
                         f"sequence (cache token stride {token_stride}); pass contiguous tensors")
    check_attention_device(q_latent)
    _check_lengths("cache_seqlens", cache_seqlens, B, q_latent, "q_latent")
    if cache_leftpad is not None:
        _check_lengths("cache_leftpad", cache_leftpad, B, q_latent, "q_latent")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or (
            not torch.compiler.is_compiling() and not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float (the unabsorbed heads' softmax scale), got {scale!r}")
    _check_num_splits(num_splits)
    _check_forward_only("latent_decode_attention", q_latent=q_latent, q_rope=q_rope, latent_cache=latent_cache,
                        rope_cache=rope_cache)


def latent_decode_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, latent_cache: torch.Tensor,
                            rope_cache: torch.Tensor, cache_seqlens: torch.Tensor, *, scale: float,
                            num_splits: int | None = None, cache_leftpad: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Multi-head latent attention of a few new queries over a latent cache, forward only.

    With each head's query already absorbed into the latent space (``q_latent[h] = W_UK[h]^T
    q_nope[h]``, W_UK[h] the head's key rows of ``kv_b_proj``), head h's scores are
    ``(q_latent[h] . c + q_rope[h] . k_rope) * scale`` over the cached tokens' latents c and
    rotary keys k_rope, and its output is the softmax-weighted sum of the latents (multiply it by
    the head's value rows of ``kv_b_proj`` to get the head's output). The same as attention over
    the expanded heads, with one cache row per token read for a whole tile of heads.

    Args:
        q_latent: (B, H, Tq, R) with 1 <= Tq <= 16 and R <= :data:`MAX_LATENT_DIM`, fp32/fp16/bf16,
            unit last stride.
        q_rope: (B, H, Tq, P), P <= :data:`MAX_ROPE_DIM`: the rotary part of the queries (rotated),
            same dtype and device.
        latent_cache: (B, Tmax, R): each token's latent (normed, as the model's ``kv_a_layernorm``
            gives it); unit last stride.
        rope_cache: (B, Tmax, P): each token's rotated rotary key; unit last stride. The two
            caches may be views of one (B, Tmax, R + P) buffer (``buf[..., :R]``, ``buf[..., R:]``).
        cache_seqlens: (B,) int32 on the device, as :func:`decode_attention`'s: sequence b's first
            ``L_b`` slots, the new tokens included; query t sits at slot ``L_b - Tq + t`` and sees
            the slots up to it. Read on the device (no host sync); clamped to [0, Tmax].
        scale: the softmax scale of the model's unabsorbed heads (``attn.scaling``, e.g.
            ``qk_head_dim ** -0.5`` times yarn's mscale^2): required, no default fits.
        num_splits: key chunks per sequence, 1 to ``MAX_SPLITS``; default from the shapes (as
            :func:`fastllama.ops.decode.default_num_splits`). Every split count is deterministic.
        cache_leftpad: None (every sequence starts at slot 0), or (B,) int32 on the device: the
            first slot of sequence b (a left-padded batch: its padding slots before it are never
            read); clamped to [0, L_b]. A query whose slot is before it sees no key.

    Returns:
        (B, H, Tq, R) in q_latent's dtype: each head's softmax-weighted latent; zeros for a query
        with no key (``L_b == 0``, or its slot before ``cache_leftpad[b]``).
    """
    _validate(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, cache_leftpad, scale, num_splits)
    if num_splits is None:
        B, H, Tq, R = q_latent.shape
        bm = _gpu_config(H, Tq, _dk.padded_head_dim(R), _dk.padded_head_dim(q_rope.shape[-1]),
                         q_latent.element_size(), table_arch(q_latent.device))[0]
        num_splits = default_num_splits(B, 1, triton.cdiv(H * Tq, bm), latent_cache.shape[1], q_latent.device)
    # (the output and the split partials, (H, Tq, splits, R) per sequence, in int32 offsets too)
    if q_latent.shape[1] * q_latent.shape[2] * num_splits * q_latent.shape[3] >= 2**31:
        raise ValueError(f"q_latent of shape {tuple(q_latent.shape)} with {num_splits} splits needs per-sequence "
                         f"outputs past the kernel's int32 offsets; pass fewer heads or splits")
    return _latent_decode_attention(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, cache_leftpad,
                                    float(scale), num_splits)


# ----------------------------------------------------------------------------------------------
# Op table (forward only)
# ----------------------------------------------------------------------------------------------
def _args(p: dict, dtype: torch.dtype, device: str):
    """Params: B, H, Tq, R, P, lens, Tmax, splits, leftpad. Slots past each length and before
    each left pad hold NaN (never read); ``view``: the caches are slices of a wider
    (B, Tmax + 7, R + P + 16) buffer (as the generator's are of its (B, Tmax, R + P) one), else
    two tensors (as HF's cache keeps them)."""
    B, H, Tq, R, P, Tmax = p["B"], p["H"], p["Tq"], p["R"], p["P"], p["Tmax"]
    q_latent = torch.randn(B, Tq, H, R, device=device, dtype=dtype).transpose(1, 2)
    q_rope = torch.randn(B, Tq, H, P, device=device, dtype=dtype).transpose(1, 2)
    if p.get("view"):
        buffer = torch.randn(B, Tmax + 7, R + P + 16, device=device, dtype=dtype)[:, 3:3 + Tmax]
        latent_cache, rope_cache = buffer[..., :R], buffer[..., R:R + P]
    else:
        latent_cache = torch.randn(B, Tmax, R, device=device, dtype=dtype)
        rope_cache = torch.randn(B, Tmax, P, device=device, dtype=dtype)
    leftpad = p.get("leftpad")
    for b, n in enumerate(p["lens"]):
        for cache in (latent_cache, rope_cache):
            cache[b, n:] = float("nan")
            cache[b, :leftpad[b] if leftpad else 0] = float("nan")
    lens = torch.tensor(p["lens"], device=device, dtype=torch.int32)
    kwargs = {"scale": (R + P) ** -0.5, "num_splits": p.get("splits")}  # (scores of about unit size)
    if leftpad:
        kwargs["cache_leftpad"] = torch.tensor(leftpad, device=device, dtype=torch.int32)
    return (q_latent, q_rope, latent_cache, rope_cache, lens), kwargs


def _reference(q_latent, q_rope, latent_cache, rope_cache, cache_seqlens, scale, num_splits=None,
               cache_leftpad=None):
    """The same attention over the latent cache written as ordinary attention: one key head (the
    token's latent and rotary key), its value the latent, every query head reading it."""
    q = torch.cat((q_latent, q_rope), dim=-1)
    k = torch.cat((latent_cache, rope_cache), dim=-1)[:, None]
    return _ref.decode_attention(q, k, latent_cache[:, None], cache_seqlens, scale=scale,
                                 cache_leftpad=cache_leftpad)


_CASES = (
    OpCase("B3-H4-Tq1-R64-P16-len1,77,300-s4", dict(B=3, H=4, Tq=1, R=64, P=16, lens=(1, 77, 300), Tmax=320,
                                                     splits=4)),
    OpCase("B2-H5-Tq3-R48-P8-len0,90-s1-view", dict(B=2, H=5, Tq=3, R=48, P=8, lens=(0, 90), Tmax=96, splits=1,
                                                     view=True)),
    OpCase("B2-H16-Tq2-R128-P32-len200,3-default", dict(B=2, H=16, Tq=2, R=128, P=32, lens=(200, 3), Tmax=256)),
    # left padding: a padded prompt's step (pads 0, 50, 130 and 5 of 7: two rows see no key), splits
    OpCase("B4-H3-Tq2-R64-P16-len77,150,131,7-leftpad-s3", dict(B=4, H=3, Tq=2, R=64, P=16, lens=(77, 150, 131, 7),
                                                                 leftpad=(0, 50, 130, 5), Tmax=160, splits=3)),
    *(OpCase(f"B4-H{h}-Tq{tq}-R512-P64-s{s}", dict(B=4, H=h, Tq=tq, R=512, P=64, lens=(1, 77, 1000, 4097),
                                                   Tmax=4224, splits=s), cuda_only=True)
      for h in (16, 128) for tq in (1, 4) for s in (1, 32, None)),
)

# (latent dims, rotary dims): DeepSeek-V2/V3's and GLM-4.7-Flash's, Mistral 4's, MiniCPM3's
_LATENT_DIMS = ((512, 64), (256, 64), (256, 32))


def _builds() -> list[KernelBuild]:
    """The latent kernel: dtype x (RANK, ROPE) of :data:`_LATENT_DIMS` x (single pass, split) x
    (the one-token step, Tq >= 2) x the tiles :func:`_gpu_config` picks (16 or 32 rows), aligned
    strides (every real latent width is a multiple of 16); and the combine kernel at
    RANK (the decode combine's code, this op's widths and warps)."""
    builds = []
    for (dtype, ptr), (R, P) in itertools.product(_PTR.items(), _LATENT_DIMS):
        r_pad, p_pad = _dk.padded_head_dim(R), _dk.padded_head_dim(P)
        rows_options = (16,) if dtype == torch.float32 else (16, 32)
        for rows, split, tq1 in itertools.product(rows_options, (False, True), (True, False)):
            lengths = {"q_len": "constexpr" if tq1 else "i32", "n_heads": "i32", "max_len": "i32"}
            st = "i32:16"
            sig = {"QL": ptr, "QR": ptr, "C": ptr, "KR": ptr, "SEQLENS": "*i32", "LEFTPAD": "*i32",
                   "O": "*fp32" if split else ptr, "LSE": "*fp32" if split else ptr, "sm_scale": "fp32",
                   **{f"stride_{n}{s}": st for n in "qro" for s in "bht"}, "stride_cb": st, "stride_ct": st,
                   "stride_kb": st, "stride_kt": st, "stride_os": st if split else "i32:16",
                   **{f"stride_l{s}": "i32" for s in "bht"}, **lengths, "use_leftpad": "i32"}
            if _gpu_config(rows, 1, r_pad, p_pad, dtype.itemsize, 90)[0] != rows:
                continue  # (RANK 512 runs every head count on 32-row tiles)
            for (bm, bn, warps, stages), archs in by_arch(
                    lambda sm: (*_gpu_config(rows, 1, r_pad, p_pad, dtype.itemsize, sm), _stages(dtype.itemsize, sm))):
                builds.append(KernelBuild(
                    _lk.latent_decode_kernel, sig,
                    {"RANK": R, "R_PAD": r_pad, "ROPE": P, "P_PAD": p_pad, "BLOCK_M": bm, "BLOCK_N": bn,
                     "SPLIT": split, "PRECISION": "ieee", **(_ONE if tq1 else {})},
                    num_warps=warps, num_stages=stages, archs=archs,
                    label=f"latent_decode_attention{' tq1' if tq1 else ''} {'split' if split else 'single'} "
                          f"{ptr[1:]} r{R} p{P} M{bm} N{bn}"))
        if (R, P) != next(d for d in _LATENT_DIMS if d[0] == R):
            continue  # (the combine's builds of this latent width are listed already)
        for s_pad, tq1 in itertools.product(_S_PADS, (True, False)):
            builds.append(KernelBuild(
                _dk.decode_combine_kernel, _combine_signature(ptr, "i32:16", "constexpr" if tq1 else "i32"),
                {"HEAD_DIM": R, "D_PAD": r_pad, "S_PAD": s_pad, "ROWS": 1, **(_ONE if tq1 else {})},
                num_warps=_combine_warps(r_pad), num_stages=_DEFAULT_STAGES,
                label=f"latent_decode_attention combine{' tq1' if tq1 else ''} {ptr[1:]} r{R} S{s_pad}"))
    return builds


OP_SPECS = [
    OpSpec("latent_decode_attention", latent_decode_attention, _reference, _args, _CASES,
           kernels=("latent_decode_attention", "decode_attention"),
           names=("q_latent", "q_rope", "latent_cache", "rope_cache", "cache_seqlens"),
           output_names=("out",), build_configs=_builds),
]
