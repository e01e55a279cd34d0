"""Every op of the op table as a pytest-benchmark test: forward, and forward + backward.

    pytest benchmarks --benchmark-only                 # CUDA: Llama-3-8B-layer-sized shapes
    pytest benchmarks --benchmark-only --benchmark-json=out.json

Each timed call ends with ``torch.cuda.synchronize()``, so the time is the device's, not the
launch's. Shapes on CUDA come from :data:`BENCH_PARAMS` (Llama-3-8B layer sizes at 16k tokens;
decoding at batch 8 over 4k cached tokens), which a test keeps complete. Without a GPU each op runs its first (tiny)
parity case once under the Triton interpreter: that proves the benchmark runs, it measures
nothing.
"""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks.conftest import DEVICE, INTERPRETER  # (interpreter + bf16 shim set up there)
from fastllama import optable

# Llama-3-8B layer shapes: hidden 4096, intermediate 14336, 32/8 heads, head_dim 128, 16k tokens
BENCH_PARAMS = {
    "rms_norm": {"shape": (4, 4096, 4096)},
    "rms_norm_residual": {"shape": (4, 4096, 4096), "residual": True},
    "swiglu": {"shape": (4, 4096, 14336)},
    "swiglu_fused": {"shape": (4, 4096, 14336), "fused": True},
    "rotary": {"b": 4, "hq": 32, "hk": 8, "t": 4096, "d": 128, "transposed": True},
    "flash_attention": {"B": 4, "Hq": 32, "Hk": 8, "Tq": 4096, "D": 128},
    "linear_cross_entropy": {"batch": 4, "seq": 4096, "hidden": 4096, "vocab": 128256},
    "flash_attention_lse": {"B": 4, "Hq": 32, "Hk": 8, "Tq": 4096, "Tk": 4096, "D": 128},
    "rotary_from_positions": {"b": 4, "hq": 32, "hk": 8, "t": 4096, "d": 128, "rope_type": "llama3"},
    "rms_norm_linear": {"shape": (4, 4096, 4096), "outs": (4096, 2048)},  # q, then k and v together
    "swiglu_linear": {"shape": (4, 4096, 14336), "out": 4096},
    # decoding: batch 8, 4k tokens in the cache each
    "decode_attention": {"B": 8, "Hq": 32, "Hk": 8, "Tq": 1, "D": 128, "lens": (4096,) * 8, "Tmax": 4224, "splits": 16},
    "rotary_cache_append": {"B": 8, "Hq": 32, "Hk": 8, "T": 1, "D": 128, "Tmax": 4224, "seqlens": (4096,) * 8},
    # Gemma-3-12B layer shapes (hidden 3840, intermediate 15360): its (1 + w) norms and GeGLU
    "rms_norm_unit_offset": {"shape": (4, 4096, 3840), "unit_offset": True},
    "rms_norm_residual_unit_offset": {"shape": (4, 4096, 3840), "residual": True, "unit_offset": True},
    # OLMo-2-7B (hidden 4096): its norms, w rounded once
    "rms_norm_round_once": {"shape": (4, 4096, 4096), "round_once": True},
    "rms_norm_residual_round_once": {"shape": (4, 4096, 4096), "residual": True, "round_once": True},
    "geglu": {"shape": (4, 4096, 15360), "gelu": True},
    "geglu_fused": {"shape": (4, 4096, 15360), "fused": True, "gelu": True},
    # gpt-oss-20b: 64 / 8 heads of 64 dims, attention sinks, the 128-token window of half its layers
    "flash_attention_sinks": {"B": 4, "Hq": 64, "Hk": 8, "Tq": 4096, "D": 64, "window": (127, 0), "sinks": 0.0},
    # DeepSeek-V2-Lite decoding: 16 heads over a latent cache (512 + 64 per token), batch 8, 4k tokens
    "latent_decode_attention": {"B": 8, "H": 16, "Tq": 1, "R": 512, "P": 64, "lens": (4096,) * 8, "Tmax": 4224,
                                "splits": 16},
    # Llama-3-8B decoding at batch 1: gate/up with the norm before and SwiGLU after (one GEMV)
    "decode_linear": {"rows": (1,), "K": 4096, "N": 14336, "norm": "llama", "activation": "silu"},
    # GLM-4-9B: 32 / 2 heads of 128 dims, adjacent pairs of the first 64 rotated
    "rotary_pairs": {"b": 4, "hq": 32, "hk": 2, "t": 4096, "d": 128, "r": 64, "transposed": True},
}


def _case(spec) -> tuple[str, dict]:
    if INTERPRETER:
        case = next(c for c in spec.cases if not c.cuda_only)
        return case.id, case.params
    return "llama-3-8b", BENCH_PARAMS[spec.name]


SPECS = optable.all_specs()


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_op(benchmark, spec, backward):
    dtype = torch.bfloat16 if torch.bfloat16 in spec.dtypes else spec.dtypes[0]
    case_id, params = _case(spec)
    torch.manual_seed(0)
    args, kwargs = spec.make_args(params, dtype, DEVICE)
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if backward and not inputs:
        pytest.skip(f"{spec.name} has no gradient (forward-only op)")

    op = spec.bench_op or spec.op

    def outputs():
        out = op(*args, **kwargs)
        return [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]

    grads = [torch.randn_like(o) for o in outputs()] if backward else None

    def step():
        if backward:
            for a in inputs:
                a.grad = None
            torch.autograd.backward(outputs(), grads)
        else:
            with torch.no_grad():
                op(*args, **kwargs)
        _sync()  # the device's time, not the launch's

    benchmark.extra_info.update(op=spec.name, case=case_id, dtype=str(dtype).removeprefix("torch."),
                                device=DEVICE, measurement=not INTERPRETER,
                                elements=sum(a.numel() for a in args if isinstance(a, torch.Tensor)))
    if INTERPRETER:  # one call: the interpreter proves the path, it does not time it
        benchmark.pedantic(step, rounds=1, iterations=1, warmup_rounds=0)
    else:
        benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=3)
    if benchmark.disabled:  # --benchmark-disable, or under pytest-xdist: step ran once, untimed
        return
    assert math.isfinite(benchmark.stats.stats.median)


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_every_op_has_a_benchmark_shape(spec):
    """A new op without an entry would be timed on CUDA at its largest parity case: microseconds
    of launch overhead, not a measurement. The shapes are built on the meta device (no memory)."""
    assert spec.name in BENCH_PARAMS, f"add {spec.name} to BENCH_PARAMS"
    spec.make_args(BENCH_PARAMS[spec.name], torch.bfloat16, "meta")
