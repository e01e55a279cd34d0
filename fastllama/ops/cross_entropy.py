"""``linear_cross_entropy``: the LM head and its loss without materialising the logits.

At a 128k vocabulary the logits of a Llama LM head are the largest tensor of a training step
(HF keeps them in fp32 as well: 513 KiB per token). This op computes
``cross_entropy(hidden @ weight.T + bias, labels)`` with one of two schedules, whichever needs
less memory (:func:`chunk_rows_for`):

Chunks of rows (many tokens: N > 4H in bf16):

1. ``logits = hidden[rows] @ weight.T`` (torch matmul, fp32 accumulation, input dtype out);
2. one kernel streams each row once for the log-sum-exp and the loss, and once more to overwrite
   the logits with their gradient ``scale * (softmax - onehot)``;
3. ``grad_hidden[rows] = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden[rows]``,
   the latter summed over chunks in an fp32 buffer (16-bit inputs: by a Triton GEMM or by
   cuBLAS, whichever this GPU runs faster at the shape; :func:`weight_grad_gemm_choices`).

Logits inside the weight gradient (fewer tokens, when the weight needs a gradient): the
(V, H) buffer the weight gradient needs anyway holds the logits of H rows, transposed; the
same kernel works on them column-major, ``grad_hidden`` is one GEMM over the whole vocabulary,
and ``grad_weight`` is written over the consumed logits a slice of vocabulary rows at a time
(``_logits_in_weight_grad`` has the memory layout). The peak is about one weight gradient
where the chunked schedule needs the gradient plus a twice-as-large fp32 accumulator; at 4k
tokens x hidden 4096 x V 128256 this is what brings the peak under 0.25x of the materialised
path's.

So the gradients exist when the forward returns; the backward only multiplies them by the
upstream gradient (a scalar for "mean"/"sum"). Reduction "none" cannot know its per-token
upstream gradient in advance: its forward computes losses only and its backward runs the chunk
loop again. A tied embedding needs nothing special: autograd adds this op's weight gradient to
the embedding's.

The custom op ``fastllama::linear_cross_entropy`` (forward and, for "none", backward) makes the
whole loop one opaque node for ``torch.compile(fullgraph=True)``.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import triton

from .. import reference
from .._interpreter import interpreter_active
from ..kernels import cross_entropy as _k
from ..optable import INT_HINTS, KernelBuild, OpCase, OpSpec, by_arch, device_arch
from . import _timing
from ._checks import check_same, check_tensor, num_sms

__all__ = ["linear_cross_entropy", "MIN_CHUNK_ROWS", "weight_grad_gemm_choices"]

REDUCTIONS = ("mean", "sum", "none")
LABEL_DTYPES = (torch.int64, torch.int32)
# Below ~1024 rows the weight-gradient GEMM (K = rows of the chunk) stops being compute-bound
# and re-reading the fp32 accumulator for every chunk dominates; chunks never go smaller.
MIN_CHUNK_ROWS = 1024


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def chunk_rows_for(n_rows: int, hidden_size: int, vocab: int, dtype: torch.dtype, weight_grad: bool = True) -> int:
    """Rows per chunk by default.

    With a weight gradient, chunked means summing it over the chunks: in an fp32 (V, H)
    accumulator for bf16/fp16 (then converted), in the gradient itself for fp32. Every chunk
    reads and writes that accumulator once (8 bytes x V x H), so chunks have at least H rows
    (and :data:`MIN_CHUNK_ROWS`): the accumulator traffic then stays a few percent of the
    chunk's GEMMs. (Measured on an H200 at 16k tokens x hidden 4096 x V 128256: 1024-row chunks
    took 1.11x the materialised path's time.) The peak is about
    ``V * (H * (4 + itemsize) + rows * itemsize)`` bytes, 8 V H for bf16 (fp32: ``4 V (H + rows)``).

    All rows in one chunk compute the logits inside the weight gradient's (V, H) buffer instead
    (``_logits_in_weight_grad``): three whole cuBLAS GEMMs, no accumulator, and a peak of
    ``V * max(N, H) * itemsize`` bytes, the weight gradient itself when N <= H. It is used while
    that peak is no larger than the chunked one: N <= 4H for bf16/fp16 (2H for fp32).

    Without a weight gradient (a frozen LM head) there is no accumulator: chunks of logits about
    the size of the hidden states (``rows * V ~ N * H``), at least :data:`MIN_CHUNK_ROWS` rows.
    """
    n_rows, size = max(1, n_rows), dtype.itemsize
    rows = max(math.ceil(n_rows * hidden_size / max(vocab, 1)), MIN_CHUNK_ROWS)
    if not weight_grad:
        return min(rows, n_rows)
    rows = max(rows, hidden_size)
    chunked = 4 * (hidden_size + rows) if dtype == torch.float32 else hidden_size * (4 + size) + rows * size
    return n_rows if max(n_rows, hidden_size) * size <= chunked else min(rows, n_rows)


# The GPU configs (the build report compiles exactly these). One logits row per program: a
# 128k-vocabulary row is 256 KB, plenty of work, and a row-tile needs no cross-row reductions.
# 2048 columns over 8 warps: 8 values a thread (4096 spilled 8 bytes on sm_90 for fp32 + softcap).
_CE_GPU = dict(block_m=1, block_v=2048, num_warps=8)
# Column-major logits (the transposed logits computed inside the weight gradient's buffer): 32
# rows x 128 vocab columns per tile, so that each column's 32 rows are one contiguous 64-byte
# read (bf16); with few row blocks the vocabulary is split among programs (see _ce_config).
_CE_GPU_COLUMNS = dict(block_m=32, block_v=128, num_warps=8)
# On sm_100 the column-major split partials with softcap (fp16) spilled 8 bytes at 8 warps (held
# to 64 registers); with 16 warps every column-major build compiles at 94 or fewer, no spill.
_CE_GPU_COLUMNS_BY_ARCH = {100: dict(_CE_GPU_COLUMNS, num_warps=16)}


def _ce_gpu(sm: int, column_major: bool) -> dict:
    """The loss kernels' tile on report arch ``sm`` (``optable.device_arch``) for a layout."""
    return _CE_GPU_COLUMNS_BY_ARCH.get(sm, _CE_GPU_COLUMNS) if column_major else _CE_GPU


# 64 (vocab) x 128 (hidden) x 32 with 8 warps: ~205 registers and no spill on sm_80 / sm_90 with
# the fp32 tile loaded as the starting accumulator, even when the compiler cannot assume the
# chunk's row stride (the vocab) is a multiple of 16. 128x128 tiles spilled 192-208 bytes there.
_GEMM_GPU = dict(block_m=64, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3)
# Where that tile spills (build report): on sm_120 ptxas held it to 128 registers (8 B with the
# accumulator loaded, fp16/bf16); 2 stages: 212, no spill. On sm_100 fp16 without accumulator
# spilled 16 B (190 registers); 64 x 64 with 4 warps: 184, no spill (64 x 128 with 4 warps, 128-row
# tiles and BLOCK_K 64 spilled 72-1056 B or sat at 255 registers).
_GEMM_GPU_BY_ARCH = {100: dict(_GEMM_GPU, block_n=64, num_warps=4), 120: dict(_GEMM_GPU, num_stages=2)}


def _gemm_gpu(sm: int) -> dict:
    """The grad-weight GEMM's tile on report arch ``sm`` (``optable.device_arch``)."""
    return _GEMM_GPU_BY_ARCH.get(sm, _GEMM_GPU)


def _ce_config(rows: int, vocab: int, device: torch.device, column_major: bool = False) -> dict:
    if interpreter_active():
        # Every program and loop step is a Python-level step: few, large tiles (but no tile
        # taller than the chunk: padding rows cost as much as real ones), one vocabulary split.
        return dict(block_m=min(64, triton.next_power_of_2(rows)), block_v=min(8192, triton.next_power_of_2(vocab)),
                    num_warps=1)
    cfg = dict(_ce_gpu(device_arch(device), column_major))
    # Four programs per SM: 4096 column-major rows are only 128 row blocks of 32, so their
    # vocabulary is split (the kernels stream memory; too few programs leave bandwidth unused).
    programs = 4 * num_sms(device)
    cfg["splits"] = _k.vocab_splits(rows, vocab, cfg["block_m"], cfg["block_v"], programs)
    return cfg


def _gemm_config(device: torch.device) -> dict:
    if interpreter_active():
        return dict(block_m=1024, block_n=128, block_k=128, group_m=8, num_warps=1, num_stages=1)
    return _gemm_gpu(device_arch(device))


# ----------------------------------------------------------------------------------------------
# The weight gradient's GEMM over row chunks: Triton's or cuBLAS's, timed once per shape
# ----------------------------------------------------------------------------------------------
# Summing the weight gradient over chunks takes a GEMM with 16-bit inputs and an fp32 C that is
# read and written in place (beta = 1). Triton's (``_k.accumulate_at_b``) runs wherever Triton
# does. cuBLAS does the same where torch exposes it: ``torch.addmm(c, a, b, out_dtype=float32)``
# with an fp32 ``c`` (CUDA only; torch >= 2.8 has ``out_dtype``, and older releases of it refuse
# an fp32 ``c``). Its tiles are larger than the 64 x 128 one that fits Triton's registers on
# every arch, but which is faster at a shape is the GPU's to say. At the first chunk of each
# (device, dtype, V, H, chunk rows rounded up to a power of two) both are timed, alternately,
# and cuBLAS's is kept for the process only if it is at least 5% faster (a near tie keeps the
# same GEMM from run to run), as the attention kernels' autotuner keeps a tile. First, once per
# (device, dtype), cuBLAS's form must give the right sums on random data; a torch without it, or
# whose sums are wrong, keeps Triton's. So does a launch inside a CUDA-graph capture (nothing can
# be timed there) and ``torch.use_deterministic_algorithms(True)``: a timed choice could differ
# between two runs, and with it the weight gradient's last bits.
CUBLAS_MARGIN = 0.95  # cuBLAS's time must be below this fraction of Triton's
_weight_grad_gemm_choices: dict[tuple, dict] = {}
_cublas_form_checked: dict[tuple, str] = {}  # (device, dtype) -> "" if right, else why not
_FORCE_WEIGHT_GRAD_GEMM: str | None = None  # tests and benchmarks: "triton" or "cublas"
_OOM = "out of memory"


def weight_grad_gemm_choices() -> dict[tuple, dict]:
    """What the chunked weight gradient's GEMM choice measured, per (device index, dtype, vocab,
    hidden, chunk rows rounded up to a power of two): ``{"gemm": "triton" | "cublas",
    "triton_ms", "cublas_ms", "why"}`` (a copy; ``cublas_ms`` is None, and ``why`` says why,
    when cuBLAS's form was unusable)."""
    return {key: dict(entry) for key, entry in _weight_grad_gemm_choices.items()}


def _cublas_accumulate_at_b(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, accumulate: bool) -> None:
    """``c += a.T @ b`` (``c = a.T @ b`` without ``accumulate``) by cuBLAS: 16-bit ``a`` (K, M)
    and ``b`` (K, N), fp32 ``c`` (M, N) in place."""
    if accumulate:
        torch.addmm(c, a.t(), b, out_dtype=torch.float32, out=c)
    else:
        torch.mm(a.t(), b, out_dtype=torch.float32, out=c)


def _cublas_form_agrees(device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLAS's form on fixed random (96, 80) x (96, 72) operands (not the training data: an
    inf there, or an all-ignored chunk's zeros, would decide nothing), overwriting and then
    adding, against float64: False if either sum is wrong (e.g. the add ignored C); raises if
    this torch lacks the form. Both sides are fp32 sums of exact products: the gap is fp32
    rounding."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(96, n, generator=gen).to(device, dtype) for n in (80, 72))
    truth = a.t().double() @ b.double()
    c = torch.empty(truth.shape, device=device, dtype=torch.float32)
    tol = 1e-3 * float(truth.abs().max())
    _cublas_accumulate_at_b(a, b, c, accumulate=False)
    first = float((c.double() - truth).abs().max())
    _cublas_accumulate_at_b(a, b, c, accumulate=True)
    return first <= tol and float((c.double() - 2 * truth).abs().max()) <= 2 * tol


def _why_not_cublas(device: torch.device, dtype: torch.dtype) -> str:
    """"" where cuBLAS's form gives right sums on this device and torch, else why not; checked
    once per (device, dtype) (an out-of-memory is not remembered: it says nothing of the form)."""
    key = (device.index, dtype)
    if key not in _cublas_form_checked:
        try:
            why = "" if _cublas_form_agrees(device, dtype) else "cuBLAS form gave wrong sums on this torch"
        except torch.OutOfMemoryError:
            return _OOM + " while checking cuBLAS's form"
        except (RuntimeError, TypeError, NotImplementedError) as e:  # this torch lacks the form
            if "CUDA error" in str(e):
                raise  # (the context is unusable: nothing to fall back to)
            why = f"cuBLAS form unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        _cublas_form_checked[key] = why
    return _cublas_form_checked[key]


def _choose_weight_grad_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, gemm_cfg: dict,
                             rounds: int = 4) -> dict:
    """Times both GEMMs on this chunk, alternately (a passing slowdown, another process's kernel,
    then lands on both), best of ``rounds`` each, after an untimed call of each (Triton's first
    launch compiles). ``c``'s contents are garbage afterwards: the caller overwrites it next."""
    entry = {"gemm": "triton", "triton_ms": None, "cublas_ms": None, "why": _why_not_cublas(a.device, a.dtype)}
    runs = {"triton": lambda: _k.accumulate_at_b(a, b, c, accumulate=True, **gemm_cfg)}
    if not entry["why"]:
        runs["cublas"] = lambda: _cublas_accumulate_at_b(a, b, c, accumulate=True)
    for name, ms in _timing.best_times(runs, rounds).items():
        entry[f"{name}_ms"] = ms
    if "cublas" in runs and entry["cublas_ms"] < CUBLAS_MARGIN * entry["triton_ms"]:
        entry["gemm"] = "cublas"
    return entry


def _weight_grad_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, chunk_rows: int, gemm_cfg: dict) -> str:
    """The GEMM that sums this weight gradient's chunks (see above); at a new shape, times both
    on the first chunk ``a`` (K, V), ``b`` (K, H) into the fp32 accumulator ``c``."""
    if _FORCE_WEIGHT_GRAD_GEMM is not None:
        return _FORCE_WEIGHT_GRAD_GEMM
    if not _timing.can_time(a) or torch.are_deterministic_algorithms_enabled():
        return "triton"
    # (chunk rows grow with the token count past N > V: a power-of-two bucket keeps a training
    # run with varying token counts from timing again at every new count)
    key = (a.device.index, a.dtype, c.shape[0], c.shape[1], triton.next_power_of_2(chunk_rows))
    entry = _weight_grad_gemm_choices.get(key)
    if entry is None:
        if _timing.capturing(c):
            return "triton"
        with torch.cuda.device_of(c):
            entry = _choose_weight_grad_gemm(a, b, c, gemm_cfg)
        if not entry["why"].startswith(_OOM):  # (memory was short this once: choose again next time)
            _weight_grad_gemm_choices[key] = entry
    return entry["gemm"]


# ----------------------------------------------------------------------------------------------
# The chunk loop
# ----------------------------------------------------------------------------------------------
def _check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ValueError on a label outside [0, vocab) that is not ignore_index (one device sync)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        where = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels contains {int(labels[where])} at flat position {where}; accepted: values in "
            f"[0, {vocab}) (the vocabulary size, weight.shape[0]) or ignore_index={ignore_index}. "
            f"(This check synchronises with the device; check_labels=False skips it and an "
            f"out-of-range label then gives a NaN loss.)")


# Vocabulary rows of the weight gradient per GEMM in _logits_in_weight_grad: its scratch tile
# holds at most this many elements (32 MiB in bf16; 4008 rows x 4096 at Llama 3's head).
WEIGHT_GRAD_SLICE_ELEMENTS = 2**24


def _logits_in_weight_grad(hidden, weight, labels, bias, scale, ignore_index, z_loss, softcap, want_gh, want_gb):
    """The loss and its gradients with (most of) the logits stored inside the weight gradient.

    The weight gradient needs a V x H buffer anyway; the logits of H rows fit in it. They are
    computed there transposed, as a contiguous (V, N0) block at the END of the buffer (N0 =
    min(N, H)); the logits of rows past H, if any, get a (V, N - N0) block of their own. So the
    peak is max(N, H) x V elements (plus a scratch tile), not the logits plus the weight
    gradient. In order, per block of rows:

    1. ``logits^T = W @ hidden^T`` (one GEMM);
    2. the chunk kernel turns them, column-major, into ``dlogits^T`` in place;
    3. ``grad_hidden = dlogits @ W`` (one GEMM) and ``grad_bias = sum_rows dlogits``;

    then ``grad_W[r0:r1] = dlogits^T[r0:r1] @ hidden`` a slice of vocabulary rows at a time, in
    ascending order, over ALL rows at once (one rounding, no accumulator). Slice r0:r1 of
    ``grad_W`` occupies elements [r0*H, r1*H) of the buffer; the in-buffer ``dlogits^T`` rows
    from r0 on sit at [off + r0*N0, end) with off = V*H - V*N0. A slice whose destination ends
    before its source starts (one block only) is written directly. Otherwise (always when
    N >= H) the slice's dlogits rows, from every block, are first copied into a scratch tile;
    then only rows from r1 on are still needed, and r1*H <= off + r1*N0 always holds, so the
    GEMM writes its destination directly.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    dtype, dev = hidden.dtype, hidden.device
    n0 = min(n, h)
    buf = torch.empty(v * h, device=dev, dtype=dtype)
    off = v * h - v * n0
    blocks = [(0, n0, buf[off:].view(v, n0))]
    if n > n0:
        blocks.append((n0, n, torch.empty((v, n - n0), device=dev, dtype=dtype)))
    losses = torch.empty(n, device=dev, dtype=torch.float32)
    gh = torch.empty((n, h), device=dev, dtype=dtype) if want_gh else hidden.new_empty((0,))
    gb_acc = torch.zeros(v, device=dev, dtype=torch.float32) if want_gb else None
    for start, stop, logits_t in blocks:
        rows = hidden[start:stop]
        if bias is None:
            torch.mm(weight, rows.t(), out=logits_t)
        else:
            torch.addmm(bias.unsqueeze(1), weight, rows.t(), out=logits_t)
        losses[start:stop], _ = _k.cross_entropy_chunk(
            logits_t.t(), labels[start:stop], scale if scale.numel() == 1 else scale[start:stop],
            ignore_index=ignore_index, z_loss=z_loss, softcap=softcap, write_grad=True,
            **_ce_config(stop - start, v, dev, column_major=True))
        dlogits_t = logits_t  # overwritten in place by the kernel
        if want_gb:
            gb_acc += dlogits_t.sum(1, dtype=torch.float32)
        if want_gh:
            torch.mm(dlogits_t.t(), weight, out=gh[start:stop])

    # Slices of at most ~1/32 of the vocabulary and WEIGHT_GRAD_SLICE_ELEMENTS / N rows: the
    # scratch tile (slice rows x N) stays a few percent of the weight gradient.
    slice_rows = max(1, min(WEIGHT_GRAD_SLICE_ELEMENTS // max(n, 1), -(-v // 32)))
    scratch = None
    for r0 in range(0, v, slice_rows):
        r1 = min(r0 + slice_rows, v)
        dest = buf[r0 * h:r1 * h].view(r1 - r0, h)
        source = [logits_t[r0:r1] for _, _, logits_t in blocks]
        if len(blocks) == 1 and r1 * h <= off + r0 * n0:
            torch.mm(source[0], hidden, out=dest)
            continue
        if scratch is None:
            scratch = torch.empty(slice_rows * n, device=dev, dtype=dtype)
        gathered = scratch[:(r1 - r0) * n].view(r1 - r0, n)
        torch.cat(source, dim=1, out=gathered)
        torch.mm(gathered, hidden, out=dest)
    gb = gb_acc.to(dtype) if want_gb else weight.new_empty((0,))
    return losses, gh, buf.view(v, h), gb


def _chunk_loop(hidden, weight, labels, bias, scale, ignore_index, z_loss, softcap,
                want_gh, want_gw, want_gb, chunk_rows):
    """Per-row losses (fp32) and, where wanted, the gradients scaled per row by ``scale``."""
    n, h = hidden.shape
    v = weight.shape[0]
    if want_gw and chunk_rows >= n:
        return _logits_in_weight_grad(hidden, weight, labels, bias, scale, ignore_index, z_loss, softcap,
                                      want_gh, want_gb)
    dtype, dev = hidden.dtype, hidden.device
    write_grad = want_gh or want_gw or want_gb
    losses = torch.empty(n, device=dev, dtype=torch.float32)
    gh = torch.empty((n, h), device=dev, dtype=dtype) if want_gh else hidden.new_empty((0,))
    gw = weight.new_empty((0,))
    gb = weight.new_empty((0,))
    rows = max(1, min(chunk_rows, n))
    # Several chunks in half precision: sum the weight gradient in an fp32 buffer (the output
    # dtype would round every chunk's share). fp32 weights accumulate in the output itself.
    # (Weight gradient with a single chunk: _logits_in_weight_grad, above.)
    acc = None
    if want_gw:
        if dtype == torch.float32:
            gw = torch.empty((v, h), device=dev, dtype=dtype)
        else:
            acc = torch.empty((v, h), device=dev, dtype=torch.float32)
    gb_acc = torch.zeros(v, device=dev, dtype=torch.float32) if want_gb else None
    ce_cfg, gemm_cfg = _ce_config(rows, v, dev), _gemm_config(dev)
    wt = weight.t()

    for i, start in enumerate(range(0, n, rows)):
        stop = min(start + rows, n)
        hc = hidden[start:stop]
        logits = torch.mm(hc, wt) if bias is None else torch.addmm(bias, hc, wt)
        sc = scale if scale.numel() == 1 else scale[start:stop]
        loss_c, _ = _k.cross_entropy_chunk(
            logits, labels[start:stop], sc, ignore_index=ignore_index, z_loss=z_loss,
            softcap=softcap, write_grad=write_grad, **ce_cfg)
        losses[start:stop] = loss_c
        if not write_grad:
            continue
        dlogits = logits  # overwritten in place by the kernel
        if want_gh:
            torch.mm(dlogits, weight, out=gh[start:stop])
        if want_gw:
            if acc is None:  # fp32: cuBLAS/CPU addmm accumulates in place in fp32
                if i == 0:
                    torch.mm(dlogits.t(), hc, out=gw)
                else:
                    gw.addmm_(dlogits.t(), hc)
            else:
                if i == 0:  # (which GEMM: timed on the first chunk of a new shape, see above)
                    gemm = _weight_grad_gemm(dlogits, hc, acc, rows, gemm_cfg)
                if gemm == "cublas":
                    _cublas_accumulate_at_b(dlogits, hc, acc, accumulate=i > 0)
                else:
                    _k.accumulate_at_b(dlogits, hc, acc, accumulate=i > 0, **gemm_cfg)
        if want_gb:
            gb_acc += dlogits.sum(0, dtype=torch.float32)
        del logits, dlogits
    if acc is not None:
        gw = acc.to(dtype)
        del acc
    if want_gb:
        gb = gb_acc.to(dtype)
    return losses, gh, gw, gb


# ----------------------------------------------------------------------------------------------
# Custom op and autograd
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("fastllama::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: Optional[torch.Tensor],
            scale: torch.Tensor, reduction: str, ignore_index: int, z_loss: float, softcap: float,
            want_gh: bool, want_gw: bool, want_gb: bool, check_labels: bool, chunk_rows: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_hidden, grad_weight, grad_bias); a gradient not wanted is an empty tensor.

    ``scale`` (fp32) multiplies each row's gradient: the reduction's factor as one element, or
    the upstream per-token gradient (reduction "none", backward). ``softcap`` 0 means off.
    """
    if check_labels:
        _check_label_values(labels, weight.shape[0], ignore_index)
    with torch.autocast(hidden.device.type, enabled=False):  # the matmuls run in the inputs' dtype
        losses, gh, gw, gb = _chunk_loop(hidden, weight, labels, bias, scale, ignore_index, z_loss,
                                         softcap if softcap > 0 else None, want_gh, want_gw, want_gb, chunk_rows)
    # (losses.sum() * scale).reshape(()) would be a view: autograd then refuses ``loss /= steps``
    loss = losses if reduction == "none" else losses.sum() * scale.reshape(())
    return loss, gh, gw, gb


def _gradients_in_backward(reduction: str, dtype: torch.dtype) -> bool:
    """Whether the gradients wait for the upstream gradient instead of being made in the forward.

    "none": each row has its own upstream factor. fp16: its 5-bit exponent cannot hold gradients
    rounded before the upstream factor is known: at the reduction's scale 1/N the softmax terms
    underflow (a GradScaler's loss scale of 2**16 comes too late to save them), and "sum" can
    overflow to inf. PyTorch multiplies the fp32 logit gradients by the upstream gradient first,
    then rounds; so does the backward here, at the cost of recomputing the logits (one GEMM).
    bf16 has fp32's exponent range and keeps the cheaper forward schedule.
    """
    return reduction == "none" or dtype == torch.float16


@_lce_op.register_fake
def _(hidden, weight, labels, bias, scale, reduction, ignore_index, z_loss, softcap,
      want_gh, want_gw, want_gb, check_labels, chunk_rows):
    n = hidden.shape[0]
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    return (loss,
            hidden.new_empty(hidden.shape if want_gh else (0,)),
            weight.new_empty(weight.shape if want_gw else (0,)),
            weight.new_empty((weight.shape[0],) if want_gb else (0,)))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, bias, scale, reduction, ignore_index, z_loss, softcap, *_rest, chunk_rows = inputs
    ctx.reduction = reduction
    ctx.has_bias = bias is not None
    ctx.deferred = _gradients_in_backward(reduction, hidden.dtype)
    if ctx.deferred:
        # Gradients depend on the upstream gradient: keep the inputs, recompute later.
        ctx.options = (ignore_index, z_loss, softcap, chunk_rows)
        ctx.save_for_backward(hidden, weight, labels, bias, scale)
    else:
        # Gradients were computed in the forward, already scaled by the reduction's factor.
        ctx.save_for_backward(*output[1:])
    # The gradient outputs are never used downstream: without this, autograd would allocate
    # zeros for their incoming gradients (a weight-sized tensor) before calling _backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _g1, _g2, _g3):
    if torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy has no double backward: its gradients are computed by kernels, "
                           "not by differentiable ops (backward(create_graph=True) is not supported)")
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = need_b and ctx.has_bias
    if ctx.deferred:
        hidden, weight, labels, bias, scale = ctx.saved_tensors
        ignore_index, z_loss, softcap, chunk_rows = ctx.options
        # per row: the upstream gradient ("none"), or the reduction's factor times it
        upstream = grad_loss.float() if ctx.reduction == "none" else (scale * grad_loss.float()).reshape(1)
        _, gh, gw, gb = _lce_op(hidden, weight, labels, bias, upstream, "none", ignore_index, z_loss,
                                softcap, need_h, need_w, need_b, False, chunk_rows)
    else:
        # The gradients were computed in the forward and are scaled in place (no second copy of
        # a weight-sized tensor), so they can serve one backward only. autograd's saved-tensor
        # version check would catch a second one, but it is skipped under saved_tensors_hooks:
        # the flag makes the refusal unconditional.
        if getattr(ctx, "gradients_used", False):
            raise RuntimeError("linear_cross_entropy with reduction='mean' or 'sum' supports one backward per "
                               "forward: its gradients are computed in the forward and were already used "
                               "(a second backward through the graph, retain_graph=True); run the forward again, "
                               "or use reduction='none' and reduce the losses yourself")
        ctx.gradients_used = True
        # (detached: saved as the op's outputs they would come back flagged requires_grad, and
        # torch.autograd.grad hands them to the caller as they are)
        gh, gw, gb = (t.mul_(grad_loss).detach() if t.numel() else t for t in ctx.saved_tensors)
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None,
            None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("fastllama::linear_cross_entropy", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------
def _validate(hidden, weight, labels, ignore_index, reduction, bias, num_items_in_batch, z_loss, softcap,
              check_labels, chunk_rows) -> None:
    check_tensor("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (..., hidden_size) with at least 2 dims, got shape {tuple(hidden.shape)}")
    check_tensor("weight", weight, ndim=2)
    check_same("hidden", hidden, "weight", weight, "dtype")
    check_same("hidden", hidden, "weight", weight, "device")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)} (vocab, hidden_size) but hidden has hidden "
                         f"size {hidden.shape[-1]}; weight must be (vocab, {hidden.shape[-1]})")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (shape[0] == 0); accepted: vocab >= 1")
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight have hidden size 0 (no features); accepted: hidden_size >= 1")
    check_tensor("labels", labels, dtypes=LABEL_DTYPES)
    check_same("hidden", hidden, "labels", labels, "device")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but hidden has shape {tuple(hidden.shape)}; "
                         f"labels must be {tuple(hidden.shape[:-1])} (hidden without its last dim)")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("weight", weight, "bias", bias, "dtype")
        check_same("weight", weight, "bias", bias, "device")
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}; accepted: ({weight.shape[0]},) (the vocab)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -2**31 <= ignore_index < 2**31:
        # The kernels take it as a 32-bit int; and int32 labels would compare with it wrapped.
        raise ValueError(f"ignore_index must fit in 32 bits (-2**31 <= ignore_index < 2**31), got {ignore_index}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(f"num_items_in_batch divides the summed loss of reduction='mean'; "
                             f"got it with reduction={reduction!r}")
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(f"num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}")
            if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
                raise TypeError(f"num_items_in_batch must be a real number, got a {num_items_in_batch.dtype} tensor")
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise TypeError(f"num_items_in_batch must be an int or a one-element tensor, "
                            f"got {type(num_items_in_batch).__name__}")
        elif not 0 <= num_items_in_batch < math.inf:  # (a tensor's value is not read: no device sync)
            raise ValueError(f"num_items_in_batch must be a finite count >= 0, got {num_items_in_batch!r}")
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    if not isinstance(check_labels, bool):
        raise TypeError(f"check_labels must be a bool, got {type(check_labels).__name__}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be None or an int >= 1, got {chunk_rows!r}")


def _scale(labels, ignore_index, reduction, num_items_in_batch, device) -> torch.Tensor:
    """The reduction's factor as a one-element fp32 device tensor (no host sync)."""
    # torch.full launches a fill kernel with the value as an argument: no host-to-device copy.
    if reduction != "mean":
        return torch.full((), 1.0, device=device, dtype=torch.float32)
    if num_items_in_batch is None:
        count = (labels != ignore_index).sum()
    elif isinstance(num_items_in_batch, torch.Tensor):
        count = num_items_in_batch.reshape(()).to(device)
    else:
        return torch.full((), 1.0 / max(num_items_in_batch, 1), device=device, dtype=torch.float32)
    return 1.0 / count.to(torch.float32).clamp(min=1.0)


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
    check_labels: bool = True,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)`` without the materialised path's
    fp32 (tokens, vocab) tensors: in chunks of rows, or with the logits inside the weight
    gradient's buffer when that needs less memory (see :func:`chunk_rows_for`). Peak memory
    at Llama 3's head is 0.09x-0.18x of ``lm_head`` + ``F.cross_entropy``'s (4k-32k tokens).

    Labels are NOT shifted here (HF's ``ForCausalLMLoss`` shifts them first; pass the shifted
    labels). Logits are computed in the input dtype with fp32 accumulation, exactly like
    ``lm_head``; the log-sum-exp, softmax and loss are fp32.

    Args:
        hidden: (..., H) fp32/fp16/bf16 (under ``torch.autocast``, hidden, weight and bias are
            first cast to the autocast dtype, as ``lm_head`` would be). Flattened to (N, H) with ``reshape`` (a copy only when
            the leading dims cannot be viewed as one, e.g. a transposed (T, B, H) view, or when
            the last dim is not unit-stride).
        weight: (V, H), same dtype and device, any strides (e.g. a tied input embedding: its
            gradient then accumulates both uses, as autograd does for any shared leaf).
        labels: hidden's shape without the last dim, int64 or int32; values in [0, V) or
            ``ignore_index``.
        ignore_index: label value that contributes neither loss nor gradient (a 32-bit int).
        reduction: "mean" (over non-ignored tokens; all ignored gives 0, not NaN), "sum", or
            "none" (fp32 losses in the shape of ``labels``, 0 at ignored tokens).
        bias: optional (V,) added to the logits.
        num_items_in_batch: with "mean", divide the summed loss by this count instead of the
            number of non-ignored tokens (HF's gradient-accumulation convention): a count >= 0,
            an int or a one-element tensor; below 1 (a batch without targets) it counts as 1.
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per non-ignored token (PaLM; 1e-4 is
            typical) to keep the log-normaliser near 0. Default 0: off.
        softcap: replaces the logits by ``softcap * tanh(logits / softcap)`` (Gemma 2's final
            logit soft-capping, e.g. 30.0) before the loss. Default None: off.
        check_labels: raise ValueError, before any kernel runs, if a label is outside [0, V) and
            not ``ignore_index``. On CUDA this costs one device synchronisation per call; tuned
            training loops with trusted labels can pass False (a bad label then yields a NaN
            loss and NaN gradients, never a plausible wrong number).
        chunk_rows: rows per chunk; default :func:`chunk_rows_for`: all rows at once when the
            weight needs a gradient and N <= 4H (fp32: 2H; the logits are then computed inside
            that gradient's buffer, plus a (V, N - H) block for rows past H), else chunks of at
            least H rows (frozen weight: about the size of ``hidden``, at least
            :data:`MIN_CHUNK_ROWS` rows). ``chunk_rows >= N`` with a
            weight gradient selects the first schedule; smaller values bound every logits
            allocation by ``chunk_rows x V``.

    Returns:
        fp32 loss: a scalar for "mean"/"sum", ``labels.shape`` for "none".

    The gradients of "mean"/"sum" are computed during the forward (when grad is enabled and an
    input requires it) and only scaled in the backward; a second backward through the same
    graph (``retain_graph=True``) raises. Under ``torch.no_grad()`` no gradient work is done.
    (An infinite upstream gradient, an overflowed loss scale, then gives ignored rows NaN where
    torch gives 0: every gradient is non-finite either way.)
    fp16 inputs (and "none") compute the gradients in the backward instead, recomputing the
    logits: rounded to fp16 before the upstream gradient (a loss scale) is applied, they would
    underflow or overflow where PyTorch's do not.
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # What ``lm_head`` (F.linear) does under autocast: operands in the autocast dtype.
        dt = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dt), weight.to(dt) if isinstance(weight, torch.Tensor) else weight
        bias = bias.to(dt) if isinstance(bias, torch.Tensor) else bias
    _validate(hidden, weight, labels, ignore_index, reduction, bias, num_items_in_batch, z_loss, softcap,
              check_labels, chunk_rows)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if h2.stride(-1) != 1 and h2.shape[-1] > 1:
        h2 = h2.contiguous()  # documented: the weight-gradient GEMM reads unit-stride rows
    lab = labels.reshape(-1).contiguous()  # the kernels read labels at unit stride
    if chunk_rows is None:
        weight_grad = torch.is_grad_enabled() and weight.requires_grad
        chunk_rows = chunk_rows_for(h2.shape[0], h2.shape[1], weight.shape[0], h2.dtype, weight_grad)
    scale = _scale(lab, ignore_index, reduction, num_items_in_batch, hidden.device)
    grad = torch.is_grad_enabled() and not _gradients_in_backward(reduction, h2.dtype)
    loss, *_ = _lce_op(h2, weight, lab, bias, scale, reduction, ignore_index, float(z_loss),
                       float(softcap) if softcap is not None else 0.0,
                       grad and hidden.requires_grad, grad and weight.requires_grad,
                       grad and bias is not None and bias.requires_grad, check_labels, chunk_rows)
    return loss.view(labels.shape) if reduction == "none" else loss


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
def _make_args(params: dict, dtype: torch.dtype, device: str):
    """params: batch, seq, hidden, vocab; ignore (fraction of ignored labels, 1.0: all);
    bias; plus op options (reduction, num_items_in_batch, z_loss, softcap, chunk_rows,
    ignore_index: the value ignored labels get, -100 by default)."""
    b, t, h, v = params["batch"], params["seq"], params["hidden"], params["vocab"]
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(b, t, h, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    # Logits of a few units, like a trained LM head (std ~ params.get("logit_std", 2)).
    w_std = params.get("logit_std", 2.0) / math.sqrt(h)
    weight = (torch.randn(v, h, generator=gen) * w_std).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[torch.rand(b, t, generator=gen) < params.get("ignore", 0.25)] = params.get("ignore_index", -100)
    args = [hidden, weight, labels.to(device)]
    if params.get("bias"):
        args.append((torch.randn(v, generator=gen)).to(device=device, dtype=dtype).requires_grad_())
    options = ("reduction", "num_items_in_batch", "z_loss", "softcap", "chunk_rows", "ignore_index")
    return tuple(args), {k: params[k] for k in options if k in params}


def _spec_op(hidden, weight, labels, bias=None, **kwargs):
    return linear_cross_entropy(hidden, weight, labels, bias=bias, **kwargs)


def _spec_ref(hidden, weight, labels, bias=None, chunk_rows=None, **kwargs):
    out = reference.linear_cross_entropy(hidden, weight, labels, bias=bias, **kwargs)
    return out.view(labels.shape) if kwargs.get("reduction") == "none" else out


_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _build_configs() -> list[KernelBuild]:
    """Every GPU launch: the cross-entropy kernels per logits layout (row-major chunks,
    column-major logits inside the weight gradient) x dtype x label dtype x softcap x split
    x gradient, and the fp32-accumulating GEMM (half dtypes only: fp32 weights use torch's
    addmm_) with and without a first-chunk overwrite; each x the integer hints a launch gets.

    Triton hints an integer that is a multiple of 16 at launch (and makes one equal to 1 a
    constant). The kernels never specialise the ignore index, the gradient scale's stride and
    the GEMM's chunk rows K (their do_not_specialize lists); the rest come in the classes
    launches give them: the vocabulary size with the row-major logits' row stride, the
    column-major logits' column stride (the chunk's rows), the row count (plain, a multiple of
    16, or 1: in the column-major layout the rows are the contiguous axis, and the hint on
    ``rows < n_rows`` is what makes those loads and stores vectors: 16-bit scalar ones without
    it), and for the GEMM the vocabulary size with its stride and the hidden size with its
    strides. ``cols_per_split`` is a multiple of BLOCK_V, always hinted."""
    builds = []
    row_hints = {**INT_HINTS, " 1": "constexpr"}
    # Row-major chunks (unit stride along V; Triton makes the argument equal to 1 a constant)
    # and the column-major logits of _logits_in_weight_grad (unit stride along the rows; always
    # writing the gradient); each with one vocabulary split (one kernel) or several (partials,
    # then loss and gradient).
    layouts = (("rows", False, {"stride_col": 1}, "stride_row", (False, True)),
               ("columns", True, {"stride_row": 1}, "stride_col", (True,)))
    for dtype, ptr in _PTR.items():
        for layout, column_major, unit_stride, other_stride, grads in layouts:
            for ce, archs in by_arch(lambda sm: _ce_gpu(sm, column_major)):
                tiles = {"BLOCK_M": ce["block_m"], "BLOCK_V": ce["block_v"]}
                for lab, softcap, (vh, v_hint), (rh, r_hint) in itertools.product(
                        ("*i64", "*i32"), (False, True), INT_HINTS.items(), row_hints.items()):
                    # The other stride is the vocabulary size (row-major logits) or the row count
                    # (column-major: (V, N) logits), and shares its class; a 1 is a constant.
                    s_hint = v_hint if layout == "rows" else r_hint
                    common = {"n_rows": r_hint, "n_cols": v_hint, "cols_per_split": "i32:16", "ignore_index": "i32",
                              "softcap": "fp32"}
                    name = (f"cross_entropy {layout} {ptr[1:]} labels {lab[1:]} softcap={softcap}"
                            f"{' V' + vh if vh else ''}{' rows' + rh if rh else ''}")
                    unit = {arg: "constexpr" for arg in unit_stride}  # the launch makes a 1 a constant
                    one_row = {"n_rows": 1} if r_hint == "constexpr" else {}
                    if s_hint == "constexpr":
                        one_row[other_stride] = 1
                    builds.append(KernelBuild(
                        _k._lse_partials_kernel,
                        {"logits_ptr": ptr, **unit, other_stride: s_hint, "labels_ptr": lab, "target_ptr": "*fp32",
                         "part_ptr": "*fp32", **common},
                        {**unit_stride, **one_row, "HAS_SOFTCAP": softcap, **tiles},
                        num_warps=ce["num_warps"], archs=archs, label=f"{name} split partials"))
                    for split_pad, write_grad in itertools.product((0, _k.MAX_SPLITS), grads):
                        builds.append(KernelBuild(
                            _k._loss_and_grad_kernel,
                            {"logits_ptr": ptr, **unit, other_stride: s_hint, "labels_ptr": lab, "loss_ptr": "*fp32",
                             "lse_ptr": "*fp32", "scale_ptr": "*fp32", "stride_scale": "i32", "part_ptr": "*fp32",
                             **common, "z_loss": "fp32"},
                            {**unit_stride, **one_row, "HAS_SOFTCAP": softcap, "WRITE_GRAD": write_grad,
                             "SPLIT_PAD": split_pad, **tiles},
                            num_warps=ce["num_warps"], archs=archs,
                            label=f"{name} {'splits' if split_pad else 'one split'} grad={write_grad}"))
        if dtype == torch.float32:
            continue
        for accumulate, (vh, v_hint), (hh, h_hint), (g, archs) in itertools.product(
                (False, True), INT_HINTS.items(), INT_HINTS.items(), by_arch(_gemm_gpu)):
            builds.append(KernelBuild(
                _k._accumulate_at_b_kernel,
                {"a_ptr": ptr, "stride_ak": v_hint, "stride_am": "constexpr", "b_ptr": ptr, "stride_bk": h_hint,
                 "stride_bn": "constexpr", "c_ptr": "*fp32", "stride_cm": h_hint, "stride_cn": "constexpr",
                 "M": v_hint, "N": h_hint, "K": "i32"},
                # Unit strides are what the op passes (logits chunk, hidden rows, accumulator) and
                # Triton specialises an int argument equal to 1 as a constexpr at launch.
                {"stride_am": 1, "stride_bn": 1, "stride_cn": 1, "ACCUMULATE": accumulate, "PRECISION": "tf32",
                 "BLOCK_M": g["block_m"], "BLOCK_N": g["block_n"], "BLOCK_K": g["block_k"], "GROUP_M": g["group_m"]},
                num_warps=g["num_warps"], num_stages=g["num_stages"], archs=archs,
                label=f"cross_entropy grad-weight GEMM {ptr[1:]} accumulate={accumulate}"
                      f"{' V' + vh if vh else ''}{' H' + hh if hh else ''}"))
    return builds


_CASES = (
    OpCase("3x77-v1000-mean", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000}),
    OpCase("3x77-v32003-mean", {"batch": 3, "seq": 77, "hidden": 16, "vocab": 32003}),
    OpCase("1x6-v128256-sum", {"batch": 1, "seq": 6, "hidden": 32, "vocab": 128256, "reduction": "sum"}),
    OpCase("3x77-v1000-none", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000, "reduction": "none"}),
    OpCase("3x77-v1000-all-ignored", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000, "ignore": 1.0}),
    OpCase("3x77-v1000-num-items", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000,
                                    "num_items_in_batch": 500}),
    OpCase("3x77-v1000-chunked", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000, "chunk_rows": 64}),
    # per-row upstream gradients offset per chunk; ignore_index other than -100 on both paths
    # (row chunks, and the logits inside the weight gradient), one of them a valid id
    OpCase("3x77-v1000-none-chunked-ignore-1", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000,
                                                "reduction": "none", "chunk_rows": 64, "ignore_index": -1}),
    OpCase("3x77-v1000-ignore7", {"batch": 3, "seq": 77, "hidden": 64, "vocab": 1000, "ignore_index": 7}),
    # N == H: the logits fill the weight gradient's buffer exactly (every slice via the scratch tile).
    OpCase("2x32-h64-v4099-bias-softcap", {"batch": 2, "seq": 32, "hidden": 64, "vocab": 4099, "bias": True,
                                           "softcap": 5.0}),
    OpCase("2x33-v1000-bias-zloss-softcap", {"batch": 2, "seq": 33, "hidden": 64, "vocab": 1000, "bias": True,
                                             "z_loss": 1e-2, "softcap": 3.0, "logit_std": 4.0, "chunk_rows": 32}),
    OpCase("4x1023-v32000-h4096", {"batch": 4, "seq": 1023, "hidden": 4096, "vocab": 32000}, cuda_only=True),
    OpCase("2x2048-v128256-h2048", {"batch": 2, "seq": 2048, "hidden": 2048, "vocab": 128256}, cuda_only=True),
    OpCase("4x2048-v128256-h1024-chunked", {"batch": 4, "seq": 2048, "hidden": 1024, "vocab": 128256,
                                            "chunk_rows": 1024}, cuda_only=True),
    OpCase("2x1000-v128256-none-softcap", {"batch": 2, "seq": 1000, "hidden": 1024, "vocab": 128256,
                                           "reduction": "none", "softcap": 30.0, "z_loss": 1e-4}, cuda_only=True),
)

OP_SPECS = [
    OpSpec("linear_cross_entropy", _spec_op, _spec_ref, _make_args, _CASES, kernels=("cross_entropy",),
           names=("hidden", "weight", "labels", "bias"), output_names=("loss",),
           build_configs=_build_configs),
]
