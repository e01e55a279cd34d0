"""``rms_norm``: HF ``LlamaRMSNorm`` (or Gemma's, ``unit_offset``, or OLMo's, ``round_once``),
optionally fused with the residual add before it.

Validation, config choice, the ``torch.library`` custom ops (``fastllama::rms_norm_fwd`` /
``fastllama::rms_norm_bwd``, so ``torch.compile(fullgraph=True)`` sees one op each way) and their
autograd, plus the op-table entries.
"""
from __future__ import annotations

import functools
import itertools
from typing import Optional

import torch
import triton

from .. import reference
from .._interpreter import interpreter_active
from ..kernels import rms_norm as _k
from ..optable import INT_HINTS, KernelBuild, OpCase, OpSpec
from ._checks import check_last_dim_contiguous, check_same, check_tensor, num_sms, savable

__all__ = ["rms_norm", "MAX_HIDDEN"]

# Rows up to 8192 (4096 in the backward) live in registers; wider ones are chunked (two passes). Any width would work;
# this bound only keeps the chunk loop short.
MAX_HIDDEN = 65536


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _gpu_tile(block_n: int, backward: bool = False, chunked: bool = False, unit_offset: bool = False,
              wide_weight: bool = False) -> tuple[int, int]:
    """(BLOCK_M, num_warps) on a GPU for a chunk width BLOCK_N: ~4K elements a tile, so small
    rows are batched, and 8-16 fp32 values a thread per tensor. The 16-wide backward takes 2K:
    256 x 16 at 8 warps spilled 8 bytes on sm_80 for 16-bit inputs once launched with its
    multiple-of-16 hints (ptxas held it to 80 registers); 128 x 16 needs 64, no spill.
    1024-wide rows: 4 x 1024 at 8 warps spilled 8 bytes (sm_80, fp32 backward, and the forward
    with the residual); the backward takes 4 warps, the forward 2 rows with 4 warps (4 rows with
    4 warps spilled 8 bytes on sm_120: ptxas held them to 64 registers; 2 rows: 62-70, every arch).
    The chunked forward (rows wider than MAX_BLOCK_N) takes 16 warps: 8 spilled 8 bytes on sm_120
    with the residual (held to 64-74 registers); 16: 52-58.
    Gemma's unit-offset backward: 32 x 128 (bf16, residual) spilled 8 bytes on sm_90 at 8 warps
    (16 here); chunked rows spilled 8-16 bytes on sm_90/100/120 with 4096-wide chunks at 4, 8 or
    16 warps, and with 2048-wide ones at 4 or 8 (1 or 2 rows): 2 x 2048 at 16 warps does not.
    An fp32 weight under 16-bit x (``wide_weight``): the 4096-wide backward at 8 warps spilled 16
    bytes on sm_86 (the weight tile twice as wide in registers); 16 warps: 48-102 registers."""
    block_m = max(1, (2048 if backward and block_n == 16 else 4096) // block_n)
    num_warps = min(16, max(4, block_m * block_n // 512))
    if block_n == 1024:
        block_m, num_warps = (4, 4) if backward else (2, 4)
    if chunked and not backward:
        num_warps = 16
    if unit_offset and backward and block_n == 128:
        num_warps = 16
    if unit_offset and backward and chunked:  # (2048-wide chunks: see block_cols)
        block_m, num_warps = 2, 16
    if wide_weight and backward and block_n == 4096:
        num_warps = 16
    return block_m, num_warps


# dweight sums dy * n over rows: sequentially within a program, then the (programs, N) partial
# sums by torch (a cascade sum). Sequential runs of more than ~32 rows lose fp32 accuracy against
# torch's own dweight (the parity rule allows 3x its error), so no program takes more.
_DW_ROWS_PER_PROGRAM = 32


def _config(n_rows: int, n_cols: int, device: torch.device, backward: bool = False,
            unit_offset: bool = False, wide_weight: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, num_warps, backward programs)."""
    block_n, chunked = _k.block_cols(n_cols, backward, unit_offset)
    if interpreter_active():
        # Each program is a Python-level step: fewer, larger tiles. But the interpreter's
        # tl.sum(axis=0) adds a tile's rows one after another, so backward tiles stay short.
        rows = triton.next_power_of_2(max(n_rows, 1))
        if backward:
            block_m = min(rows, 16)
            return block_m, 1, triton.cdiv(n_rows, block_m)
        return min(rows, max(1, 65536 // block_n)), 1, 1
    block_m, num_warps = _gpu_tile(block_n, backward, chunked, unit_offset, wide_weight)
    sms = num_sms(device)
    return block_m, num_warps, max(2 * sms, triton.cdiv(n_rows, max(_DW_ROWS_PER_PROGRAM, block_m)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N): a view whenever the leading dims collapse to one stride (always for
    contiguous or row-sliced tensors); otherwise reshape copies, the one documented copy."""
    return t.reshape(-1, t.shape[-1])


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllama::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float,
                  unit_offset: bool = False, round_once: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (y, x + residual or an empty tensor, rstd of shape (rows,) in fp32)."""
    x2 = _rows(x)
    block_m, num_warps, _ = _config(x2.shape[0], x2.shape[1], x.device)
    y, s, rstd = _k.rms_norm_forward(x2, weight, eps, _rows(residual) if residual is not None else None,
                                     block_m=block_m, num_warps=num_warps, unit_offset=unit_offset,
                                     round_once=round_once, out_shape=x.shape)
    return y, s, rstd  # (not views: autograd would refuse in-place ops on them, as HF's Mixtral does)


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps, unit_offset=False, round_once=False):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    s = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return x.new_empty(x.shape), s, x.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("fastllama::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, ds_out: Optional[torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                  rstd: torch.Tensor, unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight); ``x`` is the normalised input (x + residual when fused)."""
    def rows(t):  # upstream gradients can be expanded (stride 0) or transposed: copy only then
        return _rows(t if t.stride(-1) == 1 else t.contiguous())

    x2 = rows(x)
    block_m, num_warps, programs = _config(x2.shape[0], x2.shape[1], x.device, backward=True, unit_offset=unit_offset,
                                           wide_weight=weight.dtype != x.dtype)
    dx, dw = _k.rms_norm_backward(rows(dy), x2, weight, rstd, rows(ds_out) if ds_out is not None else None,
                                  block_m=block_m, num_programs=programs, num_warps=num_warps,
                                  unit_offset=unit_offset)
    return dx.view(x.shape), dw


@_rms_norm_bwd.register_fake
def _(dy, ds_out, x, weight, rstd, unit_offset=False):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, residual, _eps, unit_offset, _round_once = inputs
    _y, s, rstd = output
    ctx.has_residual, ctx.unit_offset = residual is not None, unit_offset
    # Only the normalised input (not an fp32 copy) and the per-row rstd are kept.
    ctx.save_for_backward(savable(s if ctx.has_residual else x), weight, rstd)
    # An unused output's gradient stays None (not zeros): with only s used, weight gets no
    # gradient (None, as for HF's modules; an optimizer skips it) and no kernel runs.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, ds_out, _drstd):
    x, weight, rstd = ctx.saved_tensors
    ds_out = ds_out if ctx.has_residual else None
    if dy is None:  # only s = x + residual was used
        return ds_out, None, ds_out, None, None, None
    # (round_once changes only the forward's rounding: the backward is the same math in fp32)
    dx, dw = _rms_norm_bwd(dy, ds_out, x, weight, rstd, ctx.unit_offset)
    # d(x + residual) reaches both summands unchanged, as in PyTorch's own add backward.
    return dx, dw, (dx if ctx.has_residual else None), None, None, None


torch.library.register_autograd("fastllama::rms_norm_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def wide_weight(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """An fp32 weight with fp16/bf16 activations (autocast over fp32 weights), which the norms that
    round once take as it is: they multiply by it in fp32 (HF's ``weight.float()``)."""
    return weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)


def _validate(x, weight, eps, residual, round_once: bool = False) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dim, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=1)
    if not (round_once and wide_weight(x, weight)):
        if weight.dtype != x.dtype:
            raise TypeError(f"weight has dtype {weight.dtype} but x has {x.dtype}; accepted: the same dtype, or "
                            f"an fp32 weight with fp16/bf16 x for a norm that rounds once (unit_offset, round_once)")
    check_same("x", x, "weight", weight, "device")
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x has hidden size {x.shape[-1]}; "
                         f"weight must be ({x.shape[-1]},)")
    if x.shape[-1] > MAX_HIDDEN:
        raise ValueError(f"x has hidden size {x.shape[-1]}; accepted: up to {MAX_HIDDEN}")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    if residual is not None:
        check_tensor("residual", residual)
        check_same("x", x, "residual", residual, "dtype")
        check_same("x", x, "residual", residual, "device")
        if residual.shape != x.shape:
            raise ValueError(f"residual has shape {tuple(residual.shape)} but x has shape {tuple(x.shape)}; "
                             f"they must match")
        check_last_dim_contiguous("residual", residual)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             *, unit_offset: bool = False, round_once: bool | None = None):
    """HF ``LlamaRMSNorm``: ``weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``, one kernel.

    Args:
        x: (..., hidden), fp32/fp16/bf16, any row strides (unit stride in the hidden dim).
        weight: (hidden,), same device as ``x``; same dtype too, or fp32 with fp16/bf16 ``x`` for
            the norms that round once (``unit_offset``, ``round_once``: multiplied in fp32, its
            gradient fp32, as HF's Gemma and OLMo norms under autocast over fp32 weights).
        eps: added to the mean square, as ``LlamaRMSNorm.variance_epsilon``.
        residual: optional tensor like ``x``. Then ``s = x + residual`` (rounded to the input
            dtype, as HF's decoder layer adds) is normalised in the same kernel.
        unit_offset: (keyword only) Gemma's RMSNorm instead: ``(x * rsqrt(mean(x^2) + eps) *
            (1 + weight))`` computed in fp32 and rounded once (``Gemma3RMSNorm``; its weights
            are stored as offsets from 1).
        round_once: (keyword only) multiply by the weight in fp32 and round once at the end,
            ``(weight * (x * rsqrt(mean(x^2) + eps))).to(x.dtype)``: HF's ``Olmo2RMSNorm`` /
            ``Olmo3RMSNorm``, where Llama's rounds the normalised row before the weight
            multiply (two roundings). Default: ``unit_offset`` (Gemma's rounds once too;
            ``unit_offset=True, round_once=False`` is refused).

    Returns:
        ``y`` (contiguous, shape of ``x``), or ``(y, s)`` with ``residual``. Statistics are fp32;
        backward keeps only the input (``s`` when fused) and one fp32 rstd per row. ``y`` and
        ``s`` come out of one autograd node, so a tensor hook on ``s`` sees the gradient that
        reaches ``s`` directly, not ``y``'s share (torch's ``norm(x + residual)`` makes ``s`` the
        norm's input, whose hook sees the sum); the gradients of ``x`` and ``residual`` are the
        same either way. (Two nodes would cost the backward one more pass over the rows.)
    """
    if not isinstance(unit_offset, bool):
        raise TypeError(f"unit_offset must be a bool, got {type(unit_offset).__name__}")
    if round_once is None:
        round_once = unit_offset
    if not isinstance(round_once, bool):
        raise TypeError(f"round_once must be a bool or None, got {type(round_once).__name__}")
    if unit_offset and not round_once:
        raise ValueError("unit_offset=True rounds once (Gemma's RMSNorm): round_once=False is not a norm any model has")
    _validate(x, weight, eps, residual, round_once)
    y, s, _ = _rms_norm_fwd(x, weight, residual, float(eps), unit_offset, round_once)
    return (y, s) if residual is not None else y


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
def _make_args(params: dict, dtype: torch.dtype, device: str):
    """params: shape (..., hidden); row_pad: extra elements per row (a strided row view);
    transposed: x is built (T, B, N) and transposed, so rows do not collapse to one stride."""
    *lead, n = params["shape"]
    pad = params.get("row_pad", 0)

    def make():
        if params.get("transposed"):
            return torch.randn(*reversed(lead), n, device=device, dtype=dtype).transpose(0, 1)
        return torch.randn(*lead, n + pad, device=device, dtype=dtype)[..., :n]

    x = make().requires_grad_()
    # widely spread weights (not ~1, as trained ones are): a wrong weight term in the backward must
    # show in bf16 too (with 1 + 0.1 * randn one such mutation stayed inside bf16 noise)
    # (fp32_weight: an fp32 weight under 16-bit x, as autocast over fp32 weights gives the norms
    # that round once)
    w_dtype = torch.float32 if params.get("fp32_weight") else dtype
    w = (1 + 0.5 * torch.randn(n, device=device, dtype=torch.float32)).to(w_dtype).requires_grad_()
    args = (x, w) + ((make().requires_grad_(),) if params.get("residual") else ())
    flags = {name: True for name in ("unit_offset", "round_once") if params.get(name)}
    return args, {"eps": params.get("eps", 1e-6), **flags}


def _residual_op(x, weight, residual, eps=1e-6, unit_offset=False, round_once=None):
    return rms_norm(x, weight, eps, residual=residual, unit_offset=unit_offset, round_once=round_once)


def _residual_ref(x, weight, residual, eps=1e-6, unit_offset=False, round_once=None):
    return reference.rms_norm(x, weight, eps, residual=residual, unit_offset=unit_offset, round_once=round_once)


_DTYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _build_configs(fused: bool, unit_offset: bool = False, round_once: bool = False) -> list[KernelBuild]:
    """Every GPU specialisation: (BLOCK_N, CHUNKED) for hidden sizes up to MAX_HIDDEN x dtype,
    forward and backward, with or without the fused residual, x integer hints: n_cols and the
    row strides all plain or all multiples of 16 (every Llama hidden size: Triton hints them at
    launch, and the hint on n_cols keeps the masked loads vectors). The row counts are never
    specialised (the kernels' do_not_specialize). ``round_once`` (OLMo's norm): the forward's
    variants only, its backward is Llama's (the ``rms_norm`` specs' builds). The norms that round
    once also take an fp32 weight with fp16/bf16 activations (``wide_weight``): those builds in
    both directions ("w-fp32")."""
    def widths(backward):
        return sorted({_k.block_cols(2 ** i, backward, unit_offset) for i in range(4, 14)}
                      | {_k.block_cols(MAX_HIDDEN, backward, unit_offset)})

    def tag(block_n, chunked, block_m, hints):
        return (f"{ptr[1:]} N{block_n}{' chunked' if chunked else ''} M{block_m}{' residual' if fused else ''}"
                f"{' unit-offset' if unit_offset else ''}{' round-once' if round_once else ''}{hints}")

    single_rounding = unit_offset or round_once
    builds = []
    for ptr, (hints, hint) in itertools.product(_DTYPES.values(), INT_HINTS.items()):
        # (weight pointer, whether the backward builds are this spec's: round_once's same-dtype
        # backward is Llama's)
        weights = [(ptr, not round_once)] + ([("*fp32", True)] if single_rounding and ptr != "*fp32" else [])
        for w_ptr, own_backward in weights:
            wide = " w-fp32" if w_ptr != ptr else ""
            for block_n, chunked in widths(False):
                block_m, num_warps = _gpu_tile(block_n, chunked=chunked)
                builds.append(KernelBuild(
                    _k.rms_norm_fwd_kernel,
                    {"X": ptr, "R": ptr, "S": ptr, "Y": ptr, "W": w_ptr, "RSTD": "*fp32", "n_rows": "i32",
                     "n_cols": hint, "stride_x": hint, "stride_r": hint,
                     "stride_s": hint if fused else "i32:16",  # without a residual the launch passes 0
                     "stride_y": hint, "eps": "fp32"},
                    {"HAS_RESIDUAL": fused, "BLOCK_M": block_m, "BLOCK_N": block_n, "CHUNKED": chunked,
                     "UNIT_OFFSET": unit_offset, "ROUND_ONCE": round_once},
                    num_warps=num_warps, label="rms_norm fwd " + tag(block_n, chunked, block_m, hints) + wide))
            for block_n, chunked in widths(True) if own_backward else ():
                block_m, num_warps = _gpu_tile(block_n, backward=True, chunked=chunked, unit_offset=unit_offset,
                                               wide_weight=bool(wide))
                builds.append(KernelBuild(
                    _k.rms_norm_bwd_kernel,
                    {"DY": ptr, "DS_OUT": ptr, "X": ptr, "W": w_ptr, "RSTD": "*fp32", "DX": ptr,
                     "DW_PARTIAL": "*fp32", "n_rows": "i32", "n_cols": hint, "rows_per_program": "i32",
                     "stride_dy": hint, "stride_ds": hint, "stride_x": hint, "stride_dx": hint},
                    {"HAS_DS_OUT": fused, "BLOCK_M": block_m, "BLOCK_N": block_n, "CHUNKED": chunked,
                     "UNIT_OFFSET": unit_offset},
                    num_warps=num_warps, label="rms_norm bwd " + tag(block_n, chunked, block_m, hints) + wide))
    return builds


_CASES = (
    OpCase("3x77x160", {"shape": (3, 77, 160)}),
    OpCase("1x1x64", {"shape": (1, 1, 64)}),
    OpCase("5x4099-rowpad", {"shape": (5, 4099), "row_pad": 61}),
    OpCase("77x3x96-transposed", {"shape": (3, 77, 96), "transposed": True}),
    OpCase("big-eps", {"shape": (2, 33, 128), "eps": 0.5}),
    OpCase("3x9001-chunked", {"shape": (3, 9001)}),
    OpCase("2x1024x4096", {"shape": (2, 1024, 4096)}, cuda_only=True),
    OpCase("4x2048x16384", {"shape": (4, 2048, 16384)}, cuda_only=True),
    OpCase("1x300x65536", {"shape": (1, 300, 65536)}, cuda_only=True),
)
_RESIDUAL_CASES = (
    OpCase("3x77x256", {"shape": (3, 77, 256), "residual": True}),
    OpCase("5x4099-rowpad", {"shape": (5, 4099), "residual": True, "row_pad": 3}),
    OpCase("1x1x4096", {"shape": (1, 1, 4096), "residual": True}),
    OpCase("2x16387-chunked-rowpad", {"shape": (2, 16387), "residual": True, "row_pad": 5}),
    OpCase("8x2048x4096", {"shape": (8, 2048, 4096), "residual": True}, cuda_only=True),
    OpCase("1x4097x14336", {"shape": (1, 4097, 14336), "residual": True}, cuda_only=True),
)
# Gemma's (1 + w), rounded once: without and with the residual, a chunked row among them
_UNIT_OFFSET_CASES = (
    OpCase("3x77x1152", {"shape": (3, 77, 1152), "unit_offset": True}),
    OpCase("100x3x256-transposed", {"shape": (3, 100, 256), "transposed": True, "unit_offset": True}),
    OpCase("2x9001-chunked", {"shape": (2, 9001), "unit_offset": True, "row_pad": 7}),
    OpCase("3x77x1152-fp32-weight", {"shape": (3, 77, 1152), "unit_offset": True, "fp32_weight": True}),
)
_RESIDUAL_UNIT_OFFSET_CASES = (
    OpCase("5x33x160", {"shape": (5, 33, 160), "residual": True, "unit_offset": True}),
    OpCase("2x9001-chunked-rowpad", {"shape": (2, 9001), "residual": True, "unit_offset": True, "row_pad": 7}),
    OpCase("5x33x160-fp32-weight", {"shape": (5, 33, 160), "residual": True, "unit_offset": True,
                                    "fp32_weight": True}),
    OpCase("8x2048x3840", {"shape": (8, 2048, 3840), "residual": True, "unit_offset": True}, cuda_only=True),
)
# OLMo 2/3's w, rounded once: their norms run on whole rows and on q/k projections (all heads)
_ROUND_ONCE_CASES = (
    OpCase("3x77x160", {"shape": (3, 77, 160), "round_once": True}),
    OpCase("77x3x96-transposed", {"shape": (3, 77, 96), "transposed": True, "round_once": True}),
    OpCase("2x9001-chunked-rowpad", {"shape": (2, 9001), "round_once": True, "row_pad": 7}),
    OpCase("3x77x160-fp32-weight", {"shape": (3, 77, 160), "round_once": True, "fp32_weight": True}),
    OpCase("2x9001-chunked-fp32-weight", {"shape": (2, 9001), "round_once": True, "fp32_weight": True}),
    OpCase("4x2048x2048", {"shape": (4, 2048, 2048), "round_once": True}, cuda_only=True),
)
_RESIDUAL_ROUND_ONCE_CASES = (
    OpCase("5x33x160", {"shape": (5, 33, 160), "residual": True, "round_once": True}),
    OpCase("2x9001-chunked", {"shape": (2, 9001), "residual": True, "round_once": True}),
    OpCase("5x33x160-fp32-weight", {"shape": (5, 33, 160), "residual": True, "round_once": True, "fp32_weight": True}),
)

# One spec per norm (Llama's, Gemma's unit offset, OLMo's single rounding), each without and with
# the fused residual add
OP_SPECS = [
    spec
    for suffix, flags, cases, residual_cases in (
        ("", {}, _CASES, _RESIDUAL_CASES),
        ("_unit_offset", {"unit_offset": True}, _UNIT_OFFSET_CASES, _RESIDUAL_UNIT_OFFSET_CASES),
        ("_round_once", {"round_once": True}, _ROUND_ONCE_CASES, _RESIDUAL_ROUND_ONCE_CASES),
    )
    for spec in (
        OpSpec(f"rms_norm{suffix}", rms_norm, reference.rms_norm, _make_args, cases, kernels=("rms_norm",),
               names=("x", "weight"), output_names=("y",),
               build_configs=functools.partial(_build_configs, fused=False, **flags)),
        OpSpec(f"rms_norm_residual{suffix}", _residual_op, _residual_ref, _make_args, residual_cases,
               kernels=("rms_norm",), names=("x", "weight", "residual"), output_names=("y", "x+residual"),
               build_configs=functools.partial(_build_configs, fused=True, **flags)),
    )
]
