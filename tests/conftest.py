"""Runs the suite on CUDA when present, else on the CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so this happens at the top of
conftest, before any test module imports fastllama.ops.
"""
from __future__ import annotations

import contextlib
import os

from fastllama._interpreter import use_interpreter_if_no_gpu

INTERPRETER = use_interpreter_if_no_gpu()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cpu" if INTERPRETER else "cuda"

# Under pytest-xdist (the README's `-n auto`) each worker gets its share of the cores for torch's
# own threads: N workers of N threads each would oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def _install_bf16_dot_shim() -> None:
    """Works around triton-lang/triton#11584 in the interpreter only.

    The interpreter keeps bfloat16 values as their raw uint16 bits, and its ``tl.dot`` hands those
    bits to ``np.matmul`` as integers. The shim widens bf16 operands to fp32 (bf16 is the top half
    of an fp32, so the widening is exact) before the original dot runs. It lives here, never in
    the library: on a GPU ``tl.dot`` is right.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = type(interpreter.interpreter_builder)
    if getattr(builder_cls.create_dot, "_fastllama_bf16_shim", False):
        return
    original = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar == tl.bfloat16:
            bits = handle.data.astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._fastllama_bf16_shim = True
    create_dot._original = original
    builder_cls.create_dot = create_dot


def _install_bf16_rounding_shim() -> None:
    """Makes the interpreter round fp32 -> bf16 to nearest even, as the GPU does.

    The interpreter's fp32 -> bf16 cast drops the low 16 bits (round toward zero), so every bf16
    value a kernel stores is biased toward zero: about half the elements differ from
    ``x.bfloat16()`` and a whole model's bf16 loss drifts measurably. On a GPU ``.to(tl.bfloat16)``
    and stores round to nearest even. Like the dot shim, this lives only in the tests.
    """
    import triton.language as tl
    from triton.runtime import interpreter

    builder_cls = type(interpreter.interpreter_builder)
    if getattr(builder_cls.cast_impl, "_fastllama_rtne_shim", False):
        return
    original = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = np.isnan(src.data)
            out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
            return interpreter.TensorHandle(out, tl.bfloat16)
        return original(self, src, dst_type)

    cast_impl._fastllama_rtne_shim = True
    cast_impl._original = original
    builder_cls.cast_impl = cast_impl


def _install_cached_language_patching() -> None:
    """Speeds the interpreter up; changes nothing it computes.

    Before every launch, and again before every call of a jit helper (``load_rows``, ...), the
    interpreter re-points each builtin of ``triton.language`` at its numpy version, finding
    them with ``inspect.getmembers`` over the whole module: about 1 ms a call, a fifth of an
    interpreted model's run time in this suite. The builtins of a module never change, so
    the shim lists them once per module and patches exactly those the original would: the
    ones still bound to their builtin (a member patched earlier is a plain function now, which
    the original's ``is_builtin`` test skips too).
    """
    import inspect

    from triton.language.core import is_builtin
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_builtin", None)
    if original is None or getattr(original, "_fastllama_cached", False):
        return
    if list(inspect.signature(original).parameters) != ["pkg", "builder", "scope"]:
        return  # (another triton: leave it alone rather than guess)
    builtins: dict[object, list] = {}  # module or class -> its (name, builtin) pairs

    def _patch_builtin(pkg, builder, scope):
        if pkg not in builtins:
            builtins[pkg] = [(n, m) for n, m in inspect.getmembers(pkg) if is_builtin(m)]
        for name, member in builtins[pkg]:
            if getattr(pkg, name, None) is member:
                interpreter._patch_attr(pkg, name, member, builder, scope)

    _patch_builtin._fastllama_cached = True
    interpreter._patch_builtin = _patch_builtin


def _install_overflow_check() -> None:
    """Makes the interpreter's int32 overflow check check, at a fraction of its cost.

    For every integer ``+``, ``-`` and ``*`` in a kernel, Triton's semantic layer redoes the
    operation in int64, compares it with the type's bounds and hands the result to
    ``device_assert``, which does nothing unless the builder's ``debug`` option is set, and the
    interpreter's never is. So the interpreter paid about a third of an interpreted decode
    step's time for a check that could not fail. The shim does the same check in numpy on the
    operands' values, and raises: an int32 overflow in a test means that the GPU, which does not
    check, would wrap the value and silently compute something else (an address in another
    tensor, a mask bound of the wrong sign).
    """
    from triton.language.semantic import TritonSemantic
    from triton.runtime import interpreter

    original = getattr(TritonSemantic, "binary_op_sanitize_overflow_impl", None)
    builder_cls = getattr(interpreter, "InterpreterBuilder", None)
    if original is None or builder_cls is None or getattr(original, "_fastllama_checked", False):
        return
    exact = {"add": np.add, "sub": np.subtract, "mul": np.multiply}

    def check(self, lhs, rhs, binary_op):
        # (one method for every builder: Triton 3.6 makes a TritonSemantic per call; compiling
        # for a GPU keeps the original, which the GPU backends' options switch off)
        scalar = lhs.type.scalar
        if (not isinstance(self.builder, builder_cls) or not self.builder.options.sanitize_overflow
                or scalar.int_bitwidth >= 64 or binary_op.__name__ not in exact):
            return original(self, lhs, rhs, binary_op)
        result = exact[binary_op.__name__](np.asarray(lhs.handle.data, dtype=np.int64),
                                           np.asarray(rhs.handle.data, dtype=np.int64))
        low, high = scalar.get_int_min_value(), scalar.get_int_max_value()
        if np.any(result > high) or np.any(result < low):
            bad = result[(result > high) | (result < low)].flat[0] if np.ndim(result) else result
            raise OverflowError(f"int{scalar.int_bitwidth} overflow in a kernel's {binary_op.__name__}: "
                                f"the exact result {int(bad)} is outside [{low}, {high}] (the GPU would wrap it)")

    check._fastllama_checked = True
    TritonSemantic.binary_op_sanitize_overflow_impl = check


def _install_lang_patching_once_per_launch() -> None:
    """Speeds the interpreter up; changes nothing it computes.

    A launch points ``triton.language``'s builtins at their interpreted versions, runs every
    program, and puts the builtins back when it ends. Each call of a jit helper inside it
    (``load_rows``, ``block_span`` ...: thousands per launch) did the whole re-pointing again,
    scanning the helper module's globals for the language modules first: a tenth of an
    interpreted attention test, for modules the launch had already re-pointed. The shim skips a
    helper's re-pointing while the running launch has done it for every language module the
    helper sees; the launch's own re-pointing and its restore are unchanged, and so is a helper
    called outside a launch.
    """
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or scope_cls is None or executor is None or getattr(original, "_fastllama_once", False):
        return
    if list(inspect.signature(original).parameters) != ["fn"]:
        return  # (another triton: leave it alone rather than guess)
    launches = [0]  # launches running (0 or 1: a kernel cannot launch one)
    patched: set[int] = set()  # the language modules the running launch has re-pointed
    seen: dict[int, tuple] = {}  # id(globals) -> (globals, the language modules in them)

    def _patch_lang(fn):
        entry = seen.get(id(fn.__globals__))
        if entry is None:  # (the globals are kept in the entry: their id is never reused)
            langs = frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)
            entry = seen[id(fn.__globals__)] = (fn.__globals__, langs)
        langs = entry[1]
        if launches[0] and langs and langs <= patched:
            return scope_cls()  # (a helper's scope is never restored: nothing to restore here)
        scope = original(fn)
        if launches[0]:
            patched.update(langs)
        return scope

    launch = executor.__call__

    def __call__(self, *args, **kwargs):
        launches[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:  # (the launch has put the builtins back)
            launches[0] -= 1
            patched.clear()

    _patch_lang._fastllama_once = True
    interpreter._patch_lang = _patch_lang
    executor.__call__ = __call__


if INTERPRETER:
    _install_bf16_dot_shim()
    _install_bf16_rounding_shim()
    _install_cached_language_patching()
    _install_overflow_check()
    _install_lang_patching_once_per_launch()


@pytest.fixture
def device() -> str:
    """"cuda" on a GPU machine, "cpu" (Triton interpreter) otherwise."""
    return DEVICE


@contextlib.contextmanager
def deterministic_algorithms():
    """``torch.use_deterministic_algorithms(True)`` inside a ``with`` block, restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def enable_activation_checkpointing(model) -> None:
    """HF's activation checkpointing switch: ``activation_checkpointing_enable`` since
    transformers 5.24, ``gradient_checkpointing_enable`` before (5.17 on the GPU machines)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


# optionalhook: without pytest-xdist (the GPU machines' image lacks it) pytest would refuse an
# unknown hook and run nothing.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: on the CPU one worker per core, at most 8 (each holds torch, transformers and
    the interpreter: about 1.5 GB); on CUDA one, since workers would share the GPU's memory and
    time each other's autotuning."""
    return min(os.cpu_count() or 1, 8) if INTERPRETER else 1


def pytest_collection_modifyitems(config, items):
    if not INTERPRETER:
        return
    skip = pytest.mark.skip(reason="cuda_only: full shape matrix, needs a CUDA device (interpreter too slow)")
    for item in items:
        if "cuda_only" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"fastllama device: {DEVICE} ({'Triton interpreter' if INTERPRETER else torch.cuda.get_device_name()})"
