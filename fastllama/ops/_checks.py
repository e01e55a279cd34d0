"""Input validation shared by every op: fail before any launch, naming the argument.

Every message says which argument, what was given and what is accepted.
"""
from __future__ import annotations

import torch

from .._interpreter import interpreter_active

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def check_device(name: str, t: torch.Tensor) -> None:
    """CUDA tensors always; CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreter_active():
        return
    accepted = "a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)"
    raise ValueError(f"{name} is on device {t.device}; accepted: {accepted}")


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


def has_expanded_dim(t: torch.Tensor) -> bool:
    """A stride-0 dim of size > 1: several elements of ``t`` are one memory location."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))


def same_start(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are the same tensor, or views starting at the same memory (``f(x, x)``).
    (Disjoint views of one buffer, e.g. q and k of a fused projection, are not. Under
    torch.compile only identity is checked: dynamo cannot compare data pointers.)"""
    if a is b:
        return True
    if torch.compiler.is_compiling() or a.numel() == 0 or b.numel() == 0:
        return False
    return a.data_ptr() == b.data_ptr()
