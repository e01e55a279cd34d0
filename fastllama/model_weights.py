"""What :class:`fastllama.generate.Generator` reads from a model, and how it lays the weights out.

The generator computes a model from its weights, not by calling its modules (except a gateless
MLP's activation, Arcee's ReLU^2 or Apertus's xIELU, which it calls): the reference ``Llama`` and
the transformers causal LMs of ``_HF_CAUSAL_LMS`` (Llama / Mistral / Ministral / Qwen2 / Qwen3 /
SmolLM3 / Phi-3 / Granite / Gemma / Gemma 2 / Gemma 3 / OLMo 2 / OLMo 3 ..., and the mixtures of
experts Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE ..., whose experts hold 3-D weights) share the
attribute names it reads
(``model.layers[i].self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm`` ...; Qwen3's
attention adds ``q_norm``/``k_norm``,
SmolLM3's ``use_rope`` (False: no rotary), Phi-3 merges q/k/v into ``qkv_proj`` and gate/up
into ``gate_up_proj``; Granite adds scalar multipliers, read from its config; Gemma's norms
scale by 1 + w; Gemma 2 adds a norm after each branch and caps its attention scores
(``attn_logit_softcapping``); Gemma 3 has those norms and rotary tables per layer type; OLMo 2/3
norm after each branch only, and their q/k norms span all heads). Here:
which models that computes exactly (:func:`check_model`, :func:`module_problem`), their
rotary tables and default stop tokens, and :class:`RowBlocks`, the one-GEMM layout of the
projections that read the same input.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .reference import functional as ref
from .reference.model import Llama, RMSNorm, default_stop_and_pad

__all__ = ["RowBlocks", "rope_tables", "rope_length_limit", "mlp_of", "shared_experts_of", "layer_shared_mlp",
           "check_model", "module_problem", "grouped_layout_ok", "default_stop_and_pad"]


class RowBlocks:
    """Linears that read the same input, with their weights (and biases) laid out as consecutive
    row blocks of ONE buffer, so that one GEMM computes all their outputs.

    Why: at batch 1 a decode step is a chain of GEMVs, and k_proj/v_proj (512 x 2048 at the
    Llama-3.2-1B shape) are too small to reach the memory bandwidth on their own; one q/k/v GEMV
    and one gate/up GEMV per layer also launch three fewer kernels. (gpt-fast loads its weights
    fused for the same reason.)

    How, without a copy of the weights: the buffer is made once, and each parameter becomes a
    view of its block (``param.data = block``): the same Parameter objects with the same values,
    so the model computes as before, optimizer steps and ``load_state_dict`` (in-place writes)
    land in the buffer, and no second copy is kept (the old tensors are freed unless something
    else holds them; while a group is laid out, its weights exist twice). Parameters that
    already are consecutive blocks of one storage (a second Generator over the same model) are
    adopted as they are.
    :meth:`intact` says whether something re-pointed a parameter since (``param.data = t``,
    ``model.to(...)``); the Generator then lays the weights out again.
    """

    def __init__(self, linears):
        self.linears = list(linears)
        self.sizes = [lin.weight.shape[0] for lin in self.linears]
        self.weight = self._stack([lin.weight for lin in self.linears])
        has_bias = self.linears[0].bias is not None
        self.bias = self._stack([lin.bias for lin in self.linears]) if has_bias else None

    @staticmethod
    def fusable(linears) -> bool:
        """One dtype, device and input size, and all with a bias or all without."""
        kinds = {(lin.weight.dtype, lin.weight.device, lin.weight.shape[1:], lin.bias is not None)
                 for lin in linears}
        return len(kinds) == 1 and all(lin.weight.dim() == 2 for lin in linears)

    @staticmethod
    def _consecutive(params) -> bool:
        """``params`` are contiguous, consecutive row blocks of one storage, in order (checked on
        addresses alone: nothing is viewed or resized)."""
        first = params[0]
        storage = first.untyped_storage()
        row_bytes = first.stride(0) * first.element_size()
        address = first.data_ptr()
        for p in params:
            if (not p.is_contiguous() or p.untyped_storage().data_ptr() != storage.data_ptr()
                    or p.data_ptr() != address or p.shape[1:] != first.shape[1:] or p.dtype != first.dtype):
                return False
            address += p.shape[0] * row_bytes
        return address <= storage.data_ptr() + storage.nbytes()

    @classmethod
    def _stack(cls, params) -> torch.Tensor:
        first = params[0]
        if cls._consecutive(params):  # already laid out (a second Generator): adopt, copy nothing
            rows = sum(p.shape[0] for p in params)
            return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                           (rows, *first.shape[1:]), first.stride())
        buffer = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = buffer[start:start + p.shape[0]]
            start += p.shape[0]
        return buffer

    def intact(self) -> bool:
        """Every parameter is still a view of its block of the buffer."""
        def spans(buffer, params):
            return buffer.data_ptr() == params[0].data_ptr() and self._consecutive(params) and (
                sum(p.shape[0] for p in params) == buffer.shape[0])
        return spans(self.weight, [lin.weight for lin in self.linears]) and (
            self.bias is None or spans(self.bias, [lin.bias for lin in self.linears]))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every linear's output, as column views of one GEMM's output."""
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


# transformers causal LMs whose modules and config the generator reads like the reference's
# (same attribute names: model.layers[i].self_attn.q_proj, mlp.gate_proj, input_layernorm ...).
_HF_CAUSAL_LMS = ("LlamaForCausalLM", "MistralForCausalLM", "MinistralForCausalLM", "Qwen2ForCausalLM",
                  "Qwen3ForCausalLM", "SmolLM3ForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM",
                  "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM",
                  "Olmo3ForCausalLM", "CwmForCausalLM", "SeedOssForCausalLM", "HeliumForCausalLM",
                  "Ernie4_5ForCausalLM", "GlmForCausalLM", "Glm4ForCausalLM", "ArceeForCausalLM",
                  "ApertusForCausalLM", "Exaone4ForCausalLM", "VaultGemmaForCausalLM", "HyperCLOVAXForCausalLM",
                  "Ministral3ForCausalLM", "HunYuanDenseV1ForCausalLM",
                  "OlmoForCausalLM",  # (OLMo (1): its norms are LayerNorms without weights)
                  # mixtures of experts (GraniteMoE's in the layer's block_sparse_moe: mlp_of)
                  "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                  "FlexOlmoForCausalLM", "GraniteMoeForCausalLM", "Dots1ForCausalLM", "Glm4MoeForCausalLM",
                  "HunYuanMoEV1ForCausalLM", "Ernie4_5_MoeForCausalLM", "MellumForCausalLM", "SolarOpenForCausalLM",
                  "MiniMaxM2ForCausalLM", "ExaoneMoeForCausalLM",
                  # attention sinks, experts of HF's other layout (transposed, biased, interleaved, their own gate)
                  "GptOssForCausalLM",
                  # Granite's multipliers; a shared MLP in the layer (input_linear / output_linear);
                  # attention sinks, windows, a rotary module per base (none on some layers)
                  "GraniteMoeSharedForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeSWAForCausalLM",
                  # Llama 4's text model: complex rotary tables, L2 q/k norms after rotary, chunked
                  # attention, q scaled by position on its NoPE layers, every expert's input scaled
                  "Llama4ForCausalLM",
                  # multi-head latent attention (K/V per head expanded from a compressed latent)
                  "DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM", "Glm4MoeLiteForCausalLM", "Mistral4ForCausalLM",
                  "MiniCPM3ForCausalLM")


def rotary_layer_types(model) -> list[str | float] | None:
    """The key of the rotary table each layer reads, for a model whose layers read different
    ones: the layer type, where the rotary module keeps one table per type (Gemma 3:
    "sliding_attention" layers a local base, "full_attention" a global one, scaled); the rotary
    base, where the model keeps one rotary module per base (Granite SWA's ``rotary_embs``, by
    ``layer_rope_theta``; 0.0: the layer has no rotary). None when every layer reads the same table."""
    base = getattr(model, "model", None)
    if not isinstance(model, Llama) and hasattr(base, "rotary_embs") and hasattr(model.config, "layer_rope_theta"):
        return [float(theta) for theta in model.config.layer_rope_theta]
    if isinstance(model, Llama) or not hasattr(getattr(base, "rotary_emb", None), "layer_types"):
        return None
    return list(model.config.layer_types)


def _rotary_of_base(model, theta: float):
    """Granite SWA's rotary module of base ``theta`` (one of ``model.model.rotary_embs``)."""
    for rotary in model.model.rotary_embs:
        if float(rotary.config.rope_parameters["rope_theta"]) == theta:
            return rotary
    raise ValueError(f"{type(model).__name__} has no rotary module of base {theta}")


def rope_tables(model, max_seq_len: int, dtype, device, layer_type: str | float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (max_seq_len, D) exactly as the model computes them (fp32, then cast; Ernie 4.5's
    rotary module keeps them fp32): the reference's ``rope_cos_sin``, or an HF model's own rotary
    module (its rope scaling included), for ``layer_type``'s layers when it keeps a table per type,
    or its module of that base (:func:`rotary_layer_types`)."""
    positions = torch.arange(max_seq_len, device=device)[None]
    if isinstance(model, Llama):
        cos, sin = ref.rope_cos_sin(positions, model.inv_freq, dtype)
    else:
        rotary, by_type = model.model.rotary_emb, () if layer_type is None else (layer_type,)
        if isinstance(layer_type, float):  # (Granite SWA: a module per base)
            rotary, by_type = _rotary_of_base(model, layer_type), ()
        with torch.no_grad():
            x = torch.empty(0, dtype=dtype, device=device)
            # (first one position: a "dynamic" module that a longer sequence grew goes back to its
            # original tables, as HF's next shorter sequence sends it back)
            rotary(x, positions[:, :1], *by_type)
            tables = rotary(x, positions, *by_type)
        # (Llama 4's: complex, cos + i sin, one per pair of adjacent dims, applied in fp32; laid out
        # as the others' cat(freqs, freqs), whose first half the interleaved rotary reads)
        cos, sin = (torch.cat((tables.real, tables.real), -1), torch.cat((tables.imag, tables.imag), -1)) if (
            isinstance(tables, torch.Tensor) and tables.is_complex()) else tables
        from . import forwards

        if forwards._family(model) in forwards.ROTARY_HALF_TABLE_FAMILIES:  # gpt-oss: each frequency once
            cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    return cos[0].contiguous(), sin[0].contiguous()


def rope_length_limit(model, kind: str, layer_type: str | None = None) -> int | None:
    """For a rotary scaling whose tables HF computes anew from the length of the sequence, the
    longest sequence that still gets the original tables (None: the tables are fixed).
    "dynamic" NTK (HF's test: the substring) grows its base past the rotary module's
    ``original_max_seq_len`` (``max_position_embeddings``); "longrope" (Phi-3.5-mini,
    Phi-4-mini) switches from its short to its long factors past
    ``original_max_position_embeddings`` (4096 there)."""
    if "dynamic" in kind:
        return int(model.model.rotary_emb.original_max_seq_len)
    if kind == "longrope":
        params = model.config.rope_parameters
        return int((params if layer_type is None else params[layer_type])["original_max_position_embeddings"])
    return None


def check_model(model, max_seq_len: int | None = None) -> None:
    """The reference Llama, or one of the HF causal LMs of ``_HF_CAUSAL_LMS``, that the decode
    step computes exactly: rotary tables fixed in advance ("dynamic"/"longrope" scaling only up
    to :func:`rope_length_limit`, which ``max_seq_len`` must not pass; partial rotary where the
    family's attention does it: Phi-3, GLM), causal attention (its scores soft-capped or not:
    Gemma 2). (The MLP's activation, SiLU or GELU-tanh for a gated MLP, any un-hooked module for
    a gateless one, is read from the modules: :func:`module_problem`.)"""
    if isinstance(model, Llama):
        return
    cls = type(model)
    if cls.__name__ not in _HF_CAUSAL_LMS or not cls.__module__.startswith("transformers."):
        # (a PEFT wrapper: its adapters must be merged into the weights the generator reads)
        peft = " (a PEFT model: merge its adapters first, model.merge_and_unload())" if hasattr(
            model, "merge_and_unload") else ""
        raise TypeError(f"model must be a fastllama.reference.Llama or a transformers "
                        f"{' / '.join(_HF_CAUSAL_LMS)}, got {cls.__name__}{peft}")
    cfg = model.config
    rope_type = getattr(getattr(model.model, "rotary_emb", None), "rope_type", "default")
    # (Gemma 3: one per layer type)
    for layer_type, kind in rope_type.items() if isinstance(rope_type, dict) else ((None, rope_type),):
        limit = rope_length_limit(model, kind, layer_type)
        if limit is not None and (max_seq_len is None or max_seq_len > limit):
            raise ValueError(f"{cls.__name__} uses rope_type={kind!r}, whose rotary tables HF computes anew for "
                             f"sequences longer than {limit} tokens; the generator precomputes them: max_seq_len "
                             f"must be <= {limit}, got {max_seq_len}")
    if not all(getattr(layer.self_attn, "is_causal", True) for layer in model.model.layers):
        raise ValueError(f"{cls.__name__} has bidirectional attention (use_bidirectional_attention); the generator "
                         f"decodes causally")
    from . import forwards

    rotary_emb = getattr(model.model, "rotary_emb", None)
    # (one table, or one per layer type: Gemma 3's, OLMo 3's "{type}_inv_freq")
    names = [f"{t}_inv_freq" for t in getattr(rotary_emb, "layer_types", ())] or ["inv_freq"]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    partial_ok = forwards._family(model) in forwards.PARTIAL_ROTARY_FAMILIES
    attn = model.model.layers[0].self_attn
    if hasattr(attn, "kv_a_proj_with_mqa"):  # (a latent attention rotates qk_rope_head_dim of each head)
        head_dim, partial_ok = attn.qk_rope_head_dim, False
        _check_latent_attention(cls.__name__, cfg, attn)
    for rotary in (getattr(rotary_emb, name, None) for name in names):
        if rotary is not None and hasattr(attn, "kv_a_proj_with_mqa") and 2 * rotary.numel() != head_dim:
            raise ValueError(f"{cls.__name__} has rotary tables of {2 * rotary.numel()} dims for its attention's "
                             f"qk_rope_head_dim={head_dim} (its config's head_dim sets the tables: HF fails on them "
                             f"too)")
        if rotary is not None and 2 * rotary.numel() < head_dim and not partial_ok:
            # (HF's rope init makes such tables for any family; only Phi-3's attention slices for them)
            raise ValueError(f"{cls.__name__} has rotary tables of {2 * rotary.numel()} of its {head_dim} head dims, "
                             f"which its own attention does not handle (HF fails on them too)")


def _check_latent_attention(name: str, cfg, attn) -> None:
    """A multi-head latent attention within what the generator's kernels take: the latent and
    rotary widths of ``ops.latent_decode_attention`` (decode), a head of q/k or v within flash
    attention's (prefill), and K/V per query head (HF's attention fails with fewer)."""
    from .ops.attention import MAX_HEAD_DIM
    from .ops.latent_decode import MAX_LATENT_DIM, MAX_ROPE_DIM

    limits = (("kv_lora_rank", attn.kv_lora_rank, MAX_LATENT_DIM), ("qk_rope_head_dim", attn.qk_rope_head_dim,
                                                                    MAX_ROPE_DIM),
              ("qk_nope_head_dim + qk_rope_head_dim", attn.qk_head_dim, MAX_HEAD_DIM),
              ("v_head_dim", attn.v_head_dim, MAX_HEAD_DIM))
    for field, value, limit in limits:
        if value > limit:
            raise ValueError(f"{name} has {field} = {value}; the generator's latent attention kernels take at most "
                             f"{limit}")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        raise ValueError(f"{name} has num_key_value_heads={cfg.num_key_value_heads} != num_attention_heads="
                         f"{cfg.num_attention_heads}: its latent attention expands K/V per query head (HF's "
                         f"attention fails on this config too)")


def mlp_of(layer) -> tuple[str, nn.Module]:
    """A decoder layer's MLP and its attribute name: ``mlp``, GraniteMoE's ``block_sparse_moe`` or
    Llama 4's ``feed_forward``."""
    name = next(n for n in ("mlp", "block_sparse_moe", "feed_forward") if hasattr(layer, n))
    return name, getattr(layer, name)


def shared_experts_of(block) -> tuple[str | None, nn.Module | None]:
    """A mixture of experts' always-on MLP and its attribute name: Qwen2-MoE's ``shared_expert``
    (scaled by a sigmoid gate, ``shared_expert_gate``), dots.llm1's, GLM-4.5's and Ernie 4.5
    MoE's ``shared_experts``, HunYuan MoE's ``shared_mlp`` (added as they are); (None, None) when
    the block has none (Ernie 4.5 MoE's attribute may hold None: (name, None))."""
    name = next((n for n in ("shared_expert", "shared_experts", "shared_mlp") if hasattr(block, n)), None)
    return name, getattr(block, name) if name else None


def layer_shared_mlp(layer) -> nn.Module | None:
    """The MLP that a mixture-of-experts decoder layer adds beside its experts block itself (the
    Granite MoE families' ``shared_mlp``: ``input_linear`` to gate and up, ``output_linear``);
    None when it has none (or keeps it in the block: :func:`shared_experts_of`)."""
    return getattr(layer, "shared_mlp", None) if hasattr(layer, "block_sparse_moe") else None


def module_problem(model) -> str | None:
    """Why the weights alone do not compute the model, as its modules are NOW: a projection that
    is not a plain ``nn.Linear`` (a LoRA layer's ``.weight`` is its base weight only; a quantised
    layer has none to read; a forward set on the instance) or that has forward hooks (the
    generator would not run them), nor may the modules it computes itself have any (a decoder
    layer, its attention, its MLP or mixture-of-experts block and shared experts, the base
    model); a norm that is not the model's own RMSNorm class (a subclass with its own forward, a
    LayerNorm); a gated MLP's activation swapped for one that is neither SiLU nor GELU-tanh, or a
    gateless MLP's activation (Arcee's ReLU^2, Apertus's xIELU: the generator calls that module)
    with hooks. None when fine."""
    from . import forwards

    layers = list(enumerate(model.model.layers))
    named = []
    for i, layer in layers:
        groups = [("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj",
                                                  # (a latent attention's: q_proj is None where q is low-rank)
                                                  "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"))]
        part, mlp = mlp_of(layer)
        if hasattr(mlp, "experts"):  # a mixture of experts: its shared experts, Qwen2-MoE's gate of them
            shared, module = shared_experts_of(mlp)
            if module is not None:
                groups.append((f"{part}.{shared}", module, ("gate_proj", "up_proj", "down_proj")))
            groups.append((part, mlp, ("shared_expert_gate",)))
            if layer_shared_mlp(layer) is not None:
                groups.append(("shared_mlp", layer.shared_mlp, ("input_linear", "output_linear")))
        else:  # Phi-3's merged ones, or the others
            groups.append((part, mlp, ("gate_proj", "up_proj", "gate_up_proj", "down_proj")))
        named += [(f"layers.{i}.{part}.{n}", getattr(m, n)) for part, m, names in groups for n in names
                  if getattr(m, n, None) is not None]
    # the modules whose forwards the generator computes itself (it calls none of them): a hook on
    # one would silently not run
    containers = [("model", model.model)]
    for i, layer in layers:
        where, block = mlp_of(layer)
        shared, module = shared_experts_of(block)
        if hasattr(layer.self_attn, "qk_norm"):  # (Llama 4's weightless L2 norm, computed from nothing)
            containers.append((f"layers.{i}.self_attn.qk_norm", layer.self_attn.qk_norm))
        if forwards._family(block) == "llama4" and hasattr(block, "router"):  # (its weight read, not called)
            containers.append((f"layers.{i}.{where}.router", block.router))
        containers += [(f"layers.{i}", layer), (f"layers.{i}.self_attn", layer.self_attn),
                       (f"layers.{i}.{where}", block)] + (
            [(f"layers.{i}.{where}.{shared}", module)] if module is not None else []) + (
            [(f"layers.{i}.shared_mlp", layer.shared_mlp)] if layer_shared_mlp(layer) is not None else [])
    for name, m in containers:
        if m._forward_pre_hooks or m._forward_hooks:
            return f"{name} has forward hooks, which the generator (computing it from its weights) would not run"
    for i, layer in layers:  # (a latent attention's kv_b_proj: its rows are absorbed, HF's have no bias)
        kv_b = getattr(layer.self_attn, "kv_b_proj", None)
        if kv_b is not None and getattr(kv_b, "bias", None) is not None:
            return (f"layers.{i}.self_attn.kv_b_proj has a bias, which the generator's latent attention (its key "
                    f"rows absorbed into q) does not take")
    for name, lin in named + [("lm_head", model.lm_head)]:
        if type(lin) is not nn.Linear or forwards._forward_replaced(lin):
            what = "an nn.Linear with a forward set on the instance" if type(lin) is nn.Linear else f"a {type(lin).__name__}"
            return (f"{name} is {what}, not a plain nn.Linear: merge adapters into the weights "
                    f"first (peft: merge_and_unload())")
        if lin._forward_pre_hooks or lin._forward_hooks:
            return f"{name} has forward hooks, which the generator (reading weights, not calling modules) would skip"
    modeling = sys.modules[type(model).__module__]
    # (OLMo (1)'s: a LayerNorm without weights, OlmoLayerNorm; Llama 4's modules: Llama4Text*)
    from .patching import _HF_FAMILIES

    prefix = _HF_FAMILIES.get(forwards._family(model), type(model).__name__.replace("ForCausalLM", ""))
    rms_norm = RMSNorm if isinstance(model, Llama) else getattr(
        modeling, f"{prefix}RMSNorm", getattr(modeling, f"{prefix}LayerNorm", None))
    norms = [(f"layers.{i}.{n}", getattr(layer, n)) for i, layer in layers
             for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm",
                       "attention_layernorm", "feedforward_layernorm",  # (Apertus's)
                       "post_norm1", "post_norm2")  # (HyperCLOVA X's, nn.Identity when it has none)
             if hasattr(layer, n) and type(getattr(layer, n)) is not nn.Identity] + [("norm", model.model.norm)]
    norms += [(f"layers.{i}.self_attn.{n}", getattr(layer.self_attn, n)) for i, layer in layers
              for n in ("q_norm", "k_norm", "query_layernorm", "key_layernorm",  # (per head: Qwen3's; HunYuan's)
                        "q_a_layernorm", "kv_a_layernorm")  # (a latent attention's low-rank q and latent)
              if getattr(layer.self_attn, n, None) is not None]
    for name, norm in norms:
        replaced = forwards._forward_replaced(norm) and not forwards._patched_with(
            norm, *forwards.NORM_FORWARDS, forwards.olmo_rms_norm_forward)
        if type(norm) is not rms_norm or norm._forward_pre_hooks or norm._forward_hooks or replaced:
            what = ("a hooked " if norm._forward_pre_hooks or norm._forward_hooks
                    else "a forward-replaced " if replaced else "a ")
            return (f"{name} is {what}{type(norm).__name__}, which the generator (computing the model's own "
                    f"RMSNorm from its weight; OLMo's weightless LayerNorm in a captured step) would not run")
    for i, layer in layers:
        where, block = mlp_of(layer)
        experts = getattr(block, "experts", None)
        shared, module = shared_experts_of(block)
        gated = [(where, block)] if experts is None else [(f"{where}.experts", experts)] + (
            [(f"{where}.{shared}", module)] if module is not None else []) + (
            [("shared_mlp", layer.shared_mlp)] if layer_shared_mlp(layer) is not None else [])
        for part, mlp in gated:
            if forwards.gateless(mlp):  # Arcee, Apertus: the generator calls the activation module itself
                act = forwards.mlp_activation(mlp)
                if act._forward_pre_hooks or act._forward_hooks:
                    return (f"layers.{i}.{part}.act_fn has forward hooks, which a captured decode step would not "
                            f"run again")
                continue
            if forwards.gate_activation(mlp) is None:
                name = forwards.mlp_activation_name(mlp)
                return (f"layers.{i}.{part}.{name} is {type(forwards.mlp_activation(mlp)).__name__} (with its forward "
                        f"replaced or hooked, or neither SiLU nor GELU-tanh); the generator computes the gated MLP "
                        f"(SwiGLU or GeGLU) without calling it")
        if experts is not None:
            problem = _experts_problem(experts)
            if problem:
                return f"layers.{i}.{where}.experts: {problem}"
    return None


def grouped_layout_ok(experts) -> bool:
    """Whether the generator computes these experts on torch's grouped matmuls and their own gate
    function (:meth:`fastllama.generate.Generator._experts`), as HF's grouped-matmul experts
    implementation does: the other layouts HF's experts take, which ``ops.moe_experts`` (HF's
    default layout only) does not (gpt-oss's: weights (E, H, 2I) and (E, I, H), biases,
    interleaved gate/up columns, its clamped gate ``_apply_gate``). Not: expert parallelism, a
    norm after each expert, experts without a gate projection."""
    return (hasattr(experts, "gate_up_proj") and getattr(experts, "has_gate", True)
            and not getattr(experts, "_is_expert_parallel", False)
            and not getattr(experts, "has_post_expert_norm", False))


def _experts_problem(experts) -> str | None:
    """Why the generator cannot run a mixture of experts' experts from their weights (None: it
    can): on ``ops.moe_experts``, or in the other layouts :func:`grouped_layout_ok` takes."""
    from . import forwards
    from .ops.experts import grouped_mm_problem

    problem = None if forwards._family(experts) == "llama4" else forwards.experts_layout_problem(experts)
    if problem and not grouped_layout_ok(experts):
        return problem
    if experts._forward_pre_hooks or experts._forward_hooks or (
            forwards._forward_replaced(experts) and not forwards._patched_with(experts, forwards.experts_forward)):
        return "hooked or forward-replaced, which the generator (reading the expert weights) would not run"
    return grouped_mm_problem(experts.down_proj)
