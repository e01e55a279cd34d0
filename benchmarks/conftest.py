"""pytest setup for the benchmark tests: the same as the test suite's.

``pytest benchmarks --benchmark-only`` runs on CUDA when present, else on the CPU under the
Triton interpreter. tests/conftest.py decides that (``TRITON_INTERPRET=1`` before triton is
imported) and installs the interpreter's bf16 ``tl.dot`` shim; it is loaded here, not copied.
``pytest tests`` (CI) never collects this folder (``testpaths = ["tests"]``).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "fastllama_tests_conftest", Path(__file__).resolve().parent.parent / "tests" / "conftest.py")
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)  # switches the interpreter on (no GPU) + the bf16 shim

INTERPRETER = _tests_conftest.INTERPRETER
DEVICE = _tests_conftest.DEVICE
device = _tests_conftest.device  # the fixture
pytest_collection_modifyitems = _tests_conftest.pytest_collection_modifyitems
pytest_report_header = _tests_conftest.pytest_report_header


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's JSON gets the results files' environment: GPU name, torch, triton and
    transformers versions, commit (its own machine info has none of these)."""
    from fastllama.bench.common import environment

    machine_info["fastllama_environment"] = environment()
