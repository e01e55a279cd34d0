"""The CPU path end to end: a tiny Triton kernel under the interpreter, and the bf16 dot shim."""
import pytest
import torch
import triton
import triton.language as tl

from conftest import DEVICE, INTERPRETER


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    # One program computes the whole (M, N) product in fp32: enough to exercise tl.dot.
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def _dot(a, b):
    c = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    _matmul_kernel[(1,)](a, b, c, a.shape[0], b.shape[1], a.shape[1])
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tl_dot_matches_torch(dtype):
    torch.manual_seed(0)
    a = torch.randn(16, 32, device=DEVICE).to(dtype)
    b = torch.randn(32, 16, device=DEVICE).to(dtype)
    expected = a.double() @ b.double()
    assert (_dot(a, b).double() - expected).abs().max() < 1e-3 * expected.abs().max()


@triton.jit
def _scaled_index_kernel(out_ptr, index, scale, shift):
    tl.store(out_ptr, index * scale + shift)


@pytest.mark.skipif(not INTERPRETER, reason="the check is the interpreter's (tests/conftest.py)")
def test_an_int32_overflow_in_a_kernel_raises_under_the_interpreter():
    """tests/conftest.py's overflow check: int32 arithmetic that a GPU would wrap raises, at the
    operation that overflows, and values at the bounds pass."""
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _scaled_index_kernel[(1,)](out, 2**16, 2**15 - 1, 2**16 - 1)  # (2**31 - 1, the largest int32)
    assert out.item() == 2**31 - 1
    _scaled_index_kernel[(1,)](out, -(2**15), 2**16, 0)  # (-2**31, the smallest)
    assert out.item() == -(2**31)
    # (the interpreter re-raises what a kernel raises as its InterpreterError, naming it)
    with pytest.raises(Exception, match=r"OverflowError.*int32 overflow in a kernel's mul: the exact result 2147483648 "):
        _scaled_index_kernel[(1,)](out, 2**15, 2**16, 0)
    with pytest.raises(Exception, match=r"OverflowError.*int32 overflow in a kernel's add: the exact result -2147483649 "):
        _scaled_index_kernel[(1,)](out, -(2**15), 2**16, -1)


@pytest.mark.skipif(not INTERPRETER, reason="the shim only exists under the interpreter")
def test_bf16_dot_shim_is_needed():
    """Without the shim, the interpreter's bf16 dot multiplies raw bits and is badly wrong."""
    from triton.runtime import interpreter

    builder_cls = type(interpreter.interpreter_builder)
    shimmed = builder_cls.create_dot
    assert shimmed._fastllama_bf16_shim
    a = torch.randn(16, 32).bfloat16()
    b = torch.randn(32, 16).bfloat16()
    expected = a.double() @ b.double()
    builder_cls.create_dot = shimmed._original
    try:
        wrong = _dot(a, b).double()
    finally:
        builder_cls.create_dot = shimmed
    assert (wrong - expected).abs().max() > 1.0  # bug still present upstream: shim still needed
    assert (_dot(a, b).double() - expected).abs().max() < 1e-3 * expected.abs().max()


@triton.jit
def _store_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


@pytest.mark.skipif(not INTERPRETER, reason="the shim only exists under the interpreter")
def test_bf16_rounding_shim_is_needed():
    """The interpreter's fp32 -> bf16 cast truncates; with the shim it rounds like torch (RTNE)."""
    from triton.runtime import interpreter

    builder_cls = type(interpreter.interpreter_builder)
    shimmed = builder_cls.cast_impl
    assert shimmed._fastllama_rtne_shim
    x = torch.randn(4096)
    x[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    y = torch.empty(4096, dtype=torch.bfloat16)
    builder_cls.cast_impl = shimmed._original
    try:
        _store_kernel[(1,)](x, y, 4096)
    finally:
        builder_cls.cast_impl = shimmed
    assert (y[3:] != x[3:].bfloat16()).sum() > 1000  # bug still present upstream: shim still needed
    _store_kernel[(1,)](x, y, 4096)
    assert torch.equal(y[3:], x[3:].bfloat16()) and torch.isnan(y[0]) and torch.equal(y[1:3], x[1:3].bfloat16())


def test_ops_refuse_bf16_under_an_unfixed_interpreter(monkeypatch):
    """Without the shims the interpreter's bf16 results are garbage (a patched model's loss was
    NaN, no error): the ops refuse bf16 CPU tensors, except for byte/time counting code."""
    if not INTERPRETER:
        pytest.skip("interpreter only")
    from fastllama import _interpreter, ops

    x = torch.randn(3, 16).bfloat16()
    w = torch.ones(16, dtype=torch.bfloat16)
    ops.rms_norm(x, w)  # the suite's shims fix the interpreter: accepted
    monkeypatch.setattr(_interpreter, "_bf16_shims_installed", lambda: False)
    with pytest.raises(TypeError, match="x is bfloat16 on the CPU: the Triton interpreter computes bf16 wrongly"):
        ops.rms_norm(x, w)
    with _interpreter.wrong_bf16_values_ok():
        assert ops.rms_norm(x, w).dtype == torch.bfloat16
    ops.rms_norm(x.float(), w.float())  # fp32 is fine


def _fresh_python(code: str):
    """``code`` in a new Python without TRITON_INTERPRET in its environment (conftest set it for
    this process), as a user's program starts."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter is switched on only where there is no GPU")
def test_import_fastllama_then_load_a_model_then_patch_on_a_cpu():
    """The README's order (import fastllama, load an HF model, patch it) on a CPU-only machine:
    loading the model imports triton, after which the interpreter can no longer be switched on,
    and patch raised. ``import fastllama`` now switches it on (without importing triton)."""
    code = """
import sys, torch, fastllama
assert "triton" not in sys.modules
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=100))
ids = torch.randint(0, 100, (1, 9))
expected = model(ids).logits
fastllama.patch(model)
print(float((model(ids).logits - expected).abs().max()))
"""
    run = _fresh_python(code)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 1e-5


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter is switched on only where there is no GPU")
def test_triton_imported_first_on_a_cpu_says_what_to_do():
    run = _fresh_python("import triton, fastllama; fastllama.ops")
    assert run.returncode == 1
    assert "export TRITON_INTERPRET=1 before starting Python" in run.stderr, run.stderr
