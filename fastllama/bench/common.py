"""What every benchmark shares: timing, the device's measured peaks, and the results format.

Times are medians over repetitions. On CUDA a timed call synchronises the device (CUDA events
through ``triton.testing.do_bench``). Under the Triton interpreter nothing is a measurement:
``is_measurement()`` is False and results say so.

The results format (``fastllama bench train|decode|ops|memory`` and every script in
``benchmarks/``): under ``benchmarks/results/<device-name>/``, for a benchmark called NAME,

* ``NAME.json``: ``{"benchmark", "environment" (date, command, device, versions, git commit),
  "rows" (one dict per measured configuration), ...extra}``;
* ``NAME.md``: the device, the date, a smoke-run warning off-GPU, and the rows as a table;
* ``NAME.png``: a plot of the rows (when the benchmark gives a :class:`Plot`).

``benchmarks/common.py`` re-exports this module, so the scripts there and the installed
``fastllama bench`` command write the same files.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_REPO = Path(__file__).resolve().parents[2]


def _results_root() -> Path:
    # In a checkout (editable install): the repository's benchmarks/results. Installed from a
    # wheel: benchmarks/results under the current directory.
    if (_REPO / "benchmarks" / "common.py").exists():
        return _REPO / "benchmarks" / "results"
    return Path.cwd() / "benchmarks" / "results"


RESULTS = _results_root()


def on_gpu() -> bool:
    """A CUDA device is present and the Triton interpreter is off."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


def is_measurement() -> bool:
    """Only GPU timings are measurements; interpreter runs only prove the script works."""
    return on_gpu()


def device() -> str:
    """"cuda" on a GPU, else "cpu"."""
    return "cuda" if on_gpu() else "cpu"


def device_name() -> str:
    """A folder-safe name of the device: 'NVIDIA-H200', or 'cpu-interpreter'."""
    if on_gpu():
        return torch.cuda.get_device_name().replace(" ", "-")
    return "cpu-interpreter"


# Datasheet memory bandwidth (GB/s) by device-name substring, most specific first: the roofline
# is the measured copy bandwidth (what a kernel can reach), this is the spec it falls short of.
# The first match wins. GH200 comes in an HBM3 (4.0 TB/s) and an HBM3e (4.9 TB/s) version that
# its name does not always tell apart: no datasheet figure, rather than the H200's.
SPEC_BANDWIDTH_GBPS = (("GH200", None), ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0),
                       ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0))


def spec_bandwidth_gbps() -> float | None:
    """The datasheet memory bandwidth of this GPU, if :data:`SPEC_BANDWIDTH_GBPS` knows it."""
    if not on_gpu():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in SPEC_BANDWIDTH_GBPS if key in name), None)


def results_dir(out_dir: Path | str | None = None) -> Path:
    """``out_dir`` if given, else ``$FASTLLAMA_RESULTS_DIR`` if set (``fastllama bench --out``
    sets it, so scripts called from there write to the same folder), else
    ``benchmarks/results/<device-name>/``."""
    if out_dir:
        return Path(out_dir)
    if os.environ.get("FASTLLAMA_RESULTS_DIR"):
        return Path(os.environ["FASTLLAMA_RESULTS_DIR"])
    return RESULTS / device_name()


def time_ms(fn, warmup: int = 5, rep: int = 20, grad_to_none=None) -> float:
    """Median milliseconds of ``fn()`` over about ``rep`` timed calls after ``warmup`` calls;
    device-synchronised on CUDA. ``grad_to_none``: tensors whose ``.grad`` is reset before each
    call (a timed backward must not also time the accumulation into existing gradients)."""
    if on_gpu():
        import torch
        import triton.testing

        # Triton's do_bench takes warmup and rep in MILLISECONDS (and flushes L2 between calls):
        # convert the counts with one timed call, or a 50 ms call would get a single sample. That
        # call comes after an untimed one: a first call may compile (Triton's JIT, a backward
        # compiled lazily, torch.compile recompiling under no_grad), and do_bench, which sizes its
        # own loop from the warm time, would then run rep * compile time / call time calls.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        budget_ms = 5000.0  # per measurement, whatever ``one`` says
        return float(triton.testing.do_bench(fn, warmup=min(max(1.0, warmup * one), budget_ms / 5),
                                             rep=min(max(1.0, rep * one), budget_ms),
                                             grad_to_none=grad_to_none, return_mode="median"))
    if grad_to_none:
        for t in grad_to_none:
            t.grad = None
    fn()
    samples = []
    for _ in range(max(1, min(rep, 3))):
        for t in grad_to_none or ():
            t.grad = None
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


class NewStorages(TorchDispatchMode):
    """A dispatch mode that calls ``self.created(tensor)`` for every tensor an op returns in a
    storage none of its inputs has (not a view, not an ``out=`` or in-place result).

    Custom ops (``fastllama::*``) run their implementation below the mode, so the mode is
    re-entered around them: their own allocations are seen too.
    """

    def created(self, tensor: torch.Tensor) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastllama":
            keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
            with self:
                out = func.redispatch(keys, *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        inputs = {id(x.untyped_storage()) for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for t in tree_leaves(out):
            # A storage's Python object is unique and lives exactly as long as the storage.
            if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in inputs:
                self.created(t)
        return out


class _LiveBytes(NewStorages):
    """Adds up the bytes of every new CPU storage until that storage is freed."""

    def __init__(self):
        super().__init__()
        self.held = self.peak = 0
        self.seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.held -= nbytes
        self.seen.discard(key)

    def created(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if tensor.device.type != "cpu" or key in self.seen or storage.nbytes() == 0:
            return
        self.seen.add(key)
        self.held += storage.nbytes()
        self.peak = max(self.peak, self.held)
        weakref.finalize(storage, self._freed, key, storage.nbytes())


def cpu_peak_bytes(fn) -> int:
    """Peak bytes of the CPU tensors created while ``fn()`` runs (forward and backward, custom
    ops' insides included) that were alive at the same time.

    Counts each new storage from its creation to its release (a dispatch mode; the storage's
    Python object is kept alive by torch exactly as long as the storage). Tensors only: not the
    Triton interpreter's numpy copies, not Python objects. On a CPU-only machine this is how a
    benchmark compares the memory two schedules of the same computation need: the sizes are
    the ones CUDA's allocator would be asked for.
    """
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak


def _git_commit() -> str | None:
    """HEAD's short hash, with "+dirty" when tracked files differ from it (results from a
    working tree that is not a commit, or a copied tree whose .git is stale, say so).
    ``FASTLLAMA_GIT_COMMIT`` overrides it: what a copied tree without its history really is."""
    if os.environ.get("FASTLLAMA_GIT_COMMIT"):
        return os.environ["FASTLLAMA_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        if not head:
            return None
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> str:
    """The command this process runs, as it could be typed again: ``python -m fastllama.cli
    bench ...`` for a module run (argv[0] is then the module's file path), else the program's
    name and its arguments."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        prog = f"python -m {spec.name.removesuffix('.__main__')}"
    else:
        prog = Path(sys.argv[0]).name
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def environment() -> dict:
    """Versions, device, date and command line, stored with every result file."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "device": torch.cuda.get_device_name() if on_gpu() else "CPU (Triton interpreter)",
        "measurement": is_measurement(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if on_gpu():
        env["cuda"] = torch.version.cuda
        env["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for pkg in ("transformers", "liger_kernel", "flash_attn"):
        try:
            module = __import__(pkg)
            env[pkg] = getattr(module, "__version__", "installed")
        except ImportError:
            pass
    if SCRIPT_COMMAND:
        env["script"] = SCRIPT_COMMAND
    commit = _git_commit()
    if commit:
        env["git_commit"] = commit
    return env


#: Set by ``fastllama bench ops|decode`` while it runs a script: the script's own command line
#: (``--quick`` picks the script's arguments), recorded beside the CLI's in the results.
SCRIPT_COMMAND: str | None = None


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


@dataclasses.dataclass
class Plot:
    """How to plot a benchmark's rows: ``y`` against ``x``, one line (or bar group) per value of
    ``series``, one panel per value of ``panel`` (optional; a tuple of columns: one panel per
    combination of their values). Bars when ``x`` is not numeric."""

    x: str
    y: str
    series: str
    panel: str | tuple[str, ...] | None = None
    title: str = ""
    logx: bool = False
    higher_is_better: bool = True
    where: dict = dataclasses.field(default_factory=dict)  # only rows with these values


def description(doc: str) -> str:
    """A script's ``--help`` description: the first paragraph of its module docstring, unwrapped
    (its first line alone stopped mid-sentence)."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def at_least(low: int):
    """An argparse type: an int >= ``low`` (a clear usage error, not a traceback or a run that
    measures nothing)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def exit_code(result) -> int:
    """A benchmark script's exit status from what its ``main`` returned: an int as is (130:
    interrupted by a time limit), rows: 1 when one holds an ``error``, else 0."""
    if isinstance(result, int):
        return result
    if isinstance(result, list):
        return 1 if any(isinstance(r, dict) and r.get("error") for r in result) else 0
    return 0


def pyplot(path) -> Any:
    """matplotlib.pyplot drawing to files, or None with a note when matplotlib is not installed
    (an optional dependency, the dev extra, which a GPU image may lack: tables and JSON still get
    written, and a missing plot must not cost the measurements)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib not installed: no plot {Path(path).name}", file=sys.stderr)
        return None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def write_plot(path: Path, rows: list[dict], plot: Plot, note: str = "") -> Path | None:
    """Draws ``rows`` per ``plot`` into the PNG ``path`` (None when nothing numeric to draw)."""
    plt = pyplot(path)
    if plt is None:
        return None

    rows = [r for r in rows if isinstance(r.get(plot.y), (int, float)) and not isinstance(r.get(plot.y), bool)
            and all(r.get(k) == v for k, v in plot.where.items())]
    if not rows:
        return None
    # a panel per value of plot.panel, or per combination when it names several columns
    names = (plot.panel,) if isinstance(plot.panel, str) else tuple(plot.panel or ())
    panel_of = lambda r: tuple(r.get(c) for c in names)  # noqa: E731
    panels = list(dict.fromkeys(panel_of(r) for r in rows))
    cols = min(3, len(panels))
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(5.5 * cols, 4 * n_rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        sub = [r for r in rows if panel_of(r) == panel]
        series = list(dict.fromkeys(r.get(plot.series) for r in sub))
        xs = list(dict.fromkeys(r.get(plot.x) for r in sub))
        numeric = len(xs) > 1 and all(isinstance(x, (int, float)) for x in xs)  # else bars
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            pts = [(r[plot.x], r[plot.y]) for r in sub if r.get(plot.series) == s]
            if numeric:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(s))
            else:
                ax.bar([xs.index(p[0]) + i * width for p in pts], [p[1] for p in pts], width, label=str(s))
        if not numeric:
            labels = [str(x) for x in xs]
            # long category names side by side overlap: slanted when they would not fit
            slant = sum(len(t) for t in labels) > 40
            ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(xs))], labels,
                          rotation=30 if slant else 0, ha="right" if slant else "center")
        elif plot.logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(plot.x)
        ax.set_ylabel(plot.y + (" (higher is better)" if plot.higher_is_better else " (lower is better)"))
        where = ", ".join(f"{k}={v}" for k, v in plot.where.items())
        ax.set_title(" ".join(t for t in (plot.title, *(f"{c}={v}" for c, v in zip(names, panel)), where) if t),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if note:
        # wrapped to the figure's width (about 14 characters per inch at this size): a long note
        # over one panel was cut off at both sides
        fig.suptitle(textwrap.fill(note, width=int(14 * 5.5 * cols)), fontsize=9, color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar (to stderr), or a silent stand-in where tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        class _Silent:
            def __init__(self, it=None, **_):
                self.it = it

            def __iter__(self):
                return iter(self.it)

            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Silent(iterable)
    return tqdm(iterable, file=sys.stderr, **kwargs)


def report_rows(name: str, rows: list[dict], columns: list[str], extra: dict, interrupted: bool):
    """The end of an op benchmark script: :func:`write_results`, the table and where it went
    printed; returns 130 when a time limit interrupted the sweep (gpu_check.sh's SIGINT), else the
    rows (for :func:`exit_code`)."""
    out = write_results(name, rows, columns, extra=extra | {"interrupted": interrupted})
    print(markdown_table(rows, columns))
    print(f"results in {out}" + ("" if is_measurement() else " (interpreter smoke run: NOT a measurement)"))
    return 130 if interrupted else rows


def write_results(name: str, rows: list[dict], columns: list[str] | None = None, extra: dict | None = None,
                  out_dir: Path | None = None, plot: Plot | list[Plot] | None = None,
                  note: str | None = None) -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` (and ``<name>.png`` with ``plot``; a list of plots
    writes ``<name>.png``, ``<name>-2.png`` ...) under ``out_dir`` (default
    ``benchmarks/results/<device-name>/``); returns the folder. Off-GPU the table and plots say
    "smoke run: not a measurement", unless ``note`` says what they are instead (a device-
    independent count is a measurement anywhere)."""
    out = results_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"benchmark": name, "environment": env, "rows": rows, **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    smoke = "" if env["measurement"] else "smoke run under the Triton interpreter: not a measurement"
    if note is not None:
        smoke = note
    note = f"\n**{smoke[0].upper() + smoke[1:]}.**\n" if smoke else ""
    images = []
    plots = plot if isinstance(plot, list) else [plot] if plot else []
    for i, p in enumerate(plots):
        png = out / (f"{name}.png" if i == 0 else f"{name}-{i + 1}.png")
        if write_plot(png, rows, p, note=smoke):
            images.append(f"![{name}]({png.name})\n")
    (out / f"{name}.md").write_text(f"# {name}\n\n{env['device']}, {env['date']}\n{note}\n"
                                    + markdown_table(rows, columns) + "".join("\n" + im for im in images))
    return out
