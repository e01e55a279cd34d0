"""The deterministic attention backward with dQ partials (``set_deterministic_backward("partials")``).

The dK/dV kernel forms dQ as the atomic backward does, but each of its P programs per (sequence,
KV head) adds into an fp32 partial of its own, summed in a fixed order at the end. Here: parity
under the DESIGN.md rule over the masks, varlen and GQA with several key blocks per program and
idle programs; dK/dV bit for bit the recompute path's; identical bits run to run; under the
interpreter (programs run one after another) P = 1 is the atomic path bit for bit; the cases that
keep recomputing; the choice of P; bad settings.
"""
import functools
import itertools

import pytest
import torch

from conftest import DEVICE, INTERPRETER
from fastllama import ops
from fastllama.kernels import flash_attention as kfa
from fastllama.kernels import flash_attention_backward as kbwd
from fastllama.ops import attention as A
from fastllama.testing import assert_parity

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (the interpreter computes bf16 wrongly)


@pytest.fixture
def partials():
    """``set(P)``: the partials backward with P partials (None: P chosen per launch) for one test."""
    previous = A._deterministic_backward.copy()
    yield lambda p=None: ops.set_deterministic_backward("partials", p)
    A._deterministic_backward.update(previous)


@pytest.fixture
def launches(monkeypatch):
    """The ``dq_partials`` of every backward launch."""
    seen = []
    real = kbwd.flash_attention_backward
    monkeypatch.setattr(kbwd, "flash_attention_backward",
                        lambda *a, **kw: seen.append(kw["dq_partials"]) or real(*a, **kw))
    return seen


def _qkv(B, Hq, Hk, Tq, Tk, D, dtype=DTYPE):
    make = lambda H, T: torch.randn(B, H, T, D, device=DEVICE, dtype=torch.float32).to(dtype).requires_grad_()
    return make(Hq, Tq), make(Hk, Tk), make(Hk, Tk)


def _grads(q, k, v, dout, **kwargs):
    return torch.autograd.grad(ops.flash_attention(q, k, v, **kwargs), (q, k, v), dout)


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


# (q, k, v, kwargs) makers: 16-row blocks, so every program owns several key blocks
CASES = {
    "varlen Tq != Tk, empty sequences, GQA 4:1": lambda: (
        *_qkv(1, 4, 1, 128, 1, 32)[:1], *_qkv(1, 4, 1, 1, 136, 32)[1:],
        dict(causal=True, cu_seqlens=_cu([70, 3, 0, 33, 17, 5]), cu_seqlens_k=_cu([50, 9, 4, 33, 40, 0]))),
    "window, partial key block": lambda: (*_qkv(2, 2, 2, 37, 45, 64), dict(causal=False, window=(7, 3))),
    "full, partial key block": lambda: (*_qkv(2, 2, 2, 37, 45, 64), dict(causal=False)),
    "causal Tq > Tk, GQA 2:1": lambda: (*_qkv(1, 4, 2, 61, 29, 32), dict(causal=True)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("P", [3, 7])
def test_parity_and_the_recompute_paths_dk_dv(monkeypatch, partials, launches, case, P):
    """P = 7 leaves programs with no key block (their partials stay zeros); the varlen case's
    sequences have 0 to 4 key blocks each (P = 1: the atomic-equality test below). dK/dV come
    from the same kernel body in the same order as the recompute path's, so they are its bits
    exactly."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    torch.manual_seed(0)
    q, k, v, kwargs = CASES[case]()
    dout = torch.randn_like(q)
    recomputed = _grads(q, k, v, dout, **kwargs)
    partials(P)
    assert_parity(functools.partial(ops.flash_attention, **kwargs), functools.partial(A._reference, **kwargs),
                  q, k, v, names=("q", "k", "v"), output_names=("out",), title=f"{case} dQ partials {P}")
    got = _grads(q, k, v, dout, **kwargs)
    assert launches == [0, P, P]
    assert torch.equal(got[1], recomputed[1]) and torch.equal(got[2], recomputed[2])


def test_large_negative_scores(monkeypatch, partials):
    """Scores near -18 (lse far below 0): padding keys must be masked, not zeroed, or p = 2^(-lse)
    overflows fp16 (the atomic path's dQ came out NaN)."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    torch.manual_seed(0)
    partials(2)
    for dtype in (torch.float16,) + ((torch.bfloat16,) if DEVICE == "cuda" else ()):
        q, k, v = _qkv(1, 2, 1, 24, 20, 64, dtype)
        with torch.no_grad():
            q.add_(1.5)
            k.sub_(1.5)
        for window in (None, (7, 3)):
            assert_parity(functools.partial(ops.flash_attention, causal=False, window=window),
                          functools.partial(A._reference, causal=False, window=window), q, k, v,
                          names=("q", "k", "v"), output_names=("out",), title=f"large negative scores {window}")


def test_identical_bits_run_to_run(monkeypatch, partials):
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (32, 32, 4, 1) for name in ("fwd", "dq", "dkdv")})
    torch.manual_seed(0)
    q, k, v = _qkv(2, 4, 1, 100, 100, 64)
    dout = torch.randn_like(q)
    partials(3)
    first, second = (_grads(q, k, v, dout, causal=True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter runs programs in order: atomics add in a known order")
def test_one_partial_is_the_atomic_backward_bit_for_bit(monkeypatch, partials):
    """With P = 1 the one program adds key blocks 0, 1, 2, ... in turn; the interpreter runs the
    atomic kernel's programs (one per key block) in that same order, so dQ is the same sum in the
    same order: equal bits. (P > 1 sums the partials after: other bits, checked by parity.)"""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    torch.manual_seed(0)
    q, k, v = _qkv(1, 4, 2, 70, 70, 32)
    dout = torch.randn_like(q)
    atomic = _grads(q, k, v, dout, causal=True, deterministic=False)
    partials(1)
    one = _grads(q, k, v, dout, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(atomic, one))
    partials(2)
    assert not torch.equal(_grads(q, k, v, dout, causal=True)[0], one[0])  # the test can tell sums apart


def test_fp32_softcap_and_atomic_keep_their_backward(partials, launches):
    """fp32 inputs and soft-capped scores always recompute, deterministic=False stays atomic: the
    setting reaches none of them. The launcher refuses dq_partials with any of them."""
    torch.manual_seed(0)
    partials(2)
    for dtype, kwargs in ((torch.float32, {}), (DTYPE, dict(softcap=5.0)), (DTYPE, dict(deterministic=False))):
        q, k, v = _qkv(1, 2, 1, 40, 40, 64, dtype)
        _grads(q, k, v, torch.ones_like(q), **kwargs)
    assert launches == [0, 0, 0]
    with pytest.raises(ValueError, match="fp16/bf16"):
        kfa.dkdv_partials_configs(64, 4)
    q, k, v = _qkv(1, 2, 1, 40, 40, 64, torch.float32)
    lse = torch.zeros(2, 1, 2, 40)
    for dtype, kwargs in ((torch.float32, {}), (DTYPE, dict(softcap=5.0)), (DTYPE, dict(deterministic=False))):
        q16, k16, v16 = (t.detach().to(dtype) for t in (q, k, v))
        with pytest.raises(ValueError, match="dq_partials needs"):
            kbwd.flash_attention_backward(q16, q16, k16, v16, q16, lse, scale=0.125, before=80, after=0,
                                          dq_partials=2, **kwargs)


def test_default_is_recompute_and_the_setting_is_checked(partials, launches):
    assert A._deterministic_backward == {"algorithm": "recompute", "partials": None}
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 64)
    _grads(q, k, v, torch.ones_like(q))
    partials()
    assert ops.set_deterministic_backward("recompute") == ("partials", None)
    assert ops.set_deterministic_backward("partials", 4) == ("recompute", None)
    for bad, exc in ((("atomic",), ValueError), (("partials", 0), ValueError), (("partials", True), ValueError),
                     (("partials", 2.0), ValueError)):
        with pytest.raises(exc):
            ops.set_deterministic_backward(*bad)
    assert A._deterministic_backward == {"algorithm": "partials", "partials": 4}  # a refused call changes nothing
    _grads(q, k, v, torch.ones_like(q))
    assert launches == [0, 4]


class _Props:
    multi_processor_count = 132


@pytest.mark.parametrize("n_programs,max_keys,dq_elements,expected", [
    (80, 4096, 10 * 32 * 4096 * 64, 7),   # Llama-3.2-1B training, batch 10: 4 x 132 SMs over 80 programs
    (64, 4096, 4 * 16 * 4096 * 128, 9),
    (16, 8192, 2 * 32 * 8192 * 128, 9),   # batch 2, 8 KV heads: 2 GiB of 268 MB partials beyond the first
    (16, 4096, 16 * 4096 * 64, 16),       # the cap of 16 (256 programs)
    (80, 300, 10 * 32 * 300 * 64, 5),     # one partial per 64 keys at most
    (1000, 4096, 10 ** 6, 1),             # enough programs without partials
    (80, 8192, 1 << 28, 3),               # 1 GiB each: two more than the first at most
    (8, 32768, 32 * 32768 * 128, 0),      # batch 1 at 32k: 5 x 8 programs leave SMs idle: recompute
])
def test_partial_count(monkeypatch, n_programs, max_keys, dq_elements, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props)
    assert kbwd.dq_partial_count(n_programs, max_keys, dq_elements, torch.device("cuda")) == expected
    assert kbwd.dq_partial_count(n_programs, max_keys, dq_elements, torch.device("cpu")) == 1


def test_autotuner_zeroes_every_partial():
    """Each timed candidate adds into the partials: the tuner's reset zeroes all P of them."""
    tuner = kbwd._attn_bwd_dkdv_partials_tuned.for_sm(90)
    dq = torch.zeros(3, 2, 3, 33, 64)
    tuner.pre_hook({"DQ": dq})
    dq.add_(1.0)
    tuner.post_hook({"DQ": dq}, exception=None)
    tuner.pre_hook({"DQ": dq}, reset_only=True)
    assert torch.count_nonzero(dq) == 0


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_candidates_are_the_partials_rows_and_built(sm, aligned, D):
    """The partials kernel's autotuner keeps its own row of this arch, and the build list
    compiles each of its tiles (with DQ_PARTIALS) for this arch."""
    archs = {(b.label, b.num_warps, b.num_stages): b.archs for b in A._build_configs()}
    q = torch.empty(1, 1, 1, D, dtype=torch.bfloat16)
    tuned = kbwd._attn_bwd_dkdv_partials_tuned.for_sm(sm)
    kept = tuned.early_config_prune(tuned.configs, {"Q": q}, D_PAD=D, PRECISION="ieee", ALIGNED=aligned)
    got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert got == set(kfa.dkdv_partials_configs(D, 2, "ieee", aligned, sm)) and got
    for bm, bn, w, s in got:
        label = f"flash_attention dkdv_partials bf16 d{D}{'' if aligned else ' unaligned'} M{bm} N{bn}"
        assert archs[label, w, s] is None or f"sm_{sm}" in archs[label, w, s]


def test_each_partial_holds_its_own_key_blocks(monkeypatch, partials):
    """Partial p holds dS K over the key blocks p, p + P, ... alone (computed here in float64 from
    the full softmax): a program that added into another's partial, or the wrong key blocks,
    still sums to the right dQ under the interpreter (its programs never race), so the sum alone
    would not show it. P = 4 over three key blocks: the last partial stays zeros."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    made = []
    zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **kw: made.append(zeros(*a, **kw)) or made[-1])
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 32)
    dout = torch.randn_like(q)
    partials(4)
    _grads(q, k, v, dout, causal=True)
    (acc,) = [t for t in made if t.dim() == 5]
    assert acc.shape == (4, 1, 2, 40, 32)

    q64, k64, v64, do64 = (t.detach().double() for t in (q, k, v, dout))
    scale = 32 ** -0.5
    s = (q64 @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(torch.ones(40, 40, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
    p = s.softmax(-1)
    dp = do64 @ v64.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    for owner in range(4):
        keys = torch.zeros(40, dtype=torch.bool, device=DEVICE)
        for block in range(owner, 3, 4):
            keys[16 * block:16 * (block + 1)] = True
        expected = (ds * keys) @ k64  # unscaled, as the kernel adds it
        got = acc[owner, 0].double()
        assert torch.allclose(got, expected, atol=2e-2 * expected.abs().max().item() + 1e-6), owner
        assert owner < 3 or torch.count_nonzero(got) == 0
