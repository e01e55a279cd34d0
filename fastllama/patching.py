"""``fastllama.patch(model)``: swap fastllama's kernels into a model, per instance, reversibly.

One table, :data:`RULES`, says which module classes get which replacement forward and which
``patch`` option turns it on. Patching sets ``module.forward`` on the instance (the class, other
models and the transformers module are untouched); ``unpatch`` deletes it again, so the class's
own forward runs and outputs are bit-identical to never having patched. Weights are not touched:
``state_dict()`` keys and values stay the same.

Attention in Hugging Face models goes through HF's public extension point: an attention function
and a mask function registered as "fastllama" (``AttentionInterface``/``AttentionMaskInterface``)
and selected with ``model.set_attn_implementation`` — a per-model setting.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import types
import weakref
from typing import Callable

import torch.nn as nn

from . import forwards, latent_attention

__all__ = ["patch", "unpatch", "patch_summary", "is_patched", "RULES", "SUPPORTED"]

log = logging.getLogger("fastllama")

OPTIONS = ("rms_norm", "rope", "swiglu", "attention", "cross_entropy")
# transformers family (its modeling module) -> the class name prefix of its modules. Gemma's
# norms ((1 + w), rounded once) have a rule of their own below, and so have Gemma 2/3's decoder
# layers (four norms); OLMo 2/3's norms (w, rounded once) too, and their decoder layers (a norm
# after each branch, none before) run as they are, with the patched modules inside.
_HF_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "ministral": "Ministral", "qwen2": "Qwen2", "qwen3": "Qwen3",
                "smollm3": "SmolLM3", "phi3": "Phi3", "granite": "Granite", "gemma": "Gemma", "gemma2": "Gemma2",
                "gemma3": "Gemma3", "olmo2": "Olmo2", "olmo3": "Olmo3",
                # Llama's modules as they are (Arcee's MLP, ReLU^2 without a gate, is skipped by its check;
                # CWM's window per layer type is Qwen2's)
                "arcee": "Arcee", "cwm": "Cwm",
                # with small rules: _OWN_DECODER_LAYERS below, forwards.ROTARY_INTERLEAVED_FAMILIES,
                # and the per-family lines in forwards (LOGITS_MULTIPLIED, uses_rope, residual_dropout ...)
                "helium": "Helium", "ernie4_5": "Ernie4_5", "glm": "Glm", "glm4": "Glm4", "seed_oss": "SeedOss",
                "hunyuan_v1_dense": "HunYuanDenseV1", "apertus": "Apertus", "exaone4": "Exaone4",
                "hyperclovax": "HyperCLOVAX", "vaultgemma": "VaultGemma", "bitnet": "BitNet",
                "ministral3": "Ministral3", "olmo": "Olmo", "qwen3_5": "Qwen3_5", "qwen3_next": "Qwen3Next",
                # mixtures of experts: all but the router (HF's own)
                "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe",
                "granitemoe": "GraniteMoe", "dots1": "Dots1", "flex_olmo": "FlexOlmo", "minimax": "MiniMax",
                "glm4_moe": "Glm4Moe", "hunyuan_v1_moe": "HunYuanMoEV1",
                "ernie4_5_moe": "Ernie4_5_Moe", "mellum": "Mellum", "solar_open": "SolarOpen",
                "minimax_m2": "MiniMaxM2", "exaone_moe": "ExaoneMoe",
                # attention sinks in the attention kernels; the experts (a clamped SwiGLU of interleaved
                # gate/up columns, with biases) and the router stay HF's
                "gpt_oss": "GptOss",
                # Granite's layers with a shared MLP of other names (input_linear / output_linear) beside
                # GraniteMoE's experts; attention sinks, windows and a rotary base per layer (0: none)
                "granitemoeshared": "GraniteMoeShared", "granite_swa": "GraniteSWA", "granitemoe_swa": "GraniteMoeSWA",
                # Llama 4's text model (its modules are Llama4Text*, its causal LM Llama4ForCausalLM: _CAUSAL_LMS):
                # chunked attention, whose masks the kernels serve; its attention (complex rotary, L2 q/k
                # norms, temperature tuning) and routed experts (every expert on every token) stay HF's
                "llama4": "Llama4Text",
                # DeepSeek-V3's multi-head latent attention (its module as it is; v heads narrower than
                # q/k's, padded for the kernels), its experts on the kernels, router HF's
                "deepseek_v3": "DeepseekV3", "deepseek_v2": "DeepseekV2", "glm4_moe_lite": "Glm4MoeLite",
                "mistral4": "Mistral4", "minicpm3": "MiniCPM3"}
# the causal LM class of a family whose modules' prefix is not its own
_CAUSAL_LMS = {"llama4": "Llama4ForCausalLM"}
# norms that scale by (1 + w) in fp32 and round once (fastllama.generate reads this and _OLMO too)
_GEMMA = ("gemma", "gemma2", "gemma3", "vaultgemma", "qwen3_5", "qwen3_next")
_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "dots1", "flex_olmo", "minimax", "glm4_moe",
        "hunyuan_v1_moe", "ernie4_5_moe", "qwen3_next", "mellum", "solar_open", "minimax_m2", "exaone_moe",
        "granitemoeshared", "granitemoe_swa", "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4")
# norms that multiply by w in fp32 and round once (Helium's: (w.float() * normed).to(dtype))
_OLMO = ("olmo2", "olmo3", "flex_olmo", "helium", "gpt_oss")
_LLAMA_NORMS = tuple(m for m in _HF_FAMILIES if m not in (*_GEMMA, *_OLMO))  # families whose RMSNorm is Llama's
# attention modules that run as they are, on the attention kernels through HF's interface (their
# norms patched): Qwen 3.5's and Qwen3-Next's gate their output with half of their q_proj (and
# their other layers are Gated DeltaNet, not attention); Llama 4's rotates with complex tables,
# then L2-norms q and k, or scales q by its position where it has no rotary; DeepSeek-V3's (and
# the other multi-head latent attention models') expands its compressed latent K/V
_OWN_ATTENTION = ("qwen3_5", "qwen3_next", "llama4", "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4",
                  "minicpm3")
# decoder layers that run as they are (the patched modules inside): norms named otherwise (Apertus),
# a norm after each branch (EXAONE 4: OLMo 2's layout; GLM-4 and HyperCLOVAX: before and after),
# no `mlp` (GraniteMoE's block_sparse_moe), an MLP that returns a tuple (gpt-oss's experts, with
# their router's scores), and every layer of an attention of _OWN_ATTENTION (the patched layer
# folds the input norm into q/k/v_proj, which those do not have); VaultGemma's (two norms,
# Gemma's) has no rule either
_OWN_DECODER_LAYERS = ("apertus", "exaone4", "glm4", "hyperclovax", "granitemoe", "minimax", "gpt_oss",
                       "granitemoeshared", "granitemoe_swa", *_OWN_ATTENTION)
_LLAMA_LAYERS = tuple(m for m in (*_LLAMA_NORMS, "gemma", "helium") if m not in _OWN_DECODER_LAYERS)
# multi-head latent attention: HF's forward as it is, its decode steps over the cached latents
# (fastllama.latent_attention)
_LATENT_ATTENTION = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4", "minicpm3")


def _hf(kind: str, families=tuple(_HF_FAMILIES)) -> tuple[str, ...]:
    return tuple(f"transformers.models.{m}.modeling_{m}."
                 f"{_CAUSAL_LMS[m] if kind == 'ForCausalLM' and m in _CAUSAL_LMS else _HF_FAMILIES[m] + kind}"
                 for m in families)


def _ref(name: str) -> tuple[str, ...]:
    return (f"fastllama.reference.model.{name}",)


# ---------------------------------------------------------------------------------------------
# Checks: why a module cannot be patched (None: it can)
# ---------------------------------------------------------------------------------------------
def _check_activation(module) -> str | None:
    """Why the MLP's gate cannot run fused (None: it can): SiLU (SwiGLU) or GELU-tanh (GeGLU),
    as its activation module is (:func:`forwards.gate_activation`), on a gate projection (Arcee's
    and Apertus's MLPs have none: down(act(up(x))))."""
    if forwards.gateless(module):
        return "the MLP has no gate projection (down(act(up(x)))): left as is"
    if forwards.gate_activation(module) is None:
        name = forwards.mlp_activation_name(module)
        return (f"{name} is {type(forwards.mlp_activation(module)).__name__}, not a plain SiLU or GELU-tanh (the fused "
                f"gated activation needs one, with no forward set on its instance and no hooks)")
    return None


def _check_experts(module) -> str | None:
    """Why a mixture of experts cannot run on ``ops.moe_experts`` (None: it can): the layout it
    computes is HF's default one (gate-up weights (E, 2I, H) gate first, down (E, H, I), no
    biases, act(gate) * up, no norm after the experts, not split across devices)."""
    return forwards.experts_layout_problem(module) or _check_activation(module)


def _check_head_dim(module) -> str | None:
    d = module.head_dim if hasattr(module, "head_dim") else module.qk_head_dim  # (DeepSeek-V3's: q/k's)
    if not 1 <= d <= 256 or d % 2:
        return f"head_dim={d} is not supported (attention and rotary kernels take even head_dim <= 256)"
    if getattr(module, "v_head_dim", d) > d:
        return f"v_head_dim={module.v_head_dim} is above q/k's head dim {d} (the kernels pad v's up to it, not q's)"
    return None



def _check_latent_attention(module) -> str | None:
    """Why a multi-head latent attention's decode steps cannot run over its cached latents (None:
    they can): the latent kernel's widths, and HF's cache of latents (``expand_kv``)."""
    if not hasattr(_original_class(module), "expand_kv"):
        return ("this transformers version's latent attention has no expand_kv (it caches expanded heads): "
                "left as is, on the attention kernels")
    from .ops.latent_decode import MAX_LATENT_DIM, MAX_ROPE_DIM

    if module.kv_lora_rank > MAX_LATENT_DIM or module.qk_rope_head_dim > MAX_ROPE_DIM:
        return (f"kv_lora_rank={module.kv_lora_rank} / qk_rope_head_dim={module.qk_rope_head_dim} are past the latent "
                f"decode kernel's {MAX_LATENT_DIM} / {MAX_ROPE_DIM}: left as is, on the attention kernels")
    return _check_attention_kernels(module)  # (the model's attention stays HF's: so does this module)


def _check_attention_kernels(module) -> str | None:
    """Why the model's attention cannot run on the flash/decode kernels (None: it can)."""
    return _check_head_dim(module)


def _check_lm_head(module) -> str | None:
    head = getattr(module, "lm_head", None)
    if not forwards._plain_linear(head):
        what = "an nn.Linear with a forward set on the instance" if type(head) is nn.Linear else type(head).__name__
        return f"lm_head is {what}, not a plain nn.Linear (e.g. LoRA on the head): loss left as is"
    return None


@dataclasses.dataclass(frozen=True)
class Rule:
    """Module classes (by qualified name) -> replacement forward, enabled by ``options``
    (any of them on enables the rule; the forward reads which ones are on)."""

    options: tuple[str, ...]
    classes: tuple[str, ...]
    forward: Callable
    check: Callable | None = None


RULES: tuple[Rule, ...] = (
    Rule(("rms_norm",), _hf("RMSNorm", _LLAMA_NORMS) + _ref("RMSNorm"), forwards.rms_norm_forward),
    Rule(("rms_norm",), _hf("RMSNorm", _GEMMA), forwards.gemma_rms_norm_forward),
    Rule(("rms_norm",), _hf("RMSNorm", _OLMO), forwards.olmo_rms_norm_forward),
    Rule(("rms_norm",), _hf("DecoderLayer", _LLAMA_LAYERS), forwards.hf_decoder_layer_forward),
    Rule(("rms_norm",), _hf("DecoderLayer", ("gemma2", "gemma3")), forwards.gemma3_decoder_layer_forward),
    Rule(("rms_norm",), _ref("DecoderLayer"), forwards.reference_decoder_layer_forward),
    # (gpt-oss's MLP is its mixture of experts, which stays HF's: see _HF_FAMILIES)
    Rule(("swiglu",), _hf("MLP", tuple(m for m in _HF_FAMILIES if m != "gpt_oss")) + _ref("MLP"), forwards.mlp_forward,
         _check_activation),
    Rule(("swiglu",), _hf("Experts", _MOE), forwards.experts_forward, _check_experts),
    Rule(("rope",), _hf("Attention", tuple(m for m in _HF_FAMILIES if m not in _OWN_ATTENTION)),
         forwards.hf_attention_forward, _check_head_dim),
    Rule(("rope", "attention"), _ref("Attention"), forwards.reference_attention_forward, _check_head_dim),
    Rule(("attention",), _hf("Attention", _LATENT_ATTENTION), latent_attention.latent_attention_forward,
         _check_latent_attention),
    Rule(("cross_entropy",), _hf("ForCausalLM"), forwards.hf_causal_lm_forward, _check_lm_head),
    Rule(("cross_entropy",), _ref("Llama"), forwards.reference_llama_forward, _check_lm_head),
)

#: Classes ``patch`` knows, by qualified name.
SUPPORTED: tuple[str, ...] = tuple(sorted({c for r in RULES for c in r.classes}))


def _original_class(module) -> type:
    """The module's own class, seen through FSDP2: ``fully_shard`` swaps in a subclass
    ``FSDP<Class>(FSDPModule, Class)``, whose name no rule knows."""
    cls = type(module)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None and issubclass(cls, fsdp):
        cls = next(c for c in cls.__mro__ if not issubclass(c, fsdp))
    return cls


def _qualname(module) -> str:
    cls = _original_class(module)
    return f"{cls.__module__}.{cls.__name__}"


def _attention_owner(model: nn.Module):
    """The HF model whose attention implementation ``patch`` sets: ``model`` itself, or the one
    inside a wrapper that is not an HF model (DDP's ``.module``); None for the reference model.
    The method is looked up on the class: PEFT's and torch.compile's wrappers forward unknown
    attributes to the model they wrap, and the state must not sit on the wrapper (merge_and_unload
    or unpatch of the inner model would not find it)."""
    for m in model.modules():
        if hasattr(type(m), "set_attn_implementation") and hasattr(getattr(m, "config", None), "_attn_implementation"):
            return m
    return None


@dataclasses.dataclass
class _State:
    summary: list[tuple[str, str, str, str]]  # (module name, class, what, status / reason)
    options: dict
    attn_before: str | None = None
    # the HF model whose attention implementation patch set (what unpatch restores, whatever
    # model it is given: patch(m.model) then unpatch(m) must reach m.model, not m)
    attention_owner: nn.Module | None = dataclasses.field(default=None, repr=False)

    def __setstate__(self, state: dict) -> None:
        # Unpickled in another process (torch.load, a spawned worker): the "fastllama" attention
        # and mask functions its model names must be registered with transformers there too.
        self.__dict__.update(state)
        if self.attn_before is not None:
            _register_hf_attention()


# A patched model carries its _State as an instance attribute (not a parameter or buffer, so not in
# its state_dict): a deepcopy or pickle of the model, whose patched forwards come along, is then
# a patched model too, which unpatch can restore. It sits on the innermost model, not on a
# wrapper that may have been passed (DDP, PEFT), and is looked up below whatever is passed, so
# patch(model) then unpatch(DDP(model)) works, and so does patch(ddp) then unpatch(ddp.module).
_STATE_ATTR = "_fastllama_patch"

# HF models whose attention patch() set to "fastllama". The implementation is a field of the
# model's config, which two models can share (LlamaForCausalLM(other.config)): unpatching one
# leaves it alone while another patched model still uses that config.
_ATTENTION_PATCHED: weakref.WeakSet = weakref.WeakSet()


def _state_holder(model: nn.Module) -> nn.Module:
    """Where ``patch`` keeps its state: the outermost HF model, else the reference Llama, inside
    ``model`` (``model`` itself when it is one)."""
    from .reference import Llama

    owner = _attention_owner(model)
    if owner is not None:
        return owner
    return next((m for m in model.modules() if isinstance(m, Llama)), model)


def _state(model: nn.Module) -> _State | None:
    return next((m.__dict__[_STATE_ATTR] for m in model.modules() if _STATE_ATTR in m.__dict__), None)


def _check_wrappers(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if type(m).__name__ in ("FullyShardedDataParallel", "FlatParameter") or hasattr(m, "_fsdp_wrapped_module"):
            raise TypeError(
                f"module {name or '<root>'} is wrapped by FSDP1 (FullyShardedDataParallel), whose flattened "
                "parameters fastllama cannot see through: call fastllama.patch(model) BEFORE wrapping "
                "(or use FSDP2's fully_shard, which patched models support)"
            )


# Where a patched module's forward goes: ``forwards.forward_attr`` (inside accelerate's hook when
# the module has one). It is a functools.partial of the rule's function, so it pickles (a bound
# method of a function the class does not own pickles as a getattr of the module: fails on load).
def _installed_at(module) -> str | None:
    """The instance attribute holding fastllama's forward, itself or inside wrappers added since
    (accelerate's mixed precision wraps a model's forward; ``__wrapped__`` leads back); None: not
    patched."""
    patched = module.__dict__.get("_fastllama")
    for attr in ("forward", "_old_forward"):
        f = module.__dict__.get(attr)
        for _ in range(16):  # a chain of wrappers, never a cycle
            if patched is None or f is None:
                break
            if isinstance(f, functools.partial) and f.func is patched["forward"]:
                return attr
            f = getattr(f, "__wrapped__", None) or getattr(f, "__func__", None)
    return None


def _install_original(module, attr: str) -> None:
    """Puts the class's own forward back where fastllama's was (with any wrapper added around
    it since: it wrapped the patched forward, so it goes too)."""
    if attr == "forward":
        del module.__dict__["forward"]
    else:  # what accelerate had saved: the class forward, bound
        module.__dict__[attr] = types.MethodType(_original_class(module).forward, module)


def _original_rope(module):
    modeling = sys.modules.get(_original_class(module).__module__)
    fn = getattr(modeling, "apply_rotary_pos_emb", None)
    if fn is None:
        from .reference import functional

        fn = functional.apply_rotary_pos_emb
    return fn


def _register_hf_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register("fastllama", forwards.hf_attention_function)
    AttentionMaskInterface.register("fastllama", forwards.hf_attention_mask)
    from transformers import masking_utils

    # (once: transformers' function is kept, and the wrapper answers only for patched calls; a
    # wrapper someone put over it since keeps calling it, and is not taken for transformers')
    if not forwards._HF_FIND_PACKED:
        forwards._HF_FIND_PACKED[:] = [masking_utils.find_packed_sequence_indices]
        masking_utils.find_packed_sequence_indices = forwards.find_packed_sequence_indices


def patch(model: nn.Module, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
          attention: bool = True, cross_entropy: bool = True, deterministic: bool = True,
          check_labels: bool = True, verbose: bool = False) -> nn.Module:
    """Swaps fastllama's kernels into ``model`` (this instance only) and returns it.

    Supported: transformers' ``LlamaForCausalLM``/``LlamaModel``, ``MistralForCausalLM``,
    ``MinistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``SmolLM3ForCausalLM``,
    ``Phi3ForCausalLM``, ``GraniteForCausalLM``, ``GemmaForCausalLM``, ``Gemma2ForCausalLM`` (its
    attention score soft-capping in the attention kernels), ``Gemma3ForCausalLM``, ``Olmo2ForCausalLM``,
    ``Olmo3ForCausalLM``, the mixtures of experts ``MixtralForCausalLM``, ``Qwen2MoeForCausalLM``,
    ``Qwen3MoeForCausalLM``, ``OlmoeForCausalLM`` (the experts on ``ops.moe_experts``; the routers
    stay HF's; the loss adds the router's balancing loss as HF's does), and the families that reuse
    those modules: Arcee, CWM, Helium, Ernie 4.5, GLM, GLM-4 (their rotary of adjacent pairs included),
    Seed-OSS, HunYuan dense, Apertus, EXAONE 4, HyperCLOVA X, VaultGemma, BitNet, Ministral 3,
    OLMo (its weightless LayerNorms left as they are), GraniteMoE, dots.llm1, GLM-4.5 (``glm4_moe``:
    dots.llm1's experts, partial rotary, optional q/k norms), HunYuan MoE (HunYuan's attention, a
    shared MLP beside the experts), Ernie 4.5 MoE (Ernie 4.5's attention), Mellum, Solar Open,
    MiniMax-M2 (partial rotary, q/k norms over all heads), EXAONE MoE (EXAONE 4's attention),
    gpt-oss (its attention sinks in the attention kernels; its experts and router stay HF's),
    DeepSeek-V3, DeepSeek-V2, GLM-4.7-Flash (``glm4_moe_lite``), Mistral 4 and MiniCPM3 (their
    multi-head latent attention modules as they are, on the attention kernels; their decode steps
    over the cached latents with ``ops.latent_decode_attention``: :mod:`fastllama.latent_attention`),
    GraniteMoeShared (a shared MLP of other names beside the experts), Granite SWA and GraniteMoE
    SWA (attention sinks, windows, a rotary base per layer, none on some), Llama 4's text model
    (``Llama4ForCausalLM``: its chunked attention on the kernels; its attention module and routed
    experts left as they are),
    FlexOlmo, MiniMax (its lightning-attention layers left as they are), Qwen 3.5's text model and
    Qwen3-Next (norms, MLP or experts, loss and the attention kernels; their gated attention and
    Gated DeltaNet modules left as they are); an MLP without a gate (Arcee's, Apertus's) is left as
    is. All also inside a PEFT wrapper, and ``fastllama.reference.Llama``. One table of them all:
    docs/models.md.
    Patch before wrapping for DDP or FSDP2 (``fully_shard``); both
    also work when patched after wrapping. Each keyword turns one kernel family on or off. Idempotent: patching again re-applies with the new
    options. A module that cannot take a kernel (say, an unsupported head_dim) is skipped and the
    reason recorded; :func:`patch_summary` prints what happened (``verbose=True`` prints it now,
    and it is always logged at INFO on the "fastllama" logger). In training, a decoder layer whose
    projections are plain ``nn.Linear``s without hooks runs each norm together with the linears
    after it, and the SwiGLU with down_proj (``ops.rms_norm_linear``/``ops.swiglu_linear``: same
    math, the norm output and the SwiGLU output recomputed in backward rather than kept).
    ``deterministic=False`` lets the attention backward add dQ with atomics, as SDPA's flash
    backend does (fp16/bf16: fewer matmuls, gradients vary in their last bits run to run; see
    :func:`fastllama.ops.flash_attention`). ``check_labels=False`` skips the fused loss's check
    that every label is in [0, V) or ignored, one host sync per forward (see
    :func:`fastllama.ops.linear_cross_entropy`): for tuned loops whose labels are known good (an
    out-of-range label then gives a NaN loss and NaN gradients, not an error).

    Attention is switched through HF's ``set_attn_implementation``, a field of the config: a model
    built on the same config object (``LlamaForCausalLM(model.config)``) uses it too. Modules
    that accelerate hooked (``device_map``, offload) keep their hooks: the kernels run inside them.

    Raises:
        TypeError: ``model`` contains nothing fastllama knows how to patch (the message lists the
            supported classes), or it is wrapped by FSDP1 (patch before wrapping).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_wrappers(model)
    for flag, value in (("deterministic", deterministic), ("check_labels", check_labels)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {type(value).__name__}")
    if _state(model) is not None:
        unpatch(model)
    options = dict(rms_norm=rms_norm, rope=rope, swiglu=swiglu, attention=attention, cross_entropy=cross_entropy,
                   deterministic=deterministic, check_labels=check_labels)
    by_class = {c: r for r in RULES for c in r.classes}
    summary, matched = [], 0
    for name, module in model.named_modules():
        rule = by_class.get(_qualname(module))
        if rule is None:
            continue
        matched += 1
        what = "/".join(rule.options)
        if not any(options[o] for o in rule.options):
            summary.append((name, type(module).__name__, what, "off"))
            continue
        reason = rule.check(module) if rule.check else None
        if _installed_at(module) is None and forwards._forward_replaced(module):
            # a forward set on the instance (a hand edit, an adapter, or a wrapper: accelerate's
            # mixed-precision autocast, torch.compile of the method): overwriting it would drop
            # what it does, and unpatch would then delete it
            reason = ("a forward is set on this instance (edited by hand, or wrapped, e.g. by accelerate's "
                      "mixed precision or torch.compile: patch before wrapping): left as is")
        if reason:
            summary.append((name, type(module).__name__, what, f"skipped: {reason}"))
            continue
        module._fastllama = dict(options, original_rope=_original_rope(module), forward=rule.forward)
        module.__dict__[forwards.forward_attr(module)] = functools.partial(rule.forward, module)
        summary.append((name, type(module).__name__, what, "patched"))
    if not matched:
        # (a few families, not the 60-odd of them nor the 200-odd classes: the docs and SUPPORTED list those)
        raise TypeError(f"{type(model).__name__} has no module fastllama can patch; supported: the "
                        f"{len(_HF_FAMILIES)} transformers families of docs/models.md (llama, mistral, qwen2, qwen3, "
                        f"gemma3, phi3, olmo2, mixtral, gpt_oss, deepseek_v3, ...: fastllama.patching._HF_FAMILIES) "
                        f"and fastllama.reference (classes: fastllama.patching.SUPPORTED)")
    state = _State(summary, options)
    owner = _attention_owner(model)
    if attention and owner is not None:
        config = owner.config
        hf_attention = [m for m in model.modules() if _qualname(m) in _hf("Attention")]
        reasons = {_check_attention_kernels(m) for m in hf_attention} - {None}
        if reasons:
            summary.append(("<model>", type(model).__name__, "attention", f"skipped: {reasons.pop()}"))
        else:
            _register_hf_attention()
            # "fastllama" already: a config shared with a patched model; what that one found is
            # what this one restores (each unpatch leaves the config alone while the other
            # still uses it, so the last one restores it)
            state.attn_before = config._attn_implementation
            if state.attn_before == "fastllama":
                found = [st.attn_before for o in _ATTENTION_PATCHED
                         if o.config is config and (st := _state(o)) is not None and st.attn_before]
                state.attn_before = found[0] if found else "sdpa"
            owner.set_attn_implementation("fastllama")
            _ATTENTION_PATCHED.add(owner)
            state.attention_owner = owner
            for m in hf_attention:  # what forwards.hf_attention_function reads (with or without rope)
                m._fastllama_attention = {"deterministic": deterministic, "eager": state.attn_before == "eager"}
            summary.append(("<model>", type(model).__name__, "attention", f"patched (was {state.attn_before!r})"))
    _state_holder(model).__dict__[_STATE_ATTR] = state
    log.info("fastllama.patch:\n%s", patch_summary(model))
    if verbose:
        print(patch_summary(model))
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restores every original forward (and attention implementation) of a patched model (also
    through a wrapper added before or after patching)."""
    # every patch found below model (patch(m), then patch(m.model, ...): two), outermost first
    states = [m.__dict__[_STATE_ATTR] for m in model.modules() if _STATE_ATTR in m.__dict__]
    for module in model.modules():
        module.__dict__.pop(_STATE_ATTR, None)
        attr = _installed_at(module)
        if attr is not None:
            _install_original(module, attr)
        module.__dict__.pop("_fastllama", None)
        module.__dict__.pop("_fastllama_attention", None)
    # (a state pickled before it recorded its owner: the owner found below model, as then)
    owners = [(st, st.attention_owner if st.attention_owner is not None else _attention_owner(model))
              for st in states if st.attn_before is not None]
    owners = [(st, owner) for st, owner in owners if owner is not None]
    for _, owner in owners:
        _ATTENTION_PATCHED.discard(owner)
    for st, owner in owners:
        # unless the user chose another implementation since, or a patched model shares the config
        shared = any(other.config is owner.config for other in _ATTENTION_PATCHED)
        if owner.config._attn_implementation == "fastllama" and not shared:
            owner.set_attn_implementation(st.attn_before)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``patch`` was applied to this instance (and not undone)."""
    return _state(model) is not None


def patch_summary(model: nn.Module) -> str:
    """A table of what ``patch`` did to ``model``: module, class, kernel, status or skip reason."""
    state = _state(model)
    if state is None:
        return f"{type(model).__name__} is not patched"
    rows = state.summary
    w = max(len(r[0]) for r in rows) + 2 if rows else 10
    c = max(len(r[1]) for r in rows) + 2 if rows else 10
    lines = [f"{'module':<{w}}{'class':<{c}}{'kernel':<28}status", "-" * (w + c + 40)]
    lines += [f"{r[0] or '<root>':<{w}}{r[1]:<{c}}{r[2]:<28}{r[3]}" for r in rows]
    counts = {}
    for r in rows:
        key = r[3].split(":")[0].split(" (")[0]
        counts[key] = counts.get(key, 0) + 1
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)
