"""Attention as a patched model calls it: pick the kernel that fits the mask, or fall back.

Hugging Face hands an attention function a boolean mask of shape (B, 1, Tq, Tk) (True = attend),
or None when plain causal attention is meant. The kernels do not take arbitrary masks, so
:func:`attend` recognises the masks that real models make and maps each onto a kernel:

* ``None``: causal flash attention (HF's empty-static-cache prefill keeps only the first Tq
  keys, top-left aligned, exactly as HF's SDPA path does), or every key when not causal;
  Tq <= 16 without autograd goes to the decode kernel.
* every row keeps a prefix of the keys, causal at its end (a static cache during decoding):
  the decode kernel with per-sequence ``cache_seqlens`` (or flash attention on the prefix).
* every row keeps one contiguous run of keys: left- or right-padded batches (Tq == Tk) and
  left-padded caches (Tq < Tk, the run ending at the last key, or for a static cache at the
  same slot in every row, its unwritten end cut off). Tq <= 16 without autograd, every run
  ending where the queries do (left padding: HF's batched ``generate``): the decode kernel
  with each row's left pad, reading the cache in place. Otherwise the padding is removed and
  the packed sequences go through varlen flash attention. Padding queries get what the mask gives
  them: 0 where it shows them no key (left padding), and attention over their row's whole run
  where it shows them all of it (right padding, causal: a second, non-causal varlen call), so
  a loss over padded positions matches HF's SDPA path too. Under a sliding window the mask
  shows a padding query only the part of the run its window covers, which moves with the
  query: those rows (at most a window's width per sequence) run in PyTorch, counted in
  :data:`FALLBACKS`, the rest on the kernels. (HF's eager attention gives a query
  that sees no key equal weights over every key: for a patched model that ran eager attention,
  :func:`eager_blind_rows` recomputes those rows as eager does.)
* several sequences in each row, each attending only to itself (position_ids that restart:
  padding-free packing; Llama 4's chunked attention, a sequence per chunk): varlen flash
  attention on the flattened batch, sequence boundaries read off the mask; padding tokens that
  see no key and that no query sees are left out of the packing (their rows 0).
* anything else (custom masks, a mask that differs between heads, dropout): PyTorch SDPA
  with the mask, counted in :data:`FALLBACKS` (the first
  of each reason also logged as a warning) so nothing slow happens silently.

Soft-capped scores (``softcap``, Gemma 2) take the same kernels, every one of which caps; the
fallbacks then compute in plain PyTorch (SDPA has no cap).

Masks that broadcast (batch or query dim 1) are read as their broadcast; one with a dim other
than 1 or the scores' own raises ValueError. Recognising a mask compares it with the mask the
kernel implements: a few device syncs per distinct mask tensor (HF passes the same mask object
to every layer, so once per forward; a mask edited in place is looked at again, as far as its
version counter sees it: not through ``.data`` or numpy, nor for a mask made under
``torch.inference_mode()``, which has no counter; pass a new mask instead).

Under torch.compile that inspection would break the graph in every layer, so a mask goes into
one custom op (:func:`masked_op`) that torch.compile does not look into: the mask is read and
served as above when the compiled graph runs. It returns its flash calls' softmax statistics
beside the output, and its backward replays the call with them: the flash backward runs on the
forward's output, no attention forward runs again (rows served in PyTorch are computed again, and
so is a flash call with more sequences x heads than one launch takes).
HF builds no mask for unpadded
batches (see ``forwards.hf_attention_mask``). Without a cache (``use_cache=False``, HF's choice
in training with checkpointing) transformers checks position_ids for packed sequences, which it
cannot rule out while tracing: a patched causal LM tells it that positions it generated itself
are not packed (``forwards.find_packed_sequence_indices``: no mask), and position_ids passed in
(a packing collator's) get a mask, served by that op.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import weakref

import torch
import torch.nn.functional as F

from . import ops

__all__ = ["attend", "attend_with_weights", "FALLBACKS", "DECODE_MAX_QUERIES"]

DECODE_MAX_QUERIES = 16  # the decode kernel packs up to this many query tokens per sequence

#: How often :func:`attend` fell back to SDPA, by reason (reset it with ``FALLBACKS.clear()``).
FALLBACKS: collections.Counter = collections.Counter()
_WARNED: set[str] = set()
log = logging.getLogger("fastllama")


def _fall_back(reason: str) -> None:
    """Counts a fallback; the first of each reason is also logged as a warning (once per process:
    HF calls attention once per layer and step)."""
    FALLBACKS[reason] += 1
    if reason not in _WARNED and not torch.compiler.is_compiling():  # (dynamo: the counter only)
        _WARNED.add(reason)
        log.warning("fastllama: attention fell back to PyTorch (%s); counted in fastllama.attention.FALLBACKS",
                    reason)


@dataclasses.dataclass
class _Plan:
    kind: str  # "prefix", "runs", "packed" or "other"
    lengths: torch.Tensor | None = None  # (B,) keys kept per row
    starts: torch.Tensor | None = None  # (B,) first kept key ("runs")
    # "runs", Tq == Tk: flat indices (b * Tq + t) of the padding queries that the mask lets see
    # their row's whole run (right padding under a causal mask), or None when there are none
    pad_rows: torch.Tensor | None = None
    # ... or that see only part of it (a sliding window): where to gather them (_PadWindow)
    pad_window: "_PadWindow | None" = None
    # keys at and past this slot are masked for every query (the unwritten end of a static
    # cache): the plan is for k[:, :, :key_end]
    key_end: int | None = None
    cu_seqlens: torch.Tensor | None = None  # "packed": sequence boundaries in the flattened (B * T) tokens
    # "packed" with tokens that no query sees (padding): the flat (b * T + t) indices of the others,
    # which the sequences are packed from (cu_seqlens counts in them); None: every token
    index: torch.Tensor | None = None
    # "packed", padding queries that see one whole sequence (pad_rows, grouped by it): their
    # boundaries per sequence, for a non-causal varlen call against the sequences' keys
    pad_cu: torch.Tensor | None = None
    packing: tuple | None = None  # "runs": what _varlen packs by, made by its first call (_packing)
    common_length: int | None = None  # "prefix": the length every row shares, None if they differ
    as_runs: "_Plan | None" = None  # "prefix" of differing lengths with autograd: the "runs" plan it takes
    bounds: tuple | bool | None = None  # decode_bounds' answer, once computed (False: none)
    reason: str = "mask is not causal attention over one run of tokens per row"  # "other": why


@dataclasses.dataclass
class _PadWindow:
    """Padding queries that see part of their row's run through a window (right padding under a
    sliding window; left padding under a two-sided one): HF's mask shows the query at slot t the
    run's keys within t's window, a part of the run that moves with t, which no kernel call can
    express, as varlen aligns each sequence's queries bottom-right. Only the
    queries that see a key are computed, each sequence's gathered into a row of ``P`` queries
    against the ``S`` keys its windows cover (at most the window's width past the run's end:
    later queries see nothing), by PyTorch attention under the mask's own (B, 1, P, S) part."""
    batch: torch.Tensor   # (N,) sequence of each such query
    slot: torch.Tensor    # (N,) its slot t
    rank: torch.Tensor    # (N,) its place among its sequence's queries, < P
    keys: torch.Tensor    # (B, S) slots of the keys gathered for each sequence (clamped to Tk - 1)
    mask: torch.Tensor    # (B, 1, P, S) which of those keys each gathered query sees


def _pad_window(m: torch.Tensor, pad_attends: torch.Tensor) -> _PadWindow:
    """The gather plan of the padding queries ``pad_attends`` (B, Tq) that see a key of ``m``
    (B, Tq, Tk); a few host syncs (P and S), once per mask."""
    B, Tq, Tk = m.shape
    batch, slot = pad_attends.nonzero(as_tuple=True)
    counts = pad_attends.sum(-1)
    rank = torch.arange(batch.numel(), device=m.device) - F.pad(counts.cumsum(0), (1, 0))[batch]
    seen = (m & pad_attends[:, :, None]).any(1)  # (B, Tk): keys some padding query sees
    j = torch.arange(Tk, device=m.device)
    lo = torch.where(seen, j, Tk).amin(-1)
    hi = torch.where(seen, j + 1, 0).amax(-1)
    P, S = int(counts.max()), int((hi - lo).clamp(min=0).max())
    slots = lo.clamp(max=Tk - 1)[:, None] + torch.arange(S, device=m.device)
    in_span = slots < hi[:, None]  # (on the slots before clamping: a clamped slot repeats the last key)
    keys = slots.clamp(max=Tk - 1)
    mask = torch.zeros(B, P, S, dtype=torch.bool, device=m.device)
    mask[batch, rank] = m[batch, slot][torch.arange(batch.numel(), device=m.device)[:, None], keys[batch]] & in_span[batch]
    return _PadWindow(batch, slot, rank, keys, mask[:, None])


# What was read off the last few masks: (a weak reference to the mask, a key, the answer). HF
# passes the same mask object to every layer of a kind (Gemma 2/3 alternate two, a windowed and a
# full one), so a forward reads each mask once. The key holds the mask's version counter, so a
# mask edited in place is looked at again. A weak reference cannot be fooled by a new tensor at a
# recycled address (a dead one answers None), and does not keep the mask alive past its forward
# into the next one's peak: a padded batch's (B, 1, T, T) boolean mask is 64 MiB per sequence at
# 8k tokens.
_MASK_MEMO: collections.deque = collections.deque(maxlen=4)
_last_plan: tuple[weakref.ref, tuple, _Plan] | None = None  # (the latest plan: tests read it)


def _memo(mask: torch.Tensor, key: tuple, compute):
    """``compute()`` once per (mask object, its version, ``key``) among the last few asked."""
    # an inference-mode tensor has no version counter: identity alone (see the module docstring)
    key = (None if mask.is_inference() else mask._version, tuple(mask.shape), *key)
    for ref, k, value in _MASK_MEMO:
        if ref() is mask and k == key:
            return value
    value = compute()
    _MASK_MEMO.append((weakref.ref(mask), key, value))
    return value


def _window_allows(q_pos, k_pos, window):
    ok = torch.ones_like(q_pos >= k_pos)
    if window is not None:
        left, right = window
        if left >= 0:
            ok &= k_pos >= q_pos - left
        if right >= 0:
            ok &= k_pos <= q_pos + right
    return ok


def _expected(keep_k, q_pos, j, causal, window):
    """The mask a kernel implements: kept keys, causal and window in slot positions."""
    m = keep_k[:, None, :] & _window_allows(q_pos, j, window)
    return m & (j <= q_pos) if causal else m


def _implicit_mask(Tq: int, Tk: int, causal: bool, window, device) -> torch.Tensor:
    """The (1, 1, Tq, Tk) mask :func:`attend` applies when HF passes none: causal aligned
    bottom-right (query i at key slot Tk - Tq + i), one query sees every key (decoding), except
    HF's empty-static-cache prefill (causal, Tq > 1, Tk > Tq: keys past Tq unwritten, top-left);
    not causal: every key (within the window)."""
    static_prefill = causal and Tq > 1 and Tk > Tq
    q_pos = torch.arange(Tq, device=device)[:, None] + (0 if static_prefill else Tk - Tq)
    k_pos = torch.arange(Tk, device=device)[None, :]
    keep = _window_allows(q_pos, k_pos, window)
    if causal and Tq > 1:
        keep = keep & (k_pos <= q_pos)
    if static_prefill:
        keep = keep & (k_pos < Tq)
    return keep[None, None]


def _runs_plan(m, keep_k, n, s, causal, window) -> _Plan | None:
    """The plan for a (B, Tq, Tk) mask whose rows each keep one contiguous run of keys
    [s_b, s_b + n_b), or None when the kernels cannot serve it."""
    B, Tq, Tk = m.shape
    i = torch.arange(Tq, device=m.device)[None, :, None]
    j = torch.arange(Tk, device=m.device)[None, None, :]
    # prefix: run [0, e_b), queries at its end (a static cache, decoding); with a sliding window
    # the run starts where the first query's window does, and the kernels apply the window
    ends = s + n
    prefix_q = ends[:, None, None] - Tq + i
    if causal and bool((ends >= Tq).all()) and torch.equal(m, _expected(j[0] < ends[:, None], prefix_q, j, causal,
                                                                       window)):
        common = int(ends[0]) if bool((ends == ends[0]).all()) else None
        return _Plan("prefix", lengths=ends.to(torch.int32), common_length=common)
    # runs, Tq == Tk: queries are the same tokens as the keys (padded batch, prefill/training)
    if Tq == Tk and torch.equal(m & keep_k[:, :, None], _expected(keep_k, i, j, causal, window) & keep_k[:, :, None]):
        # The padding queries' rows: HF's causal mask lets a query after a right-padded run
        # see the whole run, one before a left-padded run nothing. Their outputs reach the
        # loss when labels cover padding, so they are computed as the mask says: whole run,
        # or nothing (0); any other row goes to SDPA.
        pad_attends = m.any(-1) & ~keep_k
        if not bool(pad_attends.any()):
            return _Plan("runs", lengths=n, starts=s)
        if torch.equal(m[pad_attends], keep_k[:, None, :].expand_as(m)[pad_attends]):
            return _Plan("runs", lengths=n, starts=s, pad_rows=pad_attends.flatten().nonzero().squeeze(1))
        # or, under a sliding window, the part of the run their window covers
        seen = keep_k[:, None, :] & _window_allows(i, j, window)
        if window is not None and torch.equal(m[pad_attends], seen.expand_as(m)[pad_attends]):
            return _Plan("runs", lengths=n, starts=s, pad_window=_pad_window(m, pad_attends))
        return None
    # runs, Tq < Tk: run [s_b, Tk), queries the last Tq slots (left-padded cache, decoding)
    if Tq < Tk and bool(((s + n) == Tk).all()) and bool((n >= Tq).all()) and \
            torch.equal(m, _expected(keep_k, Tk - Tq + i, j, causal, window)):
        return _Plan("runs", lengths=n, starts=s)
    return None


def _packed_plan(m, causal, window) -> _Plan | None:
    """Several sequences packed in each row (HF's mask for position_ids that restart, as
    padding-free training collators make; Llama 4's chunked attention, a sequence per chunk):
    query i sees key j iff both are in the same sequence (and causal / window allow it). A
    sequence starts where a query does not see the key before it; the plan holds their
    boundaries in the flattened B * T tokens, for varlen attention. Tokens that no query sees
    (padding in a padded batch's chunked attention) belong to no sequence: the plan then packs the
    others (``index``); such a token's row is 0 where it sees no key (left padding), and where it
    sees every key of one sequence (right padding: the real tokens of its chunk) it attends to
    them in a second, non-causal call (``pad_rows``, ``pad_cu``)."""
    B, T, _ = m.shape
    i = torch.arange(T, device=m.device)
    sees, seen = m.any(-1), m.any(1)  # (B, T)
    if bool((seen & ~sees).any()):  # a query sees a token that sees nothing
        return None
    member = sees & seen  # the tokens of some sequence
    pads = sees & ~seen  # padding queries that see keys
    starts = member.clone()
    starts[:, 1:] &= ~m[:, i[1:], i[1:] - 1]
    seq = torch.where(member, starts.flatten().cumsum(0).view(B, T), 0)  # (ids 1, 2, ... in token order; 0: none)
    expected = (seq[:, :, None] == seq[:, None, :]) & member[:, :, None] & _window_allows(i[:, None], i[None, :],
                                                                                          window)
    if causal:
        expected &= i[None, :] <= i[:, None]
    pad_seq = torch.where(pads, seq.gather(1, m.int().argmax(-1)), 0)  # (the sequence of a pad's first key)
    expected |= pads[:, :, None] & (seq[:, None, :] == pad_seq[:, :, None]) & member[:, None, :]
    if not torch.equal(m, expected):
        return None
    index = None if bool(member.all()) else member.flatten().nonzero().squeeze(1)
    kept_starts = starts.flatten() if index is None else starts.flatten()[index]
    cu = F.pad(kept_starts.nonzero().squeeze(1), (0, 1), value=kept_starts.numel()).to(torch.int32)
    pad_rows = pad_cu = None
    if bool(pads.any()):
        flat = pads.flatten().nonzero().squeeze(1)
        their = pad_seq.flatten()[flat]
        pad_rows = flat[torch.sort(their, stable=True).indices]
        counts = torch.bincount(their - 1, minlength=cu.numel() - 1)
        pad_cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    return _Plan("packed", cu_seqlens=cu, index=index, pad_rows=pad_rows, pad_cu=pad_cu)


def _classify(mask: torch.Tensor, shape: tuple, causal: bool, window) -> _Plan:
    """Which kernel-shaped mask is ``mask`` (broadcastable to ``shape`` = (B, Hq, Tq, Tk))?
    A few host syncs, once per mask object (HF passes the same one to every layer)."""
    global _last_plan
    plan = _memo(mask, ("plan", shape, causal, window), lambda: _classify_now(mask, shape, causal, window))
    _last_plan = (weakref.ref(mask), shape, plan)
    return plan


def _classify_now(mask: torch.Tensor, shape: tuple, causal: bool, window) -> _Plan:
    B, Hq, Tq, Tk = shape
    try:
        broadcasts = torch.broadcast_shapes(mask.shape, shape) == torch.Size(shape)
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to the "
                         f"attention scores' shape (B, Hq, Tq, Tk) = {shape}")
    m = mask.expand(shape)  # a view: broadcast batch / query dims cost nothing
    if mask.dim() >= 3 and mask.shape[-3] > 1 and not torch.equal(m, m[:, :1].expand(shape)):
        plan = _Plan("other", reason="mask differs between heads")
    else:
        m = m[:, 0]
        keep_k = m.any(dim=1)
        n = keep_k.sum(-1)
        s = torch.where(n > 0, keep_k.int().argmax(-1), 0)
        j = torch.arange(Tk, device=m.device)[None, :]
        plan = None
        if torch.equal(keep_k, (j >= s[:, None]) & (j < (s + n)[:, None])):  # one contiguous run per row
            plan = _runs_plan(m, keep_k, n, s, causal, window)
            # A static cache's unwritten end: every row's run ends at the same slot e < Tk
            # (left-padded prompts). The plan is then for the first e keys.
            ends = (s + n)[n > 0]
            if plan is None and ends.numel() and bool((ends == ends[0]).all()):
                e = int(ends[0])
                if Tq <= e < Tk:
                    plan = _runs_plan(m[..., :e], keep_k[:, :e], n, s, causal, window)
                    if plan is not None:
                        plan.key_end = e
        if plan is None and Tq == Tk:
            plan = _packed_plan(m, causal, window)
        plan = plan or _Plan("other")
    return plan


def _decode_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window, causal: bool, softcap, sinks=None) -> bool:
    """The decode kernel is forward-only and causal (bottom-right), and caps 16-bit scores at
    up to ``ops.decode.MAX_16BIT_SOFTCAP``; of a window it takes the left bound (the right one
    is the causal bound: 0, or -1 which causal makes 0)."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sinks))
    return (ops.decode.takes_softcap(softcap, q.dtype) and not needs_grad and (window is None or window[1] in (0, -1)) and q.shape[2] <= DECODE_MAX_QUERIES
            and (causal or q.shape[2] == 1) and k.shape[2] >= q.shape[2])


def decode_bounds(plan: _Plan, Tk: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(lengths, left pads or None), int32 (B,), with which the decode kernels serve ``plan``
    over its first ``Tk`` keys (after ``key_end``): a "prefix" plan, or a "runs" plan whose
    queries sit at the end of every row's run (left padding: decoding, or a short padded prefill
    whose padding queries see no key). None for any other (right padding puts queries past their
    run's end). One host sync per plan (memoized per mask). The caller checks that the call is
    one the kernel serves (:func:`_decode_ok`: causal, few queries, no autograd)."""
    if plan.bounds is None:
        plan.bounds = False
        if plan.kind == "prefix":
            plan.bounds = (plan.lengths.to(torch.int32), None)
        elif plan.kind == "runs" and plan.pad_rows is None and plan.pad_window is None:
            ends = plan.starts + plan.lengths
            if bool((ends == Tk).all()):
                plan.bounds = (ends.to(torch.int32), plan.starts.to(torch.int32))
    return plan.bounds or None


def _decode_window(window):
    """``window`` as decode attention takes it: ``(left, 0)``."""
    return None if window is None else (window[0], 0)


def _packing(plan: _Plan, B: int, Tq: int, Tk: int, device) -> tuple:
    """(idx_q, cu_q, idx_k, cu_k, cu_p) of a "runs" plan: the flat (b * T + t) rows of the
    queries and keys that varlen attention packs, their int32 sequence boundaries, and those of
    the padding queries (``pad_rows``) that see their whole run. Kept on the plan, which is
    memoized per mask: every layer packs alike without a host sync of its own."""
    key = (Tq, Tk, device)
    if plan.packing is not None and plan.packing[0] == key:
        return plan.packing[1]
    pos = torch.arange(Tk, device=device)[None] - plan.starts[:, None]
    idx_k = ((pos >= 0) & (pos < plan.lengths[:, None])).flatten().nonzero().squeeze(1)
    cu_k = F.pad(plan.lengths.cumsum(0), (1, 0)).to(torch.int32)
    if Tq == Tk:
        idx_q, cu_q = idx_k, cu_k
    else:
        idx_q = torch.arange(B * Tq, device=device)
        cu_q = torch.arange(0, (B + 1) * Tq, Tq, device=device, dtype=torch.int32)
    cu_p = None
    if plan.pad_rows is not None:
        counts = torch.bincount(plan.pad_rows // Tq, minlength=B)
        cu_p = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    plan.packing = (key, (idx_q, cu_q, idx_k, cu_k, cu_p))
    return plan.packing[1]


def _varlen(q, k, v, plan: _Plan, causal, scale, window, deterministic, softcap, keep, sinks=None):
    """Packs each row's run of keys (and, when Tq == Tk, of queries), runs varlen flash
    attention, and scatters the result back (0 for padding queries). ``keep``: see
    :class:`_FlashStats`."""
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    idx_q, cu_q, idx_k, cu_k, cu_p = _packing(plan, B, Tq, Tk, q.device)

    def pack(t, idx):  # (B, H, T, D) -> (1, H, N, D): a strided view of the gathered rows
        T = t.shape[2]
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D)[idx].transpose(0, 1).unsqueeze(0)

    k_packed, v_packed = pack(k, idx_k), pack(v, idx_k)
    out = _flash(keep, idx_q, pack(q, idx_q), k_packed, v_packed, causal=causal, scale=scale, window=window,
                 cu_seqlens=cu_q, cu_seqlens_k=cu_k, deterministic=deterministic, softcap=softcap, sinks=sinks)
    # (squeeze, not [0]: its backward is a view, where select's writes the gradient into zeros)
    full = out.new_zeros(B * Tq, Hq, D).index_copy_(0, idx_q, out.squeeze(0).transpose(0, 1))
    if plan.pad_rows is not None:  # padding queries that see their row's whole run: non-causal
        pads = _flash(keep, plan.pad_rows, pack(q, plan.pad_rows), k_packed, v_packed, causal=False, scale=scale,
                      cu_seqlens=cu_p, cu_seqlens_k=cu_k, deterministic=deterministic, softcap=softcap, sinks=sinks)
        full.index_copy_(0, plan.pad_rows, pads.squeeze(0).transpose(0, 1))
    if plan.pad_window is not None:  # padding queries that see part of their row's run (a window)
        pw = plan.pad_window
        _fall_back("padding queries that see part of their run through a sliding window (those rows)")
        rows = torch.arange(B, device=q.device)[:, None]
        q_pad = q.new_zeros(B, pw.mask.shape[2], Hq, D).index_put((pw.batch, pw.rank), q[pw.batch, :, pw.slot])
        k_pad, v_pad = (t[rows, :, pw.keys].transpose(1, 2) for t in (k, v))  # (B, Hk, S, D)
        pads = _sdpa(q_pad.transpose(1, 2), k_pad, v_pad, pw.mask, False, scale, 0.0, softcap, sinks)
        full.index_copy_(0, pw.batch * Tq + pw.slot, pads[pw.batch, :, pw.rank])
    return full.view(B, Tq, Hq, D).transpose(1, 2)


def attend(q, k, v, mask: torch.Tensor | None = None, *, causal: bool = True, scale: float | None = None,
           window: tuple[int, int] | None = None, dropout: float = 0.0, deterministic: bool = True,
           softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention for patched models: q (B, Hq, Tq, D), k/v (B, Hk, Tk, D) -> (B, Hq, Tq, D).

    ``mask`` is HF's boolean (B, 1, Tq, Tk) mask (any shape that broadcasts to (B, Hq, Tq, Tk)
    is accepted) or None (see the module docstring for how each shape of mask is served).
    ``window``, ``deterministic``, ``softcap`` and ``sinks`` (gpt-oss's attention sinks, (Hq,))
    are as in :func:`ops.flash_attention`. With sinks, a masked call under torch.compile runs in
    plain PyTorch (counted): :func:`masked_op` takes no sinks. v's heads may be narrower than q's
    and k's (DeepSeek-V3's multi-head latent attention: 128 against 192): the kernels then get v
    padded with zeros to q's head dim, and the output is cut back to v's.
    """
    q, k, v = ops.attention.autocast_inputs(q, k, v)  # SDPA's dtypes under autocast (all paths below)
    _check_sinks(sinks, q)
    if v.shape[-1] < q.shape[-1] == k.shape[-1]:  # (zero columns of v: output columns of 0, cut off)
        return attend(q, k, F.pad(v, (0, q.shape[-1] - v.shape[-1])), mask, causal=causal, scale=scale,
                      window=window, dropout=dropout, deterministic=deterministic, softcap=softcap,
                      sinks=sinks)[..., :v.shape[-1]]
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    flash = lambda q, k, v, **kw: ops.flash_attention(q, k, v, scale=scale, window=window, softcap=softcap,
                                                      deterministic=deterministic, sinks=sinks, **kw)
    if dropout > 0:
        _fall_back("attention dropout > 0")
        if mask is None and window is None and (Tq == Tk or not causal):
            # no mask for SDPA's flash backend: is_causal (top-left) is attend's causal when Tq == Tk
            return _sdpa(q, k, v, None, causal and Tq > 1, scale, dropout, softcap, sinks)
        if mask is None:  # the mask attend implies (bottom-right causal, window)
            mask = _implicit_mask(Tq, Tk, causal, window, q.device)
        return _sdpa(q, k, v, mask, False, scale, dropout, softcap, sinks)
    if mask is not None and mask.dtype != torch.bool:
        _fall_back("non-boolean mask")
        return _sdpa(q, k, v, mask, False, scale, 0.0, softcap, sinks)
    if mask is None:
        if causal and Tq > 1 and Tk > Tq:  # HF: empty static cache prefill, keys past Tq are unwritten
            k, v = k[:, :, :Tq], v[:, :, :Tq]
        if _decode_ok(q, k, v, window, causal, softcap, sinks):
            seqlens = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
            return ops.decode_attention(q, k, v, seqlens, scale=scale, window=_decode_window(window), softcap=softcap,
                                        sinks=sinks)
        return flash(q, k, v, causal=causal and Tq > 1)
    if torch.compiler.is_compiling():
        # Reading a mask's contents is data-dependent: dynamo would break the graph in every
        # layer (an error under fullgraph=True). One opaque op reads it when the graph runs.
        if sinks is None and masked_op_serves(q, k, v):
            return masked_op(q, k, v, mask, causal=causal, scale=scale, window=window, deterministic=deterministic,
                             softcap=softcap)
        _fall_back("mask under torch.compile, decoding" if sinks is None else
                   "mask under torch.compile, with attention sinks")
        return _sdpa(q, k, v, mask, False, scale, 0.0, softcap, sinks)
    return _attend_masked(q, k, v, mask, causal, scale, window, deterministic, softcap, sinks=sinks)


def _attend_masked(q, k, v, mask, causal, scale, window, deterministic, softcap, keep: "_FlashStats | None" = None,
                   sinks: torch.Tensor | None = None):
    """:func:`attend` for a boolean mask, dropout 0, outside torch.compile's tracing. ``keep``:
    for :func:`masked_op`, which keeps the flash calls' statistics (see :class:`_FlashStats`;
    never with ``sinks``)."""
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    flash = lambda q, k, v, **kw: _flash(keep, None, q, k, v, scale=scale, window=window, softcap=softcap,
                                         deterministic=deterministic, sinks=sinks, **kw)
    plan = _classify(mask, (B, Hq, Tq, Tk), causal, window)
    if plan.key_end is not None:
        k, v = k[:, :, :plan.key_end], v[:, :, :plan.key_end]
    # a static cache's prefixes, and left-padded caches: the decode kernel reads the cache in
    # place (varlen attention would gather every row's run first, a copy of K and V per layer).
    # (not while keeping statistics: the backward differentiates what the forward ran)
    # (the kernel is causal: a bidirectional mask's runs take it only for one query, at the run's end)
    bounds = decode_bounds(plan, k.shape[2]) if keep is None and _decode_ok(q, k, v, window, causal, softcap,
                                                                             sinks) else None
    if bounds is not None:
        return ops.decode_attention(q, k, v, bounds[0], cache_leftpad=bounds[1], scale=scale,
                                    window=_decode_window(window), softcap=softcap, sinks=sinks)
    if plan.kind == "prefix":
        if plan.common_length is not None:
            n = plan.common_length
            return flash(q, k[:, :, :n], v[:, :, :n], causal=True)
        # differing prefixes: runs starting at 0, the queries at each run's end (Tq < Tk here),
        # a plan kept beside this one (with its packing: see _packing)
        if plan.as_runs is None:
            plan.as_runs = dataclasses.replace(plan, kind="runs", starts=torch.zeros_like(plan.lengths))
        plan = plan.as_runs
    if plan.kind == "runs":
        return _varlen(q, k, v, plan, causal, scale, window, deterministic, softcap, keep, sinks)
    if plan.kind == "packed" and plan.index is None:  # (B, H, T, D) -> (1, H, B * T, D) views, as the
        # projections lay them out
        out = flash(*(t.transpose(1, 2).reshape(1, -1, t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k, v)),
                    causal=causal, cu_seqlens=plan.cu_seqlens)
        return out.transpose(1, 2).reshape(B, Tq, Hq, -1).transpose(1, 2)
    if plan.kind == "packed":  # the tokens of some sequence gathered (padding left out), 0 for the others
        rows = plan.index
        packed = (t.transpose(1, 2).reshape(B * Tq, t.shape[1], t.shape[3])[rows].transpose(0, 1).unsqueeze(0)
                  for t in (q, k, v))
        q_packed, k_packed, v_packed = packed
        out = _flash(keep, rows, q_packed, k_packed, v_packed, scale=scale, window=window, softcap=softcap,
                     deterministic=deterministic, sinks=sinks, causal=causal, cu_seqlens=plan.cu_seqlens)
        full = out.new_zeros(B * Tq, Hq, out.shape[-1]).index_copy_(0, rows, out.squeeze(0).transpose(0, 1))
        if plan.pad_rows is not None:  # padding queries that see one whole sequence: non-causal over it
            q_pads = q.transpose(1, 2).reshape(B * Tq, Hq, q.shape[3])[plan.pad_rows].transpose(0, 1).unsqueeze(0)
            pads = _flash(keep, plan.pad_rows, q_pads, k_packed, v_packed, causal=False, scale=scale,
                          softcap=softcap, deterministic=deterministic, sinks=sinks, cu_seqlens=plan.pad_cu,
                          cu_seqlens_k=plan.cu_seqlens)
            full.index_copy_(0, plan.pad_rows, pads.squeeze(0).transpose(0, 1))
        return full.view(B, Tq, Hq, -1).transpose(1, 2)
    _fall_back(plan.reason)
    return _sdpa(q, k, v, mask, False, scale, 0.0, softcap, sinks)


# ---------------------------------------------------------------------------------------------
# Masks under torch.compile: one custom op that reads the mask when the compiled graph runs
# ---------------------------------------------------------------------------------------------
def masked_op_serves(q, k, v) -> bool:
    """Whether a masked call under torch.compile goes to :func:`masked_op`: with autograd, or
    more than ``DECODE_MAX_QUERIES`` queries. A decoding step without autograd stays on
    traceable PyTorch attention (counted), which a CUDA graph can capture (mode="reduce-overhead",
    HF's compiled static-cache decoding): the op syncs with the host."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return needs_grad or q.shape[2] > DECODE_MAX_QUERIES


def masked_op(q, k, v, mask, *, causal: bool = True, scale: float | None = None, window=None,
              deterministic: bool = True, softcap: float | None = None, eager_blind: bool = False) -> torch.Tensor:
    """:func:`attend` with a boolean ``mask`` (dropout 0) as the custom op
    ``fastllama::attend_masked``, which torch.compile traces as one call: the mask is read and
    served (kernels, counted fallbacks) when the graph runs, as in an eager call, without a graph
    break. With autograd it also returns the softmax statistics of its flash calls (fp32, two
    per query row and head), kept with q, k, v, the mask and the output for its backward
    (``fastllama::attend_masked_backward``), which replays the call with autograd: each flash
    call hands back its rows of the output as an autograd node whose backward is the flash
    backward (:class:`_FlashStats`), so no attention forward runs again; rows served in PyTorch
    (a fallback, counted in :data:`FALLBACKS` by both passes) are computed again, and so is a
    flash call too large for one launch (``ops.attention.MAX_GRID_Y``). Reading the
    mask syncs with the host, so the op is tagged ``cudagraph_unsafe``: inductor keeps it out of
    the CUDA graphs of ``mode="reduce-overhead"``. ``eager_blind``: then :func:`eager_blind_rows`
    (a model that ran HF's eager attention). q, k, v are first cast as :func:`attend` casts them
    under autocast. Returns (B, Hq, Tq, D)."""
    q, k, v = ops.attention.autocast_inputs(q, k, v)
    has_window = window is not None
    left, right = window if has_window else (0, 0)
    record = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return _attend_masked_op(q, k, v, mask, causal, scale, has_window, left, right, deterministic, softcap,
                             eager_blind, record)[0]


class _FlashStats:
    """What :func:`masked_op` keeps of its flash calls for its backward: their softmax statistics,
    (2, B * Tq, Hq) fp32 by the output row (b * Tq + t) each call computed (rows no call
    computed: 0). The forward records each call's rows. The backward replays the call with
    autograd and the forward's output ``out``: each flash call then returns its rows of ``out``
    as :func:`ops.attention.flash_attention_replayed` makes them, an autograd node whose backward
    is the flash backward, so no attention forward runs again. The PyTorch pieces (fallback
    rows, :func:`eager_blind_rows`) are computed again, with autograd, and so is a flash call that
    runs in several launches (more sequences x heads than ``ops.attention.MAX_GRID_Y``)."""

    def __init__(self, stats: torch.Tensor, out: torch.Tensor | None = None):
        self.stats, self.out = stats, out


def _flash(keep: _FlashStats | None, rows: torch.Tensor | None, q, k, v, **kw) -> torch.Tensor:
    """``ops.flash_attention(q, k, v, **kw)``, a call that computes the output rows ``rows`` of
    a masked call (flat b * Tq + t, in the call's order; None: all of them in order, a dense
    call or the packed view of every row), recording or replaying them in ``keep``."""
    if keep is None:
        return ops.flash_attention(q, k, v, **kw)
    if kw.pop("sinks", None) is not None:
        raise AssertionError("masked_op keeps no statistics with sinks: attend runs such calls in PyTorch")
    B, Hq, T = q.shape[:3]
    if keep.out is None:
        out, stats = ops.attention.flash_attention_with_stats(q, k, v, **kw)
        stats = stats.transpose(2, 3).reshape(2, B * T, Hq)  # rows in the call's order
        if rows is None:
            keep.stats.copy_(stats)
        else:
            keep.stats.index_copy_(1, rows, stats)
        return out
    rows_out = keep.out.transpose(1, 2).reshape(-1, Hq, keep.out.shape[-1])  # (b * Tq + t, Hq, D), a view
    out = rows_out.view(B, T, Hq, -1) if rows is None else rows_out[rows].unsqueeze(0)
    stats = keep.stats if rows is None else keep.stats[:, rows]
    replayed = ops.attention.flash_attention_replayed(q, k, v, out.transpose(1, 2),
                                                      stats.view(2, B, T, Hq).transpose(2, 3).contiguous(), **kw)
    return ops.flash_attention(q, k, v, **kw) if replayed is None else replayed


def _masked_call(q, k, v, mask, causal, scale, has_window, left, right, deterministic, softcap, eager_blind,
                 keep=None):
    out = _attend_masked(q, k, v, mask, causal, scale, (left, right) if has_window else None, deterministic, softcap,
                         keep)
    if eager_blind:
        out = eager_blind_rows(out, q, k, v, mask, scale=scale, softcap=softcap)[0]
    return out


def _laid_out_as(t: torch.Tensor | None, promised: torch.Tensor, device) -> torch.Tensor:
    """``t`` with the strides of ``promised`` (a meta tensor: what the fake implementation
    returns), copied only when they differ; zeros for None."""
    if t is not None and t.stride() == promised.stride():
        return t
    like = torch.empty_strided(promised.shape, promised.stride(), dtype=promised.dtype, device=device)
    return like.zero_() if t is None else like.copy_(t)


_HOST_SYNCING = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


@torch.library.custom_op("fastllama::attend_masked", mutates_args=(), tags=_HOST_SYNCING)
def _attend_masked_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, causal: bool,
                      scale: float | None, has_window: bool, left: int, right: int, deterministic: bool,
                      softcap: float | None, eager_blind: bool, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, the flash calls' statistics: :class:`_FlashStats`; with ``record`` False, for a call
    without autograd, an empty (2, 0, Hq))."""
    B, Hq, Tq = q.shape[:3]
    keep = _FlashStats(torch.zeros(2, B * Tq, Hq, device=q.device, dtype=torch.float32)) if record else None
    out = _masked_call(q, k, v, mask, causal, scale, has_window, left, right, deterministic, softcap, eager_blind,
                       keep)
    promised = _attend_masked_fake(q.to("meta"), k, v, mask, causal, scale, has_window, left, right, deterministic,
                                   softcap, eager_blind, record)[0]
    return _laid_out_as(out, promised, q.device), (keep.stats if record else q.new_zeros((2, 0, Hq),
                                                                                          dtype=torch.float32))


@_attend_masked_op.register_fake
def _attend_masked_fake(q, k, v, mask, causal, scale, has_window, left, right, deterministic, softcap, eager_blind,
                        record):
    B, Hq, Tq, D = q.shape  # (B, Tq, Hq, D) memory: HF's transpose(1, 2).contiguous() after it is free
    return (q.new_empty((B, Tq, Hq, D)).transpose(1, 2),
            q.new_empty((2, B * Tq if record else 0, Hq), dtype=torch.float32))


@torch.library.custom_op("fastllama::attend_masked_backward", mutates_args=(), tags=_HOST_SYNCING)
def _attend_masked_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, causal: bool,
                            scale: float | None, has_window: bool, left: int, right: int, deterministic: bool,
                            softcap: float | None,
                            eager_blind: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # A custom op runs with autograd's dispatch keys excluded (it sits below autograd): this one
    # records its own small graph, so it lifts that for its body (a private torch guard).
    with torch._C._SetExcludeDispatchKeyGuard(torch._C.DispatchKey.AutogradFunctionality, False), \
            torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        keep = _FlashStats(stats, out) if stats.shape[1] else None  # (none recorded: run it all again)
        again = _masked_call(qq, kk, vv, mask, causal, scale, has_window, left, right, deterministic, softcap,
                             eager_blind, keep)
        grads = torch.autograd.grad(again, (qq, kk, vv), grad, allow_unused=True)
    return tuple(_laid_out_as(g, torch.empty_like(t, device="meta"), t.device) for g, t in zip(grads, (q, k, v)))


@_attend_masked_backward.register_fake
def _(grad, q, k, v, mask, out, stats, causal, scale, has_window, left, right, deterministic, softcap, eager_blind):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _masked_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4], *output)
    ctx.args = inputs[4:12]  # (not record)


def _masked_backward(ctx, grad, grad_stats):
    dq, dk, dv = _attend_masked_backward(grad, *ctx.saved_tensors, *ctx.args)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("fastllama::attend_masked", _masked_backward, setup_context=_masked_setup_context)


def attend_with_weights(q, k, v, mask: torch.Tensor | None = None, *, causal: bool = True,
                        scale: float | None = None, window: tuple[int, int] | None = None,
                        dropout: float = 0.0, softcap: float | None = None, sinks: torch.Tensor | None = None,
                        sinks_after: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` in plain PyTorch, also returning the (B, Hq, Tq, Tk) attention probabilities:
    for ``output_attentions=True``, which no fused kernel can serve (they never form the matrix).
    Same mask conventions as :func:`attend`; probabilities as HF's eager attention makes them
    (softmax in fp32, cast to q's dtype, dropout after; scores soft-capped before the mask;
    with ``sinks``, the keys' probabilities beside the sink's, which is left out as gpt-oss's
    eager attention leaves it out, or with ``sinks_after`` the keys' own softmax, the sink's share
    taken off the output instead, as Granite SWA's does: the same output). Counted in
    :data:`FALLBACKS`."""
    _check_sinks(sinks, q)
    _fall_back("output_attentions (attention probabilities requested)")
    return _eager(q, k, v, mask, causal, scale, window, dropout, softcap, sinks, sinks_after)


def attend_as_eager(q, k, v, mask: torch.Tensor, *, scale: float | None = None, dropout: float = 0.0,
                    softcap: float | None = None, reason: str | None = None, sinks: torch.Tensor | None = None,
                    sinks_after: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's eager attention exactly, ``(out, probabilities)``: the boolean ``mask`` (True =
    attend) becomes an additive one of the minimum of the mask's dtype, as transformers makes it
    for eager attention (the model's dtype: fp32 under autocast). The difference from
    :func:`attend_with_weights` is a query row that sees no key: its scores all round to that
    minimum, softmax weighs every key equally (output: the mean of v, and gradients through the
    scores as if they counted), where this module gives 0. (An fp16 model's -65504 does not
    absorb every score: eager's row is not quite uniform there, and neither is this.) For models
    that ran eager attention before patching: :func:`eager_blind_rows`, and their masked calls
    under torch.compile. ``reason``: counted in :data:`FALLBACKS` under it. ``sinks`` and
    ``sinks_after`` as in :func:`attend_with_weights`: such a row's output is then 0 in eager
    attention too (all its mass on the sink; Granite SWA's scale of it, sigmoid(lse - sink), is 0),
    and only Granite SWA's probabilities are still uniform."""
    _check_sinks(sinks, q)
    if reason is not None:
        _fall_back(reason)
    wide = torch.is_autocast_enabled(q.device.type)
    q, k, v = ops.attention.autocast_inputs(q, k, v)
    if mask.dtype == torch.bool:
        dtype = torch.float32 if wide else q.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=q.device).masked_fill(~mask, torch.finfo(dtype).min)
    return _eager(q, k, v, mask, False, scale, None, dropout, softcap, sinks, sinks_after)


def eager_blind_rows(out, q, k, v, mask: torch.Tensor, *, scale: float | None = None, dropout: float = 0.0,
                     softcap: float | None = None, weights: torch.Tensor | None = None,
                     sinks: torch.Tensor | None = None, sinks_after: bool = False):
    """``(out, weights)`` with the query rows that ``mask`` shows no key (left padding) computed as
    HF's eager attention computes them (:func:`attend_as_eager`), for a model that ran eager
    attention before patching (Gemma 2 always does): eager weighs every key equally there, where
    the kernels and SDPA give 0, and training on left-padded batches reads those rows (the last
    padding position predicts the first real token). Only those rows are recomputed, per batch
    row (their scores: heads x rows x Tk); the rest keep the kernels' result. One host sync per
    mask object: not under torch.compile, where ``forwards.hf_attention_function`` runs the whole
    call as eager (:func:`attend_as_eager`, what HF computes for such a model anyway). Counted in
    :data:`FALLBACKS`."""
    B, Hq, Tq = out.shape[:3]
    # (a mask per head: the rows where some head sees no key, all heads of them)
    rows = _memo(mask, ("blind", B, Tq), lambda: [
        r.nonzero().flatten() for r in sees_no_key(mask).expand(B, mask.shape[1], Tq, 1).any(1)[:, :, 0]])
    if not any(r.numel() for r in rows):
        return out, weights
    _fall_back("padding queries that see no key, on a model that ran eager attention (those rows)")
    m = mask.expand(B, mask.shape[1], Tq, mask.shape[-1])
    outs, probs = [], []
    for b, r in enumerate(rows):
        if not r.numel():
            outs.append(out[b])
            probs.append(None if weights is None else weights[b])
            continue
        o, p = attend_as_eager(q[b:b + 1, :, r], k[b:b + 1], v[b:b + 1], m[b:b + 1, :, r], scale=scale,
                               dropout=dropout, softcap=softcap, sinks=sinks, sinks_after=sinks_after)
        outs.append(out[b].index_copy(1, r, o[0].to(out.dtype)))
        probs.append(None if weights is None else weights[b].index_copy(1, r, p[0].to(weights.dtype)))
    return torch.stack(outs), (None if weights is None else torch.stack(probs))


def _eager(q, k, v, mask, causal, scale, window, dropout, softcap, sinks=None, sinks_after=False):
    """(out, probabilities) in plain PyTorch, as HF's eager attention computes them (``sinks``: as
    gpt-oss's does, one more score per head in the softmax, its column dropped after; with
    ``sinks_after`` as Granite SWA's: the keys' softmax, the output times sigmoid(lse - sink))."""
    Tq, Tk = q.shape[2], k.shape[2]
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if mask is None:
        mask = _implicit_mask(Tq, Tk, causal, window, q.device)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    blind = sees_no_key(mask)
    column = sinks is not None and not sinks_after
    if column:
        sink = sinks.to(scores.dtype)[None, :, None, None].expand(*scores.shape[:3], 1)
        scores = torch.cat((scores, sink), dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).masked_fill(blind, 0.0).to(q.dtype)
    probs = probs[..., :-1] if column else probs
    out = (F.dropout(probs, p=dropout, training=dropout > 0) @ v).masked_fill(blind, 0.0)  # (0 * inf)
    if sinks is not None and sinks_after:  # (blind rows: lse -inf, a scale of 0)
        lse = torch.logsumexp(scores.float(), dim=-1, keepdim=True)
        out = out * torch.sigmoid(lse - sinks.float()[None, :, None, None]).to(out.dtype)
    return out, probs


def _check_sinks(sinks, q) -> None:
    """The op's check of ``sinks``, on every path (the PyTorch ones too)."""
    if sinks is not None:
        ops._checks.check_sinks(sinks, q)


def sees_no_key(mask: torch.Tensor) -> torch.Tensor:
    """Where ``mask`` (boolean, or additive with -inf) shows a query row no key: shape (..., Tq, 1).
    Those rows are 0, as in the kernels, where softmax and SDPA give NaN. Only those: a NaN or
    inf that came from the inputs must reach the output, as it does in SDPA and in the kernels."""
    if mask.dtype == torch.bool:
        return ~mask.any(-1, keepdim=True)
    return torch.isneginf(mask).all(-1, keepdim=True)


def _sdpa(q, k, v, mask, is_causal, scale, dropout, softcap=None, sinks=None):
    if softcap is not None or sinks is not None:
        # SDPA has neither soft-capping nor sinks: plain PyTorch (the causal mask attend means)
        if mask is None:
            mask = _implicit_mask(q.shape[2], k.shape[2], is_causal, None, q.device)
        return _eager(q, k, v, mask, False, scale, None, dropout, softcap, sinks)[0]
    if q.shape[1] != k.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, scale=scale)
    return out if mask is None else out.masked_fill(sees_no_key(mask), 0.0)  # SDPA: NaN there
