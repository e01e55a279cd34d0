"""Triton kernels, one op per file, each with a plain launcher (tensors in, tensors out).

Installed as ``fastllama.kernels``. Modules here import torch and triton only, nothing of
fastllama; validation and autograd live in ``fastllama.ops``.
"""
if __name__ == "kernels":
    # This directory was found as a top-level ``kernels`` package: the repository root is on
    # sys.path (``python -m ...`` or ``python -c`` started there). The name belongs to Hugging
    # Face's ``kernels`` package, which transformers >= 5.25 requires and imports
    # (``from kernels import CUDAProperties``): hand over the installed one, or fail as a plain
    # ``import kernels`` would without this directory in the way.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named 'kernels' ({os.path.dirname(__file__)} is fastllama's kernel "
                                  "source, imported as fastllama.kernels)", name="kernels")
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed  # the import statement returns what sys.modules holds
    _spec.loader.exec_module(_installed)
