"""RMSNorm (+residual), rotary and SwiGLU (and Gemma's norm and GeGLU): fastllama vs PyTorch eager (the HF module code) and
torch.compile of that code, forward and forward+backward, on Llama-3-8B layer sizes.

Shapes: hidden 4096, intermediate 14336, 32 query / 8 key-value heads of dim 128, at 1k-16k
tokens (batch 1), bf16. Each row reports the median time, GB/s counting the bytes each op must
read and write once (the minimum traffic; gradients included for forward+backward), that as a
% of the device's copy bandwidth measured in the same run, and the speedup over eager.
Targets (issue 3): forward >= 80% of copy bandwidth at >= 32 MB, and >= 2x eager.

Usage: ``python benchmarks/bench_norm_rope_swiglu.py [--tokens 1024 4096 16384] [--no-compile]``.
Under the Triton interpreter (no GPU) it runs one tiny fp32 shape per op, eager vs fastllama only,
to prove the script works: NOT a measurement.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastllama._interpreter import use_interpreter_if_no_gpu, wrong_bf16_values_ok  # noqa: E402

use_interpreter_if_no_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from fastllama import ops, reference  # noqa: E402


# ----------------------------------------------------------------------------------------------
# What HF runs (copied from transformers' modeling_llama, so the baseline needs no transformers)
# ----------------------------------------------------------------------------------------------
def hf_rms_norm(hidden_states, weight, eps=1e-5):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + eps)
    return weight * hidden_states.to(input_dtype)


def hf_add_rms_norm(x, residual, weight):
    s = x + residual
    return hf_rms_norm(s, weight), s


def hf_rotary(q, k, cos, sin):
    return reference.apply_rotary_pos_emb(q, k, cos, sin)  # HF's formula, rotate_half and all


def hf_rotary_from_positions(q, k, position_ids, inv_freq):
    cos, sin = reference.rope_cos_sin(position_ids, inv_freq, dtype=q.dtype)  # LlamaRotaryEmbedding
    return hf_rotary(q, k, cos, sin)


def hf_swiglu(gate, up):
    return F.silu(gate) * up


def hf_swiglu_fused(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def hf_gemma_rms_norm(x, weight, eps=1e-6):
    """Gemma3RMSNorm.forward: (normed * (1 + w)) in fp32, rounded once."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (h * (1.0 + weight.float())).type_as(x)


def hf_geglu(gate, up):
    """Gemma3MLP's gate: gelu_pytorch_tanh(gate) * up."""
    return F.gelu(gate, approximate="tanh") * up


# ----------------------------------------------------------------------------------------------
# Cases: inputs, the three implementations, and the bytes each must move
# ----------------------------------------------------------------------------------------------
def _cases(tokens: int, dims: dict, dtype, dev):
    """name -> (inputs, {method: fn}, forward bytes, backward bytes)."""
    h, inter, hq, hk, d = dims["hidden"], dims["intermediate"], dims["hq"], dims["hk"], dims["d"]
    e = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape, grad=True):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen).requires_grad_(grad)

    pos = torch.arange(tokens, device=dev)[None]
    inv_freq = reference.rope_inv_freq(d, 500000.0).to(dev)
    cos, sin = reference.rope_cos_sin(pos, inv_freq, dtype=dtype)
    # HF layout: (B, T, H, D) transposed. Leaves, so no gradient accumulates into a base tensor.
    q = rand(1, tokens, hq, d, grad=False).transpose(1, 2).requires_grad_()
    k = rand(1, tokens, hk, d, grad=False).transpose(1, 2).requires_grad_()
    qk = (hq + hk) * tokens * d * e
    n = tokens * h * e
    m = tokens * inter * e
    return {
        # forward reads x, writes y; backward reads x, dy, writes dx (weight traffic is tiny)
        "rms_norm": ((rand(tokens, h), rand(h)),
                     {"eager": hf_rms_norm, "fastllama": lambda x, w: ops.rms_norm(x, w, 1e-5)}, 2 * n, 3 * n),
        # forward reads x, r, writes y, s; backward reads s, dy, ds, writes dx (= d residual)
        "add_rms_norm": ((rand(tokens, h), rand(tokens, h), rand(h)),
                         {"eager": hf_add_rms_norm, "fastllama": lambda x, r, w: ops.rms_norm(x, w, 1e-5, residual=r)},
                         4 * n, 4 * n),
        # forward reads q, k, cos, sin, writes q, k; backward the same with gradients
        "rotary": ((q, k, cos, sin), {"eager": hf_rotary, "fastllama": ops.apply_rotary_pos_emb},
                   2 * qk + 2 * tokens * d * e, 2 * qk + 2 * tokens * d * e),
        "rotary_from_positions": ((q, k, pos, inv_freq),
                                  {"eager": hf_rotary_from_positions,
                                   "fastllama": ops.apply_rotary_pos_emb_from_positions}, 2 * qk, 2 * qk),
        # forward reads gate, up, writes out; backward reads d_out, gate, up, writes d_gate, d_up
        "swiglu": ((rand(tokens, inter), rand(tokens, inter)), {"eager": hf_swiglu, "fastllama": ops.swiglu},
                   3 * m, 5 * m),
        "swiglu_fused": ((rand(tokens, 2 * inter),), {"eager": hf_swiglu_fused, "fastllama": ops.swiglu_fused},
                         3 * m, 5 * m),
        # Gemma's: the (1 + w) norm rounded once, and GeGLU (same bytes as their Llama twins)
        "gemma_rms_norm": ((rand(tokens, h), rand(h)),
                           {"eager": hf_gemma_rms_norm,
                            "fastllama": lambda x, w: ops.rms_norm(x, w, 1e-6, unit_offset=True)}, 2 * n, 3 * n),
        "geglu": ((rand(tokens, inter), rand(tokens, inter)),
                  {"eager": hf_geglu, "fastllama": lambda g, u: ops.swiglu(g, u, activation="gelu_tanh")},
                  3 * m, 5 * m),
    }


def _timed(fn, inputs, backward: bool):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        out = fn(*inputs)
        torch.autograd.backward(out if isinstance(out, tuple) else (out,), grads)

    return common.time_ms(forward_backward if backward else forward)


# (under the interpreter bf16 values are wrong; this smoke run reports times and bytes only)
@wrong_bf16_values_ok()
def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=common.description(__doc__))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    args = parser.parse_args(argv)

    if common.on_gpu():
        dims = dict(hidden=4096, intermediate=14336, hq=32, hk=8, d=128)
        tokens_list, dtype, compile_ = args.tokens, torch.bfloat16, not args.no_compile
        copy_gbps = common.copy_bandwidth_gbps()
    else:  # interpreter smoke run: one tiny shape, no compile (inductor would build C++ for eager)
        print("No GPU: tiny shapes under the Triton interpreter, to prove the script runs. NOT a measurement.")
        dims = dict(hidden=256, intermediate=512, hq=4, hk=2, d=64)
        tokens_list, dtype, compile_, copy_gbps = [64], torch.float32, False, None

    dev = common.device()
    rows = []
    interrupted = False
    try:
        for tokens in tokens_list:
            for name, (inputs, fns, fwd_bytes, bwd_bytes) in _cases(tokens, dims, dtype, dev).items():
                methods = dict(fns)
                if compile_:  # static shapes: dynamo caches per code object, and from the second
                    torch._dynamo.reset()  # token count on would compile the baseline symbolically
                    methods["compile"] = torch.compile(fns["eager"], dynamic=False)
                for backward, nbytes in ((False, fwd_bytes), (True, fwd_bytes + bwd_bytes)):
                    base = None
                    for method in ("eager", "compile", "fastllama"):
                        if method not in methods:
                            continue
                        row = {"op": name, "pass": "fwd+bwd" if backward else "fwd", "tokens": tokens,
                               "MB": nbytes / 1e6, "method": method}
                        try:
                            ms = _timed(methods[method], inputs, backward)
                        except Exception as e:  # noqa: BLE001  (a failing method is a row; the rest still run)
                            if isinstance(e, torch.OutOfMemoryError):
                                torch.cuda.empty_cache()
                            rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                            print(rows[-1], flush=True)
                            continue
                        gbps = nbytes / ms / 1e6
                        row.update({"ms": ms, "GB/s": gbps, "%copy": 100 * gbps / copy_gbps if copy_gbps else None})
                        base = ms if method == "eager" else base
                        row["speedup_vs_eager"] = base / ms if base else None
                        rows.append(row)
                        print(row, flush=True)
                del inputs, methods
            if common.on_gpu():
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    columns = ["op", "pass", "tokens", "MB", "method", "ms", "GB/s", "%copy", "speedup_vs_eager", "error"]
    extra = {"dims": dims, "dtype": str(dtype), "copy_GBps": copy_gbps,
             "bytes": "minimum traffic: each tensor read or written once (gradients included for fwd+bwd)",
             "targets": {"fwd %copy at >= 32 MB": ">= 80", "speedup_vs_eager": ">= 2"}}
    return common.report_rows("norm_rope_swiglu", rows, columns, extra, interrupted)


if __name__ == "__main__":
    sys.exit(common.exit_code(main()))
