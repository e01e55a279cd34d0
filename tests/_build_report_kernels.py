"""Small kernels that exercise the build report (tests/test_build_report.py), each chosen for
what the GPU compiler makes of it, not for what it computes:

- ``copy_kernel``: fits anywhere; calls a jit helper, and has an autotuned alias the launcher uses;
- ``row_scale_kernel``: y = x * sum(x^2) over one 8192-wide row on one warp keeps 256 fp32 values
  per thread live across the reduction: more than the 255 registers a thread can have, so ptxas
  spills;
- ``matmul_kernel``: a pipelined K loop; with 128x128x128 fp16 tiles and 6 stages its shared
  memory fits sm_90 (224 KB <= 227 KB) but not sm_80 (192 KB > 163 KB), and it uses wgmma on
  sm_90 and mma.sync on sm_80;
- ``fill_kernel``: launched, but given no build config (the coverage check must name it).

A non-power-of-two BLOCK for ``copy_kernel`` does not lower (``tl.arange``): a compile error.
The module does not import torch (the launchers only use tensor methods): the report's compile
worker imports it, and torch would be most of that import's time.
"""
import triton
import triton.language as tl


@triton.jit
def _masked_load(ptr, offs, n):
    return tl.load(ptr + offs, mask=offs < n)


@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _masked_load(x_ptr, offs, n), mask=offs < n)


copy_kernel_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 256}, num_warps=4)], key=["n"])(copy_kernel)


@triton.jit
def row_scale_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(y_ptr + offs, x * tl.sum(x * x, axis=0))


@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # One BM x BN tile of C = A @ B, A (BM, K) and B (K, BN) row-major.
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * BN + rn[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc)


@triton.jit
def fill_kernel(y_ptr, n, value, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.full((BLOCK,), value, tl.float32), mask=offs < n)


def copy(x):
    """Launcher: a copy of the contiguous tensor ``x``."""
    y = x.new_empty(x.shape)
    copy_kernel_tuned[(triton.cdiv(x.numel(), 256),)](x, y, x.numel())
    return y


def fill(y, value: float):
    """Launcher: the contiguous fp32 tensor ``y`` filled with ``value``."""
    fill_kernel[(triton.cdiv(y.numel(), 1024),)](y, y.numel(), value, BLOCK=1024)
    return y
