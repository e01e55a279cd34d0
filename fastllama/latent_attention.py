"""Multi-head latent attention (DeepSeek-V2/V3, GLM-4.7-Flash, Mistral 4, MiniCPM3) in a patched
Hugging Face model: its decode steps attend over the cached latents, not over expanded heads.

HF's attention module caches each token's compressed latent and rotary key, and at every step
expands the whole cache through ``kv_b_proj`` into every head's K and V (``expand_kv``) before it
calls the attention function: a (T, rank) x (rank, H (nope + v)) product and an H x (nope + rope
+ v) per-token read and write for each of the T cached tokens, every step and layer. A patched
module runs HF's own forward with that expansion deferred (:func:`latent_attention_forward`); the
attention function (``forwards.hf_attention_function``) then gets the latents and, for a decode
step (:func:`attend_latent`), absorbs ``kv_b_proj`` into the query and the output instead and runs
``ops.latent_decode_attention`` over the cache as HF keeps it. Everything else HF computes as it
does (q's projections, the family's rotary, Mistral 4's q scale, the cache update), so the
families' differences stay HF's.

Where the step is not a decode step the kernel serves (training or anything that needs
gradients, autocast, attention made non-causal, more than 16 new tokens, a mask that is not
causal attention over one run of keys per row ending at the last query, dropout,
``output_attentions``, a model that ran eager attention before it was patched, dtypes that
differ, a ``kv_b_proj`` that is not a plain ``nn.Linear`` without hooks or bias: a LoRA on it),
the attention function expands the latents as HF would and goes on as for any other model.
Under torch.compile the module runs as it is.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

import torch

from . import ops
from .attention import DECODE_MAX_QUERIES, _classify, decode_bounds

__all__ = ["latent_attention_forward", "attend_latent", "take_latents", "absorbed"]

# Per thread (two threads may run one model: a server's requests), the patched modules whose
# forward is running in it, and the latents each one's deferred expand_kv kept for its attention
# function. The expand_kv that defers sits on the instance (HF's forward calls self.expand_kv)
# while any thread runs the module's forward: counted under a lock, removed by the last one out.
_LOCAL = threading.local()
_LOCK = threading.Lock()
_USERS = "_fastllama_latent_forwards"  # the instance attribute counting the forwards running


def _thread_state():
    if not hasattr(_LOCAL, "running"):
        _LOCAL.running, _LOCAL.pending = set(), {}
    return _LOCAL


def absorbed(attn) -> tuple[torch.Tensor, torch.Tensor]:
    """A latent attention's ``kv_b_proj`` weight (H * (nope + v), rank) as each head's key rows
    (H, nope, rank), which take q_nope into the latent space (q_latent = q_nope W_UK), and value
    rows transposed (H, rank, v), which take an output out of it (o = o_latent W_UV^T): views."""
    w = attn.kv_b_proj.weight.view(attn.config.num_attention_heads, -1, attn.kv_lora_rank)
    return w[:, :attn.qk_nope_head_dim], w[:, attn.qk_nope_head_dim:].transpose(1, 2)


@dataclasses.dataclass
class _Latents:
    """What a deferred ``expand_kv`` was given (HF's cache output, (B, 1, Tk, rank) and
    (B, 1, Tk, rope)) and the stand-ins it returned, by which the attention function knows them."""
    latent: torch.Tensor
    rope: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor

    def expand(self, attn) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V heads HF's ``expand_kv`` makes of them."""
        return _class_expand_kv(attn)(self.latent, self.rope)


def _class_expand_kv(attn):
    from .patching import _original_class  # (FSDP2 renames the class)

    return functools.partial(_original_class(attn).expand_kv, attn)


def latent_attention_forward(self, *args, **kwargs):
    """HF's multi-head latent attention forward, run as it is with its ``expand_kv`` deferred:
    the attention function gets the cached latents themselves (see the module docstring)."""
    from .patching import _original_class

    forward = _original_class(self).forward
    local = _thread_state()
    if torch.compiler.is_compiling() or id(self) in local.running:  # (traced as it is; not re-entered)
        return forward(self, *args, **kwargs)
    with _LOCK:
        users = self.__dict__.get(_USERS, 0)
        if not users:
            self.__dict__["expand_kv"] = functools.partial(_deferred_expand_kv, self)
        self.__dict__[_USERS] = users + 1
    local.running.add(id(self))
    try:
        return forward(self, *args, **kwargs)
    finally:
        local.running.discard(id(self))
        local.pending.pop(id(self), None)
        with _LOCK:
            users = self.__dict__.pop(_USERS) - 1
            if users:
                self.__dict__[_USERS] = users
            else:
                del self.__dict__["expand_kv"]


def take_latents(attn, key: torch.Tensor) -> "_Latents | None":
    """The latents ``attn``'s deferred ``expand_kv`` kept in this thread, if ``key`` is the
    stand-in it returned for them (else None: ``key`` is a real one). Nothing is deferred under
    torch.compile (:func:`latent_attention_forward`), so traced calls skip the lookup."""
    if torch.compiler.is_compiling():
        return None
    latents = _thread_state().pending.pop(id(attn), None)
    return latents if latents is not None and key is latents.key else None


def _deferred_expand_kv(self, latent: torch.Tensor, rope: torch.Tensor):
    """``expand_kv`` while a patched forward runs: where the attention function may attend over
    the latents (fastllama's attention is the model's, nothing needs gradients, this thread runs
    the patched forward), it returns stand-ins of the expanded shapes (one element, broadcast: no
    memory, no work) and keeps the latents for it; else the expansion itself."""
    needs_grad = torch.is_grad_enabled() and (latent.requires_grad or rope.requires_grad
                                              or self.kv_b_proj.weight.requires_grad)
    local = _thread_state()
    if self.config._attn_implementation != "fastllama" or needs_grad or id(self) not in local.running:
        return _class_expand_kv(self)(latent, rope)
    B, _, T, _ = latent.shape
    H = self.config.num_attention_heads
    stand_in = latent.new_empty(())
    key = stand_in.expand(B, H, T, self.qk_nope_head_dim + self.qk_rope_head_dim)
    value = stand_in.expand(B, H, T, self.v_head_dim)
    local.pending[id(self)] = _Latents(latent, rope, key, value)
    return key, value


def _bounds(mask: torch.Tensor | None, B: int, H: int, Tq: int, Tk: int, device):
    """(lengths, left pads or None) of each row's keys for the latent kernel, or None when the
    mask is not what it serves: causal attention over one run of keys per row, the queries at
    its end. As :func:`fastllama.attention.attend` reads HF's masks for the decode kernel: None is
    causal over all keys, or over the first Tq of an empty static cache; a mask is read by
    :func:`fastllama.attention.decode_bounds`."""
    if mask is None:
        n = Tq if Tq > 1 and Tk > Tq else Tk
        return torch.full((B,), n, dtype=torch.int32, device=device), None
    plan = _classify(mask, (B, H, Tq, Tk), True, None)
    return decode_bounds(plan, plan.key_end or Tk)


def attend_latent(attn, query: torch.Tensor, latents: _Latents, mask, scaling, dropout: float, causal: bool,
                  kwargs: dict, options: dict) -> torch.Tensor | None:
    """A decode step of ``attn`` over its cached latents: the output (B, Tq, H, v_head_dim), as
    an attention function returns it, or None where the step is not one the latent kernel
    serves (see the module docstring; the caller then expands the latents).

    Head h's q_nope is absorbed into the latent space by its key rows of ``kv_b_proj`` (q_latent
    = q_nope W_UK), ``ops.latent_decode_attention`` attends over HF's cached latents and rotary
    keys, and the head's value rows take the output back (o = o_latent W_UV^T): the same
    attention as over the expanded heads, in another order of products."""
    from .forwards import _bypassable, _plain_linear

    B, H, Tq, _ = query.shape
    latent, rope = latents.latent[:, 0], latents.rope[:, 0]  # (B, Tk, rank), (B, Tk, rope): HF's one "head"
    kv_b_proj = attn.kv_b_proj
    weight = kv_b_proj.weight
    # the products read kv_b_proj's weight: only a plain, unhooked nn.Linear without a bias computes
    # nothing else (a LoRA on it, PEFT's or a forward set on the instance, a hook, an offloaded
    # weight: the expansion calls the module)
    if not (_plain_linear(kv_b_proj) and _bypassable(kv_b_proj) and kv_b_proj.bias is None
            and weight.device == query.device):
        return None
    if (Tq > DECODE_MAX_QUERIES or dropout > 0 or kwargs.get("output_attentions") or not causal
            or (torch.is_grad_enabled() and query.requires_grad) or torch.is_autocast_enabled(query.device.type)
            or (mask is not None and (mask.dtype != torch.bool or options.get("eager")))
            or len({query.dtype, latent.dtype, rope.dtype, weight.dtype}) > 1 or latent.shape[1] < Tq):
        return None
    bounds = _bounds(mask, B, H, Tq, latent.shape[1], query.device)
    if bounds is None:
        return None
    lengths, leftpad = bounds
    nope = attn.qk_nope_head_dim
    absorb_k, absorb_v = absorbed(attn)
    q_latent = torch.matmul(query[..., :nope], absorb_k)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    o_latent = ops.latent_decode_attention(q_latent, query[..., nope:], latent, rope, lengths, scale=scale,
                                           cache_leftpad=leftpad)
    return torch.matmul(o_latent, absorb_v).transpose(1, 2).contiguous()
