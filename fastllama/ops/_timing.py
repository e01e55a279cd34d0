"""Choosing between two implementations of one step by timing them on the GPU, once per shape.

Three choices are made so, the first time an op meets a shape: the chunked cross-entropy's weight
gradient (Triton's GEMM or cuBLAS's), the deterministic attention backward (dQ recomputed or
summed from partials), and the order the attention kernels' programs start in (forward; dQ with
dK/dV). All follow the same rules, kept here:

- each candidate runs once untimed first (a first launch compiles and autotunes);
- then the candidates are timed in turn, round after round, and each keeps its best time: a
  passing slowdown (another process's kernel, a clock change) lands on both, not on one;
- nothing is timed off the GPU, under the Triton interpreter, or inside a CUDA-graph capture.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._interpreter import interpreter_active


def can_time(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device can be timed (a GPU, not the interpreter)."""
    return t.device.type == "cuda" and not interpreter_active()


def capturing(t: torch.Tensor) -> bool:
    """Whether the current stream of ``t``'s device is capturing a CUDA graph (no timing there:
    nothing runs until the graph is replayed)."""
    with torch.cuda.device_of(t):
        return torch.cuda.is_current_stream_capturing()


def time_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call of ``fn`` on the current CUDA stream (events: work queued
    before it does not count)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def best_times(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Each of ``runs`` called once untimed, then timed in turn for ``rounds`` rounds; the best
    time of each, in ms."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            times[name].append(time_ms(run))
    return {name: min(ms) for name, ms in times.items()}
