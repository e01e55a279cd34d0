"""Fast generation for Llama weights: static KV cache, Triton kernels, CUDA graph.

:class:`Generator` runs a :class:`fastllama.reference.Llama`, or a transformers Llama / Mistral
/ Ministral / Qwen2 / Qwen3 / SmolLM3 / Phi-3 / Granite / Gemma / Gemma 2 / Gemma 3 / OLMo 2 / OLMo 3
/ CWM / Seed-OSS / Helium / Ernie 4.5 / GLM / GLM-4 / Arcee / Apertus / EXAONE 4 / VaultGemma /
HyperCLOVA X / Ministral 3 / HunYuan / OLMo causal LM, or the mixtures of experts Mixtral /
Qwen2-MoE / Qwen3-MoE / OLMoE / FlexOlmo / GraniteMoE / dots.llm1 / GLM-4.5 / HunYuan MoE / Ernie 4.5
MoE / Mellum / Solar Open / MiniMax-M2 / EXAONE MoE / gpt-oss / GraniteMoeShared / Granite SWA /
GraniteMoE SWA / Llama 4 (text), or the multi-head latent attention models DeepSeek-V3 /
DeepSeek-V2 / GLM-4.7-Flash / Mistral 4 / MiniCPM3 (their parameters, no copies), with

* a static KV cache per layer, preallocated for ``max_batch_size x max_seq_len``;
  sequence b's tokens sit in slots ``0 .. L_b - 1`` and ``cache_seqlens`` (B,) int32 on the
  device holds the ``L_b``: prompts of different lengths need no padding inside the cache.
  A layer with a sliding window of W keys shorter than that gets a ring of W slots instead
  (position p in slot p mod W), as HF's sliding-window caches do: Gemma 3's local layers hold 512
  keys, not the whole context;
* prefill: the prompts right-padded into one (B, T) batch, rotary + cache write in one kernel
  (``ops.rotary_cache_append``), causal ``ops.flash_attention`` (``ops.decode_attention`` for a
  batch of up to 16 tokens; right padding is invisible to the real tokens under a causal mask,
  and the padded slots are never read: each sequence's length says where its cache ends),
  logits only at each prompt's last token;
* decode: per layer ``rms_norm`` (fused with the residual add; Gemma 2/3, OLMo 2/3, EXAONE 4,
  GLM-4 and HyperCLOVA X also norm each branch, and OLMo and EXAONE 4 have no norm before one),
  projections (q/k/v in one GEMM, gate/up in one: see :class:`RowBlocks`), the fused rotary +
  cache append, ``ops.decode_attention`` (split-KV flash-decoding over each sequence's length,
  or the layer's sliding window of it; Gemma 2's scores soft-capped), ``swiglu`` (GeGLU for
  Gemma; a mixture of experts: the model's router, then ``ops.moe_experts``; a gateless MLP,
  Arcee's or Apertus's: its own activation module on up(x)); or, for Llama-like layers where it
  is faster, each layer's four linears through ``ops.decode_linear`` with the norms, the
  activation and the residual adds folded in (``Generator(fused_decode=...)``);
  then sampling (greedy, temperature, top-k, top-p) on the device, stop tokens, and the
  lengths advanced on the device. On CUDA the whole step is captured ONCE as a
  ``torch.cuda.CUDAGraph`` per (batch size, sampling settings) and replayed: no Python, no
  launch overhead, no host sync inside a step. On the CPU (the Triton interpreter) the same step
  runs as a plain eager loop.

The host reads each step's tokens (for streaming and the all-stopped check) through a pinned
buffer while the next step already runs. Greedy output equals the reference model's
``generate`` (left padding there, none here; the logits agree to rounding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from . import ops
from . import forwards, patching
from .forwards import (attention_input_linears, gate_activation, gateless, mlp_activation, mlp_input_linears,
                       split_qkv)
from .latent_attention import absorbed
from .ops._checks import check_attention_device
from .loading import TRANSFORMERS_MODEL_TYPES, _HFTokenizer, load_checkpoint, load_tokenizer  # noqa: F401  (API)
from .model_weights import (RowBlocks, check_model, default_stop_and_pad, layer_shared_mlp, mlp_of, module_problem,
                            rope_tables, rotary_layer_types, shared_experts_of)
from .reference.model import check_sampling, filter_logits, token_id_set
from .streaming import TextStreamer, _HFStreamer, _HostReader

__all__ = ["Generator", "generate", "sample_logits", "TextStreamer", "GenerationStats", "load_tokenizer",
           "load_checkpoint"]


def sample_logits(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token (B,) from logits (B, V), entirely on the device (no host sync: CUDA-graph safe).

    Greedy (argmax) at temperature 0; otherwise ``softmax(logits / temperature)`` restricted to
    the ``top_k`` most likely tokens and to the smallest set whose probability reaches ``top_p``
    (the reference model's rules), sampled with the exponential-race trick
    ``argmax(p / E), E ~ Exp(1)``, which draws from ``p`` without ``torch.multinomial``'s sync.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min_(1e-30)
    return (probs / race).argmax(-1)


def _on_model_device(method):
    """Runs a Generator method with the model's CUDA device current: capture streams, Triton
    launches and ``synchronize()`` follow the current device, which need not be the model's
    (a model on cuda:1 while cuda:0 is current)."""

    @functools.wraps(method)
    def on_device(self, *args, **kwargs):
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            return method(self, *args, **kwargs)

    return on_device


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last :meth:`Generator.generate` call (host wall clock, device synced)."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens generated, stop tokens and the first (from prefill) included, pads not
    prefill_s: float = 0.0
    decode_s: float = 0.0  # every step after prefill
    steps: int = 0  # decode steps run after prefill (after an early stop, the one launched past it too)
    cuda_graph: bool = False
    fused_decode: bool = False  # the decode step ran the layers' linears through ops.decode_linear

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps: batch x steps / decode time."""
        return self.batch * self.steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclasses.dataclass
class _Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None
    stop: tuple[int, ...]
    pad: int


def _fill_ring(ring: torch.Tensor, full: torch.Tensor, lengths: torch.Tensor) -> None:
    """Copies the last W positions of each sequence in ``full`` (B, H, T, D), sequence b
    ``lengths[b]`` long, into ``ring`` (B, H, W, D), position p to slot p mod W.

    Slot s takes the latest position p < n with p = s (mod W): p = n - 1 - ((n - 1 - s) mod W).
    A slot no position reaches yet (p < 0, a prompt shorter than the ring) keeps what it held:
    decoding reads only the first min(n + 1, W) slots, and writes slot n before reading it.
    """
    B, H, W, D = ring.shape
    n = lengths.to(torch.long)[:, None]
    source = n - 1 - torch.remainder(n - 1 - torch.arange(W, device=ring.device), W)  # (B, W)
    taken = torch.gather(full, 2, source.clamp(min=0)[:, None, :, None].expand(B, H, W, D))
    ring.copy_(torch.where((source >= 0)[:, None, :, None], taken, ring))


def _grouped_experts(experts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts of ``model_weights.grouped_layout_ok`` (gpt-oss's) from their weights, as HF's
    grouped-matmul experts implementation computes them: the (token, expert) pairs sorted by
    expert, one grouped matmul up (weights (E, H, 2I) when ``is_transposed``, else (E, 2I, H)),
    the experts' biases, their own gate function on the (S, 2I) rows (gpt-oss's clamped SwiGLU of
    interleaved columns, ``_apply_gate``, called as the module's), one grouped matmul down, the
    routing weights, each token's k rows summed. No host sync: a decode step stays capturable."""
    order, token, offs = ops.experts._sorted_pairs(index, experts.gate_up_proj.shape[0])
    expert = index.reshape(-1)[order]
    transposed = getattr(experts, "is_transposed", False)

    def grouped_linear(rows, weight, bias):
        out = ops.experts._grouped_matmul(rows, weight if transposed else weight.transpose(1, 2), offs)
        return out if bias is None else out + bias[expert]

    biased = getattr(experts, "has_bias", False)
    u = grouped_linear(x.to(experts.gate_up_proj.dtype)[token], experts.gate_up_proj,
                       experts.gate_up_proj_bias if biased else None)
    y = grouped_linear(experts._apply_gate(u), experts.down_proj, experts.down_proj_bias if biased else None)
    weighted = y * weights.reshape(-1)[order, None]
    return ops.experts._unsort(weighted, order).view(*index.shape, -1).sum(1).to(x.dtype)


def _llama4_routed_experts(block, x: torch.Tensor, activation: str) -> torch.Tensor:
    """Llama 4's routed experts from their weights: the router's top-k logits through a sigmoid
    scale each chosen expert's INPUT (HF's routed_in * score), whose gated MLP (gate-up weights
    (E, H, 2I), gate first; down (E, I, H)) runs on torch's grouped matmuls over the (token,
    expert) pairs; each token's k outputs summed. HF runs every expert on every token, with the
    other experts' inputs scaled to 0 (their outputs exactly 0)."""
    experts = block.experts
    top, index = torch.topk(F.linear(x, block.router.weight), block.router.top_k, dim=1)
    scores = torch.sigmoid(top.float()).to(top.dtype)
    order, token, offs = ops.experts._sorted_pairs(index, experts.gate_up_proj.shape[0])
    u = ops.experts._grouped_matmul(x[token] * scores.reshape(-1)[order, None], experts.gate_up_proj, offs)
    y = ops.experts._grouped_matmul(ops.swiglu_fused(u, activation=activation), experts.down_proj, offs)
    return ops.experts._unsort(y, order).view(*index.shape, -1).sum(1)


def _post_rotary_norms(attn) -> tuple | None:
    """The norms of q and k that an attention applies AFTER rotary: HunYuan's (query_layernorm,
    key_layernorm), Llama 4's weightless qk_norm for both; None for the others."""
    if hasattr(attn, "query_layernorm"):
        return attn.query_layernorm, attn.key_layernorm
    if hasattr(attn, "qk_norm"):
        return attn.qk_norm, attn.qk_norm
    return None


def _latent(attn) -> bool:
    """Whether ``attn`` is DeepSeek-V2's multi-head latent attention (also DeepSeek-V3's,
    GLM-4.7-Flash's, Mistral 4's, MiniCPM3's): K and V per head expanded from one compressed
    latent per token (``kv_b_proj``), one rotary key shared by every head."""
    return hasattr(attn, "kv_a_proj_with_mqa")


def _latent_input_linears(attn) -> tuple:
    """The two linears of a latent attention that read its input: q's (``q_proj``, or the
    low-rank ``q_a_proj`` where ``q_lora_rank`` is set) and the latent's ``kv_a_proj_with_mqa``."""
    return (attn.q_proj if attn.q_proj is not None else attn.q_a_proj), attn.kv_a_proj_with_mqa


def _gated(mlp):
    """The module holding the MLP's activation: the MLP, or a mixture of experts' experts."""
    return mlp.experts if hasattr(mlp, "experts") else mlp


class _State:
    """The static buffers a decode step reads and writes (the CUDA graph's inputs/outputs)."""

    def __init__(self, batch: int, device, sampling: _Sampling):
        self.token = torch.zeros(batch, dtype=torch.long, device=device)  # last token of each sequence
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # its cache slot
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stop = torch.tensor(sampling.stop, dtype=torch.long, device=device)
        self.sampling = sampling
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fused = False  # whether the step runs the layers' linears through ops.decode_linear


@dataclasses.dataclass(frozen=True)
class _Multipliers:
    """Granite's, HyperCLOVA X's and MiniCPM3's scalars (1 for the other families): embeddings
    times ``embedding``, each residual branch times ``residual`` (after its norm, where the layer
    norms its branches), logits divided by ``logits`` (Granite) or times it
    (``logits_multiplied``: HyperCLOVA X), or the head's input divided by it (``head_input``:
    MiniCPM3, whose embedding module scales its own output)."""

    embedding: float
    residual: float
    logits: float
    logits_multiplied: bool = False
    head_input: bool = False

    @classmethod
    def of(cls, model) -> "_Multipliers":
        cfg, family = model.config, forwards._family(model)
        if family == "minicpm3":  # (its layers' residual_scale: scale_depth / sqrt(layers))
            return cls(1.0, model.model.layers[0].residual_scale, cfg.logits_scaling, head_input=True)
        return cls(getattr(cfg, "embedding_multiplier", 1.0), getattr(cfg, "residual_multiplier", 1.0),
                   getattr(cfg, "logits_scaling", 1.0), family in forwards.LOGITS_MULTIPLIED)


def _input_norm(layer):
    """A decoder layer's norm of the attention's input: ``input_layernorm`` (Apertus's
    ``attention_layernorm``); None for OLMo 2/3, which have none."""
    return layer.input_layernorm if hasattr(layer, "input_layernorm") else getattr(layer, "attention_layernorm", None)


def _branch_norms(layer) -> tuple:
    """A decoder layer's (norm of the attention branch's output, the MLP input's norm, norm of the
    MLP branch's output); None where the layer has none. Llama's: (None, post_attention_layernorm,
    None); Apertus's: Llama's, its norm named feedforward_layernorm. Gemma 2/3 and OLMo 2/3 norm
    each branch before it joins the stream, and the MLP's input too (Gemma's
    pre_feedforward_layernorm) or not (OLMo); GLM-4 as Gemma, under other names; VaultGemma norms
    the MLP's input only (its pre_feedforward_layernorm)."""
    if hasattr(layer, "feedforward_layernorm"):  # Apertus
        return None, layer.feedforward_layernorm, None
    if hasattr(layer, "post_norm1"):  # HyperCLOVA X: GLM-4's, or Llama's where use_post_norm is off
        return tuple(None if isinstance(n, torch.nn.Identity) else n
                     for n in (layer.post_norm1, layer.post_attention_layernorm, layer.post_norm2))
    if hasattr(layer, "post_mlp_layernorm"):  # GLM-4
        return layer.post_self_attn_layernorm, layer.post_attention_layernorm, layer.post_mlp_layernorm
    if hasattr(layer, "post_feedforward_layernorm"):
        return (layer.post_attention_layernorm, getattr(layer, "pre_feedforward_layernorm", None),
                layer.post_feedforward_layernorm)
    if hasattr(layer, "pre_feedforward_layernorm"):  # VaultGemma: Gemma 2's, without the branch norms
        return None, layer.pre_feedforward_layernorm, None
    return None, layer.post_attention_layernorm, None


class Generator:
    """Reusable fast generation for one :class:`~fastllama.reference.Llama` or transformers
    ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``MinistralForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``Qwen3ForCausalLM`` / ``SmolLM3ForCausalLM`` / ``Phi3ForCausalLM`` / ``GraniteForCausalLM`` /
    ``GemmaForCausalLM`` / ``Gemma2ForCausalLM`` / ``Gemma3ForCausalLM`` / ``Olmo2ForCausalLM`` /
    ``Olmo3ForCausalLM`` / ``CwmForCausalLM`` / ``SeedOssForCausalLM`` / ``HeliumForCausalLM`` /
    ``Ernie4_5ForCausalLM`` / ``GlmForCausalLM`` / ``Glm4ForCausalLM`` / ``ArceeForCausalLM`` /
    ``ApertusForCausalLM`` / ``Exaone4ForCausalLM`` / ``VaultGemmaForCausalLM`` /
    ``HyperCLOVAXForCausalLM`` / ``Ministral3ForCausalLM`` / ``HunYuanDenseV1ForCausalLM`` /
    ``OlmoForCausalLM`` (OLMo 1: its weightless LayerNorms called as they are) / the mixtures of
    experts ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM`` /
    ``OlmoeForCausalLM`` / ``FlexOlmoForCausalLM`` / ``GraniteMoeForCausalLM`` /
    ``Dots1ForCausalLM`` / ``Glm4MoeForCausalLM`` / ``HunYuanMoEV1ForCausalLM`` /
    ``Ernie4_5_MoeForCausalLM`` / ``MellumForCausalLM`` / ``SolarOpenForCausalLM`` /
    ``MiniMaxM2ForCausalLM`` / ``ExaoneMoeForCausalLM`` / ``GptOssForCausalLM`` (attention sinks;
    its experts on torch's grouped matmuls with their clamped gate, as HF's grouped-matmul
    implementation runs them) / ``GraniteMoeSharedForCausalLM`` / ``GraniteSWAForCausalLM`` /
    ``GraniteMoeSWAForCausalLM`` (attention sinks, a rotary module per base) /
    ``Llama4ForCausalLM`` (its text model: chunked attention, complex rotary, L2 q/k norms after
    it, temperature tuning, every chosen expert's input scaled by its sigmoid score) /
    ``DeepseekV3ForCausalLM`` / ``DeepseekV2ForCausalLM`` / ``Glm4MoeLiteForCausalLM`` /
    ``Mistral4ForCausalLM`` / ``MiniCPM3ForCausalLM`` (multi-head latent attention: the cache
    holds each token's latent and rotary key, ``kv_lora_rank + qk_rope_head_dim`` elements per
    token and layer, 576 in DeepSeek-V2/V3 where its expanded heads would take heads x (192 + 128);
    decode attends over them directly: :meth:`_latent_attention`).

    Args:
        model: the reference model or an HF causal LM of those classes (any dtype; CUDA, or CPU
            under the Triton interpreter; patched by ``fastllama.patch`` or not: the generator
            reads the weights, not the forwards, so every projection must be a plain
            ``nn.Linear``: merge LoRA adapters first). Stop tokens default to the eos ids of
            ``model.config`` and, for HF, ``model.generation_config`` (what HF's generate stops
            on). Its parameters are used in place; the generator adds the KV cache
            (``2 x max_batch_size x kv_heads x head_dim x`` the sum of :attr:`cache_lengths`
            elements: ``max_seq_len`` slots per layer, or a ring of W slots for a layer with a
            sliding window of W < max_seq_len keys). Moving the model to another device or dtype
            afterwards is an error (build a new Generator); changing its weights in place or
            re-pointing them is fine: each call checks that the captured graphs still read the
            weights' memory, else captures again.
        max_batch_size, max_seq_len: cache capacity; a call needs ``batch <= max_batch_size``
            and ``longest prompt + max_new_tokens <= max_seq_len``. A model with "dynamic" or
            "longrope" rotary scaling takes a ``max_seq_len`` up to the length where HF's
            tables change (:func:`fastllama.model_weights.rope_length_limit`).
        cuda_graph: capture the decode step as a CUDA graph (default: True on CUDA, except for a
            mixture of experts whose grouped matmul syncs with the host: see
            :func:`fastllama.ops.experts.grouped_mm_syncs`). On the CPU the step always runs eagerly.
        num_splits: ``decode_attention``'s key splits (default: its shape heuristic).
        fuse_projections: compute q/k/v with one GEMM and gate/up with one, by laying each
            layer's weights out as row blocks of one buffer (see :class:`RowBlocks`: the
            model's parameters become views of it: same values, no second copy). Default True.
        fused_decode: run each layer's four linears in the decode step through
            :func:`fastllama.ops.decode_linear`, the norms, the activation and the residual adds
            folded into them: four kernels where the cuBLAS step launches seven (:meth:`_fused_layers`).
            None (default): on CUDA with a CUDA graph, both steps are captured and timed at the
            first capture of each batch size and sampling, and the faster one is kept
            (:attr:`decode_timings`); otherwise off. True: always (a ValueError names what makes a
            model unfit: a Llama-like layer is needed, an RMSNorm before attention and before a
            gated MLP, nothing else around them). False: never.

    Attributes (besides the arguments): ``stats`` (:class:`GenerationStats` of the last call),
    ``fused_problem`` (why the fused decode step does not serve this model, or None), and
    ``decode_timings`` (the milliseconds per step the latest timed capture measured,
    ``{"cuBLAS": ..., "fused": ...}``; empty until one ran).
    """

    def __init__(self, model, max_batch_size: int, max_seq_len: int, *, cuda_graph: bool | None = None,
                 num_splits: int | None = None, fuse_projections: bool = True, fused_decode: bool | None = None):
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size and max_seq_len must be >= 1, got {max_batch_size}, {max_seq_len}")
        check_model(model, max_seq_len)
        p = model.lm_head.weight
        self.device, self.dtype = p.device, p.dtype
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA model, the model is on {self.device}")
        check_attention_device(p)  # its prefill and decode steps run the attention kernels
        # A mixture of experts' grouped matmul syncs with the host outside its bf16 sm_90/sm_100
        # kernels: such a step cannot be captured, so it runs eagerly
        experts = next((mlp_of(layer)[1].experts for layer in model.model.layers
                        if hasattr(mlp_of(layer)[1], "experts")), None)
        weight = getattr(experts, "gate_up_proj", None)  # (missing: refused with its reason at the call)
        syncs = isinstance(weight, torch.Tensor) and ops.experts.grouped_mm_syncs(weight)
        if cuda_graph and syncs:
            raise ValueError(f"cuda_graph=True: this mixture of experts' grouped matmul ({experts.gate_up_proj.dtype} on "
                             "this GPU) reads its group offsets on the host, which a CUDA graph cannot capture; "
                             "use cuda_graph=False (the default picks it), or bf16 on an sm_90/sm_100 GPU")
        self.cuda_graph = self.device.type == "cuda" and not syncs if cuda_graph is None else cuda_graph
        self.model, cfg = model, model.config
        self.n_heads, self.n_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # Multi-head latent attention (DeepSeek-V2/V3 ...): the cache holds each token's latent
        # and rotary key, (max_batch_size, max_seq_len, kv_lora_rank + qk_rope_head_dim) a layer
        # in k_cache (v_cache is empty); see _latent_attention
        self.latent = _latent(model.model.layers[0].self_attn)
        self.eps = getattr(cfg, "rms_norm_eps", None)  # (none for OLMo (1): its LayerNorms fix 1e-5)
        self.multipliers = _Multipliers.of(model)
        self.num_splits = num_splits
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.clip_qkv = getattr(cfg, "clip_qkv", None)
        # Each layer's factor of q by position, or None: Ministral 3 scales q (after rotary) by
        # Llama 4's factor (HF's own function on every position, rounded to the model's dtype as
        # HF rounds it); Llama 4 its NoPE layers' q by its temperature tuning (fp32, the product
        # rounded as HF rounds it)
        self.q_position_scales = [None] * len(model.model.layers)
        positions = torch.arange(max_seq_len, device=self.device)
        if forwards._family(model) in ("ministral3", "mistral4"):  # (Mistral 4: all of q, after the rotary)
            rope = cfg.rope_parameters
            scale = sys.modules[type(model).__module__].get_llama_4_attn_scale(
                positions[None], rope.get("llama_4_scaling_beta"), rope.get("original_max_position_embeddings"))
            self.q_position_scales = [scale.reshape(-1).to(self.dtype)] * len(model.model.layers)
        if forwards._family(model) == "llama4" and cfg.attn_temperature_tuning:
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / cfg.floor_scale)) * cfg.attn_scale + 1.0
            self.q_position_scales = [None if forwards.uses_rope(layer.self_attn) else scale
                                      for layer in model.model.layers]
        # Llama 4's chunked attention: each layer's chunk (query p sees keys from the start of p's
        # chunk of attention_chunk_size positions), or None
        self.chunks = [cfg.attention_chunk_size if t == "chunked_attention" else None
                       for t in getattr(cfg, "layer_types", None) or [None] * len(model.model.layers)]
        # Gemma's norms compute (x * (1 + w)), OLMo 2/3's, FlexOlmo's and Helium's (x * w), in
        # fp32 and round once: the families patch serves with those norms
        family = forwards._family(model)
        self.unit_offset = family in patching._GEMMA
        self.round_once = family in (*patching._GEMMA, *patching._OLMO)
        # OLMo (1)'s norms are LayerNorms without weights: called as the model's own modules
        self.weightless_norms = family == "olmo"
        # (Llama 4's q/k norms have no weight either: an RMSNorm of weight 1, which rounds as they do)
        self._unit_weight = torch.ones(self.head_dim, dtype=self.dtype, device=self.device)
        # GLM's, GLM-4's, Helium's and Ernie 4.5's rotary turns adjacent pairs of dims; so do
        # DeepSeek-V2's complex tables and its successors' with rope_interleave (whose output
        # lays the pairs' two halves apart: the same permutation of q's dims and k's, which a
        # dot product does not see)
        self.interleaved = family in forwards.ROTARY_INTERLEAVED_FAMILIES or (self.latent and (
            family == "deepseek_v2" or getattr(cfg, "rope_interleave", False)))
        layers = model.model.layers
        # Each layer's rotary tables: one pair for the model, or one per layer type (Gemma 3's
        # local and global bases); SmolLM3's NoPE layers (and EXAONE 4's global layers in a model
        # with a window) get a one-row table of cos 1, sin 0,
        # with which x cos - y sin = x exactly (fp32 math), so the same kernel appends k unrotated.
        types = rotary_layer_types(model) or [None] * len(layers)
        rotating = [forwards.uses_rope(layer.self_attn) for layer in layers]
        tables = {t: rope_tables(model, max_seq_len, self.dtype, self.device, t)
                  for t in dict.fromkeys(t for t, r in zip(types, rotating) if r)}
        # (as a table is: its width, partial rotary's too, and dtype, Ernie 4.5's fp32)
        like = next(iter(tables.values()))[0][:1] if tables else torch.empty(1, self.head_dim, dtype=self.dtype,
                                                                               device=self.device)
        ones = torch.ones_like(like)
        no_rotation = self._no_rotation = (ones, torch.zeros_like(ones))
        self.rotary = [tables[t] if r else no_rotation for t, r in zip(types, rotating)]
        # Sliding windows (Mistral, Phi-3, Gemma 3's local layers ...): HF's W is (W - 1, 0)
        self.windows = [(w - 1, 0) if w else None for w in (forwards.sliding_window(layer.self_attn)
                                                            for layer in layers)]
        # Each layer's cache: max_seq_len slots, or a ring of W slots for a window of W keys (a
        # decode step's query reads exactly the last W positions, which are then every slot)
        self.cache_lengths = [min(max_seq_len, w[0] + 1) if w else max_seq_len for w in self.windows]
        if self.latent:
            self.k_cache = [torch.zeros(max_batch_size, max_seq_len, a.kv_lora_rank + a.qk_rope_head_dim,
                                        dtype=self.dtype, device=self.device) for a in (l.self_attn for l in layers)]
            self.v_cache = []
        else:
            self.k_cache, self.v_cache = ([torch.zeros(max_batch_size, self.n_kv_heads, n, self.head_dim,
                                                       dtype=self.dtype, device=self.device)
                                           for n in self.cache_lengths] for _ in range(2))
        self._states: dict[tuple, _State] = {}
        # One memory pool for every captured graph: they never replay at the same time, and no
        # graph output lives in the pool (outputs are the static buffers or clones of them).
        self._graph_pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None
        self.stats = GenerationStats()
        self.fuse_projections = fuse_projections
        self._projections: list[tuple[RowBlocks | None, RowBlocks | None]] = []
        self._weights_key: tuple[int, ...] = ()
        self.fused_decode = fused_decode
        self._fused_failure: str | None = None  # why the fused step failed on this GPU, if it did
        # what the last timed capture measured: {"cuBLAS": ms per step, "fused": ms per step}
        self.decode_timings: dict[str, float] = {}
        self._bind_weights()

    def _bind_weights(self) -> None:
        """Before each call: the model is where the cache is; the fused projections still back
        the parameters (laid out again if something re-pointed them); and the captured graphs,
        which hold the addresses of every weight, are dropped if any weight moved since."""
        problem = module_problem(self.model)
        if problem:
            raise ValueError(f"the generator computes with the weights directly, but {problem}")
        # (the fp32 modules HF keeps under a 16-bit load, gpt-oss's norms, are fp32 by design: each
        # such norm rounds once from its fp32 weight, as the kernel does with it)
        kept = getattr(self.model, "_keep_in_fp32_modules", None) or ()
        # (and the mixtures of experts' router weights that transformers keeps fp32 under a 16-bit
        # load (_keep_in_fp32_modules_strict, "gate.weight": DeepSeek's, GLM-4.5's, dots.llm1's
        # ...): the generator calls those router modules, which compute in fp32 whatever the
        # model's dtype; Llama 4's router weight it reads itself)
        strict = tuple(getattr(self.model, "_keep_in_fp32_modules_strict", None) or ())
        mlps = [mlp_of(layer)[1] for layer in self.model.model.layers]
        routers = {id(p) for block in mlps if hasattr(block, "experts") and forwards._family(block) != "llama4"
                   for p in (block.gate if hasattr(block, "gate") else block.router).parameters()}
        moved = {(p.device, p.dtype) for n, p in self.model.named_parameters()
                 if not (p.dtype == torch.float32 and (self.round_once and any(m in n.split(".") for m in kept)
                                                       or id(p) in routers and n.endswith(strict)))}
        moved -= {(self.device, self.dtype)}
        if moved:
            raise ValueError(f"the model has parameters on {sorted(map(str, moved))} but this Generator was built "
                             f"for {self.device} / {self.dtype} (its cache and tables are); build a new Generator")
        if self.fuse_projections:
            layers = self.model.model.layers
            if len(self._projections) != len(layers):
                self._projections = [(None, None)] * len(layers)
            self._projections = [
                tuple(old if old is not None and old.linears == group and old.intact()
                      else (RowBlocks(group) if RowBlocks.fusable(group) else None)
                      for old, group in zip(fused, self._layer_groups(layer)))
                for fused, layer in zip(self._projections, layers)]
        # (an MLP's activation swapped between SiLU and GELU-tanh changes the captured step too;
        # a gateless MLP's is the module the step calls: Arcee's ReLU^2, Apertus's xIELU)
        self.activations = [mlp_activation(mlp) if gateless(mlp) else gate_activation(_gated(mlp)) for mlp in mlps]
        # (and Qwen2-MoE's shared experts': captured like the others; the Granite MoE families' shared MLP)
        shared = [shared_experts_of(mlp)[1] or layer_shared_mlp(layer)
                  for mlp, layer in zip(mlps, self.model.model.layers)]
        self.shared_activations = [None if s is None else gate_activation(s) for s in shared]
        # (how each mixture of experts runs its experts, decided here, not in every step's layers)
        self.expert_paths = [None if not hasattr(mlp, "experts") else "llama4" if forwards._family(mlp) == "llama4"
                             else "moe_experts" if forwards.experts_layout_problem(mlp.experts) is None else "grouped"
                             for mlp in mlps]
        # (a latent attention's key and value rows of kv_b_proj, per head: views of its weight,
        # (H, qk_nope_head_dim, kv_lora_rank) and (H, kv_lora_rank, v_head_dim))
        self.absorbed = [absorbed(layer.self_attn) if self.latent else None for layer in self.model.model.layers]
        # (and Gemma 2's attention score caps, read from the modules as HF's forward reads them)
        self.softcaps = [forwards.score_softcap(layer.self_attn) for layer in self.model.model.layers]
        too_big = [c for c in self.softcaps if not ops.decode.takes_softcap(c, self.dtype)]
        if too_big:
            raise ValueError(f"the model's attn_logit_softcapping={too_big[0]} is above what the decode kernel takes "
                             f"with {self.dtype} ({ops.decode.MAX_16BIT_SOFTCAP:g}); fastllama.patch(model) and HF's "
                             f"generate run it")
        # (what keeps the decode step from ops.decode_linear, or None)
        self.fused_problem = self._fused_decode_problem()
        if self.fused_decode and self.fused_problem:
            raise ValueError(f"fused_decode=True, but {self.fused_problem}; build the Generator with fused_decode=None "
                             f"(the default) or False")
        key = (*(p.data_ptr() for p in self.model.parameters()), *self.activations, *self.shared_activations,
               *self.softcaps, self.fused_decode, self.fuse_projections)  # (the last two: settable attributes)
        if key != self._weights_key:
            for st in self._states.values():
                st.graph = None
            self._weights_key = key

    @staticmethod
    def _layer_groups(layer) -> tuple[list, list]:
        """The linears reading the attention's input (q, k, v) and the MLP's (gate, up); Phi-3's
        are one merged linear each, already one GEMM. A mixture of experts has none of the latter,
        nor a gateless MLP (its up_proj alone reads the input)."""
        block, a = mlp_of(layer)[1], layer.self_attn
        mlp = [] if hasattr(block, "experts") or gateless(block) else list(mlp_input_linears(block))
        return list(_latent_input_linears(a) if _latent(a) else attention_input_linears(a)), mlp

    def _fused_decode_problem(self) -> str | None:
        """Why the decode step cannot run on :meth:`_fused_layers`, or None: every layer must be
        a Llama layer (an RMSNorm with a weight of the model's dtype before the attention and
        before a gated SiLU/GELU-tanh MLP, plain residual adds), its q/k/v and gate/up laid out
        as one buffer each; and the step must not have failed to run here before."""
        if self._fused_failure:
            return self._fused_failure
        if self.latent:
            return "its attention is multi-head latent attention (its decode step absorbs kv_b_proj)"
        if self.weightless_norms or self.eps is None:
            return "its norms are LayerNorms without weights"
        if self.multipliers.residual != 1.0:
            return "it scales its residual branches"
        if not self.fuse_projections:
            return "fuse_projections=False (the fused step reads q/k/v and gate/up as one weight each)"
        for i, layer in enumerate(self.model.model.layers):
            mlp = mlp_of(layer)[1]
            if hasattr(mlp, "experts") or gateless(mlp) or self.activations[i] is None:
                return f"layer {i}'s MLP is not a gated SiLU or GELU-tanh MLP"
            attention_out_norm, mlp_norm, mlp_out_norm = _branch_norms(layer)
            if attention_out_norm is not None or mlp_out_norm is not None:
                return f"layer {i} norms its branches' outputs"
            for norm in (_input_norm(layer), mlp_norm):
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dtype != self.dtype:
                    return f"layer {i} has a norm that is not an RMSNorm with a {self.dtype} weight"
            if None in self._projections[i]:
                return f"layer {i}'s q/k/v or gate/up linears could not be laid out as one buffer"
        return None

    @staticmethod
    def _project(fused: RowBlocks | None, linears, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs of ``linears`` on ``h``: one GEMM when they are fused."""
        return fused(h) if fused is not None else tuple(F.linear(h, lin.weight, lin.bias) for lin in linears)

    # -- the model, in fastllama ops --------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, slots: torch.Tensor, last: torch.Tensor | None,
                 fused: bool = False) -> torch.Tensor:
        """Logits (B, V) at position ``last`` (B,) of ``tokens`` (B, T) (default: the last one).

        Token t of sequence b goes to cache slot ``slots[b] + t``. T > 16 (prefill, slots all 0)
        attends with flash attention over slots [0, T); small T (decode) with decode attention
        over each sequence's ``slots[b] + T`` cached tokens. Both apply each layer's sliding
        window (:attr:`windows`). A layer whose cache is a ring (:attr:`cache_lengths`) takes
        T == 1 (a decode step: position ``slots[b]``) or a prefill (T > 1, slots all 0, sequence
        b ``last[b] + 1`` tokens long, default T). ``fused``: the layers of :meth:`_fused_layers`
        (a decode step of a model :meth:`_fused_decode_problem` accepts).
        """
        B, T = tokens.shape
        layers = self.model.model.layers
        x = self.model.model.embed_tokens(tokens)
        if self.multipliers.embedding != 1.0:
            x = x * self.multipliers.embedding
        mlp_out = None
        lengths = slots + T if T <= ops.decode.MAX_QUERY_LEN else None
        # what a forward computes once for every layer that needs it: ("ring", W) -> (write slots,
        # lengths); "positions" (B, T); "q_scale" (Ministral 3); ("rows", id(table)) -> its rows there
        once: dict = {}
        scratch: list[torch.Tensor] = []  # a prefill's full-length K/V for the ring layers, made once
        rows = (torch.arange(B, device=x.device), last) if last is not None else (slice(None), -1)
        if fused:
            h = self._norm(self._fused_layers(x, slots, lengths, last, once, scratch)[rows], self.model.model.norm)
            return self._logits(h)
        for i, layer in enumerate(layers):
            a, m = layer.self_attn, mlp_of(layer)[1]
            attention_in, mlp_in = self._layer_groups(layer)
            qkv, gate_up = self._projections[i] if self._projections else (None, None)
            # x + the previous layer's MLP branch, and this layer's input norm: one kernel (OLMo
            # has no input norm: the sum itself goes in)
            x, h = self._add_and_norm(x, mlp_out, _input_norm(layer))
            projected = self._project(qkv, attention_in, h)
            if self.latent:
                o = self._latent_attention(i, a, *projected, slots, lengths, once)
            else:
                o = self._attend(i, *self._qkv(a, projected), slots, lengths, last, once, scratch)
            o = F.linear(o.transpose(1, 2).reshape(B, T, -1), a.o_proj.weight, a.o_proj.bias)
            attention_out_norm, mlp_norm, mlp_out_norm = _branch_norms(layer)
            # s = x + o (o normed first where the layer norms its branches); h = mlp_norm(s)
            o = self._residual_branch(o if attention_out_norm is None else self._norm(o, attention_out_norm))
            x, h = self._add_and_norm(x, o, mlp_norm)
            if hasattr(m, "experts"):
                mlp_out = self._experts(m, h, self.expert_paths[i], self.activations[i], self.shared_activations[i])
                s = layer_shared_mlp(layer)
                if s is not None:  # (Granite MoE families: a shared MLP beside the block, Phi-3's layout)
                    gate_up = F.linear(h, s.input_linear.weight, s.input_linear.bias)
                    mlp_out = mlp_out + F.linear(ops.swiglu_fused(gate_up, activation=self.shared_activations[i]),
                                                 s.output_linear.weight, s.output_linear.bias)
            elif gateless(m):  # down(act(up(h))): the model's own activation module (no kernel of ours)
                up = F.linear(h, m.up_proj.weight, m.up_proj.bias)
                mlp_out = F.linear(self.activations[i](up), m.down_proj.weight, m.down_proj.bias)
            else:
                projected = self._project(gate_up, mlp_in, h)
                gate, up = projected if len(projected) == 2 else projected[0].chunk(2, dim=-1)
                mlp_out = F.linear(ops.swiglu(gate, up, activation=self.activations[i]), m.down_proj.weight,
                                   m.down_proj.bias)
            mlp_out = self._residual_branch(mlp_out if mlp_out_norm is None else self._norm(mlp_out, mlp_out_norm))
        # the last residual add and the final norm in one kernel, at the rows that give logits
        h, _ = self._norm(mlp_out[rows], self.model.model.norm, residual=x[rows])
        return self._logits(h)

    def _fused_layers(self, x: torch.Tensor, slots, lengths, last, once: dict, scratch: list) -> torch.Tensor:
        """The residual stream after every layer, each layer's linears through
        :func:`fastllama.ops.decode_linear` (arguments as :meth:`_attend`'s)::

            q, k, v = qkv(norm(x))      attention          x = x + o_proj(attention)
            m = act(gate) * up, (gate, up) = gate_up(norm(x))          x = x + down_proj(m)

        Four kernels around the attention, where the cuBLAS layer launches seven (two norms,
        each with its residual add, four GEMMs and the SwiGLU): the same roundings, other
        summation orders."""
        B, T = x.shape[:2]
        norm = "unit_offset" if self.unit_offset else "round_once" if self.round_once else "llama"
        for i, layer in enumerate(self.model.model.layers):
            a, mlp = layer.self_attn, mlp_of(layer)[1]
            qkv, gate_up = self._projections[i]
            projected = ops.decode_linear(x, qkv.weight, qkv.bias, norm_weight=_input_norm(layer).weight, eps=self.eps,
                                          norm=norm).split(qkv.sizes, dim=-1)
            o = self._attend(i, *self._qkv(a, projected), slots, lengths, last, once, scratch)
            x = ops.decode_linear(o.transpose(1, 2).reshape(B, T, -1), a.o_proj.weight, a.o_proj.bias, residual=x)
            h = ops.decode_linear(x, gate_up.weight, gate_up.bias, norm_weight=_branch_norms(layer)[1].weight,
                                  eps=self.eps, norm=norm, activation=self.activations[i])
            x = ops.decode_linear(h, mlp.down_proj.weight, mlp.down_proj.bias, residual=x)
        return x

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's logits (B, V) of the final norm's output ``h`` (B, hidden), with the
        family's multipliers and soft cap."""
        if self.multipliers.head_input:
            h = h / self.multipliers.logits
        logits = F.linear(h, self.model.lm_head.weight, self.model.lm_head.bias)  # (Ernie 4.5 MoE: a bias)
        if self.multipliers.logits != 1.0 and not self.multipliers.head_input:
            logits = (logits * self.multipliers.logits if self.multipliers.logits_multiplied
                      else logits / self.multipliers.logits)
        if self.final_softcap is not None:  # Gemma's final soft-capping: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def _qkv(self, a, projected: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, Hq, T, D), k and v (B, Hk, T, D) from the outputs of the attention's input
        projections (B, T, *), with the family's q/k norms and clipping: transposed views, no
        copies (the kernels take any strides)."""
        q, k, v = split_qkv(a, projected)
        B, T = q.shape[:2]
        over_all_heads = forwards.qk_norm_over_all_heads(a)
        if over_all_heads:  # OLMo 2/3, OLMoE: an RMSNorm over the whole q and k projections
            q, k = self._norm(q, a.q_norm), self._norm(k, a.k_norm)
        if self.clip_qkv is not None:  # OLMoE's option: q, k, v clamped after the norms
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(a, "q_norm") and not over_all_heads:  # Qwen3, Gemma 3: over each head, before rotary
            q, k = self._norm(q, a.q_norm), self._norm(k, a.k_norm)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _latent_attention(self, i: int, a, q: torch.Tensor, latent: torch.Tensor, slots, lengths,
                          once: dict) -> torch.Tensor:
        """Layer i's multi-head latent attention (B, H, T, v_head_dim) from the outputs of
        :func:`_latent_input_linears` (B, T, *): q through its low-rank norm and ``q_b_proj`` (where
        it has one), the latent normed; q's and the key's rotary dims rotated at the tokens'
        positions; each token's latent and rotary key written to its cache slot (``slots[b] + t``).

        Decode (``lengths`` given, T <= 16): attention over the cached latents themselves
        (:func:`fastllama.ops.latent_decode_attention`), each head's q_nope absorbed into the
        latent space by its key rows of ``kv_b_proj`` first and its output taken out of it by its
        value rows after (:attr:`absorbed`): one cache row per token, read once per tile of heads.
        Prefill (slots 0): the prompt's heads expanded by ``kv_b_proj``, as the model computes
        them, through flash attention (there the work is the products, not the cache reads).
        Each head is laid out ``(rotary dims, the others)``, HF's the other way round: a dot
        product does not see the order; v's heads are padded to q/k's width (or q/k's to v's)."""
        B, T = q.shape[:2]
        H, nope, rope, dv, rank = self.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
        if a.q_proj is None:  # (q_a_proj's output: its norm, then q_b_proj)
            q = F.linear(self._norm(q, a.q_a_layernorm, forwards.norm_eps(a.q_a_layernorm)), a.q_b_proj.weight,
                         a.q_b_proj.bias)
        q = q.view(B, T, H, nope + rope).transpose(1, 2)
        latent, k_rot = latent.split([rank, rope], dim=-1)
        latent = self._norm(latent, a.kv_a_layernorm, forwards.norm_eps(a.kv_a_layernorm))
        positions = self._positions(once, slots, T)
        cos, sin = self.rotary[i]
        if ("rows", id(cos)) not in once:
            once["rows", id(cos)] = (cos[positions], sin[positions])
        q_rot, k_rot = ops.apply_rotary_pos_emb(q[..., nope:], k_rot[:, None], *once["rows", id(cos)],
                                                interleaved=self.interleaved)
        cache = self.k_cache[i]
        if ("rows of", B) not in once:
            once["rows of", B] = torch.arange(B, device=slots.device)[:, None]
        cache[once["rows of", B], positions] = torch.cat((latent, k_rot[:, 0]), dim=-1)
        if lengths is not None:
            absorb_k, absorb_v = self.absorbed[i]
            q_latent = self._position_scaled(i, torch.matmul(q[..., :nope], absorb_k), once, slots)
            o = ops.latent_decode_attention(q_latent, self._position_scaled(i, q_rot, once, slots), cache[:B, :, :rank],
                                            cache[:B, :, rank:], lengths, scale=a.scaling, num_splits=self.num_splits)
            return torch.matmul(o, absorb_v)
        kv = F.linear(latent, a.kv_b_proj.weight).view(B, T, H, nope + dv).transpose(1, 2)
        width = max(nope + rope, dv)
        q = F.pad(torch.cat((q_rot, q[..., :nope]), dim=-1), (0, width - nope - rope))
        k = F.pad(torch.cat((k_rot.expand(B, H, T, rope), kv[..., :nope]), dim=-1), (0, width - nope - rope))
        v = F.pad(kv[..., nope:], (0, width - dv))
        o = ops.flash_attention(self._position_scaled(i, q, once, slots), k, v, causal=True, scale=a.scaling)
        return o[..., :dv]

    def _attend(self, i: int, q, k, v, slots, lengths, last, once: dict, scratch: list) -> torch.Tensor:
        """Layer i's attention of the new tokens' q (B, Hq, T, D) after the rotary + cache append of
        their k/v (see :meth:`_forward`). ``lengths``: the cached lengths after the append when
        the decode kernel attends (T <= 16), else None; ``once`` and ``scratch``: what one
        forward computes once for every layer (ring write slots and lengths by ring size, the
        tokens' positions and what is read at them; a prefill's full-length K/V for the rings)."""
        B, T = q.shape[0], q.shape[2]
        kc, vc = self.k_cache[i][:B], self.v_cache[i][:B]
        cos, sin = self.rotary[i]
        attn = self.model.model.layers[i].self_attn
        post_rotary = _post_rotary_norms(attn)
        if post_rotary is not None:
            # HunYuan and Llama 4 norm each head's q and k AFTER rotary: rotate (tables read at each
            # token's position), norm, then the cache append with the identity rotation (k copied exactly)
            if ("rows", id(cos)) not in once:
                positions = self._positions(once, slots, T)
                once["rows", id(cos)] = (cos[positions], sin[positions])
            q, k = ops.apply_rotary_pos_emb(q, k, *once["rows", id(cos)], interleaved=self.interleaved)
            q, k = self._norm(q, post_rotary[0]), self._norm(k, post_rotary[1])
            cos, sin = self._no_rotation
        scale, window = getattr(attn, "scaling", None), self.windows[i]
        softcap, sinks = self.softcaps[i], getattr(attn, "sinks", None)  # (gpt-oss: attention sinks)
        ring = self.cache_lengths[i] if self.cache_lengths[i] < self.max_seq_len else None
        if ring is not None and T == 1:
            # A decode step on a ring of W slots: position p = slots[b] goes to slot p mod W, and
            # the min(p + 1, W) slots filled are exactly p's window (the softmax does not care in
            # which order its keys sit), so no window mask is needed.
            if ("ring", ring) not in once:
                once["ring", ring] = (slots % ring, torch.clamp(slots + 1, max=ring))
            ring_slots, ring_lengths = once["ring", ring]
            q = ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, ring_slots, positions=slots,
                                        interleaved=self.interleaved)
            q = self._position_scaled(i, q, once, slots)
            return ops.decode_attention(q, kc, vc, ring_lengths, scale=scale, num_splits=self.num_splits,
                                        softcap=softcap, sinks=sinks)
        if ring is not None:  # a prefill on a ring: the whole prompt to a scratch cache, attended there
            if not scratch:
                scratch.extend(torch.empty(B, self.n_kv_heads, T, self.head_dim, dtype=self.dtype,
                                           device=self.device) for _ in range(2))
            ring_k, ring_v, (kc, vc) = kc, vc, scratch
        q = ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, slots, interleaved=self.interleaved)
        q = self._position_scaled(i, q, once, slots)
        chunk = self.chunks[i]
        if chunk is not None and T > 1:  # a prefill (slots 0): each chunk of each prompt a sequence of its own
            o = self._chunked_prefill(q, kc[:, :, :T], vc[:, :, :T], chunk, once, scale)
        elif lengths is not None:
            # (a chunked layer's decode step: the keys from the start of the token's chunk)
            if chunk is not None and ("chunk", chunk) not in once:
                once["chunk", chunk] = torch.div(slots, chunk, rounding_mode="floor") * chunk
            o = ops.decode_attention(q, kc, vc, lengths, scale=scale, num_splits=self.num_splits, window=window,
                                     softcap=softcap, sinks=sinks,
                                     cache_leftpad=None if chunk is None else once["chunk", chunk])
        else:
            o = ops.flash_attention(q, kc[:, :, :T], vc[:, :, :T], causal=True, scale=scale, window=window,
                                    softcap=softcap, sinks=sinks)
        if ring is not None:  # then each prompt's last W positions into the ring
            prompt_lengths = last + 1 if last is not None else torch.full_like(slots, T)
            _fill_ring(ring_k, kc, prompt_lengths)
            _fill_ring(ring_v, vc, prompt_lengths)
        return o

    @staticmethod
    def _positions(once: dict, slots: torch.Tensor, T: int) -> torch.Tensor:
        """The new tokens' positions ``slots[b] + t`` (B, T), made once per forward."""
        if "positions" not in once:
            once["positions"] = slots.to(torch.long)[:, None] + torch.arange(T, device=slots.device)
        return once["positions"]

    def _position_scaled(self, i: int, q: torch.Tensor, once: dict, slots: torch.Tensor) -> torch.Tensor:
        """Layer i's q (B, H, T, D) of the tokens at positions ``slots[b] + t`` times its factor of
        each position (:attr:`q_position_scales`: Ministral 3's, Llama 4's NoPE layers'; read once
        per forward and table), rounded to q's dtype; q itself where there is none."""
        table = self.q_position_scales[i]
        if table is None:
            return q
        if ("q_scale", id(table)) not in once:
            once["q_scale", id(table)] = table[self._positions(once, slots, q.shape[2])][:, None, :, None]
        return (q * once["q_scale", id(table)]).to(q.dtype)

    @staticmethod
    def _chunked_prefill(q, k, v, chunk: int, once: dict, scale) -> torch.Tensor:
        """Llama 4's chunked attention over a prefill of T tokens (slots 0): each prompt's chunks of
        ``chunk`` positions are sequences of one varlen flash attention over the B * T tokens."""
        B, H, T, D = q.shape
        if ("chunks", chunk, T) not in once:
            rows, firsts = torch.arange(B, device=q.device), torch.arange(0, T, chunk, device=q.device)
            starts = (rows[:, None] * T + firsts).flatten()
            once["chunks", chunk, T] = torch.cat([starts, starts.new_full((1,), B * T)]).to(torch.int32)

        def packed(t):  # (B, h, T, D) -> (1, h, B * T, D)
            return t.transpose(1, 2).reshape(1, B * T, t.shape[1], D).transpose(1, 2)

        o = ops.flash_attention(packed(q), packed(k), packed(v), causal=True, scale=scale,
                                cu_seqlens=once["chunks", chunk, T])
        return o.transpose(1, 2).reshape(B, T, H, D).transpose(1, 2)

    @staticmethod
    def _experts(block, h: torch.Tensor, path: str, activation: str, shared_activation: str | None) -> torch.Tensor:
        """A mixture-of-experts MLP (every mixture of ``_HF_CAUSAL_LMS``): the model's own router
        module picks each token's experts, which run on ``ops.moe_experts`` (``path``
        "moe_experts"), or as :func:`_grouped_experts` ("grouped": gpt-oss's layout), or Llama
        4's as :func:`_llama4_routed_experts` ("llama4"); Qwen2-MoE adds its
        shared expert, scaled by a sigmoid gate, the others that have one their shared experts
        (HunYuan MoE: shared MLP) as they are. All on the device (no sync: the step stays
        capturable)."""
        x = h.reshape(-1, h.shape[-1])
        if path == "llama4":  # (its router is read, not called: see the function)
            out = _llama4_routed_experts(block, x, activation)
        else:
            # the router's outputs: (logits, weights, index); GraniteMoE's (its ``router``) in
            # transformers before 5.2x: (index, weights, logits)
            router = block.gate if hasattr(block, "gate") else block.router
            # (MiniMax-M2's block keeps its router's score bias and passes it, as here)
            bias = (block.e_score_correction_bias,) if hasattr(block, "e_score_correction_bias") else ()
            first, weights, last = router(x, *bias)
            index = first if not first.is_floating_point() else last
            if path == "moe_experts":
                out = ops.moe_experts(x, index, weights, block.experts.gate_up_proj, block.experts.down_proj,
                                      activation=activation)
            else:  # another of HF's layouts (gpt-oss's): model_weights.grouped_layout_ok
                out = _grouped_experts(block.experts, x, index, weights)
        _, s = shared_experts_of(block)
        if s is not None:
            # (with their biases: Ernie 4.5 MoE's use_bias)
            shared = F.linear(ops.swiglu(F.linear(x, s.gate_proj.weight, s.gate_proj.bias),
                                         F.linear(x, s.up_proj.weight, s.up_proj.bias), activation=shared_activation),
                              s.down_proj.weight, s.down_proj.bias)
            if hasattr(block, "shared_expert_gate"):  # Qwen2-MoE's: scaled by a sigmoid gate
                gate = block.shared_expert_gate
                shared = torch.sigmoid(F.linear(x, gate.weight, gate.bias)) * shared
            out = out + shared
        return out.view_as(h)

    def _norm(self, x: torch.Tensor, norm, eps: float | None = None, residual: torch.Tensor | None = None):
        """The model's RMSNorm ``norm`` of x from its weight, in one kernel (with ``residual``:
        ``(norm(x + residual), x + residual)``): Gemma's scales by ``1 + w``, Gemma's and OLMo's
        round once. ``eps``: the config's ``rms_norm_eps`` unless given (a latent attention's
        norms keep their class's default). OLMo (1)'s weightless LayerNorm: the module itself,
        after the add."""
        if self.weightless_norms:
            if residual is None:
                return norm(x)
            s = x + residual
            return norm(s), s
        weight = getattr(norm, "weight", None)
        return ops.rms_norm(x, self._unit_weight if weight is None else weight, self.eps if eps is None else eps,
                            residual=residual, unit_offset=self.unit_offset, round_once=self.round_once)

    def _add_and_norm(self, x: torch.Tensor, branch: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` for the residual stream ``s = x + branch`` (``x`` when there is no
        branch yet), in one kernel; ``(s, s)`` when ``norm`` is None."""
        if branch is None:
            return x, (x if norm is None else self._norm(x, norm))
        if norm is None:
            s = x + branch
            return s, s
        h, s = self._norm(branch, norm, residual=x)
        return s, h

    def _residual_branch(self, h: torch.Tensor) -> torch.Tensor:
        """What a layer's attention or MLP adds to the residual stream (Granite and HyperCLOVA X
        scale it)."""
        return h if self.multipliers.residual == 1.0 else h * self.multipliers.residual

    def _advance(self, st: _State, logits: torch.Tensor, generator=None) -> None:
        """Samples the next tokens into ``st.token`` and marks stopped sequences (device only)."""
        s = st.sampling
        # Each launch here is a few microseconds of a decode step that reads the weights in a
        # few hundred: greedy picks its tokens from the model's dtype (the fp32 copy of 16-bit
        # logits has the same largest entry, first index on ties) straight into st.token.
        if s.temperature == 0:
            torch.argmax(logits, dim=-1, out=st.token)
        else:
            st.token.copy_(sample_logits(logits.float(), s.temperature, s.top_k, s.top_p, generator))
        st.token.masked_fill_(st.done, s.pad)
        st.done |= (st.token[:, None] == st.stop[None, :]).any(-1)

    def _step(self, st: _State, generator=None) -> None:
        """One decode step on the static buffers: feed ``st.token``, sample the next one."""
        # A finished sequence's token is its pad, which need not be a valid id (-1 marks padding
        # for Tokenizer.decode): feed 0 instead; its logits are ignored anyway.
        logits = self._forward(torch.where(st.done, 0, st.token)[:, None], st.seqlens, None, fused=st.fused)
        self._advance(st, logits, generator)
        st.seqlens += 1

    def _capture(self, st: _State) -> None:
        """Captures the decode step: with ``fused_decode=None`` and a model :meth:`_fused_layers`
        serves, the cuBLAS step and the fused one, each timed (:meth:`_replay_ms`), keeping the
        faster; else the one ``fused_decode`` asks for."""
        if self.fused_decode is None and self.fused_problem is None:
            graphs, ms = {}, {}
            for fused in (False, True):
                st.fused = fused
                try:
                    self._capture_step(st)
                    graphs[fused], ms[fused] = st.graph, self._replay_ms(st)
                except Exception as e:  # noqa: BLE001
                    st.graph = None  # (captured again by the next call)
                    # (a device error such as an illegal address leaves the CUDA context unusable,
                    # the cuBLAS step's graph too: not something to fall back from)
                    if not fused or isinstance(e, torch.AcceleratorError) or "CUDA error" in str(e):
                        raise
                    # (the optional step failing to build or run, say a compile error on this GPU,
                    # must not stop decoding: the cuBLAS step runs, and this Generator stops trying)
                    self._fused_failure = self.fused_problem = (f"the fused decode step failed to run: "
                                                                f"{type(e).__name__}: {e}")
                    # (stacklevel: _capture, generate, on_device, no_grad's wrapper, the caller)
                    warnings.warn(f"{self.fused_problem}; decoding with the cuBLAS step", RuntimeWarning,
                                  stacklevel=5)
                    break
            # (within 2 % the cuBLAS step stays: 10 replays do not resolve less, and it is the
            # path every other family runs)
            st.fused = True in ms and ms[True] < 0.98 * ms[False]
            st.graph = graphs[st.fused]
            self.decode_timings = {"cuBLAS": ms[False], **({"fused": ms[True]} if True in ms else {})}
        else:
            st.fused = self._fused_forced()
            self._capture_step(st)

    def _fused_forced(self) -> bool:
        """Whether a step chosen without timing (eager, or ``fused_decode=True``) is the fused one."""
        return bool(self.fused_decode) and self.fused_problem is None

    def _replay_ms(self, st: _State) -> float:
        """Milliseconds per replay of ``st.graph``, over up to 10 replays after one to warm up
        (from slot 0: each writes the next cache slot, which prefill overwrites or decode writes
        before reading). The CUDA RNG state is restored after: sampling graphs draw from it, and
        the timing must not shift the draws of the call that captured."""
        n = min(10, self.max_seq_len - 1)  # (slots 0 .. n; a capture needs max_seq_len >= 3)
        rng = torch.cuda.get_rng_state(self.device)
        try:
            st.seqlens.zero_()
            st.graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                st.graph.replay()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / n
        finally:
            torch.cuda.set_rng_state(rng, self.device)
            st.seqlens.zero_()
            st.done.zero_()

    def _capture_step(self, st: _State) -> None:
        """Warms the step up (compiles every kernel) on a side stream, then captures it. The
        warm-up writes cache slots 0 and 1, which prefill overwrites or decode writes before
        reading; the state buffers are reset by the caller. The warm-up samples with its own
        generator: drawing from the default one would shift every later draw, and the first
        call of a key would not reproduce under the same ``torch.manual_seed``."""
        st.seqlens.zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        warm_up_rng = torch.Generator(device=self.device)
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(st, warm_up_rng)
        torch.cuda.current_stream(self.device).wait_stream(side)
        st.seqlens.zero_()
        graph = torch.cuda.CUDAGraph()
        # Captured on the side stream, on this Generator's device. Left out, torch.cuda.graph
        # captures on one stream per process, made on whichever GPU was current at the
        # process's first capture: a model on another GPU would run its step eagerly there and
        # leave an empty graph (every replay then repeats the last token).
        with torch.cuda.graph(graph, pool=self._graph_pool, stream=side):
            self._step(st)
        st.graph = graph

    # -- the public loop --------------------------------------------------------------------
    @_on_model_device
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        max_new_tokens: int = 20,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: Iterable[int] | int | torch.Tensor | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer=None,
    ):
        """Generates up to ``max_new_tokens`` tokens per prompt; the reference model's contract.

        ``input_ids`` is either a (B, T) tensor (LEFT-padded, with ``attention_mask`` zeros on the
        padding, exactly as :meth:`Llama.generate` takes it) and then a (B, T + n) tensor is
        returned like the reference's (finished sequences filled with ``pad_token_id``), or a
        list of token-id lists and then a list of lists is returned (each prompt + its new
        tokens, up to and including its stop token). Sampling rules, stop tokens (default: the
        config's eos) and pad are the reference's; ``streamer.put(ids)`` receives each step's
        (B,) token ids as a list (and ``streamer.end()`` at the end); a transformers streamer
        (``TextStreamer``, ``TextIteratorStreamer``: any ``BaseStreamer``) is called as HF's
        ``generate`` calls it, the prompts first, then each step's ids, as tensors. ``generator`` seeds
        sampling (eager runs only, ``cuda_graph=False`` or the CPU: with a CUDA graph, seed with
        ``torch.manual_seed``).
        Timings land in :attr:`stats`.
        """
        self._bind_weights()
        prompts, as_lists = self._prompts(input_ids, attention_mask)
        sampling = self._check(prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token_id,
                               generator)
        B = len(prompts)
        streamer = _HFStreamer.wrap(streamer, input_ids, prompts, sampling.pad)
        if streamer is not None and getattr(streamer, "stop", ()) is None:
            streamer.stop = set(sampling.stop)  # a TextStreamer left to take this call's stop tokens
        if max_new_tokens == 0:
            self.stats = GenerationStats(B, sum(len(p) for p in prompts), 0)
            if streamer is not None and hasattr(streamer, "end"):
                streamer.end()
            return [list(p) for p in prompts] if as_lists else input_ids.clone()
        key = (B, sampling.temperature, sampling.top_k, sampling.top_p, sampling.stop, sampling.pad)
        st = self._states.get(key)
        if st is None:
            st = self._states[key] = _State(B, self.device, sampling)
        if not self.cuda_graph:  # (a captured step was chosen with its capture)
            st.fused = self._fused_forced()
        if self.cuda_graph and st.graph is None and max_new_tokens > 1:
            # before prefill: the warm-up writes cache slots. One new token needs no decode step
            # (no graph yet); a capture that failed is tried again, never skipped for eager.
            self._capture(st)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32)
        T = int(lens.max())
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long)

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        st.done.zero_()
        st.seqlens.zero_()
        lens_dev = lens.to(self.device)
        logits = self._forward(tokens.to(self.device), st.seqlens, (lens_dev - 1).long())
        self._advance(st, logits, generator)
        st.seqlens.copy_(lens_dev)
        out = [st.token.clone()]
        reader = _HostReader(out[0])
        host_done, produced = [False] * B, 0
        t1 = None if reader.cuda else time.perf_counter()  # eager CPU: prefill is done here
        for i in range(max_new_tokens):
            # Launch step i + 1 BEFORE waiting for token i: the device never idles on the host.
            launched = len(out) < max_new_tokens
            if launched:
                if st.graph is not None:
                    st.graph.replay()
                else:
                    self._step(st, generator)
                out.append(st.token.clone())
            ids = reader.read()  # token i (its copy was queued before step i + 1)
            if t1 is None:
                t1 = time.perf_counter()  # prefill done (its token is on the host)
            if launched:
                reader.start(out[-1])
            produced += host_done.count(False)  # a finished sequence's pad is no new token
            host_done = [d or (t in sampling.stop) for d, t in zip(host_done, ids)]
            if streamer is not None:
                streamer.put(ids)
            if all(host_done) or not launched:
                break  # a step launched past the end is dropped (it only wrote pad tokens)
        n = i + 1
        sync()
        t2 = time.perf_counter()
        if streamer is not None and hasattr(streamer, "end"):
            streamer.end()
        # decode_s covers every step launched, the dropped one after an early stop included
        steps = len(out) - 1
        self.stats = GenerationStats(B, int(lens.sum()), produced, t1 - t0, t2 - t1, steps, st.graph is not None,
                                     st.fused and steps > 0)
        new = torch.stack(out[:n], dim=1).cpu()
        if not as_lists:
            return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        result = []
        for b, p in enumerate(prompts):
            row = new[b].tolist()
            stops = [j for j, t in enumerate(row) if t in sampling.stop]
            result.append(list(p) + row[: stops[0] + 1 if stops else len(row)])
        return result

    def _prompts(self, input_ids, attention_mask):
        if isinstance(input_ids, torch.Tensor):
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
            mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            if mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; accepted: {tuple(input_ids.shape)}")
            prompts = [row[m].tolist() for row, m in zip(input_ids.cpu(), mask.cpu())]
            return prompts, False
        if attention_mask is not None:
            raise ValueError("attention_mask is only accepted with a (B, T) tensor of input_ids")
        if isinstance(input_ids, (str, bytes)) or any(isinstance(p, (str, bytes)) for p in input_ids):
            raise TypeError("prompts are token ids (a (B, T) tensor or lists of ints), not text: encode the text "
                            "with the tokenizer first")
        return [[int(t) for t in p] for p in input_ids], True

    def _check(self, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_token_id, generator):
        if not prompts:
            raise ValueError("no prompts given")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (an all-padding row was given)")
        if len(prompts) > self.max_batch_size:
            raise ValueError(f"batch of {len(prompts)} prompts; this generator holds at most {self.max_batch_size}")
        longest = max(len(p) for p in prompts)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if longest + max_new_tokens > self.max_seq_len:
            raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the cache "
                             f"capacity max_seq_len={self.max_seq_len}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        check_sampling(temperature, top_k, top_p)
        if generator is not None and self.cuda_graph:
            raise ValueError("generator= is not supported with a CUDA graph (the graph replays the default CUDA "
                             "generator); seed with torch.manual_seed, or build the Generator with cuda_graph=False")
        default_stop, default_pad = default_stop_and_pad(self.model)
        if stop_tokens is None:
            stop_tokens = default_stop
        stop = tuple(sorted(token_id_set(stop_tokens)))
        pad = pad_token_id if pad_token_id is not None else default_pad
        greedy = temperature == 0
        return _Sampling(float(temperature), None if greedy else top_k, None if greedy else top_p, stop, int(pad))


def generate(model, input_ids, max_new_tokens: int = 20, *, cuda_graph: bool | None = None,
             num_splits: int | None = None, fuse_projections: bool = True, fused_decode: bool | None = None,
             **kwargs):
    """One-shot :meth:`Generator.generate` with a cache sized for this call (see there for the
    arguments and return value). Reuse a :class:`Generator` to keep its cache and CUDA graphs."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:  # before sizing a cache from its shape
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        batch, longest = input_ids.shape
    else:
        batch, longest = len(input_ids), max((len(p) for p in input_ids), default=0)
    gen = Generator(model, max(batch, 1), max(longest + max(max_new_tokens, 0), 1), cuda_graph=cuda_graph,
                    num_splits=num_splits, fuse_projections=fuse_projections, fused_decode=fused_decode)
    return gen.generate(input_ids, max_new_tokens, **kwargs)


# ----------------------------------------------------------------------------------------------
# `fastllama generate` (registered in fastllama/cli.py)
# ----------------------------------------------------------------------------------------------
def run_cli(args) -> int:
    """``fastllama generate``: loads the checkpoint and tokenizer, streams the text of one
    prompt to stdout, then prints prefill time and decode tokens/s."""
    import sys

    # every argument checked before the model loads
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_sampling(args.temperature, args.top_k, args.top_p, names=("--temperature", "--top-k", "--top-p"))
    if args.temperature == 0 and (args.top_p is not None or args.top_k is not None):
        print("note: --top-p/--top-k only apply when sampling (--temperature > 0); decoding greedily",
              file=sys.stderr)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device (use --device cpu: the Triton interpreter)")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {args.device!r}: accepted cuda or cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    model = load_checkpoint(args.checkpoint, dtype, device)
    tok = load_tokenizer(args.checkpoint)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens (and the tokenizer adds no BOS): give a non-empty prompt")
    limit = model.config.max_position_embeddings
    if len(ids) + args.max_new_tokens > limit:
        print(f"warning: {len(ids)} prompt tokens + {args.max_new_tokens} new ones pass the model's "
              f"max_position_embeddings ({limit}): the text past it may degrade", file=sys.stderr)
    stop = default_stop_and_pad(model)[0]  # config.json's and generation_config.json's eos ids
    if getattr(tok, "eos_id", -1) >= 0:
        stop.add(tok.eos_id)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        gen = Generator(model, 1, len(ids) + args.max_new_tokens, cuda_graph=False if args.no_cuda_graph else None)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e):
            raise
        raise ValueError(f"no memory for a KV cache of {len(ids) + args.max_new_tokens} tokens "
                         f"(prompt + --max-new-tokens): {str(e).splitlines()[0]}") from None
    streamer = TextStreamer(tok, lambda piece: print(piece, end="", flush=True), prompt=ids)  # (the call's stops)
    print(tok.decode(ids), end="", flush=True)  # the prompt as the model sees it
    gen.generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 stop_tokens=sorted(stop), streamer=streamer)
    s = gen.stats
    graph = "CUDA graph" if s.cuda_graph else ("eager, Triton interpreter" if device.type == "cpu" else "eager")
    if s.new_tokens == 0:
        summary = "no new tokens asked for: nothing run"
    else:
        decode = (f"decode {s.steps} steps in {s.decode_s:.3f} s = {s.decode_tokens_per_s:.2f} tokens/s" if s.steps
                  else "no decode step (the first new token comes from the prefill)")
        summary = f"{s.new_tokens} new tokens; prefill {s.prompt_tokens} tokens in {s.prefill_s:.3f} s; {decode}"
    print(f"\n[{summary} ({graph})]", file=sys.stdout, flush=True)
    return 0
