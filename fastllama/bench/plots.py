"""Plots for result files that came without one.

The op and decode scripts in ``benchmarks/`` write JSON and markdown through
:func:`fastllama.bench.common.write_results`; those that draw no PNG themselves get one here,
from :data:`KNOWN` (how to plot each benchmark's rows) or, for a benchmark not listed, from a
guess at its x / y / series columns.
"""
from __future__ import annotations

import json
from pathlib import Path

from .common import Plot, write_plot

KNOWN: dict[str, list[Plot]] = {
    "norm_rope_swiglu": [
        Plot(x="tokens", y="GB/s", series="method", panel="op", where={"pass": "fwd"}, logx=True, title="forward"),
        Plot(x="tokens", y="GB/s", series="method", panel="op", where={"pass": "fwd+bwd"}, logx=True,
             title="forward+backward"),
    ],
    "cross_entropy": [
        Plot(x="tokens", y="ms", series="method", logx=True, higher_is_better=False, title="fwd+bwd time"),
        Plot(x="tokens", y="peak_GiB", series="method", logx=True, higher_is_better=False, title="peak memory"),
    ],
    "decode": [Plot(x="batch", y="tokens/s", series="impl", panel=("model", "context"), logx=True, title="decoding")],
    "moe_experts": [
        Plot(x="tokens", y="ms", series="method", where={"pass": p}, logx=True, higher_is_better=False, title=p)
        for p in ("fwd", "fwd+bwd")
    ],
    "bench_attention_tuning": [],  # every autotune candidate's time: a table to tune from, no plot
}

_X = ("tokens", "seq_len", "T", "seqlen", "batch", "context", "preset")
_Y = ("tokens/s", "tflops", "TFLOP/s", "GB/s", "ms")
_SERIES = ("method", "impl", "provider", "config", "mode")


def guess(rows: list[dict]) -> Plot | None:
    """A plot for rows of an unknown benchmark: the first known x, y and series columns."""
    if not rows:
        return None
    keys = set().union(*rows)
    pick = lambda options: next((k for k in options if k in keys), None)  # noqa: E731
    x, y, series = pick(_X), pick(_Y), pick(_SERIES)
    if not (x and y and series):
        return None
    return Plot(x=x, y=y, series=series, higher_is_better=y != "ms")


def plot_missing(folder: Path) -> list[Path]:
    """Writes ``NAME.png`` for every ``NAME.json`` in ``folder`` that has no PNG yet, or only
    one older than the JSON (a run that rewrote the results: its plot must show them too)."""
    written = []
    for js in sorted(Path(folder).glob("*.json")):
        png = js.with_suffix(".png")
        if png.exists() and png.stat().st_mtime_ns >= js.stat().st_mtime_ns:
            continue
        try:
            data = json.loads(js.read_text())
        except (OSError, ValueError):
            continue
        rows = data.get("rows") or []
        name = data.get("benchmark", js.stem)
        plots = KNOWN[name] if name in KNOWN else [p for p in [guess(rows)] if p]
        smoke = "" if data.get("environment", {}).get("measurement") else \
            "smoke run under the Triton interpreter: not a measurement"
        for i, plot in enumerate(plots):
            png = js.with_suffix(".png") if i == 0 else js.with_name(f"{js.stem}-{i + 1}.png")
            if write_plot(png, rows, plot, note=smoke):
                written.append(png)
        if written and js.with_suffix(".md").exists():
            md = js.with_suffix(".md")
            text = md.read_text()
            for png in written:
                if png.parent == js.parent and png.name.startswith(js.stem) and png.name not in text:
                    text += f"\n![{js.stem}]({png.name})\n"
            md.write_text(text)
    return written
