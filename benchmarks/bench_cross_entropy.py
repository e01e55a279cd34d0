"""Fused linear cross-entropy vs the materialised LM head + loss: time and peak memory, fwd+bwd.

Compared (same inputs, same GPU, one run):
- ``hf``: what a Hugging Face causal LM does: ``logits = lm_head(hidden)`` (bf16), then
  ``ForCausalLMLoss`` (upcast to fp32, shift labels, cross-entropy).
- ``liger``: Liger-Kernel's fused linear cross-entropy, when installed.
- ``fastllama``: ``ops.linear_cross_entropy`` with the already-shifted labels (and
  ``fastllama-nocheck``: the same with ``check_labels=False``, no device sync).

Targets (issue 5): peak memory <= 0.25x hf and time <= 1.0x hf (Liger is ~0.89x hf's speed).
Peak memory is ``max_memory_allocated`` above what was allocated before the step (inputs,
weights), so it counts the logits, the gradients and every temporary.

Usage: ``python benchmarks/bench_cross_entropy.py [--tokens 4096 8192 16384 32768]``. Under the
Triton interpreter (no GPU) it runs one tiny fp32 case to prove the script works (its time is
not a measurement), and then the memory model below.

Memory model (CPU): the peak of each schedule is a sum of (tokens x vocab), (vocab x hidden) and
(tokens x hidden) tensors, so dividing tokens, hidden and vocab by the same factor (16) divides
every term by 16**2 and keeps the ratios. The model runs the issue's shapes scaled that way in
bf16 on the CPU, with fastllama's size constants scaled likewise (its chunk rows and
weight-gradient slice: the schedule chosen for the full shape), and reads the peak bytes the
CPU allocator held (``cpu_peak_bytes``). What it cannot see: cuBLAS workspaces and allocator
rounding. Written to ``benchmarks/results/memory/cross_entropy_memory_model.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastllama._interpreter import use_interpreter_if_no_gpu, wrong_bf16_values_ok  # noqa: E402

use_interpreter_if_no_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from benchmarks import common  # noqa: E402
from fastllama import ops  # noqa: E402
from fastllama.ops import cross_entropy as ce_ops  # noqa: E402


def _hf_loss():
    """transformers' ForCausalLMLoss, or a faithful copy of what it does when not installed."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
        return ForCausalLMLoss, "transformers.ForCausalLMLoss"
    except ImportError:
        def for_causal_lm_loss(logits, labels, vocab_size, ignore_index=-100, **_):
            logits = logits.float()
            labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            return F.cross_entropy(logits.view(-1, vocab_size), labels.reshape(-1).to(logits.device),
                                   ignore_index=ignore_index)
        return for_causal_lm_loss, "ForCausalLMLoss (inline copy; transformers not installed)"


def _liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception:  # noqa: BLE001  (not installed, or broken against this Triton: no Liger rows)
        return None
    return LigerFusedLinearCrossEntropyLoss()


def _methods(hidden, weight, labels, vocab):
    """name -> step() running forward + backward; the first is the baseline."""
    hf_loss, _ = _hf_loss()
    shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    methods = {
        "hf": lambda: hf_loss(F.linear(hidden, weight), labels, vocab_size=vocab),
        "fastllama": lambda: ops.linear_cross_entropy(hidden, weight, shifted),
        # without the label range check's device sync (the tuned-training-loop setting)
        "fastllama-nocheck": lambda: ops.linear_cross_entropy(hidden, weight, shifted, check_labels=False),
    }
    liger = _liger()
    if liger is not None and common.on_gpu():
        methods["liger"] = lambda: liger(weight, hidden.view(-1, hidden.shape[-1]), shifted.view(-1))
    return methods


def _weight_grad_gemm_note(tokens: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> str:
    """Which GEMM summed the chunked weight gradient at this shape and what both took, when
    the chunked schedule ran (ops.cross_entropy.weight_grad_gemm_choices)."""
    rows = ce_ops.chunk_rows_for(tokens, hidden_size, vocab, dtype)
    if rows >= tokens:
        return ""  # (logits inside the weight gradient: no GEMM to choose)
    for (_, dt, v, h, bucket), e in ce_ops.weight_grad_gemm_choices().items():
        if (dt, v, h, bucket) == (dtype, vocab, hidden_size, triton.next_power_of_2(rows)):
            cublas = f"{e['cublas_ms']:.2f} ms" if e["cublas_ms"] is not None else e["why"]
            return f"chunks of {rows}: weight-grad GEMM {e['gemm']} (triton {e['triton_ms']:.2f} ms, cublas {cublas})"
    return ""


def _measure(step, hidden, weight) -> tuple[float, float | None, float]:
    """(ms, peak GiB above the starting allocation or None off-GPU, loss value)."""
    def run():
        hidden.grad = weight.grad = None
        loss = step()
        loss.backward()
        return loss

    loss = float(run().detach())
    peak = None
    if common.on_gpu():
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = common.time_ms(run, warmup=3, rep=10)
    hidden.grad = weight.grad = None
    return ms, peak, loss


@contextlib.contextmanager
def _scaled_slice(scale: int):
    old = ce_ops.WEIGHT_GRAD_SLICE_ELEMENTS
    ce_ops.WEIGHT_GRAD_SLICE_ELEMENTS = max(1, old // scale**2)
    try:
        yield
    finally:
        ce_ops.WEIGHT_GRAD_SLICE_ELEMENTS = old


def memory_model(token_counts, hidden_size: int, vocab: int, scale: int = 16) -> list[dict]:
    """Peak CPU bytes of hf and fastllama (fwd+bwd, bf16) at the shapes divided by ``scale``;
    ``mem_vs_hf`` is the model's estimate of the GPU ratio at the full shape."""
    rows = []
    n_h, n_v = hidden_size // scale, vocab // scale
    for tokens in token_counts:
        n = tokens // scale
        chunk = ce_ops.chunk_rows_for(tokens, hidden_size, vocab, torch.bfloat16)
        chunk = n if chunk >= tokens else max(1, chunk // scale)
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(1, n, n_h, generator=gen, dtype=torch.bfloat16).requires_grad_()
        weight = (torch.randn(n_v, n_h, generator=gen) * n_h**-0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(0, n_v, (1, n), generator=gen)
        hf_loss, _ = _hf_loss()
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        steps = {"hf": lambda: hf_loss(F.linear(hidden, weight), labels, vocab_size=n_v),
                 "fastllama": lambda: ops.linear_cross_entropy(hidden, weight, shifted, chunk_rows=chunk)}
        peaks = {}
        for name, step in steps.items():
            hidden.grad = weight.grad = None
            with _scaled_slice(scale):
                peaks[name] = common.cpu_peak_bytes(lambda: step().backward())
        full_chunk = ce_ops.chunk_rows_for(tokens, hidden_size, vocab, torch.bfloat16)
        schedule = "logits in the weight gradient" if chunk >= n else f"chunks of {full_chunk} rows"
        for name, peak in peaks.items():
            rows.append({"tokens": tokens, "hidden": hidden_size, "vocab": vocab, "method": name,
                         "schedule": schedule if name == "fastllama" else "materialised logits",
                         "model_peak_GiB": peak * scale**2 / 2**30,
                         "mem_vs_hf": peak / peaks["hf"] if name != "hf" else None})
    return rows


# (under the interpreter bf16 values are wrong; this smoke run reports times and bytes only)
@wrong_bf16_values_ok()
def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=common.description(__doc__))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args(argv)

    if common.on_gpu():
        shapes, dtype, seq = [(t, args.hidden, args.vocab) for t in args.tokens], torch.bfloat16, 4096
    else:  # interpreter smoke run
        shapes, dtype, seq = [(256, 64, 1000)], torch.float32, 128
    dev = common.device()
    rows = []
    interrupted = False
    try:
        for tokens, hidden_size, vocab in shapes:
            gen = torch.Generator(device=dev).manual_seed(0)
            b, t = max(1, tokens // seq), min(seq, tokens)
            hidden = torch.randn(b, t, hidden_size, device=dev, dtype=dtype, generator=gen).requires_grad_()
            weight = (torch.randn(vocab, hidden_size, device=dev, dtype=dtype, generator=gen)
                      * hidden_size**-0.5).requires_grad_()
            labels = torch.randint(0, vocab, (b, t), device=dev, generator=gen)
            base = None
            for name, step in _methods(hidden, weight, labels, vocab).items():
                try:
                    ms, peak, loss = _measure(step, hidden, weight)
                except torch.OutOfMemoryError:
                    rows.append({"tokens": b * t, "hidden": hidden_size, "vocab": vocab, "method": name, "ms": None,
                                 "peak_GiB": None, "note": "OOM"})
                    torch.cuda.empty_cache()
                    continue
                except Exception as e:  # noqa: BLE001  (a failing method is a row; the others still run)
                    rows.append({"tokens": b * t, "hidden": hidden_size, "vocab": vocab, "method": name, "ms": None,
                                 "peak_GiB": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
                    print(rows[-1], flush=True)
                    continue
                row = {"tokens": b * t, "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
                       "method": name, "ms": ms, "peak_GiB": peak, "loss": loss}
                if name.startswith("fastllama"):
                    row["note"] = _weight_grad_gemm_note(b * t, vocab, hidden_size, dtype)
                if name == "hf":
                    base = row
                elif base is not None and base.get("ms"):
                    row["time_vs_hf"] = ms / base["ms"]
                    row["mem_vs_hf"] = peak / base["peak_GiB"] if peak is not None and base["peak_GiB"] else None
                    row["loss_rel_diff"] = abs(loss - base["loss"]) / abs(base["loss"])
                rows.append(row)
                print(row, flush=True)
            del hidden, weight, labels
            if common.on_gpu():
                torch.cuda.empty_cache()

    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)

    columns = ["tokens", "hidden", "vocab", "dtype", "method", "ms", "peak_GiB", "time_vs_hf", "mem_vs_hf",
               "loss_rel_diff", "note", "error"]
    extra = {"baseline": _hf_loss()[1], "liger_installed": _liger() is not None,
             "targets": {"mem_vs_hf": "<= 0.25", "time_vs_hf": "<= 1.0"}}
    extra["interrupted"] = interrupted
    if common.on_gpu() and not interrupted:
        extra["peaks"] = {"copy_GBps": common.copy_bandwidth_gbps(), "bf16_matmul_TFLOPs": common.matmul_tflops()}
    out = common.write_results("cross_entropy", rows, columns, extra=extra)
    print(common.markdown_table(rows, columns))
    print(f"results in {out}" + ("" if common.is_measurement() else " (interpreter smoke run: not a measurement)"))
    if interrupted:
        return 130
    if not common.on_gpu():
        model = memory_model(args.tokens, args.hidden, args.vocab)
        columns = ["tokens", "hidden", "vocab", "method", "schedule", "model_peak_GiB", "mem_vs_hf"]
        # Device-independent, like `fastllama bench memory`: next to its report, unless the
        # results folder was chosen (FASTLLAMA_RESULTS_DIR).
        out_dir = None if os.environ.get("FASTLLAMA_RESULTS_DIR") else common.RESULTS / "memory"
        out = common.write_results("cross_entropy_memory_model", model, columns, out_dir=out_dir,
                                   note="a CPU allocation model at shapes / 16, scaled by 256: an estimate of "
                                        "the GPU peak, not a GPU measurement", extra={
            "scale": 16, "what": "peak CPU-allocator bytes at tokens, hidden, vocab / 16, times 16**2 "
                                 "(bf16, fwd+bwd); an estimate of the GPU peak, not a GPU measurement",
            "target": {"mem_vs_hf": "<= 0.25"}})
        print(common.markdown_table(model, columns))
        print(f"memory model in {out}")
    return rows


if __name__ == "__main__":
    sys.exit(common.exit_code(main()))
