"""A kernel module whose import kills the build report's compile worker (the worker runs without
TRITON_INTERPRET), standing in for a compiler crash; under the interpreter it imports normally."""
import os

import triton
import triton.language as tl

if os.environ.get("TRITON_INTERPRET") != "1":
    os._exit(3)


@triton.jit
def doomed_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)
