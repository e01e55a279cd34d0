"""The console script."""
import os
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
    """kernels/ ships only as fastllama.kernels (PyPI's `kernels` owns the top-level name, and
    transformers >= 5.25 installs it: a top-level `kernels`, if any, is that one).

    Run from an empty folder so the repo root (which has a kernels/ folder) is not on sys.path.
    """
    import fastllama.kernels

    ours = os.path.dirname(fastllama.kernels.__file__)
    code = ("import importlib.util, os, sys, fastllama.kernels as k; spec = importlib.util.find_spec('kernels'); "
            "print(spec is None or os.path.dirname(spec.origin) != sys.argv[1], k.__name__)")
    out = subprocess.run([sys.executable, "-c", code, ours], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "fastllama.kernels"]


@pytest.mark.parametrize("device, interpreter", [("cpu", "1"), ("cuda", None), (None, None)])
def test_generate_device_cpu_turns_the_interpreter_on_where_a_gpu_is_present(tmp_path, device, interpreter):
    """On a machine with a GPU, ``fastllama generate --device cpu`` loaded the model and then
    failed at the first kernel (Triton's GPU launchers take CUDA tensors only): the interpreter
    was only turned on where no GPU is present. A fresh process with a stand-in GPU."""
    code = f"""
import os, sys, torch
torch.cuda.is_available = lambda: True
os.environ.pop("TRITON_INTERPRET", None)
from fastllama import cli
cli.COMMANDS["generate"] = (*cli.COMMANDS["generate"][:2],
                            lambda args: print("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET"), "triton" in sys.modules) or 0)
argv = ["generate", "--checkpoint", "x", "--prompt", "y"] + (["--device", {device!r}] if {device!r} else [])
sys.exit(cli.main(argv))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TRITON_INTERPRET", str(interpreter), "False"]


def test_verify_reports_bad_config_files_as_errors(tmp_path, capsys):
    """`fastllama verify --config` with a config lacking "model_type", an unknown one, a file that
    is not JSON or no file at all: an 'error:' line and exit code 2, as `generate` gives (they
    ended in Python tracebacks)."""
    import json

    cases = {"no_type.json": json.dumps({"hidden_size": 64}), "unknown.json": json.dumps({"model_type": "nope"}),
             "broken.json": "{", "missing.json": None}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert main(["verify", "--config", str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("fastllama verify: error: ") and "Traceback" not in err, (name, err)
    (tmp_path / "no_type.json").write_text(json.dumps({"hidden_size": 64}))
    main(["verify", "--config", str(tmp_path / "no_type.json")])
    assert 'has no "model_type"' in capsys.readouterr().err
    # sizes that build no comparable input: usage errors before any model is built (a traceback,
    # exit 1 — "parity failed" — after building and patching one)
    assert main(["verify", "--checkpoint", str(tmp_path / "nowhere")]) == 2  # (not a Hub lookup)
    assert "nowhere: no such directory" in capsys.readouterr().err
    for bad in (["--batch", "0"], ["--batch", "-1"], ["--seq-len", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main(["verify", "--config", str(tmp_path / "no_type.json"), *bad])
        assert exit_.value.code == 2 and "must be >=" in capsys.readouterr().err, bad
