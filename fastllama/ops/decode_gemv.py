"""``decode_linear``: a decode step's linear layer with the RMSNorm before it, the gated
activation after it and the residual add after that in the same kernel (forward only).

The Generator's decode step (``fastllama.generate``) runs a Llama layer's four linears through it
when that is faster on the GPU at hand (it times both ways when it captures the step): four
kernels where the unfused layer launches seven around the attention.
``fastllama/kernels/decode_linear.py`` has the math. One ``torch.library`` custom op
(``fastllama::decode_linear``): capturable in a CUDA graph, opaque to torch.compile.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
import torch.nn.functional as F

from .._interpreter import interpreter_active
from ..kernels import decode_linear as _k
from ..optable import KernelBuild, OpCase, OpSpec
from ..reference import functional as _ref
from ._checks import check_last_dim_contiguous, check_same, check_tensor
from .decode import _check_forward_only

__all__ = ["decode_linear", "NORMS", "ACTIVATIONS"]

NORMS = {"llama": _k.LLAMA_NORM, "unit_offset": _k.UNIT_OFFSET_NORM, "round_once": _k.ROUND_ONCE_NORM}
ACTIVATIONS = {None: _k.NO_ACTIVATION, "silu": _k.SILU, "gelu_tanh": _k.GELU_TANH}

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _gpu_config(elem_bytes: int, aligned: bool, gated: bool, norm: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) on a GPU. 16 rows (a decode batch;
    more rows run more row tiles, each reading the weight again). 16 weight rows per program, so
    that even a 2048-row weight gives 128 programs to spread over the SMs; 256 columns per step
    (128 in fp32) and 3 stages keep 8 KB (16 KB gated) of each program's weight loads in flight,
    the bytes per SM a memory-bound stream needs. Unmeasured: chosen from the build report
    (registers and spills on sm_80/86/90/100/120), not from timings. Where that tile spilled
    (8-104 B per thread):

    * gated without the norm (not what the Generator launches), 16-bit on sm_120, fp32 on
      sm_80, and gated fp32 with it on sm_100/120: 128 columns over 8 warps instead (with 4
      warps it spilled 8 B on sm_90 at 78 registers);
    * unaligned (K or a row stride not a multiple of 16: no vector loads, an address per
      element): 64 columns a step and 4 stages, gated 32 over 8 warps (at 4 warps and 32-64
      columns they spilled 8-32 B on sm_86/90/120).
    The 16-bit gated tile with the norm (gate/up: what the Generator launches) keeps 256 columns
    at 4 warps: 128 columns spilled 8 B on sm_90 (4 warps) and sm_120 (8 warps). With OLMo's
    once-rounded norm (Helium's) bf16 spilled 8 B on sm_90 at 3 and 4 stages, 8 warps 16 B on
    sm_100/120: 2 stages for that tile (fp16 too, every arch: the tiles are the same for all).
    ``norm`` is the kernel's NORM constant (``NORMS`` values, or 0)."""
    if not aligned:
        return (16, 16, 32, 8, 4) if gated else (16, 16, 64, 4, 4)
    if gated and (elem_bytes >= 4 or norm == _k.NO_NORM):
        return 16, 16, 128, 8, 3
    if gated and norm == _k.ROUND_ONCE_NORM:
        return 16, 16, 256, 4, 2
    return (16, 16, 128, 4, 3) if elem_bytes >= 4 else (16, 16, 256, 4, 3)


_INTERPRETER_CONFIG = (16, 64, 512, 4, 1)  # fewer, larger Python-level steps


@torch.library.custom_op("fastllama::decode_linear", mutates_args=())
def _decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   norm_weight: Optional[torch.Tensor], residual: Optional[torch.Tensor], eps: float,
                   norm: int, activation: int) -> torch.Tensor:
    n_out = weight.shape[0] // (2 if activation else 1)
    out = torch.empty(x.shape[0], n_out, dtype=x.dtype, device=x.device)
    bm, bn, bk, warps, stages = _INTERPRETER_CONFIG if interpreter_active() else _gpu_config(
        x.element_size(), _k.strides_aligned(x, weight), activation != _k.NO_ACTIVATION, norm)
    return _k.decode_linear_forward(x, weight, bias, norm_weight, residual, out, eps=eps, norm=norm,
                                    activation=activation, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                                    num_stages=stages)


@_decode_linear.register_fake
def _(x, weight, bias, norm_weight, residual, eps, norm, activation):
    return x.new_empty(x.shape[0], weight.shape[0] // (2 if activation else 1))


def _check_operand(name: str, t: torch.Tensor, shape: tuple, x: torch.Tensor, what: str = "", why: str = "") -> None:
    """An optional operand (bias, norm weight, residual): x's dtype and device, ``shape``, unit
    last stride (the kernel reads its rows as contiguous vectors)."""
    check_tensor(name, t)
    check_same("x", x, name, t, "dtype")
    check_same("x", x, name, t, "device")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be {what}{shape}{why}")
    check_last_dim_contiguous(name, t)


def _validate(x, weight, bias, norm_weight, eps, norm, activation, residual) -> int:
    """Checks everything; returns the output features N."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dim (..., in_features), got a 0-dim tensor")
    check_tensor("weight", weight, ndim=2)
    check_same("x", x, "weight", weight, "dtype")
    check_same("x", x, "weight", weight, "device")
    K = x.shape[-1]
    if weight.shape[1] != K:
        raise ValueError(f"weight has shape {tuple(weight.shape)} but x has {K} features; it must be (out, {K})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if activation is not None and weight.shape[0] % 2:
        raise ValueError(f"with activation={activation!r} weight holds the gate rows then the up rows, an even "
                         f"count; got {weight.shape[0]} rows")
    n_out = weight.shape[0] // (2 if activation is not None else 1)
    if bias is not None:
        _check_operand("bias", bias, (weight.shape[0],), x, why=", one per weight row")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if norm_weight is not None:
        _check_operand("norm_weight", norm_weight, (K,), x)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    if residual is not None:
        _check_operand("residual", residual, (*x.shape[:-1], n_out), x, what="the output's, ")
    check_last_dim_contiguous("x", x)
    check_last_dim_contiguous("weight", weight)
    _check_forward_only("decode_linear", x=x, weight=weight, bias=bias, norm_weight=norm_weight, residual=residual)
    return n_out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) as (M, C) with one row stride (a view where the leading dims allow, else a copy:
    a decode step's few rows)."""
    return t.reshape(-1, t.shape[-1])


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-6, norm: str = "llama",
                  activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + act(linear(rms_norm(x)))`` in one kernel, for the few rows of a decode step
    (forward only); each part optional::

        h = rms_norm(x, norm_weight, eps)          (when norm_weight is given)
        y = h @ weight.T + bias
        y = act(y[..., :N]) * y[..., N:]           (when activation is given: a gated MLP's gate
                                                    rows, then its up rows, in one weight)
        y = residual + y                           (when residual is given)

    Every intermediate is rounded to x's dtype where fastllama's unfused ops round it (the normed
    row as ``ops.rms_norm``, the linear's output, ``act(g) * u`` once as ``ops.swiglu``, the sum), so
    it equals them up to the order of the products' sums (HF's MLP also rounds ``act(g)`` before
    the product). Meant for up to 16 rows: the weight is read once per 16 rows. Under
    ``torch.compile`` it is one opaque op.

    Args:
        x: (..., K), fp32/fp16/bf16, unit last stride.
        weight: (N, K), or (2N, K) with ``activation`` (gate rows first), unit last stride; same
            dtype and device as x.
        bias: (N,) or (2N,), contiguous, optional.
        norm_weight: (K,), the RMSNorm's weight, same dtype as x, contiguous; None: no norm.
        eps: the RMSNorm's epsilon.
        norm: "llama" (``w * (x * rstd).to(dtype)``, HF's LlamaRMSNorm), "unit_offset" (Gemma's
            ``((x * rstd) * (1 + w)).to(dtype)``) or "round_once" (OLMo 2/3's ``((x * rstd) *
            w).to(dtype)``).
        activation: None, "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
        residual: (..., N), optional, added last (in x's dtype, as HF's decoder layer adds).

    Returns:
        (..., N) in x's dtype.
    """
    n_out = _validate(x, weight, bias, norm_weight, eps, norm, activation, residual)
    lead = x.shape[:-1]
    y = _decode_linear(_rows(x), weight, bias, norm_weight, None if residual is None else _rows(residual),
                       float(eps), NORMS[norm] if norm_weight is not None else _k.NO_NORM, ACTIVATIONS[activation])
    return y.view(*lead, n_out)


# ----------------------------------------------------------------------------------------------
# Op table (forward only)
# ----------------------------------------------------------------------------------------------
def _reference(x, weight, bias=None, norm_weight=None, residual=None, *, eps=1e-6, norm="llama", activation=None):
    """The unfused modules: HF's RMSNorm, ``F.linear``, the gated activation, the residual add."""
    h = x
    if norm_weight is not None:
        h = _ref.rms_norm(x, norm_weight, eps, unit_offset=norm == "unit_offset", round_once=norm == "round_once")
    y = F.linear(h, weight, bias)
    if activation is not None:
        gate, up = y.chunk(2, dim=-1)
        y = _ref.swiglu(gate, up, activation=activation)
    return y if residual is None else residual + y


def _op(x, weight, bias=None, norm_weight=None, residual=None, *, eps=1e-6, norm="llama", activation=None):
    return decode_linear(x, weight, bias, norm_weight=norm_weight, eps=eps, norm=norm, activation=activation,
                         residual=residual)


def _args(p: dict, dtype: torch.dtype, device: str):
    """Params: rows (leading shape), K, N (outputs), bias, norm (None or its kind), activation,
    residual, weight_pad (extra elements per weight row: a strided weight)."""
    K, N, act = p["K"], p["N"], p.get("activation")
    rows = p["rows"]
    x = torch.randn(*rows, K, device=device, dtype=dtype)
    n_w = 2 * N if act else N
    pad = p.get("weight_pad", 0)
    weight = (torch.randn(n_w, K + pad, device=device, dtype=dtype) * K ** -0.5)[:, :K]
    bias = torch.randn(n_w, device=device, dtype=dtype) * 0.1 if p.get("bias") else None
    norm_weight = (1.0 + 0.1 * torch.randn(K, device=device, dtype=dtype)) if p.get("norm") else None
    residual = torch.randn(*rows, N, device=device, dtype=dtype) if p.get("residual") else None
    kwargs = {"eps": 1e-5, "norm": p.get("norm") or "llama", "activation": act}
    return (x, weight, bias, norm_weight, residual), kwargs


_CASES = (
    OpCase("M1-K256-N48-plain", dict(rows=(1,), K=256, N=48)),
    OpCase("M3-K80-N77-bias", dict(rows=(3,), K=80, N=77, bias=True)),  # odd sizes: unaligned, masked K and N
    OpCase("M1x1-K512-N96-llama-norm", dict(rows=(1, 1), K=512, N=96, norm="llama")),
    OpCase("M5-K272-N40-unit-offset-norm-bias", dict(rows=(5,), K=272, N=40, norm="unit_offset", bias=True)),
    OpCase("M2-K96-N33-round-once-norm", dict(rows=(2,), K=96, N=33, norm="round_once")),
    OpCase("M1-K384-N160-llama-norm-silu", dict(rows=(1,), K=384, N=160, norm="llama", activation="silu")),
    OpCase("M4-K112-N70-unit-offset-gelu-bias", dict(rows=(4,), K=112, N=70, norm="unit_offset",
                                                    activation="gelu_tanh", bias=True)),
    OpCase("M2x3-K640-N64-residual", dict(rows=(2, 3), K=640, N=64, residual=True)),
    OpCase("M17-K160-N50-residual-bias-strided", dict(rows=(17,), K=160, N=50, residual=True, bias=True,
                                                      weight_pad=16)),  # two row tiles
    OpCase("M1-K2048-N3072-llama-norm", dict(rows=(1,), K=2048, N=3072, norm="llama"), cuda_only=True),
    OpCase("M8-K2048-N8192-llama-norm-silu", dict(rows=(8,), K=2048, N=8192, norm="llama", activation="silu"),
           cuda_only=True),
    OpCase("M1-K8192-N2048-residual", dict(rows=(1,), K=8192, N=2048, residual=True), cuda_only=True),
)


def _builds() -> list[KernelBuild]:
    """Every launch's build: dtype x the combinations the op launches (no norm / each norm) x
    (no activation / each) with or without residual, x bias x aligned strides (the launcher's
    ALIGNED: K and the row strides multiples of 16, every real model's) at :func:`_gpu_config`'s
    tile."""
    builds = []
    for (dtype, ptr), norm, act, residual, bias, aligned in itertools.product(
            _PTR.items(), [_k.NO_NORM, *NORMS.values()], ACTIVATIONS.values(), (False, True), (False, True),
            (True, False)):
        bm, bn, bk, warps, stages = _gpu_config(dtype.itemsize, aligned, act != _k.NO_ACTIVATION, norm)
        sig = {"X": ptr, "NORM_W": ptr, "W": ptr, "BIAS": ptr, "RES": ptr, "Y": ptr,
               **{n: "i32" for n in _k.LAUNCH_VARYING_INTS}, "eps": "fp32"}
        builds.append(KernelBuild(
            _k.decode_linear_kernel, sig,
            {"NORM": norm, "ACTIVATION": act, "HAS_BIAS": bias, "HAS_RESIDUAL": residual, "ALIGNED": aligned,
             "PRECISION": "ieee", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "NORM_BLOCK": _k.NORM_BLOCK},
            num_warps=warps, num_stages=stages,
            label=f"decode_linear {ptr[1:]} norm{norm} act{act}{' residual' if residual else ''}"
                  f"{' bias' if bias else ''}{'' if aligned else ' unaligned'} N{bn} K{bk}"))
    return builds


OP_SPECS = [
    OpSpec("decode_linear", _op, _reference, _args, _CASES, kernels=("decode_linear",),
           names=("x", "weight", "bias", "norm_weight", "residual"), output_names=("out",), build_configs=_builds),
]
