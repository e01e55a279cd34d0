"""The truth: pure-PyTorch references of every op and a small reference Llama model.

Nothing here imports Triton or a fastllama kernel.
"""
from .functional import (
    SUPPORTED_ROPE_TYPES,
    apply_rotary_pos_emb,
    attention,
    attention_mask,
    cross_entropy,
    linear_cross_entropy,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
    swiglu,
)
from .model import KVCache, Llama, LlamaConfig

__all__ = [
    "SUPPORTED_ROPE_TYPES", "apply_rotary_pos_emb", "attention", "attention_mask", "cross_entropy",
    "linear_cross_entropy", "rms_norm", "rope_cos_sin", "rope_inv_freq", "rotate_half", "swiglu",
    "KVCache", "Llama", "LlamaConfig",
]
