"""The order flash attention's programs start in: each (sequence, head) in turn, or heads in groups
(``kernels.flash_attention.ordered_program``), and the choice between them, timed on the first
forward and, separately, the first backward of each shape (``ops.attention.program_order_choices``).

The order never changes a result: every tile is computed once, by the same program body,
whichever order; here the grid visits each (tile, row) exactly once in the order described,
forward and backward give the same bits in every order, the group size follows the GPU's SMs and
L2, and the choice (the GPU's timing stood in for) is made once per shape and direction, the
backward's before "auto" compares the recompute with the dQ partials.
"""
import itertools

import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE
from fastllama import ops
from fastllama.kernels import flash_attention as kfa
from fastllama.kernels import flash_attention_backward as kbwd
from fastllama.kernels.flash_attention import ordered_program
from fastllama.ops import _timing as timing
from fastllama.ops import attention as A

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # (the interpreter computes bf16 wrongly)


@triton.jit
def _record_order(OUT, head_group, REVERSE: tl.constexpr):
    tile, row = ordered_program(head_group, REVERSE)
    start = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)  # the program's place in launch order
    tl.store(OUT + 2 * start, tile)
    tl.store(OUT + 2 * start + 1, row)


@pytest.mark.parametrize("head_group", [1, 3, 4, 7, 16])
@pytest.mark.parametrize("reverse", [True, False])
def test_programs_start_group_by_group_tile_by_tile(head_group, reverse):
    """5 tiles x 7 rows: groups of rows (the last one short: 7 = 3 + 3 + 1), within a group each
    tile (last first when reversed) over the group's rows; every (tile, row) exactly once."""
    n_tiles, n_rows = 5, 7
    out = torch.full((n_rows * n_tiles, 2), -1, dtype=torch.int32, device=DEVICE)
    _record_order[(n_tiles, n_rows)](out, head_group, REVERSE=reverse)
    expected = [(n_tiles - 1 - t if reverse else t, r)
                for first in range(0, n_rows, head_group)
                for t in range(n_tiles) for r in range(first, min(first + head_group, n_rows))]
    assert [tuple(p) for p in out.tolist()] == expected
    assert sorted(expected) == list(itertools.product(range(n_tiles), range(n_rows)))


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("varlen", [False, True])
def test_every_order_gives_the_same_bits(varlen):
    """Forward, dQ and dK/dV kernels launched in the grouped order (groups of 4 rows: 18 query
    head rows and 6 KV head rows, both with a short last group) give exactly the plain order's
    outputs, causal with GQA 3:1."""
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hk, T, D = (1, 6, 2, 40, 32) if varlen else (3, 6, 2, 40, 32)
    q, k, v, do = (torch.randn(B, H, T, D, generator=gen).to(DEVICE, DTYPE) for H in (Hq, Hk, Hk, Hq))
    cu = dict(cu_seqlens_q=_cu([17, 0, 23]), cu_seqlens_k=_cu([17, 0, 23]), max_seqlen_q=23,
              max_seqlen_k=23) if varlen else {}
    before, after = kfa.mask_bounds(True, None, 2 * T)
    tiles = dict(config=(16, 16, 4, 1))
    results = []
    for groups in ((1, 1), (4, 4)):
        out, lse = kfa.flash_attention_forward(q, k, v, scale=D ** -0.5, before=before, after=after, **cu, **tiles,
                                               head_group=groups[0])
        grads = kbwd.flash_attention_backward(do, q, k, v, out, lse, scale=D ** -0.5, before=before, after=after,
                                              **cu, config_dq=(16, 16, 4, 1), config_dkdv=(16, 16, 4, 1),
                                              head_groups=groups)
        results.append((out, lse, *grads))
    for plain, grouped in zip(*results):
        assert torch.equal(plain, grouped)


@pytest.mark.parametrize("n_tiles,n_rows,row_bytes,expected", [
    (32, 64, 2 << 20, 8),         # B 4 x 16 heads, 4k tokens, d128: 2 x 132 programs want 16 rows, L2 holds 12
    (32, 320, 256 << 10, 16),     # Llama-3.2-1B training, batch 10: 16 rows fill the GPU twice
    (8, 256, 512 << 10, 32),      # 1k tokens: many rows wanted, L2 holds 50
    (128, 16, 8 << 20, 2),        # 16k tokens: L2 holds three heads' keys and values
    (300, 16, 1 << 20, 1),        # one row's tiles fill the GPU twice: plain order
    (32, 64, 60 << 20, 1),        # one row alone is more than half of L2
    (4, 3, 1 << 20, 4),           # never more rows than there are (to a power of two)
])
def test_group_size_fills_the_gpu_within_l2(n_tiles, n_rows, row_bytes, expected):
    assert kfa.grouped_heads(n_tiles, n_rows, row_bytes, sms=132, l2_bytes=50 << 20) == expected


def test_launchers_check_the_head_group():
    """At least 1 (0 would divide by zero in the kernel), a plain positive int, at most the rows,
    and small enough that head_group x tiles stays in 32 bits."""
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="head_group must be a positive int"):
            kfa.checked_head_group(bad, 10, 10)
    assert kfa.checked_head_group(8, 3, 10) == 3
    assert kfa.checked_head_group(64, 1000, 2**26) == 31 and kfa.checked_head_group(4, 1000, 2**31) == 1


class _StandInTimer:
    """``_timing.time_ms`` on the CPU: runs the function and returns the next time listed for the
    order it launched (the last launch's head groups: all 1 plain, else grouped)."""

    def __init__(self, launches, heads_ms, grouped_ms):
        self.launches, self.ms = launches, {"heads": list(heads_ms), "grouped": list(grouped_ms)}

    def __call__(self, fn):
        fn()
        return self.ms["grouped" if max(self.launches[-1]) > 1 else "heads"].pop(0)


@pytest.fixture
def order(monkeypatch):
    """The choice as on a GPU whatever the device (timing allowed, no capture, grouped head_group
    pair (4, 2)); records every forward launch's head_group and every backward's head_groups.
    Returns ``(forward groups, backward groups, set_times(heads_ms, grouped_ms))``."""
    forward, backward, launches = [], [], []
    real_fwd, real_bwd = kfa.flash_attention_forward, kbwd.flash_attention_backward

    def fwd(*a, **kw):
        forward.append(kw["head_group"])
        launches.append((kw["head_group"],))
        return real_fwd(*a, **kw)

    def bwd(*a, **kw):
        backward.append(kw["head_groups"])
        launches.append(kw["head_groups"])
        return real_bwd(*a, **kw)

    monkeypatch.setattr(kfa, "flash_attention_forward", fwd)
    monkeypatch.setattr(kbwd, "flash_attention_backward", bwd)
    monkeypatch.setattr(A, "_program_orders", {})
    monkeypatch.setattr(A, "_AUTOTUNE", True)  # (GPU test runs set FASTLLAMA_AUTOTUNE=0)
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(A, "_backward_choices", {})
    monkeypatch.setattr(A, "_dq_partials", lambda *args: 0)  # (the recompute backward: no second choice)
    monkeypatch.setattr(timing, "can_time", lambda t: True)
    monkeypatch.setattr(timing, "capturing", lambda t: False)
    monkeypatch.setattr(A, "_grouped_head_groups", lambda *args: (4, 2))
    return forward, backward, lambda heads_ms, grouped_ms: monkeypatch.setattr(
        timing, "time_ms", _StandInTimer(launches, heads_ms, grouped_ms))


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, 16, 16, generator=gen).to(DEVICE, DTYPE).requires_grad_() for H in (2, 1, 1)]


@pytest.mark.parametrize("faster", ["grouped", "heads", "near tie"])
def test_the_first_launch_of_a_shape_chooses_the_order_each_way(order, faster):
    """The first forward times both orders of the forward kernel, the first backward both of the
    dQ and dK/dV kernels: alternately, best of three after an untimed run each; the grouped one
    kept only below 0.98x; later launches of the shape run the choice untimed."""
    forward, backward, set_times = order
    grouped_ms = {"grouped": [0.5] * 6, "heads": [2.0] * 6, "near tie": [0.99] * 6}[faster]
    set_times([1.0] * 6, grouped_ms)
    q, k, v = _qkv()
    out = ops.flash_attention(q, k, v)
    groups = (4, 2) if faster == "grouped" else (1, 1)
    assert forward == [1, 4] * 4 + [groups[0]]
    out.sum().backward()
    assert backward == [(1, 1), (4, 2)] * 4 + [groups]
    ops.flash_attention(q, k, v).sum().backward()
    assert forward[9:] == [groups[0]] and backward[9:] == [groups]
    choices = A.program_order_choices()
    assert sorted(key[0] for key in choices) == ["backward", "forward"]
    for key, entry in choices.items():
        assert entry == {"order": "grouped" if faster == "grouped" else "heads",
                         "head_groups": (4, 1) if key[0] == "forward" else (4, 2), "heads_ms": 1.0,
                         "grouped_ms": grouped_ms[0]}


def test_no_choice_off_the_gpu_in_a_capture_or_for_a_plain_group(monkeypatch, order):
    """Plain order, untimed: off the GPU, with FASTLLAMA_AUTOTUNE=0, inside a CUDA-graph capture,
    after an out-of-memory while timing (none of these remembered), and where the grouped order
    would be the plain one (remembered, untimed); the partials backward has nothing to order."""
    forward, backward, set_times = order
    set_times([], [])  # (any timing would pop from an empty list)
    q, k, v = _qkv()
    untimed = ((timing, "can_time", lambda t: False), (A, "_AUTOTUNE", False), (timing, "capturing", lambda t: True))
    for patch in untimed:
        with monkeypatch.context() as m:
            m.setattr(*patch)
            ops.flash_attention(q, k, v).sum().backward()
    with monkeypatch.context() as m:
        m.setattr(timing, "best_times", lambda runs, rounds: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
        ops.flash_attention(q, k, v).sum().backward()
    assert forward == [1] * 4 and backward == [(1, 1)] * 4 and not A.program_order_choices()
    with monkeypatch.context() as m:
        m.setattr(A, "_dq_partials", lambda *args: 2)
        m.setattr(A, "_auto_partials", lambda q, partials, key, run: partials)
        m.setattr(timing, "best_times", lambda runs, rounds: {"heads": 1.0, "grouped": 2.0})  # (the forward's)
        ops.flash_attention(q, k, v).sum().backward()
    assert backward[-1] == (1, 1) and [key[0] for key in A.program_order_choices()] == ["forward"]
    monkeypatch.setattr(A, "_program_orders", {})
    monkeypatch.setattr(A, "_grouped_head_groups", lambda *args: (1, 1))
    ops.flash_attention(q, k, v).sum().backward()
    assert forward[-1] == 1 and backward[-1] == (1, 1)
    assert [(e["order"], e["heads_ms"]) for e in A.program_order_choices().values()] == [("heads", None)] * 2


def test_auto_compares_the_partials_with_the_recompute_in_its_own_order(monkeypatch, order):
    """Under "auto" the first backward of a shape chooses the recompute's order first (at the
    recompute's untimed first run), then times the partials against the recompute in that order.
    Here the grouped recompute (1.0 ms) beats the partials (1.5 ms), which beat the plain-order
    recompute (2.0 ms, under 0.95 x 1.5): the recompute is kept, grouped."""
    forward, backward, set_times = order
    partials = []
    real_bwd = kbwd.flash_attention_backward  # (the order fixture's recorder)

    def bwd(*a, **kw):
        partials.append(kw["dq_partials"])
        return real_bwd(*a, **kw)

    def time_ms(fn):
        fn()
        return 1.5 if partials[-1] else 1.0 if max(backward[-1]) > 1 else 2.0

    monkeypatch.setattr(kbwd, "flash_attention_backward", bwd)
    monkeypatch.setattr(A, "_dq_partials", lambda *args: 2)
    monkeypatch.setattr(A, "_partials_fit", lambda q, partials: True)
    set_times([1.0] * 3, [2.0] * 3)  # (the forward's order, chosen first: plain)
    q, k, v = _qkv()
    out = ops.flash_attention(q, k, v)
    monkeypatch.setattr(timing, "time_ms", time_ms)
    out.sum().backward()
    # partials alone; the recompute's first run: its order's untimed runs, three rounds, then
    # itself grouped; the partials' untimed run; three rounds of both; the backward itself
    assert list(zip(partials, backward)) == ([(2, (1, 1)), (0, (1, 1)), (0, (4, 2))] + [(0, (1, 1)), (0, (4, 2))] * 3
                                            + [(0, (4, 2)), (2, (1, 1))] + [(0, (4, 2)), (2, (1, 1))] * 3
                                            + [(0, (4, 2))])
    (choice,) = A.deterministic_backward_choices().values()
    assert choice == {"algorithm": "recompute", "partials": 2, "recompute_ms": 1.0, "partials_ms": 1.5, "why": ""}
    (order_choice,) = [e for key, e in A.program_order_choices().items() if key[0] == "backward"]
    assert order_choice == {"order": "grouped", "head_groups": (4, 2), "heads_ms": 2.0, "grouped_ms": 1.0}

