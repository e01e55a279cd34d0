"""Triton kernels, one op per file, each with a plain launcher (tensors in, tensors out).

Installed as ``fastllama.kernels``. Modules here import torch and triton only, nothing of
fastllama; validation and autograd live in ``fastllama.ops``.
"""
if __name__ == "kernels":
    # This directory was found as a top-level ``kernels`` package: the repository root is on
    # sys.path (``python -m ...`` or ``python -c`` started there). The name belongs to Hugging
    # Face's ``kernels`` package, which transformers >= 5.25 requires and imports with every
    # model (``from kernels import CUDAProperties``): when it is installed, hand it over. When it
    # is not, stay what this import found: transformers <= 5.24 imports ``kernels`` to probe for
    # a version, finds none here, and goes on without hub kernels.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None and _spec.loader is not None:
        _installed = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_installed)
