"""fastllama: Triton kernels that make Llama-family models train and decode faster.

``import fastllama`` is cheap and does not import Triton: the kernels load on first use of
``fastllama.ops`` (or ``patch``), so a CPU-only program can set ``TRITON_INTERPRET=1`` first.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["__version__", "Tokenizer", "patch", "unpatch", "verify", "patch_summary", "is_patched", "ops",
           "reference", "testing", "checkpoint"]

_LAZY_MODULES = {"ops", "reference", "testing", "checkpoint", "kernels", "optable"}
# (not modules named patch/verify: importing such a submodule would shadow the function)
_LAZY_FUNCTIONS = {"patch": "patching", "unpatch": "patching", "patch_summary": "patching",
                   "is_patched": "patching", "verify": "verification"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(f".{_LAZY_FUNCTIONS[name]}", __name__), name)
    raise AttributeError(f"module 'fastllama' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily loaded names too (tab completion, help())
    return sorted(set(globals()) | _LAZY_MODULES | set(_LAZY_FUNCTIONS))
