"""Module forms of the fused ops, drop-in for the Hugging Face modules they replace.

Each has the HF module's constructor arguments and ``state_dict`` keys, so a checkpoint (or the
HF module's own ``state_dict()``) loads unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops

__all__ = ["RMSNorm", "LlamaMLP"]


class RMSNorm(nn.Module):
    """``LlamaRMSNorm`` on the fused kernel: same constructor ``(hidden_size, eps=1e-6)``, same
    ``state_dict`` (``weight``), eps kept as ``variance_epsilon``.

    ``forward(hidden_states, residual=None)``: with ``residual`` it returns
    ``(norm(hidden_states + residual), hidden_states + residual)`` from one kernel, the add+norm
    between a decoder layer's attention and MLP blocks. The weight must have the input's dtype
    (HF would silently promote a mixed-dtype product; the op rejects it instead).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``, or with ``residual`` the fused ``(norm(x + residual), x + residual)``."""
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon, residual=residual)

    def extra_repr(self) -> str:
        """Shape and eps, as HF's LlamaRMSNorm prints them."""
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class LlamaMLP(nn.Module):
    """HF ``LlamaMLP`` with the SwiGLU activation fused: ``down(silu(gate(x)) * up(x))``.

    Same constructor (a config with ``hidden_size``, ``intermediate_size``, ``mlp_bias``,
    ``hidden_act``) and ``state_dict`` (``gate_proj``, ``up_proj``, ``down_proj``). Only the
    "silu" activation (Llama, Mistral, Qwen2) is supported; other values raise ValueError.
    ``inplace_backward=True`` lets the activation's backward overwrite the gate/up projections'
    outputs with their gradients (they are not needed afterwards), saving two activations.
    """

    def __init__(self, config, inplace_backward: bool = False) -> None:
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.hidden_act is {act!r}; accepted: 'silu' (SwiGLU)")
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=bias)
        self.inplace_backward = inplace_backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the activation as one kernel."""
        act = ops.swiglu(self.gate_proj(x), self.up_proj(x), inplace_backward=self.inplace_backward)
        return self.down_proj(act)
