"""What every benchmark shares: timing, the device's measured peaks, and writing results.

The implementation lives in the package, :mod:`fastllama.bench.common`, so that the installed
``fastllama bench`` command and the scripts here write the same results format (JSON with the
environment, a markdown table, PNG plots under ``benchmarks/results/<device-name>/``). See that
module for the format.
"""
from __future__ import annotations

from fastllama.bench.common import (  # noqa: F401
    RESULTS,
    at_least,
    description,
    Plot,
    copy_bandwidth_gbps,
    cpu_peak_bytes,
    device,
    device_name,
    environment,
    exit_code,
    is_measurement,
    markdown_table,
    matmul_tflops,
    on_gpu,
    pyplot,
    report_rows,
    results_dir,
    spec_bandwidth_gbps,
    time_ms,
    write_plot,
    write_results,
)
