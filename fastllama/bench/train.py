"""The training benchmark: tokens/s and peak memory of full training steps, in one run.

A step is what a training loop does: forward with labels (the model computes its loss),
backward, a fused AdamW step, gradients set to None. Weights are random, bf16 on a GPU. Every
configuration trains the same preset at the same (sequence length, batch):

* ``hf-sdpa``: transformers' ``LlamaForCausalLM`` (the preset's family: ``Qwen3ForCausalLM``
  ...) with ``attn_implementation="sdpa"`` (eager PyTorch otherwise): the baseline every ratio
  refers to;
* ``hf-eager``: the same with ``attn_implementation="eager"`` (every score materialised). It is
  the baseline instead of ``hf-sdpa`` for a preset whose ``hf_attention`` is "eager" (Gemma 2:
  transformers' sdpa path does not apply its score cap), and then every other HF configuration
  below starts from the eager model too; elsewhere it runs only when asked for;
* ``hf-compile``: the same model under ``torch.compile``;
* ``hf-liger``: the same model with Liger-Kernel's patch of its family (only when installed,
  CUDA only);
* ``hf+fastllama``: the same model after ``fastllama.patch(model)``;
* ``hf+fastllama-atomic``: ``fastllama.patch(model, deterministic=False)``: the attention
  backward adds dQ with atomics, as SDPA's flash backend in ``hf-sdpa`` does;
* ``hf+fastllama-recompute``: ``fastllama.patch(model)`` with the deterministic attention
  backward that recomputes dQ in a kernel of its own
  (``fastllama.ops.set_deterministic_backward("recompute")``, for this configuration's steps
  only), not the default ``"auto"``, which times it against the partials at each new shape and
  keeps the partials only if at least 5% faster (the results JSON's ``attention_backward`` lists
  what it measured);
* ``reference+fastllama``: fastllama's reference ``Llama`` after ``fastllama.patch(model)``
  (Llama presets only).

Warm-up steps (compilation, autotuning, allocator growth) are excluded; the reported step time
is the median over the measured steps, each timed between two device synchronisations. Peak
memory is ``torch.cuda.max_memory_allocated`` over the measured steps (weights, gradients and
AdamW states included). The batch is chosen to fill the GPU: probe steps of the baseline at
batch 1 and 2 give its fixed and per-sequence memory, and the batch is the largest that keeps the
baseline under 85% of the device memory (``--batch`` overrides). A configuration that runs out
of memory is recorded as an "OOM" row, not a crash; any other failure is recorded with its error.

Off-GPU (CPU, Triton interpreter) the benchmark runs, in float32 (the interpreter computes bf16
``tl.dot`` wrongly without the test suite's shim), to prove that every path works: a smoke run,
not a measurement.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import sys
import time
import traceback

import torch

from . import common
from .presets import CONFIGS, Preset, get_preset, hf_model, layer_windows, reference_model
from .profile import profile_step, summarize

__all__ = ["CONFIGS", "TrainSettings", "run_train", "train_columns", "TRAIN_COLUMNS", "TRAIN_PLOTS"]



def train_columns(baseline: str = "hf-sdpa") -> list[str]:
    """The table's columns; the ratios are to ``baseline`` (the preset's, :attr:`Preset.baseline`)."""
    return ["preset", "seq_len", "batch", "config", "tokens/s", f"vs {baseline}", "step ms", "peak GiB",
            f"peak vs {baseline}", "TFLOP/s", "loss", "status"]


TRAIN_COLUMNS = train_columns()  # the Llama presets'
TRAIN_PLOTS = [
    common.Plot(x="seq_len", y="tokens/s", series="config", panel="preset", title="training tokens/s"),
    common.Plot(x="seq_len", y="peak GiB", series="config", panel="preset", title="training peak memory",
                higher_is_better=False),
]


@dataclasses.dataclass
class TrainSettings:
    preset: Preset
    seq_lens: tuple[int, ...]
    batch: int | None  # None: fill the GPU (1 off-GPU)
    warmup: int
    steps: int
    configs: tuple[str, ...]
    dtype: torch.dtype
    device: str
    memory_fraction: float = 0.85
    profile: bool = False  # one extra, profiled step per configuration at the first sequence length


def default_settings(preset: str, quick: bool, configs=None, seq_lens=None, batch=None, warmup=None,
                     steps=None, layers=None, profile=False) -> TrainSettings:
    """The settings ``fastllama bench train`` uses: GPU bf16, or the CPU smoke run in fp32."""
    p = get_preset(preset, layers)
    gpu = common.on_gpu()
    return TrainSettings(
        preset=p,
        seq_lens=tuple(seq_lens or (p.quick_seq_lens if quick else p.seq_lens)),
        batch=batch if batch else (None if gpu else 1),
        warmup=warmup if warmup is not None else (2 if quick else 3) if gpu else 1,
        steps=steps if steps is not None else (5 if quick else 10) if gpu else 2,
        configs=tuple(configs or p.default_configs),
        dtype=torch.bfloat16 if gpu else torch.float32,
        device=common.device(),
        profile=profile,
    )


# ---------------------------------------------------------------------------------------------
# Building each configuration
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _restored_modeling(model_type: str):
    """Liger patches transformers' modeling module of the family (``modeling_llama`` ...)
    globally (functions and class forwards); put everything back afterwards so that later
    configurations run the original code."""
    import importlib

    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)  # "gemma3_text" lives in models/gemma3
    mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")

    saved = dict(vars(mod))
    classes = {name: dict(vars(cls)) for name, cls in saved.items()
               if isinstance(cls, type) and cls.__module__ == mod.__name__}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(mod, name, value)
        for name, attrs in classes.items():
            cls = saved[name]
            for attr in set(vars(cls)) - set(attrs):
                with contextlib.suppress(AttributeError, TypeError):
                    delattr(cls, attr)
            for attr, value in attrs.items():
                if vars(cls).get(attr) is not value:
                    with contextlib.suppress(AttributeError, TypeError):
                        setattr(cls, attr, value)


def unavailable(config: str, model_type: str = "llama", hf_attention: str = "sdpa") -> str | None:
    """Why ``config`` cannot run here, for a preset of family ``model_type`` whose HF rows run
    ``hf_attention`` (None: it can)."""
    if config == "reference+fastllama" and model_type != "llama":
        return f"the reference model is a Llama (this preset is a {model_type})"
    if config == "hf-sdpa" and hf_attention != "sdpa":
        return (f"transformers' sdpa attention does not compute this {model_type} model (its score cap): "
                f"the HF rows run {hf_attention} attention")
    if config == "hf-liger":
        try:
            import liger_kernel.transformers as liger
        except ImportError:
            return "liger-kernel not installed"
        except Exception as e:  # an install that breaks on import: a row with the reason, not a crashed run
            return f"liger-kernel fails to import: {type(e).__name__}: {e}"
        if not common.on_gpu():
            return "Liger-Kernel needs CUDA"
        if not hasattr(liger, f"apply_liger_kernel_to_{model_type}"):
            return f"this liger-kernel has no apply_liger_kernel_to_{model_type}"
    return None


def build(config: str, settings: TrainSettings):
    """(model, forward) for ``config``; ``forward(ids)`` returns the loss of a causal-LM step."""
    cfg, dtype, dev = settings.preset.config, settings.dtype, settings.device
    torch.manual_seed(0)
    if config == "reference+fastllama":
        from ..patching import patch

        model = patch(reference_model(cfg, dtype, dev).train())
        return model, lambda ids: model(ids, labels=ids)[1]
    attention = "eager" if config == "hf-eager" else settings.preset.hf_attention
    model = hf_model(cfg, dtype, dev, attention).train()
    model.config.use_cache = False
    if config in ("hf-sdpa", "hf-eager"):
        return model, lambda ids: model(input_ids=ids, labels=ids).loss
    if config == "hf-compile":
        # static shapes: on a second (seq, batch) dynamo would otherwise recompile with symbolic
        # sizes, and every later row would time dynamic-shape kernels
        compiled = torch.compile(model, dynamic=False)
        return model, lambda ids: compiled(input_ids=ids, labels=ids).loss
    if config == "hf-liger":
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{settings.preset.model_type}")(model=model)
        return model, lambda ids: model(input_ids=ids, labels=ids).loss
    if config in ("hf+fastllama", "hf+fastllama-atomic", "hf+fastllama-recompute"):
        from ..patching import patch

        patch(model, deterministic=config != "hf+fastllama-atomic")
        return model, lambda ids: model(input_ids=ids, labels=ids).loss
    raise ValueError(f"unknown configuration {config!r}; choose from {CONFIGS}")


def _optimizer(model, device):
    params = [p for p in model.parameters() if p.requires_grad]
    try:  # the fused (single-kernel) AdamW step; CPU has one too in recent torch
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=1e-5)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def model_flops_per_step(cfg: dict, batch: int, seq: int) -> float:
    """Training FLOPs of one step: 6 x (matmul parameters) x tokens for every linear layer and
    the LM head, plus attention per layer: forward 4*B*H*D per (query, key) pair it computes,
    backward 2.5x that. A causal layer has T^2/2 pairs (forward 2*B*H*T^2*D); a sliding-window
    layer of W keys W^2/2 + (T - W) W once T > W. A mixture of experts counts the experts a
    token runs (``num_experts_per_tok`` of ``moe_intermediate_size``, plus DeepSeek's
    ``n_shared_experts``) and its router; DeepSeek's first ``first_k_dense_replace`` layers are
    dense. Multi-head latent attention (``kv_lora_rank``) counts its own projections (q directly
    or through ``q_lora_rank``, the latent's, its expansion, the output) and 2*B*H*(qk + v) per
    pair, qk = ``qk_nope_head_dim + qk_rope_head_dim``, v = ``v_head_dim``."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hq, hk = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    dense = 3 * h * i
    if cfg.get("num_experts_per_tok"):
        # (Qwen3-MoE, Mixtral, DeepSeek)
        experts = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts", 0)
        moe_i = cfg.get("moe_intermediate_size", i)
        mlp = 3 * h * moe_i * (cfg["num_experts_per_tok"] + cfg.get("n_shared_experts", 0)) + h * experts
    else:
        mlp = dense
    if cfg.get("kv_lora_rank"):  # multi-head latent attention
        qk, v, rank = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
        q_rank = cfg.get("q_lora_rank")
        q = h * hq * qk if not q_rank else h * q_rank + q_rank * hq * qk
        projections = q + h * (rank + cfg["qk_rope_head_dim"]) + rank * hq * (cfg["qk_nope_head_dim"] + v) + hq * v * h
        pair = 2 * hq * (qk + v)
    else:
        projections, pair = h * (hq * d) * 2 + h * (hk * d) * 2, 4 * hq * d
    dense_layers = min(cfg.get("first_k_dense_replace", 0), L) if cfg.get("num_experts_per_tok") else 0
    tokens = batch * seq
    pairs = sum(seq * seq / 2 if w is None or seq <= w else w * w / 2 + (seq - w) * w
                for w in layer_windows(cfg))
    attention = 3.5 * batch * pair * pairs
    linear = projections * L + mlp * (L - dense_layers) + dense * dense_layers
    return 6 * (linear + h * cfg["vocab_size"]) * tokens + attention


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------
def _ids(cfg, batch, seq, device):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, cfg["vocab_size"], (batch, seq), generator=g).to(device)


def _train_steps(model, forward, ids, warmup, steps, device, on_step=None, profile=False):
    """(median step seconds, peak bytes or None, last loss, kernels of one more step run under the
    profiler: see :func:`fastllama.bench.profile.profile_step`; None without ``profile``)."""
    opt = _optimizer(model, device)

    def step():
        loss = forward(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
        on_step and on_step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        on_step and on_step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    kernels = None
    if profile:
        try:
            kernels = profile_step(step, device)
        except Exception as e:  # noqa: BLE001  (a profiler failure, CUPTI say, must not cost the timed row)
            print(f"profiler failed, no kernel times for this configuration: {type(e).__name__}: {e}", file=sys.stderr)
    del opt
    return statistics.median(times), peak, float(loss.detach().float()), kernels


def plan_batches(settings: TrainSettings, log=print) -> dict[int, int]:
    """Batch per sequence length: fixed, or the largest that keeps the baseline under
    ``memory_fraction`` of the device, from probe steps at batch 1 and 2."""
    if settings.batch is not None or settings.device != "cuda":
        return {s: settings.batch or 1 for s in settings.seq_lens}
    total = torch.cuda.get_device_properties(0).total_memory * settings.memory_fraction
    plan = {}
    baseline = settings.preset.baseline
    model, forward = build(baseline, settings)
    try:
        for seq in settings.seq_lens:
            try:
                # The peak of a step at batch b is fixed + b * per_seq. What is fixed is not just
                # weights + gradients + AdamW moments: the peak can come before the gradients exist
                # (at the logits), so both terms are measured, from the peaks at batch 1 and 2.
                peaks = []
                for b in (1, 2):
                    _free("cuda")
                    ids = _ids(settings.preset.config, b, seq, "cuda")
                    peaks.append(_train_steps(model, forward, ids, 1, 1, "cuda")[1])
                per_seq = max(peaks[1] - peaks[0], 1)
                fixed = peaks[0] - per_seq
                plan[seq] = max(1, int((total - fixed) // per_seq))
            except torch.OutOfMemoryError:
                plan[seq] = 1
            log(f"  batch for seq {seq}: {plan[seq]} (probes of {baseline} at batch 1 and 2)")
    finally:
        del model, forward
        _free("cuda")
    return plan


def run_config(config: str, settings: TrainSettings, batches: dict[int, int], progress: bool = True,
               profiles: list | None = None) -> list[dict]:
    """Rows for one configuration at every sequence length, behind one progress bar. With
    ``settings.profile`` the per-category kernel times of one step at the first sequence length
    are appended to ``profiles``."""
    p, dev = settings.preset, settings.device
    base = dict(preset=p.name, config=config)
    why = unavailable(config, p.model_type, p.hf_attention)
    if why:
        return [dict(base, seq_len=s, batch=batches[s], status=f"skipped: {why}") for s in settings.seq_lens]
    rows = []
    bar = common.progress_bar(total=len(settings.seq_lens) * (settings.warmup + settings.steps),
                              desc=f"{config:<20}", disable=not progress, leave=True)
    guard = _restored_modeling(p.model_type) if config == "hf-liger" else contextlib.nullcontext()
    if config == "hf+fastllama-recompute":
        from ..ops.attention import deterministic_backward

        guard = deterministic_backward("recompute")
    model = forward = None
    try:
        with guard:
            for seq in settings.seq_lens:
                batch = batches[seq]
                row = dict(base, seq_len=seq, batch=batch)
                bar.set_postfix_str(f"seq {seq} x {batch}")
                try:
                    if model is None:
                        model, forward = build(config, settings)
                    ids = _ids(p.config, batch, seq, dev)
                    profile = settings.profile and seq == settings.seq_lens[0] and profiles is not None
                    sec, peak, loss, kernels = _train_steps(model, forward, ids, settings.warmup, settings.steps,
                                                            dev, on_step=lambda: bar.update(1), profile=profile)
                    if kernels is not None:
                        profiles += summarize(kernels, dict(config=config, seq_len=seq, batch=batch))
                    row.update({"tokens/s": batch * seq / sec, "step ms": sec * 1e3,
                                "peak GiB": peak / 2**30 if peak is not None else None,
                                "TFLOP/s": model_flops_per_step(p.config, batch, seq) / sec / 1e12,
                                "loss": loss, "status": "ok"})
                except torch.OutOfMemoryError:
                    row["status"] = "OOM"
                    model = forward = None  # rebuild: the failed step may have left state behind
                except Exception as e:  # noqa: BLE001  (recorded, not raised: one broken path keeps the rest)
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    row["traceback"] = traceback.format_exc(limit=8)
                    model = forward = None
                rows.append(row)
                _free(dev)
    except KeyboardInterrupt as e:  # a time limit's SIGINT: the rows measured so far go with it
        raise _Interrupted(rows) from e
    finally:
        del model, forward
        if config == "hf-compile":
            torch._dynamo.reset()  # its compiled graphs and guards leave with it
        _free(dev)
        bar.close()
    return rows


def add_ratios(rows: list[dict], baseline: str = "hf-sdpa") -> None:
    """``vs <baseline>`` (tokens/s ratio) and ``peak vs <baseline>`` for every measured row."""
    base = {(r["preset"], r["seq_len"]): r for r in rows if r["config"] == baseline and r.get("status") == "ok"}
    for r in rows:
        b = base.get((r["preset"], r["seq_len"]))
        if b is None or r.get("status") != "ok":
            continue
        r[f"vs {baseline}"] = r["tokens/s"] / b["tokens/s"]
        if r.get("peak GiB") and b.get("peak GiB"):
            r[f"peak vs {baseline}"] = r["peak GiB"] / b["peak GiB"]


# Liger patches transformers' modeling module globally; run_config restores it afterwards, so its
# place in the order is free: right after fastllama's rows, which the 1.1x target compares it with.
RUN_ORDER = ("hf-sdpa", "hf-eager", "hf+fastllama", "hf+fastllama-atomic", "hf+fastllama-recompute", "hf-liger",
             "reference+fastllama", "hf-compile")


class _Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or a time limit's SIGINT, carrying the configuration's rows so far."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self.rows = rows


INTERRUPTED = "interrupted (time limit or Ctrl-C): not run"


def run_train(settings: TrainSettings, progress: bool = True, log=print, on_rows=None,
              profiles: list | None = None) -> list[dict]:
    """Every configuration of ``settings``, in the order of :data:`RUN_ORDER` (baseline first;
    what the targets compare with before what they do not; torch.compile, the slowest to set up,
    last); returns the rows with ratios to the baseline. ``on_rows(rows)`` is called after each
    configuration (the CLI writes partial results: a run cut short by a time limit keeps what
    it measured). With ``settings.profile``, ``profiles`` receives the kernel-time rows (see
    :mod:`fastllama.bench.profile`). Interrupted (SIGINT), it keeps the rows measured and gives
    every shape not measured a row with status :data:`INTERRUPTED`."""
    order = sorted(settings.configs, key=lambda c: (c != settings.preset.baseline,
                                                    RUN_ORDER.index(c) if c in RUN_ORDER else len(RUN_ORDER)))
    log(f"training benchmark: {settings.preset.name} ({settings.preset.note}), "
        f"{str(settings.dtype).removeprefix('torch.')} on {common.environment()['device']}, "
        f"{settings.warmup} warm-up + {settings.steps} measured steps per shape")
    batches = plan_batches(settings, log)
    rows = []
    try:
        for config in order:
            rows += run_config(config, settings, batches, progress, profiles)
            add_ratios(rows, settings.preset.baseline)
            if on_rows is not None:
                on_rows(rows)
    except KeyboardInterrupt as e:
        rows += e.rows if isinstance(e, _Interrupted) else []
        done = {(r["config"], r["seq_len"]) for r in rows}
        rows += [dict(preset=settings.preset.name, config=c, seq_len=s, batch=batches[s], status=INTERRUPTED)
                 for c in order for s in settings.seq_lens if (c, s) not in done]
        add_ratios(rows, settings.preset.baseline)
        log("interrupted: writing the rows measured so far")
        if on_rows is not None:
            on_rows(rows)
    return rows


# The fields of the attention choices' shape keys (fastllama.ops.attention._shape_key); "count" is
# what else the choice depends on, to a power of two.
_SHAPE_FIELDS = ("device", "dtype", "head_dim", "group", "{count}", "q_bucket", "k_bucket", "varlen")


def _shape_fields(key: tuple, names: tuple) -> dict:
    fields = dict(zip(names, key))
    fields["dtype"] = str(fields["dtype"]).removeprefix("torch.")
    return fields


def timed_choices() -> dict[str, list[dict]]:
    """What the run's timed choices decided, one dict per shape, for the results JSON: the chunked
    loss's weight-gradient GEMM (``cross_entropy_weight_grad_gemm``), the deterministic attention
    backward's algorithm (``attention_backward``, "auto") and the attention programs' order
    (``attention_program_order``). Empty off a GPU, where nothing is timed."""
    from ..ops.attention import deterministic_backward_choices, program_order_choices
    from ..ops.cross_entropy import weight_grad_gemm_choices

    shape = lambda count: tuple(f.format(count=count) for f in _SHAPE_FIELDS)
    return {
        "cross_entropy_weight_grad_gemm": [
            dict(_shape_fields(key, ("device", "dtype", "vocab", "hidden", "chunk_rows_bucket")), **entry)
            for key, entry in weight_grad_gemm_choices().items()],
        "attention_backward": [dict(_shape_fields(key, shape("partials_bucket")), **entry)
                               for key, entry in deterministic_backward_choices().items()],
        "attention_program_order": [
            dict(_shape_fields(key, ("direction", *shape("rows_bucket"), "precision", "softcap", "deterministic")),
                 **entry)
            for key, entry in program_order_choices().items()],
    }


def train_extra(settings: TrainSettings) -> dict:
    """What goes into the JSON next to the rows: the settings and the preset."""
    return {
        "preset": settings.preset.name, "preset_note": settings.preset.note, "model_config": settings.preset.config,
        "baseline": settings.preset.baseline,
        "dtype": str(settings.dtype).removeprefix("torch."), "warmup_steps": settings.warmup,
        "measured_steps": settings.steps, "optimizer": "torch.optim.AdamW(fused=True), lr 1e-5",
        "step": "forward with labels (loss inside the model), backward, optimizer.step(), zero_grad(set_to_none)",
        "batch": "fixed" if settings.batch else f"filled to {settings.memory_fraction:.0%} of device memory",
        "targets (llama-3.2-1b, seq 4k, H100/H200)": {"tokens/s vs hf-sdpa": ">= 1.3", "tokens/s vs hf-liger": ">= 1.1",
                                                     "peak vs hf-sdpa": "<= 0.6"},
        "flops": "6 x matmul params (MoE: the active experts + router) x tokens + causal attention "
                 "7*B*H*T^2*D per layer (a window of W keys: 14*B*H*D*(W^2/2 + (T-W)*W))",
    }

