"""What every benchmark shares: timing, the device's measured peaks, and writing results.

Times are medians over repetitions. On CUDA a timed call synchronises the device (CUDA events
through ``triton.testing.do_bench``). Under the Triton interpreter nothing is a measurement:
``is_measurement()`` is False and results say so.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def is_measurement() -> bool:
    """Only GPU timings are measurements; interpreter runs only prove the script works."""
    return on_gpu()


def device() -> str:
    return "cuda" if on_gpu() else "cpu"


def device_name() -> str:
    """A folder-safe name of the device: 'NVIDIA-H200', or 'cpu-interpreter'."""
    if on_gpu():
        return torch.cuda.get_device_name().replace(" ", "-")
    return "cpu-interpreter"


def time_ms(fn, warmup: int = 5, rep: int = 20) -> float:
    """Median milliseconds of ``fn()``; device-synchronised on CUDA."""
    if on_gpu():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    samples = []
    for _ in range(max(1, min(rep, 3))):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth_gbps(nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.uint8, device=device())
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def matmul_tflops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured dense bf16 matmul TFLOP/s (n x n x n)."""
    a = torch.randn(n, n, device=device(), dtype=dtype)
    b = torch.randn(n, n, device=device(), dtype=dtype)
    ms = time_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def environment() -> dict:
    """Versions, device, date and command line, stored with every result file."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name() if on_gpu() else "CPU (Triton interpreter)",
        "measurement": is_measurement(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    return env


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (floats to 3 significant digits)."""
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(name: str, rows: list[dict], columns: list[str] | None = None, extra: dict | None = None,
                  out_dir: Path | None = None) -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` under results/<device-name>/; returns the folder."""
    out = Path(out_dir) if out_dir else RESULTS / device_name()
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"benchmark": name, "environment": env, "rows": rows, **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    note = "" if env["measurement"] else "\n**Smoke run under the Triton interpreter: not a measurement.**\n"
    (out / f"{name}.md").write_text(f"# {name}\n\n{env['device']}, {env['date']}\n{note}\n" + markdown_table(rows, columns))
    return out
