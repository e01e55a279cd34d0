"""Compiling build-report jobs: worker processes, the on-disk cache, reading the cubin.

:mod:`fastllama.build_report` describes the jobs and reads the results; this module runs them.
Each compile happens in a worker subprocess (``python -m fastllama._build_worker``; see
:func:`_spawn_env` for why), which checks the cache, calls ``triton.compile`` for the target and
reads the cubin with the bundled cuobjdump. A job is a JSON dict (``build_report.Job`` as a
dict); a result is a JSON dict with the fields of ``build_report.Row`` it fills.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = 2  # bump when what a cached result holds changes (a field only new archs fill need not)

# The fields of a result (and of a cached entry, less "cached").
RESULT_FIELDS = {"error", "regs", "stack", "local", "shared", "spill_stores", "tensor_cores", "tmem", "compile_s",
                 "cached", "key", "skipped", "perf_warnings"}

# ptxas's "Potential Performance Loss" advisories, e.g. "(C7515) ... wgmma.mma_async instructions
# are serialized due to non wgmma instructions defining accumulator registers of a wgmma between
# start and end of the pipeline stage": each Hopper tensor-core op then waits for the previous
# one (an arrive/wait pair per instruction instead of two per loop iteration).
_PERF_WARNING = re.compile(r"\((C\d+)\) Potential Performance Loss: ([^\n]*?)(?: in the function|$)", re.M)


# ---------------------------------------------------------------------------------------------
# The parent side: cache location, seeding, worker processes
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$FASTLLAMA_BUILD_CACHE``, else ``$XDG_CACHE_HOME/fastllama/build-report`` (~/.cache)."""
    if os.environ.get("FASTLLAMA_BUILD_CACHE"):
        return Path(os.environ["FASTLLAMA_BUILD_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastllama" / "build-report"


def seed_cache(report_path: Path, cache_dir: Path) -> int:
    """Adds the rows of a saved ``report.json`` to the cache; returns how many were new.

    Rows carry their cache keys, which hash the kernel source, config, arch and Triton version,
    so a saved row is only ever used for the identical compile: a fresh CI machine reuses the
    committed report for unchanged kernels and compiles what changed since.
    """
    added = 0
    for row in json.loads(Path(report_path).read_text()).get("rows", []):
        key = row.get("key")
        path = Path(cache_dir) / f"{key}.json"
        if key and not row.get("skipped") and not path.exists():
            _write_atomic(path, {k: row[k] for k in RESULT_FIELDS - {"cached"} if k in row})
            added += 1
    return added


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def lane_shares(n_jobs: int, lanes: int) -> list[list[int]]:
    """The job indices each worker lane compiles: a fixed random share each, every share in job
    order (a budgeted run's priority order). Striping by index instead put every build of one arch
    into one lane when the archs alternate (4 archs, 2 lanes: all sm_86 and sm_120 builds in lane
    1), so a run with the other archs cached compiled on one core."""
    order = list(range(n_jobs))
    random.Random(0).shuffle(order)
    return [sorted(order[i::lanes]) for i in range(lanes)]


def run_jobs(jobs: list[dict], cache_dir: Path, use_cache: bool = True, workers: int | None = None,
             timeout_s: float = 600.0, budget_s: float | None = None, skip_keys: set[str] = frozenset()) -> list[dict]:
    """Results of ``jobs`` (cache first), in order; see ``build_report.run_report``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict | None] = [None] * len(jobs)
    deadline = "inf" if budget_s is None else repr(time.time() + budget_s)
    lanes = max(1, min(workers or default_workers(), len(jobs)))
    shares = lane_shares(len(jobs), lanes)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="fastllama-skip-") as skip:
        json.dump(sorted(skip_keys), skip)
        skip.flush()
        threads = [threading.Thread(target=_lane, args=(jobs, share, results, cache_dir, use_cache, timeout_s,
                                                        deadline, skip.name))
                   for share in shares]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [r or {"error": "no result (internal error)"} for r in results]


def _spawn_env() -> dict:
    """The worker's environment.

    Compiles run in a subprocess because the parent usually runs under ``TRITON_INTERPRET=1``
    (tests, and the CLI on a machine without a GPU): there ``@triton.jit`` returns
    ``InterpretedFunction`` objects, which ``triton.compile`` cannot take (no ``cache_key``, no
    AST lowering), and the flag is read once when triton is imported. The worker imports the
    kernel modules afresh with the flag at 0, so they are real ``JITFunction``s. It also gets
    its own empty Triton cache, so compile times are real compiles and ~/.triton stays clean
    (this module's cache does the reusing).
    """
    # "0", not unset: ``import fastllama`` (the worker is fastllama._build_worker) switches the
    # interpreter on where there is no GPU unless the variable says otherwise
    env = os.environ | {"TRITON_INTERPRET": "0"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated so it does not warn
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: its "bytes spill stores" line, read in _compile
    return env


def _lane(jobs, indices, results, cache_dir, use_cache, timeout_s, deadline, skip_file):
    while indices:
        with tempfile.TemporaryDirectory(prefix="fastllama-build-") as tmp:
            env = _spawn_env() | {"TRITON_CACHE_DIR": str(Path(tmp) / "triton")}
            stderr_path = Path(tmp) / "stderr"
            with open(stderr_path, "w+b") as stderr:
                proc = subprocess.Popen([sys.executable, "-m", "fastllama._build_worker", str(cache_dir),
                                         "1" if use_cache else "0", deadline, skip_file], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=stderr, env=env)
                payload = "\n".join(json.dumps([i, jobs[i]]) for i in indices) + "\n"
                proc.stdin.write(payload.encode())
                proc.stdin.close()
                in_flight, timed_out = _read_results(proc, results, timeout_s)
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                stderr.seek(0)
                tail = stderr.read().decode(errors="replace")[-2000:].strip()
        if in_flight is not None:  # this job killed or hung the compiler: it becomes an error row
            why = f"timed out after {timeout_s:.0f} s" if timed_out else f"compiler process died (exit {proc.returncode})"
            results[in_flight] = {"error": f"{why}: {tail}"}
        elif any(results[i] is None for i in indices):  # stopped between jobs: report, do not loop
            for i in indices:
                if results[i] is None:
                    results[i] = {"error": f"compiler process exited (exit {proc.returncode}): {tail}"}
        indices = [i for i in indices if results[i] is None]


_TAG = b"@fastllama-build "  # marks the worker's protocol lines on its stdout


def _read_results(proc, results, timeout_s) -> tuple[int | None, bool]:
    """Reads the worker's ``["start", i]`` / ``["done", i, result]`` lines into ``results``.

    Returns ``(i, timed_out)`` for a job the worker started but never finished (it died, or
    ``timeout_s`` passed), else ``(None, False)``.
    """
    buf, current = b"", None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return current, current is not None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return current, False
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.startswith(_TAG):
                continue  # something the kernel module or the compiler printed
            msg = json.loads(line[len(_TAG):])
            if msg[0] == "start":
                current, deadline = msg[1], time.monotonic() + timeout_s
            else:
                results[msg[1]], current = msg[2], None


# ---------------------------------------------------------------------------------------------
# The worker (a subprocess without TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------
def _load_jit(job: dict):
    from triton.runtime.jit import JITFunction

    try:
        module = importlib.import_module(job["module"])
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_build_report_{abs(hash(job['file']))}", job["file"])
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    obj = getattr(module, job["qualname"])
    while not isinstance(obj, JITFunction):
        obj = obj.fn  # Autotuner / Heuristics wrap the JITFunction
    return obj


def compile_job(job: dict):
    """``triton.compile`` of one job for its arch, no cache: the compiled kernel (``.asm`` holds
    its PTX and cubin). Runs in a process without TRITON_INTERPRET (see :func:`_spawn_env`)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _load_jit(job)
    # Pointers are compiled as 16-byte aligned, the specialisation a launch gets for ordinary torch
    # tensors (it enables vector loads). Integers stay unspecialised unless the type says "i32:16"
    # (Triton's AOT notation): the launch guarantees a multiple of 16, so the JIT specialises on it
    # at run time (strides the op checked are aligned), and so must this compile.
    signature = {n: t.split(":")[0] for n, t in job["signature"].items()}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in job["signature"].items()
             if t.startswith("*") or t.endswith(":16")}
    # CUDA warps are 32 threads on every arch (what the driver reports on a real GPU).
    target = GPUTarget("cuda", int(job["arch"].removeprefix("sm_")), 32)
    src = triton.compiler.ASTSource(fn=fn, signature=signature,
                                    constexprs={k: _decode(v) for k, v in job["constexprs"].items()}, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]})


def _compile(job: dict, cache_dir: Path, use_cache: bool, deadline: float, skip_keys: set[str]) -> dict:
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars

    fn = _load_jit(job)
    key = hashlib.sha256(json.dumps([SCHEMA, triton.__version__, fn.cache_key, job["module"], job["qualname"],
                                     job["signature"], job["constexprs"], job["num_warps"], job["num_stages"],
                                     job["arch"], sorted(get_cache_invalidating_env_vars().items())],
                                    sort_keys=True).encode()).hexdigest()
    path = cache_dir / f"{key}.json"
    if use_cache and path.exists():
        try:
            cached = json.loads(path.read_text())
        except ValueError:
            cached = None  # a torn file: compile again
        # (a Hopper tensor-core build cached before ptxas's advisories were kept: compile again)
        if cached is not None and not (cached.get("tensor_cores") == "wgmma" and "perf_warnings" not in cached):
            return cached | {"cached": True}
    if key in skip_keys or time.time() > deadline:
        return {"skipped": True, "key": key}
    t0 = time.perf_counter()
    log = io.StringIO()  # Triton prints the ptxas -v log (TRITON_DUMP_PTXAS_LOG) with print()
    try:
        with contextlib.redirect_stdout(log):
            compiled = compile_job(job)
    except OSError as e:  # the toolchain itself is broken: report, do not cache
        return {"error": f"{type(e).__name__}: {e}"}
    except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a row
        result = {"error": f"{type(e).__name__}: {e}"}
    else:
        result = _resources(compiled)
        stores = re.findall(r"(\d+) bytes spill stores", log.getvalue())
        result["spill_stores"] = sum(map(int, stores)) if stores else None
        result["perf_warnings"] = sorted({f"{code} {text.strip()}"
                                          for code, text in _PERF_WARNING.findall(log.getvalue())})
    result |= {"compile_s": round(time.perf_counter() - t0, 3), "key": key}
    _write_atomic(path, result)
    return result


def _write_atomic(path: Path, data: dict) -> None:
    # Concurrent runs (two test workers seeding the cache, two reports) never read half a file.
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _resources(compiled) -> dict:
    """Registers, stack, local and static shared from cuobjdump; dynamic shared from Triton."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    # "  REG:168 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:560 ..." on the line after "Function <name>:"
    line = next(l for l in out.splitlines() if "REG:" in l)
    usage = dict(field.split(":", 1) for field in line.split())
    ptx = compiled.asm["ptx"]
    tc = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma.mma_async" in ptx
          else "mma" if "mma.sync" in ptx else "-")
    # sm_100's tensor-core accumulators live in tensor memory: columns per block, of 512 per SM
    tmem = int(getattr(compiled.metadata, "tmem_size", 0) or 0)
    return {"regs": int(usage["REG"]), "stack": int(usage["STACK"]), "local": int(usage["LOCAL"]),
            "shared": int(compiled.metadata.shared) + int(usage["SHARED"]), "tensor_cores": tc,
            **({"tmem": tmem} if tmem else {})}


def _worker_main(cache_dir: str, use_cache: str, deadline: str, skip_file: str) -> None:
    """Reads ``[index, job]`` lines from stdin; writes ``["start", i]`` then ``["done", i, result]``.
    Jobs whose key is listed in ``skip_file`` (JSON) and not cached come back skipped."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the build worker must not run under the interpreter"
    skip_keys = set(json.loads(Path(skip_file).read_text()))
    jobs = [json.loads(line) for line in sys.stdin if line.strip()]
    for i, job in jobs:
        print(_TAG.decode() + json.dumps(["start", i]), flush=True)
        try:
            result = _compile(job, Path(cache_dir), use_cache == "1", float(deadline), skip_keys)
        except Exception as e:  # noqa: BLE001 - loading the kernel or reading the cubin failed
            result = {"error": f"{type(e).__name__}: {e}"}
        print(_TAG.decode() + json.dumps(["done", i, result]), flush=True)


def _decode(value: Any) -> Any:
    """Inverse of ``build_report._encode`` for constexpr values (a tl.dtype travels as its name)."""
    if isinstance(value, dict) and "tl.dtype" in value:
        import triton.language as tl

        return tl.dtype(value["tl.dtype"])
    return value


if __name__ == "__main__":
    _worker_main(*sys.argv[1:5])
