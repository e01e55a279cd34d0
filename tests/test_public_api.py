"""The public API: every name in an ``__all__`` exists, and every public function or class has a
docstring (the brief: docs for every public function)."""
import importlib
import inspect

import pytest

MODULES = ["fastllama", "fastllama.ops", "fastllama.reference", "fastllama.testing", "fastllama.checkpoint",
           "fastllama.generate", "fastllama.patching", "fastllama.verification", "fastllama.attention",
           "fastllama.tokenizer", "fastllama.optable", "fastllama.model_weights"]


@pytest.mark.parametrize("name", MODULES)
def test_every_public_name_exists_and_is_documented(name):
    module = importlib.import_module(name)
    assert module.__doc__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    undocumented = [n for n in module.__all__
                    if (inspect.isfunction(obj := getattr(module, n, None)) or inspect.isclass(obj))
                    and not inspect.getdoc(obj)]
    assert not missing and not undocumented, (missing, undocumented)


def test_dir_lists_the_lazily_loaded_names():
    import fastllama

    assert set(fastllama.__all__) <= set(dir(fastllama))
