"""Reference model vs Hugging Face: the same checkpoint must give the same logits and tokens.

Used by the tests and by ``fastllama parity``. Needs ``transformers`` (the ``dev`` extra).
"""
from __future__ import annotations

import dataclasses
import tempfile

import torch

__all__ = ["TINY_CONFIGS", "ParityResult", "compare_with_hf"]

_BASE = dict(
    vocab_size=263, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)

# Tiny random configs that between them cover what the reference must match HF on.
TINY_CONFIGS: dict[str, dict] = {
    "gqa4-untied": dict(_BASE),
    "mha-tied": dict(_BASE, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-rope": dict(_BASE, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "head_dim-24-bias": dict(_BASE, head_dim=24, attention_bias=True, mlp_bias=True),
}


@dataclasses.dataclass
class ParityResult:
    name: str
    max_logit_diff: float
    tokens_equal: bool
    new_tokens: int

    @property
    def passed(self) -> bool:
        return self.max_logit_diff <= 1e-5 and self.tokens_equal


def compare_with_hf(name: str, config: dict, *, seq_len: int = 33, batch: int = 2, new_tokens: int = 20,
                    seed: int = 0) -> ParityResult:
    """Saves a random HF ``LlamaForCausalLM`` with ``config``, loads it into the reference model,
    and compares fp32 logits (max abs diff) and ``new_tokens`` greedy tokens."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from .reference import Llama

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(HFConfig(**config)).eval()
    with torch.no_grad():  # HF zero-inits nothing we care about, but make biases/norms non-trivial
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = Llama.from_pretrained(d).eval()
    ids = torch.randint(3, config["vocab_size"], (batch, seq_len))
    with torch.no_grad():
        diff = (hf(ids).logits - ours(ids)).abs().max().item()
    hf.generation_config.eos_token_id = None  # compare all tokens, no early stop
    hf.generation_config.pad_token_id = 0
    prompt = ids[:, :7]
    theirs = hf.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    mine = ours.generate(prompt, max_new_tokens=new_tokens, stop_tokens=[])
    equal = theirs.shape == mine.shape and bool((theirs == mine).all())
    return ParityResult(name, diff, equal, mine.shape[1] - prompt.shape[1])
