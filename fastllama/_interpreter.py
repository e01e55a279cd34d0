"""Choosing between a CUDA device and the Triton interpreter (CPU).

``TRITON_INTERPRET=1`` only takes effect if it is set before ``triton`` is imported, so entry
points (the CLI, tests/conftest.py) call :func:`use_interpreter_if_no_gpu` first thing.
"""
from __future__ import annotations

import os
import sys


def use_interpreter_if_no_gpu() -> bool:
    """Sets ``TRITON_INTERPRET=1`` when no CUDA device is present; returns whether it is on.

    Raises RuntimeError if triton was already imported without the interpreter on a machine
    without a GPU (the setting would silently not apply).
    """
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET") != "1" and "triton" in sys.modules:
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set; "
                           "call use_interpreter_if_no_gpu() before importing triton or fastllama.ops")
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def interpreter_active() -> bool:
    """True when Triton kernels run under the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
