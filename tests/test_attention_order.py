"""The order flash attention's programs start in: each (sequence, head) in turn, or heads in groups
(``kernels.flash_attention.ordered_program``), and the choice between them, timed on the first
forward of each shape (``ops.attention.program_order_choices``).

The order never changes a result: every tile is computed once, by the same program body,
whichever order; here the grid visits each (tile, row) exactly once in the order described,
forward and backward give the same bits in every order, the group size follows the GPU's SMs and
L2, and the choice (the GPU's timing stood in for) is made once per shape by the forward and
followed by the backward.
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
    """Forward, dQ and dK/dV kernels launched in the grouped order (groups of 3 query heads, 2 KV
    heads: uneven last groups) give exactly the plain order's outputs, causal with GQA 3:1."""
    gen = torch.Generator().manual_seed(0)
    B, Hq, Hk, T, D = (1, 6, 2, 40, 32) if varlen else (3, 6, 2, 40, 32)
    q, k, v, do = (torch.randn(B, H, T, D, generator=gen).to(DEVICE, DTYPE) for H in (Hq, Hk, Hk, Hq))
    cu = dict(cu_seqlens_q=_cu([17, 0, 23]), cu_seqlens_k=_cu([17, 0, 23]), max_seqlen_q=23,
              max_seqlen_k=23) if varlen else {}
    before, after = kfa.mask_bounds(True, None, 2 * T)
    tiles = dict(config=(16, 16, 4, 1))
    results = []
    for groups in ((1, 1), (3, 2)):
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


class _StandInTimer:
    """``_timing.time_ms`` on the CPU: runs the function and returns the next time listed for the
    order it launched (the last forward launch's head_group: 1 plain, more grouped)."""

    def __init__(self, groups, heads_ms, grouped_ms):
        self.groups, self.ms = groups, {"heads": list(heads_ms), "grouped": list(grouped_ms)}

    def __call__(self, fn):
        fn()
        return self.ms["grouped" if self.groups[-1] > 1 else "heads"].pop(0)


@pytest.fixture
def order(monkeypatch):
    """The choice as on a GPU whatever the device (timing allowed, no capture, grouped head_group
    pair (4, 2)); records every forward launch's head_group and every backward's head_groups.
    Returns ``(forward groups, backward groups, set_times(heads_ms, grouped_ms))``."""
    forward, backward = [], []
    real_fwd, real_bwd = kfa.flash_attention_forward, kbwd.flash_attention_backward
    monkeypatch.setattr(kfa, "flash_attention_forward",
                        lambda *a, **kw: forward.append(kw["head_group"]) or real_fwd(*a, **kw))
    monkeypatch.setattr(kbwd, "flash_attention_backward",
                        lambda *a, **kw: backward.append(kw["head_groups"]) or real_bwd(*a, **kw))
    monkeypatch.setattr(A, "_program_orders", {})
    monkeypatch.setattr(A, "_AUTOTUNE", True)  # (GPU test runs set FASTLLAMA_AUTOTUNE=0)
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(A, "_backward_choices", {})
    monkeypatch.setattr(A, "_dq_partials", lambda *args: 0)  # (the recompute backward: no second choice)
    monkeypatch.setattr(timing, "can_time", lambda t: True)
    monkeypatch.setattr(timing, "capturing", lambda t: False)
    monkeypatch.setattr(A, "_grouped_head_groups", lambda *args: (4, 2))
    return forward, backward, lambda heads_ms, grouped_ms: monkeypatch.setattr(
        timing, "time_ms", _StandInTimer(forward, heads_ms, grouped_ms))


def _qkv():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, H, 40, 32, generator=gen).to(DEVICE, DTYPE).requires_grad_() for H in (4, 2, 2)]


@pytest.mark.parametrize("faster", ["grouped", "heads", "near tie"])
def test_the_first_forward_of_a_shape_chooses_the_order_for_its_kernels(order, faster):
    """Both orders timed alternately, best of three after an untimed run each; the grouped one
    kept only below 0.98x; then the forward, and the backward without timing again, run it; the
    next forward of the shape does not time."""
    forward, backward, set_times = order
    set_times([1.0, 1.0, 1.0, 1.0], {"grouped": [0.5] * 4, "heads": [2.0] * 4, "near tie": [0.99] * 4}[faster])
    q, k, v = _qkv()
    out = ops.flash_attention(q, k, v)
    groups = (4, 2) if faster == "grouped" else (1, 1)
    assert forward == [1, 4] * 4 + [groups[0]]
    out.sum().backward()
    assert backward == [groups]
    ops.flash_attention(q, k, v)
    assert forward[9:] == [groups[0]]
    (entry,) = A.program_order_choices().values()
    assert entry["order"] == ("grouped" if faster == "grouped" else "heads") and entry["head_groups"] == (4, 2)
    assert entry["heads_ms"] == 1.0 and entry["grouped_ms"] == {"grouped": 0.5, "heads": 2.0, "near tie": 0.99}[faster]


def test_no_choice_off_the_gpu_in_a_capture_or_for_a_plain_group(monkeypatch, order):
    """Plain order, untimed: off the GPU, with FASTLLAMA_AUTOTUNE=0, inside a CUDA-graph capture,
    after an out-of-memory while timing (none of these remembered), and where the grouped order
    would be the plain one (remembered, untimed); a backward never times."""
    forward, backward, set_times = order
    set_times([], [])  # (any timing would pop from an empty list)
    q, k, v = _qkv()
    for patch in ((timing, "can_time", lambda t: False), (A, "_AUTOTUNE", False), (timing, "capturing", lambda t: True)):
        with monkeypatch.context() as m:
            m.setattr(*patch)
            out = ops.flash_attention(q, k, v)
    out.sum().backward()
    with monkeypatch.context() as m:
        m.setattr(timing, "best_times", lambda runs, rounds: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
        ops.flash_attention(q, k, v)
    assert forward == [1] * 4 and backward == [(1, 1)] and not A.program_order_choices()
    monkeypatch.setattr(A, "_grouped_head_groups", lambda *args: (1, 8))
    ops.flash_attention(q, k, v)
    (entry,) = A.program_order_choices().values()
    assert forward[-1] == 1 and entry["order"] == "heads" and entry["heads_ms"] is None
