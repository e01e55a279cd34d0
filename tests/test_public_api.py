"""The public API: every name in an ``__all__`` exists, and every public function or class has a
docstring (the brief: docs for every public function)."""
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# The top-level kernels/ directory does not take the name ``kernels`` from the installed package
# ---------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def _import_kernels_from_repo_root(other_kernels=None):
    """``import kernels`` in a Python started in the repository root (sys.path[0] = the root, as
    for ``python -m pytest`` or ``python -m fastllama.cli`` there), with ``other_kernels`` (a
    folder holding a ``kernels`` package) next on sys.path, and no other ``kernels`` anywhere:
    prints the module's file and its ``CUDAProperties``, if any."""
    code = ("import os, sys; sys.path[:] = [''] + [p for p in sys.path if p and not os.path.exists(os.path.join(p, "
            "'kernels'))]; sys.path[1:1] = sys.argv[1:]; "
            "import kernels; print(kernels.__file__); print(getattr(kernels, 'CUDAProperties', None))")
    return subprocess.run([sys.executable, "-c", code, *([str(other_kernels)] if other_kernels else [])], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_import_kernels_from_the_repo_root_finds_the_installed_kernels_package(tmp_path):
    """transformers >= 5.25 requires Hugging Face's ``kernels`` package and imports it with every
    model (``from kernels import CUDAProperties``). From the repository root, fastllama's kernel
    source directory was found first: every transformers import failed with an ImportError."""
    hub = tmp_path / "kernels"  # stands in for the installed package
    hub.mkdir()
    (hub / "__init__.py").write_text("CUDAProperties = 'the installed kernels package'\n")
    run = _import_kernels_from_repo_root(tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(hub / "__init__.py"), "the installed kernels package"]


def test_import_kernels_from_the_repo_root_without_the_package_still_imports():
    """Without an installed ``kernels``, the import finds this directory, as before:
    transformers <= 5.24 imports ``kernels`` to probe for a version and must not fail there."""
    run = _import_kernels_from_repo_root()
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [str(REPO / "kernels" / "__init__.py"), "None"]


def test_submodules_in_the_readme_are_attributes_after_import_fastllama():
    """README's Public API reaches them as ``fastllama.<module>.<name>`` after ``import fastllama``
    (``fastllama.generate.load_tokenizer`` raised AttributeError)."""
    code = ("import fastllama; print(fastllama.generate.load_tokenizer.__name__, fastllama.reference.Llama.__name__, "
            "fastllama.testing.assert_parity.__name__, fastllama.checkpoint.__name__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["load_tokenizer", "Llama", "assert_parity", "fastllama.checkpoint"]


def test_the_models_table_is_the_codes_lists():
    """docs/models.md says, per transformers family, whether ``patch`` serves it and whether the
    Generator decodes it: the same sets as ``patching._HF_FAMILIES`` and ``_HF_CAUSAL_LMS``, each
    row naming the family's own causal LM class."""
    import transformers

    from fastllama import model_weights, patching

    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in (Path(__file__).resolve().parents[1] / "docs/models.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    patched = {family for family, _, patch, *_ in rows if patch == "yes"}
    generated = {family for family, _, _, gen, *_ in rows if gen == "yes"}
    assert patched == set(patching._HF_FAMILIES)
    assert generated == {getattr(transformers, n).__module__.split(".")[2] for n in model_weights._HF_CAUSAL_LMS}
    for family, cls, *_ in rows:
        assert getattr(transformers, cls).__module__ == f"transformers.models.{family}.modeling_{family}", cls
