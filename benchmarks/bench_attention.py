"""Flash attention speed: fastllama vs SDPA's backends (and flash-attn when installed).

Sweep (issue 4): bf16, head dim 64 and 128, sequence 512 to 16k with batch * seq = 16k tokens,
2048 / head_dim heads (a 2048-wide model), causal and not. Rows per provider and direction:

- ``fastllama``: ``ops.flash_attention`` (autotuned on first call; the tuning is not timed; the
  note names the tiles the autotuner chose, and on a GPU what the default deterministic backward,
  ``"auto"``, measured when it chose between recomputing dQ and the partials below; on each
  fastllama row, the program order that direction's first launch chose, with both times);
- ``fastllama-atomic``: the same with ``deterministic=False`` (dQ added with atomics in the dK/dV
  kernel, as sdpa-flash and flash-attn do; the forward is the same kernel as ``fastllama``'s);
- ``fastllama-partials``: ``ops.flash_attention`` under
  ``set_deterministic_backward("partials")``: the deterministic backward with dQ formed in the
  dK/dV kernel (five matmuls a block pair, as ``fastllama-atomic``) into fp32 partials, one per
  program, summed in a fixed order (the forward is ``fastllama``'s);
- ``fastllama-softcap``: ``ops.flash_attention`` with Gemma 2's score soft-capping (``softcap=50``:
  a tanh per score, one untimed tile per kernel); its ratio to ``fastllama`` is what the cap costs
  (SDPA has no soft-capping, so HF runs Gemma 2's attention eagerly);
- ``sdpa-flash``, ``sdpa-cudnn``, ``sdpa-efficient``: ``F.scaled_dot_product_attention`` pinned
  to one backend with ``torch.nn.attention.sdpa_kernel`` (a backend that refuses the shape is
  skipped with its error as the row's note);
- ``flash-attn``: ``flash_attn_func`` on (B, T, H, D) tensors, when the package imports.

FLOPs (DESIGN.md): forward 4 * B * H * T^2 * D, halved when causal; backward 2.5x forward. The
backward is timed alone (``out.backward(dout, retain_graph=True)``; q, k and v's gradients are
reset to None before each call, so no accumulation into ``.grad`` is timed). The device's bf16 matmul peak is measured in the same run for "% peak".
Targets on H100/H200: forward >= 1.1x sdpa-flash and >= 450 TFLOP/s at T >= 4k, D 128, causal;
backward >= 1.0x sdpa-flash.

Writes ``results/<device>/bench_attention.{json,md,png}``, and ``bench_attention_tuning.{json,md}``:
the time of every autotune candidate of fastllama's kernels per shape (the data for pruning the
candidate tables). Without a GPU it runs one tiny case
under the Triton interpreter and labels everything "not a measurement".

Usage: ``python benchmarks/bench_attention.py [--dims 64 128] [--seqlens 512 ... 16384]
[--tokens 16384] [--width 2048] [--masks causal full] [--providers fastllama sdpa-flash ...] [--out DIR]``
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

from benchmarks import common  # noqa: E402
from fastllama import ops  # noqa: E402
from fastllama.ops import attention as attention_ops  # noqa: E402


PROVIDERS = ("fastllama", "fastllama-atomic", "fastllama-partials", "fastllama-softcap", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
             "flash-attn")


def _providers():
    """name -> fn(q, k, v, causal) on (B, H, T, D) tensors."""
    out = {"fastllama": lambda q, k, v, causal: ops.flash_attention(q, k, v, causal=causal),
           "fastllama-atomic": lambda q, k, v, causal: ops.flash_attention(q, k, v, causal=causal,
                                                                           deterministic=False),
           "fastllama-partials": lambda q, k, v, causal: ops.flash_attention(q, k, v, causal=causal),
           "fastllama-softcap": lambda q, k, v, causal: ops.flash_attention(q, k, v, causal=causal, softcap=50.0)}
    if not common.on_gpu():
        return out
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(q, k, v, causal, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out[name] = run
    try:
        from flash_attn import flash_attn_func

        # flash-attn wants (B, T, H, D); the transposes are views, its output is transposed back.
        out["flash-attn"] = lambda q, k, v, causal: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    except ImportError:
        pass
    return out


def _flops(B, H, T, D, causal):
    fwd = 4.0 * B * H * T * T * D / (2 if causal else 1)
    return fwd, 2.5 * fwd


def bench_case(name, fn, B, H, T, D, causal, dtype):
    """One provider on one shape: (rows for the forward and the backward, tuning rows: every
    autotune candidate's time when this case's warm-up tuned fastllama's kernels)."""
    dev = common.device()
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    fwd_flops, bwd_flops = _flops(B, H, T, D, causal)
    base = dict(provider=name, D=D, T=T, B=B, H=H, causal=causal)
    attention_ops.autotune_timings(clear=True)
    known = set(attention_ops.deterministic_backward_choices())
    known_orders = set(attention_ops.program_order_choices())
    try:
        out = fn(q, k, v, causal)  # warm-up: compiles, autotunes (and "auto" chooses its backward)
        dout = torch.randn_like(out)
        out.backward(dout, retain_graph=True)
        ms_f = common.time_ms(lambda: fn(q, k, v, causal))
        ms_b = common.time_ms(lambda: out.backward(dout, retain_graph=True), grad_to_none=[q, k, v])
    except Exception as e:  # noqa: BLE001 - a backend that refuses a shape is a row, not a crash
        note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        # fastllama failing is an error (the script's exit code says so); a baseline refusing a
        # shape (SDPA's flash backend at D 256 ...) is a note
        key = "error" if name.startswith("fastllama") else "note"
        return [dict(base, direction=d, ms=None, tflops=None, **{key: note}) for d in ("fwd", "bwd")], []
    tuning = _tuning_rows(base)
    # fastllama's rows name the tiles its autotuner chose for this shape (what the next tuning
    # round starts from).
    picks = attention_ops.autotuned_choices() if name.startswith("fastllama") else {}
    if name == "fastllama-softcap":  # untimed tiles (the autotuners' picks are another provider's),
        # and the deterministic backward whatever the patch option (flash_attention_backward)
        from fastllama.kernels.flash_attention import softcap_config, strides_aligned

        aligned = strides_aligned(q, k, v)
        picks = {which: "M{} N{} w{} s{}".format(*softcap_config(which, q, aligned, "ieee"))
                 for which in ("fwd", "dkdv", "dq")}
    auto = [entry for key, entry in attention_ops.deterministic_backward_choices().items() if key not in known]
    partials = name == "fastllama-partials" or (name == "fastllama" and auto and auto[0]["algorithm"] == "partials")
    bwd_kernels = ("dkdv_atomic",) if name == "fastllama-atomic" else ("dkdv_partials",) if partials else ("dkdv", "dq")
    bwd_note = "; ".join(f"{k} {picks[k]}" for k in bwd_kernels if k in picks)
    if name == "fastllama" and auto:  # what the default ("auto") measured when it chose
        bwd_note = "; ".join(filter(None, [_auto_note(auto[0]), bwd_note]))
    notes = {"fwd": picks.get("fwd", ""), "bwd": bwd_note}
    # the program order this case's first forward / backward chose (timed where there was a choice)
    for key, entry in attention_ops.program_order_choices().items():
        if key not in known_orders and entry["grouped_ms"] is not None:
            direction = "fwd" if key[0] == "forward" else "bwd"
            notes[direction] = "; ".join(filter(None, [_order_note(entry, direction), notes[direction]]))
    return [dict(base, direction="fwd", ms=ms_f, tflops=fwd_flops / ms_f / 1e9, note=notes["fwd"]),
            dict(base, direction="bwd", ms=ms_b, tflops=bwd_flops / ms_b / 1e9, note=notes["bwd"])], tuning


def _auto_note(entry: dict) -> str:
    """The default backward's choice, e.g. "auto: partials (P 7) 5.1 ms, recompute 6.3 ms", or why
    it kept the recompute untimed."""
    if entry.get("why"):
        return f"auto: recompute ({entry['why']})"
    chosen = entry["algorithm"]
    other = "recompute" if chosen == "partials" else "partials"
    label = lambda name: f"{name} (P {entry['partials']})" if name == "partials" else name
    return (f"auto: {label(chosen)} {entry[chosen + '_ms']:.3g} ms, "
            f"{label(other)} {entry[other + '_ms']:.3g} ms")


def _order_note(entry: dict, direction: str) -> str:
    """The program order the shape's first forward (or backward) chose, e.g. "order: grouped (8
    heads) 0.62 ms, by head 0.67 ms" (see ops.attention.program_order_choices)."""
    q_heads, kv_heads = entry["head_groups"]
    size = f"{q_heads} heads" if direction == "fwd" else f"{q_heads} query / {kv_heads} KV heads"
    grouped = f"grouped ({size}) {entry['grouped_ms']:.3g} ms"
    heads = f"by head {entry['heads_ms']:.3g} ms"
    return "order: " + (f"{grouped}, {heads}" if entry["order"] == "grouped" else f"{heads}, {grouped}")


def _tuning_rows(base):
    """One row per candidate the autotuners timed since the last call: what the next tuning
    round prunes the candidate tables by (a GPU slot is too short for a separate sweep)."""
    rows = []
    for kernel, timings in attention_ops.autotune_timings(clear=True).items():
        best = min(timings.values())
        for config, ms in sorted(timings.items(), key=lambda item: item[1]):
            rows.append(dict(base, kernel=kernel, config=config, ms=ms,
                             vs_best=ms / best if best > 0 and ms != float("inf") else None))
    return rows


def _add_ratios(rows, peak):
    """vs sdpa-flash and % of the measured matmul peak, per (shape, direction)."""
    ref = {(r["D"], r["T"], r["causal"], r["direction"]): r["tflops"] for r in rows if r["provider"] == "sdpa-flash"}
    for r in rows:
        base = ref.get((r["D"], r["T"], r["causal"], r["direction"]))
        r["vs_sdpa_flash"] = r["tflops"] / base if r["tflops"] and base else None
        r["pct_peak"] = 100 * r["tflops"] / peak if r["tflops"] and peak else None


def plot(rows, path, measurement: bool) -> bool:
    """TFLOP/s vs sequence length: one panel per (direction, D, causal), a line per provider;
    False when nothing was drawn."""
    # (no rows: stopped before its first row, a time limit; the table says so, no plot)
    plt = common.pyplot(path) if rows else None
    if plt is None:
        return False

    panels = sorted({(r["direction"], r["D"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (direction, D, causal) in zip(axes[0], panels):
        for prov in sorted({r["provider"] for r in rows}):
            pts = sorted((r["T"], r["tflops"]) for r in rows if r["provider"] == prov and r["tflops"]
                         and (r["direction"], r["D"], r["causal"]) == (direction, D, causal))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=prov)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{direction} D{D} {'causal' if causal else 'full'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not measurement:
        fig.suptitle("Triton interpreter smoke run: NOT a measurement", color="red")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# (under the interpreter bf16 values are wrong; this smoke run reports times and bytes only)
@wrong_bf16_values_ok()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=common.description(__doc__))
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--tokens", type=int, default=16384, help="batch * seqlen")
    p.add_argument("--width", type=int, default=2048, help="heads * head_dim")
    p.add_argument("--masks", nargs="+", choices=("causal", "full"), default=["causal", "full"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                   help="which rows to run (default: all; those not installed are left out)")
    p.add_argument("--out", default=None, help="results folder (default: results/<device>)")
    args = p.parse_args(argv)

    measurement = common.is_measurement()
    if measurement:
        shapes = [(max(1, args.tokens // T), args.width // D, T, D, mask == "causal")
                  for D in args.dims for T in args.seqlens for mask in args.masks]
    else:
        shapes = [(1, 2, 128, 64, True)]  # proves the script runs; timings mean nothing
    rows, tuning, interrupted = [], [], False
    try:
        for B, H, T, D, causal in shapes:
            for name, fn in _providers().items():
                if name not in args.providers:
                    continue
                # (the backward reads the setting when it runs: the whole case runs inside it)
                algorithm = "partials" if name == "fastllama-partials" else "auto"
                with attention_ops.deterministic_backward(algorithm):
                    case_rows, case_tuning = bench_case(name, fn, B, H, T, D, causal, torch.bfloat16)
                rows += case_rows
                tuning += case_tuning
                print(rows[-2]["provider"], f"D{D} T{T} {'causal' if causal else 'full'}",
                      *(f"{r['direction']} {r['tflops']:.1f} TFLOP/s" if r["tflops"] else f"{r['direction']} {r.get('error') or r['note']}"
                        for r in rows[-2:]), flush=True)
    except KeyboardInterrupt:  # a time limit (gpu_check.sh sends SIGINT): keep the rows so far
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)
    peak = common.matmul_tflops() if measurement and not interrupted else None
    _add_ratios(rows, peak)
    cols = ["provider", "direction", "D", "T", "B", "H", "causal", "ms", "tflops", "vs_sdpa_flash", "pct_peak", "note", "error"]
    out = common.write_results("bench_attention", rows, cols, extra={"matmul_peak_tflops": peak,
                                                                      "interrupted": interrupted}, out_dir=args.out)
    if plot(rows, out / "bench_attention.png", measurement):
        md = out / "bench_attention.md"
        md.write_text(md.read_text() + "\n![bench_attention](bench_attention.png)\n")
    if tuning:
        common.write_results("bench_attention_tuning", tuning, ["provider", "kernel", "D", "T", "B", "H", "causal",
                                                                "config", "ms", "vs_best"], out_dir=args.out)
    print(f"wrote {out}/bench_attention.{{json,md,png}}" + ("" if measurement else "  (NOT a measurement)"))
    return 130 if interrupted else common.exit_code(rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
