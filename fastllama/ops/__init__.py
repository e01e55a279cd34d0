"""The public functional API: validated, autograd-aware, ``torch.compile``-friendly ops.

Each op lives in its own module here (validation, config choice, ``torch.autograd.Function``,
``torch.library`` custom-op registration) and launches kernels from ``fastllama.kernels``.
Call conventions mirror PyTorch and Hugging Face; README.md's Public API lists them.
"""
from __future__ import annotations

from .._interpreter import use_interpreter_if_no_gpu as _use_interpreter_if_no_gpu

# Importing triton for the first time on a CPU-only machine: switch the interpreter on first.
_use_interpreter_if_no_gpu()

__all__: list[str] = []

from .rms_norm import rms_norm  # noqa: E402
__all__ += ["rms_norm"]
from .rotary import apply_rotary_pos_emb, apply_rotary_pos_emb_from_positions  # noqa: E402
__all__ += ["apply_rotary_pos_emb", "apply_rotary_pos_emb_from_positions"]
from .swiglu import swiglu, swiglu_fused  # noqa: E402
__all__ += ["swiglu", "swiglu_fused"]
from .fused_linear import rms_norm_linear, swiglu_linear  # noqa: E402
__all__ += ["rms_norm_linear", "swiglu_linear"]

from .decode import decode_attention, rotary_cache_append  # noqa: E402
__all__ += ["decode_attention", "rotary_cache_append"]
from .latent_decode import latent_decode_attention  # noqa: E402
__all__ += ["latent_decode_attention"]
from .decode_gemv import decode_linear  # noqa: E402
__all__ += ["decode_linear"]

from .attention import flash_attention, flash_attention_with_lse, set_deterministic_backward  # noqa: E402
__all__ += ["flash_attention", "flash_attention_with_lse", "set_deterministic_backward"]

from .cross_entropy import linear_cross_entropy  # noqa: E402
__all__ += ["linear_cross_entropy"]
from .experts import moe_experts  # noqa: E402
__all__ += ["moe_experts"]
