"""``apply_rotary_pos_emb`` (HF semantics) and ``apply_rotary_pos_emb_from_positions``.

Both rotate q and k in ONE launch. The custom ops ``fastllama::rotary`` (out of place) and
``fastllama::rotary_`` (in place) take either cos/sin tensors or position ids with inverse
frequencies; ``backward`` flips the rotation, so the backward of the op is the op itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import reference
from .._interpreter import interpreter_active
from ..kernels import rotary as _k
from ..optable import KernelBuild, OpCase, OpSpec
from ._checks import check_device, check_last_dim_contiguous, check_same, check_tensor, check_write_targets, num_sms

__all__ = ["apply_rotary_pos_emb", "apply_rotary_pos_emb_from_positions", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _gpu_block_t(block_d: int, from_positions: bool) -> int:
    """Positions per program on a GPU: a 512-element half-tile (4 values a thread at 4 warps),
    256 from positions (2 a thread). cos/sin (four half-tiles, or two from positions) stay in
    registers across all the heads plus per-element 64-bit pointers: 2K-element tiles needed 255
    registers and spilled, 1K ones 178; 512 fit in 80 (sm_90 build, no spills). From positions,
    512 compiled to 40 registers yet ptxas spilled 4 bytes (the "argument is infinite" predicate,
    kept across libdevice's long-argument sin/cos path) on every sm_80 build once the strides
    carried their multiple-of-16 hints, as launches at Llama shapes do; 256 compiles clean with
    and without hints (32-40 registers)."""
    return max(1, (256 if from_positions else 512) // block_d)


def _config(q: torch.Tensor, k: torch.Tensor, from_positions: bool) -> dict:
    batch, n_q, seq_len, head_dim = q.shape
    heads = n_q + k.shape[1]
    block_d = max(16, triton.next_power_of_2(head_dim // 2))
    if interpreter_active():  # few, large programs: every program is a Python-level step
        block_t = min(triton.next_power_of_2(seq_len), max(1, 8192 // block_d))
        return dict(block_t=block_t, heads_per_program=max(heads, 1), num_warps=1)
    block_t = _gpu_block_t(block_d, from_positions)
    t_blocks = triton.cdiv(seq_len, block_t) * batch
    # Enough programs for ~4 waves; beyond that, more heads a program reuse the loaded cos/sin.
    groups = min(heads, max(1, triton.cdiv(4 * num_sms(q.device), t_blocks)))
    return dict(block_t=block_t, heads_per_program=triton.cdiv(heads, groups), num_warps=4)


def _launch(q, k, q_out, k_out, cos, sin, position_ids, inv_freq, backward, interleaved):
    # The launcher wants cos/sin (B or 1, T, D) and position ids (B or 1, T): add the batch dim.
    if cos is not None and cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if position_ids is not None and position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    _k.rotary(q, k, q_out, k_out, cos, sin, position_ids, inv_freq, backward=backward, interleaved=interleaved,
             **_config(q, k, position_ids is not None))


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllama::rotary", mutates_args=())
def _rotary(q: torch.Tensor, k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
            position_ids: Optional[torch.Tensor], inv_freq: Optional[torch.Tensor], backward: bool,
            interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """New rotated q, k in the layout of the inputs (``empty_like`` keeps a transposed layout)."""
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    _launch(q, k, q_out, k_out, cos, sin, position_ids, inv_freq, backward, interleaved)
    return q_out, k_out


@_rotary.register_fake
def _(q, k, cos, sin, position_ids, inv_freq, backward, interleaved):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("fastllama::rotary_", mutates_args=("q", "k"))
def _rotary_(q: torch.Tensor, k: torch.Tensor, cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
             position_ids: Optional[torch.Tensor], inv_freq: Optional[torch.Tensor], backward: bool,
             interleaved: bool) -> None:
    """Rotates q and k in place."""
    _launch(q, k, q, k, cos, sin, position_ids, inv_freq, backward, interleaved)


@_rotary_.register_fake
def _(q, k, cos, sin, position_ids, inv_freq, backward, interleaved):
    return None


def _unit_stride(g: torch.Tensor) -> torch.Tensor:
    """Upstream gradients may be expanded (stride 0) in D; the kernel needs unit stride there."""
    return g if g.stride(-1) == 1 else g.contiguous()


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, position_ids, inv_freq, backward, interleaved = inputs
    ctx.save_for_backward(cos, sin, position_ids, inv_freq)
    ctx.backward, ctx.interleaved = backward, interleaved
    # As torch's q * cos + rotate_half(q) * sin: the rotation of a tensor that needs no gradient
    # needs none either (cos and sin never get one)
    ctx.mark_non_differentiable(*(out for x, out in zip((q, k), output) if not x.requires_grad))
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
    ctx.shapes = (q.shape, k.shape)


def _backward(ctx, dq, dk):
    cos, sin, position_ids, inv_freq = ctx.saved_tensors
    if dq is None and dk is None:
        return None, None, None, None, None, None, None, None
    # one rotation only used: the other input gets None, as in torch (the kernel takes a zero one)
    grads = [g if g is not None else other.new_zeros(shape)
             for g, other, shape in ((dq, dk, ctx.shapes[0]), (dk, dq, ctx.shapes[1]))]
    rq, rk = _rotary(_unit_stride(grads[0]), _unit_stride(grads[1]), cos, sin, position_ids, inv_freq,
                     not ctx.backward, ctx.interleaved)
    return rq if dq is not None else None, rk if dk is not None else None, None, None, None, None, None, None


torch.library.register_autograd("fastllama::rotary", _backward, setup_context=_setup_context)


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation under autograd: q and k are marked dirty; backward rotates by -theta."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, position_ids, inv_freq, interleaved):
        _rotary_(q, k, cos, sin, position_ids, inv_freq, False, interleaved)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, position_ids, inv_freq)
        ctx.interleaved = interleaved
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin, position_ids, inv_freq = ctx.saved_tensors
        dq, dk = _rotary(_unit_stride(dq), _unit_stride(dk), cos, sin, position_ids, inv_freq, True, ctx.interleaved)
        return dq, dk, None, None, None, None, None


def _check_inplace_targets(q, k) -> None:
    """In place, every element of q and k must be its own memory: one rotated twice (k is q, or a
    stride-0 head/position dim) would come out rotated twice, silently. Distinct views of one
    buffer, e.g. q and k of a fused qkv projection, are fine and common."""
    check_write_targets({"q": q, "k": k}, why=" (inplace=True): it would be rotated more than once; rotate out "
                                               "of place or pass separate tensors")


def _run(q, k, cos, sin, position_ids, inv_freq, inplace, interleaved=False):
    if not inplace:
        return _rotary(q, k, cos, sin, position_ids, inv_freq, False, interleaved)
    _check_inplace_targets(q, k)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        # (one of them without a gradient stays so, as after torch's copy_: a Function marking
        # both dirty would put it in the graph, and a persistent one, say a cache, would then
        # break the next backward)
        if torch.compiler.is_compiling() or q._is_view() or k._is_view() or q.requires_grad != k.requires_grad:
            # autograd refuses a Function that modifies a view in place and returns two tensors
            # (HF's q/k are views: projection output .view().transpose()): rotate out of place,
            # then copy into q and k, which autograd records on views (one extra temporary).
            # Under torch.compile too (dynamo cannot ask _is_view; functionalization removes
            # the copy).
            q_rot, k_rot = _rotary(q, k, cos, sin, position_ids, inv_freq, False, interleaved)
            return q.copy_(q_rot), k.copy_(k_rot)
        return _RotaryInplace.apply(q, k, cos, sin, position_ids, inv_freq, interleaved)
    _rotary_(q, k, cos, sin, position_ids, inv_freq, False, interleaved)
    return q, k


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validate_qk(q, k) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_same("q", q, "k", k, "dtype")
    check_same("q", q, "k", k, "device")
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (bk, tk, dk) != (b, t, d):
        raise ValueError(f"k has shape {tuple(k.shape)} but q has shape {tuple(q.shape)}; they must agree in "
                         f"batch, seq_len and head_dim (q (B, Hq, T, D), k (B, Hk, T, D))")
    if b > 65535:  # the launch grid's second axis
        raise ValueError(f"q has batch size {b}; accepted: at most 65535 (fold batch into seq_len)")
    if d % 2 or not 2 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {d}; accepted: an even head_dim from 2 to {MAX_HEAD_DIM}")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("k", k)


def _check_bt(name: str, t: torch.Tensor, batch: int, seq_len: int, batched_dims: int, accepted: str) -> None:
    """``t`` is ([B or 1,] T, ...) with T = seq_len of q; it has a batch dim iff it has
    ``batched_dims`` dims. ``accepted`` names the layouts in the message."""
    t_dim = 1 if t.dim() == batched_dims else 0
    if t.shape[t_dim] != seq_len or (t_dim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; accepted: {accepted} with B = {batch} or 1 "
                         f"and T = {seq_len} (the seq_len of q)")


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1, *, inplace: bool = False, interleaved: bool = False):
    """HF ``apply_rotary_pos_emb``: ``q * cos + rotate_half(q) * sin`` (and k), one launch.

    Args:
        q: (B, Hq, T, D), k: (B, Hk, T, D); any strides with unit stride in D (e.g. transposed
            from (B, T, H, D)). Hk may differ from Hq (GQA). D even, at most 256.
        cos, sin: (B, T, R), (1, T, R) or (T, R), fp32/fp16/bf16 (read as fp32; normally fp32
            or q's dtype), unit stride in R. R = D, or an even R < D: partial rotary as HF's
            ``apply_rotary_pos_emb`` does it (Phi-4-mini, ``partial_rotary_factor``): the first R
            dims of each head are rotated (pairing i with i + R/2), the other D - R pass through.
        unsqueeze_dim: HF's argument: 1 for the (B, H, T, D) layout above, 2 for q, k in
            (B, T, H, D) (served as transposed views; the results are in that layout too).
        inplace: (keyword only) rotate q and k in place and return them (works under autograd
            too; for views that require grad, such as HF's transposed projections, through one
            temporary and a copy). q and k must not share elements (k is q, overlapping views, expanded dims): a
            ValueError.
        interleaved: (keyword only) rotate adjacent pairs (2i, 2i + 1) of the R rotary dims, as GLM,
            GLM-4, Helium and Ernie 4.5 do (their ``rotate_half`` takes x[..., 0::2] and
            x[..., 1::2]), pair i by the angle of ``cos[..., i]``, ``sin[..., i]``: only the first
            R/2 entries of the tables are read, as those families' ``apply_rotary_pos_emb``
            repeat_interleaves them. Partial rotary (R < D) as in GLM's.

    Returns:
        (q_rotated, k_rotated), new tensors in the layout of q and k unless ``inplace``. Math in
        fp32, one rounding to q's dtype. Gradients flow to q and k, not to cos/sin.
    """
    if isinstance(unsqueeze_dim, bool) or not isinstance(unsqueeze_dim, int) or unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (q, k as (B, H, T, D)) or 2 ((B, T, H, D)), got {unsqueeze_dim!r}")
    if unsqueeze_dim == 2:
        check_tensor("q", q, ndim=(4,))
        check_tensor("k", k, ndim=(4,))
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, inplace=inplace,
                                    interleaved=interleaved)
        return q.transpose(1, 2), k.transpose(1, 2)
    _validate_qk(q, k)
    b, _, t, d = q.shape
    for name, c in (("cos", cos), ("sin", sin)):
        check_tensor(name, c, ndim=(2, 3))
        check_device(name, c)
        check_same("q", q, name, c, "device")
        if c.shape[-1] > d or c.shape[-1] % 2 or c.shape[-1] == 0:
            raise ValueError(f"{name} has last dim {c.shape[-1]} but q has head_dim {d}; accepted: head_dim, or "
                             f"an even rotary dim below it (partial rotary)")
        _check_bt(name, c, b, t, 3, "(B, T, R) or (T, R)")
        check_last_dim_contiguous(name, c)
        if c.requires_grad:
            raise ValueError(f"{name} requires grad; gradients with respect to cos/sin are not computed "
                             f"(compute them under torch.no_grad(), as HF's rotary embedding does)")
    if not isinstance(interleaved, bool):
        raise TypeError(f"interleaved must be a bool, got {interleaved!r}")
    check_same("cos", cos, "sin", sin, "dtype")
    if cos.shape != sin.shape:
        raise ValueError(f"sin has shape {tuple(sin.shape)} but cos has shape {tuple(cos.shape)}; they must match")
    rotary_dim = cos.shape[-1]
    if rotary_dim == d:
        return _run(q, k, cos, sin, None, None, inplace, interleaved)
    # Partial rotary: the kernel reads the leading rotary_dim dims as strided views (any row
    # strides are fine). In place, the other dims are simply not touched.
    if inplace:
        _check_inplace_targets(q, k)
        _run(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, None, None, True, interleaved)
        return q, k
    q_rot, k_rot = _run(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, None, None, False, interleaved)
    return _with_tail(q_rot, q, rotary_dim), _with_tail(k_rot, k, rotary_dim)


def _with_tail(rotated: torch.Tensor, x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``cat([rotated, x[..., rotary_dim:]], -1)`` in x's memory layout (as every output of this
    op is: a (B, T, H, D) buffer transposed stays one); autograd slices the gradient back."""
    out = torch.empty_like(x)
    out[..., :rotary_dim] = rotated
    out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


def apply_rotary_pos_emb_from_positions(q: torch.Tensor, k: torch.Tensor, position_ids: torch.Tensor,
                                        inv_freq: torch.Tensor, *, inplace: bool = False):
    """Rotary embedding with cos/sin computed in the kernel: none are materialised in memory.

    Matches HF's ``LlamaRotaryEmbedding`` + ``apply_rotary_pos_emb`` for the "default",
    "linear" and "llama3" rope types, whose scaling lives entirely in ``inv_freq`` (HF bakes it
    into ``rotary_emb.inv_freq``; ``reference.rope_inv_freq`` builds it). Types that also scale
    cos/sin (attention_factor != 1: yarn, longrope) are not covered.

    Args:
        q, k: as in :func:`apply_rotary_pos_emb`.
        position_ids: integer (B, T), (1, T) or (T,).
        inv_freq: (D // 2,) float32, like ``rotary_emb.inv_freq``.
        inplace: rotate in place.

    Returns:
        (q_rotated, k_rotated). cos/sin are fp32 here (HF rounds them to q's dtype first).
    """
    _validate_qk(q, k)
    b, _, t, d = q.shape
    check_tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32), ndim=(1, 2))
    check_same("q", q, "position_ids", position_ids, "device")
    _check_bt("position_ids", position_ids, b, t, 2, "(B, T) or (T,)")
    check_tensor("inv_freq", inv_freq, dtypes=(torch.float32,), ndim=1)
    check_same("q", q, "inv_freq", inv_freq, "device")
    if inv_freq.shape[0] != d // 2:
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; accepted: ({d // 2},) = head_dim // 2 "
                         f"(partial rotary is not supported)")
    check_last_dim_contiguous("inv_freq", inv_freq)
    return _run(q, k, None, None, position_ids, inv_freq, inplace)


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
_LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _qk(params: dict, dtype: torch.dtype, device: str):
    b, hq, hk, t, d = params["b"], params["hq"], params["hk"], params["t"], params["d"]

    def make(h):
        if params.get("transposed"):  # HF: proj(x).view(B, T, H, D).transpose(1, 2)
            return torch.randn(b, t, h, d, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
        return torch.randn(b, h, t, d, device=device, dtype=dtype).requires_grad_()

    return make(hq), make(hk)


def _positions(params: dict, device: str) -> torch.Tensor:
    """Positions with a random start per row (a KV-cache offset), as (B, T) or (T,)."""
    b, t = params["b"], params["t"]
    start = torch.randint(0, params.get("max_start", 4000), (b, 1), device=device)
    pos = start + torch.arange(t, device=device)
    return pos[0] if params.get("pos_1d") else pos


def _inv_freq(params: dict, device: str) -> torch.Tensor:
    rope_type = params.get("rope_type", "default")
    scaling = _LLAMA3 if rope_type == "llama3" else {}
    return reference.rope_inv_freq(params["d"], params.get("theta", 500000.0), rope_type, **scaling).to(device)


def _make_args(params: dict, dtype: torch.dtype, device: str):
    q, k = _qk(params, dtype, device)
    cos_dtype = torch.float32 if params.get("fp32_cos") else dtype
    cos, sin = reference.rope_cos_sin(_positions(params, device), _inv_freq(params, device), dtype=cos_dtype)
    if params.get("cos_2d"):
        cos, sin = cos[0], sin[0]
    return (q, k, cos, sin), {}


def _make_pair_args(params: dict, dtype: torch.dtype, device: str):
    """GLM-style tables: cos/sin of R = ``r`` (default D) rotary dims, pairs rotated adjacent."""
    q, k = _qk(params, dtype, device)
    inv_freq = reference.rope_inv_freq(params.get("r", params["d"]), 10000.0).to(device)
    cos, sin = reference.rope_cos_sin(_positions(params, device), inv_freq, dtype=dtype)
    return (q, k, cos, sin), {"interleaved": True}


def _make_position_args(params: dict, dtype: torch.dtype, device: str):
    q, k = _qk(params, dtype, device)
    return (q, k, _positions(params, device), _inv_freq(params, device)), {}


_DTYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


# The integers whose multiple-of-16 hint a launch may carry (the rest are in the kernel's
# do_not_specialize list, always plain): q/k/out and cos/sin strides, and ``half``.
_HINTABLE_INTS = ("half", "stride_qb", "stride_qh", "stride_qt", "stride_kb", "stride_kh", "stride_kt",
                  "stride_qob", "stride_qoh", "stride_qot", "stride_kob", "stride_koh", "stride_kot",
                  "stride_cb", "stride_ct", "stride_sb", "stride_st")
# Which of them carry it: none (odd strides), all (head dims 32, 64, 96, 128, 256: every stride of
# a (B, T, H, D) or (B, H, T, D) layout and D/2 are multiples of 16), all but ``half`` (head dims
# 80, 112, ...: strides multiples of 16, D/2 = 40, 56 not), the last for BLOCK_D >= 64 only: with
# D/2 of 17-31 (no Llama-family size) fp32 from positions spilled 4 bytes on sm_90, the predicate
# spill _gpu_block_t describes. A launch with another mix compiles a build the report did not
# check; tests/test_build_report.py dry-runs the Llama-shape launches against the report.
_HINT_VARIANTS = {"": (), " %16": _HINTABLE_INTS, " %16 but half": _HINTABLE_INTS[1:]}


def _build_configs(from_positions: bool, interleaved: bool = False) -> list[KernelBuild]:
    """BLOCK_D (16..128, head_dim up to 256) x q dtype x cos dtype (q's or fp32) or position
    dtype (int32/int64) x direction x integer hints (_HINT_VARIANTS), for one pairing (halves,
    or adjacent pairs: ``interleaved``, which only the cos/sin path takes)."""
    builds = []
    ints = ("seq_len", "n_q_heads", "n_k_heads", "heads_per_program", *_HINTABLE_INTS, "stride_pb", "stride_pt")
    for q_ptr in _DTYPES.values():
        extras = ("*i32", "*i64") if from_positions else sorted({q_ptr, "*fp32"})
        for extra in extras:
            if from_positions:
                ptrs = {"COS": "*fp32", "SIN": "*fp32", "POS": extra, "INV_FREQ": "*fp32"}
            else:
                ptrs = {"COS": extra, "SIN": extra, "POS": extra, "INV_FREQ": extra}
            for block_d in (16, 32, 64, 128):
                for backward in (False, True):
                    for hints, hinted in _HINT_VARIANTS.items():
                        if hints == " %16 but half" and block_d < 64:
                            continue
                        sig = {"Q": q_ptr, "K": q_ptr, "Q_OUT": q_ptr, "K_OUT": q_ptr, **ptrs}
                        sig.update({name: "i32:16" if name in hinted else "i32" for name in ints})
                        if from_positions:  # the launcher passes 0 for the unused cos/sin strides
                            sig.update(dict.fromkeys(("stride_cb", "stride_ct", "stride_sb", "stride_st"), "i32:16"))
                        builds.append(KernelBuild(
                            _k.rotary_kernel, sig,
                            {"FROM_POSITIONS": from_positions, "BACKWARD": backward, "INTERLEAVED": interleaved,
                             "BLOCK_T": _gpu_block_t(block_d, from_positions), "BLOCK_D": block_d},
                            num_warps=4,
                            label=f"rotary {q_ptr[1:]} {extra[1:]} D/2<={block_d}{' bwd' if backward else ''}"
                                  f"{' pairs' if interleaved else ''}{hints}"))
    return builds


_CASES = (
    OpCase("b3-t77-d128-gqa4", {"b": 3, "hq": 4, "hk": 1, "t": 77, "d": 128}),
    OpCase("t1-d64-cos2d", {"b": 1, "hq": 4, "hk": 4, "t": 1, "d": 64, "cos_2d": True}),
    OpCase("b2-t33-d80-transposed", {"b": 2, "hq": 4, "hk": 2, "t": 33, "d": 80, "transposed": True}),
    OpCase("t17-d96", {"b": 1, "hq": 3, "hk": 1, "t": 17, "d": 96}),
    OpCase("t9-d256-gqa8", {"b": 2, "hq": 8, "hk": 1, "t": 9, "d": 256, "transposed": True}),
    OpCase("b2-t4096-llama3-8b", {"b": 2, "hq": 32, "hk": 8, "t": 4096, "d": 128, "transposed": True},
           cuda_only=True),
)
_PAIR_CASES = (  # GLM / GLM-4 rotate half the head (partial_rotary_factor 0.5); Helium, Ernie 4.5 all of it
    OpCase("b3-t77-d128-r64-gqa4", {"b": 3, "hq": 4, "hk": 1, "t": 77, "d": 128, "r": 64, "transposed": True}),
    OpCase("t17-d96", {"b": 1, "hq": 3, "hk": 1, "t": 17, "d": 96}),
    OpCase("b2-t9-d80-r40", {"b": 2, "hq": 4, "hk": 2, "t": 9, "d": 80, "r": 40}),
    OpCase("b2-t4096-glm4-9b", {"b": 2, "hq": 32, "hk": 2, "t": 4096, "d": 128, "r": 64, "transposed": True},
           cuda_only=True),
)
_POSITION_CASES = (
    OpCase("b3-t77-d128-llama3", {"b": 3, "hq": 4, "hk": 1, "t": 77, "d": 128, "rope_type": "llama3",
                                  "max_start": 100000}),
    OpCase("t1-d64-pos1d", {"b": 1, "hq": 4, "hk": 4, "t": 1, "d": 64, "pos_1d": True, "theta": 10000.0}),
    OpCase("t33-d80-transposed", {"b": 2, "hq": 4, "hk": 2, "t": 33, "d": 80, "transposed": True}),
    OpCase("b1-t16384-llama3-8b", {"b": 1, "hq": 32, "hk": 8, "t": 16384, "d": 128, "rope_type": "llama3",
                                   "transposed": True}, cuda_only=True),
)

OP_SPECS = [
    OpSpec("rotary", apply_rotary_pos_emb, reference.apply_rotary_pos_emb, _make_args, _CASES,
           kernels=("rotary",), names=("q", "k", "cos", "sin"), output_names=("q_rot", "k_rot"),
           build_configs=lambda: _build_configs(False)),
    OpSpec("rotary_pairs", apply_rotary_pos_emb, reference.apply_rotary_pos_emb, _make_pair_args, _PAIR_CASES,
           kernels=("rotary",), names=("q", "k", "cos", "sin"), output_names=("q_rot", "k_rot"),
           build_configs=lambda: _build_configs(False, interleaved=True)),
    OpSpec("rotary_from_positions", apply_rotary_pos_emb_from_positions,
           reference.functional.apply_rotary_pos_emb_from_positions, _make_position_args, _POSITION_CASES,
           kernels=("rotary",), names=("q", "k", "position_ids", "inv_freq"), output_names=("q_rot", "k_rot"),
           build_configs=lambda: _build_configs(True)),
]
