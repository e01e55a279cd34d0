"""The console script."""
import subprocess
import sys

import pytest

from fastllama import __version__
from fastllama.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastllama {__version__}"


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "parity" in out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fastllama.cli", "--help"], capture_output=True, text=True, check=True)
    assert "usage: fastllama" in out.stdout


def test_no_top_level_kernels_package(tmp_path):
    """kernels/ ships only as fastllama.kernels (PyPI's `kernels` owns the top-level name).

    Run from an empty folder so the repo root (which has a kernels/ folder) is not on sys.path.
    """
    code = ("import importlib.util, fastllama.kernels as k; "
            "print(importlib.util.find_spec('kernels') is None, k.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "fastllama.kernels"]
