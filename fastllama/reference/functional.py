"""Pure-PyTorch functional references: the truth every kernel is checked against.

Every function here is plain PyTorch, follows the Hugging Face Llama semantics it stands in for,
and works in any floating dtype. Internal statistics are computed in
``promote_types(dtype, float32)``: float32 for half-precision inputs (exactly what HF does) and
float64 when the parity harness feeds float64 to get the "truth".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "rms_norm",
    "rotate_half",
    "rotate_adjacent_pairs",
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_from_positions",
    "rope_inv_freq",
    "rope_cos_sin",
    "swiglu",
    "moe_experts",
    "attention_mask",
    "attention",
    "attention_varlen",
    "decode_attention",
    "rotary_cache_append",
    "cross_entropy",
    "linear_cross_entropy",
    "SUPPORTED_ROPE_TYPES",
]


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types (HF's upcast); float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
             unit_offset: bool = False, round_once: bool | None = None):
    """HF ``LlamaRMSNorm``: ``weight * (x / sqrt(mean(x^2) + eps)).to(x.dtype)``.

    Statistics in fp32 (fp64 for fp64 input), the normalised value cast back to the input dtype
    BEFORE the weight multiply, as HF does. With ``residual`` the sum ``x + residual`` (in the
    input dtype, as the HF decoder layer computes it) is normalised and ``(normed, sum)`` returned.
    ``unit_offset``: HF's ``Gemma3RMSNorm`` instead, ``(normed * (1 + weight)).to(x.dtype)`` with
    the product in the statistics dtype (one rounding). ``round_once`` (default: ``unit_offset``):
    the weight multiply in the statistics dtype too, then one rounding: HF's ``Olmo2RMSNorm``,
    ``(weight * normed).to(x.dtype)``.
    """
    if residual is not None:
        x = x + residual
    h = x.to(_stat_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        out = (h * (1.0 + weight.to(h.dtype))).to(x.dtype)
    elif round_once:
        out = (h * weight.to(h.dtype)).to(x.dtype)
    else:
        out = weight * h.to(x.dtype)
    return (out, x) if residual is not None else out


# ----------------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------------
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF convention: the head dim is two halves (x1, x2); returns (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_adjacent_pairs(x: torch.Tensor) -> torch.Tensor:
    """GLM's ``rotate_half``: pairs of adjacent dims (x[2i], x[2i + 1]) become (-x[2i + 1], x[2i])."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         interleaved: bool = False):
    """HF ``apply_rotary_pos_emb``: q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (B, T, R) or (T, R)
    with R = D, or R < D (partial rotary: the first R dims rotate, the rest pass through).
    ``interleaved``: GLM's (also GLM-4's, Helium's, Ernie 4.5's): adjacent pairs rotate, by the
    tables' first half repeated twice each (``repeat_interleave(2)``)."""
    if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D), broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    r = cos.shape[-1]
    if r < q.shape[-1]:
        (q_out, k_out), tails = (apply_rotary_pos_emb(q[..., :r], k[..., :r], cos, sin, interleaved),
                                 (q[..., r:], k[..., r:]))
        return torch.cat([q_out, tails[0]], -1), torch.cat([k_out, tails[1]], -1)
    if interleaved:
        cos, sin = (t[..., :r // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
        return q * cos + rotate_adjacent_pairs(q) * sin, k * cos + rotate_adjacent_pairs(k) * sin
    q_out = q * cos + rotate_half(q) * sin
    k_out = k * cos + rotate_half(k) * sin
    return q_out, k_out


def rope_inv_freq(head_dim: int, theta: float = 10000.0, rope_type: str = "default", **scaling) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32 for the rope types HF Llama uses.

    ``scaling`` holds the rope parameters of the type: ``factor`` for "linear"; ``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings`` for "llama3".
    """
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        # Llama 3.1 scaling: long wavelengths (> original_ctx / low_freq_factor) are slowed down by
        # `factor`, short ones (< original_ctx / high_freq_factor) are kept, and the band between
        # is a linear blend of the two in "how many wavelengths fit the original context".
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(in_band, blended, scaled)
    return inv_freq


def apply_rotary_pos_emb_from_positions(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                                        inv_freq: torch.Tensor):
    """HF's rotary path end to end: cos/sin from :func:`rope_cos_sin` (fp32, then cast to q's
    dtype as ``LlamaRotaryEmbedding`` returns them), then :func:`apply_rotary_pos_emb`.
    ``position_ids`` (B, T) or (T,); ``inv_freq`` (D // 2,)."""
    cos, sin = rope_cos_sin(position_ids, inv_freq, dtype=q.dtype)
    return apply_rotary_pos_emb(q, k, cos, sin)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype = torch.float32):
    """cos, sin of shape (B, T, D) for integer ``position_ids`` (B, T), computed in fp32 like HF."""
    freqs = position_ids[..., None].to(torch.float32) * inv_freq.to(device=position_ids.device, dtype=torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# ----------------------------------------------------------------------------------------------
# SwiGLU
# ----------------------------------------------------------------------------------------------
def swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """``silu(gate) * up`` (the Llama MLP activation), in the input dtype like HF;
    ``activation="gelu_tanh"``: GeGLU, ``gelu(gate, approximate="tanh") * up`` (Gemma's MLP)."""
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def moe_experts(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """A mixture of experts' output (T, H): for each token t and each of its k chosen experts e
    (weight w), ``w * (act(x_t G_e^T) * (x_t U_e^T)) D_e^T`` summed over the k, with
    ``gate_up_proj[e] = [G_e; U_e]`` (E, 2I, H) and ``down_proj[e] = D_e`` (E, H, I); each
    product in the weights' dtype, the weighted outputs summed in their promoted dtype and cast
    to hidden's (HF's grouped experts). Every (token, expert) pair's weights are gathered: a
    reference for small shapes."""
    x = hidden.to(gate_up_proj.dtype)
    u = torch.einsum("th,tkoh->tko", x, gate_up_proj[top_k_index])  # (T, k, 2I)
    gate, up = u.chunk(2, dim=-1)
    y = torch.einsum("tki,tkhi->tkh", swiglu(gate, up, activation), down_proj[top_k_index])  # (T, k, H)
    return (y * top_k_weights[..., None]).sum(1).to(hidden.dtype)


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool = True,
    window: tuple[int, int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Boolean mask of allowed (query, key) pairs, broadcastable to (B, H, Tq, Tk).

    Queries are the LAST ``q_len`` positions of the ``k_len`` keys (bottom-right alignment, as
    flash-attn and a KV cache need): query i sits at absolute position ``i + k_len - q_len``.
    ``window=(left, right)`` allows keys in ``[pos - left, pos + right]``; -1 means unlimited
    (flash-attn's convention). Mistral's ``sliding_window=W`` is ``window=(W - 1, 0)``.
    ``key_padding_mask`` (B, Tk) is True where a key is real.
    """
    q_pos = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if window is not None:
        left, right = window
        if left >= 0:
            allowed &= k_pos >= q_pos - left
        if right >= 0:
            allowed &= k_pos <= q_pos + right
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    return allowed


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_lse: bool = False,
    flash_backward: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """Softmax attention in the SDPA layout: q (B, Hq, Tq, D), k/v (B, Hk, Tk, D), Hq % Hk == 0.

    Query head h reads key/value head ``h // (Hq // Hk)`` (HF ``repeat_kv``). Scores and the
    weighted sum run in the input dtype with the softmax in fp32, like HF's eager attention. A
    query row with no allowed key returns zeros (and lse = -inf), never NaN. See
    :func:`attention_mask` for causal alignment, ``window`` and ``key_padding_mask``.
    ``softcap`` replaces the scores s by ``softcap * tanh(s / softcap)`` before the mask (Gemma
    2's attention; computed on the upcast scores).

    ``sinks`` (Hq,): attention sinks (gpt-oss): query head h's softmax also runs over one more
    score, ``sinks[h]``, whose value vector is zero, so it only takes probability mass off the
    keys (as gpt-oss's eager attention appends it and drops its column). A row with no allowed
    key then puts all its mass on the sink: out 0, lse = ``sinks[h]``.

    ``flash_backward=True`` keeps this forward but differentiates it the way flash-attention
    kernels do (SDPA's flash backend among them): probabilities recomputed in fp32 from the lse,
    and dS = P * (dP - delta) with delta = rowsum(dO * O) of the stored output, instead of
    autograd's rowsum(P * dP). The two agree in exact arithmetic; in floating point the second
    leaves rounding noise where the first cancels exactly (one visible key: dS = 0). The parity
    harness takes it as a second "PyTorch in the same dtype".
    """
    B, Hq, Tq, D = q.shape
    Hk, Tk = k.shape[1], k.shape[2]
    if Hq % Hk:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of key/value heads ({Hk})")
    if Hq != Hk:
        k = k.repeat_interleave(Hq // Hk, dim=1)
        v = v.repeat_interleave(Hq // Hk, dim=1)
    scale = D ** -0.5 if scale is None else scale
    allowed = attention_mask(Tq, Tk, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device)
    if sinks is not None:
        if flash_backward:
            raise ValueError("flash_backward=True does not take sinks")
        out, lse = _attention_forward(q, k, v, allowed, scale, softcap, sinks)
        return (out, lse) if return_lse else out
    if flash_backward:
        out, lse = _FlashBackwardAttention.apply(q, k, v, allowed, scale, softcap)
    else:
        out, lse = _attention_forward(q, k, v, allowed, scale, softcap)
    return (out, lse) if return_lse else out


def _capped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _probs(scores: torch.Tensor, allowed: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    # exp(-inf - -inf) is NaN: rows without any allowed key get probability 0 everywhere.
    return torch.where(allowed, torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0.0)), 0.0)


def _attention_forward(q, k, v, allowed, scale, softcap=None, sinks=None):
    """(out, lse) of :func:`attention` for repeated (MHA) k/v."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = _capped(scores.to(_stat_dtype(q.dtype)), softcap).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    if sinks is not None:  # the sink's score joins the denominator (its value is zero)
        lse = torch.logaddexp(lse, sinks.to(lse.dtype)[None, :, None, None].expand_as(lse))
    out = torch.matmul(_probs(scores, allowed, lse).to(v.dtype), v)
    return out, lse.squeeze(-1)


class _FlashBackwardAttention(torch.autograd.Function):
    """:func:`attention`'s forward with a flash-attention style backward (see ``flash_backward``)."""

    @staticmethod
    def forward(ctx, q, k, v, allowed, scale, softcap):
        out, lse = _attention_forward(q, k, v, allowed, scale, softcap)
        ctx.save_for_backward(q, k, v, out, lse, allowed)
        ctx.scale, ctx.softcap = scale, softcap
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q, k, v, out, lse, allowed = ctx.saved_tensors
        f = _stat_dtype(q.dtype)
        q32, k32, v32 = q.to(f), k.to(f), v.to(f)
        raw = q32 @ k32.transpose(-1, -2) * ctx.scale
        scores = _capped(raw, ctx.softcap).masked_fill(~allowed, float("-inf"))
        p = _probs(scores, allowed, lse[..., None])
        do = d_out.to(f) if d_out is not None else torch.zeros_like(out, dtype=f)
        delta = (do * out.to(f)).sum(-1, keepdim=True)  # from the stored, rounded output
        ds = p * (do @ v32.transpose(-1, -2) - delta)
        if d_lse is not None:  # d lse / d s = P
            ds = ds + p * d_lse.to(f)[..., None]
        if ctx.softcap is not None:  # d s / d raw = 1 - tanh(raw / cap)^2
            ds = ds * (1 - torch.tanh(raw / ctx.softcap) ** 2)
        dq = ds @ k32 * ctx.scale
        dk = ds.transpose(-1, -2) @ q32 * ctx.scale
        dv = p.transpose(-1, -2) @ do
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    return_lse: bool = False,
    flash_backward: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """:func:`attention` over packed sequences (flash-attn's varlen form, SDPA layout).

    q is (1, Hq, total_q, D) and k/v (1, Hk, total_k, D); sequence i owns query rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` and key rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``
    (``cu_seqlens_k`` defaults to ``cu_seqlens``) and attends only within itself, with
    :func:`attention`'s masks (bottom-right causal alignment per sequence). Zero-length
    sequences are allowed; query rows outside every sequence are 0 (lse -inf).
    """
    cu_q = [int(x) for x in cu_seqlens.tolist()]
    cu_k = cu_q if cu_seqlens_k is None else [int(x) for x in cu_seqlens_k.tolist()]
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=_stat_dtype(q.dtype), device=q.device)
    for i in range(len(cu_q) - 1):
        (a, b), (c, d) = cu_q[i:i + 2], cu_k[i:i + 2]
        o, l = attention(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d], causal=causal,
                         scale=q.shape[-1] ** -0.5 if scale is None else scale, window=window, return_lse=True,
                         flash_backward=flash_backward, softcap=softcap, sinks=sinks)
        out = out.index_copy(2, torch.arange(a, b, device=q.device), o)
        lse[:, :, a:b] = l
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Decoding against a static KV cache
# ----------------------------------------------------------------------------------------------
def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    scale: float | None = None,
    cache_leftpad: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
):
    """:func:`attention` of new queries against a static cache, one sequence at a time.

    q (B, Hq, Tq, D); k_cache/v_cache (B, Hk, Tmax, D) of which sequence b uses the first
    ``L = cache_seqlens[b]`` slots (the new tokens included), from slot ``cache_leftpad[b]``
    (default 0: flash-attn's left-padding convention). Causal with bottom-right alignment: query
    t sits at slot ``L - Tq + t``. A sequence without keys (or a query row before the first key)
    gives zeros. Slots outside ``[leftpad, L)`` are never read. ``window=(left, 0)``: the query
    at slot p sees keys ``p - left .. p`` only (:func:`attention_mask`'s convention);
    ``softcap`` and ``sinks`` as in :func:`attention`.
    """
    outs = []
    starts = [0] * q.shape[0] if cache_leftpad is None else cache_leftpad.tolist()
    for b, (n, s) in enumerate(zip(cache_seqlens.tolist(), starts)):
        n = max(0, min(int(n), k_cache.shape[2]))
        s = max(0, min(int(s), n))
        if window is not None and window[0] >= 0:  # keys older than every query's window: not read
            s = max(s, n - q.shape[2] - window[0])
        outs.append(attention(q[b:b + 1], k_cache[b:b + 1, :, s:n], v_cache[b:b + 1, :, s:n], causal=True,
                              scale=scale, window=window, softcap=softcap, sinks=sinks))
    return torch.cat(outs) if outs else torch.zeros_like(q)


def rotary_cache_append(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache_seqlens: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
):
    """Rotary on new q (B, Hq, T, D) / k (B, Hk, T, D), then k/v written into the cache.

    Returns ``(q_rotated, k_cache_new, v_cache_new)`` without touching the given caches. Token t
    of sequence b goes to slot ``cache_seqlens[b] + t`` (slots past the cache end are dropped).
    cos/sin are (P, D) tables read at position ``positions[b] + t`` (default: the slot), or
    per-token (B, T, D) tensors as HF's rotary embedding returns them. ``interleaved``: see
    :func:`apply_rotary_pos_emb`.
    """
    B, _, T, _ = q.shape
    start = cache_seqlens.long()
    if cos.dim() == 2:
        first = start if positions is None else positions.long()
        pos = (first[:, None] + torch.arange(T, device=q.device)).clamp(0, cos.shape[0] - 1)
        cos, sin = cos[pos], sin[pos]
    # (fp32 tables beside 16-bit q, Ernie 4.5's: computed in fp32, returned in q's dtype as HF does)
    q, k = (t.to(q.dtype) for t in apply_rotary_pos_emb(q, k, cos, sin, interleaved))
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b in range(B):
        for t in range(T):
            slot = int(start[b]) + t
            if 0 <= slot < k_cache.shape[2]:
                k_cache[b, :, slot] = k[b, :, t]
                v_cache[b, :, slot] = v[b, :, t]
    return q, k_cache, v_cache


# ----------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------
def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of (N, V) logits, upcast to fp32 first (HF ``ForCausalLMLoss`` does).

    "mean" divides by the number of non-ignored labels, or by ``num_items_in_batch`` when given
    (HF's gradient-accumulation convention); all labels ignored gives 0, not NaN. "sum" and
    "none" are as in ``F.cross_entropy``.

    Optional extras (both off by default): ``softcap`` caps the (upcast) logits to
    ``softcap * tanh(logits / softcap)`` before the loss (Gemma 2); ``z_loss`` adds
    ``z_loss * logsumexp(logits)**2`` to the loss of every non-ignored token (PaLM's z-loss).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits = logits.to(_stat_dtype(logits.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if z_loss:
        lse = torch.logsumexp(logits, dim=-1)
        losses = losses + torch.where(labels != ignore_index, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return losses
    total = losses.sum()
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.clamp(torch.as_tensor(count, device=total.device), min=1).to(total.dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    bias: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)``: the LM head and the loss, materialised.

    ``z_loss`` and ``softcap`` as in :func:`cross_entropy`. "none" returns the flat (N,) losses.
    """
    logits = F.linear(hidden, weight, bias)
    return cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index, reduction, num_items_in_batch,
                         z_loss=z_loss, softcap=softcap)
