"""Triton kernels, one op per file, each with a plain launcher (tensors in, tensors out).

Installed as ``fastllama.kernels``. Modules here import torch and triton only, nothing of
fastllama; validation and autograd live in ``fastllama.ops``.
"""
