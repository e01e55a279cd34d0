"""fastllama.attention.attend: each mask a model can pass is served as the mask says.

Every case compares attend with plain float64 attention under the same mask (rows that see no
key give 0, as the kernels do), and checks which path served it through FALLBACKS.
"""
import pytest
import torch

from conftest import DEVICE
from fastllama import attention, ops
from fastllama.attention import FALLBACKS, attend


def qkv(B=2, Hq=4, Hk=2, Tq=9, Tk=9, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, t, D, generator=g).to(DEVICE) for h, t in ((Hq, Tq), (Hk, Tk), (Hk, Tk)))
    return q, k, v


def truth(q, k, v, mask, softcap=None, sinks=None):
    """float64 attention under a boolean mask broadcast to (B, Hq, Tq, Tk), scores soft-capped
    (before the mask) when ``softcap`` is given; ``sinks`` (Hq,): one more score per head whose
    value is zero (gpt-oss's eager attention: a column appended, then dropped)."""
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.double()[None, :, None, None].expand(*scores.shape[:3], 1)), -1)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs if sinks is None else probs[..., :-1]) @ v


def check(out, q, k, v, mask, softcap=None, sinks=None):
    torch.testing.assert_close(out.double(), truth(q, k, v, mask, softcap, sinks), rtol=1e-4, atol=1e-5)


def check_grads(out, leaves, truth_of, seed=0):
    """The gradients of a random weighting of ``out`` with respect to ``leaves`` (tensors that
    require grad) are those of ``truth_of`` (called with float64 copies of them)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    got = torch.autograd.grad((out * w).sum(), leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad((truth_of(*leaves64) * w.double()).sum(), leaves64)
    for g, e in zip(got, want):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-5)


def padded_causal(lengths, Tq, Tk, end=None, left=True):
    """HF's mask for rows holding ``lengths`` real tokens, left- (or right-) padded so that
    every row's tokens end at slot ``end`` (default Tk), queries the last Tq of them."""
    end = Tk if end is None else end
    j = torch.arange(Tk)
    q_pos = end - Tq + torch.arange(Tq)
    rows = []
    for n in lengths:
        keep = (j >= end - n) & (j < end) if left else j < n
        rows.append(keep[None, :] & (j[None, :] <= q_pos[:, None]))
    return torch.stack(rows)[:, None].to(DEVICE)


@pytest.fixture(autouse=True)
def fresh_counts():
    FALLBACKS.clear()
    yield


@pytest.mark.parametrize("Tq", [7, 1, 3])
def test_left_padded_static_cache_uses_the_kernels(Tq):
    """A static cache of 16 slots, prompts left-padded to 7 tokens: prefill (Tq 7) and decode
    steps (Tq 1, 3) keep keys [s_b, e) with the same e < Tk in every row."""
    Tk, end = 16, 7 if Tq == 7 else 10
    q, k, v = qkv(B=3, Tq=Tq, Tk=Tk)
    mask = padded_causal([7, 4, 2 + (end - 7)], Tq, Tk, end=end)
    check(attend(q, k, v, mask), q, k, v, mask)
    assert not FALLBACKS, FALLBACKS


@pytest.mark.parametrize("Tq, end, lengths", [(1, 16, [7, 4, 2]), (3, 16, [7, 4, 3]), (2, 10, [9, 4, 2]),
                                              (7, 7, [7, 4, 2])])
def test_left_padded_decoding_reads_the_cache_in_place(monkeypatch, Tq, end, lengths):
    """Left-padded rows (HF's batched generate) without autograd, up to 16 queries: a dynamic
    cache (the runs end at the last key), a static one (at the same slot e < Tk), a padded prompt
    of 7 (its padding queries see no key): the decode kernel with each row's left pad, reading the
    cache in place; no varlen flash call gathers the runs."""
    q, k, v = qkv(B=3, Tq=Tq, Tk=16)
    mask = padded_causal(lengths, Tq, 16, end=end)
    decode, flash, calls = ops.decode_attention, ops.flash_attention, []
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: calls.append(
        (a[1].shape[2], a[3].tolist(), kw["cache_leftpad"].tolist())) or decode(*a, **kw))
    monkeypatch.setattr(ops, "flash_attention", lambda *a, **kw: calls.append("flash") or flash(*a, **kw))
    with torch.no_grad():
        out = attend(q, k, v, mask)
    check(out, q, k, v, mask)
    assert calls == [(end, [end] * 3, [end - n for n in lengths])] and not FALLBACKS


@pytest.mark.parametrize("Tq, Tk, pads", [(8, 8, [0, 0]), (3, 12, [0, 4]), (1, 12, [0, 4])])
def test_a_bidirectional_padding_mask_is_not_served_by_the_causal_decode_kernel(Tq, Tk, pads):
    """Non-causal attention (an encoder: Gemma 3 with bidirectional attention) under a padding
    mask, no autograd: every query sees its row's whole run, later keys too; the decode kernel
    (causal) serves only a single query at the run's end."""
    q, k, v = qkv(B=2, Tq=Tq, Tk=Tk)
    keep = torch.stack([torch.arange(Tk) >= p for p in pads]).to(DEVICE)
    mask = keep[:, None, None, :].expand(2, 1, Tq, Tk)
    with torch.no_grad():
        check(attend(q, k, v, mask, causal=False), q, k, v, mask)


def test_prefix_masks_of_different_lengths_with_grad_use_varlen():
    """A static cache's decode-shaped mask while autograd records (no decode kernel)."""
    q, k, v = qkv(Tq=3, Tk=12)
    q.requires_grad_(True)
    mask = torch.stack([padded_causal([n], 3, 12, end=n, left=False)[0] for n in (5, 9)])
    out = attend(q, k, v, mask)
    check(out, q, k, v, mask)
    assert not FALLBACKS, FALLBACKS
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("Tq", [1, 3])
def test_static_cache_mask_with_a_window_uses_the_decode_kernel(monkeypatch, Tq):
    """A static cache with sequences of different lengths (10, 20) and a sliding window of 5
    keys (HF's sliding_window=5): each row keeps only its window, so its run of keys starts past
    slot 0. It is still a prefix of the cache to the decode kernel, which applies the window
    (it fell back to SDPA, the runs ending at different slots)."""
    q, k, v = qkv(Tq=Tq, Tk=24)
    ends, window = torch.tensor([10, 20]), (4, 0)
    i, j = torch.arange(Tq)[:, None], torch.arange(24)[None, :]
    q_pos = ends[:, None, None] - Tq + i
    mask = ((j <= q_pos) & (j >= q_pos - window[0]))[:, None].to(DEVICE)
    calls = []
    decode = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: calls.append((a[3].tolist(), kw["window"]))
                        or decode(*a, **kw))
    with torch.no_grad():
        out = attend(q, k, v, mask, window=window)
    check(out, q, k, v, mask)
    assert not FALLBACKS, FALLBACKS
    assert calls == [([10, 20], (4, 0))]


def test_dropout_without_mask_attends_as_attend_does():
    """With dropout (SDPA fallback) and no mask, one decoding query sees every key, not only the
    first (SDPA's is_causal is top-left); p so small that nothing is dropped."""
    q, k, v = qkv(Tq=1, Tk=7)
    out = attend(q, k, v, None, dropout=1e-12)
    check(out, q, k, v, torch.ones(1, 1, 1, 7, dtype=torch.bool, device=DEVICE))
    assert FALLBACKS["attention dropout > 0"] == 1
    window = (2, 0)  # and a sliding window is kept too
    q, k, v = qkv(Tq=6, Tk=6)
    out = attend(q, k, v, None, window=window, dropout=1e-12)
    i = torch.arange(6, device=DEVICE)
    check(out, q, k, v, (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 2))


def test_a_mask_edited_in_place_is_looked_at_again():
    q, k, v = qkv(Tq=9, Tk=9)
    mask = padded_causal([9, 5], 9, 9)
    check(attend(q, k, v, mask), q, k, v, mask)
    mask.copy_(padded_causal([3, 8], 9, 9))  # same object, new contents
    check(attend(q, k, v, mask), q, k, v, mask)
    assert not FALLBACKS, FALLBACKS


def test_the_mask_is_not_kept_alive_and_a_new_one_is_classified():
    """The last mask's plan is reused for the same object (HF passes one mask to every layer),
    but it is not kept alive after the forward (a (B, 1, T, T) mask held into the next forward's
    peak), and a new mask at the dead one's address is looked at, not taken for it."""
    import gc
    import weakref

    q, k, v = qkv(Tq=9, Tk=9)
    mask = padded_causal([9, 5], 9, 9)
    check(attend(q, k, v, mask), q, k, v, mask)
    dead = weakref.ref(mask)
    del mask
    gc.collect()
    assert dead() is None
    for lengths in ([3, 8], [9, 2], [1, 9]):  # (new masks, some at a recycled address)
        mask = padded_causal(lengths, 9, 9)
        check(attend(q, k, v, mask), q, k, v, mask)
        del mask
    assert not FALLBACKS, FALLBACKS


@pytest.mark.parametrize("shape", ["batch", "query", "both"])
def test_masks_that_broadcast(shape):
    q, k, v = qkv(B=2, Tq=5, Tk=5)
    i = torch.arange(5, device=DEVICE)
    if shape == "batch":  # (1, 1, Tq, Tk): one causal mask for the batch
        mask = (i[None, :] <= i[:, None])[None, None]
    elif shape == "query":  # (B, 1, 1, Tk): key padding only, non-causal
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool, device=DEVICE)[:, None, None]
    else:  # (Tk,)
        mask = torch.tensor([1, 1, 1, 0, 0], dtype=torch.bool, device=DEVICE)
    check(attend(q, k, v, mask, causal=shape == "batch"), q, k, v, mask)
    assert not FALLBACKS, FALLBACKS


def test_a_mask_that_does_not_broadcast_is_refused():
    q, k, v = qkv(B=2, Tq=5, Tk=5)
    with pytest.raises(ValueError, match="does not broadcast"):
        attend(q, k, v, torch.ones(3, 1, 5, 5, dtype=torch.bool, device=DEVICE))


def test_per_head_masks(caplog, monkeypatch):
    monkeypatch.setattr(attention, "_WARNED", set())
    q, k, v = qkv(B=2, Hq=4, Tq=6, Tk=6)
    causal = padded_causal([6, 4], 6, 6)
    same = causal.expand(2, 4, 6, 6).clone()  # one mask repeated per head: the kernels
    check(attend(q, k, v, same), q, k, v, same)
    assert not FALLBACKS, FALLBACKS
    differ = same.clone()
    differ[:, 1, :, 0] = False  # head 1 never sees key 0: SDPA, counted
    with caplog.at_level("WARNING", logger="fastllama"):
        check(attend(q, k, v, differ), q, k, v, differ)
        attend(q, k, v, differ)
    assert FALLBACKS["mask differs between heads"] == 2
    warned = [r.getMessage() for r in caplog.records if "fell back" in r.getMessage()]
    assert len(warned) == 1 and "mask differs between heads" in warned[0]  # once per reason


@pytest.mark.parametrize("window", [None, (2, 0)])
def test_padding_mask_under_torch_compile_fullgraph_runs_the_kernels(monkeypatch, window):
    """A mask under torch.compile is read when the graph runs, inside one custom op (no graph
    break): left and right padding take varlen flash attention (it was SDPA), forward and
    backward. The backward replays the call with the forward's output and softmax statistics:
    no attention forward runs again (it did: the op kept only its inputs)."""
    from fastllama.ops import attention as flash_op

    launches = {"forward": [], "backward": []}
    for kind, kernels in (("forward", flash_op._fwd), ("backward", flash_op._bwd)):
        name = f"flash_attention_{kind}"
        monkeypatch.setattr(kernels, name, lambda *a, _kind=kind, _run=getattr(kernels, name), **kw: launches[
            _kind].append(kw["cu_seqlens_q"] is not None) or _run(*a, **kw))
    q, k, v = (t.requires_grad_() for t in qkv(Tq=8, Tk=8))
    mask = torch.cat([padded_causal([5], 8, 8), padded_causal([6], 8, 8, left=False)])
    if window is not None:
        mask &= attention._window_allows(torch.arange(8)[:, None], torch.arange(8)[None, :], window).to(DEVICE)

    def step(q, k, v, mask):
        return attend(q, k, v, mask, window=window)

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    check(out, q, k, v, mask)
    # varlen flash attention: the runs, and without a window the padding rows after the right-padded run
    assert launches["forward"] == [True] * (2 if window is None else 1), launches
    assert set(FALLBACKS) <= {"padding queries that see part of their run through a sliding window (those rows)"}
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    assert launches["backward"] == launches["forward"], launches
    want = torch.autograd.grad(truth(q, k, v, mask), (q, k, v), grad.double())
    for g, w in zip(got, want):
        assert g.stride() == (q if g.shape == q.shape else k).stride()
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)



def _masked_op_cases():
    """(name, q/k/v shape kwargs, mask, attend kwargs, flash forward launches) for each plan."""
    i, j = torch.arange(11)[:, None], torch.arange(11)[None, :]
    right_window = torch.stack([(j < n) & (j <= i) & (j >= i - 3) for n in (11, 6)])[:, None].to(DEVICE)
    per_head = padded_causal([11, 7], 11, 11).expand(2, 4, 11, 11).clone()
    per_head[:, 1, :, 0] = False
    return [
        ("left padding", dict(Tq=11, Tk=11), padded_causal([11, 7], 11, 11), {}, 1),
        ("right padding", dict(Tq=11, Tk=11), padded_causal([11, 7], 11, 11, left=False), {}, 2),
        ("right padding, softcap", dict(Tq=11, Tk=11), padded_causal([4, 7], 11, 11, left=False),
         dict(softcap=2.0), 2),
        ("right padding, window", dict(Tq=11, Tk=11), right_window, dict(window=(3, 0)), 1),
        ("packed", dict(Tq=11, Tk=11), packed_mask([[5, 6], [2, 9]]), {}, 1),
        ("equal prefixes", dict(Tq=3, Tk=12), padded_causal([9, 9], 3, 12, end=9, left=False), {}, 1),
        ("prefixes", dict(Tq=3, Tk=12), torch.cat([padded_causal([n], 3, 12, end=n, left=False) for n in (5, 9)]),
         {}, 1),
        ("per-head mask", dict(Tq=11, Tk=11), per_head, {}, 0),
    ]


@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("eager_blind", [False, True])
def test_masked_op_backward_replays_the_flash_calls(monkeypatch, case, eager_blind):
    """The op that serves masks under torch.compile, on each plan: output and gradients equal
    attend's (eager autograd through the same kernels), and the backward runs no attention
    forward kernel: each flash call's output and statistics come back from the forward (the
    PyTorch rows, fallbacks and HF-eager blind rows, are computed again with autograd)."""
    from fastllama.ops import attention as flash_op

    name, shape, mask, kwargs, n_flash = _masked_op_cases()[case]
    forwards = []
    run = flash_op._fwd.flash_attention_forward
    monkeypatch.setattr(flash_op._fwd, "flash_attention_forward", lambda *a, **kw: forwards.append(1) or run(*a, **kw))
    q, k, v = (t.requires_grad_() for t in qkv(B=2, Hq=4, Hk=2, **shape))
    want = attend(q, k, v, mask, **kwargs)
    if eager_blind:
        want = attention.eager_blind_rows(want, q, k, v, mask, softcap=kwargs.get("softcap"))[0]
    grad = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    forwards.clear()
    out = attention.masked_op(q, k, v, mask, eager_blind=eager_blind, **kwargs)
    assert len(forwards) == n_flash, (name, forwards)
    got_grads = torch.autograd.grad(out, (q, k, v), grad)
    assert len(forwards) == n_flash, (name, "the backward ran an attention forward")
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    if eager_blind:  # what HF's eager attention gives, rows that see no key (in some head) included
        eager = attention.attend_as_eager(q, k, v, mask, softcap=kwargs.get("softcap"))[0]
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["right padding", "packed"])
def test_masked_op_statistics_are_fp32_whatever_the_default_dtype(kind):
    """The statistics buffer was made in the default dtype: under torch.set_default_dtype(bf16)
    right padding raised (index_copy_ of fp32 rows into bf16) and a packed mask's gradients came
    out of 16-bit statistics, wrong by 1e-2."""
    mask = padded_causal([11, 7], 11, 11, left=False) if kind == "right padding" else packed_mask([[5, 6], [2, 9]])
    q, k, v = (t.requires_grad_() for t in qkv(B=2, Hq=4, Hk=2, Tq=11, Tk=11))
    out = attend(q, k, v, mask)
    grad = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), grad)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = torch.autograd.grad(attention.masked_op(q, k, v, mask), (q, k, v), grad)
    finally:
        torch.set_default_dtype(previous)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def packed_mask(lengths_per_row, causal=True, window=None):
    """HF's mask for position_ids that restart: block diagonal, one block per sequence."""
    rows = []
    for lengths in lengths_per_row:
        seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        i = torch.arange(len(seq))
        m = seq[:, None] == seq[None, :]
        m &= attention._window_allows(i[:, None], i[None, :], window)
        rows.append(m & (i[None, :] <= i[:, None]) if causal else m)
    return torch.stack(rows)[:, None].to(DEVICE)


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (3, 0))])
def test_packed_sequences_use_varlen(causal, window):
    q, k, v = qkv(B=2, Tq=13, Tk=13)
    q.requires_grad_(True)
    mask = packed_mask([[5, 1, 7], [13]], causal, window)
    out = attend(q, k, v, mask, causal=causal, window=window)
    check(out, q, k, v, mask)
    assert not FALLBACKS, FALLBACKS
    out.sum().backward()
    assert q.grad is not None


@pytest.mark.parametrize("sinks", [False, True])
def test_chunked_attention_of_a_padded_batch_uses_varlen(sinks):
    """Llama 4's chunked attention over a padded batch: each chunk a sequence of its own and the
    padding tokens in none (no query sees them). The sequences are packed from the other tokens;
    left padding's rows (they see no key) come out 0, and right padding's rows see the real tokens
    of their chunk (HF's mask masks padding keys only), a second, non-causal call, all on the
    kernels, with gradients (and with attention sinks). A padding token that some query still
    sees is not such a mask."""
    q, k, v = qkv(B=4, Tq=13, Tk=13)
    mask = packed_mask([[4, 4, 4, 1]] * 4)
    mask[1, :, :5] = False  # row 1: five tokens of left padding, row 2: two
    mask[1, :, :, :5] = False
    mask[2, :, :2] = False
    mask[2, :, :, :2] = False
    mask[3, :, :, 6:] = False  # row 3: seven of right padding (their queries see their chunk's real keys)
    s = (2 * torch.randn(4, generator=torch.Generator().manual_seed(5))).to(DEVICE) if sinks else None
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = attend(qg, kg, v, mask, sinks=s)
    check(out, q, k, v, mask, sinks=s)
    assert not FALLBACKS, FALLBACKS
    check_grads(out, (qg, kg), lambda q, k: truth(q, k, v, mask, sinks=s))
    if not sinks:  # the same through the op torch.compile sees (its backward replays the flash call)
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = attention.masked_op(qg, kg, v, mask)
        check(out, q, k, v, mask)
        check_grads(out, (qg, kg), lambda q, k: truth(q, k, v, mask))
        assert not FALLBACKS, FALLBACKS
    from fastllama.attention import _last_plan
    assert _last_plan[2].kind == "packed" and _last_plan[2].pad_rows.numel() == 2  # (row 3's slots 6 and 7)
    seen = mask.clone()
    seen[1, :, 7, 3] = True  # a query that sees a padding token
    check(attend(q, k, v, seen, sinks=s), q, k, v, seen, sinks=s)
    assert FALLBACKS["mask is not causal attention over one run of tokens per row"] == 1


def test_packed_training_batch_matches_and_uses_the_kernels():
    """Padding-free training: two rows, each several sequences, position_ids restarting (HF
    builds the block-diagonal mask when there is no cache and no attention_mask)."""
    from test_patch import build, ids

    import fastllama

    model = build("mistral-window").train()
    x = ids(batch=2, seq=20)
    position_ids = torch.tensor([list(range(7)) + list(range(13)), list(range(4)) + list(range(16))], device=DEVICE)

    def run():  # logits, loss, and a gradient (a patched model's loss builds no logits)
        kw = dict(input_ids=x, position_ids=position_ids, use_cache=False)
        with torch.no_grad():
            logits = model(**kw).logits
        loss = model(**kw, labels=x).loss
        loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        model.zero_grad()
        return logits, loss.detach(), grad

    expected, expected_loss, expected_grad = run()
    with torch.no_grad():
        unpacked = model(input_ids=x, position_ids=position_ids).logits  # a cache: HF does not unpack
    assert (unpacked - expected).abs().max() > 1e-3  # the packing matters
    fastllama.patch(model)
    FALLBACKS.clear()
    out, loss, grad = run()
    assert not FALLBACKS, FALLBACKS
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)


def test_non_causal_without_a_mask_sees_every_key():
    """Only causal attention reads Tq > 1 < Tk without a mask as HF's empty static cache."""
    q, k, v = qkv(Tq=4, Tk=9)
    out = attend(q, k, v, None, causal=False)
    check(out, q, k, v, torch.ones(1, 1, 4, 9, dtype=torch.bool, device=DEVICE))


def test_padding_mask_made_under_inference_mode():
    """Inference tensors have no version counter (reading it raised): plans are cached by
    identity; a patched model with left padding runs under torch.inference_mode."""
    from test_patch import build, ids

    import fastllama

    model = build("llama-gqa").eval()
    x = ids(batch=2, seq=9)
    pad = torch.ones_like(x)
    pad[0, :3] = 0
    with torch.inference_mode():
        expected = model(input_ids=x, attention_mask=pad).logits
        fastllama.patch(model)
        FALLBACKS.clear()
        out = model(input_ids=x, attention_mask=pad).logits
    assert not FALLBACKS, FALLBACKS
    torch.testing.assert_close(out[pad.bool()], expected[pad.bool()], rtol=1e-4, atol=1e-4)


# Tests from mutation testing: each fails on a plausible bug the suite let through.
@pytest.mark.parametrize("window", [(2, 0), (2, -1)])
def test_window_without_a_mask_while_decoding_is_kept(monkeypatch, window):
    """One query with a window and no mask goes to the decode kernel with the window's left
    bound (a right bound of -1 is the causal one), and sees only its window."""
    q, k, v = qkv(Tq=1, Tk=9)
    i = torch.arange(9, device=DEVICE)
    mask = (i[None, :] <= 8) & (i[None, :] >= 6)
    calls = []
    decode = ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: calls.append(kw["window"]) or decode(*a, **kw))
    with torch.no_grad():
        out = attend(q, k, v, None, window=window)
    check(out, q, k, v, mask)
    assert calls == [(2, 0)]


def test_rows_that_see_no_key_are_zero_whatever_sdpa_gives(monkeypatch):
    """SDPA may return NaN for a query that sees no key (this CPU build gives 0): the fallback
    zeroes such rows itself. Stood in here by an SDPA that returns NaN there."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def nan_rows(q, k, v, attn_mask=None, **kw):
        out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            blind = ~attn_mask.expand(*out.shape[:-1], attn_mask.shape[-1]).any(-1, keepdim=True)
            out = out.masked_fill(blind, float("nan"))
        return out

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", nan_rows)
    q, k, v = qkv(B=2, Hq=4, Tq=6, Tk=6)
    mask = padded_causal([6, 4], 6, 6).expand(2, 4, 6, 6).clone()
    mask[:, 1, :, 0] = False  # differs between heads: SDPA; row 1's first two queries see nothing
    check(attend(q, k, v, mask), q, k, v, mask)
    assert FALLBACKS["mask differs between heads"] == 1


@pytest.mark.parametrize("path", ["sdpa", "sdpa-float-mask", "eager", "eager-softcap"])
def test_nan_and_inf_in_the_inputs_reach_the_output_on_the_fallbacks(path):
    """Only rows that see no key are zeroed on the fallback paths: a NaN or inf from the inputs
    propagates as in SDPA, HF's eager attention and the kernels (it was zeroed / clamped)."""
    q, k, v = qkv(B=1, Hq=2, Hk=2, Tq=5, Tk=5)
    q[0, 0, 2, 0] = float("nan")
    v[0, 1, 0, 0] = float("inf")
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool, device=DEVICE))[None, None].clone()
    mask[..., 3, 1] = False  # a hole: no kernel serves it
    mask[..., 4, :] = False  # a row that sees no key: 0
    softcap = 5.0 if path == "eager-softcap" else None
    if path == "sdpa-float-mask":
        fmask = torch.zeros(mask.shape, device=DEVICE).masked_fill(~mask, float("-inf"))
        out = attend(q, k, v, fmask)
    elif path.startswith("eager"):
        out = attention.attend_with_weights(q, k, v, mask, softcap=softcap)[0]
    else:
        out = attend(q, k, v, mask)
    assert FALLBACKS, "expected a fallback"
    assert out[0, 0, 2].isnan().all()  # query 2 of head 0 is NaN
    assert torch.isinf(out[0, 1, :4, 0]).all()  # every row of head 1 that sees key 0
    assert (out[:, :, 4] == 0).all()
    keep = torch.ones(out.shape[:3], dtype=torch.bool, device=DEVICE)
    keep[0, 0, 2] = False
    keep[0, 1, :4] = False
    keep[:, :, 4] = False  # (checked above; float64 truth makes 0 * inf = NaN there)
    expect = truth(q, k, v, mask, softcap)
    torch.testing.assert_close(out[keep].double(), expect[keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rope", [True, False])
def test_mixed_dtypes_under_autocast_attend_as_sdpa_does(rope):
    """Under autocast, HF's rotary returns fp32 q/k (fp32 cos/sin) beside a 16-bit v, and SDPA
    casts all three to the autocast dtype. attend and ops.flash_attention do the same (a patched
    model with ``rope=False`` raised a dtype mismatch under autocast)."""
    transformers = pytest.importorskip("transformers")
    import fastllama

    q, k, v = qkv(B=1, Hq=4, Hk=2, Tq=7, Tk=7, D=16)
    with torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16):
        out = ops.flash_attention(q, k, v.bfloat16())
        assert out.dtype == torch.bfloat16
        expect = ops.flash_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
        torch.testing.assert_close(out, expect, rtol=0, atol=0)
        torch.testing.assert_close(attend(q, k.bfloat16(), v), expect, rtol=0, atol=0)

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE)
    ids = torch.randint(0, 97, (2, 9), device=DEVICE)
    with torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16):
        hf = model(input_ids=ids).logits.float()
        fastllama.patch(model, rope=rope)
        out = model(input_ids=ids).logits.float()
    # one bf16 forward against another: within a few bf16 ulps of logits of size ~1
    assert (out - hf).abs().max() < 0.05, (out - hf).abs().max()


@pytest.mark.parametrize("causal,window,softcap", [(True, (3, 0), None), (True, (5, -1), 2.0), (False, (4, 2), None)])
def test_right_padding_under_a_window_keeps_the_runs_on_the_kernels(causal, window, softcap):
    """Right padding with a sliding window: a padding query sees the part of its row's run that
    its window covers (HF's mask), a part that moves with the query, which varlen cannot align.
    The runs go through varlen flash attention and only those padding rows through PyTorch
    (counted); rows whose window holds no run key give 0. Output and gradients (it fell back to
    SDPA for the whole call)."""
    q, k, v = qkv(B=3, Hq=4, Hk=2, Tq=17, Tk=17)
    i, j = torch.arange(17)[:, None], torch.arange(17)[None, :]
    mask = torch.stack([(j < n) & attention._window_allows(i, j, window) & ((j <= i) | (not causal))
                        for n in (11, 17, 5)])[:, None].to(DEVICE)
    assert not mask[2, 0, 16].any() and mask[0, 0, 12, :11].sum() < 11  # rows that see nothing, part of a run
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = attend(q, k, v, mask, causal=causal, window=window, softcap=softcap)
    check(out, q, k, v, mask, softcap)
    assert set(FALLBACKS) == {"padding queries that see part of their run through a sliding window (those rows)"}
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(truth(q, k, v, mask, softcap), (q, k, v), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_padding_queries_before_a_run_under_a_two_sided_window():
    """Left padding, non-causal window (4, 4): padding queries before a run ending at the last
    slot see part of it. The gathered keys of a row narrower than the widest were clamped to
    the last slot and counted twice in the softmax (output off by 0.3)."""
    q, k, v = (t.requires_grad_() for t in qkv(B=2, Hq=2, Hk=1, Tq=6, Tk=6))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    mask = torch.stack([(j >= 6 - n) & (j >= i - 4) & (j <= i + 4) for n in (3, 5)])[:, None].to(DEVICE)
    out = attend(q, k, v, mask, causal=False, window=(4, 4))
    check(out, q, k, v, mask)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(truth(q, k, v, mask), (q, k, v), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-5)


def test_equal_prefixes_with_grad_read_only_the_prefix():
    q, k, v = qkv(Tq=3, Tk=12)
    q.requires_grad_(True)
    mask = torch.stack([padded_causal([n], 3, 12, end=n, left=False)[0] for n in (7, 7)])
    check(attend(q, k, v, mask), q, k, v, mask)
    assert not FALLBACKS, FALLBACKS


def test_softcap_reaches_every_path(monkeypatch):
    """Soft-capped scores (Gemma 2) on each of attend's paths: no mask (flash attention with
    autograd, the decode kernel for a step without), a static cache's prefix (the decode
    kernel), padded rows (varlen), packed sequences, and the PyTorch fallbacks (a float mask;
    dropout) and attend_with_weights. The cap binds (scores of std 8 capped at 2)."""
    decode, decode_attention = [], ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: decode.append(kw["softcap"]) or decode_attention(
        *a, **kw))
    cap = 2.0
    q, k, v = (t * s for t, s in zip(qkv(Tq=9, Tk=9), (8 ** 0.5, 8 ** 0.5, 1)))
    causal = padded_causal([9, 9], 9, 9)
    check(attend(q.requires_grad_(), k, v, None, softcap=cap), q, k, v, causal, cap)  # (flash: autograd)
    q = q.detach()
    assert (truth(q, k, v, causal, cap) - truth(q, k, v, causal)).abs().max() > 0.1  # it binds
    with torch.no_grad():
        check(attend(q[:, :, -1:], k, v, None, softcap=cap), q[:, :, -1:], k, v, causal[:, :, -1:], cap)
        static = torch.stack([padded_causal([n], 1, 12, end=n, left=False)[0] for n in (5, 9)])
        kk, vv = (torch.cat([t, t[:, :, :3]], 2) for t in (k, v))
        check(attend(q[:, :, :1], kk, vv, static, softcap=cap), q[:, :, :1], kk, vv, static, cap)
    assert decode == [cap, cap]
    padded = padded_causal([9, 4], 9, 9)
    check(attend(q, k, v, padded, softcap=cap), q, k, v, padded, cap)
    segments = torch.zeros(2, 9, dtype=torch.long)
    segments[:, 4:] = 1  # two sequences per row, each attending only to itself
    i = torch.arange(9)
    packed = ((segments[:, :, None] == segments[:, None, :]) & (i[None, :] <= i[:, None]))[:, None].to(DEVICE)
    check(attend(q, k, v, packed, softcap=cap), q, k, v, packed, cap)
    assert not FALLBACKS, FALLBACKS
    additive = torch.zeros(padded.shape, device=DEVICE).masked_fill(~padded, float("-inf"))
    check(attend(q, k, v, additive, softcap=cap), q, k, v, padded, cap)
    check(attend(q, k, v, None, dropout=1e-12, softcap=cap), q, k, v, causal, cap)
    check(attend(q, k, v, padded, dropout=1e-12, softcap=cap), q, k, v, padded, cap)
    out, probs = attention.attend_with_weights(q, k, v, padded, softcap=cap)
    check(out, q, k, v, padded, cap)
    # a 16-bit step whose cap the decode kernel refuses (above ops.decode.MAX_16BIT_SOFTCAP):
    # flash attention instead
    decode.clear()
    q16, k16, v16 = (t.half() for t in (q[:, :, -1:], k, v))
    with torch.no_grad():
        out = attend(q16, k16, v16, None, softcap=2e4)
    assert not decode
    torch.testing.assert_close(out.double(), truth(q16, k16, v16, causal[:, :, -1:], 2e4), rtol=0, atol=2e-3)
    assert set(FALLBACKS) == {"non-boolean mask", "attention dropout > 0",
                              "output_attentions (attention probabilities requested)"}


def test_sinks_reach_every_path(monkeypatch):
    """Attention sinks (gpt-oss) on each of attend's paths, as test_softcap_reaches_every_path
    takes them: flash attention with autograd (the sinks' gradient too), a decoding step and a
    static cache's prefix (the decode kernel), left-padded rows and right-padded ones whose padding
    queries see the whole run (varlen), packed sequences, and the PyTorch fallbacks (a float
    mask; dropout; attend_with_weights, whose probabilities leave the sink's out, as gpt-oss's
    eager attention does). Sinks of std 2: a rescale of the output by 0.1 to 0.9, which a path
    that dropped them could not pass."""
    decode, decode_attention = [], ops.decode_attention
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **kw: decode.append(kw["sinks"]) or decode_attention(
        *a, **kw))
    q, k, v = qkv(Tq=9, Tk=9)
    sinks = (2 * torch.randn(4, generator=torch.Generator().manual_seed(3))).to(DEVICE)
    causal = padded_causal([9, 9], 9, 9)
    assert (truth(q, k, v, causal, sinks=sinks) - truth(q, k, v, causal)).abs().max() > 0.1
    qg, sg = q.clone().requires_grad_(), sinks.clone().requires_grad_()
    out = attend(qg, k, v, None, sinks=sg)
    check(out, q, k, v, causal, sinks=sinks)
    check_grads(out, (qg, sg), lambda q, s: truth(q, k, v, causal, sinks=s))
    with torch.no_grad():
        check(attend(q[:, :, -1:], k, v, None, sinks=sinks), q[:, :, -1:], k, v, causal[:, :, -1:], sinks=sinks)
        static = torch.stack([padded_causal([n], 1, 12, end=n, left=False)[0] for n in (5, 9)])
        kk, vv = (torch.cat([t, t[:, :, :3]], 2) for t in (k, v))
        check(attend(q[:, :, :1], kk, vv, static, sinks=sinks), q[:, :, :1], kk, vv, static, sinks=sinks)
    assert len(decode) == 2 and all(d is sinks for d in decode)
    padded = padded_causal([9, 4], 9, 9)
    check(attend(q, k, v, padded, sinks=sinks), q, k, v, padded, sinks=sinks)
    right = padded_causal([9, 4], 9, 9, left=False)
    right[1, :, 4:, :4] = True  # HF's causal mask: the padding queries after the run see all of it
    check(attend(q, k, v, right, sinks=sinks), q, k, v, right, sinks=sinks)
    segments = torch.zeros(2, 9, dtype=torch.long)
    segments[:, 4:] = 1  # two sequences per row, each attending only to itself
    i = torch.arange(9)
    packed = ((segments[:, :, None] == segments[:, None, :]) & (i[None, :] <= i[:, None]))[:, None].to(DEVICE)
    check(attend(q, k, v, packed, sinks=sinks), q, k, v, packed, sinks=sinks)
    assert not FALLBACKS, FALLBACKS
    additive = torch.zeros(padded.shape, device=DEVICE).masked_fill(~padded, float("-inf"))
    check(attend(q, k, v, additive, sinks=sinks), q, k, v, padded, sinks=sinks)
    check(attend(q, k, v, None, dropout=1e-12, sinks=sinks), q, k, v, causal, sinks=sinks)
    check(attend(q, k, v, padded, dropout=1e-12, sinks=sinks), q, k, v, padded, sinks=sinks)
    out, probs = attention.attend_with_weights(q, k, v, padded, sinks=sinks)
    check(out, q, k, v, padded, sinks=sinks)
    torch.testing.assert_close((probs.double() @ v.double().repeat_interleave(2, 1)), out.double())
    assert set(FALLBACKS) == {"non-boolean mask", "attention dropout > 0",
                              "output_attentions (attention probabilities requested)"}
    # sinks of the wrong shape: refused on every path, the PyTorch ones too (they broadcast)
    for call in (lambda: attend(q, k, v, None, sinks=sinks[:1]), lambda: attend(q, k, v, additive, sinks=sinks[:1]),
                 lambda: attention.attend_with_weights(q, k, v, padded, sinks=sinks[:1]),
                 lambda: attention.attend_as_eager(q, k, v, padded, sinks=sinks[:1])):
        with pytest.raises(ValueError, match="sinks has 1 entries but q has 4 heads"):
            call()


def test_value_heads_narrower_than_query_heads():
    """DeepSeek-V3's multi-head latent attention: v heads of 32 dims beside q/k heads of 48. Every
    path (flash with gradients, decode, a padded batch's varlen) gives the narrower output, on the
    kernels (v padded for them), as attention computes it."""
    q, k, _ = qkv(Tq=9, Tk=9, D=48)
    v = torch.randn(2, 2, 9, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    causal = padded_causal([9, 9], 9, 9)
    qg, vg = q.clone().requires_grad_(), v.clone().requires_grad_()
    out = attend(qg, k, vg, None)
    assert out.shape == (2, 4, 9, 32)
    check(out, q, k, v, causal)
    check_grads(out, (qg, vg), lambda q, v: truth(q, k, v, causal))
    with torch.no_grad():
        check(attend(q[:, :, -1:], k, v, None), q[:, :, -1:], k, v, causal[:, :, -1:])
    padded = padded_causal([9, 4], 9, 9)
    check(attend(q, k, v, padded), q, k, v, padded)
    assert not FALLBACKS, FALLBACKS


def test_a_masked_decoding_step_under_torch_compile_stays_capturable():
    """Under torch.compile a decoding step without autograd (Tq <= 16) with a mask takes SDPA,
    counted: the mask-reading op syncs with the host, which a CUDA graph cannot capture
    (mode="reduce-overhead", HF's compiled static-cache decoding); that op carries the
    cudagraph_unsafe tag for the calls that do take it."""
    q, k, v = qkv(Tq=1, Tk=12)
    mask = torch.stack([padded_causal([n], 1, 12, end=n, left=False)[0] for n in (5, 9)])
    with torch.no_grad():
        out = torch.compile(attend, backend="aot_eager", fullgraph=True)(q, k, v, mask)
    check(out, q, k, v, mask)
    assert dict(FALLBACKS) == {"mask under torch.compile, decoding": 1}
    for op in (torch.ops.fastllama.attend_masked, torch.ops.fastllama.attend_masked_backward):
        assert torch.Tag.cudagraph_unsafe in op.default.tags


def test_compiled_training_without_a_cache_takes_the_kernels_packed_or_not():
    """Under torch.compile without a cache, transformers checks position_ids for packed
    sequences, which it cannot rule out while tracing: it built a mask for every compiled
    training step and attention ran SDPA. A patched causal LM says the positions HF generates
    are not packed: no mask, the kernels run, same loss. Positions passed in that restart
    (packed) get their mask, read when the graph runs (``attention.masked_op``): varlen flash
    attention (it was SDPA), with eager's loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastllama

    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2, device=DEVICE)
    for use_cache in (True, False):
        torch.manual_seed(0)
        model = fastllama.patch(LlamaForCausalLM(LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, attn_implementation="sdpa", use_cache=use_cache)).to(DEVICE).train())
        x = torch.randint(0, 128, (2, 12), device=DEVICE)
        for position_ids, fallbacks in ((None, {}), (packed, {})):
            torch._dynamo.reset()
            FALLBACKS.clear()
            loss = torch.compile(model, backend="aot_eager", fullgraph=True)(input_ids=x, labels=x,
                                                                            position_ids=position_ids).loss
            loss.backward()
            assert dict(FALLBACKS) == fallbacks, (use_cache, position_ids)
            FALLBACKS.clear()
            torch.testing.assert_close(loss, model(input_ids=x, labels=x, position_ids=position_ids).loss)
    torch._dynamo.reset()


def test_the_packing_answer_is_for_traced_patched_calls_only_and_survives_another_wrapper(monkeypatch):
    """Eager calls never tell transformers "not packed" (its own check reads the values; a flag
    shared with other threads gave a concurrent packed call a wrong mask), and a wrapper someone
    puts over transformers' function after patch is not taken for transformers' own on the next
    patch (that recursed)."""
    from transformers import LlamaConfig, LlamaForCausalLM, masking_utils

    import fastllama
    from fastllama import forwards

    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=32, attn_implementation="sdpa", use_cache=False)
    seen = []
    model = fastllama.patch(LlamaForCausalLM(LlamaConfig(**config)).to(DEVICE))
    model.model.register_forward_pre_hook(lambda *a: seen.append(getattr(forwards._POSITIONS, "generated", False)))
    x = torch.randint(0, 128, (2, 12), device=DEVICE)
    model(input_ids=x)
    assert seen == [False]
    wrapped = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: wrapped(position_ids))
    other = fastllama.patch(LlamaForCausalLM(LlamaConfig(**config)).to(DEVICE))
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2, device=DEVICE)
    expected = fastllama.unpatch(LlamaForCausalLM(LlamaConfig(**config)).to(DEVICE))
    expected.load_state_dict(other.state_dict())
    torch.testing.assert_close(other(input_ids=x, position_ids=packed).logits,
                               expected(input_ids=x, position_ids=packed).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["left", "right", "prefix"])
def test_a_padded_layer_after_the_first_adds_one_host_sync_per_kernel_call(monkeypatch, kind):
    """HF passes one mask to every layer: the first classifies it, and the packing (row indices,
    sequence boundaries) is kept on its plan, so a later layer makes no nonzero/bincount (host
    syncs on a GPU), and each flash call reads its boundaries once (one tensor for q and k)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastllama.ops import attention as flash_op

    syncing = {torch.ops.aten.nonzero.default, torch.ops.aten.bincount.default,
               torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default}

    class Syncs(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing:
                self.seen.append(func)
            return func(*args, **(kwargs or {}))

    reads = []
    max_seqlen = flash_op._max_seqlen
    monkeypatch.setattr(flash_op, "_max_seqlen", lambda *a: reads.append(a[2]) or max_seqlen(*a))
    if kind == "prefix":  # a static cache's prefixes of different lengths, with autograd: varlen
        q, k, v = (t.requires_grad_() for t in qkv(B=2, Tq=3, Tk=12))
        mask = torch.stack([padded_causal([n], 3, 12, end=n, left=False)[0] for n in (5, 9)])
    else:
        q, k, v = (t.requires_grad_() for t in qkv(B=3, Tq=12, Tk=12))
        mask = padded_causal([12, 9, 7], 12, 12, left=kind == "left")
    attend(q, k, v, mask)  # the first layer
    reads.clear()
    with Syncs():
        attend(q, k, v, mask).sum().backward()
    assert not Syncs.seen
    # forward and backward of the runs' call, and for right padding of the padding rows' call
    # (their own boundaries against the runs' keys: two reads each)
    expected = {"left": ["cu_seqlens"] * 2, "right": ["cu_seqlens"] * 4 + ["cu_seqlens_k"] * 2,
                "prefix": ["cu_seqlens"] * 2 + ["cu_seqlens_k"] * 2}[kind]
    assert sorted(reads) == expected, reads
