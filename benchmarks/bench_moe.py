"""Mixture-of-experts experts: ``ops.moe_experts`` vs transformers' own experts (its grouped-matmul
implementation, what HF training runs on an sm_80+ GPU), forward and forward+backward, on a
Qwen3-30B-A3B layer (hidden 2048, 128 experts of intermediate 768, 8 per token).

Each row reports the median time, the speedup over HF's, and the bytes kept for backward per
token (``saved_tensors_hooks``: device-independent, counted once per storage, the inputs and the
weights left out) with their ratio to HF's. Routing is a softmax router's top-k on random
logits, so the experts get uneven loads as they do in training.

Usage: ``python benchmarks/bench_moe.py [--tokens 4096 16384]``. Under the Triton interpreter (no
GPU) it runs one tiny fp32 shape, to prove the script works: its times are NOT a measurement (its
saved bytes are exact for that shape).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastllama._interpreter import use_interpreter_if_no_gpu  # noqa: E402

use_interpreter_if_no_gpu()

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
from fastllama import ops  # noqa: E402


def hf_experts(dims: dict, dtype, dev):
    """transformers' Qwen3-MoE experts module with the given weights' shapes, on its grouped
    matmuls."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=dims["hidden"], moe_intermediate_size=dims["intermediate"],
                         num_experts=dims["experts"], num_experts_per_tok=dims["k"])
    cfg._experts_implementation = "grouped_mm"
    with torch.device(dev):
        module = Qwen3MoeExperts(cfg).to(dtype)
    with torch.no_grad():  # (created with torch.empty: whatever the memory held)
        module.gate_up_proj.normal_(0, dims["hidden"] ** -0.5)
        module.down_proj.normal_(0, dims["intermediate"] ** -0.5)
    return module


def _inputs(tokens: int, dims: dict, dtype, dev):
    gen = torch.Generator(device=dev).manual_seed(0)
    h, e, k = dims["hidden"], dims["experts"], dims["k"]
    hidden = torch.randn(tokens, h, device=dev, dtype=dtype, generator=gen).requires_grad_()
    logits = torch.randn(tokens, e, device=dev, generator=gen)
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype).requires_grad_()
    return hidden, index, weights


def _saved_bytes(fn, inputs, params) -> int:
    """Bytes autograd keeps for backward, each storage once, inputs and weights left out."""
    skip = {t.untyped_storage().data_ptr() for t in (*inputs, *params) if isinstance(t, torch.Tensor)}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def _timed(fn, inputs, params, backward: bool):
    leaves = [t for t in (*inputs, *params) if isinstance(t, torch.Tensor) and t.requires_grad]
    grad = torch.randn_like(fn(*inputs))

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        for t in leaves:
            t.grad = None
        fn(*inputs).backward(grad)

    return common.time_ms(forward_backward if backward else forward)


def main(argv=None) -> list[dict] | int:
    parser = argparse.ArgumentParser(description=common.description(__doc__))
    parser.add_argument("--tokens", type=common.at_least(1), nargs="+", default=[4096, 16384])
    args = parser.parse_args(argv)

    if common.on_gpu():
        dims = dict(hidden=2048, intermediate=768, experts=128, k=8)
        tokens_list, dtype = args.tokens, torch.bfloat16
    else:
        print("No GPU: a tiny shape under the Triton interpreter, to prove the script runs. NOT a measurement.")
        dims = dict(hidden=64, intermediate=32, experts=8, k=2)
        tokens_list, dtype = [64], torch.float32

    dev = common.device()
    module = hf_experts(dims, dtype, dev)
    params = (module.gate_up_proj, module.down_proj)
    methods = {
        "hf": lambda x, i, w: module(x, i, w),
        "fastllama": lambda x, i, w: ops.moe_experts(x, i, w, module.gate_up_proj, module.down_proj),
    }
    rows, interrupted = [], False
    try:
        for tokens in tokens_list:
            inputs = _inputs(tokens, dims, dtype, dev)
            saved = {m: _saved_bytes(fn, inputs, params) for m, fn in methods.items()}
            for backward in (False, True):
                base = None
                for method, fn in methods.items():
                    row = {"pass": "fwd+bwd" if backward else "fwd", "tokens": tokens, "method": method,
                           "saved KiB/token": saved[method] / tokens / 1024,
                           "saved vs hf": saved[method] / saved["hf"] if saved["hf"] else None}
                    try:
                        ms = _timed(fn, inputs, params, backward)
                    except Exception as e:  # noqa: BLE001  (a failing method is a row; the rest still run)
                        rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                        print(rows[-1], flush=True)
                        continue
                    base = ms if method == "hf" else base
                    rows.append(dict(row, ms=ms, speedup_vs_hf=base / ms if base else None))
                    print(rows[-1], flush=True)
            del inputs
            if common.on_gpu():
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    columns = ["pass", "tokens", "method", "ms", "speedup_vs_hf", "saved KiB/token", "saved vs hf", "error"]
    extra = {"dims": dims, "dtype": str(dtype), "baseline": "transformers' Qwen3MoeExperts, grouped_mm"}
    return common.report_rows("moe_experts", rows, columns, extra, interrupted)


if __name__ == "__main__":
    sys.exit(common.exit_code(main()))
