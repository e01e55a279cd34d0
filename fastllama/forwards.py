"""The forwards that :func:`fastllama.patch` puts on module instances.

Each replaces one module class's ``forward`` with the same signature and semantics, computing
with fastllama ops. Hugging Face's Llama, Mistral, Ministral, Qwen2, Qwen3, SmolLM3, Phi-3 and
Granite modules share one set (their modeling files are copies of each other; Qwen3's attention
adds an RMSNorm of q and k per head, SmolLM3's skips rotary in every 4th layer; Phi-3 merges
q/k/v into one ``qkv_proj`` and gate/up into one ``gate_up_proj``, and puts a dropout on each
residual branch; Granite scales the embeddings, each residual branch and the logits, and sets
the attention scale), and so do Gemma 3's attention, MLP (GeGLU), norms ((1 + w), rounded once)
and causal LM (final logit soft-capping), with a decoder layer of its own (four norms); the
reference model has its own, smaller set.
``self._fastllama`` holds the patch options of the module (which parts are on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading

import torch

from . import latent_attention, ops
from .attention import attend, attend_as_eager, attend_with_weights, eager_blind_rows, masked_op, masked_op_serves
from .ops.rms_norm import wide_weight
from .reference import functional as ref
from .reference.model import shift_labels


# ---------------------------------------------------------------------------------------------
# Shared by HF and the reference model
# ---------------------------------------------------------------------------------------------
def _promote(*tensors):
    """The tensors in their common (promoted) dtype, None passed through.

    Under ``torch.autocast`` activations are bf16/fp16 while norm weights and the residual
    stream stay fp32; the kernels take one dtype, so the narrower tensors are cast up (autograd
    flows through the cast). This matches HF's output dtype (``fp32 weight * bf16 normed``
    promotes to fp32) and keeps the residual stream in fp32 as HF does.
    """
    dtypes = [t.dtype for t in tensors if t is not None]
    dtype = dtypes[0]
    for d in dtypes[1:]:
        dtype = torch.promote_types(dtype, d)
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)


def _matmul_dtype(hidden, weight):
    """The dtype the LM head matmul runs in: autocast's when it is on (as ``nn.Linear`` would)."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _unit_last_stride(x):
    """The kernels read rows with unit stride; a module may be handed a transposed view (Gemma 3's
    image-token norm is): that one input is copied, as HF's ops would read it anyway."""
    return x if x.stride(-1) == 1 else x.contiguous()


def norm_eps(norm) -> float:
    """An HF RMSNorm's epsilon: ``variance_epsilon`` (Llama's), or ``eps`` (Gemma's; Llama 4's
    in transformers before 5.2x)."""
    return norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps


def rms_norm_forward(self, hidden_states):
    """``LlamaRMSNorm.forward``: one fused kernel."""
    x, w = _promote(_unit_last_stride(hidden_states), self.weight)
    return ops.rms_norm(x, w, norm_eps(self))


def _single_rounding_weight(weight, x):
    """The weight of a norm that rounds once (Gemma's, OLMo's), as its kernel takes it: an fp32
    weight under fp16/bf16 activations as it is (autocast over fp32 weights: HF multiplies by
    ``weight.float()``, and its gradient stays fp32), any other in x's dtype."""
    return weight if wide_weight(x, weight) else weight.to(x.dtype)


def gemma_rms_norm_forward(self, hidden_states):
    """``Gemma3RMSNorm.forward``: ``(normed * (1 + w)).type_as(x)`` in one kernel (the output
    keeps x's dtype, as HF's ``type_as``)."""
    x = _unit_last_stride(hidden_states)
    return ops.rms_norm(x, _single_rounding_weight(self.weight, x), self.eps, unit_offset=True)


def olmo_rms_norm_forward(self, hidden_states):
    """``Olmo2RMSNorm.forward`` (OLMo 2 and 3): ``(w * normed).to(x.dtype)``, rounded once, in one
    kernel (the output keeps x's dtype, as HF's ``.to(input_dtype)``)."""
    x = _unit_last_stride(hidden_states)
    return ops.rms_norm(x, _single_rounding_weight(self.weight, x), norm_eps(self), round_once=True)


# the patched norms a decoder layer fuses with the residual add or the projections after them
# (OLMo's norms follow their branches: nothing to fuse)
NORM_FORWARDS = (rms_norm_forward, gemma_rms_norm_forward)


def _norm_args(norm, *tensors):
    """(``tensors`` in the norm's computing dtype, its weight, eps, unit_offset) for a norm
    patched with one of ``NORM_FORWARDS``: Llama's promotes to the widest dtype (HF's
    ``weight * normed`` does), Gemma's keeps the activations' dtype (HF's ``type_as``)."""
    if _patched_with(norm, gemma_rms_norm_forward):
        tensors = _promote(*tensors)  # (a residual stream wider than h: their sum is)
        return (*tensors, _single_rounding_weight(norm.weight, tensors[0]), norm.eps, True)
    *tensors, w = _promote(*tensors, norm.weight)
    return (*tensors, w, norm_eps(norm), False)


def _fused_residual_norm(norm, h, residual):
    """``norm(h + residual), h + residual`` in one kernel; as a call of ``norm`` when hooks
    manage it (they may move or load its weight: accelerate's offload, FSDP2) or when it is not
    an RMSNorm fastllama patched (a subclass with its own forward, another norm)."""
    if not (_bypassable(norm) and _patched_with(norm, *NORM_FORWARDS)):
        s = residual + h
        return norm(s), s
    h, residual, w, eps, unit_offset = _norm_args(norm, h, residual)
    return ops.rms_norm(h, w, eps, residual=residual, unit_offset=unit_offset)


def _lm_head_loss(hidden, lm_head, labels, num_items_in_batch=None, ignore_index=-100, softcap=None,
                  check_labels=True):
    """The fused LM head + cross-entropy, run as a call of ``lm_head`` when the head has hooks
    (forward or backward, its own or global: a backward hook then sees the loss's gradient, the
    output of that call).

    A fused loss must not read ``lm_head.weight`` from outside the head's forward when hooks
    manage that weight: under FSDP2 (``fully_shard(lm_head)``, or ``fully_shard([embed_tokens,
    lm_head])`` for tied weights) the head's forward hooks all-gather the sharded weight before
    use, reshard it after, and arrange the backward all-gather and gradient reduce-scatter; read
    from outside, the weight is this rank's shard only (Liger-Kernel issues 332, 767). So when the
    head has hooks, the loss runs as its forward for one call, inside every hook
    (FSDP2's, mixed-precision casts, user hooks). Without hooks, ``lm_head(h)`` would just run
    ``forward``, so the loss is computed directly: same op, same tensors, and nothing for
    ``torch.compile`` to trace through.
    """

    def loss_forward(h):
        weight = lm_head.weight  # read inside the call: the unsharded weight under FSDP2
        dtype = _matmul_dtype(h, weight)
        bias = lm_head.bias.to(dtype) if lm_head.bias is not None else None
        loss = ops.linear_cross_entropy(h.to(dtype), weight.to(dtype), labels, ignore_index=ignore_index,
                                        bias=bias, num_items_in_batch=num_items_in_batch, softcap=softcap,
                                        check_labels=check_labels)
        # HF Trainer scales the loss in place (``loss *= num_processes``): on the op's own output
        # FSDP2 would lose the head's pre-backward hook, so the caller gets a copy (one scalar).
        return loss.clone()

    if _bypassable(lm_head):
        return loss_forward(hidden)
    return _call_with_forward(lm_head, loss_forward, hidden)


@torch.compiler.disable  # dynamo cannot trace the swap (and FSDP2's hooks run eagerly anyway)
def _call_with_forward(module, forward, x):
    """``module(x)`` with ``forward`` as the instance's forward for this one call (inside
    accelerate's hook when it has one: its wrapper calls ``_old_forward``)."""
    attr = forward_attr(module)
    own_forward = module.__dict__.get(attr)  # someone else's per-instance forward, if any
    module.__dict__[attr] = forward
    try:
        return module(x)
    finally:
        if own_forward is None:
            del module.__dict__[attr]
        else:
            module.__dict__[attr] = own_forward


# ---------------------------------------------------------------------------------------------
# Where each family keeps its projections (Phi-3 merges them)
# ---------------------------------------------------------------------------------------------
def attention_input_linears(attn) -> tuple:
    """The linears that read the attention's input: ``(q_proj, k_proj, v_proj)``, or Phi-3's
    merged ``(qkv_proj,)``."""
    return (attn.qkv_proj,) if hasattr(attn, "qkv_proj") else (attn.q_proj, attn.k_proj, attn.v_proj)


def split_qkv(attn, outputs) -> tuple:
    """q, k, v from the outputs of :func:`attention_input_linears` (column views of Phi-3's
    merged projection: q's heads first, then k's, then v's, as HF's Phi-3 slices it)."""
    if len(outputs) == 3:
        return tuple(outputs)
    q_size = attn.config.num_attention_heads * attn.head_dim
    kv_size = attn.config.num_key_value_heads * attn.head_dim
    return outputs[0].split([q_size, kv_size, kv_size], dim=-1)


def mlp_input_linears(mlp) -> tuple:
    """The linears that read the MLP's input: ``(gate_proj, up_proj)``, or Phi-3's merged
    ``(gate_up_proj,)`` (gate's rows first), or the Granite MoE families' shared MLP's
    ``(input_linear,)`` (laid out as Phi-3's)."""
    if hasattr(mlp, "input_linear"):
        return (mlp.input_linear,)
    return (mlp.gate_up_proj,) if hasattr(mlp, "gate_up_proj") else (mlp.gate_proj, mlp.up_proj)


def gateless(mlp) -> bool:
    """Whether the MLP is ``down(act(up(x)))`` with no gate (Arcee's ReLU^2, Apertus's xIELU)."""
    return hasattr(mlp, "up_proj") and not hasattr(mlp, "gate_proj") and not hasattr(mlp, "gate_up_proj")


def mlp_activation(mlp):
    """The MLP's activation module: ``act_fn`` (Llama ...), ``activation_fn`` (Phi-3) or
    ``activation`` (the Granite MoE families' shared MLP); None for the reference MLP, which has
    none (SiLU)."""
    name = mlp_activation_name(mlp)
    return None if name is None else getattr(mlp, name)


def mlp_activation_name(mlp) -> str | None:
    """The attribute :func:`mlp_activation` reads (None: there is none)."""
    return next((n for n in ("act_fn", "activation_fn", "activation") if hasattr(mlp, n)), None)


def gate_activation(mlp) -> str | None:
    """The fused kernel's ``activation`` for the MLP's gate as it is NOW, not what the config
    says (a swapped activation must not be fused): "silu" for HF's ``act_fn`` ``SiLUActivation``
    or ``nn.SiLU`` (``hidden_act="silu"``/``"swish"``; Phi-3's ``activation_fn``) and for the
    reference MLP, which has none; "gelu_tanh" for ``GELUTanh`` (Gemma's
    ``gelu_pytorch_tanh``); None for anything else, or an activation with a forward set on its
    instance or hooks (the fused kernel never calls it)."""
    act = mlp_activation(mlp)
    if act is None:
        return "silu"
    if _forward_replaced(act) or not _bypassable(act):
        return None
    if type(act) is torch.nn.SiLU:
        return "silu"
    if type(act).__module__ == "transformers.activations":
        return {"SiLUActivation": "silu", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}.get(
            type(act).__name__)
    return None


def mlp_forward(self, x):
    """``LlamaMLP.forward`` (and Phi-3's, whose gate and up are one ``gate_up_proj``; Gemma's,
    GeGLU): the projections stay nn.Linear (LoRA keeps working), the gated activation fused.
    An activation swapped for another after patching runs the original forward."""
    activation = gate_activation(self)
    if activation is None:
        return type(self).forward(self, x)
    if hasattr(self, "gate_up_proj"):  # Phi-3: the halves are read in place (no split copy)
        return self.down_proj(ops.swiglu_fused(self.gate_up_proj(x), activation=activation))
    if hasattr(self, "input_linear"):  # Granite's shared MLP: Phi-3's layout under other names
        return self.output_linear(ops.swiglu_fused(self.input_linear(x), activation=activation))
    h = ops.swiglu(self.gate_proj(x), self.up_proj(x), activation=activation)
    if hasattr(self, "ffn_sub_norm"):  # BitNet: an RMSNorm of the gated activation, before down_proj
        h = self.ffn_sub_norm(h)
    return residual_dropout(self, self.down_proj(h))


def residual_dropout(module, h):
    """Seed-OSS's ``residual_dropout``: its attention drops out its output (after o_proj) and its
    MLP its own (after down_proj), in training; called as HF calls it (same draws, same order)."""
    p = getattr(module, "residual_dropout", None)
    return h if p is None else torch.nn.functional.dropout(h, p=p, training=module.training)


def experts_layout_problem(experts) -> str | None:
    """Why an HF experts module is not the layout ``ops.moe_experts`` computes (None: it is)."""
    from transformers.integrations import moe

    from .patching import _original_class

    if getattr(_original_class(experts), "_apply_gate", moe._default_apply_gate) is not moe._default_apply_gate:
        return "the experts have a gate function of their own (not act(gate) * up): left as is"
    for flag, why in (("is_transposed", "transposed expert weights"), ("has_bias", "expert biases"),
                      ("has_post_expert_norm", "a norm after each expert"),
                      ("_is_expert_parallel", "expert parallelism")):
        if getattr(experts, flag, False):
            return f"{why}: left as is"
    if not getattr(experts, "is_concatenated", True):
        return "interleaved gate/up expert weights: left as is"
    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        return "the experts have no gate-up projection: left as is"
    return None


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``MixtralExperts.forward`` (Qwen2/3-MoE's, OLMoE's) on ``ops.moe_experts``: grouped matmuls
    with the gated activation fused, keeping one (S, 2I) tensor for backward. HF's own forward
    (its ``experts_implementation``) runs where torch's grouped matmul cannot (a GPU before sm_80,
    rows that are not 16-byte multiples) or the module changed since patching."""
    activation = gate_activation(self)
    if activation is None or experts_layout_problem(self) or ops.experts.grouped_mm_problem(self.down_proj):
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    return ops.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                           activation=activation)


# ---------------------------------------------------------------------------------------------
# Norms and activations folded into the linears around them (activation memory)
# ---------------------------------------------------------------------------------------------
def _bypassable(*modules) -> bool:
    """Whether calling these modules can be replaced by computing with their parameters: no
    forward or backward hooks on them (FSDP2 units, user hooks) and none global."""
    from torch.nn.modules import module as nn_module

    if (nn_module._global_forward_pre_hooks or nn_module._global_forward_hooks
            or nn_module._global_backward_pre_hooks or nn_module._global_backward_hooks):
        return False
    # (accelerate's hooks, ``_hf_hook``, wrap the instance's forward instead: device moves, offload)
    return not any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks
                   or "_hf_hook" in m.__dict__ for m in modules)


def _forward_replaced(module) -> bool:
    """Whether an instance attribute replaces the class's forward (``lin.forward = adapter``, a
    hand-made LoRA): then reading the module's parameters leaves the replacement out. Accelerate's
    hook wrapper around the class's own forward (``_old_forward``) is not a replacement."""
    f = module.__dict__.get(forward_attr(module))
    return f is not None and not (getattr(f, "__func__", None) is type(module).forward
                                  and getattr(f, "__self__", None) is module)


def _plain_linear(head) -> bool:
    """The fused loss reads the head's weight (and bias): only an nn.Linear's are all it computes
    with. ``patch`` checks this, and so does each call: a LoRA added to the head after patching
    (PEFT swaps in its own Linear, or a forward set on the instance) would otherwise be left out of
    the loss, with no gradient."""
    from .patching import _original_class

    return _original_class(head) is torch.nn.Linear and not _forward_replaced(head)


#: Where the forward hooks come from that leave a module's output alone: FSDP2 reshards after
#: the forward, DeepSpeed ZeRO-3 releases the gathered weights, torch's module tracker (under
#: ``FlopCounterMode``, a global hook) records which module runs.
OUTPUT_AGNOSTIC_HOOK_MODULES = ("torch.distributed.", "deepspeed.", "torch.utils.module_tracker")


def output_agnostic(hook):
    """Marks a forward hook as one that neither reads nor changes the module's output (a timer, a
    memory recorder): on ``lm_head`` it then leaves the fused loss on, and sees the loss as the
    head's output. Returns the hook to register, a function (any callable, a bound method or a
    ``functools.partial`` too): ``lm_head.register_forward_hook(output_agnostic(fn))``."""
    @functools.wraps(hook)
    def marked(*args, **kwargs):
        return hook(*args, **kwargs)

    marked._fastllama_output_agnostic = True
    return marked


def _output_hooked(module) -> bool:
    """Whether a forward hook (the module's own or a global one) other than those of
    :data:`OUTPUT_AGNOSTIC_HOOK_MODULES` or one marked :func:`output_agnostic` sees the module's
    output: a hook on the LM head that reads or changes the logits (a temperature, a logit lens,
    a vocabulary mask) would get the fused loss instead, and what it returned would become the
    loss. Such heads run HF's path, logits and all."""
    from torch.nn.modules import module as nn_module

    def managed(hook) -> bool:
        if getattr(hook, "_fastllama_output_agnostic", False):
            return True
        hook = getattr(hook, "func", hook)  # (functools.partial)
        return (getattr(hook, "__module__", None) or "").startswith(OUTPUT_AGNOSTIC_HOOK_MODULES)

    hooks = (*module._forward_hooks.values(), *nn_module._global_forward_hooks.values())
    return not all(managed(h) for h in hooks)


def _fusable_head(head) -> bool:
    """Whether the fused linear cross-entropy computes what calling ``head`` and the loss would."""
    return _plain_linear(head) and not _output_hooked(head)


def forward_attr(module) -> str:
    """The instance attribute a per-instance forward goes in: ``forward``, or for a module that
    accelerate hooked (``device_map``, offload: ``add_hook_to_module``) ``_old_forward``, which
    accelerate's own instance ``forward`` calls inside its hook (input moves, offloaded weights)."""
    return "_old_forward" if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__ else "forward"


def _patched_with(module, *forwards) -> bool:
    """Whether fastllama's forward for one of ``forwards`` is what ``module`` runs now (not
    replaced or wrapped since: then its parameters are not read directly)."""
    f = module.__dict__.get(forward_attr(module))
    return getattr(f, "func", None) in forwards and f.args[:1] == (module,)


def _plain_linears(*modules) -> bool:
    """Plain ``nn.Linear`` (not LoRA, not a quantised or FSDP2-sharded subclass, no forward set on
    the instance), no hooks."""
    return (all(type(m) is torch.nn.Linear and not _forward_replaced(m) for m in modules)
            and _bypassable(*modules))


def _norm_into_attention(layer) -> bool:
    """Whether the decoder layer can hand its input_layernorm to the attention, which then runs
    the norm and q/k/v_proj as one node (``ops.rms_norm_linear``)."""
    attn, norm = layer.self_attn, layer.input_layernorm
    return (_patched_with(norm, *NORM_FORWARDS)
            and _patched_with(attn, hf_attention_forward, reference_attention_forward)
            and _bypassable(norm, attn) and _plain_linears(*attention_input_linears(attn)))


def _norm_into_mlp(layer, norm=None) -> bool:
    """Whether ``norm`` (default post_attention_layernorm; Gemma's pre_feedforward_layernorm) +
    the MLP can run as ``rms_norm_linear`` (gate, up) and ``swiglu_linear`` (down)."""
    mlp, norm = layer.mlp, norm if norm is not None else layer.post_attention_layernorm
    if hasattr(mlp, "ffn_sub_norm") or (getattr(mlp, "residual_dropout", 0) and mlp.training):
        return False  # (BitNet's norm before down_proj, Seed-OSS's dropout after it: the MLP's forward runs)
    return (_patched_with(norm, *NORM_FORWARDS) and _patched_with(mlp, mlp_forward)
            and gate_activation(mlp) is not None and _bypassable(norm, mlp)
            and _plain_linears(*mlp_input_linears(mlp), mlp.down_proj))


def _norm_projections(norm, x, projections, residual=None):
    """``[p(norm(x)) for p in projections]`` (and ``x + residual`` when given) via
    ``ops.rms_norm_linear``: the normalised x is recomputed in the backward, not kept."""
    x, residual, w, eps, unit_offset = _norm_args(norm, x, residual)
    return ops.rms_norm_linear(x, w, [p.weight for p in projections], [p.bias for p in projections],
                               eps=eps, residual=residual, unit_offset=unit_offset)


def _residual_norm_mlp(norm, mlp, h, residual):
    """``(mlp(norm(h + residual)), h + residual)`` keeping, per token, the norm's input and the
    gate and up projections only (not the normalised input, not the SwiGLU output)."""
    *projected, s = _norm_projections(norm, h, mlp_input_linears(mlp), residual)
    gate, up = projected if len(projected) == 2 else projected[0].chunk(2, dim=-1)
    return ops.swiglu_linear(gate, up, mlp.down_proj.weight, mlp.down_proj.bias, activation=gate_activation(mlp)), s


def _rotate(self, q, k, cos, sin):
    if _family(self) in ROTARY_HALF_TABLE_FAMILIES and 2 * cos.shape[-1] == q.shape[-1]:
        cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # (B, T, D / 2) -> rotate_half's tables
    # A rotary dim below head_dim is partial rotary, which the op does as Phi-3's
    # apply_rotary_pos_emb does (Phi-4-mini). The other families' functions rotate the whole head
    # and fail on such tables (HF's rope init honours partial_rotary_factor for any family): their
    # own function runs then, so the patched model fails as HF's does, not differently.
    partial_ok = cos.shape[-1] == q.shape[-1] or _family(self) in PARTIAL_ROTARY_FAMILIES
    if self._fastllama["rope"] and partial_ok and cos.shape[-1] <= q.shape[-1] and cos.shape[-1] % 2 == 0:
        # under autocast q/k come out of the projections in bf16/fp16 while cos/sin follow the
        # fp32 embeddings; rotating in q's dtype is what an autocast-aware fused op does (except
        # Ernie 4.5's: its tables stay fp32 and its rotary computes in fp32, as the kernel does)
        if _family(self) not in ROTARY_FP32_FAMILIES:
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        return ops.apply_rotary_pos_emb(q, k, cos, sin, interleaved=_family(self) in ROTARY_INTERLEAVED_FAMILIES)
    return self._fastllama["original_rope"](q, k, cos, sin)


#: HF families (modeling module names) whose apply_rotary_pos_emb rotates the leading rotary
#: dims only when cos/sin cover fewer than head_dim (the others' would fail on such tables).
PARTIAL_ROTARY_FAMILIES = ("phi3", "glm", "glm4", "glm4_moe", "minimax_m2")

#: HF families whose rotary rotates adjacent pairs (2i, 2i + 1) (GLM's rotate_half, cos/sin
#: repeat_interleave'd): the op's ``interleaved=True``.
ROTARY_INTERLEAVED_FAMILIES = ("helium", "ernie4_5", "ernie4_5_moe", "glm", "glm4",
                               "llama4")  # (Llama 4's complex rotary: the generator's; patch keeps its attention)

#: HF families whose rotary tables hold each frequency once, (B, T, D / 2), and whose rotary turns
#: the two halves of the head by them (gpt-oss's ``_apply_rotary_emb``): rotate_half's rotation
#: with the tables repeated, which the op gets.
ROTARY_HALF_TABLE_FAMILIES = ("gpt_oss",)

#: HF families whose rotary embedding keeps cos/sin in fp32 and whose apply_rotary_pos_emb rotates
#: in fp32 whatever q's dtype (rounding once): the kernel gets the fp32 tables as they are.
ROTARY_FP32_FAMILIES = ("ernie4_5", "ernie4_5_moe")


def uses_rope(attn) -> bool:
    """Whether an HF attention module rotates q and k: not SmolLM3's NoPE layers (``use_rope``),
    nor EXAONE 4's (and EXAONE MoE's) full-attention layers in a model with a window (it rotates
    the windowed ones only), nor Granite SWA's (and GraniteMoE SWA's) layers whose rotary base
    ``layer_rope_theta`` is 0 (HF passes them no tables)."""
    if not getattr(attn, "use_rope", True):
        return False
    if _family(attn) in ("exaone4", "exaone_moe"):
        return attn.sliding_window is None or attn.is_sliding
    if _family(attn) in ("granite_swa", "granitemoe_swa"):  # a rotary base per layer, 0 for none
        return bool(attn.config.layer_rope_theta[attn.layer_idx])
    return True


def _family(module) -> str:
    """The transformers family of a module ("phi3" for ``...models.phi3.modeling_phi3``), or
    its module path when it is not a transformers model (the reference model)."""
    from .patching import _original_class  # (FSDP2 renames the class; its module stays HF's)

    name = _original_class(module).__module__
    return name.rsplit(".modeling_", 1)[-1] if ".modeling_" in name else name


# ---------------------------------------------------------------------------------------------
# Hugging Face (Llama, Mistral, Ministral, Qwen2, Qwen3, SmolLM3, Phi-3, Granite, Gemma 1/2/3, OLMo 2/3,
# and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)
# ---------------------------------------------------------------------------------------------
def hf_attention_function(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          sliding_window=None, is_causal=None, **kwargs):
    """Registered with HF's ``AttentionInterface`` as "fastllama": HF's calling convention,
    q (B, Hq, Tq, D) and un-repeated k/v (B, Hk, Tk, D) in, ``(out (B, Tq, Hq, D), None)`` out.
    For a patched multi-head latent attention, k/v may be stand-ins for its cached latents
    (:mod:`fastllama.latent_attention`): a decode step attends over those, else they are expanded."""
    options = getattr(module, "_fastllama_attention", {})
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    latents = latent_attention.take_latents(module, key)
    if latents is not None:
        out = latent_attention.attend_latent(module, query, latents, attention_mask, scaling, dropout, causal, kwargs,
                                             options)
        if out is not None:
            return out, None
        key, value = latents.expand(module)
    softcap = kwargs.get("softcap")  # Gemma 2's attn_logit_softcapping
    sinks = kwargs.get("s_aux")  # gpt-oss's attention sinks, one score per head
    # HF's sliding window W lets query p see keys p - W < k <= p
    window = (sliding_window - 1, 0) if sliding_window else None
    sinks_after = sinks is not None and _family(module) in SINKS_AFTER_SOFTMAX
    # Left padding as eager has it. With sinks, eager's rows that see no key are 0 too (the sink
    # takes them), and only Granite SWA's probabilities differ (uniform): recomputed when asked for.
    eager_mask = options.get("eager") and attention_mask is not None and (
        sinks is None or sinks_after and kwargs.get("output_attentions"))
    if eager_mask and torch.compiler.is_compiling():  # the mask can only be read when the graph runs
        if dropout == 0 and not kwargs.get("output_attentions") and attention_mask.dtype == torch.bool and \
                sinks is None and masked_op_serves(query, key, value):
            out = masked_op(query, key, value, attention_mask, causal=causal, scale=scaling, window=window,
                            deterministic=options.get("deterministic", True), softcap=softcap, eager_blind=True)
            return out.transpose(1, 2).contiguous(), None
        out, weights = attend_as_eager(query, key, value, attention_mask, scale=scaling, dropout=dropout,
                                       softcap=softcap, sinks=sinks, sinks_after=sinks_after,
                                       reason="a model that ran eager attention, with a mask, under torch.compile")
        return out.transpose(1, 2).contiguous(), weights if kwargs.get("output_attentions") else None
    weights = None
    if kwargs.get("output_attentions"):  # the probabilities are asked for: plain PyTorch (counted)
        out, weights = attend_with_weights(query, key, value, attention_mask, causal=causal, scale=scaling,
                                           window=window, dropout=dropout, softcap=softcap, sinks=sinks,
                                           sinks_after=sinks_after)
    else:
        out = attend(query, key, value, attention_mask, causal=causal, scale=scaling, window=window,
                     dropout=dropout, deterministic=options.get("deterministic", True), softcap=softcap, sinks=sinks)
    if eager_mask:
        out, weights = eager_blind_rows(out, query, key, value, attention_mask, scale=scaling, dropout=dropout,
                                        softcap=softcap, weights=weights, sinks=sinks, sinks_after=sinks_after)
    return out.transpose(1, 2).contiguous(), weights


def hf_attention_mask(**kwargs):
    """Registered with HF's ``AttentionMaskInterface`` as "fastllama": HF's ``sdpa_mask``, except
    that plain causal attention without a padding mask gives None also while torch.compile traces.

    ``sdpa_mask`` returns None (no mask: causal attention, which :func:`attend` serves with flash
    attention) when there is no padding and q_length == 1, q_length == kv_length, or the cache is
    empty. transformers before 5.24 (5.17 on the GPU machines), and 5.24 under torch < 2.14,
    never skip while dynamo traces: they build the (B, 1, Tq, Tk) mask, whose inspection in
    :func:`attend` is data-dependent and breaks the graph. Without a padding mask (and with an
    int offset) the decision reads shapes only, so it is made here, under tracing too; the cases
    are exactly those of HF's own ``_ignore_causal_mask_sdpa`` with ``padding_mask=None``.
    (HF stops skipping under ``torch.export`` because SDPA's ``is_causal`` aligns top-left and
    would be baked into the graph; :func:`attend` aligns bottom-right and reads Tq/Tk at run
    time, so an exported graph stays right.)
    """
    from transformers.masking_utils import sdpa_mask

    q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
    q_offset, local_size = kwargs.get("q_offset", 0), kwargs.get("local_size")
    if (kwargs.get("attention_mask") is None and kwargs.get("allow_is_causal_skip", True)
            and isinstance(q_length, int) and isinstance(kv_length, int) and isinstance(q_offset, int)
            and (local_size is None or kv_length < local_size)
            and (q_length == 1 or kv_length == q_length or q_offset == 0)):
        return None
    return sdpa_mask(**kwargs)


#: HF families with attention sinks whose eager attention returns the keys' softmax as it was
#: before the sink's share is taken off (it scales the output by sigmoid(lse - sink) instead; the
#: output is the same): what ``output_attentions`` gives for them. gpt-oss's drops the sink's
#: column of one softmax over keys and sink.
SINKS_AFTER_SOFTMAX = ("granite_swa", "granitemoe_swa")

# HF families whose attention passes the config's sliding_window (see _family)
_WINDOW_FROM_CONFIG = ("mistral", "phi3", "mixtral", "olmoe", "ministral3", "minimax")


def qk_norm_over_all_heads(attn) -> bool:
    """Whether the attention's q/k RMSNorms (``q_norm``/``k_norm``) normalise the whole projection
    (OLMo 2/3: a weight of heads x head_dim), not each head (Qwen3, Gemma 3: head_dim)."""
    return hasattr(attn, "q_norm") and attn.q_norm.weight.shape[-1] != attn.head_dim


def sliding_window(attn) -> int | None:
    """The ``sliding_window`` an HF attention module's own forward passes (query p sees keys
    p - W < k <= p), None for full attention: Qwen2's, Ministral's, SmolLM3's and Gemma 3's per
    layer type (their ``self.sliding_window``), Mistral's and Phi-3's from the config; Llama
    passes none (a sliding_window a Llama config carries is ignored by HF)."""
    if hasattr(attn, "sliding_window"):  # (EXAONE 4 keeps the config's on every layer, uses it where is_sliding)
        return attn.sliding_window if getattr(attn, "is_sliding", True) else None
    if _family(attn) in _WINDOW_FROM_CONFIG:
        return getattr(attn.config, "sliding_window", None)
    return None


def score_softcap(attn) -> float | None:
    """The soft-cap an HF attention module's own forward applies to its scores: Gemma 2's
    ``attn_logit_softcapping``, None otherwise. (Gemma 3's attention stores the config's value
    too but never applies it: a cap there would make the logits differ from HF's.)"""
    return getattr(attn, "attn_logit_softcapping", None) if _family(attn) in ("gemma2", "vaultgemma") else None


def hf_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    """``LlamaAttention.forward`` (and the other families') with fastllama's rotary kernel.

    The attention itself goes through the model's attention interface, which ``patch`` points at
    :func:`hf_attention_function` when attention is patched.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    norm = kwargs.pop("fastllama_norm", None)  # set by the patched decoder layer: hidden_states is not normed yet
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    linears = attention_input_linears(self)
    if norm is not None:
        projected = _norm_projections(norm, hidden_states, linears)
    else:
        projected = [lin(hidden_states) for lin in linears]
    q, k, v = split_qkv(self, projected)
    over_all_heads = qk_norm_over_all_heads(self)
    if over_all_heads:  # OLMo 2/3, OLMoE: an RMSNorm over the whole q and k projections
        q, k = self.q_norm(q), self.k_norm(k)
    clip = getattr(self.config, "clip_qkv", None)
    if clip is not None:  # OLMoE's option: q, k, v clamped to [-clip, clip] (after the norms)
        q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
    q, k, v = (t.view(hidden_shape) for t in (q, k, v))
    if hasattr(self, "q_norm") and not over_all_heads:  # Qwen3, Gemma 3: over each head
        q, k = self.q_norm(q), self.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if uses_rope(self):  # SmolLM3's NoPE layers (every 4th) have no rotary
        cos, sin = position_embeddings
        q, k = _rotate(self, q, k, cos, sin)
    from .patching import _original_class  # (FSDP2 renames the class; its module stays HF's)

    modeling = sys.modules[_original_class(self).__module__]
    if hasattr(self, "query_layernorm"):  # HunYuan: an RMSNorm of each head's q and k AFTER rotary
        q, k = self.query_layernorm(q), self.key_layernorm(k)
    if _family(self) == "ministral3":  # Ministral 3: q scaled by Llama 4's position-dependent factor
        rope = self.config.rope_parameters
        scale = modeling.get_llama_4_attn_scale(kwargs["position_ids"], rope.get("llama_4_scaling_beta"),
                                                rope.get("original_max_position_embeddings"))
        q = q * scale.to(q.dtype)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, modeling.eager_attention_forward)
    window = sliding_window(self)
    if window is not None or hasattr(self, "sliding_window"):
        kwargs["sliding_window"] = window
    softcap = score_softcap(self)
    if softcap is not None:
        kwargs["softcap"] = softcap
    if getattr(self, "sinks", None) is not None:  # gpt-oss: attention sinks, passed as its own forward does
        kwargs["s_aux"] = self.sinks
    out, weights = attention_interface(
        self, q, k, v, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling, **kwargs,
    )
    out = out.reshape(*input_shape, -1).contiguous()
    if hasattr(self, "attn_sub_norm"):  # BitNet: an RMSNorm before o_proj
        out = self.attn_sub_norm(out)
    return residual_dropout(self, self.o_proj(out)), weights


def _attention_and_mlp(layer, hidden_states, attention_kwargs, attention_out, mlp_norm):
    """The body a decoder layer shares: input_layernorm and attention (the norm folded into
    q/k/v_proj when they are plain linears), ``attention_out`` applied to the attention's output
    (the branch as added to the residual stream), then ``mlp_norm`` of the sum with the MLP
    after it (folded into gate/up_proj, else fused with the residual add). Returns (mlp
    output, the residual stream before the MLP)."""
    residual = hidden_states
    if _norm_into_attention(layer):
        h, attention_kwargs["fastllama_norm"] = hidden_states, layer.input_layernorm
    else:
        h = layer.input_layernorm(hidden_states)
    h, _ = layer.self_attn(hidden_states=h, **attention_kwargs)
    h = attention_out(h)
    if _norm_into_mlp(layer, mlp_norm):
        return _residual_norm_mlp(mlp_norm, layer.mlp, h, residual)
    h, residual = _fused_residual_norm(mlp_norm, h, residual)
    return layer.mlp(h), residual


@functools.cache
def _layer_class_checkpointing_in_forward():
    """transformers' ``GradientCheckpointingLayer`` when it checkpoints in the CLASS's ``forward``
    (5.2x), else None: up to 5.1x it checkpoints in ``__call__``, which still wraps the instance
    forward ``patch`` installs. (Asked once, not on every layer call.)"""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return None
    return None if "__call__" in vars(GradientCheckpointingLayer) else GradientCheckpointingLayer


def _checkpoints_itself(layer) -> bool:
    """Whether a patched HF decoder layer must run its own gradient checkpointing: the instance
    forward shadows a class ``forward`` that checkpoints (without this,
    ``gradient_checkpointing_enable()`` on a patched model kept every activation, silently)."""
    base = _layer_class_checkpointing_in_forward()
    return (base is not None and isinstance(layer, base) and layer.gradient_checkpointing and layer.training
            and torch.is_grad_enabled())


def _checkpointable(forward):
    """A patched decoder layer's forward, checkpointed as HF's class wrapper does it when
    :func:`_checkpoints_itself`: the inputs kept, the layer recomputed in backward, and no cache
    (a recompute would write it twice)."""
    @functools.wraps(forward)
    def layer_forward(self, *args, **kwargs):
        if not _checkpoints_itself(self):
            return forward(self, *args, **kwargs)
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if not getattr(self, "_can_checkpoint_with_cache", False):
            for name in ("cache", "past_key_values", "layer_past"):
                if kwargs.get(name) is not None:
                    kwargs[name] = None
        return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
    return layer_forward


@_checkpointable
def hf_decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                             use_cache=False, position_embeddings=None, **kwargs):
    """``LlamaDecoderLayer.forward`` (and Phi-3's, with its residual dropouts) with the residual
    add fused into the second RMSNorm, and each norm folded into the projections after it when
    they are plain linears (see ``ops.fused_linear``: same math, less memory kept for backward)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    attention_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=use_cache,
                            position_embeddings=position_embeddings, **kwargs)
    out, residual = _attention_and_mlp(self, hidden_states, attention_kwargs,
                                       lambda h: _residual_branch(self, "resid_attn_dropout", h),
                                       self.post_attention_layernorm)
    return residual + _residual_branch(self, "resid_mlp_dropout", out)


@_checkpointable
def gemma3_decoder_layer_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                                 position_ids=None, cache=None, **kwargs):
    """``Gemma3DecoderLayer.forward`` (and Gemma 2's): four norms, each branch normed before it is added::

        s = x + post_attention_norm(attention(input_norm(x)))
        out = s + post_feedforward_norm(mlp(pre_feedforward_norm(s)))

    input_norm runs with q/k/v_proj and pre_feedforward_norm (with the add before it) with
    gate/up_proj as one node each when the projections are plain linears, as in
    :func:`hf_decoder_layer_forward`; the two post-branch norms are kernels of their own."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    attention_kwargs = dict(position_embeddings=position_embeddings, attention_mask=attention_mask,
                            position_ids=position_ids, cache=cache, **kwargs)
    out, residual = _attention_and_mlp(self, hidden_states, attention_kwargs, self.post_attention_layernorm,
                                       self.pre_feedforward_layernorm)
    return residual + self.post_feedforward_layernorm(out)


def _residual_branch(layer, dropout_name: str, h):
    """What a branch adds to the residual stream: ``h``, after Phi-3's dropout (``resid_pdrop``)
    and times Granite's ``residual_multiplier``. The dropout module is called as HF calls it
    unless it is a plain ``nn.Dropout`` without hooks that drops nothing (eval, or p = 0: an
    identity that would still cost a kernel in training); a module put in its place, or hooked,
    always runs."""
    dropout = getattr(layer, dropout_name, None)
    if dropout is not None and (type(dropout) is not torch.nn.Dropout or not _bypassable(dropout)
                                or (dropout.training and dropout.p > 0)):
        h = dropout(h)
    multiplier = getattr(layer, "residual_multiplier", 1.0)
    return h if multiplier == 1.0 else h * multiplier


_CACHE_NAME: str | None = None


def _hf_cache_name() -> str:
    """The keyword / output field HF's models use for the KV cache: ``cache`` in the transformers
    pinned here, ``past_key_values`` before (e.g. 5.17, the GPU machines' image). Kept in a
    module global, not an lru_cache: torch.compile warns about (and skips) cache wrappers."""
    global _CACHE_NAME
    if _CACHE_NAME is None:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        _CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
    return _CACHE_NAME


# ``generated`` is True while torch.compile traces a patched causal LM's call whose position_ids
# HF generates itself (none given, no cache: 0 .. T-1 in every row, so no packed sequences).
# transformers checks position_ids for packing before it builds a mask; while tracing it cannot
# rule packing out, so it built a (B, 1, T, T) mask for every compiled training step without a
# cache, and attention ran SDPA with it instead of the flash kernels. Eager calls never set it
# (there transformers' own check reads the values); per thread, as traces are.
_POSITIONS = threading.local()
_HF_FIND_PACKED = []  # transformers' own find_packed_sequence_indices, once wrapped


def find_packed_sequence_indices(position_ids):
    """Installed over ``transformers.masking_utils.find_packed_sequence_indices`` by ``patch``:
    None (no packing) for positions HF generated in a patched causal LM's call being traced
    (see :data:`_POSITIONS`), else transformers' own answer."""
    if getattr(_POSITIONS, "generated", False):
        return None
    return _HF_FIND_PACKED[0](position_ids)


def hf_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                         inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """See :func:`_causal_lm_forward`; positions HF generates are known not to be packed."""
    if cache is None and "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    if not torch.compiler.is_compiling() or position_ids is not None or cache is not None:
        return _causal_lm_forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
                                  use_cache, logits_to_keep, **kwargs)
    before = getattr(_POSITIONS, "generated", False)
    _POSITIONS.generated = True
    try:
        return _causal_lm_forward(self, input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
                                  use_cache, logits_to_keep, **kwargs)
    finally:
        _POSITIONS.generated = before


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """``LlamaForCausalLM.forward``: with ``labels``, the LM head and the loss run as one fused
    op and no logits are built (``logits`` is None); without, the original forward runs. So
    does, by default, a call with labels that no backward can follow (eval mode under
    ``torch.no_grad`` / ``inference_mode``: an evaluation loop, which may read the logits for
    its metrics, as ``Trainer.evaluate`` with ``compute_metrics`` does), at HF's memory cost
    (the full fp32 logits, for a loss-only evaluation too). ``skip_logits`` (Liger-Kernel's
    keyword) decides instead: True, the fused loss even there; False, the logits in training
    too. So does a call with labels and a ``logits_to_keep`` other than 0: HF then computes the loss of
    the kept logits against all the labels (a shape error for any shorter slice), and the fused
    loss over every position would silently answer something else. A mixture-of-experts model's
    output (``MoeCausalLMOutputWithPast``) carries its router logits and, with
    ``output_router_logits``, its load-balancing loss, added to the loss as HF adds it."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    keeps_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    skip_logits = kwargs.pop("skip_logits", None)
    if skip_logits is None:
        skip_logits = self.training or torch.is_grad_enabled()  # (not an evaluation loop's call)
    if labels is None or not skip_logits or not keeps_all or not _fusable_head(self.lm_head):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, labels=labels, **{_hf_cache_name(): cache}, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    # mixture of experts (Mixtral, Qwen2/3-MoE, OLMoE): the router logits, and its balancing loss
    moe = hasattr(self, "router_aux_loss_coef")
    if moe:
        output_router_logits = kwargs.pop("output_router_logits", None)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        kwargs["output_router_logits"] = output_router_logits
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shifted = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)  # HF's loss takes it as a keyword too
    # HF's @can_return_tuple: return_dict=False (argument, else config) asks for a tuple
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True,
                         **{_hf_cache_name(): cache}, **kwargs)
    hidden = outputs.last_hidden_state
    scaling = getattr(self.config, "logits_scaling", 1.0)  # Granite: logits / logits_scaling
    if scaling != 1.0:  # (h W^T) / s = (h / s) W^T: the fused loss then needs no scale of its own
        # (HyperCLOVAX multiplies its logits by it)
        hidden = hidden * scaling if _family(self) in LOGITS_MULTIPLIED else hidden / scaling
    if shifted is None:
        shifted = shift_labels(labels.to(hidden.device), ignore_index)
    # Gemma's final_logit_softcapping: logits = cap * tanh(logits / cap), before the loss
    softcap = getattr(self.config, "final_logit_softcapping", None)
    loss = _lm_head_loss(hidden, self.lm_head, shifted, num_items_in_batch, ignore_index, softcap,
                         self._fastllama.get("check_labels", True))
    name = _hf_cache_name()
    fields = dict(loss=loss, logits=None, **{name: getattr(outputs, name)}, hidden_states=outputs.hidden_states,
                  attentions=outputs.attentions)
    # (a MoE without a balancing loss, dots.llm1: HF's output still carries the router logits)
    moe_output = moe or "router_logits" in getattr(outputs, "__dataclass_fields__", ())
    if moe:
        fields.update(_router_loss(self, outputs, attention_mask, output_router_logits, loss))
    elif moe_output:
        fields.update(router_logits=outputs.router_logits)
    output = (MoeCausalLMOutputWithPast if moe_output else CausalLMOutputWithPast)(**fields)
    if return_dict:
        return output
    # HF's tuple is its fields in order with the None ones dropped: logits keeps its place as
    # None, so out[2] is the cache as it is for HF (dropped, it would become out[1])
    return tuple(getattr(output, f.name) for f in dataclasses.fields(output)
                 if f.name == "logits" or getattr(output, f.name) is not None)


#: HF families whose causal LM multiplies its logits by ``logits_scaling`` (Granite divides)
LOGITS_MULTIPLIED = ("hyperclovax",)


def _router_loss(model, outputs, attention_mask, output_router_logits: bool, loss) -> dict:
    """A mixture-of-experts causal LM's extra output fields: the router logits, and with
    ``output_router_logits`` the load-balancing loss, added to ``loss`` times the model's
    ``router_aux_loss_coef`` as its own forward adds it (its module's ``load_balancing_loss_func``)."""
    from .patching import _original_class

    fields = dict(router_logits=outputs.router_logits, aux_loss=None)
    if output_router_logits:
        balance = sys.modules[_original_class(model).__module__].load_balancing_loss_func
        aux = balance(outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
        fields.update(aux_loss=aux, loss=loss + model.router_aux_loss_coef * aux.to(loss.device))
    return fields


# ---------------------------------------------------------------------------------------------
# fastllama's reference model
# ---------------------------------------------------------------------------------------------
def reference_attention_forward(self, x, cos, sin, key_padding_mask=None, cache=None, cache_start=0,
                                fastllama_norm=None):
    """``reference.model.Attention.forward`` with the rotary and attention kernels
    (``fastllama_norm``: x is not normed yet; the norm runs with q/k/v_proj as one node)."""
    B, T, _ = x.shape
    if fastllama_norm is not None:
        q, k, v = _norm_projections(fastllama_norm, x, (self.q_proj, self.k_proj, self.v_proj))
    else:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
    k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
    q, k = _rotate(self, q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(cache_start, k, v)
    if self._fastllama["attention"]:
        mask = None
        if key_padding_mask is not None or k.shape[2] != T:
            # the reference aligns queries bottom-right against the cache; `attend` reads a
            # missing mask the HF way (top-left for an empty static cache), so spell it out,
            # once per forward of the model (see _reference_masks): `attend` reads a mask object
            # once, not in every layer
            masks = getattr(_REFERENCE_MASKS, "masks", None)
            key = (id(key_padding_mask), B, T, k.shape[2])  # (that mask is passed to every layer of a forward)
            mask = masks.get(key) if masks is not None else None
            if mask is None:
                mask = ref.attention_mask(T, k.shape[2], causal=True, key_padding_mask=key_padding_mask,
                                          device=x.device).expand(B, 1, T, k.shape[2])
                if masks is not None:
                    masks[key] = mask
        out = attend(q, k, v, mask, causal=True, deterministic=self._fastllama.get("deterministic", True))
    else:
        out = ref.attention(q, k, v, causal=True, key_padding_mask=key_padding_mask)
    return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def reference_decoder_layer_forward(self, x, cos, sin, key_padding_mask=None, cache=None, cache_start=0):
    """``reference.model.DecoderLayer.forward`` with the residual add fused into the second norm
    and the norms folded into the projections, as :func:`hf_decoder_layer_forward`."""
    if _norm_into_attention(self):
        h = self.self_attn(x, cos, sin, key_padding_mask, cache, cache_start, fastllama_norm=self.input_layernorm)
    else:
        h = self.self_attn(self.input_layernorm(x), cos, sin, key_padding_mask, cache, cache_start)
    if _norm_into_mlp(self):
        out, x = _residual_norm_mlp(self.post_attention_layernorm, self.mlp, h, x)
        return x + out
    h, x = _fused_residual_norm(self.post_attention_layernorm, h, x)
    return x + self.mlp(h)


# The attention masks the reference model's layers build in this thread's current forward (the
# layers of one forward share one; it is dropped when the forward returns).
_REFERENCE_MASKS = threading.local()


@contextlib.contextmanager
def _reference_masks():
    """One attention mask per forward for the patched reference model's layers (each built its
    own, so `attend` classified the mask in every layer: ~50 mask-sized ops and several host
    syncs each). Not while torch.compile traces (the graph builds the mask; the masked op reads
    it), and not for layers run outside a forward (checkpoint recomputation builds its own)."""
    if torch.compiler.is_compiling():
        yield
        return
    outer = getattr(_REFERENCE_MASKS, "masks", None)
    _REFERENCE_MASKS.masks = {}
    try:
        yield
    finally:
        _REFERENCE_MASKS.masks = outer


def reference_llama_forward(self, input_ids, attention_mask=None, position_ids=None, cache_start=None,
                            labels=None):
    """``reference.Llama.forward``: with ``labels`` returns ``(None, loss)`` from the fused
    linear cross-entropy (no logits are built); without, the logits as before."""
    if labels is not None and not _fusable_head(self.lm_head):
        return type(self).forward(self, input_ids, attention_mask, position_ids, cache_start, labels)
    with _reference_masks():
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, cache_start)
    if labels is None:
        return self.lm_head(hidden)
    return None, _lm_head_loss(hidden, self.lm_head, shift_labels(labels),
                               check_labels=self._fastllama.get("check_labels", True))
