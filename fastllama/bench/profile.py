"""Where a training step's time goes: one step under ``torch.profiler``, its GPU kernels grouped
into categories (matmul, attention forward / backward, norm, rotary, SwiGLU, loss, optimizer,
elementwise/copy, other), per configuration.

Tokens/s says how much faster a configuration is; this says why, and what is left to win: e.g.
whether attention backward or the elementwise kernels HF runs around its matmuls dominate the
gap. ``fastllama bench train --profile`` profiles one extra step of every configuration at the
first sequence length, after the measured steps (so compilation, autotuning and lazy optimizer
state are not in it), and writes ``train-<preset>-profile.{json,md,png}``.

On a GPU the times are each kernel's device time; off-GPU (the smoke run) they are the CPU time
of the aten ops, which only proves the path works.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from . import common

__all__ = ["CATEGORIES", "category", "profile_step", "summarize", "PROFILE_COLUMNS", "plot_profile"]

# First match wins: attention before matmul (attention kernels' template arguments name cutlass
# types), the specific categories before the generic elementwise/copy.
CATEGORIES: list[tuple[str, str]] = [
    # FA2 (SDPA flash) "flash_bwd_*", cuDNN "...sdpa...bprop", mem-efficient "fmha_cutlassB",
    # fastllama "_attn_bwd_dq/_dkdv" and "_bwd_preprocess"
    ("attention bwd", r"(attn|flash|fmha|sdpa|attention).*(bwd|backward|bprop)|fmha_cutlassB|_bwd_preprocess"),
    ("attention fwd", r"attn|flash|fmha|sdpa|attention"),
    # torch.compile's generated kernels (pointwise / reduction / persistent reduction): their
    # names list the fused aten ops, which would scatter them over the categories below
    ("inductor fused", r"^triton_(poi|red|per)_"),
    # (no bare "lse": template arguments spell "false")
    ("loss", r"cross_entropy|nll_loss|softmax|logsumexp|_lse_partials|_loss_and_grad|_accumulate_at_b"),
    ("norm", r"rms|norm"),
    ("rotary", r"rotary|rope"),
    ("swiglu", r"swiglu|silu"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm|aten::addmm|aten::bmm"),
    ("elementwise/copy", r"elementwise|copy|memcpy|memset|fill|cat|reduce|index|scatter|gather|aten::"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]

PROFILE_COLUMNS = ["config", "seq_len", "batch", "category", "ms/step", "share", "calls", "top kernel"]


def category(kernel: str) -> str:
    """The category of a kernel (or, off-GPU, aten op) name; "other" when nothing matches."""
    for name, pattern in _COMPILED:
        if pattern.search(kernel):
            return name
    return "other"


def profile_step(step, device: str) -> list[tuple[str, int, float]]:
    """Runs ``step()`` once under the profiler; returns (kernel name, calls, total ms) for every
    GPU kernel (off-GPU: every aten op, by self CPU time), longest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        # Kernels are the events with device time of their own; the CPU-side launch events
        # (cudaLaunchKernel ...) have none.
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and (cuda or e.key.startswith("aten::")):
            out.append((e.key, int(e.count), us / 1e3))
    return sorted(out, key=lambda k: -k[2])


def summarize(kernels: list[tuple[str, int, float]], base: dict) -> list[dict]:
    """Rows per category: ms per step, share of the step's kernel time, kernel launches and the
    longest kernel (its name cut to 70 characters), largest category first."""
    total = sum(ms for _, _, ms in kernels) or 1.0
    groups: dict[str, list] = defaultdict(list)
    for kernel in kernels:
        groups[category(kernel[0])].append(kernel)
    rows = []
    for cat, members in groups.items():
        ms = sum(m for _, _, m in members)
        top = max(members, key=lambda k: k[2])[0]
        rows.append(dict(base, category=cat, **{"ms/step": ms, "share": ms / total,
                                                "calls": sum(c for _, c, _ in members),
                                                "top kernel": top if len(top) <= 70 else top[:67] + "..."}))
    rows.sort(key=lambda r: -r["ms/step"])
    return rows


def plot_profile(rows: list[dict], path, note: str = "") -> bool:
    """One horizontal bar per configuration, split into its categories' ms per step."""
    plt = common.pyplot(path) if rows else None
    if plt is None:
        return False

    configs = list(dict.fromkeys(r["config"] for r in rows))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(configs) + 1.8))
    left = [0.0] * len(configs)
    colors = plt.get_cmap("tab10")
    for i, cat in enumerate(cats):
        widths = [sum(r["ms/step"] for r in rows if r["config"] == c and r["category"] == cat) for c in configs]
        if any(widths):
            ax.barh(configs, widths, left=left, label=cat, color=colors(i % 10))
            left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel("kernel time per training step (ms)")
    ax.legend(fontsize=7, ncol=3, loc="lower right")
    if note:
        fig.suptitle(note, color="red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_profile(name: str, rows: list[dict], extra: dict) -> None:
    """``<name>.{json,md,png}`` in the shared results format, with the stacked-bar plot."""
    out = common.write_results(name, rows, PROFILE_COLUMNS, extra=extra)
    smoke = "" if common.is_measurement() else "smoke run under the Triton interpreter: not a measurement"
    if plot_profile(rows, out / f"{name}.png", note=smoke):
        md = out / f"{name}.md"
        md.write_text(md.read_text() + f"\n![{name}]({name}.png)\n")
