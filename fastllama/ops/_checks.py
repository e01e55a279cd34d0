"""Input validation shared by every op: fail before any launch, naming the argument.

Every message says which argument, what was given and what is accepted.
"""
from __future__ import annotations

import functools

import torch

from .._interpreter import check_bf16_on_interpreter, interpreter_active

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (sizes persistent-style grids and splits):
    the tensors' device, not the current one (a model split over GPUs of different sizes)."""
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def savable(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a backward may keep it: an inference tensor (made under torch.inference_mode,
    say precomputed features feeding a trainable norm) cannot be saved, so it is copied. (Torch's
    own formulas for these ops save tensors computed from such an input, not the input itself.)
    Under torch.compile, which cannot trace ``is_inference``, ``t`` as it is."""
    if t is None or torch.compiler.is_compiling():
        return t
    return t.clone() if t.is_inference() else t


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim: int | tuple[int, ...] | None = None) -> None:
    """``t`` is a tensor of one of ``dtypes`` (and of ``ndim`` dims) on a device the kernels run on."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {_names(dtypes)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dims, got shape {tuple(t.shape)}")
    check_device(name, t)
    check_bf16_on_interpreter(name, t)


def check_device(name: str, t: torch.Tensor) -> None:
    """CUDA tensors always; CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_active():
        return
    accepted = "a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)"
    raise ValueError(f"{name} is on device {t.device}; accepted: {accepted}")


def check_attention_device(t: torch.Tensor) -> None:
    """The attention kernels (flash and decode) run on GPUs with at least 99 KB of shared memory
    per block (compute capability 8.0 and newer; ``kernels.flash_attention.table_arch``): below
    that (T4, V100) their tiles do not fit, and this says so instead of Triton's out-of-resources
    error at launch. Not while torch.compile traces or for fake tensors (shape tracing on a host
    without a GPU): the launchers ask ``table_arch`` again before any launch."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return
    from torch._subclasses.fake_tensor import FakeTensor

    from ..kernels.flash_attention import table_arch

    if not isinstance(t, FakeTensor):
        table_arch(t.device)


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, what: str = "dtype") -> None:
    """``a`` and ``b`` agree on ``what`` ("dtype" or "device")."""
    va, vb = getattr(a, what), getattr(b, what)
    if va != vb:
        raise (TypeError if what == "dtype" else ValueError)(
            f"{name_b} has {what} {vb} but {name_a} has {what} {va}; they must match"
        )


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    """Kernels take any strides but need unit stride along the last dim (vectorised loads)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dim (stride 1), got strides {tuple(t.stride())}; "
            f"call .contiguous() first"
        )


# The attention kernels address a tile's rows as (row within the tile) x (row stride) in int32:
# one 32-bit multiply per row, and every ordinary layout keeps it small (a (B, T, H, D) view has
# a token stride of H * D). Batch, head and tile starts are int64. Triton passes a stride of
# 2**31 or more as int64 itself; below that, 256 rows (the largest tile) of a stride from
# 2**31 / 255 up would wrap.
_TILE_ROWS_MAX = 256


def tile_rows_fit_int32(t: torch.Tensor, *dims: int) -> bool:
    """Whether a tile of up to 256 rows along each of ``dims`` is addressed within int32."""
    return all(t.stride(d) >= 2**31 or t.stride(d) * (_TILE_ROWS_MAX - 1) < 2**31 for d in dims)


def has_expanded_dim(t: torch.Tensor) -> bool:
    """A stride-0 dim of size > 1: several elements of ``t`` are one memory location."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def check_write_targets(written: dict, read: dict | None = None, why: str = "") -> None:
    """Every element an op writes in place must be its own memory, apart from what it reads: a
    stride-0 (expanded) dim makes several elements one location, and two targets sharing memory,
    or an input viewing a target, would overwrite each other or values still to be read (on a
    GPU: whichever program wins a race). torch refuses such in-place targets too. Inputs may share
    memory with each other, and disjoint views of one buffer are fine (q and k of a fused qkv
    projection). ``why`` ends each message (what would go wrong for this op)."""
    for name, t in written.items():
        if has_expanded_dim(t):
            raise ValueError(f"{name} has a stride-0 (expanded) dim, strides {tuple(t.stride())}, and is written in "
                             f"place{why}")
    targets = list(written.items())
    pairs = [(a, b) for i, a in enumerate(targets) for b in targets[i + 1:]]
    pairs += [(r, w) for r in (read or {}).items() for w in targets]
    for (a, ta), (b, tb) in pairs:
        if share_memory(ta, tb):
            raise ValueError(f"{a} and {b} share memory, and {b} is written in place{why}")


def share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Some element of ``a`` is at the same memory as some element of ``b`` (``f(x, x)``, or views
    that partly overlap). Disjoint views of one buffer, e.g. the gate and up halves of a fused
    gate_up projection or q and k of a fused qkv projection, do not. Exact for views with the
    same strides along their dims of size > 1 (what real code passes); views with different
    strides count as sharing when their address ranges intersect. Under torch.compile only
    identity is checked: dynamo cannot compare data pointers."""
    if a is b:
        return True
    if torch.compiler.is_compiling() or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    size = a.element_size()

    def extent(t):  # [first byte, last byte] the view can touch
        return t.data_ptr(), t.data_ptr() + size * sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))

    (a0, a1), (b0, b1) = extent(a), extent(b)
    if a1 < b0 or b1 < a0:
        return False
    # the strides of dims of size 1 in both never move an address (views give them any value)
    same_strides = a.dim() == b.dim() and all(
        sa == sb for sa, sb, na, nb in zip(a.stride(), b.stride(), a.shape, b.shape) if max(na, nb) > 1)
    if a.dtype != b.dtype or not same_strides or (b0 - a0) % size:
        return True  # (conservative)
    # Same strides: an element of b is one of a iff b0 - a0 = sum_k j_k * stride_k with
    # -(b.shape[k] - 1) <= j_k <= a.shape[k] - 1. With the dims sorted by stride, largest first,
    # and each stride larger than everything the smaller dims can reach, only j_k = floor or
    # floor + 1 of (rest / stride_k) can leave a reachable rest: a search of 2**dims branches.
    dims = sorted(((st, a.shape[k] - 1, b.shape[k] - 1) for k, st in enumerate(a.stride())
                   if max(a.shape[k], b.shape[k]) > 1), reverse=True)
    for k, (st, _, _) in enumerate(dims):
        if st <= sum(max(na, nb) * s for s, na, nb in dims[k + 1:]):
            return True  # not nested (unusual layout): conservative

    def reachable(rest, k):
        if k == len(dims):
            return rest == 0
        st, na, nb = dims[k]
        j = rest // st
        return any(-nb <= c <= na and reachable(rest - c * st, k + 1) for c in (j, j + 1))

    return reachable((b0 - a0) // size, 0)


def check_window_form(window) -> tuple[int, int]:
    """A sliding window as the attention ops take it: a pair of ints ``(left, right)`` (TypeError
    otherwise); returns it as a tuple. The values are each op's to check."""
    from collections.abc import Sequence

    if not (isinstance(window, Sequence) and len(window) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be None or a pair of ints (left, right), -1 for unlimited; got {window!r}. "
                        f"HF's sliding_window=W is window=(W - 1, 0)")
    return int(window[0]), int(window[1])


def check_softcap(softcap, scale: float) -> float:
    """A score soft-capping value as the attention ops take it: None (off, returned as 0.0) or a
    number (TypeError otherwise) that the kernels' fp32 arithmetic holds with the softmax scale
    ``scale``: ``softcap * log2(e)`` and ``scale / softcap`` stay finite, the cap non-zero
    (ValueError otherwise; under torch.compile a symbolic value is not checked)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    fp32 = torch.finfo(torch.float32)
    if torch.compiler.is_compiling():
        return float(softcap)
    if not fp32.tiny <= softcap <= fp32.max / 2:
        raise ValueError(f"softcap must be None or a finite float > 0 (within fp32's normal range), got {softcap!r}")
    if abs(scale) / softcap > fp32.max / 2:
        raise ValueError(f"softcap={softcap!r} with scale={scale!r}: scale / softcap overflows fp32; use a larger cap")
    return float(softcap)


def check_sinks(sinks, q: torch.Tensor) -> None:
    """``sinks`` (attention sinks) is None or a floating (Hq,) tensor on q's device."""
    if sinks is None:
        return
    check_tensor("sinks", sinks, ndim=1)
    check_same("q", q, "sinks", sinks, "device")
    if sinks.shape[0] != q.shape[1]:
        raise ValueError(f"sinks has {sinks.shape[0]} entries but q has {q.shape[1]} heads; attention sinks are one "
                         f"score per query head, shape (Hq,)")
