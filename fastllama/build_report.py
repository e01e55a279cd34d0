"""The kernel build report: every shipped kernel config compiled for five GPU archs, no GPU needed.

The Triton interpreter checks a kernel's math, not what the GPU compiler makes of it. This module
compiles every :class:`~fastllama.optable.KernelBuild` of the op table with ``triton.compile`` for
real NVIDIA targets (PTX, then a cubin through the ptxas bundled with Triton) and reads what the
hardware would get:

- registers per thread, and spilled bytes (``LOCAL`` + ``STACK`` from ``cuobjdump
  --dump-resource-usage``: ptxas puts spills in the stack frame, so a non-zero ``STACK`` is what a
  spill looks like in practice);
- shared memory per block: Triton's dynamic allocation (``metadata.shared``) plus any static
  ``SHARED`` in the cubin, checked against the per-block opt-in limit (163 KB sm_80 (A100), 227 KB sm_90
  (H100/H200) and sm_100 (B200), 99 KB sm_86 (A10, RTX 30; it stands for sm_89: L4, RTX 40) and
  sm_120 (RTX 50): see ``ARCHS``);
- tensor-core instructions in the PTX: ``tcgen05`` (Blackwell MMA, accumulating in tensor
  memory, whose columns per block the report also reads), ``wgmma`` (Hopper warpgroup MMA),
  ``mma`` (``mma.sync``), or none. On sm_90 a ``tl.dot`` that lands on ``mma`` instead of
  ``wgmma`` leaves speed behind;
- an occupancy estimate (:func:`occupancy`), and the compile time.

Compile errors are rows of the report, never crashes. Compiles run in worker subprocesses
(fastllama/_build_worker.py, which says why) and their results are cached on disk, keyed on Triton's hash of the
kernel source (which covers the ``@triton.jit`` helpers it calls) + config + arch + Triton
version, so a rerun only compiles what changed. The CLI is ``fastllama build-report``.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import math
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from ._build_worker import RESULT_FIELDS, default_cache_dir, run_jobs, seed_cache
from .optable import SHARED_MEMORY_SM80, SHARED_MEMORY_SM86

__all__ = ["ARCHS", "Arch", "Job", "Row", "jobs_from_specs", "run_report", "occupancy", "problems",
           "format_table", "format_markdown", "report_json", "uncovered_kernels", "default_cache_dir",
           "committed_report", "seed_cache", "by_pressure", "pressure", "problem_kinds", "summary",
           "unchecked_keys", "launch_build"]


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits that bound occupancy (CUDA C Programming Guide, compute capability table)."""

    name: str
    capability: int
    shared_per_block: int  # opt-in maximum of dynamic + static shared memory per block, bytes
    shared_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # the CUDA runtime keeps 1 KB of shared memory per block
    tmem_per_sm: int = 0  # tensor-memory columns (sm_100: 512 x 128 lanes x 32 bits)


ARCHS = {
    "sm_80": Arch("sm_80", 80, shared_per_block=SHARED_MEMORY_SM80, shared_per_sm=164 * 1024),  # A100
    # A10, A40, RTX 30, standing for sm_89 too (L4, L40S, RTX 40: the same registers and shared
    # memory in every build compiled for both): 99 KB per block, 48 warps and 16 blocks per SM.
    "sm_86": Arch("sm_86", 86, shared_per_block=SHARED_MEMORY_SM86, shared_per_sm=100 * 1024, max_warps_per_sm=48,
                  max_blocks_per_sm=16),
    "sm_90": Arch("sm_90", 90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),  # H100/H200
    "sm_100": Arch("sm_100", 100, shared_per_block=227 * 1024, shared_per_sm=228 * 1024, tmem_per_sm=512),  # B200
    # RTX 50: 99 KB per block like sm_86, but ptxas adds 1 KB of static shared memory to a kernel
    # that uses any and allocates registers differently (tiles that fit sm_86 spill here)
    "sm_120": Arch("sm_120", 120, shared_per_block=SHARED_MEMORY_SM86, shared_per_sm=100 * 1024, max_warps_per_sm=48,
                   max_blocks_per_sm=32),
}


def occupancy(arch: Arch, regs: int, shared: int, num_warps: int, tmem: int = 0) -> tuple[int, str]:
    """Resident warps per SM and what limits them ("registers", "shared", "warps", "blocks" or
    "tmem").

    blocks/SM = min(max_warps_per_sm // num_warps,                           (thread slots)
                    max_blocks_per_sm,                                       (block slots)
                    (regs_per_sm // regs_per_warp) // num_warps,             (register file)
                    shared_per_sm // (shared + reserved_shared_per_block),   (shared memory)
                    tmem_per_sm // tmem)                                     (tensor memory, sm_100)
    with regs_per_warp = 32 * regs rounded up to the allocation unit of 256 registers per warp,
    and warps/SM = blocks/SM * num_warps. 0 means the block cannot launch at all. It is the CUDA
    occupancy calculator's estimate; it ignores the L1/shared carve-out the driver picks.
    """
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {
        "warps": arch.max_warps_per_sm // num_warps,
        "blocks": arch.max_blocks_per_sm,
        "registers": (arch.regs_per_sm // regs_per_warp) // num_warps,
        "shared": arch.shared_per_sm // (shared + arch.reserved_shared_per_block),
    }
    if tmem:
        limits["tmem"] = arch.tmem_per_sm // tmem
    limiter = min(limits, key=limits.get)
    return limits[limiter] * num_warps, limiter


# ---------------------------------------------------------------------------------------------
# What to compile: jobs, from the op table
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Job:
    """One KernelBuild on one arch, in a form a worker process can rebuild (names, not objects)."""

    op: str
    module: str  # the kernel's module, imported by name in the worker ...
    file: str  # ... or loaded from this file when the name does not import there (test kernels)
    qualname: str
    signature: dict
    constexprs: dict  # JSON-encoded values (see _encode)
    num_warps: int
    num_stages: int
    label: str
    arch: str

    @property
    def kernel(self) -> str:
        return f"{self.module.removeprefix('fastllama.kernels.')}.{self.qualname}"

    @property
    def config(self) -> str:
        """Constexprs, pointer element types, warps and stages, e.g. "BLOCK=1024 *bf16 w4 s3"."""
        parts = [f"{k}={_display(v)}" for k, v in self.constexprs.items()]
        parts.append("/".join(sorted({t.split(":")[0] for t in self.signature.values() if t.startswith("*")})))
        aligned = [n for n, t in self.signature.items() if not t.startswith("*") and t.endswith(":16")]
        if aligned:
            parts.append(f"{len(aligned)} ints %16")
        parts.append(f"w{self.num_warps} s{self.num_stages}")
        return " ".join(p for p in parts if p)


def _python_function(kernel: Any):
    """The plain Python function under a JITFunction / InterpretedFunction / Autotuner / Heuristics."""
    obj = kernel
    while not inspect.isfunction(obj):
        if not hasattr(obj, "fn"):
            raise TypeError(f"{kernel!r} is not a @triton.jit kernel")
        obj = obj.fn
    return obj


def _encode(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        return _encode(value.value)
    if isinstance(value, tl.dtype):
        return {"tl.dtype": str(value)}
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} is not supported "
                    "by the build report (use bool, int, float, str, None or a tl.dtype)")


def _display(value: Any) -> str:
    return value["tl.dtype"] if isinstance(value, dict) and "tl.dtype" in value else str(value)


def jobs_from_builds(op: str, builds: Iterable, archs: Iterable[str]) -> list[Job]:
    """Jobs for ``builds`` (KernelBuild-like objects) of ``op`` on every arch in ``archs``."""
    jobs = []
    for b in builds:
        fn = _python_function(b.kernel)
        for arch in archs:
            if getattr(b, "archs", None) is not None and arch not in b.archs:
                continue
            jobs.append(Job(op=op, module=fn.__module__, file=inspect.getsourcefile(fn) or "",
                            qualname=fn.__qualname__, signature=dict(b.signature),
                            constexprs={k: _encode(v) for k, v in b.constexprs.items()},
                            num_warps=b.num_warps, num_stages=b.num_stages, label=b.label, arch=arch))
    return jobs


def jobs_from_specs(archs: Iterable[str], specs=None) -> tuple[list[Job], list[Row]]:
    """Jobs for every build config of every op spec (default: the whole op table).

    Returns ``(jobs, error_rows)``: a ``build_configs`` that raises becomes an error row. The same
    build listed by two ops is compiled once, under both names ("op_a+op_b").
    """
    if specs is None:
        from . import optable

        specs = optable.all_specs()
    archs = list(archs)
    by_identity: dict[str, Job] = {}
    errors: list[Row] = []
    for spec in specs:
        if spec.build_configs is None:
            continue
        try:
            jobs = jobs_from_builds(spec.name, spec.build_configs(), archs)
        except Exception as e:  # noqa: BLE001 - a broken table entry is a report row
            errors += [Row(op=spec.name, kernel="(build_configs)", label="", config="", arch=a, num_warps=0,
                           error=f"{type(e).__name__}: {e}") for a in archs]
            continue
        for job in jobs:
            ident = json.dumps([job.module, job.qualname, job.signature, job.constexprs, job.num_warps,
                                job.num_stages, job.arch], sort_keys=True)
            if ident in by_identity:
                seen = by_identity[ident]
                if spec.name not in seen.op.split("+"):
                    by_identity[ident] = dataclasses.replace(seen, op=f"{seen.op}+{spec.name}")
            else:
                by_identity[ident] = job
    return list(by_identity.values()), errors


def pressure(job: Job) -> float:
    """A rough per-thread demand of a config, to order compiles when time is short: the product of
    its integer constexprs (tile sizes, head dim) x the widest pointer element in bytes x
    num_stages / num_warps. Only an ordering heuristic; the report itself measures."""
    tile = math.prod(v for v in job.constexprs.values() if type(v) is int and v > 1)
    width = max((_ELEM_BYTES.get(t.lstrip("*").split(":")[0], 4) for t in job.signature.values() if t.startswith("*")),
                default=4)
    return tile * width * job.num_stages / job.num_warps


_ELEM_BYTES = {"fp64": 8, "i64": 8, "u64": 8, "fp32": 4, "i32": 4, "u32": 4, "fp16": 2, "bf16": 2, "i16": 2,
               "i8": 1, "u8": 1, "i1": 1}


def by_pressure(jobs: list[Job]) -> list[Job]:
    """``jobs`` reordered so that every (kernel, arch) comes up early with its most demanding
    configs first (groups interleaved round-robin): a time budget then checks the likeliest
    spills and shared-memory overflows of every kernel before the rest. Twins that differ only in
    pointer types of the same width (fp16 / bf16) go after every config without a twin so far:
    they compile to nearly the same code, so new shapes are worth more when time is short."""
    groups: dict[tuple, list[Job]] = {}
    for j in jobs:
        groups.setdefault((j.kernel, j.arch), []).append(j)
    ranked = []
    for group in groups.values():
        seen: dict[str, int] = {}
        keyed = []
        for j in sorted(group, key=pressure, reverse=True):
            shape = json.dumps([j.constexprs, j.num_warps, j.num_stages,
                                sorted(_ELEM_BYTES.get(t.lstrip("*").split(":")[0], 4) for t in j.signature.values())])
            seen[shape] = seen.get(shape, -1) + 1
            keyed.append((seen[shape], -pressure(j), j))
        ranked.append([j for *_, j in sorted(keyed, key=lambda t: t[:2])])
    return [g[i] for i in range(max(map(len, ranked), default=0)) for g in ranked if i < len(g)]


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    """One (kernel, config, arch) of the report. ``error`` is set when it did not compile."""

    op: str
    kernel: str
    label: str
    config: str
    arch: str
    num_warps: int
    error: str | None = None
    regs: int | None = None
    stack: int | None = None  # bytes per thread; ptxas reports spills here
    local: int | None = None  # bytes per thread of local memory
    shared: int | None = None  # bytes per block, dynamic (Triton) + static (cubin)
    spill_stores: int | None = None  # ptxas -v "bytes spill stores" (the part of STACK that is spills)
    tensor_cores: str = ""  # "tcgen05" (sm_100), "wgmma" (sm_90), "mma" or "-"
    tmem: int | None = None  # tensor-memory columns per block (sm_100's MMA accumulators)
    perf_warnings: list | None = None  # ptxas's "Potential Performance Loss" advisories ("C7515 ...")
    compile_s: float | None = None  # of the compile that produced the row (cached rows keep it)
    cached: bool = False
    key: str | None = None
    skipped: bool = False  # not in the cache and not compiled (time budget, or skipped on purpose)
    warps_per_sm: int | None = None
    occupancy_limit: str | None = None

    @property
    def spill(self) -> int | None:
        return None if self.error or self.skipped else (self.local or 0) + (self.stack or 0)

    @property
    def serialized(self) -> bool:
        """ptxas serialized the warpgroup MMAs (C7515): each waits for the one before."""
        return any(w.startswith("C7515") for w in self.perf_warnings or ())


def _row(job: Job, result: dict) -> Row:
    row = Row(op=job.op, kernel=job.kernel, label=job.label, config=job.config, arch=job.arch,
              num_warps=job.num_warps, **{k: v for k, v in result.items() if k in RESULT_FIELDS})
    if row.error is None and row.regs is not None:
        row.warps_per_sm, row.occupancy_limit = occupancy(ARCHS[job.arch], row.regs, row.shared or 0, job.num_warps,
                                                          row.tmem or 0)
    return row


def problems(rows: Iterable[Row]) -> list[str]:
    """What makes a config unfit to ship: a compile error, any spill, shared memory over the
    arch's per-block limit, a block that cannot be resident at all, or Hopper tensor-core ops
    that ptxas serialized (C7515: a tile that cannot overlap its own matmuls). One line each."""
    return [f"{r.kernel} [{r.label or r.config}] on {r.arch}: {kind}{detail}" for r in rows
            for kind, detail in _row_problems(r)]


def problem_kinds(rows: Iterable[Row]) -> set[str]:
    """The problems as "kernel on arch: kind" (kind: compile error, spills, shared memory,
    cannot launch, wgmma serialized), coarse enough to list as known while configs are being fixed."""
    return {f"{r.kernel} on {r.arch}: {kind}" for r in rows for kind, _ in _row_problems(r)}


def _row_problems(r: Row) -> list[tuple[str, str]]:
    if r.skipped:
        return []
    if r.error:
        return [("compile error", f": {r.error}")]
    out = []
    limit = ARCHS[r.arch].shared_per_block
    if r.spill:
        out.append(("spills", f" {r.spill} bytes per thread (LOCAL {r.local}, STACK {r.stack}; ptxas: "
                              f"{r.spill_stores} bytes spill stores)"))
    if (r.shared or 0) > limit:
        out.append(("shared memory", f" {r.shared} B > {limit} B per block ({limit // 1024} KB)"))
    if r.serialized:
        out.append(("wgmma serialized", ": ptxas C7515, every warpgroup MMA waits for the one before"))
    if r.warps_per_sm == 0:
        out.append(("cannot launch", f": {r.regs} registers x {r.num_warps} warps, {r.shared} B of shared "
                                     f"memory or {r.tmem or 0} tensor-memory columns exceed one SM "
                                     f"(limit: {r.occupancy_limit})"))
    return out


_COLUMNS = ["op", "kernel", "config", "arch", "regs", "spill B", "smem KB", "warps/SM", "limit", "TC",
            "compile s", "status"]


def _cells(r: Row) -> list[str]:
    config = f"{r.label}: {r.config}" if r.label else r.config
    if r.skipped:
        return [r.op, r.kernel, config, r.arch] + [""] * 7 + ["not compiled (time budget)"]
    if r.error:
        lines = [l.strip() for l in r.error.splitlines() if l.strip()] or ["error"]
        # A CompilationError puts the source excerpt first and the reason last: show type + reason.
        summary = lines[0] if len(lines) == 1 else f"{lines[0].split(':')[0]}: {lines[-1]}"
        return [r.op, r.kernel, config, r.arch, "", "", "", "", "", "", _secs(r), f"ERROR {summary[:80]}"]
    status = "ok"
    if r.spill:
        status = "SPILLS"
    if (r.shared or 0) > ARCHS[r.arch].shared_per_block or r.warps_per_sm == 0:
        status = "TOO BIG" if status == "ok" else status + ", TOO BIG"
    if r.serialized:
        status = "SERIALIZED" if status == "ok" else status + ", SERIALIZED"
    occ = f"{r.warps_per_sm} ({100 * r.warps_per_sm // ARCHS[r.arch].max_warps_per_sm}%)"
    return [r.op, r.kernel, config, r.arch, str(r.regs), str(r.spill), f"{(r.shared or 0) / 1024:.1f}", occ,
            r.occupancy_limit or "", r.tensor_cores, _secs(r), status]


def _secs(r: Row) -> str:
    return "" if r.compile_s is None else f"{r.compile_s:.2f}" + ("*" if r.cached else "")


def format_table(rows: list[Row]) -> str:
    """A fixed-width text table (``*`` after a compile time: taken from the cache)."""
    return _fixed_width([_COLUMNS] + [_cells(r) for r in rows])


def format_markdown(rows: list[Row]) -> str:
    """The same table as Markdown."""
    return _markdown([_COLUMNS] + [_cells(r) for r in rows])


def summary(rows: list[Row]) -> list[list[str]]:
    """Per kernel and arch: builds, how many compiled, problems by kind, register and shared
    memory ranges, fewest warps per SM, tensor-core instructions seen. First line: the header."""
    out = [["kernel", "arch", "builds", "compiled", "spill", "too big", "error", "serialized", "regs", "smem KB max",
            "warps/SM min", "TC"]]
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    for (kernel, arch), g in groups.items():
        ok = [r for r in g if not r.skipped and not r.error]
        big = sum(1 for r in ok if (r.shared or 0) > ARCHS[arch].shared_per_block or r.warps_per_sm == 0)
        regs = sorted(r.regs for r in ok if r.regs is not None)
        out.append([kernel, arch, str(len(g)), str(sum(not r.skipped for r in g)), str(sum(bool(r.spill) for r in ok)),
                    str(big), str(sum(bool(r.error) for r in g)), str(sum(r.serialized for r in ok)),
                    f"{regs[0]}-{regs[-1]}" if regs else "",
                    f"{max((r.shared or 0) for r in ok) / 1024:.1f}" if ok else "",
                    str(min(r.warps_per_sm for r in ok if r.warps_per_sm is not None)) if ok else "",
                    "/".join(sorted({r.tensor_cores for r in ok} - {"-"})) or "-"])
    return out


def _fixed_width(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def _markdown(lines: list[list[str]]) -> str:
    rows = ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines]
    return "\n".join(rows[:1] + ["|" + "---|" * len(lines[0])] + rows[1:])


def report_json(rows: list[Row], uncovered: dict | None = None) -> dict:
    """Rows, problems, uncovered kernels and the toolchain, as one JSON-able dict."""
    import triton

    return {"triton": triton.__version__,
            "archs": {n: dataclasses.asdict(a) for n, a in ARCHS.items()},
            "rows": [dataclasses.asdict(r) | {"spill": r.spill} for r in rows],
            "problems": problems(rows) + [f"{m}: no build config for {', '.join(k)}"
                                          for m, k in (uncovered or {}).items()],
            "uncovered": uncovered or {}}


# ---------------------------------------------------------------------------------------------
# Coverage: every kernel in kernels/ must be in the op table
# ---------------------------------------------------------------------------------------------
def launched_kernels(module, helpers: Iterable[str] = ()) -> list[str]:
    """Function names of the @triton.jit kernels of ``module`` that need a build config.

    A kernel is one the module launches (``name[grid](...)``) or a jit function that no jit
    function calls; jit functions only called from other jit functions (of this module, or named
    in ``helpers``: called from other modules) are device helpers and compile inside their callers.
    """
    jit, launched, called = _jit_calls(module)
    # An autotuned alias (`_k_tuned = triton.autotune(...)(_k)`) is reported as the function it wraps
    # (fastllama's own ArchAutotuner objects are not jit objects: their kernels are launched directly too).
    return sorted({_python_function(getattr(module, n)).__qualname__ for n in jit
                   if n in launched or n not in called | set(helpers)})


def _jit_calls(module) -> tuple[set[str], set[str], set[str]]:
    """(jit functions defined in ``module``, names it launches, names its jit functions call)."""
    jit = {name for name, obj in vars(module).items() if _is_jit(obj) and
           getattr(_python_function(obj), "__module__", None) == module.__name__}
    launched, called = set(), set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) and isinstance(node.func.value, ast.Name):
            launched.add(node.func.value.id)
        if isinstance(node, ast.FunctionDef) and node.name in jit:
            called |= {c.func.id if isinstance(c.func, ast.Name) else c.func.attr for c in ast.walk(node)
                       if isinstance(c, ast.Call) and isinstance(c.func, (ast.Name, ast.Attribute))
                       and getattr(c.func, "id", None) != node.name}
    return jit, launched, called


def _is_jit(obj: Any) -> bool:
    from triton.runtime.jit import KernelInterface

    return isinstance(obj, KernelInterface)


def kernel_modules() -> list[str]:
    """Every module of ``fastllama.kernels`` (one per op)."""
    from . import kernels

    return [f"fastllama.kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__) if not m.name.startswith("_")]


def uncovered_kernels(jobs: Iterable[Job], modules: Iterable[str] | None = None) -> dict[str, list[str]]:
    """{module: [kernel names]} of launched kernels that no job (no op-table build config) covers."""
    covered = {(j.module, j.qualname) for j in jobs}
    mods = [importlib.import_module(name) for name in (kernel_modules() if modules is None else modules)]
    helpers = set().union(*(_jit_calls(m)[2] for m in mods))  # e.g. `_fwd.load_rows(...)` from another file
    out = {}
    for mod in mods:
        name = mod.__name__
        missing = [k for k in launched_kernels(mod, helpers) if (name, k) not in covered]
        if missing:
            out[name] = missing
    return out


# ---------------------------------------------------------------------------------------------
# What a launch compiles: the build a kernel[grid](...) call would get on a GPU
# ---------------------------------------------------------------------------------------------
def launch_build(kernel: Any, args: tuple, kwargs: dict):
    """The :class:`~fastllama.optable.KernelBuild` that ``kernel[grid](*args, **kwargs)`` compiles
    on a GPU, worked out on any machine (the tensors may be CPU tensors; nothing runs).

    Triton specialises each argument at launch with its own rule (``native_specialize_impl``,
    used here): an integer equal to 1 becomes a constant (``"constexpr"``, value in
    ``constexprs``), a multiple of 16 gets a divisibility hint (``"i32:16"``), unless the kernel
    lists it in ``do_not_specialize`` (neither) or ``do_not_specialize_on_alignment`` (no hint).
    A tensor whose address is not 16-byte aligned gets the type ``"*T unaligned"``, which no
    build config has (the report compiles pointers aligned).
    Comparing the result with an op's ``build_configs()`` tells whether the report compiled what
    the launch runs.
    """
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import native_specialize_impl

    from .optable import KernelBuild

    fn = _python_function(kernel)
    sig = inspect.signature(fn)
    params = sig.parameters
    options = {k: v for k, v in kwargs.items() if k not in params}
    if set(options) - {"num_warps", "num_stages"}:
        raise TypeError(f"launch_build: launch options {sorted(set(options) - {'num_warps', 'num_stages'})} "
                        "have no place in a KernelBuild (only num_warps and num_stages)")
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    bound.apply_defaults()
    jit = kernel  # under @triton.autotune / @triton.heuristics wrappers: the jit object itself
    while not hasattr(jit, "do_not_specialize") and not hasattr(jit, "kwargs") and hasattr(jit, "fn"):
        jit = jit.fn

    def arg_names(option: str) -> set[str]:  # the kernel's do_not_specialize(_on_alignment) list
        names = jit.kwargs.get(option) if hasattr(jit, "kwargs") else getattr(jit, option, None)
        return {fn.__code__.co_varnames[n] if isinstance(n, int) else n for n in names or ()}

    unspecialised, unaligned = arg_names("do_not_specialize"), arg_names("do_not_specialize_on_alignment")
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):  # a string under `from __future__ import annotations`
            constexprs[name] = value.value if hasattr(value, "value") else value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, name not in unspecialised,
                                            name not in unaligned)
        if kind == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
        elif kind.startswith("*"):
            signature[name] = kind if spec == "D" else f"{kind} unaligned"
        else:
            signature[name] = f"{kind}:16" if spec == "D" else kind
    return KernelBuild(kernel, signature, constexprs, num_warps=options.get("num_warps", 4),
                       num_stages=options.get("num_stages", 3))  # the NVIDIA backend's defaults


# ---------------------------------------------------------------------------------------------
# Running the compiles (fastllama/_build_worker.py)
# ---------------------------------------------------------------------------------------------
def committed_report() -> Path | None:
    """``benchmarks/results/build/report.json`` of the checkout fastllama runs from, if any."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "build" / "report.json"
    return path if path.is_file() else None


def unchecked_keys(report_path: Path | None) -> set[str]:
    """Keys of the builds a saved report lists as not compiled (its time budget ran out).

    CI passes them as ``skip_keys``: its time budget then goes to kernels changed since the report
    was made instead of to configs the report already names as unchecked (a full run, without a
    budget, checks those).
    """
    if report_path is None:
        return set()
    rows = json.loads(Path(report_path).read_text()).get("rows", [])
    return {r["key"] for r in rows if r.get("skipped") and r.get("key")}


def run_report(jobs: list[Job], cache_dir: Path | None = None, use_cache: bool = True,
               workers: int | None = None, timeout_s: float = 600.0, seed: Path | None = None,
               budget_s: float | None = None, skip_keys: Iterable[str] = ()) -> list[Row]:
    """Compiles ``jobs`` (cache first) in worker processes; one :class:`Row` per job, in order.

    ``seed``: a saved report.json whose rows join the cache first (see :func:`seed_cache`).
    ``budget_s``: after this many seconds, jobs not in the cache are not compiled but come back
    as ``skipped`` rows (CI uses it with :func:`by_pressure` order; None compiles everything).
    ``workers``: parallel compile processes (default: half the cores, at most 4).
    ``skip_keys``: cache keys not to compile (they come back skipped unless cached); see
    :func:`unchecked_keys`.

    A worker that dies (a compiler crash) or exceeds ``timeout_s`` on one job turns that job into
    an error row and a fresh worker takes the rest.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    if seed is not None and use_cache:
        seed_cache(seed, cache_dir)
    results = run_jobs([dataclasses.asdict(j) for j in jobs], cache_dir, use_cache=use_cache, workers=workers,
                       timeout_s=timeout_s, budget_s=budget_s, skip_keys=set(skip_keys))
    return [_row(j, r) for j, r in zip(jobs, results)]


# ---------------------------------------------------------------------------------------------
# CLI: fastllama build-report (registered in fastllama/cli.py)
# ---------------------------------------------------------------------------------------------
def cli_add_arguments(p) -> None:
    p.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated targets (default: {','.join(ARCHS)})")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.add_argument("--op", action="append", default=None, help="only this op (repeatable)")
    p.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: cores / 2, max 4)")
    p.add_argument("--no-cache", action="store_true", help="recompile everything (the cache is still refreshed)")
    p.add_argument("--cache-dir", default=None, help=f"compile cache (default: {default_cache_dir()})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of compiling; then configs not in the cache are listed as not compiled "
                        "(most demanding configs of each kernel go first). Default: compile everything")
    p.add_argument("--output", default=None, help="also write report.md and report.json into this folder")


def cli_run(args) -> int:
    """Compiles every op-table build config; prints the table (or JSON); exit 1 on any problem."""
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown or not archs:
        print(f"--arch: unknown {unknown or archs}; accepted: {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    from . import optable

    specs = optable.all_specs()
    if args.op:
        missing = sorted(set(args.op) - {s.name for s in specs})
        if missing:
            print(f"--op: no op named {missing}; known: {[s.name for s in specs]}", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.name in args.op]
    # the folders first: a path that cannot be one is found before hours of compiling, not after
    for flag, folder in (("--output", args.output), ("--cache-dir", args.cache_dir)):
        try:
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"{flag}: cannot make the folder {folder}: {e}", file=sys.stderr)
            return 2
    jobs, error_rows = jobs_from_specs(archs, specs)
    # With a budget, compile the likeliest problems first; the table keeps the op-table order.
    order = by_pressure(jobs) if args.budget is not None else jobs
    t0 = time.perf_counter()
    done = dict(zip(map(id, order), run_report(order, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                               workers=args.jobs, seed=committed_report(), budget_s=args.budget)))
    rows = error_rows + [done[id(j)] for j in jobs]
    wall = time.perf_counter() - t0
    uncovered = {} if args.op else uncovered_kernels(jobs)
    data = report_json(rows, uncovered)
    if args.output:
        out = Path(args.output)
        (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
        (out / "report.md").write_text(_markdown_report(rows, data, archs))
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(format_table(rows) if rows else "(no kernel build configs in the op table yet)")
        if rows:
            print("\n" + _fixed_width(summary(rows)))
        print(f"\n{len(rows)} rows, {sum(not r.cached and r.compile_s is not None for r in rows)} compiled, "
              f"{sum(r.cached for r in rows)} from the cache ({args.cache_dir or default_cache_dir()}), "
              f"{wall:.1f} s. * = compile time of the cached compile.")
        skipped = sum(r.skipped for r in rows)
        if skipped:
            print(f"{skipped} configs not compiled: the --budget ran out (run without --budget to cover them)")
        for p in data["problems"]:
            print("PROBLEM:", _first_lines(p))
    return 1 if data["problems"] else 0


def _first_lines(text: str, n: int = 12) -> str:
    lines = text.splitlines()
    return "\n".join(lines[:n] + ([f"... ({len(lines) - n} more lines)"] if len(lines) > n else []))


def _markdown_report(rows: list[Row], data: dict, archs: list[str]) -> str:
    limits = ", ".join(f"{a} {ARCHS[a].shared_per_block // 1024} KB" for a in archs)
    command = " ".join(["fastllama"] + sys.argv[1:]) if sys.argv[1:2] == ["build-report"] else "fastllama build-report"
    skipped = sum(r.skipped for r in rows)
    text = [f"# Kernel build report ({', '.join(archs)})", "",
            f"Made by `{command}` with Triton {data['triton']} (bundled ptxas), no GPU. Shared memory limits "
            f"per block: {limits}. How to read it: [README.md](README.md).", "",
            f"{len(rows)} builds, {len(data['problems'])} problems"
            + (f", {skipped} not compiled (time budget)." if skipped else "."), ""]
    if rows:
        text += ["## Summary per kernel", "", _markdown(summary(rows)), "", "## Every build", "", format_markdown(rows), ""]
    else:
        text += ["(no kernel build configs in the op table yet)", ""]
    text += ["## Problems", ""] + ([f"- {_first_lines(p, 1)}" for p in data["problems"]] or ["none"]) + [""]
    return "\n".join(text)


cli_run.add_arguments = cli_add_arguments
