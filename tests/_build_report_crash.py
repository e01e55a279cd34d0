"""A kernel module whose import kills the build report's compile worker, standing in for a
compiler crash. Only where FASTLLAMA_TEST_CRASH_ON_IMPORT is set: the test sets it around the
report, so the worker (which inherits the environment) dies, while pytest itself, which imports
this module at collection, does not (on a GPU machine nothing else tells the two apart)."""
import os

import triton
import triton.language as tl

if os.environ.get("FASTLLAMA_TEST_CRASH_ON_IMPORT") == "1":
    os._exit(3)


@triton.jit
def doomed_kernel(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)
