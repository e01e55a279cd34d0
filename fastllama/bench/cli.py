"""``fastllama bench``: the package's main job, from the command line.

    fastllama bench                  the default preset of this machine (llama-3.2-1b on a GPU,
                                     the tiny preset under the interpreter: a smoke run)
    fastllama bench train            training tokens/s and peak memory (--preset, --quick ...)
    fastllama bench memory           bytes saved for backward per token per layer (any device)
    fastllama bench ops              every op benchmark in the repository's benchmarks/ folder
    fastllama bench decode           the decoding benchmark (benchmarks/bench_decode.py)

Everything writes the shared results format (JSON + markdown + PNG, see
:mod:`fastllama.bench.common`) under ``benchmarks/results/<device-name>/`` or ``--out``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import time
from pathlib import Path

HELP = "benchmarks: training tokens/s and memory, decoding, ops, saved-activation memory (see README)"

# Per op-benchmark script: the arguments of a --quick sweep on a GPU (off-GPU every script runs its
# own tiny smoke case). A script may define QUICK_ARGS itself instead.
QUICK_ARGS = {
    "bench_norm_rope_swiglu": ["--tokens", "4096", "16384"],
    # the training preset's head dim (64) and the issue's target (128), at the targets' length
    # (causal only: each mask kind autotunes every kernel again, and a --quick run has ~90 s)
    # (not the soft-capped kernels, Gemma 2's, nor SDPA's mem-efficient backend: two compiles and
    # a slow baseline less; the default run has them)
    "bench_attention": ["--dims", "128", "64", "--seqlens", "4096", "--masks", "causal", "--providers", "fastllama",
                        "fastllama-atomic", "fastllama-partials", "sdpa-flash", "sdpa-cudnn", "flash-attn"],
    # (32k: the chunked schedule, whose weight-gradient GEMM the rows' note names)
    "bench_cross_entropy": ["--tokens", "4096", "16384", "32768"],
    "bench_moe": ["--tokens", "4096"],
    # batch 1 is the target; every other batch would be one more torch.compile of HF's forward
    "bench_decode": ["--models", "1b", "--batches", "1", "--contexts", "512", "--new-tokens", "64",
                     "--reps", "2"],
}


def _shared(p: argparse.ArgumentParser, sub: bool, quick: bool = True) -> None:
    # sub-subcommands repeat these without defaults, so `bench --quick train` and
    # `bench train --quick` both work (memory has no --quick of its own: its report is short)
    d = (lambda v: argparse.SUPPRESS) if sub else (lambda v: v)
    if quick:
        p.add_argument("--quick", action="store_true", default=d(False),
                       help="a short sweep (one shape, few steps; the memory report has no shorter form)")
    p.add_argument("--out", default=d(None), help="results folder (default: benchmarks/results/<device-name>/)")
    p.add_argument("--no-progress", action="store_true", default=d(False), help="no progress bars")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options and its sub-subcommands."""
    from . import common
    from .presets import CONFIGS, PRESETS

    _shared(p, sub=False)
    sub = p.add_subparsers(dest="bench_command", metavar="{train,memory,ops,decode}")
    t = sub.add_parser("train", help="training tokens/s and peak memory, HF vs fastllama (and friends)")
    _shared(t, sub=True)
    t.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model shape (default: llama-3.2-1b on a GPU, tiny under the interpreter)")
    t.add_argument("--layers", type=common.at_least(1), default=None, help="override the preset's number of layers")
    t.add_argument("--seq-len", type=common.at_least(2), nargs="+", default=None,
                   help="sequence lengths (default: the preset's)")
    t.add_argument("--batch", type=common.at_least(1), default=None, help="fixed batch (default: fill the GPU; 1 on CPU)")
    t.add_argument("--warmup", type=common.at_least(0), default=None, help="warm-up steps, not timed")
    t.add_argument("--steps", type=common.at_least(1), default=None, help="measured steps (the median is reported)")
    t.add_argument("--configs", nargs="+", default=None, choices=CONFIGS, help="configurations to run")
    t.add_argument("--profile", action="store_true",
                   help="also profile one step per configuration: kernel time by category "
                        "(train-<preset>-profile.{json,md,png})")
    m = sub.add_parser("memory", help="bytes saved for backward per token per layer, HF sdpa vs fastllama")
    _shared(m, sub=True, quick=False)
    # (not the eager presets: HF's eager attention saves T^2 scores a layer, which a per-token
    # cost fitted over two token counts does not describe)
    m.add_argument("--presets", nargs="+", default=None,
                   choices=sorted(n for n, p in PRESETS.items() if p.hf_attention == "sdpa"),
                   help="model shapes (default: all but gemma-2-2b, whose HF baseline is eager attention)")
    m.add_argument("--tokens", type=common.at_least(1), nargs=2, default=[8, 16], metavar=("T1", "T2"),
                   help="the two (different) token counts the per-token cost is fitted over")
    for name, what in (("ops", "every op benchmark script in benchmarks/ (bench_*.py but decode)"),
                       ("decode", "the decoding benchmark (benchmarks/bench_decode.py)")):
        o = sub.add_parser(name, help=what)
        _shared(o, sub=True)
        o.add_argument("--benchmarks-dir", default=None, help="the repository's benchmarks/ folder")
        if name == "ops":
            o.add_argument("--only", nargs="+", default=None, help="script names to run (e.g. bench_attention)")
        o.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script(s) after --")


def run(args: argparse.Namespace) -> int:
    """Runs ``fastllama bench ...``; the exit code is 1 if any configuration failed (OOM is a
    result, not a failure)."""
    if args.out:
        out = Path(args.out).resolve()
        try:  # (made before a first configuration has run: a path that cannot be a folder is found now)
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"fastllama bench: --out {args.out} cannot be a folder: {e}", file=sys.stderr)
            return 2
        os.environ["FASTLLAMA_RESULTS_DIR"] = str(out)
    tokens = getattr(args, "tokens", None)
    if tokens is not None and tokens[0] == tokens[1]:
        print(f"fastllama bench memory: --tokens needs two different counts, got {tokens}", file=sys.stderr)
        return 2
    which = args.bench_command
    if which is None:
        return _default(args)
    try:
        return {"train": _train, "memory": _memory, "ops": _ops, "decode": _decode}[which](args)
    except FileNotFoundError as e:  # no benchmarks/ folder (the message says how to point at one)
        print(f"fastllama bench {which}: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------
def _banner() -> None:
    from . import common

    if not common.is_measurement():
        print("=" * 88)
        print("SMOKE RUN: no GPU, so every kernel runs on the CPU under the Triton interpreter.")
        print("It proves the benchmark paths work; the numbers below are NOT measurements.")
        print("=" * 88, flush=True)


def _train(args, preset: str | None = None) -> int:
    from . import common, profile, train

    _banner()
    preset = preset or getattr(args, "preset", None) or ("llama-3.2-1b" if common.on_gpu() else "tiny")
    if preset != "tiny" and not common.on_gpu():
        print(f"warning: preset {preset} on the CPU runs full-size steps under the Triton interpreter "
              "(hours, tens of GiB); --preset tiny is the CPU smoke run", file=sys.stderr, flush=True)
    settings = train.default_settings(
        preset, args.quick, configs=getattr(args, "configs", None), seq_lens=getattr(args, "seq_len", None),
        batch=getattr(args, "batch", None), warmup=getattr(args, "warmup", None), steps=getattr(args, "steps", None),
        layers=getattr(args, "layers", None), profile=getattr(args, "profile", False))
    t0 = time.time()
    name = f"train-{settings.preset.name}"
    columns = train.train_columns(settings.preset.baseline)

    def save(rows):
        interrupted = any(r.get("status") == train.INTERRUPTED for r in rows)
        # (with what the run's timed choices decided: which GEMM, backward, order won per shape)
        return common.write_results(name, rows, columns, plot=train.TRAIN_PLOTS,
                                    extra=dict(train.train_extra(settings), interrupted=interrupted,
                                               **train.timed_choices()))

    profiles: list[dict] = []

    def save_all(rows):
        save(rows)
        if profiles:
            profile.write_profile(f"{name}-profile", profiles, extra={
                "what": "kernel time of one training step per configuration, by category "
                        "(torch.profiler; off-GPU: aten ops' CPU time)",
                "categories": dict(profile.CATEGORIES)})

    rows = train.run_train(settings, progress=not args.no_progress, on_rows=save_all, profiles=profiles)
    out = common.results_dir()
    print()
    if not common.is_measurement():
        print("**Smoke run under the Triton interpreter (float32, tiny shapes): not a measurement.**\n")
    print(common.markdown_table(rows, columns))
    if profiles:
        print("\nKernel time of one step by category (--profile):")
        print(common.markdown_table(profiles, profile.PROFILE_COLUMNS))
    for r in rows:
        if "traceback" in r:
            print(f"{r['config']} seq {r['seq_len']}:\n{r['traceback']}", file=sys.stderr)
    print(f"{len(rows)} rows in {time.time() - t0:.0f} s; results in {out}/{name}.{{json,md,png}}")
    if any(r.get("status") == train.INTERRUPTED for r in rows):
        return 130
    return 1 if any(str(r.get("status", "")).startswith("error") for r in rows) else 0


def _memory(args, presets=None) -> int:
    from . import common, memory

    presets = presets or getattr(args, "presets", None) or memory.DEFAULT_PRESETS
    tokens = tuple(getattr(args, "tokens", None) or memory.DEFAULT_TOKENS)
    t0 = time.time()
    try:
        rows = memory.memory_report(presets=presets, token_counts=tokens, device=common.device(),
                                    progress=not args.no_progress)
    except ValueError as e:
        print(f"fastllama bench memory: {e}", file=sys.stderr)
        return 2
    # device-independent: the full report (every preset) has one folder for every machine,
    # benchmarks/results/memory/, unless --out / FASTLLAMA_RESULTS_DIR; a subset goes with the
    # machine's other results
    full = tuple(presets) == tuple(memory.DEFAULT_PRESETS) and tuple(tokens) == tuple(memory.DEFAULT_TOKENS)
    name = "memory" if full else "memory-" + "-".join(presets)
    out_dir = common.RESULTS / "memory" if full and not os.environ.get("FASTLLAMA_RESULTS_DIR") else None
    out = common.write_results(name, [memory.public_row(r) for r in rows], memory.MEMORY_COLUMNS,
                               extra=memory.memory_extra(rows, tokens), plot=memory.MEMORY_PLOTS, out_dir=out_dir,
                               note="" if common.on_gpu() else "bytes saved for backward are device-independent: "
                               "counted on the CPU, a measurement (timings would not be)")
    print("\nBytes saved for backward (saved_tensors_hooks), bf16, per token; device-independent:")
    print(common.markdown_table(rows, memory.MEMORY_COLUMNS))
    print(f"({time.time() - t0:.0f} s) results in {out}/{name}.{{json,md,png}}")
    return 0


def _default(args) -> int:
    """The main job: the training benchmark and the memory report on this machine's default preset."""
    from . import common

    preset = "llama-3.2-1b" if common.on_gpu() else "tiny"
    print(f"fastllama bench: default preset for this machine: {preset}"
          + ("" if common.on_gpu() else " (CPU only: a --quick smoke run under the Triton interpreter)"))
    if not common.on_gpu():
        args.quick = True
    rc = _train(args, preset)
    if rc == 130:  # interrupted (Ctrl-C, a time limit): nothing more
        return rc
    return max(rc, _memory(args, presets=[preset]))


# ---------------------------------------------------------------------------------------------
def benchmarks_dir(given: str | None = None) -> Path:
    """The repository's benchmarks/ folder (the op and decode scripts live there, not in the
    installed package); FileNotFoundError says how to point at it."""
    from .common import _REPO

    path = Path(given) if given else _REPO / "benchmarks"
    if not given and not (path / "common.py").exists():
        path = Path.cwd() / "benchmarks"  # installed elsewhere, run from a checkout
    if not (path / "common.py").exists():
        raise FileNotFoundError(
            f"no benchmarks/ folder at {path}: the op and decode benchmark scripts ship with the "
            "repository, not the wheel; run from a checkout (pip install -e .) or pass --benchmarks-dir")
    return path


def _run_scripts(names: list[str], args) -> int:
    from . import common, plots

    folder = benchmarks_dir(args.benchmarks_dir)
    sys.path.insert(0, str(folder.parent))  # the scripts import `benchmarks.common`
    extra = [a for a in (args.args or []) if a != "--"]
    rc = 0
    _banner()
    for name in names:
        mod = importlib.import_module(f"benchmarks.{name}")
        argv = list(extra)
        if args.quick and common.on_gpu() and not extra:
            argv = list(getattr(mod, "QUICK_ARGS", QUICK_ARGS.get(name, [])))
        print(f"\n### {name} {' '.join(argv)}", flush=True)
        t0 = time.time()
        common.SCRIPT_COMMAND = " ".join(["python", f"benchmarks/{name}.py", *map(shlex.quote, argv)])
        try:
            result = mod.main(argv)
        except SystemExit as e:  # argparse errors
            result = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # noqa: BLE001  (one failing script does not stop the others)
            import traceback

            traceback.print_exc()
            result = 1
        common.SCRIPT_COMMAND = None
        result = common.exit_code(result)  # rows: 1 when a row holds an error
        if result:
            rc = 130 if result == 130 else max(rc, 1)
        print(f"### {name}: {time.time() - t0:.0f} s", flush=True)
        if result == 130:  # interrupted (a time limit): the scripts after it would be cut off too
            print("### interrupted: the remaining scripts are not run", flush=True)
            break
    plots.plot_missing(common.results_dir())
    return rc


def op_scripts(folder: Path) -> list[str]:
    """Every ``bench_*.py`` in ``folder`` except the decoding one."""
    return sorted(p.stem for p in folder.glob("bench_*.py") if p.stem != "bench_decode")


def _ops(args) -> int:
    available = op_scripts(benchmarks_dir(args.benchmarks_dir))
    unknown = [n for n in args.only or () if n not in available]
    if unknown:
        print(f"fastllama bench ops: no op benchmark {', '.join(unknown)}; available: {', '.join(available)}",
              file=sys.stderr)
        return 2
    return _run_scripts(args.only or available, args)


def _decode(args) -> int:
    return _run_scripts(["bench_decode"], args)
