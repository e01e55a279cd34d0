"""fastllama: Triton kernels that make Llama-family models train and decode faster.

``import fastllama`` does not import Triton (the kernels load on first use of ``fastllama.ops``
or ``patch``). On a machine without a CUDA GPU it switches Triton's interpreter on
(``TRITON_INTERPRET=1``), which only works before triton is imported: import fastllama before
loading a model (transformers imports triton then) or export the variable yourself.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from ._interpreter import use_interpreter_while_possible as _use_interpreter_while_possible  # noqa: E402

_use_interpreter_while_possible()

from .tokenizer import Tokenizer  # noqa: E402

__all__ = ["__version__", "Tokenizer", "patch", "unpatch", "verify", "patch_summary", "is_patched", "ops",
           "reference", "testing", "checkpoint", "generate"]

_LAZY_MODULES = {"ops", "reference", "testing", "checkpoint", "kernels", "optable", "generate"}
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
