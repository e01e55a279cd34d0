"""Norm and activation fused into the linear layers around them, for activation memory.

Autograd keeps, for every ``nn.Linear``, its input until the backward. In a Llama layer two of
those inputs are cheap to recompute from tensors that are kept anyway:

* the output of an RMSNorm, ``y = w * x * rstd``, read by q/k/v_proj (or gate/up_proj): the norm
  keeps ``x`` and ``rstd`` for its own backward, so ``y`` is one elementwise pass away;
* the SwiGLU output ``h = silu(g) * u``, read by down_proj: the SwiGLU keeps ``g`` and ``u``.

Two autograd functions do the norm (or the activation) and the matmuls as one node and keep only
those inputs; the backward recomputes ``y`` (or ``h``) once, uses it for the weight gradients and
frees it. The forward and backward math is unchanged (same kernels, same matmuls in the same
dtypes); what changes is the memory held between them. At the Llama-3.2-1B shape in bf16 that is
4 KiB per token for each norm and 16 KiB for the activation, out of ~74 KiB per token per layer.

The matmuls are ``F.linear`` calls on the module's own weights, so only plain ``nn.Linear``
projections without hooks can be folded in (``fastllama.patch`` checks; LoRA layers or hooked
modules keep the unfused path).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import reference
from ..optable import OpCase, OpSpec
from ._checks import check_same, check_tensor, savable
from .rms_norm import _rms_norm_bwd, _rms_norm_fwd, _validate as _validate_norm
from .swiglu import _gelu, _rows, _swiglu, _swiglu_bwd, validate_pair as validate_swiglu_inputs

__all__ = ["rms_norm_linear", "swiglu_linear"]


def _matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in: autocast's when it is on, else the input's (a
    mismatch with the weight is an error, as in ``F.linear``)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but the input is {x.dtype}; they must match "
                        f"(outside autocast, as in F.linear)")
    return x.dtype


def _check_linear(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor], in_features: int,
                  like: torch.Tensor) -> None:
    check_tensor(name, weight, ndim=2)
    check_same("x", like, name, weight, "device")
    if weight.shape[1] != in_features:
        raise ValueError(f"{name} has shape {tuple(weight.shape)} but the input has {in_features} features; "
                         f"it must be (out_features, {in_features})")
    if bias is not None:
        check_tensor(f"bias of {name}", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias of {name} has shape {tuple(bias.shape)}; it must be ({weight.shape[0]},)")
    if not torch.is_autocast_enabled(like.device.type):  # (under autocast all are cast, as nn.Linear does)
        for what, t in ((name, weight), (f"bias of {name}", bias)):
            if t is not None and t.dtype != like.dtype:
                raise TypeError(f"{what} has dtype {t.dtype} but the input is {like.dtype}; they must match "
                                f"(outside autocast, as in F.linear)")


# ----------------------------------------------------------------------------------------------
# RMSNorm -> linears
# ----------------------------------------------------------------------------------------------
class _NormLinears(torch.autograd.Function):
    """``y = rms_norm(x [+ residual])``, then ``y @ W_i^T + b_i`` for each projection i.

    Saved: the norm's input (``s = x + residual`` when fused), its weight, rstd and the projection
    weights. Backward recomputes ``y`` and then

        dW_i = dout_i^T y          db_i = sum_rows dout_i          dy = sum_i dout_i W_i

    and hands ``dy`` (plus the gradient reaching ``s`` directly) to the RMSNorm backward kernel.
    """

    @staticmethod
    def forward(ctx, x, norm_weight, residual, eps, unit_offset, mm_dtype, n, *params):
        weights, biases = params[:n], params[n:]
        y, s, rstd = _rms_norm_fwd(x, norm_weight, residual, eps, unit_offset)
        # (M, out) products, shaped by the caller: F.linear of an N-D input with a bias returns a
        # view, and autograd refuses in-place ops on a custom Function's view outputs
        y_mm = _rows(y.to(mm_dtype))
        outs = tuple(F.linear(y_mm, w, b) for w, b in zip(weights, biases))
        ctx.has_residual = residual is not None
        ctx.eps, ctx.unit_offset, ctx.mm_dtype, ctx.n = eps, unit_offset, mm_dtype, n
        ctx.has_bias = tuple(b is not None for b in biases)
        ctx.save_for_backward(savable(s if ctx.has_residual else x), norm_weight, rstd, *weights)
        # unused outputs get None, not zeros: their weights get no gradient (None, as nn.Linear's)
        ctx.set_materialize_grads(False)
        return outs + ((s,) if ctx.has_residual else ())

    @staticmethod
    def backward(ctx, *grads):
        normed_input, norm_weight, rstd, *weights = ctx.saved_tensors
        d_outs = grads[:ctx.n]
        d_s = grads[ctx.n] if ctx.has_residual else None
        if all(d is None for d in d_outs):  # only s = x + residual was used: nothing else gets a gradient
            return (d_s, None, d_s, None, None, None, None) + (None,) * (2 * ctx.n)
        y = _rms_norm_fwd(normed_input, norm_weight, None, ctx.eps, ctx.unit_offset)[0]  # the recomputation
        y_mm = _rows(y.to(ctx.mm_dtype))
        need_w = ctx.needs_input_grad[7:7 + ctx.n]  # (after x, weight, residual, eps, unit_offset, dtype, n)
        d_weights, d_biases, dy = [], [], None
        for d_out, w, has_bias, want_w in zip(d_outs, weights, ctx.has_bias, need_w):
            if d_out is None:  # this projection's output was not used
                d_weights.append(None)
                d_biases.append(None)
                continue
            d_out = _rows(d_out)
            d_weights.append(d_out.t() @ y_mm if want_w else None)
            d_biases.append(d_out.sum(0) if has_bias else None)
            # summed in the norm output's dtype, as autograd sums the projections' gradients for
            # HF (fp32 under autocast of an fp32 model: a bf16 sum was 1.4x HF's error)
            if dy is None:
                dy = (d_out @ w).to(y.dtype)
            elif d_out.dtype == dy.dtype:  # added in the GEMM's epilogue: no separate add pass (3 per layer)
                dy.addmm_(d_out, w)
            else:
                dy += (d_out @ w).to(y.dtype)
        del y_mm
        dx, d_norm_weight = _rms_norm_bwd(dy.view(y.shape), d_s, normed_input, norm_weight, rstd, ctx.unit_offset)
        # d(x + residual) reaches both summands unchanged
        return (dx, d_norm_weight, dx if ctx.has_residual else None, None, None, None, None, *d_weights, *d_biases)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, weights: Sequence[torch.Tensor],
                    biases: Optional[Sequence[Optional[torch.Tensor]]] = None, eps: float = 1e-6,
                    residual: Optional[torch.Tensor] = None, *, unit_offset: bool = False):
    """``[F.linear(rms_norm(x), W, b) for W, b in zip(weights, biases)]`` keeping only the norm's input.

    What HF's ``input_layernorm`` followed by ``q_proj``/``k_proj``/``v_proj`` computes (or
    ``post_attention_layernorm`` followed by ``gate_proj``/``up_proj``), as one autograd node: the
    normalised activations that each projection would keep for its weight gradient are recomputed
    in the backward from the norm's input and per-row rstd, which the norm keeps anyway.

    Args:
        x: (..., hidden) activations; ``norm_weight`` (hidden,): as in :func:`rms_norm` (same
            dtype, or fp32 with fp16/bf16 ``x`` for Gemma's ``unit_offset``; unit stride in the
            hidden dim).
        weights: the projections' (out_i, hidden) weights; biases: one per weight, or None.
            Outside autocast they must have the normalised activations' dtype (as ``F.linear``
            requires); under ``torch.autocast`` they are cast to the autocast dtype, and so is the
            normalised input to the matmuls, as ``nn.Linear`` would.
        eps: RMSNorm epsilon. residual: fuse ``s = x + residual`` before the norm (as
            :func:`rms_norm` does). unit_offset: (keyword only) Gemma's norm, as in :func:`rms_norm`.

    Returns:
        A tuple of the projections (..., out_i), followed by ``s`` when ``residual`` is given.
    """
    _validate_norm(x, norm_weight, eps, residual, round_once=unit_offset is True)
    weights = tuple(weights)
    if not weights:
        raise ValueError("weights is empty: give at least one projection")
    biases = tuple(biases) if biases is not None else (None,) * len(weights)
    if len(biases) != len(weights):
        raise ValueError(f"biases has {len(biases)} entries for {len(weights)} weights; give one per weight "
                         f"(None for no bias)")
    for i, (w, b) in enumerate(zip(weights, biases)):
        _check_linear(f"weights[{i}]", w, b, x.shape[-1], x)
    mm_dtype = _matmul_dtype(x, weights[0])
    weights = tuple(w.to(mm_dtype) for w in weights)  # no-ops outside autocast
    biases = tuple(b.to(mm_dtype) if b is not None else None for b in biases)
    outs = _NormLinears.apply(x, norm_weight, residual, float(eps), bool(unit_offset), mm_dtype, len(weights),
                              *weights, *biases)
    lead = x.shape[:-1]
    return tuple(o.view(*lead, o.shape[-1]) for o in outs[:len(weights)]) + tuple(outs[len(weights):])


# ----------------------------------------------------------------------------------------------
# SwiGLU -> linear
# ----------------------------------------------------------------------------------------------
class _SwiGLULinear(torch.autograd.Function):
    """``out = h W^T + b`` with ``h = silu(g) * u``. Saved: g, u and W (not h). Backward:

        h = silu(g) * u  (recomputed)     dW = dout^T h     db = sum_rows dout
        dh = dout W                       dg, du = SwiGLU backward of dh (the swiglu kernel)
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, gelu):
        ctx.has_bias, ctx.gelu = bias is not None, gelu
        ctx.save_for_backward(savable(gate), savable(up), weight)
        return F.linear(_rows(_swiglu(gate, up, gelu)), weight, bias)  # (M, out): see _NormLinears

    @staticmethod
    def backward(ctx, d_out):
        gate, up, weight = ctx.saved_tensors
        d_rows = _rows(d_out)
        d_weight = d_bias = None
        if ctx.needs_input_grad[2]:
            d_weight = d_rows.t() @ _rows(_swiglu(gate, up, ctx.gelu))  # h lives only for this matmul
        if ctx.has_bias and ctx.needs_input_grad[3]:
            d_bias = d_rows.sum(0)
        d_h = (d_rows @ weight).view(gate.shape)
        d_gate, d_up = _swiglu_bwd(d_h, gate, up, ctx.gelu)
        return d_gate, d_up, d_weight, d_bias, None


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, activation: str = "silu") -> torch.Tensor:
    """``F.linear(swiglu(gate, up), weight, bias)``, the Llama MLP's ``down_proj(act(gate) * up)``,
    keeping only ``gate`` and ``up`` for the backward (the SwiGLU output, which down_proj would
    keep, is recomputed there: one elementwise kernel).

    Args:
        gate, up: (..., I) as in :func:`swiglu`. weight: (out, I); bias: (out,) or None. Outside
            autocast the weight has the activations' dtype; under autocast it is cast to the
            autocast dtype (as ``nn.Linear`` does).
        activation: (keyword only) "silu", or "gelu_tanh": GeGLU (Gemma's MLP), as in :func:`swiglu`.

    Returns:
        (..., out).
    """
    gelu = _gelu(activation)
    validate_swiglu_inputs(gate, up)
    _check_linear("weight", weight, bias, gate.shape[-1], gate)
    mm_dtype = _matmul_dtype(gate, weight)
    gate, up = gate.to(mm_dtype), up.to(mm_dtype)
    out = _SwiGLULinear.apply(gate, up, weight.to(mm_dtype), bias.to(mm_dtype) if bias is not None else None, gelu)
    return out.view(*gate.shape[:-1], out.shape[-1])


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
def _norm_linear_op(x, norm_weight, w_a, w_b, b_b, residual=None, eps=1e-6, unit_offset=False):
    return rms_norm_linear(x, norm_weight, [w_a, w_b], [None, b_b], eps=eps, residual=residual,
                           unit_offset=unit_offset)


def _norm_linear_reference(x, norm_weight, w_a, w_b, b_b, residual=None, eps=1e-6, unit_offset=False):
    """Two projections of the normalised x, the second with a bias (as Qwen2's k/v_proj)."""
    if residual is not None:
        s = x + residual
        y = reference.rms_norm(s, norm_weight, eps, unit_offset=unit_offset)
        return F.linear(y, w_a), F.linear(y, w_b, b_b), s
    y = reference.rms_norm(x, norm_weight, eps, unit_offset=unit_offset)
    return F.linear(y, w_a), F.linear(y, w_b, b_b)


def _make_norm_linear_args(params: dict, dtype: torch.dtype, device: str):
    *lead, n = params["shape"]
    outs = params["outs"]

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_()

    x = t(*lead, n)
    norm_weight = (1 + 0.1 * torch.randn(n, device=device)).to(dtype).requires_grad_()
    args = (x, norm_weight, t(outs[0], n, scale=n ** -0.5), t(outs[1], n, scale=n ** -0.5), t(outs[1], scale=0.1))
    return args + ((t(*lead, n),) if params.get("residual") else ()), (
        {"unit_offset": True} if params.get("unit_offset") else {})


def _swiglu_linear_reference(gate, up, weight, bias, activation="silu"):
    return F.linear(reference.swiglu(gate, up, activation=activation), weight, bias)


def _make_swiglu_linear_args(params: dict, dtype: torch.dtype, device: str):
    *lead, i = params["shape"]
    out = params["out"]

    def t(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device=device, dtype=torch.float32)).to(dtype).requires_grad_()

    return (t(*lead, i, scale=2.0), t(*lead, i), t(out, i, scale=i ** -0.5), t(out, scale=0.1)), (
        {"activation": "gelu_tanh"} if params.get("gelu") else {})


OP_SPECS = [
    OpSpec(
        name="rms_norm_linear",
        op=_norm_linear_op,
        reference=_norm_linear_reference,
        make_args=_make_norm_linear_args,
        cases=(
            OpCase("3x77x160-q96-kv40", {"shape": (3, 77, 160), "outs": (96, 40)}),
            OpCase("2x33x96-residual", {"shape": (2, 33, 96), "outs": (64, 24), "residual": True}),
            OpCase("512x2048-residual", {"shape": (512, 2048), "outs": (2048, 512), "residual": True},
                   cuda_only=True),
            # Gemma's (1 + w) norm, rounded once
            OpCase("3x77x160-unit-offset", {"shape": (3, 77, 160), "outs": (96, 40), "unit_offset": True}),
            OpCase("2x33x96-residual-unit-offset", {"shape": (2, 33, 96), "outs": (64, 24), "residual": True,
                                                    "unit_offset": True}),
        ),
        kernels=("rms_norm",),
        names=("x", "norm_weight", "w_a", "w_b", "b_b", "residual"),
    ),
    OpSpec(
        name="swiglu_linear",
        op=swiglu_linear,
        reference=_swiglu_linear_reference,
        make_args=_make_swiglu_linear_args,
        cases=(
            OpCase("3x77x160-out96", {"shape": (3, 77, 160), "out": 96}),
            OpCase("1x5x4099-out33", {"shape": (1, 5, 4099), "out": 33}),
            OpCase("512x8192-out2048", {"shape": (512, 8192), "out": 2048}, cuda_only=True),
            OpCase("3x77x160-out96-geglu", {"shape": (3, 77, 160), "out": 96, "gelu": True}),  # Gemma's MLP
        ),
        kernels=("swiglu",),
        names=("gate", "up", "weight", "bias"),
    ),
]
