"""The truth: pure-PyTorch references of every op and a small reference Llama model.

Nothing here imports Triton or a fastllama kernel.
"""
from .functional import *  # noqa: F401,F403  (every reference op: functional.__all__)
from .functional import __all__ as _functional_all
from .model import KVCache, Llama, LlamaConfig

__all__ = [*_functional_all, "KVCache", "Llama", "LlamaConfig"]
