"""Choosing between a CUDA device and the Triton interpreter (CPU).

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is imported (Triton's own
``tl`` library functions are compiled or interpreted as triton imports them), so ``import
fastllama``, the CLI and tests/conftest.py call :func:`use_interpreter_if_no_gpu` first thing.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch


def use_interpreter_if_no_gpu(cpu_requested: bool = False) -> bool:
    """Sets ``TRITON_INTERPRET=1`` when no CUDA device is present, or when the caller asked to
    run on the CPU (``--device cpu`` on a machine with a GPU); returns whether it is on.

    Raises RuntimeError if triton was already imported without the interpreter (the setting
    would silently not apply).
    """
    if torch.cuda.is_available() and not cpu_requested and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
        raise RuntimeError("without a CUDA GPU fastllama's kernels run in the Triton interpreter, which must be "
                           "switched on before triton is imported, and something imported triton first (loading a "
                           "transformers model or torch.compile do): export TRITON_INTERPRET=1 before starting "
                           "Python, or import fastllama before anything imports triton")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def use_interpreter_while_possible() -> None:
    """At ``import fastllama``: :func:`use_interpreter_if_no_gpu` while triton is not imported
    yet (a program that imports fastllama, then loads a model, which imports triton, can still
    patch it on a CPU); never raises (``fastllama.ops`` does, with what to do, if too late).
    An explicit ``TRITON_INTERPRET`` is left as it is (the build report's compile workers set
    it to 0: they compile for GPUs they do not have)."""
    if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
        use_interpreter_if_no_gpu()


def interpreter_active() -> bool:
    """True when Triton kernels run under the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# bf16 under the interpreter: its tl.dot multiplies bf16 operands as raw integer bits and its
# fp32 -> bf16 cast truncates (triton-lang/triton#11584): kernels return garbage (a NaN loss), not
# an error. The ops refuse bf16 CPU tensors then, unless the interpreter has been fixed by the
# shims in tests/conftest.py (they mark the methods they replace), or the caller only counts
# bytes or time (the CPU smoke runs of the benchmarks) and says so with wrong_bf16_values_ok().
_wrong_bf16_values_ok = 0


def _bf16_shims_installed() -> bool:
    try:
        from triton.runtime import interpreter
    except ImportError:  # (no interpreter, nothing to fix)
        return True
    builder = type(interpreter.interpreter_builder)
    return (getattr(builder.create_dot, "_fastllama_bf16_shim", False)
            and getattr(builder.cast_impl, "_fastllama_rtne_shim", False))


def check_bf16_on_interpreter(name: str, t) -> None:
    """Raises TypeError for a bf16 CPU tensor under the interpreter (see above)."""
    if (t.dtype == torch.bfloat16 and t.device.type == "cpu" and not _wrong_bf16_values_ok
            and interpreter_active() and not _bf16_shims_installed()):
        raise TypeError(f"{name} is bfloat16 on the CPU: the Triton interpreter computes bf16 wrongly "
                        f"(triton-lang/triton#11584: garbage, e.g. a NaN loss, not an error); on a CPU use "
                        f"float32 or float16, or run on a CUDA GPU")


@contextlib.contextmanager
def wrong_bf16_values_ok():
    """Lets bf16 CPU tensors through under the interpreter, for code that counts bytes or time
    only (the benchmarks' CPU smoke runs), never values."""
    global _wrong_bf16_values_ok
    _wrong_bf16_values_ok += 1
    try:
        yield
    finally:
        _wrong_bf16_values_ok -= 1
