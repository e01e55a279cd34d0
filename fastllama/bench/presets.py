"""Model shapes the benchmarks use: Llama-3.2-1B, Llama-3-8B (fewer layers), a tiny one, and
the shapes of the other families ``fastllama.patch`` takes (Qwen3-0.6B, Phi-4-mini, Gemma-2-2B,
Gemma-3-1B, OLMo-2-1B, the mixture of experts Qwen3-30B-A3B, and DeepSeek-V2-Lite's multi-head latent
attention with its experts).

Each preset is an HF ``config.json`` dict (``model_type`` "llama" unless it says otherwise), so
the same dict builds the transformers model and, for a Llama, fastllama's reference ``Llama``.
Weights are random: the benchmarks measure speed and memory, which do not depend on the values.
"""
from __future__ import annotations

import contextlib
import dataclasses

__all__ = ["Preset", "PRESETS", "CONFIGS", "get_preset", "hf_model", "reference_model", "default_dtype"]

#: The training configurations compared (see fastllama.bench.train).
CONFIGS = ("hf-sdpa", "hf-eager", "hf-compile", "hf-liger", "hf+fastllama", "hf+fastllama-atomic",
           "hf+fastllama-recompute", "reference+fastllama")

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=8192)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape plus the training-benchmark defaults for it."""

    name: str
    config: dict
    seq_lens: tuple[int, ...]  # the full sweep
    quick_seq_lens: tuple[int, ...]  # --quick
    note: str = ""
    # The attention transformers runs in every "hf-*" configuration but hf-eager; the baseline is
    # "hf-<it>". "eager" where transformers' sdpa path would compute something else than the model
    # (Gemma 2's score cap).
    hf_attention: str = "sdpa"

    @property
    def baseline(self) -> str:
        """The configuration the ratios refer to: "hf-sdpa", or "hf-eager" for an eager preset."""
        return f"hf-{self.hf_attention}"

    @property
    def default_configs(self) -> tuple[str, ...]:
        """:data:`CONFIGS` without the HF attention this preset does not run by default (HF eager
        next to HF sdpa: a slower second baseline, materialising every score; HF sdpa next to an
        eager baseline: a wrong model)."""
        other = "hf-eager" if self.hf_attention == "sdpa" else "hf-sdpa"
        return tuple(c for c in CONFIGS if c != other)

    @property
    def layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def model_type(self) -> str:
        """The HF model type ("llama", "qwen3", "phi3", "gemma3_text"): only a Llama also builds the
        reference model."""
        return self.config.get("model_type", "llama")


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                 rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                 tie_word_embeddings=False),
            seq_lens=(64, 128), quick_seq_lens=(64,),
            note="tiny shape for the CPU smoke run under the Triton interpreter: not a measurement",
        ),
        Preset(
            "llama-3.2-1b",
            dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                 rms_norm_eps=1e-5, rope_parameters=dict(_LLAMA3_ROPE), tie_word_embeddings=True),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Llama-3.2-1B shape (16 layers, tied embeddings), random weights",
        ),
        Preset(
            "llama-3-8b",
            dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
                 rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
                 tie_word_embeddings=False),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Llama-3-8B layer shape with 8 of its 32 layers (so weights, gradients and AdamW "
                 "states fit one GPU), random weights",
        ),
        Preset(
            "qwen3-0.6b",
            dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=40960, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=True),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Qwen3-0.6B shape (28 layers, per-head q/k RMSNorm, tied embeddings), random weights",
        ),
        Preset(
            "phi-4-mini",
            dict(model_type="phi3", vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                 max_position_embeddings=131072, rms_norm_eps=1e-5, pad_token_id=199999,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75),
                 tie_word_embeddings=True),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Phi-4-mini shape (32 layers, merged qkv and gate_up projections, rotary over 96 of "
                 "128 dims, tied embeddings; its longrope scaling left out: it changes the rotary "
                 "tables, not the work), random weights",
        ),
        Preset(
            "gemma-2-2b",
            dict(model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                 final_logit_softcapping=30.0, max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0,
                 tie_word_embeddings=True),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Gemma-2-2B shape (26 layers, every other one with a 4096-token window, attention scores "
                 "capped at 50 and logits at 30, head_dim 256, GeGLU, 256k vocabulary, tied embeddings), random "
                 "weights; HF runs eager attention, its only path that applies the score cap (transformers "
                 "5.17's sdpa path drops it, later versions refuse it)",
            hf_attention="eager",
        ),
        Preset(
            "gemma-3-1b",
            dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                 num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                 query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
                 rms_norm_eps=1e-6, pad_token_id=0, tie_word_embeddings=True),
            seq_lens=(2048, 4096, 8192), quick_seq_lens=(4096,),
            note="Gemma-3-1B shape (26 layers, 5 of 6 with a 512-token window, head_dim 256, GeGLU, "
                 "262k vocabulary, tied embeddings), random weights",
        ),
        Preset(
            "olmo-2-1b",
            dict(model_type="olmo2", vocab_size=100352, hidden_size=2048, intermediate_size=8192,
                 num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                 max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=100277,
                 rope_parameters=dict(rope_type="default", rope_theta=500000.0), tie_word_embeddings=False),
            seq_lens=(2048, 4096), quick_seq_lens=(4096,),
            note="OLMo-2-1B shape (16 layers, a norm after each branch and none before, q/k norms over "
                 "all heads, untied embeddings), random weights",
        ),
        Preset(
            "qwen3-30b-a3b",
            dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                 moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                 num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 max_position_embeddings=40960, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=1000000.0), tie_word_embeddings=False),
            seq_lens=(2048, 4096), quick_seq_lens=(4096,),
            note="Qwen3-30B-A3B layer shape (a mixture of 128 experts, 8 per token; the router stays HF's) "
                 "with 4 of its 48 layers (so weights, gradients and AdamW states fit one GPU), random weights",
        ),
        Preset(
            "deepseek-v2-lite",
            dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                 moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                 first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1, norm_topk_prob=False,
                 routed_scaling_factor=1.0, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                 q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 head_dim=64, max_position_embeddings=163840, rms_norm_eps=1e-6,
                 rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False),
            seq_lens=(2048, 4096), quick_seq_lens=(4096,),
            note="DeepSeek-V2-Lite layer shape (multi-head latent attention: its module stays HF's, on the "
                 "attention kernels; a dense first layer, then 64 experts, 6 per token, and 2 shared) with 4 of "
                 "its 27 layers, random weights",
        ),
    )
}


def get_preset(name: str, layers: int | None = None) -> Preset:
    """The preset called ``name`` (ValueError lists the names); ``layers`` overrides its depth."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        note = p.note if layers == p.layers else f"{p.note}; {layers} layers"
        p = dataclasses.replace(p, config=dict(p.config, num_hidden_layers=layers), note=note)
    return p


def hf_config(config: dict):
    """transformers' config object of a preset's dict (``model_type`` "llama" by default)."""
    from transformers import AutoConfig

    fields = dict(config)
    return AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)


def layer_windows(config: dict) -> list[int | None]:
    """Per layer, the number of keys a query sees in a sliding-window layer (HF's
    ``sliding_window``, the query included), None for full causal attention; as transformers
    assigns them (``layer_types``: Gemma 2 every other layer, Gemma 3 five of six)."""
    cfg = hf_config(config)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:  # families without layer_types window every layer when they window at all
        types = ["sliding_attention" if getattr(cfg, "use_sliding_window", True) else "full_attention"] \
            * cfg.num_hidden_layers
    return [window if window and kind == "sliding_attention" else None for kind in types]


def hf_model(config: dict, dtype, device, attn_implementation: str = "sdpa"):
    """transformers' causal LM of the config's ``model_type`` (``LlamaForCausalLM`` by default)
    with random weights, built directly on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = hf_config(config)
    cfg._attn_implementation = attn_implementation
    with torch.device(device), default_dtype(dtype):
        return AutoModelForCausalLM.from_config(cfg)


def reference_model(config: dict, dtype, device):
    """fastllama's reference ``Llama`` with random weights, built directly on ``device`` (a
    ValueError for a config of another family: the reference model is a Llama)."""
    import torch

    from ..reference import Llama

    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"the reference model is a Llama; this config is a {config['model_type']!r}")
    with torch.device(device), default_dtype(dtype):
        model = Llama(dict(config, model_type="llama"))
    # HF's initialisation (normal, std initializer_range), so that both models start from the
    # same distribution (torch's default embedding init, std 1, gives a tied head's logits in the
    # hundreds and a first loss near 1900 instead of ln(V)).
    std = config.get("initializer_range", 0.02)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.normal_(0.0, std)
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    return model


@contextlib.contextmanager
def default_dtype(dtype):
    """Parameters are created in ``dtype`` (as HF's ``from_config(dtype=...)`` does), while
    buffers computed explicitly in fp32 (rotary frequencies) stay fp32."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
