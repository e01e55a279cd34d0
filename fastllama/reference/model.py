"""A small, readable Llama in pure PyTorch: the reference model.

Module and parameter names follow Hugging Face's ``LlamaForCausalLM`` exactly
(``model.layers.0.self_attn.q_proj.weight`` ...), so an HF checkpoint loads without renaming and
what this model saves loads in HF. The math is the functional references in ``functional.py``.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as ref

__all__ = ["LlamaConfig", "KVCache", "Llama"]


@dataclasses.dataclass
class LlamaConfig:
    """The fields of an HF Llama ``config.json`` that the model uses."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_scaling: dict = dataclasses.field(default_factory=dict)  # type-specific parameters
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    raw: dict = dataclasses.field(default_factory=dict, repr=False)  # the dict it came from

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in ref.SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: {ref.SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> "LlamaConfig":
        """Builds the config from an HF ``config.json`` dict (old ``rope_scaling``/``rope_theta``
        keys or the newer ``rope_parameters``); raises ValueError naming anything unsupported."""
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"model_type {model_type!r} is not supported by the reference model; supported: 'llama'")
        act = config.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # (the same function)
            raise ValueError(f"hidden_act {act!r} is not supported; supported: 'silu' (or its other name 'swish')")
        # pretraining_tp > 1 only split HF's old matmuls into slices: the same math, ignored there too
        # As transformers reads them: a rope_scaling given next to rope_parameters wins (a user
        # adding it, as older guides say, to a config saved with rope_parameters), and a top-level
        # original_max_position_embeddings wins over the one in the dict.
        rope = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported (rotary must cover the whole head_dim)")
        if rope_type == "llama3":
            if "original_max_position_embeddings" in config:
                rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
            rope.setdefault("original_max_position_embeddings", config.get("max_position_embeddings", 2048))
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(rope_type, ())
        absent = [k for k in needed if k not in rope]
        if absent:
            raise ValueError(f"rope type {rope_type!r} needs {', '.join(absent)} in rope_parameters (or rope_scaling)")
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "rope_type", "rope_scaling", "raw"}
        # An explicit null means "none" for the special tokens (HF writes "eos_token_id": null);
        # only fields whose default is derived (kv heads, head dim) treat null as "missing".
        nullable = {"bos_token_id", "eos_token_id", "pad_token_id"}
        kwargs = {k: v for k, v in config.items() if k in known and (v is not None or k in nullable)}
        return cls(**kwargs, rope_theta=float(theta), rope_type=rope_type, rope_scaling=rope, raw=dict(config))

    def to_hf(self) -> dict[str, Any]:
        """An HF-loadable ``config.json`` dict (``LlamaForCausalLM``)."""
        out = dict(self.raw)
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        for f in dataclasses.fields(self):
            if f.name not in ("rope_theta", "rope_type", "rope_scaling", "raw"):
                out[f.name] = getattr(self, f.name)
        out["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": self.rope_type, **self.rope_scaling}
        out.setdefault("model_type", "llama")
        out.setdefault("architectures", ["LlamaForCausalLM"])
        out.setdefault("hidden_act", "silu")
        return out

    def inv_freq(self) -> torch.Tensor:
        """The rotary inverse frequencies (head_dim / 2,) of this config's rope type and scaling."""
        return ref.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_type, **self.rope_scaling)


class KVCache(nn.Module):
    """A static cache: keys and values (B, Hk, max_len, D) for one layer, filled left to right.

    Slot t holds the key/value of the t-th token fed to the model (padding included), so the
    first ``length`` slots are always the whole past and attention reads ``[:length]``.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k/v (B, Hk, T, D) at slots [start, start + T); returns all keys/values so far."""
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens, capacity {self.k.shape[2]}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps  # HF's attribute name

    def forward(self, x):
        return ref.rms_norm(x, self.weight, self.variance_epsilon)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, key_padding_mask=None, cache: KVCache | None = None, cache_start: int = 0):
        B, T, _ = x.shape
        # (B, T, H*D) -> (B, H, T, D): strided views, as in HF
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = ref.apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_start, k, v)
        out = ref.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(ref.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, key_padding_mask=None, cache=None, cache_start=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, cache, cache_start)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm: HF's ``LlamaModel`` (``model.*`` keys)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        # (padding_idx as HF's: the pad token's row gets no gradient)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """The reference Llama: ``logits = model(input_ids)``; ``model.generate(ids, max_new_tokens)``."""

    def __init__(self, config: LlamaConfig | dict):
        super().__init__()
        self.config = config if isinstance(config, LlamaConfig) else LlamaConfig.from_hf(config)
        cfg = self.config
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", cfg.inv_freq(), persistent=False)
        self.caches: list[KVCache] | None = None
        # generation_config.json's fields when loaded from a checkpoint that has one (saved back
        # with the model): generate's default stop tokens include its eos ids, as HF's does
        self.generation_config: types.SimpleNamespace | None = None

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the rotary frequencies too; they are recomputed in fp32
        # on the new device instead (HF likewise computes cos/sin from fp32 frequencies).
        super()._apply(fn, recurse)
        self.inv_freq = self.config.inv_freq().to(self.inv_freq.device)
        return self

    # -- loading and saving live in fastllama.checkpoint; these are the documented entry points --
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "Llama":
        """Loads an HF-format directory (config.json + model.safetensors, sharded or not)."""
        from ..checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        """Writes config.json + model.safetensors that HF ``LlamaForCausalLM`` loads."""
        from ..checkpoint import save_pretrained

        save_pretrained(self, path)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache_start: int | None = None,
        labels: torch.Tensor | None = None,
    ):
        """Logits (B, T, V) for ``input_ids`` (B, T).

        ``attention_mask`` (B, past + T), 1 for real tokens, covers every token the model has seen
        (cache included). ``cache_start`` is the cache slot of ``input_ids[:, 0]`` when
        :meth:`setup_caches` was called (None: no cache). ``position_ids`` (B, T) are the rotary
        positions only (default: each token's index among the real tokens); the mask is causal
        over the whole row whatever they say. HF's Llama, given position_ids that restart with
        no attention mask and no cache, instead treats each restart as a new packed sequence.
        With ``labels`` (B, T) returns ``(logits, loss)``, labels shifted by one inside as HF does.
        """
        logits = self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache_start))
        if labels is None:
            return logits
        return logits, ref.cross_entropy(logits.flatten(0, 1), shift_labels(labels).flatten())

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, cache_start=None) -> torch.Tensor:
        """The final normed hidden states (B, T, hidden): everything but the LM head."""
        B, T = input_ids.shape
        past = cache_start or 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = ref.rope_cos_sin(position_ids, self.inv_freq, x.dtype)
        key_padding_mask = attention_mask.bool() if attention_mask is not None else None
        use_cache = cache_start is not None
        if use_cache and self.caches is None:
            raise ValueError("cache_start given but no cache: call setup_caches() first")
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, key_padding_mask, self.caches[i] if use_cache else None, past)
        return self.model.norm(x)

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocates one static :class:`KVCache` per layer for ``batch`` sequences of ``max_len``."""
        p = self.lm_head.weight
        cfg = self.config
        self.caches = [
            KVCache(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, p.dtype, p.device)
            for _ in range(cfg.num_hidden_layers)
        ]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Iterable[int] | int | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Returns (B, T + new) token ids: the prompt followed by up to ``max_new_tokens`` tokens.

        Greedy when ``temperature`` is 0; otherwise samples from ``softmax(logits / temperature)``
        restricted to the ``top_k`` most likely tokens and the smallest set whose probability
        reaches ``top_p``. Prompts of different lengths are LEFT-padded with ``attention_mask``
        zeros. A sequence stops at any of ``stop_tokens`` (default: the eos ids of the config and of
        generation_config.json when the checkpoint has one, as HF's generate) and is then
        filled with ``pad_token_id``; generation ends when all have stopped.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        check_sampling(temperature, top_k, top_p)
        default_stop, default_pad = default_stop_and_pad(self)
        if stop_tokens is None:
            stop_tokens = sorted(default_stop)
        stop = torch.tensor(sorted(token_id_set(stop_tokens)), dtype=torch.long, device=input_ids.device)
        # as HF's generate: finished rows repeat the pad, else the (first) eos, else 0
        pad = pad_token_id if pad_token_id is not None else default_pad
        B, T = input_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        self.setup_caches(B, T + max_new_tokens)
        try:
            out = input_ids
            done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            logits = self(input_ids, attention_mask=mask, cache_start=0)[:, -1]
            for step in range(max_new_tokens):
                sampled = sample(logits.float(), temperature, top_k, top_p, generator)
                token = torch.where(done, torch.full_like(sampled, pad), sampled)
                out = torch.cat([out, token[:, None]], dim=1)
                done |= torch.isin(token, stop)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                # a finished row steps on its sampled id, not its pad, which may be no token
                # (-1: a tokenizer without one); its output is the pad whatever it computes
                logits = self(sampled[:, None], attention_mask=mask, cache_start=T + step)[:, -1]
            return out
        finally:
            self.caches = None


def token_id_set(ids) -> set[int]:
    """Token ids given as an int, an iterable of ints, a tensor or an array (any shape, 0-d
    included), or None (no ids), as a set of ints."""
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    if isinstance(ids, torch.Tensor) or hasattr(ids, "__array__"):
        return set(torch.as_tensor(ids).reshape(-1).tolist())
    return {int(t) for t in ids}


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Position t predicts token t + 1: labels moved left by one, the last padded with ignore_index."""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:]


def default_stop_and_pad(model) -> tuple[set[int], int]:
    """Stop tokens: the config's eos ids, and the generation_config's too (an HF model's, or the
    reference model's from generation_config.json: HF's generate stops on those; Llama-3
    Instruct's <|eot_id|> is only there). Pad: the first set;
    else the first eos id, the generation_config's before the config's (what HF's generate and
    the reference model's pad with); else 0."""
    configs = [model.config, getattr(model, "generation_config", None)]
    stop = set().union(*(token_id_set(getattr(c, "eos_token_id", None)) for c in configs))
    pad = next((c.pad_token_id for c in configs if getattr(c, "pad_token_id", None) is not None), None)
    for config in reversed(configs):
        eos = getattr(config, "eos_token_id", None)
        if pad is None and eos is not None:
            pad = eos if isinstance(eos, int) else (list(eos) or [None])[0]
    return stop, int(pad if pad is not None else 0)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   names: tuple[str, str, str] = ("temperature", "top_k", "top_p")) -> None:
    """ValueError, naming the argument (``names``: how the caller spells them), for a temperature
    that is negative or NaN, a top_k below 1 or a top_p outside (0, 1]."""
    if not temperature >= 0:  # (NaN too)
        raise ValueError(f"{names[0]} must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{names[1]} must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{names[2]} must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """``logits / temperature`` (temperature > 0) with every token outside the ``top_k`` most
    likely, and outside the smallest set whose probability reaches ``top_p``, set to -inf.
    The row maximum is subtracted first (softmax is unchanged by it): a tiny temperature then
    sends the other logits to -inf instead of the top one to +inf (inf - inf = NaN in softmax)."""
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first is always kept)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V): argmax at temperature 0, else top-k / top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
