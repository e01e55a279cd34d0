"""Multi-head latent attention, one decode step of one layer: ``ops.latent_decode_attention`` over a
latent cache vs the two ways transformers runs it, on DeepSeek-V2-Lite's attention (16 heads,
latent 512, rotary 64, q/k heads of 128 + 64, v heads of 128).

* ``hf-expand``: what transformers >= 5.2x does each step: its cache holds the latents, and every
  step expands ALL cached tokens' keys and values through ``kv_b_proj`` (a matmul over the whole
  context), then runs SDPA over the expanded heads;
* ``expanded-cache``: a cache of expanded heads (transformers before 5.2x, and most servers
  without an MLA kernel): SDPA reads 16 x (192 + 128) elements per token, no expansion;
* ``fastllama``: each head's q_nope absorbed into the latent space (a batched matmul by its key
  rows of ``kv_b_proj``), ``ops.latent_decode_attention`` over the 576-element cache rows, the
  output taken back through the value rows.

Each row: median time, the speedup over ``hf-expand``, the cache bytes per token (per layer) each
method keeps, fastllama's achieved GB/s reading its cache (cache bytes / time) and its output's
largest difference from ``expanded-cache`` (bf16: rounding only).

Usage: ``python benchmarks/bench_latent_decode.py [--batches 1 8 32] [--contexts 512 4096 16384]``.
Without a GPU it runs one tiny fp32 shape under the Triton interpreter to prove the script works:
its times are NOT a measurement.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastllama._interpreter import use_interpreter_if_no_gpu  # noqa: E402

use_interpreter_if_no_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from fastllama import ops  # noqa: E402

QUICK_ARGS = ["--batches", "1", "8", "--contexts", "4096"]


def _layer(dims: dict, batch: int, context: int, dtype, dev):
    """A step's inputs: q (B, H, 1, nope + rope) with its rotary part rotated, the latent cache
    (B, context, rank + rope) with the new token written, kv_b_proj's weight (H (nope + v), rank)."""
    gen = torch.Generator(device=dev).manual_seed(0)
    H, nope, rope, dv, rank = dims["heads"], dims["nope"], dims["rope"], dims["v"], dims["rank"]
    q = torch.randn(batch, H, 1, nope + rope, device=dev, dtype=dtype, generator=gen)
    cache = torch.randn(batch, context, rank + rope, device=dev, dtype=dtype, generator=gen)
    w = torch.randn(H * (nope + dv), rank, device=dev, dtype=dtype, generator=gen) * rank ** -0.5
    lengths = torch.full((batch,), context, device=dev, dtype=torch.int32)
    return q, cache, w, lengths


def _methods(dims: dict, q, cache, w, lengths):
    H, nope, rope, dv, rank = dims["heads"], dims["nope"], dims["rope"], dims["v"], dims["rank"]
    B, L = cache.shape[:2]
    scale = (nope + rope) ** -0.5
    rows = w.view(H, nope + dv, rank)
    absorb_k, absorb_v = rows[:, :nope], rows[:, nope:].transpose(1, 2)

    def expand(latents):  # (B, L, rank + rope) -> k (B, H, L, nope + rope), v (B, H, L, v)
        kv = F.linear(latents[..., :rank], w).view(B, L, H, nope + dv).transpose(1, 2)
        k_rope = latents[:, None, :, rank:].expand(B, H, L, rope)
        return torch.cat((kv[..., :nope], k_rope), -1), kv[..., nope:]

    k_cache, v_cache = (t.contiguous() for t in expand(cache))

    def hf_expand():
        k, v = expand(cache)
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    def expanded_cache():
        return F.scaled_dot_product_attention(q, k_cache, v_cache, scale=scale)

    def fastllama():
        q_latent = torch.matmul(q[..., :nope], absorb_k)
        o = ops.latent_decode_attention(q_latent, q[..., nope:], cache[..., :rank], cache[..., rank:], lengths,
                                        scale=scale)
        return torch.matmul(o, absorb_v)

    element = cache.element_size()
    cache_bytes = {"hf-expand": (rank + rope) * element, "expanded-cache": H * (nope + rope + dv) * element,
                   "fastllama": (rank + rope) * element}
    return {"hf-expand": hf_expand, "expanded-cache": expanded_cache, "fastllama": fastllama}, cache_bytes


def main(argv=None) -> list[dict] | int:
    parser = argparse.ArgumentParser(description=common.description(__doc__))
    parser.add_argument("--batches", type=common.at_least(1), nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=common.at_least(1), nargs="+", default=[512, 4096, 16384])
    args = parser.parse_args(argv)

    if common.on_gpu():
        dims = dict(heads=16, nope=128, rope=64, v=128, rank=512)
        batches, contexts, dtype = args.batches, args.contexts, torch.bfloat16
    else:
        print("No GPU: a tiny shape under the Triton interpreter, to prove the script runs. NOT a measurement.")
        dims = dict(heads=4, nope=16, rope=8, v=16, rank=32)
        batches, contexts, dtype = [2], [64], torch.float32

    dev = common.device()
    rows, interrupted = [], False
    try:
        for batch in batches:
            for context in contexts:
                inputs = _layer(dims, batch, context, dtype, dev)
                methods, cache_bytes = _methods(dims, *inputs)
                with torch.no_grad():
                    reference = methods["expanded-cache"]().float()
                base = None
                for method, fn in methods.items():
                    row = {"batch": batch, "context": context, "method": method,
                           "cache KiB/token": cache_bytes[method] / 1024}
                    try:
                        with torch.no_grad():
                            ms = common.time_ms(fn)
                            diff = (fn().float() - reference).abs().max().item()
                    except Exception as e:  # noqa: BLE001  (a failing method is a row; the rest still run)
                        rows.append(dict(row, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                        print(rows[-1], flush=True)
                        continue
                    base = ms if method == "hf-expand" else base
                    rows.append(dict(row, ms=ms, speedup_vs_hf=base / ms if base else None,
                                     cache_GBps=batch * context * cache_bytes[method] / ms / 1e6,
                                     max_diff=diff))
                    print(rows[-1], flush=True)
                del inputs, methods
                if common.on_gpu():
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    columns = ["batch", "context", "method", "ms", "speedup_vs_hf", "cache KiB/token", "cache_GBps", "max_diff",
               "error"]
    extra = {"dims": dims, "dtype": str(dtype),
             "baseline": "transformers' MLA step: the latents expanded by kv_b_proj, then SDPA"}
    return common.report_rows("latent_decode", rows, columns, extra, interrupted)


if __name__ == "__main__":
    sys.exit(common.exit_code(main()))
