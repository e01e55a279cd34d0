"""The kernel build report: compiles for every report arch on this (CPU) machine and reads the cubin.

Two halves. The first proves the report's machinery on small kernels made to pass or fail
(tests/_build_report_kernels.py): a spill, shared memory over one arch's limit, a compile error, a
compiler crash and an uncovered kernel must each show up. The second is the gate for the shipped
kernels: every build config in the op table compiles for its archs with no spill and shared
memory within the limit, and every kernel in kernels/ has build configs. Compiles are cached
(keyed on kernel source + config + arch + Triton version) and the committed
benchmarks/results/build/report.json seeds the cache, so only kernels changed since the report
was regenerated compile here.
"""
import dataclasses
import itertools
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import _build_report_crash
import _build_report_kernels as K
from fastllama import _interpreter as _interp
from fastllama import build_report as br
from fastllama.optable import KernelBuild

# One xdist worker runs the whole module: `fixture_rows` compiles once.
pytestmark = pytest.mark.xdist_group("build_report")
ARCHS = ["sm_80", "sm_90"]  # of the fixture kernels; the gate below compiles for every arch of br.ARCHS
WORKERS = max(1, min(4, os.cpu_count() or 1))
SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
MM_SIG = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32"}


def _copy(block=1024, label="copy"):
    return KernelBuild(K.copy_kernel, SIG, {"BLOCK": block}, num_warps=4, label=label)


@pytest.fixture(scope="module")
def fixture_rows():
    """One report over the fixture kernels: {label: {arch: Row}}."""
    jobs = (br.jobs_from_builds("copy", [_copy()], ARCHS)
            + br.jobs_from_builds("copy", [_copy(100, "bad")], ["sm_90"])
            + br.jobs_from_builds("scale", [KernelBuild(K.row_scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32"},
                                                        {"BLOCK": 8192}, num_warps=1, label="spill")], ["sm_80"])
            + br.jobs_from_builds("mm", [KernelBuild(K.matmul_kernel, MM_SIG, {"BM": 128, "BN": 128, "BK": 128},
                                                     num_warps=8, num_stages=6, label="mm")], ARCHS + ["sm_100"]))
    rows = br.run_report(jobs, workers=WORKERS)
    out = {}
    for r in rows:
        out.setdefault(r.label, {})[r.arch] = r
    return out


def test_small_kernel_fits_everywhere(fixture_rows):
    for arch in ARCHS:
        r = fixture_rows["copy"][arch]
        assert r.error is None, r.error
        assert 0 < r.regs <= 64 and r.spill == 0 and r.spill_stores == 0 and r.tensor_cores == "-"
        assert r.warps_per_sm == 64 and r.occupancy_limit == "warps"  # 16 blocks of 4 warps
        assert r.compile_s is not None and r.key
        assert br.problems([r]) == []
    assert "BLOCK=1024 *fp32 w4 s3" in br.format_table(list(fixture_rows["copy"].values()))
    header, a100, h100 = br.summary(list(fixture_rows["copy"].values()) + [fixture_rows["bad"]["sm_90"]])
    assert header[:7] == ["kernel", "arch", "builds", "compiled", "spill", "too big", "error"]
    assert a100[:7] == ["_build_report_kernels.copy_kernel", "sm_80", "1", "1", "0", "0", "0"]
    assert h100[:7] == ["_build_report_kernels.copy_kernel", "sm_90", "2", "2", "0", "0", "1"]


def test_spill_is_a_problem(fixture_rows):
    r = fixture_rows["spill"]["sm_80"]
    assert r.error is None and r.regs == 255 and r.spill > 0 and r.spill_stores > 0
    assert any("spills" in p for p in br.problems([r]))
    assert "SPILLS" in br.format_table([r])


def test_shared_memory_limit_is_per_arch(fixture_rows):
    a100, h100 = fixture_rows["mm"]["sm_80"], fixture_rows["mm"]["sm_90"]
    # the same config: 6 stages of 128x128x128 fp16 tiles; sm_90's pipeline keeps more buffers
    assert 163 * 1024 < a100.shared < h100.shared <= 227 * 1024
    assert any("shared memory" in p for p in br.problems([a100]))
    assert br.problems([h100]) == []
    assert (a100.tensor_cores, h100.tensor_cores) == ("mma", "wgmma")
    b200 = fixture_rows["mm"]["sm_100"]  # the accumulator in tensor memory: 128 columns of fp32
    assert (b200.tensor_cores, b200.tmem, a100.tmem) == ("tcgen05", 128, None)
    assert h100.warps_per_sm == 8 and h100.occupancy_limit in ("shared", "registers")


def test_serialized_warpgroup_mma_is_a_problem():
    """ptxas's C7515 advisory (Hopper tensor-core ops serialized: each waits for the one before)
    is read from its log and makes a build unfit to ship, like a spill."""
    from fastllama import _build_worker

    log = ("ptxas info    : Used 168 registers\n"
           "ptxas-blackwell info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are "
           "serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and "
           "end of the pipeline stage in the function '_attn_bwd_dkdv' in line 1336\n")
    (code, text), = _build_worker._PERF_WARNING.findall(log)
    assert code == "C7515" and text.startswith("wgmma.mma_async instructions are serialized") and "function" not in text
    row = br.Row(op="x", kernel="k", label="", config="c", arch="sm_90", num_warps=8, regs=168, stack=0, local=0,
                 shared=1024, tensor_cores="wgmma", perf_warnings=[f"{code} {text}"], warps_per_sm=8)
    assert row.serialized and br.problem_kinds([row]) == {"k on sm_90: wgmma serialized"}
    assert "SERIALIZED" in br.format_table([row])
    assert br.summary([row])[1][7] == "1"
    assert not dataclasses.replace(row, perf_warnings=[]).serialized


def test_compile_error_is_a_row(fixture_rows):
    r = fixture_rows["bad"]["sm_90"]
    assert "power of 2" in r.error and r.regs is None
    assert any("compile error" in p for p in br.problems([r]))
    assert "ERROR CompilationError: arange's range must be a power of 2" in br.format_table([r])


def test_cache_hits_only_the_same_compile(tmp_path):
    jobs = br.jobs_from_builds("copy", [_copy()], ["sm_80"])
    first, = br.run_report(jobs, cache_dir=tmp_path, workers=1)
    again, = br.run_report(jobs, cache_dir=tmp_path, workers=1)
    assert not first.cached and again.cached
    assert (again.regs, again.shared, again.compile_s, again.key) == (first.regs, first.shared, first.compile_s, first.key)
    other, = br.run_report(br.jobs_from_builds("copy", [_copy(512)], ["sm_80"]), cache_dir=tmp_path, workers=1)
    assert not other.cached and other.key != first.key
    # "i32:16": the launch guarantees a multiple of 16, a different specialisation (and compile)
    div16 = KernelBuild(K.copy_kernel, SIG | {"n": "i32:16"}, {"BLOCK": 1024}, num_warps=4)
    aligned, = br.run_report(br.jobs_from_builds("copy", [div16], ["sm_80"]), cache_dir=tmp_path, workers=1)
    assert aligned.error is None and aligned.key not in (first.key, other.key) and "1 ints %16" in aligned.config
    # a saved report seeds an empty cache with exactly its rows
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(br.report_json([first, other])))
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    assert br.seed_cache(saved, fresh) == 2
    seeded, = br.run_report(jobs, cache_dir=fresh, workers=1)
    assert seeded.cached and seeded.regs == first.regs


def test_budget_skips_only_uncached_compiles(tmp_path):
    cached = br.jobs_from_builds("copy", [_copy()], ["sm_80"])
    br.run_report(cached, cache_dir=tmp_path, workers=1)
    uncached = br.jobs_from_builds("copy", [_copy(256)], ["sm_80"])
    hit, skipped = br.run_report(cached + uncached, cache_dir=tmp_path, workers=1, budget_s=0)
    assert hit.cached and hit.regs > 0
    assert skipped.skipped and skipped.regs is None and skipped.key and br.problems([skipped]) == []
    assert "not compiled (time budget)" in br.format_table([skipped])
    # a saved report's not-compiled rows: seeding skips them, and their keys can be skipped on purpose
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(br.report_json([hit, skipped])))
    assert br.unchecked_keys(saved) == {skipped.key}
    (tmp_path / "fresh").mkdir()
    assert br.seed_cache(saved, tmp_path / "fresh") == 1  # the compiled row only
    again, = br.run_report(uncached, cache_dir=tmp_path, workers=1, skip_keys=br.unchecked_keys(saved))
    assert again.skipped and again.key == skipped.key


def test_arch_limited_build_is_compiled_only_for_its_archs():
    """A tile only Hopper launches (KernelBuild.archs) becomes an sm_90 job and no sm_80 one."""
    hopper = dataclasses.replace(_copy(label="hopper"), archs=("sm_90",))
    jobs = br.jobs_from_builds("copy", [_copy(), hopper], ARCHS)
    assert sorted((j.label, j.arch) for j in jobs) == [("copy", "sm_80"), ("copy", "sm_90"), ("hopper", "sm_90")]


def test_pressure_order_puts_each_kernels_biggest_config_first():
    small, big = _copy(256), _copy(4096)
    mm = KernelBuild(K.matmul_kernel, MM_SIG, {"BM": 64, "BN": 64, "BK": 32})
    jobs = br.jobs_from_builds("copy", [small, big], ARCHS) + br.jobs_from_builds("mm", [mm], ARCHS)
    order = [(j.kernel.split(".")[-1], j.arch, j.constexprs.get("BLOCK")) for j in br.by_pressure(jobs)]
    assert order == [("copy_kernel", "sm_80", 4096), ("copy_kernel", "sm_90", 4096), ("matmul_kernel", "sm_80", None),
                     ("matmul_kernel", "sm_90", None), ("copy_kernel", "sm_80", 256), ("copy_kernel", "sm_90", 256)]
    # an fp16/bf16 twin waits until every shape has had its turn
    twin = KernelBuild(K.copy_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32"}, {"BLOCK": 4096})
    big16 = KernelBuild(K.copy_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32"}, {"BLOCK": 4096})
    jobs = br.jobs_from_builds("copy", [big16, twin, _copy(256)], ["sm_80"])
    assert [(j.constexprs["BLOCK"], j.signature["x_ptr"]) for j in br.by_pressure(jobs)] == [
        (4096, "*fp16"), (256, "*fp32"), (4096, "*bf16")]


def test_crashing_compiler_is_a_row_and_the_rest_still_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAMA_TEST_CRASH_ON_IMPORT", "1")  # the worker's import of the module dies
    doomed = KernelBuild(_build_report_crash.doomed_kernel, {"x_ptr": "*fp32"}, {"BLOCK": 128})
    jobs = br.jobs_from_builds("doomed", [doomed], ["sm_80"]) + br.jobs_from_builds("copy", [_copy()], ["sm_80"])
    crashed, ok = br.run_report(jobs, cache_dir=tmp_path, workers=1)
    assert "compiler process died (exit 3)" in crashed.error
    assert ok.error is None and ok.regs > 0


def test_occupancy_formula():
    sm80, sm90 = br.ARCHS["sm_80"], br.ARCHS["sm_90"]
    assert br.occupancy(sm90, 128, 0, 4) == (16, "registers")  # 4096 regs/warp -> 16 warps
    assert br.occupancy(sm90, 255, 0, 8) == (8, "registers")  # 255 rounds up to 256/thread
    assert br.occupancy(sm80, 32, 100 * 1024, 4) == (4, "shared")  # one 101 KB block per 164 KB
    assert br.occupancy(sm90, 32, 100 * 1024, 4) == (8, "shared")  # two per 228 KB
    assert br.occupancy(sm80, 16, 0, 1) == (32, "blocks")  # 32 resident blocks at most
    assert br.occupancy(sm90, 255, 0, 16) == (0, "registers")  # 16 x 32 x 256 > 65536: no launch
    assert br.occupancy(br.ARCHS["sm_100"], 64, 0, 4, tmem=256) == (8, "tmem")  # 2 x 256 of 512 columns


def test_shared_limit_boundary():
    def row(arch, shared):
        return br.Row(op="x", kernel="k", label="", config="", arch=arch, num_warps=4, regs=32, stack=0, local=0,
                      shared=shared, warps_per_sm=4)

    assert br.problems([row("sm_80", 163 * 1024), row("sm_90", 227 * 1024)]) == []
    assert len(br.problems([row("sm_80", 163 * 1024 + 1), row("sm_90", 227 * 1024 + 1)])) == 2


def test_coverage_names_kernels_without_build_configs():
    assert br.launched_kernels(K) == ["copy_kernel", "fill_kernel", "matmul_kernel", "row_scale_kernel"]
    jobs = br.jobs_from_builds("copy", [_copy()], ["sm_80"])
    missing = br.uncovered_kernels(jobs, modules=[K.__name__])
    assert missing == {K.__name__: ["fill_kernel", "matmul_kernel", "row_scale_kernel"]}


# ---------------------------------------------------------------------------------------------
# The gate for what ships
# ---------------------------------------------------------------------------------------------
# Seconds of uncached compiling the gate may spend (CI reuses the cache and the committed report;
# a kernel changed since the report was regenerated compiles here, most demanding configs first).
GATE_BUDGET_S = 60
# "kernel on arch: kind" lines of problems already reported and being fixed; any other problem
# fails the gate. An empty (or absent) file makes the gate the full rule.
KNOWN_PROBLEMS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "build" / "known_problems.txt"


def _known_problems() -> set[str]:
    if not KNOWN_PROBLEMS.is_file():
        return set()
    return {line.strip() for line in KNOWN_PROBLEMS.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")}


def test_the_report_compiles_for_the_op_tables_archs():
    """KernelBuild.archs names the archs of optable.REPORT_ARCHS (what the op tables are made
    for); the report must compile exactly those, or a build made for one of them goes unchecked."""
    from fastllama import optable

    assert tuple(br.ARCHS) == optable.REPORT_ARCHS
    for arch in ("sm_86", "sm_120"):  # every 99 KB GPU: the opt-in limit, with the static part counted
        assert br.ARCHS[arch].shared_per_block == 99 * 1024 and br.ARCHS[arch].max_warps_per_sm == 48


def test_worker_lanes_share_every_arch():
    """The report's jobs alternate archs; with the others cached a run compiles one arch, and
    both lanes must get a fair part of it (striped by index, one lane got all of it), each lane
    in job order (a budgeted run's priority order), every job exactly once."""
    from fastllama import _build_worker

    archs = len(br.ARCHS)
    shares = _build_worker.lane_shares(1000 * archs, 2)
    assert sorted(i for share in shares for i in share) == list(range(1000 * archs))
    for share in shares:
        assert share == sorted(share)
        for arch in range(archs):
            assert 400 < sum(1 for i in share if i % archs == arch) < 600


def test_every_kernel_module_is_in_the_op_table():
    jobs, errors = br.jobs_from_specs(["sm_90"])
    assert not errors, br.problems(errors)
    missing = br.uncovered_kernels(jobs)
    assert not missing, ("kernels in kernels/ with no op-table build config (OpSpec.build_configs): "
                         + "; ".join(f"{m}: {', '.join(k)}" for m, k in missing.items()))


def test_shipped_kernel_configs_compile_without_spills_for_every_arch(tmp_path):
    import triton

    committed = br.committed_report()
    made_with = json.loads(committed.read_text()).get("triton") if committed else None
    if made_with is not None and made_with != triton.__version__:
        # Registers and spills are the compiler's: the committed report, and this gate, are for the
        # Triton that CI pins (.ci/constraints.txt). Under another Triton every build would be
        # uncached and the gate would spend its budget compiling, then fail as stale.
        pytest.skip(f"the committed build report was made with Triton {made_with}, this is "
                    f"{triton.__version__}: run `fastllama build-report` for this Triton's own table")
    jobs, errors = br.jobs_from_specs(br.ARCHS)
    # A cache of its own, seeded from the committed report: the verdict depends on the checkout,
    # not on what other runs left in ~/.cache.
    rows = errors + br.run_report(br.by_pressure(jobs), cache_dir=tmp_path, workers=WORKERS, seed=committed,
                                  budget_s=GATE_BUDGET_S, skip_keys=br.unchecked_keys(committed))
    skipped = [r for r in rows if r.skipped]
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(rows)} kernel builds unchecked: listed as not compiled in the "
                      f"committed report, or past the {GATE_BUDGET_S} s budget (first: {skipped[0].kernel} "
                      f"[{skipped[0].label}] {skipped[0].arch}); run `fastllama build-report --output "
                      "benchmarks/results/build` and commit it to check them all")
    known = _known_problems()
    # The committed report is the table of the kernels as they are: every build must come from it,
    # compiled (a row compiled or skipped here means a kernel or config changed since it was made).
    stale = [r for r in rows if r.error is None and (r.skipped or not r.cached)]
    assert not stale, (f"{len(stale)} of {len(rows)} builds are not in the committed report (first: {stale[0].kernel} "
                       f"[{stale[0].label}] {stale[0].arch}): regenerate it with `fastllama build-report --output "
                       "benchmarks/results/build` and commit benchmarks/results/build/")
    new = [r for r in rows if br.problem_kinds([r]) - known]
    found = br.problems(new)
    assert not found, f"{len(found)} problem(s) in {len(rows)} builds:\n" + "\n".join(found)
    fixed = known - br.problem_kinds(rows) - {f"{r.kernel} on {r.arch}: {k}" for r in skipped for k in
                                               ("spills", "shared memory", "compile error", "cannot launch",
                                                "wgmma serialized")}
    if fixed:
        warnings.warn(f"known build problems no longer seen, remove them from {KNOWN_PROBLEMS.name}: {sorted(fixed)}")


# An exp2's source register, and the instruction that last defined each register, in PTX text.
_PTX_INSTRUCTION = __import__("re").compile(r"^\s*([a-z][\w.]*)\s+(%\w+)\s*(?:,\s*(%\w+))?")


def _exp2_inputs_made_by_fma(ptx: str) -> tuple[int, int]:
    """(number of ex2 instructions, how many of them take a register last written by an fma)."""
    defined_by, total, fused = {}, 0, 0
    for line in ptx.splitlines():
        m = _PTX_INSTRUCTION.match(line)
        if not m:
            continue
        op, dest, first_source = m.groups()
        if op.startswith("ex2"):
            total += 1
            fused += defined_by.get(first_source, "").startswith("fma")
        defined_by[dest] = op
    return total, fused


def test_fp32_attention_scores_reach_exp2_unfused(tmp_path):
    """fp32 flash attention promises p = 2^((s - m) - log2 l) with s = q.k * scale rounded on its
    own, so the backward recomputes the forward's s bit for bit and p is exact at |s| = 1e4. A
    compiler that contracts ``s * scale - m`` into one fma breaks that silently (it did once: see
    2d89cac). In the sm_90 PTX of the fp32 forward, dK/dV and dQ kernels no exp2 may read an fma's
    result; the bf16 forward, which asks for that fma on purpose, must (the check finds what it
    looks for)."""
    import subprocess
    import sys

    from fastllama import _build_worker
    from fastllama.ops import attention as A

    def wanted(b):
        c = b.constexprs
        return (b.label.split()[1] in ("fwd", "dkdv", "dq") and c["HEAD_DIM"] == 64 and c["ALIGNED"]
                and not c["IS_VARLEN"] and b.archs is None and (b.signature["Q"], c["PRECISION"]) in
                (("*fp32", "ieee"), ("*bf16", "ieee")) and (b.signature["Q"] == "*fp32" or b.label.split()[1] == "fwd"))

    first = {}
    for b in A._build_configs():
        if wanted(b):
            first.setdefault((b.label.split()[1], b.signature["Q"]), b)
    assert len(first) == 4, sorted(first)
    jobs = [dataclasses.asdict(j) for j in br.jobs_from_builds("flash_attention", first.values(), ["sm_90"])]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = ("import json, sys\nfrom fastllama._build_worker import compile_job\n"
              "for job in json.load(open(sys.argv[1])):\n"
              "    print(json.dumps([job['label'], compile_job(job).asm['ptx']]))\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "jobs.json")], env=_build_worker._spawn_env(),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ptx = dict(json.loads(line) for line in out.stdout.splitlines() if line.startswith("["))
    assert len(ptx) == 4
    for label, text in ptx.items():
        total, fused = _exp2_inputs_made_by_fma(text)
        assert total > 0, f"{label}: no ex2 in the PTX"
        if "bf16" in label:
            assert fused > 0, f"{label}: the 16-bit fma before exp2 is gone (or the check no longer sees it)"
        else:
            assert fused == 0, f"{label}: {fused} of {total} exp2 inputs come from an fma (contracted s * scale - m)"


def _unspecialised(kernel) -> set[str]:
    """The argument names a @triton.jit kernel (or its interpreter stand-in) never specialises."""
    names = kernel.kwargs.get("do_not_specialize") if hasattr(kernel, "kwargs") else kernel.do_not_specialize
    arg_names = kernel.arg_names
    return {arg_names[n] if isinstance(n, int) else n for n in names or ()}


def test_flash_attention_launches_compile_the_reports_integer_variants():
    """At a launch Triton specialises an integer argument equal to 1 (a constant) or a multiple
    of 16 (a divisibility hint) unless the kernel says not to. The flash-attention builds compile
    the lengths, window bounds, head counts, lse strides and buckets as plain i32; launched
    specialised, fp32 dQ at head dim 128 spilled 440 B on sm_90 (seqlen_q % 16 == 0) and fp32
    dK/dV, dQ and the head dim 256 forward spilled with one query or key, none of it in the
    report. Every integer that ALL of a flash kernel's builds compile as plain i32 is therefore
    left unspecialised at launch: what runs is what the report compiled."""
    from fastllama import optable

    spec = next(s for s in optable.all_specs() if s.name == "flash_attention")
    plain = {}
    for b in spec.build_configs():
        ints = {n for n, t in b.signature.items() if t == "i32"}
        plain[b.kernel] = plain.get(b.kernel, ints) & ints
    assert len(plain) == 4  # forward, dK/dV, dQ, preprocess
    for kernel, names in plain.items():
        assert names and names <= _unspecialised(kernel), (kernel.arg_names[:3], sorted(names - _unspecialised(kernel)))


def _dry_run(monkeypatch, op, kernels: dict) -> list[KernelBuild]:
    """Launches become records: each ``kernel[grid](...)`` of ``kernels`` ({module: [names]})
    appends the build it would compile on a GPU (br.launch_build) to the returned list, and runs
    nothing. The op module ``op`` (or each of a list) sees a GPU with 132 SMs (its tile configs are
    the GPU's, not the interpreter's)."""
    launched = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = self.fn = kernel  # fn: the op table's builds, made now, name the recorder

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(br.launch_build(self.kernel, args, kwargs))

    for module, names in kernels.items():
        for name in names:
            monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    for module in op if isinstance(op, list) else [op]:
        monkeypatch.setattr(module, "interpreter_active", lambda: False)
        monkeypatch.setattr(module, "num_sms", lambda device: 132, raising=False)
    return launched


def _not_in_report(launched: list[KernelBuild], spec_names, arch: str = "sm_80") -> list[str]:
    """The launched builds that no build config of the op specs ``spec_names`` is for ``arch``
    (the report did not compile them there), described briefly."""
    from fastllama import optable

    builds = [b for s in optable.all_specs() if s.name in spec_names and s.build_configs for b in s.build_configs()]

    def listed(x):
        return any(br._python_function(b.kernel) is br._python_function(x.kernel) and b.signature == x.signature
                   and b.constexprs == x.constexprs and (b.num_warps, b.num_stages) == (x.num_warps, x.num_stages)
                   and (b.archs is None or arch in b.archs) for b in builds)

    return sorted({f"{br._python_function(x.kernel).__name__} {x.constexprs} w{x.num_warps} "
                   f"{ {n: t for n, t in x.signature.items() if not t.startswith('*')} }"
                   for x in launched if not listed(x)})


def test_launch_build_reads_triton_launch_specialisation():
    """launch_build (what the launch gates below compare with the report) applies Triton's own rule."""
    x = torch.zeros(64)
    launched = br.launch_build(K.copy_kernel, (x, x, 32), {"BLOCK": 1024, "num_warps": 8})
    assert launched.signature == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32:16"}
    assert (launched.constexprs, launched.num_warps) == ({"BLOCK": 1024}, 8)
    assert br.launch_build(K.copy_kernel, (x, x, 33), {"BLOCK": 1024}).signature["n"] == "i32"
    one = br.launch_build(K.copy_kernel, (x, x, 1), {"BLOCK": 1024})
    assert one.signature["n"] == "constexpr" and one.constexprs["n"] == 1
    assert br.launch_build(K.copy_kernel, (x[1:], x, 32), {"BLOCK": 1024}).signature["x_ptr"] == "*fp32 unaligned"
    # the kernel's own do_not_specialize, also under an autotune/heuristics wrapper
    import triton

    unspecialised = triton.jit(do_not_specialize=["n"])(br._python_function(K.copy_kernel))
    wrapped = triton.heuristics({"BLOCK": lambda args: 1024})(unspecialised)
    assert br.launch_build(wrapped, (x, x, 32), {"BLOCK": 1024}).signature["n"] == "i32"
    with pytest.raises(TypeError, match="maxnreg"):  # a launch option a KernelBuild cannot hold
        br.launch_build(K.copy_kernel, (x, x, 32), {"BLOCK": 1024, "maxnreg": 128})


def test_rotary_launches_at_llama_shapes_compile_the_reports_builds(monkeypatch):
    """Dry-runs the rotary launches at Llama-family shapes, both cos/sin and position ids, forward
    and backward (and partial rotary, and GLM's adjacent pairs), and requires each launched build
    to be a build config (so the report checked it). The position-id builds were compiled with
    plain i32 strides; launched with their multiple-of-16 hints, every sm_80 build spilled."""
    from fastllama.ops import rotary as op

    launched = _dry_run(monkeypatch, op, {op._k: ["rotary_kernel"]})
    shapes = [(1, 32, 8, 77, 64), (2, 32, 8, 4096, 128), (1, 32, 32, 33, 80), (3, 24, 8, 1, 96), (2, 8, 1, 17, 256)]
    for dtype in (torch.bfloat16, torch.float32):
        for b, hq, hk, t, d in shapes:
            # HF: q/k are projection outputs viewed (B, T, H, D) and transposed to (B, H, T, D)
            q = torch.empty(b, t, hq, d, dtype=dtype).transpose(1, 2)
            k = torch.empty(b, t, hk, d, dtype=dtype).transpose(1, 2)
            cos = torch.empty(b, t, d, dtype=dtype)
            positions = torch.arange(t).expand(b, t)
            inv_freq = torch.empty(d // 2)
            for grad in (False, True):
                qg, kg = q.clone().requires_grad_(grad), k.clone().requires_grad_(grad)
                outs = [op.apply_rotary_pos_emb(qg, kg, cos, cos),
                        op.apply_rotary_pos_emb(qg, kg, cos[0], cos[0]),
                        op.apply_rotary_pos_emb_from_positions(qg, kg, positions, inv_freq),
                        op.apply_rotary_pos_emb_from_positions(qg, kg, positions[:1].int(), inv_freq),
                        op.apply_rotary_pos_emb(qg, kg, cos, cos, interleaved=True)]
                if grad:
                    sum(o.float().sum() for pair in outs for o in pair).backward()
    # partial rotary (Phi-4-mini: 96 of 128 dims; 1/2 and 1/4 of a head elsewhere): the kernel
    # runs on q/k's leading dims, views with the full head's row strides
    for dtype, (d, r) in itertools.product((torch.bfloat16, torch.float32), ((128, 96), (128, 64), (64, 32))):
        q = torch.empty(1, 77, 24, d, dtype=dtype).transpose(1, 2)
        k = torch.empty(1, 77, 8, d, dtype=dtype).transpose(1, 2)
        cos = torch.empty(1, 77, r, dtype=dtype)
        for grad in (False, True):
            qg, kg = q.clone().requires_grad_(grad), k.clone().requires_grad_(grad)
            outs = [op.apply_rotary_pos_emb(qg, kg, cos, cos), op.apply_rotary_pos_emb(qg, kg, cos, cos, interleaved=True)]
            if grad:
                sum(o.float().sum() for pair in outs for o in pair).backward()
    assert len(launched) == 2 * len(shapes) * 15 + 2 * 3 * 6
    missing = _not_in_report(launched, ("rotary", "rotary_from_positions", "rotary_pairs"))
    assert not missing, missing[:3]



@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_decode_launches_at_llama_shapes_compile_the_reports_builds(monkeypatch, sm):
    """Dry-runs decode attention (single pass and split + combine, with and without a sliding
    window, with and without capped scores) and the rotary + cache append at decode and
    chunked-prefill shapes: Llama-family head dims and GQA groups (MHA to 64), 1-16 new tokens,
    a few cache sizes and batches, HF's layouts (q a transposed projection, a contiguous static
    cache), and requires every launched build to be a build config for the
    device's arch (the fp32 tiles of 99 KB GPUs differ). Before the decode kernels left their
    lengths unspecialised, 1838 of 1842 such launches compiled a variant (a length of 16, 4096 or
    1, a split count) that the report never built."""
    from fastllama.ops import decode as op

    launched = _dry_run(monkeypatch, op, {op._dk: ["decode_split_kernel", "decode_combine_kernel"],
                                          op._rk: ["rotary_cache_kernel"]})
    monkeypatch.setattr(op, "table_arch", lambda device: sm)
    splits = op.default_num_splits  # its GPU choice: the device it sees is a CUDA one
    monkeypatch.setattr(op, "default_num_splits", lambda *a: splits(*a[:4], torch.device("cuda")))
    heads = [(32, 8, 128), (32, 8, 64), (32, 32, 80), (24, 8, 96), (8, 1, 256), (64, 8, 128), (32, 1, 128), (64, 1, 128)]
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, (hq, hk, d), b, tq, tmax in itertools.product(
                (torch.bfloat16, torch.float32), heads, (1, 8), (1, 2, 5, 16), (1000, 4096)):
            q = torch.empty(b, tq, hq, d, dtype=dtype).transpose(1, 2)
            k = torch.empty(b, tq, hk, d, dtype=dtype).transpose(1, 2)
            k_cache, v_cache = torch.empty(2, b, hk, tmax, d, dtype=dtype)
            seqlens = torch.full((b,), tmax // 2, dtype=torch.int32)
            table = torch.empty(tmax, d, dtype=dtype)
            per_token = torch.empty(b, tq, d, dtype=dtype)
            op.rotary_cache_append(q, k, k, k_cache, v_cache, table, table, seqlens)
            op.rotary_cache_append(q, k, k, k_cache, v_cache, table, table, seqlens, positions=seqlens)
            op.rotary_cache_append(q, k, k, k_cache, v_cache, per_token, per_token, seqlens)
            for cap in (None, 50.0):  # Gemma 2's capped scores: variants of their own
                op.decode_attention(q, k_cache, v_cache, seqlens, softcap=cap)
                op.decode_attention(q, k_cache, v_cache, seqlens, num_splits=1, softcap=cap)
                if b == 1:  # a sliding window (Mistral's, Gemma 2/3's local layers): variants too
                    op.decode_attention(q, k_cache, v_cache, seqlens, window=(511, 0), softcap=cap)
                    op.decode_attention(q, k_cache, v_cache, seqlens, num_splits=1, window=(511, 0), softcap=cap)
            if (hq, hk, d) == (32, 8, 128):  # partial rotary as Phi-4-mini's (96 of 128 dims): its own builds
                partial_table = torch.empty(tmax, 96, dtype=dtype)
                op.rotary_cache_append(q, k, k, k_cache, v_cache, partial_table, partial_table, seqlens)
                # adjacent pairs: GLM-4's on half of each head, Helium's / Ernie 4.5's on all of it
                for rotary in (table[:, :64], table):
                    op.rotary_cache_append(q, k, k, k_cache, v_cache, rotary, rotary, seqlens, interleaved=True)
                wide = table.float()  # Ernie 4.5's fp32 tables beside 16-bit q
                op.rotary_cache_append(q, k, k, k_cache, v_cache, wide, wide, seqlens, interleaved=True)
    assert len(launched) > 1000
    missing = _not_in_report(launched, ("decode_attention", "rotary_cache_append"), f"sm_{sm}")
    assert not missing, (len(missing), missing[:3])


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_latent_decode_launches_compile_the_reports_builds(monkeypatch, sm):
    """Dry-runs latent decode attention as fastllama launches it for DeepSeek-V2/V3, GLM-4.7-Flash
    (latent 512, rotary 64), Mistral 4 (256, 64) and MiniCPM3 (256, 32): heads 16 to 128, 1-16 new
    tokens, batches 1 and 8, q_latent a matmul's output; the generator's q_rope (a rotary op's) and
    caches (two views of one (B, Tmax, latent + rotary) buffer), and a patched HF model's (q_rope
    the slice of HF's transposed query, two cache tensors, left padding); single pass and split +
    combine. Every launched build must be a build config for the device's arch."""
    from fastllama.ops import decode as decode_op
    from fastllama.ops import latent_decode as op

    launched = _dry_run(monkeypatch, [op, decode_op], {op._lk: ["latent_decode_kernel"],
                                                        op._dk: ["decode_combine_kernel"]})
    monkeypatch.setattr(op, "table_arch", lambda device: sm)
    splits = op.default_num_splits  # its GPU choice: the device it sees is a CUDA one
    monkeypatch.setattr(op, "default_num_splits", lambda *a: splits(*a[:4], torch.device("cuda")))
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, (rank, rope), heads, b, tq, tmax in itertools.product(
                (torch.bfloat16, torch.float16, torch.float32), ((512, 64), (256, 64), (256, 32)), (16, 20, 40, 128),
                (1, 8),
                (1, 2, 5, 16), (1000, 4096)):
            q_latent = torch.empty(b, heads, tq, rank, dtype=dtype)
            q_rope = torch.empty(b, heads, tq, rope, dtype=dtype)
            cache = torch.empty(b, tmax, rank + rope, dtype=dtype)  # (the generator's: one buffer)
            caches = (cache[..., :rank], cache[..., rank:])
            hf_caches = (torch.empty(b, tmax, rank, dtype=dtype), torch.empty(b, tmax, rope, dtype=dtype))
            seqlens = torch.full((b,), tmax // 2, dtype=torch.int32)
            op.latent_decode_attention(q_latent, q_rope, *caches, seqlens, scale=0.1)
            op.latent_decode_attention(q_latent, q_rope, *caches, seqlens, scale=0.1, num_splits=1)
            nope = rank // 4  # (HF's query: (B, Tq, H, nope + rope) from q_b_proj, transposed)
            hf_q_rope = torch.empty(b, tq, heads, nope + rope, dtype=dtype).transpose(1, 2)[..., nope:]
            op.latent_decode_attention(q_latent, hf_q_rope, *hf_caches, seqlens, scale=0.1, cache_leftpad=seqlens // 4)
    assert len(launched) > 500
    missing = _not_in_report(launched, ("latent_decode_attention",), f"sm_{sm}")
    assert not missing, (len(missing), missing[:3])


def test_decode_linear_launches_compile_the_reports_builds(monkeypatch):
    """Dry-runs ops.decode_linear as the Generator's fused decode step launches it (1-16 rows;
    hidden sizes of Llama-3.2-1B / 3-8B, Qwen2-0.5B's 896 and 100, not a multiple of 16; each
    norm, activation, residual and bias; a strided row view) and a few 16-row tiles of more rows:
    every launched build must be a build config. (Its tiles do not depend on the arch: each
    build config is compiled for every arch, so one arch's check covers them.)"""
    from fastllama.ops import decode_gemv as op

    launched = _dry_run(monkeypatch, op, {op._k: ["decode_linear_kernel"]})
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, rows, K, norm, act, residual, bias in itertools.product(
                (torch.bfloat16, torch.float16, torch.float32), (1, 5, 16, 40), (2048, 4096, 896, 100),
                (None, *op.NORMS), op.ACTIVATIONS, (False, True), (False, True)):
            n_out = 48
            x = torch.empty(rows, 2 * K, dtype=dtype)[:, :K]  # (a row stride of its own)
            w = torch.empty(2 * n_out if act else n_out, K, dtype=dtype)
            op.decode_linear(x, w, torch.empty(w.shape[0], dtype=dtype) if bias else None,
                             norm_weight=torch.empty(K, dtype=dtype) if norm else None, norm=norm or "llama",
                             activation=act, residual=torch.empty(rows, n_out, dtype=dtype) if residual else None)
    assert len(launched) > 1000
    missing = _not_in_report(launched, ("decode_linear",), "sm_90")
    assert not missing, (len(missing), missing[:3])


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_flash_attention_untuned_launches_compile_the_reports_builds(monkeypatch, sm):
    """Dry-runs flash attention forward and backward (deterministic and atomic dQ) with autotuning
    off, as FASTLLAMA_AUTOTUNE=0 launches it: each kernel's first candidate of the device's row,
    on each table arch, and the backward preprocess (launched with Triton's default num_stages 3
    while the report compiled 1, until this test). Every launched build must be a build for that
    arch. Llama layouts: q/k/v transposed (B, T, H, D) projections, GQA, head dims 64-128."""
    from fastllama.kernels import flash_attention as kfa
    from fastllama.kernels import flash_attention_backward as kbwd
    from fastllama.ops import attention as op

    launched = _dry_run(monkeypatch, op, {kfa: ["_attn_fwd"],
                                          kbwd: ["_attn_bwd_dkdv", "_attn_bwd_dq", "_bwd_preprocess"]})
    monkeypatch.setattr(kfa, "table_arch", lambda device: sm)
    monkeypatch.setattr(op, "_AUTOTUNE", False)
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, d, deterministic, t in itertools.product((torch.bfloat16, torch.float32), (64, 80, 128),
                                                             (True, False), (16, 1000)):
            if dtype == torch.float32 and not deterministic:
                continue
            q = torch.zeros(2, t, 32, d, dtype=dtype).transpose(1, 2).requires_grad_()
            k, v = (torch.zeros(2, t, 8, d, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
            op.flash_attention(q, k, v, deterministic=deterministic).sum().backward()
    kinds = {br._python_function(b.kernel).__name__ for b in launched}
    assert kinds == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq", "_bwd_preprocess"}, kinds
    missing = _not_in_report(launched, ("flash_attention",), f"sm_{sm}")
    assert not missing, (len(missing), missing[:3])


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_flash_attention_softcap_launches_compile_the_reports_builds(monkeypatch, sm):
    """Soft-capped attention (Gemma 2: head dim 256 in 2B/9B, 128 in 27B) launches one tile per
    kernel, untimed (``softcap_config``), whatever the autotune setting: dry-runs forward and
    backward in bf16, fp16 and fp32 (exact and tf32 dots), dense and varlen, on each table arch,
    and requires every launched build to be a build for that arch."""
    from fastllama.kernels import flash_attention as kfa
    from fastllama.kernels import flash_attention_backward as kbwd
    from fastllama.ops import attention as op

    launched = _dry_run(monkeypatch, op, {kfa: ["_attn_fwd", "_attn_fwd_tuned"],
                                          kbwd: ["_attn_bwd_dkdv", "_attn_bwd_dq", "_bwd_preprocess",
                                                 "_attn_bwd_dkdv_tuned", "_attn_bwd_dq_tuned"]})
    monkeypatch.setattr(kfa, "table_arch", lambda device: sm)
    cu = torch.tensor([0, 5, 700, 1000], dtype=torch.int32)
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for (dtype, precision), (hq, hk, d), varlen in itertools.product(
                ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")),
                ((8, 4, 256), (16, 8, 256), (32, 16, 128)), (False, True)):
            b = 1 if varlen else 2
            q = torch.zeros(b, 1000, hq, d, dtype=dtype).transpose(1, 2).requires_grad_()
            k, v = (torch.zeros(b, 1000, hk, d, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
            op.flash_attention(q, k, v, softcap=50.0, window=(4095, 0), fp32_precision=precision, deterministic=False,
                               cu_seqlens=cu if varlen else None).sum().backward()
    kinds = [br._python_function(b.kernel).__name__ for b in launched]
    assert kinds.count("_attn_fwd") == 4 * 3 * 2 and set(kinds) == {"_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq",
                                                                  "_bwd_preprocess"}, kinds  # never an autotuner
    assert all(b.constexprs["SOFTCAP"] for b in launched if "SOFTCAP" in b.constexprs)
    missing = _not_in_report(launched, ("flash_attention",), f"sm_{sm}")
    assert not missing, (len(missing), missing[:3])


def test_rms_norm_and_swiglu_launches_at_llama_shapes_compile_the_reports_builds(monkeypatch):
    """Dry-runs RMSNorm (plain and with the residual) and SwiGLU (two tensors and the fused
    gate_up projection), forward and backward, at Llama hidden and intermediate sizes (and
    Gemma 3's unit-offset norms and GeGLU at its sizes), for a
    decode step, a prompt and a training batch, and requires every launched build in the report.
    They compiled every integer plain; launched, the row counts, hidden size and strides carried
    their multiple-of-16 hints (or the row count its == 1 constant): no launch was in the report."""
    import importlib

    rms = importlib.import_module("fastllama.ops.rms_norm")
    swiglu = importlib.import_module("fastllama.ops.swiglu")
    launched = _dry_run(monkeypatch, [rms, swiglu], {rms._k: ["rms_norm_fwd_kernel", "rms_norm_bwd_kernel"],
                                                     swiglu._k: ["swiglu_fwd_kernel", "swiglu_bwd_kernel"]})
    # Llama 3.2 1B/3B, 3.1 8B, 2 13B, and a toy model's 16 (the 16-wide backward tile spilled);
    # SmolLM's 960 (the 1024-wide tile) and Llama 3.1 405B's 16384 (chunked rows), not at 8k tokens
    sizes = [(2048, 8192), (3072, 8192), (4096, 14336), (5120, 13824), (16, 48)]
    small_batch = [(960, 2560), (16384, 53248)]
    cases = [(dtype, size, bt) for dtype in (torch.bfloat16, torch.float32)
             for group, bts in ((sizes, ((1, 1), (1, 77), (2, 4096))), (small_batch, ((1, 1), (1, 77))))
             for size, bt in itertools.product(group, bts)]
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, (hidden, inter), (b, t) in cases:
            x, res = (torch.empty(b, t, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
            w = torch.empty(hidden, dtype=dtype, requires_grad=True)
            y, s = rms.rms_norm(x, w, residual=res)
            (y.float().sum() + s.float().sum() + rms.rms_norm(x, w).float().sum()).backward()
            gate, up = (torch.empty(b, t, inter, dtype=dtype, requires_grad=True) for _ in range(2))
            gate_up = torch.empty(b, t, 2 * inter, dtype=dtype, requires_grad=True)
            (swiglu.swiglu(gate, up).float().sum() + swiglu.swiglu_fused(gate_up).float().sum()).backward()
    assert len(launched) == 2 * (len(sizes) * 3 + len(small_batch) * 2) * 8
    # Gemma 3 (1B, 4B, 12B, 27B): the unit-offset norms and GeGLU (27B's 5376 takes chunked rows)
    gemma = [(1152, 6912), (2560, 10240), (3840, 15360), (5376, 21504)]
    before = len(launched)
    with _interp.wrong_bf16_values_ok():
        for dtype, (hidden, inter), (b, t) in itertools.product((torch.bfloat16, torch.float32), gemma,
                                                                 ((1, 1), (1, 77))):
            x, res = (torch.empty(b, t, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
            w = torch.empty(hidden, dtype=dtype, requires_grad=True)
            y, s = rms.rms_norm(x, w, residual=res, unit_offset=True)
            (y.float().sum() + s.float().sum() + rms.rms_norm(x, w, unit_offset=True).float().sum()).backward()
            gate, up = (torch.empty(b, t, inter, dtype=dtype, requires_grad=True) for _ in range(2))
            gate_up = torch.empty(b, t, 2 * inter, dtype=dtype, requires_grad=True)
            (swiglu.swiglu(gate, up, activation="gelu_tanh").float().sum()
             + swiglu.swiglu_fused(gate_up, activation="gelu_tanh").float().sum()).backward()
    assert len(launched) - before == 2 * len(gemma) * 2 * 8
    # OLMo 2/3 (1B, 7B, 13B, 32B): norms rounded once, on hidden rows and on q/k projections (whole
    # rows too; 32B's 8 KV heads make a 1024-wide k), with and without the residual
    # (and both single-rounding norms with an fp32 weight under bf16 x, as autocast over fp32
    # weights gives them)
    olmo = (2048, 4096, 5120, 1024)
    before = len(launched)
    with _interp.wrong_bf16_values_ok():
        for (dtype, w_dtype), hidden, (b, t), flag in itertools.product(
                ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)),
                olmo, ((1, 1), (1, 77)), ("round_once", "unit_offset")):
            if flag == "unit_offset" and w_dtype == dtype:
                continue  # (Gemma's same-dtype norms: above)
            x, res = (torch.empty(b, t, hidden, dtype=dtype, requires_grad=True) for _ in range(2))
            w = torch.empty(hidden, dtype=w_dtype, requires_grad=True)
            y, s = rms.rms_norm(x, w, residual=res, **{flag: True})
            (y.float().sum() + s.float().sum() + rms.rms_norm(x, w, **{flag: True}).float().sum()).backward()
    assert len(launched) - before == (3 + 1) * len(olmo) * 2 * 4
    missing = _not_in_report(launched, ("rms_norm", "rms_norm_residual", "swiglu", "swiglu_fused",
                                        "rms_norm_unit_offset", "rms_norm_residual_unit_offset", "geglu",
                                        "rms_norm_round_once", "rms_norm_residual_round_once"))
    assert not missing, (len(missing), missing[:3])


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_cross_entropy_launches_compile_the_reports_builds(monkeypatch, sm):
    """Dry-runs linear_cross_entropy forward and backward on its three paths (logits inside the
    weight gradient, row chunks with the fp32 weight-gradient GEMM, a frozen head), mean and
    per-row losses, with a Llama and an odd vocabulary, 1, 64 and 77 rows, on each report arch
    (the GEMM's tile depends on it), and requires every launched build in the report for that
    arch. Its builds compiled every integer plain, so no launch was in it."""
    import importlib

    ce = importlib.import_module("fastllama.ops.cross_entropy")
    launched = _dry_run(monkeypatch, ce, {ce._k: ["_lse_partials_kernel", "_loss_and_grad_kernel",
                                                  "_accumulate_at_b_kernel"]})
    monkeypatch.setattr(ce, "device_arch", lambda device: sm)
    hidden = 64  # the kernels' integer classes follow the vocabulary, the hidden size and the rows
    with _interp.wrong_bf16_values_ok():  # nothing runs
        for dtype, vocab, n in ((torch.bfloat16, 32000, 77), (torch.bfloat16, 32003, 64), (torch.float32, 32003, 77),
                                (torch.bfloat16, 32000, 1)):
            labels = torch.randint(0, vocab, (n,))
            for chunk_rows, frozen, reduction in ((None, False, "mean"), (32, False, "none"), (None, True, "mean")):
                h = torch.zeros(n, hidden, dtype=dtype, requires_grad=True)
                w = torch.zeros(vocab, hidden, dtype=dtype, requires_grad=not frozen)
                loss = ce.linear_cross_entropy(h, w, labels, reduction=reduction, chunk_rows=chunk_rows,
                                               softcap=30.0 if frozen else None)
                loss.backward(torch.ones_like(loss))
    kernels = {br._python_function(x.kernel).__name__ for x in launched}
    assert kernels == {"_lse_partials_kernel", "_loss_and_grad_kernel", "_accumulate_at_b_kernel"}, kernels
    missing = _not_in_report(launched, ("linear_cross_entropy",), f"sm_{sm}")
    assert not missing, (len(missing), missing[:3])


def test_cli_refuses_an_output_or_cache_folder_it_cannot_make_before_compiling(tmp_path, monkeypatch, capsys):
    """--output / --cache-dir naming a file: an error and exit 2 before any compile (the output
    folder was made after every build had compiled: a traceback and no report)."""
    from fastllama.cli import main

    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(br, "run_report", lambda *a, **k: pytest.fail("compiled"))
    for flag in ("--output", "--cache-dir"):
        for path in ("afile", "afile/sub"):
            assert main(["build-report", "--op", "swiglu", "--arch", "sm_80", flag, str(tmp_path / path)]) == 2
            assert f"{flag}: cannot make the folder" in capsys.readouterr().err


def test_the_readme_quotes_the_committed_reports_build_count():
    """The README's "Now: N builds" is the committed report's count (it said 18857 for weeks after
    the report grew to 21877)."""
    import re

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "benchmarks/results/build/report.json").read_text())
    quoted = re.search(r"Now: (\d+)\s+builds", (root / "README.md").read_text())
    assert quoted, "README.md no longer says 'Now: N builds'"
    assert int(quoted.group(1)) == len(report["rows"])
