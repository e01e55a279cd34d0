"""``moe_experts``: a mixture-of-experts layer's experts (HF's Mixtral / Qwen2-MoE / Qwen3-MoE /
OLMoE experts) with the gated activation fused and the activations kept for backward cut to one
tensor.

Each of the T tokens is routed to k experts: S = T k (token, expert) pairs, processed sorted by
expert so each expert's rows are one group of torch's grouped matmul. With x_s the pair's token
row, w_s its routing weight and e its expert (gate first in the gate-up weight)::

    u_s = x_s W_gu[e]^T            (S, 2I)        a_s = act(g_s) * v_s     (S, I), u_s = [g_s, v_s]
    y_s = a_s W_d[e]^T             (S, H)         out_t = sum over t's pairs of w_s y_s

and the backward, from dout (T, H), with dout_s the row of the pair's token::

    b_s  = dout_s W_d[e]           (S, I)         the down projection's input gradient, unweighted
    dw_s = <b_s, a_s>                             (= <dout_s, y_s>: y need not be kept)
    da_s = w_s b_s,  du_s = act-gate backward(u_s, da_s)
    dW_d[e] = sum over e's pairs of (w_s dout_s)^T a_s        dW_gu[e] = sum of du_s^T x_s
    dx_t = sum over t's pairs of du_s W_gu[e]

What HF's grouped-matmul implementation keeps per pair, and this one does not: the gathered
token row x_s (H), recomputed from the token rows the router keeps anyway; act(g) and a_s (2I
between them), recomputed from u_s by the fused kernel; the expert output y_s (H), which the
identity above makes unnecessary. Kept: u (S, 2I) and the sort. At Qwen3-30B-A3B's shape
(H 2048, I 768, k 8) that is 24 KiB a token where HF keeps 100 (see benchmarks/README.md).

Sums over a token's pairs run as a (T, k, H) sum in the pair order HF uses (deterministic, no
atomics), with HF's rounding: the weighted outputs in the promoted dtype of y and w, summed, then
cast to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_tensor
from .swiglu import _gelu, _swiglu_fused, _swiglu_fused_bwd

__all__ = ["moe_experts", "grouped_mm_available", "grouped_mm_problem", "grouped_mm_syncs"]

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: torch.device) -> bool:
    """Whether torch's grouped matmul runs on ``device``: the CPU, or a CUDA GPU of compute
    capability 8.0 or more (torch's kernel needs sm_80)."""
    if _grouped_mm is None:
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def grouped_mm_problem(down_proj: torch.Tensor) -> str | None:
    """Why torch's grouped matmul cannot run experts whose down projection is ``down_proj``
    (E, H, I) (None: it can): its device, or rows of H or I elements that are not 16 bytes."""
    if not grouped_mm_available(down_proj.device):
        return f"torch's grouped matmul does not run on {down_proj.device} (it needs the CPU or sm_80+)"
    H, I = down_proj.shape[-2:]
    row = 16 // down_proj.element_size()
    if H % row or I % row:
        return (f"H={H} and I={I} must be multiples of {row} for {down_proj.dtype} (torch's grouped matmul "
                f"needs 16-byte rows)")
    return None


@torch.library.custom_op("fastllama::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped matmul as an opaque op, for torch.compile: see :func:`_grouped_matmul`."""
    return _grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:  # (S, K) x (E, K, N): each expert's rows times its matrix -> (S, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (M, S) x (S, N), summed per expert -> (E, M, N)


def _grouped_matmul(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch's grouped matmul over the expert groups ending at ``offs``. Its fake (meta) kernel,
    which torch.compile traces, accepts bf16 only, while its CPU and CUDA kernels run fp32 and
    fp16 too: a compiled graph in those dtypes calls it through an opaque op with a fake of its
    own. bf16 (and every eager call) calls it directly, where inductor can see it."""
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_op(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


def grouped_mm_syncs(weight: torch.Tensor) -> bool:
    """Whether torch's grouped matmul over ``weight``'s dtype and device reads the group offsets
    on the host: a device sync per call, which a CUDA graph capture forbids. Its fast kernels
    (bf16 on sm_90 / sm_100: H100, H200, B200) need no sync; every other CUDA case runs a
    fallback that copies the offsets to the host and loops over the groups. The CPU has no
    device to wait for."""
    if weight.device.type != "cuda":
        return False
    if torch.version.hip:  # (ROCm: its grouped matmul is not those kernels)
        return True
    return not (weight.dtype == torch.bfloat16 and torch.cuda.get_device_capability(weight.device)[0] in (9, 10))


def _sorted_pairs(top_k_index: torch.Tensor, n_experts: int):
    """(order, token, offs): the (token, expert) pairs sorted by expert (a stable sort: pairs of
    one expert keep token order), each pair's token, and the end of each expert's group (int32).
    The group sizes come from a scatter-add, not ``bincount``, whose output size would need a
    device sync."""
    expert = top_k_index.reshape(-1)
    order = torch.sort(expert, stable=True).indices
    counts = torch.zeros(n_experts, dtype=torch.int32, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert, dtype=torch.int32))
    return order, order // top_k_index.shape[1], counts.cumsum(0, dtype=torch.int32)


def _unsort(sorted_rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows in pair order (token-major, as HF's ``view(T, k, ...)`` reads them) from rows sorted
    by expert."""
    out = torch.empty_like(sorted_rows)
    out[order] = sorted_rows
    return out


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, gelu):
        order, token, offs = _sorted_pairs(top_k_index, gate_up_proj.shape[0])
        x = hidden.to(gate_up_proj.dtype)
        u = _grouped_matmul(x[token], gate_up_proj.transpose(1, 2), offs)  # (S, 2I)
        y = _grouped_matmul(_swiglu_fused(u, gelu), down_proj.transpose(1, 2), offs)  # (S, H)
        weighted = y * top_k_weights.reshape(-1)[order, None]  # (HF's product: the promoted dtype)
        ctx.save_for_backward(x, top_k_weights, gate_up_proj, down_proj, u, order, token, offs)
        ctx.gelu, ctx.hidden_dtype = gelu, hidden.dtype
        return _unsort(weighted, order)

    @staticmethod
    def backward(ctx, d_weighted):
        if torch.is_grad_enabled():  # (create_graph=True: this backward is not itself differentiable)
            raise RuntimeError("moe_experts supports first-order gradients only (no create_graph / double backward)")
        x, top_k_weights, gate_up_proj, down_proj, u, order, token, offs = ctx.saved_tensors
        need_hidden, _, need_weights, need_gate_up, need_down, _ = ctx.needs_input_grad
        empty = (torch.diff(offs, prepend=offs.new_zeros(1)) == 0)[:, None, None]  # experts no pair chose
        w = top_k_weights.reshape(-1)[order, None]
        dout = d_weighted[order]  # (S, H), sorted; each token's rows are its gradient (the sum's backward)
        a = _swiglu_fused(u, ctx.gelu)  # recomputed (S, I)
        b = _grouped_matmul(dout.to(down_proj.dtype), down_proj, offs)  # (S, I)
        d_weights = d_down = d_gate_up = d_hidden = None
        if need_weights:  # <dout_s, y_s> without y
            d_w = (b.float() * a.float()).sum(-1, keepdim=True)
            d_weights = _unsort(d_w, order).view(top_k_weights.shape).to(top_k_weights.dtype)
        if need_down:  # (frozen experts, e.g. adapters elsewhere, skip their weight-gradient matmuls)
            d_down = _grouped_matmul((dout * w).to(down_proj.dtype).t(), a, offs).masked_fill_(empty, 0)  # (E, H, I)
        # out of place: u stays intact for a second backward (retain_graph=True)
        du = _swiglu_fused_bwd((b * w).to(u.dtype), u, ctx.gelu)  # (S, 2I)
        if need_gate_up:
            d_gate_up = _grouped_matmul(du.t(), x[token], offs).masked_fill_(empty, 0)  # (E, 2I, H)
        if need_hidden:  # (summed in the wider of the two dtypes: an fp32 hidden gets an fp32 sum)
            dx = _unsort(_grouped_matmul(du, gate_up_proj, offs), order)  # (S, H), pair order
            d_hidden = dx.view(-1, top_k_weights.shape[-1], x.shape[-1]).sum(
                1, dtype=torch.promote_types(dx.dtype, ctx.hidden_dtype)).to(ctx.hidden_dtype)
        return d_hidden, None, d_weights, d_gate_up, d_down, None


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, activation: str = "silu") -> torch.Tensor:
    """The experts of a mixture-of-experts layer, as HF's ``MixtralExperts`` (and Qwen2/3-MoE's,
    OLMoE's) compute them: each token's k chosen experts' gated MLPs, summed with the routing
    weights (the module doc has the math and what is kept for backward).

    Args:
        hidden: (T, H) token rows (cast to the weights' dtype, as HF's grouped matmul path does).
        top_k_index: (T, k) int32/int64 expert ids in [0, E). Checked on the CPU (ValueError); on
            CUDA a check would cost a host sync per layer, so an id out of range there stops the
            program at the sort's ``scatter_add_`` with PyTorch's device-side index assert (never
            a wrong result).
        top_k_weights: (T, k) routing weights, fp32/fp16/bf16 (differentiable).
        gate_up_proj: (E, 2I, H), each expert's gate rows first, then up; down_proj: (E, H, I).
            H and I must make 16-byte rows (multiples of 8 in 16-bit, of 4 in fp32): torch's
            grouped matmul needs them.
        activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).

    Returns:
        (T, H) in ``hidden``'s dtype.
    """
    gelu = _gelu(activation)
    for name, t in (("hidden", hidden), ("top_k_weights", top_k_weights), ("gate_up_proj", gate_up_proj),
                    ("down_proj", down_proj)):
        check_tensor(name, t)
    if hidden.dim() != 2 or top_k_index.dim() != 2 or top_k_weights.shape != top_k_index.shape \
            or top_k_index.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden must be (T, H) and top_k_index / top_k_weights (T, k), got {tuple(hidden.shape)}, "
                         f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")
    E, two_i, H = gate_up_proj.shape if gate_up_proj.dim() == 3 else (None, None, None)
    if E is None or two_i % 2 or H != hidden.shape[1] or down_proj.shape != (E, H, two_i // 2):
        raise ValueError(f"gate_up_proj must be (E, 2I, H) and down_proj (E, H, I) with H = {hidden.shape[1]}, got "
                         f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}")
    # (values exist: a plain CPU tensor, not a FakeTensor of a memory estimate or a traced graph)
    if (top_k_index.device.type == "cpu" and type(top_k_index) is torch.Tensor and top_k_index.numel()
            and not torch.compiler.is_compiling()):
        low, high = int(top_k_index.min()), int(top_k_index.max())
        if low < 0 or high >= E:
            raise ValueError(f"top_k_index holds expert ids from {low} to {high}; the experts are 0..{E - 1}")
    if down_proj.dtype != gate_up_proj.dtype:
        raise TypeError(f"gate_up_proj and down_proj must share a dtype, got {gate_up_proj.dtype}, {down_proj.dtype}")
    problem = grouped_mm_problem(down_proj)
    if problem:
        raise ValueError(problem)
    out = _Experts.apply(hidden, top_k_index, top_k_weights, gate_up_proj.contiguous(), down_proj.contiguous(), gelu)
    return out.view(hidden.shape[0], top_k_index.shape[1], H).sum(1).to(hidden.dtype)
