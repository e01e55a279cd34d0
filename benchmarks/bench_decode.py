"""Decoding speed: fastllama's Generator vs Hugging Face ``generate`` (sdpa, static cache).

Models: Llama-3.2-1B and Llama-3-8B shapes with random bf16 weights (the same weights in both
implementations); on request (``--models gemma3-1b``) the Gemma-3-1B shape, a transformers
``Gemma3ForCausalLM`` that both run (5 of its 6 layers attend to a 512-token window, which
fastllama's decode kernel reads alone), (``--models gemma2-2b``) the Gemma-2-2B shape, whose
attention scores are soft-capped (HF runs it with eager attention: its sdpa path has no cap), and
(``--models minicpm3-4b``) the MiniCPM3-4B shape, dense multi-head latent attention (fastllama
decodes over its latent cache with ``ops.latent_decode_attention``; HF expands the cached
latents every step). For each batch (1, 8, 32) and context (512, 4096): a random prompt of
``context`` tokens, then ``--new-tokens`` greedy tokens (no stop token), timed after a warm-up
call (which captures the CUDA graphs / compiles).

Rows:
- ``fastllama``: ``fastllama.generate.Generator`` (decode step = one CUDA graph); column ``step``:
  which decode step its capture timed faster and kept, ``fused`` (each layer's linears through
  ``ops.decode_linear``, the norms, SwiGLU and residual adds folded in) or ``cuBLAS``; column
  ``capture ms cuBLAS/fused``: the milliseconds per step its capture timed for each (GPU only);
- ``fastllama-fused-step`` / ``fastllama-cublas-step`` (batch 1 only, on models the fused step
  serves): the same with ``fused_decode=True`` / ``False``, both timed in full;
- ``fastllama-unfused`` (batch 1 only): the same with ``fuse_projections=False`` (q/k/v and
  gate/up as separate GEMVs), to measure what the fused projections give;
- ``hf-static``: ``LlamaForCausalLM.generate(cache_implementation="static",
  disable_compile=True)``, sdpa attention;
- ``hf-static-patched``: ``hf-static`` of the model after ``fastllama.patch`` (HF's generate
  loop and cache, fastllama's kernels: the decode kernel, a latent attention's steps over its
  cached latents), unpatched after;
- ``hf-static-compile``: the same as ``hf-static`` with HF's automatic ``torch.compile`` of the forward
  (mode "reduce-overhead", i.e. CUDA graphs too), static shapes: dynamo starts afresh for each
  (batch, context), so every row times a graph compiled for its own shape, as the first does.

Decode time excludes prefill: fastllama reports its decode steps directly; HF's is
``(t(new_tokens) - t(2)) / (new_tokens - 2)`` (see ``time_hf``). Bytes per decode step = every
weight read once (LM head included, the embedding rows are negligible) + the K and V cache read
up to the mean context of the timed steps (a windowed layer's window of it). GB/s = bytes /
step time; % roofline = GB/s / the measured device-to-device copy bandwidth (the roofline tokens/s is ``batch x copy_GBps / bytes``);
% spec = GB/s / the datasheet bandwidth (4.8 TB/s on an H200; the copy reaches less). Targets (issue 7), H100/H200,
batch 1: >= 75 % of the roofline and >= 1.5x ``hf-static-compile``. The target is read in the
``% roofline`` column, against what the GPU's own copy achieves (about 80-90 % of the datasheet
figure): 75 % of it is 60-70 % of ``% spec``, which the table shows beside it.

Usage: ``python benchmarks/bench_decode.py [--models 1b 8b] [--batches 1 8 32] [--contexts 512 4096]
[--new-tokens 128] [--skip-hf] [--skip-compile]``. The full sweep compiles HF once per shape
(minutes each); narrow it for a quick look. Under the Triton interpreter (no GPU) it runs one tiny
case to prove the script works: NOT a measurement.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastllama._interpreter import use_interpreter_if_no_gpu  # noqa: E402

use_interpreter_if_no_gpu()

import torch  # noqa: E402

from benchmarks import common  # noqa: E402
import fastllama  # noqa: E402
from fastllama import forwards  # noqa: E402
from fastllama.bench.presets import PRESETS, default_dtype, hf_model  # noqa: E402
from fastllama.generate import Generator  # noqa: E402
from fastllama.reference import Llama, LlamaConfig  # noqa: E402

SHAPES = {
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_theta=500000.0),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0),
    "tiny": dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
# Shapes run as a transformers model by both implementations (HF config dicts)
_TINY_GEMMA = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, sliding_window=8,
                   layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
HF_SHAPES = {
    "gemma3-1b": PRESETS["gemma-3-1b"].config,
    "tiny-gemma3": dict(_TINY_GEMMA, model_type="gemma3_text"),
    # Gemma-2-2B: 26 layers, every other one with a 4096-token window, scores capped at 50
    "gemma2-2b": PRESETS["gemma-2-2b"].config,
    "tiny-gemma2": dict(_TINY_GEMMA, model_type="gemma2", attn_logit_softcapping=0.5),
    # MiniCPM3-4B (transformers' MiniCPM3Config defaults): dense multi-head latent attention, 40
    # heads over a cache of 256 + 32 elements per token and layer (fastllama's latent cache)
    "minicpm3-4b": dict(model_type="minicpm3"),
    "tiny-minicpm3": dict(model_type="minicpm3", vocab_size=300, hidden_size=64, intermediate_size=160,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, head_dim=16,
                          pad_token_id=0),
}
NAMES = {"1b": "Llama-3.2-1B", "8b": "Llama-3-8B", "tiny": "tiny (interpreter smoke)", "gemma3-1b": "Gemma-3-1B",
         "tiny-gemma3": "tiny Gemma 3 (interpreter smoke)", "gemma2-2b": "Gemma-2-2B",
         "tiny-gemma2": "tiny Gemma 2 (interpreter smoke)", "minicpm3-4b": "MiniCPM3-4B",
         "tiny-minicpm3": "tiny MiniCPM3 (interpreter smoke)"}


def build_model(shape: str, dtype, device):
    """Random weights, built directly on the device in ``dtype`` (no fp32 copy of an 8B model):
    fastllama's reference Llama, or for ``HF_SHAPES`` the transformers model."""
    torch.manual_seed(0)
    if shape in HF_SHAPES:
        # (HF's sdpa attention has no score cap: a capped model runs eager attention there)
        attention = "eager" if HF_SHAPES[shape].get("attn_logit_softcapping") else "sdpa"
        model = hf_model(dict(HF_SHAPES[shape], bos_token_id=1, eos_token_id=2), dtype, device, attention)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model.eval()
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, max_position_embeddings=8192)
    with default_dtype(dtype), torch.device(device):
        model = Llama(cfg)
    return model.eval()


def build_hf(model, dtype, device):
    """transformers' LlamaForCausalLM with the reference model's weights, sdpa attention; a
    transformers model is its own."""
    import transformers

    if not isinstance(model, Llama):
        return model

    cfg = transformers.LlamaConfig(**model.config.to_hf())
    cfg._attn_implementation = "sdpa"
    with default_dtype(dtype), torch.device(device):
        hf = transformers.LlamaForCausalLM(cfg)
    result = hf.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:  # the same weights in both, or the comparison means nothing
        raise RuntimeError(f"weights do not map onto HF: missing {missing}, unexpected {result.unexpected_keys}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes one decode step must read: every weight but the embedding table (its B rows are
    negligible; a tied LM head is read as the head), plus the cache up to ``context`` (a layer
    with a sliding window W: up to W): K and V per KV head, or a multi-head latent attention's
    latent and rotary key per token (what fastllama's latent cache holds)."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        weights += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    windows = [forwards.sliding_window(layer.self_attn) for layer in model.model.layers]
    keys = sum(min(context, w) if w else context for w in windows)
    attn = model.model.layers[0].self_attn
    per_token = (attn.kv_lora_rank + attn.qk_rope_head_dim if hasattr(attn, "kv_a_proj_with_mqa")
                 else 2 * cfg.num_key_value_heads * head_dim)
    return weights + keys * batch * per_token * model.lm_head.weight.element_size()


def _sync():
    if torch.cuda.is_available() and common.on_gpu():
        torch.cuda.synchronize()


def time_fastllama(model, prompt, new_tokens, reps, **generator_kwargs):
    """(seconds per decode step, steps, {"step": the decode step that ran, "fused" or "cuBLAS", and
    what the capture timed for each, where it timed both})."""
    B, T = prompt.shape
    gen = Generator(model, B, T + new_tokens, **generator_kwargs)
    gen.generate(prompt, new_tokens, stop_tokens=[])  # warm-up: compiles, captures the graph
    per_step = []
    for _ in range(reps):
        gen.generate(prompt, new_tokens, stop_tokens=[])
        if gen.stats.steps < 1:
            raise ValueError(f"{new_tokens} new tokens took no decode step to time")
        per_step.append(gen.stats.decode_s / gen.stats.steps)
    info = {"step": "fused" if gen.stats.fused_decode else "cuBLAS"}
    if len(gen.decode_timings) == 2:  # what the capture timed (up to 10 graph replays each, from slot 0)
        info["capture ms cuBLAS/fused"] = "{cuBLAS:.3g} / {fused:.3g}".format(**gen.decode_timings)
    return statistics.median(per_step), gen.stats.steps, info


def time_hf(hf, prompt, new_tokens, reps, compile_: bool):
    """(seconds per HF decode step, steps, {}): (t(new_tokens) - t(2)) / (new_tokens - 2).
    Subtracting a two-token call (prefill + one decode step) rather than a one-token call also removes what
    each call pays once at its first decode step: HF builds a new static cache per call, and
    with torch.compile's CUDA graphs a new cache address re-records the graph."""
    # transformers sizes every new static cache to the largest it has made so far: after a
    # 4k-context row, a 512-context row would attend over 4k+ slots and look slower than it is.
    if hasattr(hf, "_previous_max_cache_length"):
        del hf._previous_max_cache_length
    if compile_:
        # every (batch, context) its own static graph, as on the first row: without the reset,
        # dynamo recompiles the second shape it sees with symbolic sizes (a slower baseline
        # from the second row on)
        torch._dynamo.reset()
        from transformers import CompileConfig

        hf.generation_config.compile_config = CompileConfig(dynamic=False)
    kwargs = dict(do_sample=False, cache_implementation="static", disable_compile=not compile_,
                  pad_token_id=0, attention_mask=torch.ones_like(prompt))

    def run(n):
        _sync()
        t0 = time.perf_counter()
        hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        _sync()
        return time.perf_counter() - t0

    run(new_tokens), run(2)  # warm-up (compiles every shape it will see)
    full = statistics.median(run(new_tokens) for _ in range(reps))
    first_step = statistics.median(run(2) for _ in range(reps))
    if full <= first_step and not common.is_measurement():  # a smoke run's timings mean nothing anyway:
        return full / new_tokens, new_tokens - 2, {}  # the whole call per token, prefill included
    if full <= first_step:  # noise larger than the decode steps: no time to report (an error row)
        raise ValueError(f"t({new_tokens}) = {full * 1e3:.3g} ms is not above t(2) = {first_step * 1e3:.3g} ms: "
                         f"the decode steps drown in the calls' noise; use more --new-tokens or --reps")
    return (full - first_step) / (new_tokens - 2), new_tokens - 2, {}


def time_hf_patched(hf, prompt, new_tokens, reps):
    """:func:`time_hf` (no torch.compile) of ``hf`` patched by ``fastllama.patch``; unpatched after."""
    fastllama.patch(hf)
    try:
        return time_hf(hf, prompt, new_tokens, reps, False)
    finally:
        fastllama.unpatch(hf)


def main(argv=None) -> int:
    gpu = common.on_gpu()
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--models", nargs="+", default=["1b", "8b"] if gpu else ["tiny"], choices=[*SHAPES, *HF_SHAPES])
    p.add_argument("--batches", nargs="+", type=common.at_least(1), default=[1, 8, 32] if gpu else [1])
    p.add_argument("--contexts", nargs="+", type=common.at_least(1), default=[512, 4096] if gpu else [16])
    # (the first new token comes from the prefill: at least one decode step to time)
    p.add_argument("--new-tokens", type=common.at_least(2), default=128 if gpu else 4)
    p.add_argument("--reps", type=common.at_least(1), default=3 if gpu else 1)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-compile", action="store_true", help="skip hf-static-compile")
    args = p.parse_args(argv)
    if args.new_tokens < 3 and not args.skip_hf:
        p.error(f"--new-tokens must be >= 3 to time HF's decode steps (t(n) - t(2)), got {args.new_tokens}")

    device = common.device()
    dtype = torch.bfloat16 if gpu else torch.float32
    copy_gbps = common.copy_bandwidth_gbps() if gpu else float("nan")
    spec_gbps = common.spec_bandwidth_gbps()
    if not gpu:
        print("Triton interpreter on the CPU: a smoke run of the script, NOT a measurement.")
    rows = []
    interrupted = False

    def release():  # what the last row or model held, before the next allocates
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()

    try:
        for shape in args.models:
            try:
                model = build_model(shape, dtype, device)
            except torch.OutOfMemoryError as e:  # the 8B model on a 16 GB GPU: an error row, keep the rest
                rows.append({"model": NAMES[shape], "impl": "fastllama", "error": f"OutOfMemoryError: {e}"[:200]})
                print(rows[-1], flush=True)
                release()
                continue
            hf = None
            try:  # (whether the forced fused/cuBLAS rows apply; a failure here is the fastllama rows' to show)
                fused_step_serves = Generator(model, 1, 2).fused_problem is None
            except Exception:  # noqa: BLE001
                fused_step_serves = False
            for batch in args.batches:
                for context in args.contexts:
                    prompt = torch.randint(3, model.config.vocab_size, (batch, context), device=device)
                    nbytes = step_bytes(model, batch, context + args.new_tokens / 2)
                    methods = [("fastllama", lambda: time_fastllama(model, prompt, args.new_tokens, args.reps))]
                    if batch == 1:
                        methods.append(("fastllama-unfused", lambda: time_fastllama(
                            model, prompt, args.new_tokens, args.reps, fuse_projections=False)))
                    if not args.skip_hf:
                        methods.append(("hf-static", lambda: time_hf(hf, prompt, args.new_tokens, args.reps, False)))
                        methods.append(("hf-static-patched",
                                        lambda: time_hf_patched(hf, prompt, args.new_tokens, args.reps)))
                        if gpu and not args.skip_compile:
                            methods.append(("hf-static-compile",
                                            lambda: time_hf(hf, prompt, args.new_tokens, args.reps, True)))
                    # (after the baselines: a --quick run's time limit cuts these first; the
                    # fastllama row's capture timings hold both steps' already)
                    if batch == 1 and fused_step_serves:
                        for fused in (True, False):
                            methods.append((f"fastllama-{'fused' if fused else 'cublas'}-step",
                                            functools.partial(time_fastllama, model, prompt, args.new_tokens,
                                                              args.reps, fused_decode=fused)))
                    for name, fn in methods:
                        row = {"model": NAMES[shape], "batch": batch, "context": context, "impl": name}
                        try:
                            if name.startswith("hf") and hf is None:
                                hf = build_hf(model, dtype, device)
                            step_s, steps, info = fn()
                            row.update(info)
                            gbps = nbytes / step_s / 1e9
                            row.update({"ms/step": step_s * 1e3, "tokens/s": batch / step_s, "GB/s": gbps,
                                        "% roofline": 100 * gbps / copy_gbps if gpu else None,
                                        "% spec": 100 * gbps / spec_gbps if spec_gbps else None,
                                        "roofline tokens/s": batch * copy_gbps * 1e9 / nbytes if gpu else None,
                                        "steps": steps})
                        except Exception as e:  # a failing baseline is a row, not a crash
                            row["error"] = f"{type(e).__name__}: {e}"[:200]
                            traceback.print_exc()
                        rows.append(row)
                        print(row, flush=True)
                        release()
                    base = {r["impl"]: r for r in rows[-len(methods):]}
                    fast = base["fastllama"].get("tokens/s")
                    for r in rows[-len(methods):]:
                        if fast and r.get("tokens/s"):
                            r["fastllama speed-up"] = fast / r["tokens/s"]
            del model, hf
            release()
    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    columns = ["model", "batch", "context", "impl", "step", "capture ms cuBLAS/fused", "ms/step", "tokens/s", "GB/s",
               "% roofline", "% spec", "roofline tokens/s", "fastllama speed-up", "steps", "error"]
    print()
    print(common.markdown_table(rows, columns))
    out = common.write_results("decode", rows, columns, extra={"copy_GBps": copy_gbps, "spec_GBps": spec_gbps,
                                                              "interrupted": interrupted})
    print(f"written to {out}" + ("" if gpu else "  (smoke run: NOT a measurement)"))
    return 130 if interrupted else common.exit_code(rows)


if __name__ == "__main__":
    sys.exit(main())
