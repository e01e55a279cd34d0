"""``flash_attention``: a drop-in for ``scaled_dot_product_attention`` in Llama-family models.

Validation, config choice, the ``torch.library`` custom ops (``fastllama::flash_attention_fwd`` /
``fastllama::flash_attention_bwd``: ``torch.compile(fullgraph=True)`` sees one op each way) and
their autograd, plus the op-table entries. Kernels: ``fastllama.kernels.flash_attention`` and
``flash_attention_backward``.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from typing import Optional

import torch
import triton

from .. import reference
from .._interpreter import interpreter_active
from ..optable import REPORT_ARCHS, KernelBuild, OpCase, OpSpec
from ..reference.functional import attention_varlen
from ..kernels import flash_attention as _fwd
from ..kernels import flash_attention_backward as _bwd
from . import _timing
from ._checks import (check_attention_device, check_last_dim_contiguous, check_same, check_sinks, check_softcap,
                      check_tensor, check_window_form, tile_rows_fit_int32)

__all__ = ["flash_attention", "flash_attention_with_lse", "set_deterministic_backward", "deterministic_backward",
           "deterministic_backward_choices", "program_order_choices", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256  # one padded head row (up to 256) lives in registers per query row
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second axis: (sequence, head) programs
_PRECISIONS = ("ieee", "tf32")
_LN2 = math.log(2.0)

# FASTLLAMA_AUTOTUNE=0: every GPU launch takes its row's first candidate tile, untimed (test runs
# on a GPU; see the README). Read once, at import.
_AUTOTUNE = os.environ.get("FASTLLAMA_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")

# Tests set this to {"fwd": cfg, "dq": cfg, "dkdv": cfg} with cfg = (BLOCK_M, BLOCK_N, warps,
# stages) to force small blocks (every masked/unmasked phase in short sequences). None: the
# interpreter uses fastllama.kernels.flash_attention.INTERPRETER_CONFIG, a GPU autotunes.
FORCE_CONFIG: dict | None = None


# How the deterministic backward of fp16/bf16 inputs forms dQ: set_deterministic_backward.
_DETERMINISTIC_BACKWARDS = ("auto", "recompute", "partials")
_deterministic_backward = {"algorithm": "auto", "partials": None}


def set_deterministic_backward(algorithm: str, partials: int | None = None) -> tuple[str, int | None]:
    """Chooses how flash attention's deterministic backward (``deterministic=True``, the default)
    forms dQ for fp16/bf16 inputs, process-wide, from the next backward on; returns the previous
    ``(algorithm, partials)``. Each algorithm gives bit-identical gradients run to run; they
    differ in speed and memory, and in dQ's last bits against each other.

    - ``"recompute"``: a dQ kernel of its own recomputes the probabilities, so each (query block,
      key block) pair costs seven matmuls, and nothing is kept beyond dQ itself.
    - ``"partials"``: the dK/dV kernel forms dQ too (five matmuls a pair, as the atomic
      ``deterministic=False`` backward and SDPA's flash backend do), but each of its P programs
      per (sequence, KV head) owns the key blocks p, p + P, ... and adds into an fp32 dQ partial
      of its own; the P partials are then summed in a fixed order (torch's sum over their
      axis). It holds P + 1 fp32 copies of dQ at its peak. ``partials`` fixes P; None picks it per
      launch (``kernels.flash_attention_backward.dq_partial_count``: about four programs per
      SM, at most one per 64 keys, at most 16, at most 2 GiB of partials beyond the first; and
      where that cannot give every SM a program, long sequences of few heads, the launch
      recomputes instead). dQ's last bits depend on P, so on the GPU's SM count and the shape
      (batch, heads, length), and, as with every backward here, on the tile the autotuner
      picked.
    - ``"auto"`` (default): on a GPU, the first backward of each shape (dtype, head dim, query
      heads per KV head, P to a power of two, bucketed lengths, mask kind, varlen) times both,
      alternately, best of three each after an untimed run (which autotunes them), and keeps the
      partials only if they take less than :data:`PARTIALS_MARGIN` of the recompute's time.
      Whatever that first backward decides holds for the shape for the rest of the process
      (:func:`deterministic_backward_choices` lists it), so every backward of the shape gives the
      same bits. It keeps the recompute, untimed, off the GPU, with ``FASTLLAMA_AUTOTUNE=0`` and
      under ``torch.use_deterministic_algorithms(True)``; and, for the process, for a shape first
      met inside a CUDA-graph capture, whose partials would take more than half of the GPU's
      free memory at its first backward, or whose partials failed (a warning says why) or ran
      out of memory while timed. Two processes give the same bits where they choose alike; a
      near tie, or memory that differs, can make them choose otherwise: fix the algorithm
      (``"recompute"`` or ``"partials"``), or use ``torch.use_deterministic_algorithms(True)``,
      where bits must match across runs.

    ``fastllama bench ops`` times the default and the partials (``fastllama``, whose note says
    what "auto" chose and both times, and ``fastllama-partials``), ``fastllama bench train`` the
    default and the recompute with a patched model (``hf+fastllama``,
    ``hf+fastllama-recompute``). fp32 inputs and soft-capped scores always recompute."""
    if algorithm not in _DETERMINISTIC_BACKWARDS:
        raise ValueError(f"algorithm must be one of {_DETERMINISTIC_BACKWARDS}, got {algorithm!r}")
    if partials is not None and (isinstance(partials, bool) or not isinstance(partials, int) or partials < 1):
        raise ValueError(f"partials must be a positive int or None, got {partials!r}")
    previous = (_deterministic_backward["algorithm"], _deterministic_backward["partials"])
    _deterministic_backward.update(algorithm=algorithm, partials=partials)
    return previous


@contextlib.contextmanager
def deterministic_backward(algorithm: str, partials: int | None = None):
    """:func:`set_deterministic_backward` for the backwards run inside a ``with`` block (the
    benchmarks time each algorithm this way); the previous choice comes back after it."""
    previous = set_deterministic_backward(algorithm, partials)
    try:
        yield
    finally:
        set_deterministic_backward(*previous)


def _dq_partials(q: torch.Tensor, k: torch.Tensor, n_seq: int, max_keys: int, deterministic: bool,
                 softcap: float) -> int:
    """The partials the backward would run with (P > 0) unless recomputing is chosen, or is all
    there is (fp32, softcap, or too few programs for the GPU: 0), or the backward is atomic (0)."""
    if (_deterministic_backward["algorithm"] == "recompute" or not deterministic or q.dtype == torch.float32
            or softcap > 0):
        return 0
    return _deterministic_backward["partials"] or _bwd.dq_partial_count(n_seq * k.shape[1], max_keys, q.numel(),
                                                                        q.device)


# ----------------------------------------------------------------------------------------------
# "auto": recompute or partials, timed once per shape
# ----------------------------------------------------------------------------------------------
# The partials save two of the seven matmuls per block pair, but zero, write and sum P fp32
# copies of dQ, and run fewer, longer programs: which wins depends on the shape and the GPU. So,
# as the autotuner picks a tile, the first backward of a shape times both (best of three each,
# alternately) and the process keeps the partials only if they take less than this fraction of
# the recompute's time (a near tie keeps the same algorithm from run to run). The recompute is
# timed in its own program order (see below), chosen at its first, untimed, run.
#
# Whatever the first backward of a shape decides is kept for the process, so every later
# backward of the shape runs the same algorithm (the same bits). That includes the reasons not to
# time: memory too short for the partials (the first backward of a training step's shape comes at
# its activation peak, so later steps have no more to spare), a first meeting inside a CUDA-graph
# capture, an out-of-memory or a failure of the partials while timing.
PARTIALS_MARGIN = 0.95
_backward_choices: dict[tuple, dict] = {}


def deterministic_backward_choices() -> dict[tuple, dict]:
    """What the "auto" deterministic backward decided, per (device index, dtype, head dim,
    query heads per KV head, partials P rounded up to a power of two, query length bucket, key
    length bucket with the mask kind (``kernels.flash_attention.key_bucket``), varlen):
    ``{"algorithm": "recompute" | "partials", "partials": P, "recompute_ms", "partials_ms",
    "why"}`` (a copy; the times are None and ``why`` says why where nothing was timed)."""
    return {key: dict(entry) for key, entry in _backward_choices.items()}


def _partials_fit(q: torch.Tensor, partials: int) -> bool:
    """Whether the partials' fp32 buffers (P, plus their sum when P > 1) take at most half of
    the device's free memory: the driver's free bytes plus what torch's allocator holds unused."""
    need = (partials + (partials > 1)) * q.numel() * 4
    free = torch.cuda.mem_get_info(q.device)[0]
    free += torch.cuda.memory_reserved(q.device) - torch.cuda.memory_allocated(q.device)
    return 2 * need <= free


def _recompute(partials: int, why: str) -> dict:
    return {"algorithm": "recompute", "partials": partials, "recompute_ms": None, "partials_ms": None, "why": why}


def _choose_backward(run, partials: int, rounds: int = 3) -> dict:
    """Times ``run(partials)`` against ``run(0)`` (the recompute); see :data:`PARTIALS_MARGIN`.
    The partials run once first on their own: if they fail (other than with a CUDA error, which
    leaves nothing to fall back to) the recompute is kept, and a warning says why."""
    try:
        run(partials)
        times = _timing.best_times({"recompute": lambda: run(0), "partials": lambda: run(partials)}, rounds)
    except torch.OutOfMemoryError:
        return _recompute(partials, "out of memory while timing")
    except Exception as e:  # noqa: BLE001  (the recompute runs next: it raises if it fails too)
        if "CUDA error" in str(e):
            raise
        why = f"the partials failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        warnings.warn(f"fastllama: flash attention's deterministic backward recomputes dQ at this shape: {why}",
                      RuntimeWarning, stacklevel=2)
        return _recompute(partials, why)
    finally:
        # a failed autotuner run keeps its arguments, the P partials among them: let them go
        tuner = getattr(_bwd._attn_bwd_dkdv_partials_tuned, "latest", None)
        if tuner is not None and getattr(tuner, "nargs", None) is not None:
            tuner.nargs = None
    faster = times["partials"] < PARTIALS_MARGIN * times["recompute"]
    return {"algorithm": "partials" if faster else "recompute", "partials": partials,
            "recompute_ms": times["recompute"], "partials_ms": times["partials"], "why": ""}


def _shape_key(q: torch.Tensor, k: torch.Tensor, count: int, mq: int, mk: int, before: int, after: int,
               varlen: bool) -> tuple:
    """The shape a timed choice holds for: (device index, dtype, head dim, query heads per KV
    head, ``count`` rounded up to a power of two, length buckets, mask kind, varlen). ``count``
    is what else the choice depends on: P for the deterministic backward's algorithm, sequences
    x query heads for the program order. Rounded, because packed batches whose number of
    sequences varies would otherwise time again at each new count (the launches still use the
    exact values)."""
    return (q.device.index, q.dtype, q.shape[-1], q.shape[1] // k.shape[1], triton.next_power_of_2(count),
            _fwd.seqlen_bucket(mq), _fwd.key_bucket(mk, mq, before, after), varlen)


def _auto_partials(q: torch.Tensor, partials: int, key: tuple, run) -> int:
    """``partials`` where "auto" takes them for this shape, else 0 (see set_deterministic_backward
    and above). ``run(p)`` runs the whole backward with ``p`` partials (0: recompute)."""
    if not (_AUTOTUNE and _timing.can_time(q)) or torch.are_deterministic_algorithms_enabled():
        return 0
    entry = _backward_choices.get(key)
    if entry is None:
        if _timing.capturing(q):  # (nothing runs until the replay: no timing)
            entry = _recompute(partials, "first met inside a CUDA-graph capture")
        elif not _partials_fit(q, partials):
            entry = _recompute(partials, "the partials would take more than half the free memory")
        else:
            with torch.cuda.device_of(q):  # (the events time the current stream of q's device)
                entry = _choose_backward(run, partials)
        _backward_choices[key] = entry
    return partials if entry["algorithm"] == "partials" else 0


# ----------------------------------------------------------------------------------------------
# Program order: each (sequence, head) in turn, or heads in groups; timed once per shape
# ----------------------------------------------------------------------------------------------
# Under a causal mask the programs of one head differ in length, and a grid that takes the heads
# one after another ends on the last head's longest programs while the other SMs idle (about 7%
# of the forward at B 4, 16 heads, 4k tokens, by an SM-level simulation). The grouped order
# (``kernels.flash_attention.ordered_program``) goes longest-first across a group of heads small
# enough that their keys and values stay in L2. It never changes a result (each program computes
# the same tile either way), only when programs run, so the first forward of each shape times
# both orders for the forward kernel, and its first backward for the dQ and dK/dV kernels (with
# the algorithm the backward runs), best of three each, alternately; each keeps the grouped
# order if it took less than this fraction of the plain order's time.
ORDER_MARGIN = 0.98
_program_orders: dict[tuple, dict] = {}


def program_order_choices() -> dict[tuple, dict]:
    """What the program-order choice measured, per ("forward" | "backward", device index, dtype,
    head dim, query heads per KV head, sequences x query heads rounded up to a power of two,
    query length bucket, key length bucket with the mask kind, varlen, fp32 dot precision,
    soft-capped, and for the backward deterministic): ``{"order": "heads" | "grouped",
    "head_groups": (the forward's or dQ's, dK/dV's), "heads_ms", "grouped_ms"}`` (a copy; no
    times where the grouped order would be the plain one)."""
    return {key: dict(entry) for key, entry in _program_orders.items()}


def _grouped_head_groups(q: torch.Tensor, k: torch.Tensor, n_seq: int, mq: int, mk: int) -> tuple[int, int]:
    """The grouped order's ``head_group`` on q's GPU for the forward and dQ kernels (rows: query
    heads, each streaming its share of a KV head's keys and values) and for the dK/dV kernel
    (rows: KV heads, each streaming the queries and output gradients of its group's query
    heads), for blocks of about 128 rows or keys (the 16-bit tiles' size; smaller tiles only
    make more programs per row)."""
    props = torch.cuda.get_device_properties(q.device)
    l2 = getattr(props, "L2_cache_size", 0) or 40 << 20
    group, row = q.shape[1] // k.shape[1], 2 * q.shape[-1] * q.element_size()
    return (_fwd.grouped_heads(triton.cdiv(mq, 128), n_seq * q.shape[1], row * mk // group,
                               props.multi_processor_count, l2),
            _fwd.grouped_heads(triton.cdiv(mk, 128), n_seq * k.shape[1], row * mq * group,
                               props.multi_processor_count, l2))


def _program_order(q: torch.Tensor, k: torch.Tensor, key: tuple, n_seq: int, mq: int, mk: int, run) -> tuple[int, int]:
    """The ``head_group`` pair (the forward's or dQ's, dK/dV's) this launch runs with: the
    grouped order's if the first launch of the shape ``key`` (whose first element says which
    direction) ran faster with it, else (1, 1). ``run(head_groups)`` launches with a pair. It
    decides on a GPU, with ``FASTLLAMA_AUTOTUNE`` on, outside a CUDA-graph capture; until then
    the shape runs (1, 1)."""
    entry = _program_orders.get(key)
    if entry is None:
        if not (_AUTOTUNE and _timing.can_time(q)) or _timing.capturing(q):
            return 1, 1
        groups = _grouped_head_groups(q, k, n_seq, mq, mk)
        if key[0] == "forward":
            groups = (groups[0], 1)  # (one kernel)
        entry = {"order": "heads", "head_groups": groups, "heads_ms": None, "grouped_ms": None}
        if groups != (1, 1):
            try:
                with torch.cuda.device_of(q):
                    times = _timing.best_times({"heads": lambda: run((1, 1)), "grouped": lambda: run(groups)}, 3)
            except torch.OutOfMemoryError:  # (memory was short this once: time again next time)
                return 1, 1
            entry.update(heads_ms=times["heads"], grouped_ms=times["grouped"])
            if times["grouped"] < ORDER_MARGIN * times["heads"]:
                entry["order"] = "grouped"
        _program_orders[key] = entry
    return entry["head_groups"] if entry["order"] == "grouped" else (1, 1)


def _config(which: str, seqlen: int):
    """A forced or interpreter tile for kernel ``which``, or None (autotune). "dkdv_atomic" and
    "dkdv_partials" take the "dkdv" entry unless they have one of their own."""
    if FORCE_CONFIG is not None:
        return FORCE_CONFIG.get(which) or FORCE_CONFIG[which.split("_")[0]]
    if not interpreter_active():
        return None
    # Under the interpreter every tl op costs time in proportion to the tile's elements, so a
    # tile just large enough for the sequence (up to the default) is fastest: T=48 runs 2.5x
    # faster with 64-wide tiles than with 256-wide ones.
    block_m, block_n, warps, stages = _fwd.INTERPRETER_CONFIG[which.split("_")[0]]
    fit = max(16, triton.next_power_of_2(max(seqlen, 1)))
    return min(block_m, fit), min(block_n, fit), warps, stages


def _tuners() -> dict:
    return {"fwd": _fwd._attn_fwd_tuned, "dq": _bwd._attn_bwd_dq_tuned, "dkdv": _bwd._attn_bwd_dkdv_tuned,
            "dkdv_atomic": _bwd._attn_bwd_dkdv_atomic_tuned, "dkdv_partials": _bwd._attn_bwd_dkdv_partials_tuned}


def _config_name(c) -> str:
    return f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def autotuned_choices() -> dict[str, str]:
    """The attention autotuners' latest pick per kernel, e.g. ``{"fwd": "M128 N64 w8 s3"}``
    (benchmarks note it beside their timings); empty before any autotuned (GPU) launch."""
    picks = {name: getattr(t.latest, "best_config", None) for name, t in _tuners().items()}
    return {name: _config_name(c) for name, c in picks.items() if c is not None}


def autotune_timings(clear: bool = False) -> dict[str, dict[str, float]]:
    """Per kernel, every candidate's median time in ms from its autotuner's latest tuning run,
    e.g. ``{"fwd": {"M128 N64 w8 s3": 0.41, ...}}`` (inf: the candidate failed to launch). This
    is the data the candidate tables are pruned and tuned from: the benchmark records it per
    shape. ``clear=True`` forgets the timings after reading them, so that the next call returns
    only the tunings run in between (a launch whose key is already tuned runs none)."""
    out = {}
    for name, t in _tuners().items():
        timings = getattr(t.latest, "configs_timings", None)
        if timings:
            # Triton times each candidate as [median, 20th, 80th percentile] (older: one float).
            out[name] = {_config_name(c): float(ms[0] if isinstance(ms, (list, tuple)) else ms)
                         for c, ms in timings.items()}
            if clear:
                t.latest.configs_timings = None
    return out


def _max_seqlen(cu: torch.Tensor, total: int, name: str) -> int:
    """Checks the values of a cu_seqlens tensor (one host sync) and returns its longest sequence."""
    vals = cu.tolist()
    if vals[0] != 0 or vals[-1] != total or any(b < a for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}; "
                         f"got {vals if len(vals) <= 12 else vals[:6] + ['...'] + vals[-3:]}")
    return max((b - a for a, b in zip(vals, vals[1:])), default=0)


def _same_boundaries(cu_q: torch.Tensor, cu_k: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> bool:
    """One tensor for both (varlen self-attention): its values are read once (a host sync)."""
    return cu_k is cu_q and q.shape[2] == k.shape[2]


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllama::flash_attention_fwd", mutates_args=())
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, before: int, after: int,
               cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], precision: str,
               deterministic: bool, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out with q's layout, stats (2, B, Hq, Tq) fp32: row max and log2 of the softmax
    denominator, base 2; lse = (stats[0] + stats[1]) * ln 2). ``deterministic`` is the
    backward's (the forward always is). ``softcap`` 0 means no soft-capping."""
    mq = mk = 0
    if cu_seqlens_q is not None:
        mq = _max_seqlen(cu_seqlens_q, q.shape[2], "cu_seqlens")
        mk = mq if _same_boundaries(cu_seqlens_q, cu_seqlens_k, q, k) else _max_seqlen(cu_seqlens_k, k.shape[2],
                                                                                      "cu_seqlens_k")
    lq, lk = mq or q.shape[2], mk or k.shape[2]

    def run(head_groups: tuple[int, int]):
        return _fwd.flash_attention_forward(q, k, v, scale=scale, before=before, after=after,
                                            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=mq,
                                            max_seqlen_k=mk, precision=precision, autotune=_AUTOTUNE,
                                            softcap=softcap, config=_config("fwd", max(lq, lk)),
                                            head_group=head_groups[0])

    n_seq = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1
    key = ("forward", *_shape_key(q, k, n_seq * q.shape[1], lq, lk, before, after, cu_seqlens_q is not None),
           precision, softcap > 0)
    return run(_program_order(q, k, key, n_seq, lq, lk, run))


@_flash_fwd.register_fake
def _(q, k, v, scale, before, after, cu_seqlens_q, cu_seqlens_k, precision, deterministic, softcap):
    return torch.empty_like(q), q.new_empty((2, *q.shape[:3]), dtype=torch.float32)


@torch.library.custom_op("fastllama::flash_attention_bwd", mutates_args=())
def _flash_bwd(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               out: torch.Tensor, lse: torch.Tensor, scale: float, before: int, after: int,
               cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor], precision: str,
               deterministic: bool, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) with the layouts of q, k, v."""
    mq = mk = 0
    if cu_seqlens_q is not None:
        mq = _max_seqlen(cu_seqlens_q, q.shape[2], "cu_seqlens")
        mk = mq if _same_boundaries(cu_seqlens_q, cu_seqlens_k, q, k) else _max_seqlen(cu_seqlens_k, k.shape[2],
                                                                                      "cu_seqlens_k")
    # upstream gradients may be expanded or transposed, or have a token stride too large for the
    # kernels' int32 row offsets: copy only then
    if do.stride(-1) != 1 or not tile_rows_fit_int32(do, 2):
        do = do.contiguous()
    if dlse is not None:
        # stats reach the loss only as lse = (stats[0] + stats[1]) ln 2 (flash_attention_with_lse),
        # so d loss / d lse = dstats[0] / ln 2.
        dlse = (dlse[0].to(torch.float32) * _fwd.LOG2E).contiguous()
    longest = max(mq or q.shape[2], mk or k.shape[2])
    n_seq = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.numel() - 1

    def run(partials: int, head_groups: tuple[int, int] = (1, 1)):
        dkdv = "dkdv_partials" if partials else "dkdv" if deterministic else "dkdv_atomic"
        return _bwd.flash_attention_backward(do, q, k, v, out, lse, scale=scale, before=before, after=after,
                                             dlse=dlse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                             max_seqlen_q=mq, max_seqlen_k=mk, precision=precision,
                                             config_dq=_config("dq", longest), config_dkdv=_config(dkdv, longest),
                                             autotune=_AUTOTUNE, deterministic=deterministic, softcap=softcap,
                                             dq_partials=partials, head_groups=head_groups)

    lq, lk = mq or q.shape[2], mk or k.shape[2]

    def ordered():  # (the recompute, or the atomic dQ: in its program order, chosen at its first run)
        key = ("backward", *_shape_key(q, k, n_seq * q.shape[1], lq, lk, before, after, cu_seqlens_q is not None),
               precision, softcap > 0, deterministic)
        return run(0, _program_order(q, k, key, n_seq, lq, lk, lambda head_groups: run(0, head_groups)))

    partials = _dq_partials(q, k, n_seq, lk, deterministic, softcap)
    if partials and _deterministic_backward["algorithm"] == "auto":
        # The recompute is compared in its own best order: its untimed first run (best_times')
        # chooses that order before its timed runs.
        partials = _auto_partials(q, partials, _shape_key(q, k, partials, lq, lk, before, after,
                                                          cu_seqlens_q is not None),
                                  lambda p: run(p) if p else ordered())
    if partials:  # (its dK/dV kernel strides over the key blocks, and there is no dQ kernel: no order)
        return run(partials)
    return ordered()


@_flash_bwd.register_fake
def _(do, dlse, q, k, v, out, lse, scale, before, after, cu_seqlens_q, cu_seqlens_k, precision, deterministic,
      softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, before, after, cu_q, cu_k, precision, deterministic, softcap = inputs
    out, lse = output
    # The backward keeps O and two fp32 statistics per row, never the (T x T) probabilities.
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (scale, before, after, precision, deterministic, softcap)
    # An unused lse output then arrives as None, not as a zero tensor the kernel would read.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    scale, before, after, precision, deterministic, softcap = ctx.args
    used_out = dout is not None
    if not used_out:
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_bwd(dout, dlse, q, k, v, out, lse, scale, before, after, cu_q, cu_k, precision,
                            deterministic, softcap)
    # lse alone does not depend on v: None, as torch gives an input its result does not reach
    return dq, dk, dv if used_out else None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastllama::flash_attention_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Attention sinks (gpt-oss): one more score per head in every row's softmax, with a zero value
# ----------------------------------------------------------------------------------------------
def _sink_exponent(m: torch.Tensor, sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that see no key, sigma - m): the sink's score in base 2, sigma = sink * log2 e, over
    each row's max m of the kernel's statistics (0 where m = -inf: no inf - inf)."""
    empty = m == float("-inf")
    return empty, torch.where(empty, 0.0, sinks.to(torch.float32)[None, :, None] * _fwd.LOG2E - m)


def _with_sinks(stats: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """The kernel's statistics (m, log2 l) (base 2, (2, B, Hq, Tq)) of a softmax that also had the
    sinks: the sink adds 2^(sigma - m) to l,

        log2 l' = log2(l + 2^(sigma - m)).

    A row that sees no key (m = -inf, l = 0) puts everything on the sink: its statistics stay as
    the kernel left them (the backward reads m = -inf as p = 0 for every key)."""
    empty, rel = _sink_exponent(stats[0], sinks)
    return torch.stack((stats[0], torch.where(empty, stats[1], torch.logaddexp2(stats[1], rel))))


def _sink_probability(stats: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """p_sink = 2^(sigma - m - log2 l') of each row, from :func:`_with_sinks`'s statistics (1 for
    a row that sees no key)."""
    empty, rel = _sink_exponent(stats[0], sinks)
    return torch.where(empty, 1.0, torch.exp2(rel - stats[1]))


class _FlashWithSinks(torch.autograd.Function):
    """One flash launch (``_flash_fwd``) whose rows' softmax also counts the sinks.

    Forward: the kernel's output times l / l' (the share of the mass left on the keys), and the
    statistics with l' in place of l. Those are exactly a softmax that had the sink, so the
    backward is the flash backward on them unchanged (p = 2^(s - m - log2 l'), delta =
    rowsum(dO * O) of the sink-scaled output), plus the sinks' own gradient:

        d loss / d sink_h = sum over the rows of head h of  p_sink * (0 - delta)

    (the sink's value vector is zero, so its dP is 0). One elementwise pass over the output more
    than plain flash attention, and nothing more is saved for the backward."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_q, cu_k, args):
        scale, before, after, precision, deterministic, softcap = args
        out, stats = _flash_fwd(q, k, v, scale, before, after, cu_q, cu_k, precision, deterministic, softcap)
        with_sinks = _with_sinks(stats, sinks)
        out = (out.float() * torch.exp2(stats[1] - with_sinks[1])[..., None]).to(out.dtype)  # (keeps q's layout)
        stats = with_sinks
        ctx.save_for_backward(q, k, v, out, stats, cu_q, cu_k, sinks)
        ctx.args = args
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)
        return out, stats

    @staticmethod
    def backward(ctx, dout, _dstats):
        if dout is None:
            return (None,) * 7
        q, k, v, out, stats, cu_q, cu_k, sinks = ctx.saved_tensors
        scale, before, after, precision, deterministic, softcap = ctx.args
        dq, dk, dv = _flash_bwd(dout, None, q, k, v, out, stats, scale, before, after, cu_q, cu_k, precision,
                                deterministic, softcap)
        delta = (dout.float() * out.float()).sum(-1)
        dsinks = -(_sink_probability(stats, sinks) * delta).sum((0, 2))
        return dq, dk, dv, dsinks.to(sinks.dtype), None, None, None


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _check_cu_seqlens(name: str, cu, q: torch.Tensor) -> None:
    check_tensor(name, cu, dtypes=(torch.int32,), ndim=1)
    check_same("q", q, name, cu, "device")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have N + 1 >= 1 entries (N packed sequences), got shape {tuple(cu.shape)}")
    if not cu.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tuple(cu.stride())}")


def _validate(q, k, v, causal, scale, window, cu_seqlens, cu_seqlens_k, fp32_precision, deterministic, softcap):
    """Everything that can be checked without reading tensor values.

    Returns (scale, before, after, dot precision, deterministic backward, softcap (0: off)) for
    the kernels."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same("q", q, "k", k, "dtype")
    check_same("q", q, "v", v, "dtype")
    check_same("q", q, "k", k, "device")
    check_attention_device(q)
    check_same("q", q, "v", v, "device")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has shape {tuple(v.shape)}; they must match (B, Hk, Tk, D)")
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}; they must match")
    if k.shape[3] != D:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has {D}; they must match")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {D}; accepted: 1 to {MAX_HEAD_DIM} (64, 80, 96, 128, 256 are the tuned ones)")
    Hk = k.shape[1]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q has {Hq} heads and k/v have {Hk}; the number of query heads must be a positive "
                         f"multiple of the number of key/value heads (GQA)")
    if Hq > MAX_GRID_Y:  # one sequence's heads are one launch's second grid axis
        raise ValueError(f"q has {Hq} heads; at most {MAX_GRID_Y} are accepted")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, t)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    # (under torch.compile(dynamic=True) a model's float attribute is traced symbolically and
    # math.isfinite cannot read it; eager calls check the value)
    elif not torch.compiler.is_compiling() and not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    if window is not None:
        window = check_window_form(window)
        if min(window) < -1:
            raise ValueError(f"window entries must be >= 0 or -1 (unlimited), got {window}")
    if fp32_precision not in _PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {_PRECISIONS}, got {fp32_precision!r}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    softcap = check_softcap(softcap, scale)
    precision = fp32_precision if q.dtype == torch.float32 else "ieee"  # no-op for fp16/bf16: one build
    if cu_seqlens is None and cu_seqlens_k is not None:
        raise ValueError("cu_seqlens_k was given without cu_seqlens; pass both (or cu_seqlens alone)")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"with cu_seqlens, sequences are packed along T of one batch: q must have batch size 1, "
                             f"got shape {tuple(q.shape)}")
        _check_cu_seqlens("cu_seqlens", cu_seqlens, q)
        if cu_seqlens_k is not None:
            _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q)
            if cu_seqlens_k.shape != cu_seqlens.shape:
                raise ValueError(f"cu_seqlens_k has {cu_seqlens_k.shape[0]} entries but cu_seqlens has "
                                 f"{cu_seqlens.shape[0]}; they must match (one per sequence + 1)")
        elif k.shape[2] != Tq:
            raise ValueError(f"k has {k.shape[2]} packed keys but q has {Tq} packed queries; pass cu_seqlens_k "
                             f"when they differ")
    limit = Tq + k.shape[2] + 1  # "unlimited": wider than any sequence
    before, after = _fwd.mask_bounds(causal, window, limit)
    # fp32 is for exactness: it always runs the deterministic backward; so does everything under
    # torch.use_deterministic_algorithms(True), as SDPA's flash backward does, and soft-capping
    # (the atomic kernel has no soft-capped build)
    deterministic = (deterministic or q.dtype == torch.float32 or softcap > 0
                     or torch.are_deterministic_algorithms_enabled())
    return float(scale), before, after, precision, deterministic, softcap


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast``, the floating-point tensors in the autocast dtype, as SDPA (an
    autocast op) gets them: HF's rotary returns fp32 q/k from 16-bit ones and fp32 cos/sin, next
    to a 16-bit v, and SDPA computes them in the autocast dtype. Outside autocast: as they are.
    (Runs before the public op's validation: what is not a tensor is left for it to name.)"""
    if not isinstance(tensors[0], torch.Tensor) or not torch.is_autocast_enabled(tensors[0].device.type):
        return tensors
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _positive_scale(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """The kernels need scale > 0 (16-bit inputs take the row max before scaling, and a masked
    -inf times a scale <= 0 is NaN or +inf). q k^T * c equals (-q) k^T * |c| for c < 0, and
    (0 q) k^T * 1 for c = 0 (uniform weights over the visible keys, a zero dq): a copy of q, and
    autograd carries the sign, in these rare cases only."""
    if scale > 0:
        return q, scale
    return (-q, -scale) if scale < 0 else (q * 0, 1.0)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def flash_attention_with_lse(q, k, v, causal: bool = True, scale: float | None = None,
                             window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | None = None,
                             cu_seqlens_k: torch.Tensor | None = None, fp32_precision: str = "ieee",
                             deterministic: bool = True, softcap: float | None = None):
    """:func:`flash_attention` that also returns the log-sum-exp of each query row.

    Returns ``(out, lse)``: lse is (B, Hq, Tq) fp32, natural log, ``-inf`` for a row with no
    visible key. Both outputs are differentiable (a gradient on lse enters as ``delta -= dlse``).
    """
    out, stats = _attention(q, k, v, causal, scale, window, cu_seqlens, cu_seqlens_k, fp32_precision, deterministic,
                            softcap)
    return out, (stats[0] + stats[1]) * _LN2


def flash_attention(q, k, v, causal: bool = True, scale: float | None = None,
                    window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, fp32_precision: str = "ieee",
                    deterministic: bool = True, softcap: float | None = None, sinks: torch.Tensor | None = None):
    """Softmax attention in SDPA's layout, forward and backward in Triton (flash attention).

    Args:
        q: (B, Hq, Tq, D); k, v: (B, Hk, Tk, D) with Hq % Hk == 0 (GQA/MQA: query head h reads
            key/value head h // (Hq // Hk), no repeat_kv copy). fp16, bf16 or fp32, one dtype and
            device for all three. Any strides with a unit stride in D: the transposed views HF
            code makes from (B, T, H, D) projections are read in place (a token stride over 8M
            elements, where the kernels' int32 row offsets would wrap, is read from a copy).
            D from 1 to 256 (80 and 96 run padded to 128).
        causal: mask keys after the query. Tq != Tk aligns bottom-right: the queries are the last
            Tq of the Tk positions (flash-attn's convention, what chunked prefill against a KV
            cache needs). SDPA's ``is_causal=True`` aligns top-left instead; both agree when
            Tq == Tk (and for Tq = 1 only this one is right for decoding). Query rows that see no
            key (Tq > Tk) return 0 and lse -inf (but NaN where a key block their tile of rows
            visits holds a NaN value: p = 0 times NaN, as in SDPA); a row whose scores are NaN
            returns NaN, and NaN lse.
        scale: multiplies q k^T; default 1 / sqrt(D). Any finite value (0 or less costs a copy of q).
        window: ``(left, right)``: query at position p sees keys in [p - left, p + right]; -1 is
            unlimited. Mistral's ``sliding_window=W`` is ``(W - 1, 0)`` with causal.
        cu_seqlens: int32 (N + 1,) boundaries of N sequences packed along T (q/k/v batch 1), as
            in flash-attn's varlen API: no work is spent on padding. ``cu_seqlens_k`` gives the
            key boundaries when they differ (default: ``cu_seqlens``). Values are checked (one
            host sync, inside the custom op).
        fp32_precision: ``tl.dot`` input precision for fp32 inputs: "ieee" (default, exact fp32
            products: fp32 models and CPU tests compare tightly) or "tf32" (tensor cores, about
            3 decimal digits per product, much faster on a GPU). Ignored for fp16/bf16.
        deterministic: True (default): the backward gives bit-identical gradients run to run,
            without atomics: dQ recomputed in a kernel of its own, or formed in fp32 partials
            summed in order; by default, on a GPU, the first backward of each shape times both
            and keeps the partials for the process only if at least 5% faster (so two processes
            agree in dQ's last bits when they choose alike; ``set_deterministic_backward`` fixes
            one).
            False, for fp16/bf16: dQ is added with
            atomics inside the dK/dV kernel, as flash-attn 2 and SDPA's flash backend do: two
            fewer matmuls per block pair (5 instead of 7), and dQ's last bits vary from run to
            run. fp32 inputs, and every input under ``torch.use_deterministic_algorithms(True)``,
            always run deterministically.
        softcap: soft-caps the scores to ``softcap * tanh(s / softcap)`` before the mask and the
            softmax, s = q k^T * scale (Gemma 2's ``attn_logit_softcapping``; None: off). The
            backward is then always the deterministic one. GPU launches run one tile per kernel,
            untimed (``kernels.flash_attention.softcap_config``).
        sinks: optional (Hq,) floating tensor on q's device, differentiable: attention sinks
            (gpt-oss's ``sinks``): query head h's softmax also counts the score ``sinks[h]``
            (not soft-capped), whose value vector is zero, so the keys' weights sum to less than
            one. A row that sees no key returns 0. The kernels run as without sinks; the output
            is then rescaled in one elementwise pass (``_FlashWithSinks``), and the backward is
            the flash backward plus a small reduction for the sinks' gradient.

    Returns:
        out with q's shape and memory layout (a q viewed from (B, T, H, D) gives an out whose
        ``transpose(1, 2)`` is contiguous, so HF's following ``.contiguous()`` copies nothing).
        Softmax statistics are fp32; backward saves q, k, v, out and the fp32 lse only (and is
        deterministic unless asked otherwise).

    Under ``torch.autocast``, q, k and v are first cast to the autocast dtype, as SDPA's are.

    Raises:
        TypeError / ValueError naming the argument, before any launch.
    """
    return _attention(q, k, v, causal, scale, window, cu_seqlens, cu_seqlens_k, fp32_precision, deterministic,
                      softcap, sinks)[0]


def _prepared(q, k, v, causal, scale, window, cu_q, cu_k, fp32_precision, deterministic, softcap):
    """Validated inputs as the kernels take them: ``(q, k, v, cu_k, (scale, before, after,
    precision, deterministic, softcap))``, the forward's and a replay's alike."""
    q, k, v = autocast_inputs(q, k, v)
    scale, before, after, precision, deterministic, softcap = _validate(q, k, v, causal, scale, window, cu_q, cu_k,
                                                                        fp32_precision, deterministic, softcap)
    q, scale = _positive_scale(q, scale)
    # a token stride so large that a tile's row offsets pass 2**31 elements (a sequence-first
    # tensor of more than 8M elements per token): read from a copy
    q, k, v = (t if tile_rows_fit_int32(t, 2) else t.contiguous() for t in (q, k, v))
    if cu_q is not None and cu_k is None:
        cu_k = cu_q
    return q, k, v, cu_k, (scale, before, after, precision, deterministic, softcap)


def _sequences_per_launch(q: torch.Tensor, cu_q) -> tuple[int, int]:
    """(sequences, the most one launch takes: :data:`MAX_GRID_Y` over the query heads)."""
    n_seq = cu_q.shape[0] - 1 if cu_q is not None else q.shape[0]
    return n_seq, max(1, MAX_GRID_Y // max(q.shape[1], 1))


def flash_attention_with_stats(q, k, v, causal: bool = True, scale: float | None = None,
                               window: tuple[int, int] | None = None, cu_seqlens: torch.Tensor | None = None,
                               cu_seqlens_k: torch.Tensor | None = None, deterministic: bool = True,
                               softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``fastllama.attention``'s masked op: :func:`flash_attention`'s ``(out, stats)``, stats
    the kernels' (2, B, Hq, Tq) fp32 softmax statistics (row max and log2 of the denominator,
    base 2), which :func:`flash_attention_replayed` takes back."""
    return _attention(q, k, v, causal, scale, window, cu_seqlens, cu_seqlens_k, "ieee", deterministic, softcap)


class _Replayed(torch.autograd.Function):
    """``out`` of an earlier flash forward on the same q, k, v, as if computed again: the forward
    runs nothing, the backward is the flash backward on the saved out and statistics."""

    @staticmethod
    def forward(ctx, q, k, v, out, stats, cu_q, cu_k, args):
        ctx.save_for_backward(q, k, v, out, stats, cu_q, cu_k)  # as _setup_context saves them
        ctx.args = args
        ctx.set_materialize_grads(False)
        return out  # (an input returned: autograd hands back a view of it with this node)

    @staticmethod
    def backward(ctx, dout):
        return (*_backward(ctx, dout, None)[:3], None, None, None, None, None)


def flash_attention_replayed(q, k, v, out: torch.Tensor, stats: torch.Tensor, causal: bool = True,
                             scale: float | None = None, window: tuple[int, int] | None = None,
                             cu_seqlens: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
                             deterministic: bool = True, softcap: float | None = None) -> torch.Tensor | None:
    """:func:`flash_attention` (same arguments) whose forward already ran and gave ``out`` and
    ``stats`` (:func:`flash_attention_with_stats`; ``stats`` contiguous): returns ``out`` as the
    result of an autograd node whose backward is the flash backward, without running the forward
    kernel again (``fastllama.attention``'s masked op differentiates its call this way). None
    when the call would run in several launches (more sequences than one launch takes): then
    run it again."""
    q, k, v, cu_k, args = _prepared(q, k, v, causal, scale, window, cu_seqlens, cu_seqlens_k, "ieee", deterministic,
                                    softcap)
    n_seq, per = _sequences_per_launch(q, cu_seqlens)
    if n_seq > per:
        return None
    if not (stats.is_contiguous() and stats.dtype == torch.float32 and stats.shape == (2, *q.shape[:3])
            and out.shape == q.shape[:3] + v.shape[3:] and out.dtype == q.dtype):
        raise ValueError(f"replayed flash attention: out {tuple(out.shape)} {out.dtype} and stats "
                         f"{tuple(stats.shape)} {stats.dtype} (fp32, contiguous) do not fit q {tuple(q.shape)} {q.dtype}")
    return _Replayed.apply(q, k, v, out, stats, cu_seqlens, cu_k, args)


def _attention(q, k, v, causal, scale, window, cu_q, cu_k, fp32_precision, deterministic, softcap, sinks=None):
    """Both public ops: validate, then ``_flash_fwd`` -> (out, stats) (with ``sinks``,
    :class:`_FlashWithSinks`, whose stats have the sinks in them). It runs on groups of
    sequences when there are more (sequence, query head) pairs than the kernels' grid takes on
    its second axis (:data:`MAX_GRID_Y`; e.g. a varlen pack of 1M tokens in 512-token samples at
    32 heads): each group is an independent call on views (rebased ``cu_seqlens``), joined along
    the batch (dense) or the packed tokens (varlen). One host sync reads the group boundaries,
    in that path only."""
    q, k, v, cu_k, args = _prepared(q, k, v, causal, scale, window, cu_q, cu_k, fp32_precision, deterministic,
                                    softcap)
    check_sinks(sinks, q)

    def launch(q, k, v, cu_q, cu_k):
        if sinks is None:
            return _flash_fwd(q, k, v, *args[:3], cu_q, cu_k, *args[3:])
        return _FlashWithSinks.apply(q, k, v, sinks, cu_q, cu_k, args)

    n_seq, per = _sequences_per_launch(q, cu_q)
    if n_seq <= per:
        return launch(q, k, v, cu_q, cu_k)
    parts = []
    if cu_q is None:
        for b in range(0, n_seq, per):
            parts.append(launch(q[b:b + per], k[b:b + per], v[b:b + per], None, None))
        return torch.cat([o for o, _ in parts], 0), torch.cat([st for _, st in parts], 1)
    tq, tk = cu_q.tolist(), cu_k.tolist()
    for s0 in range(0, n_seq, per):
        s1 = min(s0 + per, n_seq)
        q0, q1, k0, k1 = tq[s0], tq[s1], tk[s0], tk[s1]
        parts.append(launch(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], cu_q[s0:s1 + 1] - q0,
                            cu_k[s0:s1 + 1] - k0))
    return torch.cat([o for o, _ in parts], 2), torch.cat([st for _, st in parts], -1)


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
def _reference(q, k, v, causal=True, scale=None, window=None, cu_seqlens=None, cu_seqlens_k=None, return_lse=False,
               flash_backward=False, softcap=None, sinks=None):
    """The truth for both public ops: reference.attention, or its varlen form when packed."""
    if cu_seqlens is None:
        return reference.attention(q, k, v, causal=causal, scale=scale, window=window, return_lse=return_lse,
                                   flash_backward=flash_backward, softcap=softcap, sinks=sinks)
    return attention_varlen(q, k, v, cu_seqlens, causal=causal, scale=scale, window=window,
                            cu_seqlens_k=cu_seqlens_k, return_lse=return_lse, flash_backward=flash_backward,
                            softcap=softcap, sinks=sinks)


def _flash_attention_with_sinks(q, k, v, sinks, **kwargs):
    """The sinks op-table entry: :func:`flash_attention` with the sinks as a positional input."""
    return flash_attention(q, k, v, sinks=sinks, **kwargs)


def _reference_with_sinks(q, k, v, sinks, **kwargs):
    return _reference(q, k, v, sinks=sinks, **kwargs)


def _reference_with_lse(q, k, v, **kwargs):
    return _reference(q, k, v, return_lse=True, **kwargs)


# The second "PyTorch in the same dtype" of both ops' parity cases: the same forward,
# differentiated as SDPA's flash backend does (delta = rowsum(dO * O)). Where autograd's
# rowsum(P * dP) cancels exactly (T = 1: one key per row, dq = dk = 0 exactly) this formulation,
# like every flash kernel, leaves fp32 rounding noise, and a zero allowance would fail it.
def _flash_formulation(q, k, v, **kwargs):
    return _reference(q, k, v, flash_backward=True, **kwargs)


def _flash_formulation_with_lse(q, k, v, **kwargs):
    return _reference(q, k, v, return_lse=True, flash_backward=True, **kwargs)


def _make_args(p: dict, dtype: torch.dtype, device: str):
    """params: B, Hq, Hk, Tq (Tk, default Tq), D; causal, window, scale, softcap; transposed (q/k/v
    are (B, T, H, D) tensors viewed as (B, H, T, D)); seqlens / seqlens_k (varlen: packed, B = 1);
    std (of q and k: the scores' spread, default 1)."""
    B, Hq, Hk, D = p.get("B", 1), p["Hq"], p.get("Hk", p["Hq"]), p["D"]
    kwargs = {"causal": p.get("causal", True)}
    for name in ("window", "scale", "softcap"):
        if name in p:
            kwargs[name] = p[name]
    if "seqlens" in p:
        B = 1
        lens_q = p["seqlens"]
        lens_k = p.get("seqlens_k", lens_q)
        cu = lambda lens: torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
        kwargs["cu_seqlens"] = cu(lens_q)
        if "seqlens_k" in p:
            kwargs["cu_seqlens_k"] = cu(lens_k)
        Tq, Tk = sum(lens_q), sum(lens_k)
    else:
        Tq, Tk = p["Tq"], p.get("Tk", p["Tq"])

    def make(H, T, std=1.0):
        if p.get("transposed"):
            t = torch.randn(B, T, H, D, device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, T, D, device=device, dtype=dtype)
        return (t if std == 1.0 else (t * std).detach()).requires_grad_()

    std = p.get("std", 1.0)
    tensors = (make(Hq, Tq, std), make(Hk, Tk, std), make(Hk, Tk))
    if "sinks" in p:  # (Hq,) sink scores around ``sinks`` (gpt-oss's are of order 1), std 1
        tensors += ((torch.randn(Hq, device=device, dtype=dtype) + p["sinks"]).requires_grad_(),)
    return tensors, kwargs


def _case(id_, cuda_only=False, **params):
    return OpCase(id_, params, cuda_only=cuda_only)


def _full_matrix():
    """The issue's whole grid, for a GPU: T x causal x GQA x head_dim x batch (+ Tq != Tk)."""
    cases = []
    for T in (1, 77, 113, 128, 1023):
        for causal in (True, False):
            for hq, hk in ((8, 8), (8, 2), (8, 1)):
                for D in (64, 80, 96, 128, 256):
                    for B in (1, 3):
                        cases.append(_case(f"B{B}-H{hq}/{hk}-T{T}-D{D}-{'causal' if causal else 'full'}", True,
                                           B=B, Hq=hq, Hk=hk, Tq=T, D=D, causal=causal))
    for tq, tk in ((1, 1023), (77, 1023), (1023, 77), (113, 256), (256, 113)):
        for causal in (True, False):
            cases.append(_case(f"Tq{tq}-Tk{tk}-D128-{'causal' if causal else 'full'}", True,
                               B=2, Hq=8, Hk=2, Tq=tq, Tk=tk, D=128, causal=causal))
    cases += [
        _case("transposed-T2048-D128", True, B=2, Hq=32, Hk=8, Tq=2048, D=128, transposed=True),
        _case("window-4096-T8192", True, B=1, Hq=8, Hk=2, Tq=8192, D=128, window=(4095, 0)),
        _case("varlen-long", True, Hq=16, Hk=4, D=128, seqlens=[0, 1, 4000, 77, 0, 2048, 513]),
    ]
    return cases


_CASES = (
    _case("B3-H1-T77-D64-causal", B=3, Hq=1, Tq=77, D=64),
    _case("B1-H4/2-T113-D64-causal", Hq=4, Hk=2, Tq=113, D=64),  # a real GQA group (h // 2 != h % 2)
    _case("B1-H2/2-T77-D80-full", Hq=2, Tq=77, D=80, causal=False),
    _case("B1-H2/1-Tq50-Tk113-D96-causal-transposed", Hq=2, Hk=1, Tq=50, Tk=113, D=96, transposed=True),
    _case("B1-H2/1-T128-D256-causal", Hq=2, Hk=1, Tq=128, D=256),
    _case("B1-H2/1-T113-D64-window", Hq=2, Hk=1, Tq=113, D=64, window=(20, 0)),
    _case("varlen-0-1-77-50", Hq=2, Hk=1, D=64, seqlens=[0, 1, 77, 50]),
    # (under 10 s together on the CPU: the D 128, GQA 8 with batch 3, dense T 1,
    # T 1023 without a mask, and D 256 varlen with a window and Tq != Tk per sequence)
    _case("B3-H8/1-T113-D128-causal", B=3, Hq=8, Hk=1, Tq=113, D=128),
    _case("B1-H8/2-T1-D64-full", Hq=8, Hk=2, Tq=1, D=64, causal=False),
    _case("B1-H2/1-T1023-D64-full", Hq=2, Hk=1, Tq=1023, D=64, causal=False),
    _case("varlen-D256-window-Tq<Tk", Hq=2, Hk=1, D=256, seqlens=[0, 1, 77, 30], seqlens_k=[5, 1, 77, 60],
          window=(20, 0)),
    # soft-capped scores (Gemma 2): a cap that binds hard (scores of std 9 capped at 5: most
    # probabilities come from the flat part of the tanh), a mild one, and varlen with a window
    _case("B2-H4/2-T77-D128-causal-softcap5-binding", B=2, Hq=4, Hk=2, Tq=77, D=128, softcap=5.0, std=3.0),
    _case("B1-H2/1-T113-D64-full-softcap50", Hq=2, Hk=1, Tq=113, D=64, causal=False, softcap=50.0, std=2.0),
    _case("varlen-D256-window-Tq<Tk-softcap2", Hq=2, Hk=1, D=256, seqlens=[0, 1, 77, 30], seqlens_k=[5, 1, 77, 60],
          window=(20, 0), softcap=2.0),
    *_full_matrix(),
)

_LSE_CASES = (
    _case("B1-H4/2-Tq113-Tk60-D64-causal", Hq=4, Hk=2, Tq=113, Tk=60, D=64),  # 53 fully masked rows
    _case("B1-H4/2-Tq113-Tk60-D64-causal-softcap3", Hq=4, Hk=2, Tq=113, Tk=60, D=64, softcap=3.0, std=2.0),
)


# attention sinks (gpt-oss): sinks near the scores' scale and one that takes most of the mass,
# GQA, a window (gpt-oss's 128 on every other layer), rows that see no key (Tq > Tk), varlen with
# empty sequences, soft-capping alongside
_SINK_CASES = (
    _case("B2-H4/2-T77-D64-causal-sinks", B=2, Hq=4, Hk=2, Tq=77, D=64, sinks=0.0),
    _case("B1-H4/1-T113-D64-window-sinks-heavy", Hq=4, Hk=1, Tq=113, D=64, window=(20, 0), sinks=4.0),
    _case("B1-H2/1-Tq113-Tk60-D80-causal-sinks", Hq=2, Hk=1, Tq=113, Tk=60, D=80, sinks=1.0),
    _case("B1-H2/2-T50-D128-full-sinks-softcap3", Hq=2, Tq=50, D=128, causal=False, softcap=3.0, std=2.0,
          sinks=-1.0),
    _case("varlen-0-1-77-30-sinks", Hq=4, Hk=2, D=64, seqlens=[0, 1, 77, 30], sinks=0.0),
    _case("B2-H64/8-T1024-D64-window128-sinks", True, B=2, Hq=64, Hk=8, Tq=1024, D=64, window=(127, 0),
          transposed=True, sinks=0.0),
    _case("B1-H64/8-T2048-D64-causal-sinks", True, Hq=64, Hk=8, Tq=2048, D=64, sinks=2.0),
)


_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _softcap_row(name: str):
    """``kernels.flash_attention.softcap_tile`` of kernel ``name`` in the form of ``fwd_configs``
    (a list of candidates: here one)."""
    return lambda *args, **kwargs: [_fwd.softcap_tile(name, *args, **kwargs)]


def _build_configs() -> list[KernelBuild]:
    """Every GPU specialisation the op launches for the supported head dims: each autotune
    candidate of each kernel x head dim (64, 80, 96, 128, 256) x dtype (fp32 with ieee and tf32
    dots) x dense/varlen x stride alignment (the kernels: forward, dQ, dK/dV, and for 16-bit inputs
    dK/dV with atomic dQ and with dQ partials, each on tiles of its own), and the delta
    preprocess x head dim x dtype x (with/without an lse gradient) x stride alignment.

    ALIGNED=True builds have 16-element-aligned strides (what every HF layout of these head dims
    gives) and the tuned tables; ALIGNED=False builds (a stride not a multiple of 16: head dims
    such as 24/40/72/136, odd views) use the ``*_UNALIGNED`` tables of smaller tiles (slower,
    still correct) and are compiled with plain "i32" strides, the worst case of that path.
    Each tile is built for the archs whose table row holds it (``configs(..., sm)``): the
    Hopper-only tiles of the aligned 16-bit rows for sm_90 alone, the replacement rows
    (``kernels.flash_attention.REPLACEMENTS``: ``_SM86_ROWS`` on sm_86 and sm_120, ``_SM120_ROWS``
    on sm_120, ``_SM90_ROWS`` on sm_90, ``_SM100_ROWS`` on sm_100) for their archs, the tiles they
    replace for the others.

    Soft-capped launches (``SOFTCAP=True``, Gemma 2) run one untimed tile per row
    (``kernels.flash_attention.softcap_tile``): those are built for the same head dims, dtypes,
    dense/varlen and stride alignments, forward, dQ and deterministic dK/dV."""
    builds = []
    strides3 = lambda *names: {f"stride_{n}{s}": "i32" for n in names for s in "bht"}
    # ALIGNED=True launches have every q/k/v/o/dO/dQ/dK/dV stride a multiple of 16, and the JIT
    # specialises such integer arguments at launch ("i32:16"): the report compiles that variant.
    aligned3 = lambda *names: {f"stride_{n}{s}": "i32:16" for n in names for s in "bht"}
    for dtype, ptr in _PTR.items():
        for precision, aligned in itertools.product(_PRECISIONS if dtype == torch.float32 else ("ieee",), (True, False)):
            typed3 = aligned3 if aligned else strides3
            for D in (64, 80, 96, 128, 256):
                d_pad = _fwd.padded_head_dim(D)
                for varlen in (False, True):
                    cu = "*i32" if varlen else "*fp32"
                    tail = {n: "i32" for n in ("n_heads", "group", "seqlen_q", "seqlen_k", "before", "after",
                                               "head_group", "Q_BUCKET", "K_BUCKET")}
                    tag = (f"{ptr[1:]}{'/' + precision if dtype == torch.float32 else ''} d{D}"
                           f"{' varlen' if varlen else ''}{'' if aligned else ' unaligned'}")
                    dkdv_signature = {
                        "Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr,
                        "DV": ptr, "DQ": ptr, "CU_Q": cu, "CU_K": cu, "sm_scale": "fp32", "softcap": "fp32",
                        **typed3("q", "k", "v", "do", "dk", "dv", "dq"), "stride_dqs": "i32", "stride_lb": "i32",
                        "stride_lh": "i32", "stride_lp": "i32",
                        **{("n_kv_heads" if n == "n_heads" else n): t for n, t in tail.items()}}
                    kernels = [
                        ("fwd", _fwd._attn_fwd, _fwd.fwd_configs, {},
                         {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32", "CU_Q": cu, "CU_K": cu,
                          "sm_scale": "fp32", "softcap": "fp32", **typed3("q", "k", "v", "o"), "stride_lb": "i32", "stride_lh": "i32", "stride_lp": "i32",
                          **tail}),
                        ("dkdv", _bwd._attn_bwd_dkdv, _fwd.dkdv_configs, {"ATOMIC_DQ": False, "DQ_PARTIALS": False},
                         dkdv_signature),
                        ("dq", _bwd._attn_bwd_dq, _fwd.dq_configs, {},
                         {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr,
                          "CU_Q": cu, "CU_K": cu, "sm_scale": "fp32", "softcap": "fp32",
                          **typed3("q", "k", "v", "do", "dq"),
                          "stride_lb": "i32", "stride_lh": "i32", "stride_lp": "i32", **tail}),
                    ]
                    if dtype != torch.float32:  # dQ in fp32, added with atomics (deterministic=False), or
                        # into one fp32 partial per program (set_deterministic_backward("partials"))
                        kernels += [(name, _bwd._attn_bwd_dkdv, configs, {"ATOMIC_DQ": True, "DQ_PARTIALS": partials},
                                     dkdv_signature | {"DQ": "*fp32"})
                                    for name, configs, partials in (("dkdv_atomic", _fwd.dkdv_atomic_configs, False),
                                                                    ("dkdv_partials", _fwd.dkdv_partials_configs, True))]
                    for (name, kernel, configs, flags, signature), softcap in itertools.product(kernels, (False, True)):
                        if softcap and name in ("dkdv_atomic", "dkdv_partials"):
                            continue
                        if softcap:  # one tile per row and arch
                            configs = _softcap_row(name)
                        by_arch = {arch: configs(d_pad, dtype.itemsize, precision, aligned, sm=int(arch[3:]))
                                   for arch in REPORT_ARCHS}
                        for bm, bn, w, s in dict.fromkeys(c for row in by_arch.values() for c in row):
                            archs = tuple(a for a, row in by_arch.items() if (bm, bn, w, s) in row)
                            builds.append(KernelBuild(
                                kernel, signature,
                                {"HEAD_DIM": D, "D_PAD": d_pad, "BLOCK_M": bm, "BLOCK_N": bn, "IS_VARLEN": varlen,
                                 "PRECISION": precision, "ALIGNED": aligned, **flags, "SOFTCAP": softcap},
                                num_warps=w, num_stages=s, archs=None if archs == REPORT_ARCHS else archs,
                                label=f"flash_attention {name} {tag}{' softcap' if softcap else ''} M{bm} N{bn}"))
            if precision != "ieee":
                continue
            # The preprocess has no ALIGNED flag: the JIT's own "i32:16" specialisation of O/dO
            # strides that are multiples of 16 is its aligned build.
            for D in (64, 80, 96, 128, 256):
                d_pad = _fwd.padded_head_dim(D)
                for has_dlse in (False, True):
                    builds.append(KernelBuild(
                        _bwd._bwd_preprocess,
                        {"O": ptr, "DO": ptr, "DLSE": "*fp32", "DELTA": "*fp32", **typed3("o", "do"),
                         "stride_lb": "i32", "stride_lh": "i32", "n_heads": "i32", "seqlen": "i32"},
                        {"HAS_DLSE": has_dlse, "HEAD_DIM": D, "D_PAD": d_pad,
                         "BLOCK_M": _bwd.preprocess_block(d_pad, aligned)},
                        num_warps=4, num_stages=1,
                        label=f"flash_attention preprocess {ptr[1:]} d{D}{' dlse' if has_dlse else ''}"
                              f"{'' if aligned else ' unaligned'}"))
    return builds


OP_SPECS = [
    OpSpec("flash_attention", flash_attention, _reference, _make_args, _CASES,
           kernels=("flash_attention", "flash_attention_backward"), names=("q", "k", "v"), output_names=("out",),
           build_configs=_build_configs, torch_ops=(_flash_formulation,)),
    OpSpec("flash_attention_lse", flash_attention_with_lse, _reference_with_lse, _make_args, _LSE_CASES,
           kernels=("flash_attention", "flash_attention_backward"), names=("q", "k", "v"),
           output_names=("out", "lse"), torch_ops=(_flash_formulation_with_lse,)),
    OpSpec("flash_attention_sinks", _flash_attention_with_sinks, _reference_with_sinks, _make_args, _SINK_CASES,
           kernels=("flash_attention", "flash_attention_backward"), names=("q", "k", "v", "sinks"),
           output_names=("out",)),
]
