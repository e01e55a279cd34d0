"""The one table of ops: what each fastllama op is checked against, on which shapes.

The parity tests (tests/test_op_parity.py), ``fastllama.verify`` and the op benchmarks read this
table, so adding an op means adding one :class:`OpSpec` here (plus its kernel, op and reference).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import torch

__all__ = ["OpCase", "KernelBuild", "INT_HINTS", "REPORT_ARCHS", "device_arch", "shared_memory_per_block", "by_arch",
           "OpSpec", "OPS", "all_specs", "get"]


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One shape case. ``params`` go to ``OpSpec.make_args``; ``cuda_only`` cases are too slow
    for the interpreter and run only on a GPU (pytest marker ``cuda_only``)."""

    id: str
    params: dict
    cuda_only: bool = False


# The two classes Triton sorts an integer argument into at launch besides == 1 (a constant),
# as {label suffix: signature type}: build configs list the classes their launches give an
# integer (tests/test_build_report.py dry-runs the launches against them).
INT_HINTS = {"": "i32", " %16": "i32:16"}

# The archs the build report compiles for (``build_report.ARCHS``), each also a config-table arch
# of the ops (``kernels.flash_attention.table_arch``: sm_86 stands for sm_89 too).
REPORT_ARCHS = ("sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def shared_memory_per_block(device: torch.device) -> int:
    """The opt-in shared memory per block of a CUDA device, bytes (what Triton's launcher checks)."""
    shared = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", None)
    if shared is None:  # torch before 2.6 does not report it
        import triton

        shared = triton.runtime.driver.active.utils.get_device_properties(
            device.index if device.index is not None else torch.cuda.current_device())["max_shared_mem"]
    return shared


def device_arch(device: torch.device) -> int:
    """Which arch of ``REPORT_ARCHS`` a device runs the builds of, as a number: 90 for sm_90
    (H100/H200); 100 for compute capability 10.x and 11.x (B200, B300, Jetson Thor: Triton's
    Blackwell code path; the report compiles sm_100 alone); 80 for other GPUs with 163 KB of
    shared memory per block or more (A100); 120 for 12.x (RTX 50, sm_120; DGX Spark's sm_121) and
    86 for other GPUs with 99 KB (A10, A40, RTX 30, sm_86; L4, L40S, RTX 40, sm_89: the same
    registers and shared memory in every build compiled for both). A GPU with less (T4, V100) is
    none of them: it gets 80, whose builds the report never checked there (attention refuses it:
    ``kernels.flash_attention.table_arch``). 0 for a device that is not CUDA (the interpreter)."""
    if device.type != "cuda":
        return 0
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


# Opt-in shared memory per block that separates the table archs: A100 has 163 KB (what sm_80's
# tables are checked against), H100/B200 227 KB, sm_86/89/120 99 KB. Below 99 KB (T4, V100)
# attention refuses the GPU.
SHARED_MEMORY_SM80 = 163 * 1024
SHARED_MEMORY_SM86 = 99 * 1024


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) == (9, 0):
        return 90
    shared = shared_memory_per_block(torch.device("cuda", index))
    if shared >= SHARED_MEMORY_SM80:
        return 100 if major in (10, 11) else 80
    if shared >= SHARED_MEMORY_SM86:
        return 120 if major == 12 else 86
    return 80


def by_arch(config: Callable[[int], Any]) -> list[tuple[Any, tuple[str, ...] | None]]:
    """The distinct values of ``config(sm)`` (sm = 80, 86, 90, 100, 120), each with the archs
    that launch it, for ``KernelBuild.archs`` (None: every arch). Values are compared with ==
    (config dicts work)."""
    groups: list[tuple[Any, list[str]]] = []
    for arch in REPORT_ARCHS:
        value = config(int(arch.removeprefix("sm_")))
        same = next((archs for v, archs in groups if v == value), None)
        if same is None:
            groups.append((value, [arch]))
        else:
            same.append(arch)
    return [(value, None if len(a) == len(REPORT_ARCHS) else tuple(a)) for value, a in groups]


@dataclasses.dataclass(frozen=True)
class KernelBuild:
    """One kernel specialisation that the op can launch, to compile for every report arch without a
    GPU (the build report). ``signature`` maps every non-constexpr argument name of the
    ``@triton.jit`` function to its Triton type string ("*fp16", "*bf16", "*fp32", "i32", "i64",
    "fp32"; "i32:16" for an integer the runtime sees as a multiple of 16 — Triton specialises such
    strides at launch, and compiling them unspecialised overstates registers and spills;
    "constexpr" for an integer argument the launch passes as 1, which Triton also specialises,
    with its value in ``constexprs``); ``constexprs`` gives the constexpr arguments (block sizes,
    flags, head dim). ``archs`` limits the build to some of the report's archs ("sm_90" for a
    tile only Hopper launches); None means all of them."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    label: str = ""
    archs: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op and its truth.

    ``make_args(params, dtype, device)`` returns ``(args, kwargs)``: ``args`` are the tensors
    (floating ones with ``requires_grad`` set where a gradient is checked), ``kwargs`` the
    non-tensor options, passed to both ``op`` and ``reference``. ``kernels`` names the
    ``fastllama.kernels`` modules the op launches (the build report covers them).
    """

    name: str
    op: Callable[..., Any]
    reference: Callable[..., Any]
    make_args: Callable[[dict, torch.dtype, str], tuple[tuple, dict]]
    cases: tuple[OpCase, ...]
    kernels: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    # labels of the args in parity tables; a case whose make_args leaves optional trailing
    # arguments out (a bias, a residual) takes the first len(args) of them
    names: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    # Every (kernel, config) the op may launch: autotune configs x the constexpr specialisations
    # it uses (head_dim, causal, dtype ...). The build report compiles them all.
    build_configs: Callable[[], list[KernelBuild]] | None = None
    # Other standard PyTorch formulations of the op (called like ``reference``): PyTorch's own
    # error is the largest of theirs and the reference's, tensor by tensor (parity_report's
    # list torch_op), as when the op's usual PyTorch path differentiates another way.
    torch_ops: tuple[Callable[..., Any], ...] = ()
    # What the op benchmarks time (called like ``op``), where ``op`` does more than the op
    # itself for the parity harness: rotary_cache_append's ``op`` appends into copies of the
    # caches, and the copies would dominate the timing.
    bench_op: Callable[..., Any] | None = None

    def parity(self, case: OpCase, dtype: torch.dtype, device: str, title: str = ""):
        """Builds ``case``'s inputs and runs the parity harness on them: a
        :class:`fastllama.testing.ParityReport` (the parity tests and ``fastllama parity``)."""
        from .testing import parity_report

        args, kwargs = self.make_args(case.params, dtype, device)
        names = self.names[:len(args)] if self.names is not None else None
        torch_ops = [functools.partial(f, **kwargs) for f in (self.reference, *self.torch_ops)]
        return parity_report(functools.partial(self.op, **kwargs), functools.partial(self.reference, **kwargs),
                             *args, torch_op=torch_ops, names=names, output_names=self.output_names, title=title)


def _build() -> list[OpSpec]:
    """Imported lazily: building the table imports the ops (and so triton)."""
    specs: list[OpSpec] = []
    # Each op module contributes its spec(s) with an `OP_SPECS` list.
    from . import ops  # noqa: F401  (switches the interpreter on where needed)

    for module in _OP_MODULES:
        mod = __import__(f"fastllama.ops.{module}", fromlist=["OP_SPECS"])
        specs.extend(mod.OP_SPECS)
    return specs


# fastllama.ops submodules that define OP_SPECS; a new op adds its module name here.
_OP_MODULES: list[str] = []
_OP_MODULES.append("cross_entropy")
_OP_MODULES.append("attention")
_OP_MODULES.append("rms_norm")
_OP_MODULES.append("rotary")
_OP_MODULES.append("swiglu")
_OP_MODULES.append("fused_linear")
_OP_MODULES.append("decode")
_OP_MODULES.append("latent_decode")
_OP_MODULES.append("decode_gemv")

_CACHE: list[OpSpec] = []


def all_specs() -> list[OpSpec]:
    """Every registered op spec."""
    if not _CACHE:
        _CACHE.extend(_build())
    return list(_CACHE)


def get(name: str) -> OpSpec:
    """The spec named ``name``; KeyError lists the known names."""
    for spec in all_specs():
        if spec.name == name:
            return spec
    raise KeyError(f"no op named {name!r}; known: {[s.name for s in all_specs()]}")


OPS = all_specs  # alias: OPS() lists the table
