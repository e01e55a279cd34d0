"""The deterministic attention backward with dQ partials (``set_deterministic_backward("partials")``).

The dK/dV kernel forms dQ as the atomic backward does, but each of its P programs per (sequence,
KV head) adds into an fp32 partial of its own, summed in a fixed order at the end. Here: parity
under the DESIGN.md rule over the masks, varlen and GQA with several key blocks per program and
idle programs; dK/dV bit for bit the recompute path's; identical bits run to run; under the
interpreter (programs run one after another) P = 1 is the atomic path bit for bit; the cases that
keep recomputing; the choice of P; bad settings.
"""
import contextlib
import functools
import itertools

import pytest
import torch

from conftest import DEVICE, INTERPRETER, deterministic_algorithms
from fastllama import ops
from fastllama.kernels import flash_attention as kfa
from fastllama.kernels import flash_attention_backward as kbwd
from fastllama.ops import _timing as timing
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


def test_default_is_auto_and_the_setting_is_checked(partials, launches):
    """"auto" by default, which off a GPU recomputes, untimed (the tests below stand in for the
    GPU's timing)."""
    assert A._deterministic_backward == {"algorithm": "auto", "partials": None}
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
    assert ops.set_deterministic_backward("auto") == ("partials", 4)
    _grads(q, k, v, torch.ones_like(q))
    assert launches == [0, 4, 0] and not A.deterministic_backward_choices()


# ----------------------------------------------------------------------------------------------
# "auto": recompute or partials, timed once per shape (the GPU's timing stood in for)
# ----------------------------------------------------------------------------------------------
class _StandInTimer:
    """``_timing.time_ms`` on the CPU: runs the function, looks at which backward it launched
    (the ``launches`` fixture's last entry: 0 recompute, P partials) and returns the next time
    listed for it."""

    def __init__(self, launches, recompute_ms, partials_ms):
        self.launches, self.ms = launches, {"recompute": list(recompute_ms), "partials": list(partials_ms)}

    def __call__(self, fn):
        fn()
        return self.ms["partials" if self.launches[-1] else "recompute"].pop(0)


@pytest.fixture
def gpu_like(monkeypatch, launches):
    """"auto" as on a GPU whatever the device: timing allowed, no capture, memory to spare, no
    choice made yet; returns ``set_times(recompute_ms, partials_ms)`` for the stand-in timer."""
    monkeypatch.setattr(A, "_backward_choices", {})
    monkeypatch.setattr(A, "_AUTOTUNE", True)  # (GPU test runs set FASTLLAMA_AUTOTUNE=0)
    monkeypatch.setattr(timing, "can_time", lambda t: True)
    monkeypatch.setattr(A, "_program_orders", {})  # (the forward's program order: plain, untimed)
    monkeypatch.setattr(A, "_grouped_head_groups", lambda *args: (1, 1))
    monkeypatch.setattr(timing, "capturing", lambda t: False)
    monkeypatch.setattr(A, "_partials_fit", lambda q, partials: True)
    return lambda recompute_ms, partials_ms: monkeypatch.setattr(
        timing, "time_ms", _StandInTimer(launches, recompute_ms, partials_ms))


@pytest.mark.parametrize("case", ["partials faster", "near tie", "recompute faster"])
def test_auto_times_both_alternately_and_keeps_clearly_faster_partials(launches, gpu_like, case):
    """The partials run once alone (a failure of theirs is caught there), each once untimed (it
    autotunes), then best of three each, alternating (a passing slowdown lands on both); the
    partials are kept only below 0.95x the recompute's time."""
    partials_ms = {"partials faster": [0.9, 0.8, 3.0], "near tie": [0.97, 0.99, 0.96],
                   "recompute faster": [2.0, 1.5, 1.6]}[case]
    gpu_like([1.1, 1.0, 5.0], partials_ms)
    entry = A._choose_backward(lambda p: launches.append(p), 6)
    assert launches == [6, 0, 6] + [0, 6] * 3
    assert entry == {"algorithm": "partials" if case == "partials faster" else "recompute", "partials": 6,
                     "recompute_ms": 1.0, "partials_ms": min(partials_ms), "why": ""}


def test_auto_chooses_at_the_first_backward_of_a_shape_and_keeps_it(monkeypatch, launches, gpu_like):
    """The whole backward is timed both ways at the first launch of a shape, the faster kept for
    the shape (later backwards run it untimed, bit for bit the forced algorithm's), a new shape (here
    the mask kind) chooses again; fp32 never gets that far (it always recomputes). P is 1 (as off the GPU)."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (32, 32, 4, 1) for name in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(kbwd, "dq_partial_count", lambda *args: 1)
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 32)
    dout = torch.randn_like(q)
    with ops.attention.deterministic_backward("partials"):
        forced = _grads(q, k, v, dout, causal=True)
    del launches[:]
    gpu_like([2.0] * 8, [1.0] * 8)
    chosen = _grads(q, k, v, dout, causal=True)
    assert launches == [1] + [0, 1] * 4 + [1]
    assert all(torch.equal(a, b) for a, b in zip(chosen, forced))
    _grads(q, k, v, dout, causal=True)
    assert launches[10:] == [1]
    key = (q.device.index, DTYPE, 32, 2, 1, 128, kfa.key_bucket(40, 40, *kfa.mask_bounds(True, None, 80)), False)
    assert A.deterministic_backward_choices() == {key: {"algorithm": "partials", "partials": 1,
                                                        "recompute_ms": 2.0, "partials_ms": 1.0, "why": ""}}
    _grads(q, k, v, dout, causal=False)
    assert len(launches) == 11 + 10 and len(A.deterministic_backward_choices()) == 2
    q32, k32, v32 = _qkv(1, 2, 1, 40, 40, 32, torch.float32)
    _grads(q32, k32, v32, torch.ones_like(q32), causal=True)
    assert launches[-1] == 0 and len(launches) == 22


def test_auto_shape_key():
    """A shape is what a timed choice may depend on (this one's and the program order's): a count
    (P here; sequences x heads for the order) to a power of two (a varying count of packed
    sequences gives nearby counts), length buckets, the mask kind (causal, full, window), varlen."""
    q, k = torch.empty(2, 8, 300, 64, dtype=torch.float16), torch.empty(2, 2, 300, 64, dtype=torch.float16)
    key = lambda p=5, mq=300, mk=300, before=10**6, after=0, varlen=False: A._shape_key(q, k, p, mq, mk, before,
                                                                                        after, varlen)
    assert key() == (None, torch.float16, 64, 4, 8, 512, kfa.key_bucket(300, 300, 10**6, 0), False)
    assert key() == key(p=7) == key(mq=257, mk=500) != key(p=9)
    assert len({key(), key(after=10**6), key(before=30), key(varlen=True), key(mq=600)}) == 5


@pytest.mark.skipif(DEVICE != "cuda", reason="times the two backwards on the GPU")
def test_auto_on_the_gpu_times_both_and_runs_its_choice(monkeypatch):
    """The real thing: both backwards timed on the GPU (fixed tiles: no autotuning), the choice
    recorded with both times, and the gradients bit for bit those of the algorithm chosen."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (64, 64, 4, 2) for name in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(A, "_AUTOTUNE", True)
    monkeypatch.setattr(A, "_backward_choices", {})
    monkeypatch.setattr(A, "_program_orders", {})
    torch.manual_seed(0)
    q, k, v = _qkv(4, 8, 4, 1024, 1024, 64)
    dout = torch.randn_like(q)
    got = _grads(q, k, v, dout, causal=True)
    (entry,) = A.deterministic_backward_choices().values()
    assert entry["partials"] == kbwd.dq_partial_count(16, 1024, q.numel(), q.device) > 0
    assert entry["recompute_ms"] > 0 and entry["partials_ms"] > 0
    with ops.attention.deterministic_backward(entry["algorithm"]):
        forced = _grads(q, k, v, dout, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(got, forced))


def test_auto_rules(monkeypatch, gpu_like):
    """Recompute, untimed and not remembered: off a GPU, with FASTLLAMA_AUTOTUNE=0, under
    torch.use_deterministic_algorithms. Recompute, untimed and remembered for the shape (so its
    later backwards agree): first met inside a CUDA-graph capture, or with the partials taking
    more than half the free memory. A timed choice holds for the shape, capture or not, with no
    memory check after it."""
    chosen = []
    monkeypatch.setattr(A, "_choose_backward", lambda run, partials: chosen.append(partials) or {
        "algorithm": "partials", "partials": partials})
    q, run = torch.empty(2, 4, 8, 16), None
    auto = lambda key: A._auto_partials(q, 5, key, run)

    monkeypatch.setattr(A, "_AUTOTUNE", False)
    assert auto("k") == 0
    monkeypatch.setattr(A, "_AUTOTUNE", True)
    with deterministic_algorithms():
        assert auto("k") == 0
    monkeypatch.setattr(timing, "can_time", lambda t: False)
    assert auto("k") == 0 and not A.deterministic_backward_choices()
    monkeypatch.setattr(timing, "can_time", lambda t: True)

    monkeypatch.setattr(timing, "capturing", lambda t: True)
    assert auto("captured") == 0
    monkeypatch.setattr(timing, "capturing", lambda t: False)
    assert auto("captured") == 0 and "capture" in A.deterministic_backward_choices()["captured"]["why"]
    monkeypatch.setattr(A, "_partials_fit", lambda q, p: False)
    assert [auto("short"), auto("short")] == [0, 0] and not chosen
    assert "free memory" in A.deterministic_backward_choices()["short"]["why"]

    monkeypatch.setattr(A, "_partials_fit", lambda q, p: True)
    assert [auto("k"), auto("k")] == [5, 5] and chosen == [5]
    monkeypatch.setattr(timing, "capturing", lambda t: True)
    monkeypatch.setattr(A, "_partials_fit", lambda q, p: pytest.fail("no memory check after the choice"))
    assert auto("k") == 5


class _FailingTuner:
    nargs = {"DQ": "the P partials"}


@pytest.mark.parametrize("failure", ["out of memory", "compile error", "CUDA error"])
def test_auto_keeps_the_recompute_when_the_partials_fail(monkeypatch, launches, gpu_like, failure):
    """The partials run first, alone: an out-of-memory or any failure of theirs keeps the
    recompute (remembered for the shape, with why; a failure warns), and the partials
    autotuner lets go of the arguments a failed run left it; a CUDA error is raised (nothing
    to fall back to)."""
    error = {"out of memory": torch.OutOfMemoryError("CUDA out of memory"),
             "compile error": RuntimeError("PassManager::run failed"),
             "CUDA error": RuntimeError("CUDA error: an illegal memory access was encountered")}[failure]
    tuner = _FailingTuner()
    monkeypatch.setattr(kbwd._attn_bwd_dkdv_partials_tuned, "latest", tuner, raising=False)

    def run(p):
        launches.append(p)
        if p:
            raise error

    if failure == "CUDA error":
        with pytest.raises(RuntimeError, match="CUDA error"):
            A._choose_backward(run, 3)
        return
    with pytest.warns(RuntimeWarning, match="PassManager") if failure == "compile error" else contextlib.nullcontext():
        entry = A._choose_backward(run, 3)
    assert launches == [3] and tuner.nargs is None
    assert entry["algorithm"] == "recompute" and entry["partials_ms"] is None
    assert {"out of memory": "out of memory", "compile error": "RuntimeError: PassManager"}[failure] in entry["why"]


@pytest.mark.parametrize("free,reserved,allocated,fits", [
    (64 * 2**20, 0, 0, True), (64 * 2**20 - 1, 0, 0, False), (32 * 2**20, 40 * 2**20, 8 * 2**20, True)])
def test_partials_fit_in_half_the_free_memory(monkeypatch, free, reserved, allocated, fits):
    """P = 3 partials of 2 Mi fp32 elements plus their sum: 32 MiB, against half of the driver's
    free memory plus what torch's allocator holds unused."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 2**40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
    assert A._partials_fit(torch.empty(2, 16, 1024, 64, dtype=torch.float16), 3) is fits


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
