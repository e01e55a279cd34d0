"""fastllama bench: the memory report counts what autograd really saves, the smoke run works,
results are written in the shared format."""
from __future__ import annotations

import gc
import json
import os
import weakref

import pytest
import torch
import torch.nn as nn

from fastllama.bench import common, memory, train
from fastllama.bench.presets import get_preset
from fastllama.cli import main

# The CLI runs the real benchmarks on a GPU (minutes each; gpu_check.sh's bench stages run them
# there): these tests check the interpreter smoke runs, so they are for CPU-only machines.
smoke_run_only = pytest.mark.skipif(common.on_gpu(), reason="the interpreter smoke run; on a GPU "
                                    "the benchmarks themselves run in gpu_check.sh's bench stages")

# ---------------------------------------------------------------------------------------------
# The recorder: storages once, parameters out, ctx attributes in
# ---------------------------------------------------------------------------------------------
class _Stash(torch.autograd.Function):
    """Keeps a tensor as a plain ctx attribute, inside nested containers, bypassing
    save_for_backward (and its hooks)."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = {"doubled": [x * 2]}
        return x + 1

    @staticmethod
    def backward(ctx, g):
        return g * ctx.kept["doubled"][0]


def test_recorder_counts_storages_once_without_parameters_and_with_ctx_attributes():
    lin = nn.Linear(16, 16, bias=False)
    rec = memory._Recorder(lin)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        h = x.exp()  # saves its output: 4*16*4 bytes
        y = lin(h[:, :16]) * h.view(64).view(4, 16)  # views of h's storage: not counted again
        z = _Stash.apply(y)
    rec.add_ctx_attributes(z.grad_fn)
    rec.close()
    parts = {}
    for part, nbytes in rec.seen.values():
        parts[part] = parts.get(part, 0) + nbytes
    # exp's output (256 B), mul saves lin's output (256 B); lin.weight excluded; ctx.kept 256 B
    assert rec.ctx_bytes == 256
    assert sum(parts.values()) == 3 * 256, rec.detail


class _AliveStorages(common.NewStorages):
    """Every storage an op creates (custom ops' insides included), by storage key, with a weak
    reference: which of them a forward leaves alive is seen without any autograd hook."""

    def __init__(self):
        super().__init__()
        self.created_storages = {}

    def created(self, tensor):
        storage = tensor.untyped_storage()
        earlier = self.created_storages.get(storage._cdata)
        if earlier is None or earlier[0]() is None:  # (a freed storage's key can be reused)
            self.created_storages[storage._cdata] = (weakref.ref(storage), storage.nbytes())


@pytest.mark.parametrize("mode", memory.MODES)
def test_recorder_counts_every_storage_the_forward_leaves_alive(mode):
    """Independent of the recorder's hooks and graph walk: the storages a training forward
    creates and leaves alive while only its loss is held (what the graph keeps for backward,
    however it keeps it: save_for_backward, ctx attributes, nested containers, closures) are
    exactly the storages the recorder counted, byte for byte."""
    model = memory.build_model(mode, get_preset("tiny", layers=2).config)
    params = {memory._storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    alive = _AliveStorages()
    with alive:
        ids = torch.randint(0, model.config.vocab_size, (1, 16))  # embedding backward keeps the ids
        rec, loss = memory.recorded_forward(model, ids)
    rec.keep.clear()  # the recorder's own references: only the graph holds the storages now
    gc.collect()
    left_alive = {key: nbytes for key, (ref, nbytes) in alive.created_storages.items()
                  if ref() is not None and key not in params and key != memory._storage_key(loss)}
    assert set(left_alive) == set(rec.seen), rec.detail
    assert sum(left_alive.values()) == sum(n for _, n in rec.seen.values()) > 0


# ---------------------------------------------------------------------------------------------
# The report itself
# ---------------------------------------------------------------------------------------------
def test_fake_execution_saves_the_same_tensors_as_real():
    """The report runs big shapes under FakeTensorMode on a CPU: check it saves, tensor by tensor,
    what the real forward (kernels in the interpreter) saves, at the 1B layer shape."""
    cfg = dict(get_preset("llama-3.2-1b", layers=2).config, vocab_size=512)
    for mode in ("hf-sdpa", "hf+fastllama"):
        real = memory.measure_mode(mode, cfg, (8,), device=common.device(), execution="real")[0]
        fake = memory.measure_mode(mode, cfg, (8,), device=common.device(), execution="fake")[0]
        assert [d[:5] for d in fake.detail] == [d[:5] for d in real.detail], mode
        assert fake.by_part == real.by_part


def test_memory_report_hf_vs_fastllama():
    rows = memory.memory_report(presets=("tiny", "llama-3.2-1b"), modes=("hf-sdpa", "hf+fastllama"), device=common.device(),
                                progress=False)
    by = {(r["preset"], r["mode"]): r for r in rows}
    assert by[("tiny", "hf-sdpa")]["execution"] == "real"
    hf, fast = by[("llama-3.2-1b", "hf-sdpa")], by[("llama-3.2-1b", "hf+fastllama")]
    # DESIGN.md: HF's Llama (sdpa, bf16) saves about 106 KiB per token per layer at the 1B shape,
    # and its fp32 logits alone cost 501 KiB per token at a 128k vocabulary
    assert 100 < hf["layer KiB/token"] < 112
    assert hf["head+loss KiB/token"] > 501
    # what fastllama saves, measured (see the report for the numbers): less per layer, and the
    # head + loss keeps no logits (its fixed part is the LM head's weight gradient, bf16 V x H)
    for preset in ("tiny", "llama-3.2-1b"):
        f, h = by[(preset, "hf+fastllama")], by[(preset, "hf-sdpa")]
        assert f["layer KiB/token"] < h["layer KiB/token"], preset
        assert f["head+loss KiB/token"] < h["head+loss KiB/token"], preset
        assert f["unattributed KiB/token"] == 0 and f["ctx-attribute bytes"] == 0
    assert fast["head+loss KiB/token"] < 0.05 * hf["head+loss KiB/token"]  # the target
    assert fast["layer KiB/token"] <= 0.5 * hf["layer KiB/token"]  # the target (norms and SwiGLU folded)
    # with that fixed part included, at a 4k-token step: still under HF's, and above the
    # per-token ratio (the fixed bytes are not hidden)
    at_step = fast[memory._HEAD_AT_STEP]
    assert fast["head+loss vs HF"] < at_step < 1
    # at most the LM head's weight gradient (bf16 V x H), which a backward allocates anyway
    assert fast["head+loss fixed MiB"] <= 128256 * 2048 * 2 / 2**20 * (1 + 1e-9)


def test_memory_report_of_the_other_families():
    """Qwen3-0.6B, Phi-4-mini and Gemma-3-1B shapes (q/k norms; merged projections, partial
    rotary; four (1 + w) norms a layer, GeGLU, a 262k vocabulary): patched, a layer keeps at most
    half what HF sdpa keeps and the head + loss no logits; the reference model (a Llama) has no
    row for them."""
    presets = ("qwen3-0.6b", "phi-4-mini", "gemma-3-1b")
    rows = memory.memory_report(presets=presets, device=common.device(), progress=False)
    by = {(r["preset"], r["mode"]): r for r in rows}
    assert set(by) == {(p, m) for p in presets for m in ("hf-sdpa", "hf+fastllama")}
    for preset in presets:
        hf, fast = by[(preset, "hf-sdpa")], by[(preset, "hf+fastllama")]
        assert fast["layer KiB/token"] <= 0.5 * hf["layer KiB/token"], preset
        assert fast["head+loss KiB/token"] < 0.05 * hf["head+loss KiB/token"], preset
        assert fast["unattributed KiB/token"] == 0 and fast["ctx-attribute bytes"] == 0


def test_memory_report_of_olmo2():
    """OLMo-2-1B: a layer keeps 0.58x what HF sdpa keeps (measured: 88.6 vs 152.1 KiB a token),
    more than the other families' <= 0.5x: its norms follow the branches, so none folds into a
    projection, and the q/k norms' inputs are whole projections (8 KiB a token); the head + loss
    keeps no logits."""
    rows = memory.memory_report(presets=("olmo-2-1b",), device=common.device(), progress=False)
    hf, fast = rows
    assert (hf["mode"], fast["mode"]) == ("hf-sdpa", "hf+fastllama")
    assert fast["layer KiB/token"] <= 0.6 * hf["layer KiB/token"]
    assert fast["head+loss KiB/token"] < 0.05 * hf["head+loss KiB/token"]
    assert fast["unattributed KiB/token"] == 0 and fast["ctx-attribute bytes"] == 0


def test_memory_report_of_a_mixture_of_experts():
    """Qwen3-30B-A3B (128 experts, 8 per token): a layer keeps 0.34x what HF sdpa keeps
    (measured: 64.1 vs 190.1 KiB a token), the experts on ops.moe_experts: per (token, expert)
    pair one gate-up output (8 x 3 KiB) where HF's grouped matmuls keep it, act(gate), the gated
    product, the token's row gathered and the expert's output (8 x 12.5 KiB). Without that op
    (the experts as HF computes them) the layer keeps 0.80x. The head + loss keeps no logits."""
    rows = memory.memory_report(presets=("qwen3-30b-a3b",), device=common.device(), progress=False)
    hf, fast = rows
    assert (hf["mode"], fast["mode"]) == ("hf-sdpa", "hf+fastllama")
    assert fast["layer KiB/token"] <= 0.5 * hf["layer KiB/token"]  # the target
    assert fast["head+loss KiB/token"] < 0.05 * hf["head+loss KiB/token"]
    assert fast["unattributed KiB/token"] == 0 and fast["ctx-attribute bytes"] == 0


def test_family_presets_build_their_own_hf_class(monkeypatch):
    """A preset's model_type picks the transformers class; the reference model and Liger's
    patch of another family are refused with a reason (a row, not a crash)."""
    from fastllama.bench import presets

    for name, cls in (("llama-3.2-1b", "LlamaForCausalLM"), ("qwen3-0.6b", "Qwen3ForCausalLM"),
                      ("phi-4-mini", "Phi3ForCausalLM"), ("gemma-3-1b", "Gemma3ForCausalLM"),
                      ("olmo-2-1b", "Olmo2ForCausalLM"), ("qwen3-30b-a3b", "Qwen3MoeForCausalLM")):
        p = get_preset(name, layers=1)
        model = presets.hf_model(p.config, torch.bfloat16, "meta")
        assert type(model).__name__ == cls and model.config._attn_implementation == "sdpa"
        assert next(model.parameters()).dtype == torch.bfloat16
        assert model.config.num_hidden_layers == 1 and model.config.vocab_size == p.config["vocab_size"]
    assert "partial_rotary_factor" in str(get_preset("phi-4-mini").config)
    assert presets.hf_model(get_preset("phi-4-mini", layers=1).config, torch.bfloat16, "meta").model.rotary_emb.inv_freq.numel() == 48
    with pytest.raises(ValueError, match="the reference model is a Llama"):
        presets.reference_model(get_preset("qwen3-0.6b").config, torch.bfloat16, "meta")
    assert "reference model is a Llama" in train.unavailable("reference+fastllama", "qwen3")
    assert train.unavailable("reference+fastllama", "llama") is None
    g2 = get_preset("gemma-2-2b", layers=1)
    model = presets.hf_model(g2.config, torch.bfloat16, "meta", g2.hf_attention)
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config.attn_logit_softcapping == 50.0
    assert g2.baseline == "hf-eager" and "hf-sdpa" not in g2.default_configs
    assert get_preset("tiny").baseline == "hf-sdpa" and "hf-eager" not in get_preset("tiny").default_configs


def test_training_benchmark_of_a_family_preset_smoke_run(monkeypatch):
    """The training benchmark on a Qwen3 (a Phi-3, a Gemma 3, an OLMo 2, a Qwen3-MoE) shape, shrunk to the tiny
    preset's size: HF sdpa and the patched model run; the reference model's row says why it is
    skipped."""
    import dataclasses

    tiny = get_preset("tiny")
    for family, extra in (("qwen3", {}), ("phi3", dict(pad_token_id=0)), ("gemma3_text", dict(pad_token_id=0)),
                          ("olmo2", dict(pad_token_id=0)),
                          ("qwen3_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64))):
        # (each family's default rotary parameters: Gemma 3's are per layer type)
        config = {k: v for k, v in tiny.config.items() if k != "rope_parameters"}
        preset = dataclasses.replace(tiny, name=f"tiny-{family}", config=dict(config, model_type=family, **extra))
        monkeypatch.setattr(train, "get_preset", lambda name, layers=None, preset=preset: preset)
        s = train.default_settings(preset.name, quick=True, configs=("hf-sdpa", "hf+fastllama", "reference+fastllama"),
                                   steps=1, warmup=0)
        rows = {r["config"]: r for r in train.run_train(s, progress=False, log=lambda *a: None)}
        assert rows["hf-sdpa"]["status"] == rows["hf+fastllama"]["status"] == "ok", rows
        assert rows["reference+fastllama"]["status"].startswith("skipped: the reference model is a Llama")


def test_training_benchmark_of_an_eager_preset(monkeypatch):
    """A preset whose HF rows run eager attention (Gemma 2: transformers' sdpa path does not apply
    its score cap), shrunk to the tiny preset's size: hf-eager is the baseline the ratios name,
    hf-sdpa is a row saying why it is not run, and the patched model computes the eager model's
    loss (caps small enough to bind on these weights: a dropped cap changes the loss)."""
    import dataclasses

    tiny = get_preset("tiny")
    config = {k: v for k, v in tiny.config.items() if k != "rope_parameters"}
    preset = dataclasses.replace(tiny, name="tiny-gemma2", hf_attention="eager", config=dict(
        config, model_type="gemma2", pad_token_id=0, sliding_window=16, attn_logit_softcapping=0.002,
        final_logit_softcapping=0.05))
    monkeypatch.setattr(train, "get_preset", lambda name, layers=None: preset)
    s = train.default_settings(preset.name, quick=True, steps=1, warmup=0)
    assert s.configs[0] == "hf-eager" and "hf-sdpa" not in s.configs
    s = dataclasses.replace(s, configs=("hf+fastllama", "hf-sdpa", "hf-eager"))
    rows = train.run_train(s, progress=False, log=lambda *a: None)
    assert [r["config"] for r in rows] == ["hf-eager", "hf-sdpa", "hf+fastllama"]  # the baseline first
    by = {r["config"]: r for r in rows}
    assert by["hf-sdpa"]["status"].startswith("skipped: transformers' sdpa attention does not compute")
    assert by["hf-eager"]["status"] == by["hf+fastllama"]["status"] == "ok", rows
    assert by["hf+fastllama"]["vs hf-eager"] > 0 and "vs hf-sdpa" not in by["hf+fastllama"]
    assert by["hf+fastllama"]["loss"] == pytest.approx(by["hf-eager"]["loss"], rel=2e-6)
    assert "vs hf-eager" in train.train_columns(preset.baseline)
    assert train.train_extra(s)["baseline"] == "hf-eager"


# ---------------------------------------------------------------------------------------------
# Training benchmark and CLI
# ---------------------------------------------------------------------------------------------
def test_oom_is_a_row_not_a_crash(monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "_train_steps", oom)
    s = train.default_settings("tiny", quick=True, configs=("hf-sdpa",), layers=1)
    rows = train.run_train(s, progress=False, log=lambda *a: None)
    assert [r["status"] for r in rows] == ["OOM"]


@smoke_run_only
def test_bench_default_smoke_run(tmp_path, monkeypatch, capsys):
    """`fastllama bench` on a CPU: the tiny preset, labelled a smoke run, table printed, results
    written (JSON with the environment, markdown, PNG)."""
    from fastllama.bench import presets

    monkeypatch.setattr(presets, "CONFIGS", ("hf-sdpa", "hf+fastllama"))  # compile: minutes on CPU
    monkeypatch.delenv("FASTLLAMA_RESULTS_DIR", raising=False)
    assert main(["bench", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE RUN" in out and "not a measurement" in out
    assert "| tiny | 64 | 1 | hf+fastllama |" in out
    data = json.loads((tmp_path / "train-tiny.json").read_text())
    env = data["environment"]
    assert {"date", "command", "device", "torch", "triton", "transformers"} <= set(env)
    assert env["measurement"] is False
    rows = {r["config"]: r for r in data["rows"]}
    assert rows["hf-sdpa"]["status"] == rows["hf+fastllama"]["status"] == "ok"
    assert rows["hf+fastllama"]["tokens/s"] > 0 and rows["hf+fastllama"]["vs hf-sdpa"] > 0
    assert (data["cross_entropy_weight_grad_gemm"] == data["attention_backward"] == data["attention_program_order"]
            == [])  # (off a GPU nothing is timed)
    for name, label in (("train-tiny", "not a measurement"), ("memory-tiny", "device-independent")):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        md = (tmp_path / f"{name}.md").read_text()
        assert label in md and f"![{name}]({name}.png)" in md


def test_results_dir_and_plots_for_other_benchmarks(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    rows = [{"tokens": t, "method": m, "ms": float(t) / (2 if m == "fastllama" else 1), "peak_GiB": 1.0}
            for t in (1024, 2048) for m in ("hf", "fastllama")]
    out = common.write_results("cross_entropy", rows)  # as the op scripts call it: no plot
    assert out == tmp_path and not (tmp_path / "cross_entropy.png").exists()
    from fastllama.bench.plots import plot_missing

    written = plot_missing(tmp_path)
    assert (tmp_path / "cross_entropy.png") in written
    assert "cross_entropy.png" in (tmp_path / "cross_entropy.md").read_text()
    assert plot_missing(tmp_path) == []  # up to date: drawn once
    # a second run into the same folder: its plot, not the first run's, and the table links it
    png = tmp_path / "cross_entropy.png"
    os.utime(png, ns=(png.stat().st_mtime_ns - 10**9,) * 2)
    common.write_results("cross_entropy", rows[:2])
    assert png in plot_missing(tmp_path) and "cross_entropy.png" in (tmp_path / "cross_entropy.md").read_text()


def test_training_flops_count_windows_and_active_experts():
    """The TFLOP/s column's count, against one written out here for three presets' shapes."""
    from fastllama.bench.train import model_flops_per_step

    def count(h, i, L, hq, hk, d, vocab, windows, T, mlp=None):
        linear = L * (2 * h * hq * d + 2 * h * hk * d + (3 * h * i if mlp is None else mlp)) + h * vocab
        pairs = sum(sum(min(t + 1, w or T) for t in range(T)) for w in windows)  # keys each query sees
        return 6 * linear * T + 3.5 * 4 * hq * d * pairs

    T = 4096
    llama = count(2048, 8192, 16, 32, 8, 64, 128256, [None] * 16, T)
    assert model_flops_per_step(get_preset("llama-3.2-1b").config, 1, T) == pytest.approx(llama, rel=1e-3)
    gemma3 = count(1152, 6912, 26, 4, 1, 256, 262144, [None if (i + 1) % 6 == 0 else 512 for i in range(26)], T)
    assert model_flops_per_step(get_preset("gemma-3-1b").config, 1, T) == pytest.approx(gemma3, rel=1e-3)
    qwen = count(2048, 0, 4, 32, 4, 128, 151936, [None] * 4, T, mlp=3 * 2048 * 8 * 768 + 2048 * 128)
    assert model_flops_per_step(get_preset("qwen3-30b-a3b").config, 1, T) == pytest.approx(qwen, rel=1e-3)
    # DeepSeek-V2-Lite (4 layers): multi-head latent attention (q_proj, the latent's projection of
    # 512 + 64, its expansion to 16 heads of 128 + 128, o_proj), a dense first layer, then 6 of
    # 64 experts and 2 shared ones; attention 2 x 16 x (192 + 128) per pair
    h, L = 2048, 4
    attention_linears = h * 16 * 192 + h * (512 + 64) + 512 * 16 * (128 + 128) + 16 * 128 * h
    linear = (L * attention_linears + 3 * h * 10944 + (L - 1) * (3 * h * 1408 * (6 + 2) + h * 64)
              + h * 102400)
    deepseek = 6 * linear * T + 3.5 * 2 * 16 * (192 + 128) * T * (T + 1) / 2 * L
    assert model_flops_per_step(get_preset("deepseek-v2-lite").config, 1, T) == pytest.approx(deepseek, rel=1e-3)


def test_decode_timing_drowned_in_noise_is_an_error_not_a_huge_speed(monkeypatch):
    """HF's decode step is t(n) - t(2): when noise makes that <= 0 a measurement says so (it was
    clamped to 1e-9 s, a row of 2e9 tokens/s); a smoke run reports the whole call per token."""
    import time as time_module

    from benchmarks import bench_decode

    class SlowerWithFewerTokens:  # t(2) > t(n)
        def generate(self, prompt, max_new_tokens, **kw):
            time_module.sleep(0.02 if max_new_tokens == 2 else 0.005)

    prompt = torch.zeros(1, 4, dtype=torch.long)
    monkeypatch.setattr(bench_decode.common, "is_measurement", lambda: False)
    step, steps, _ = bench_decode.time_hf(SlowerWithFewerTokens(), prompt, 6, 1, False)
    assert 0.005 / 6 <= step < 0.02 / 6 and steps == 4
    monkeypatch.setattr(bench_decode.common, "is_measurement", lambda: True)
    with pytest.raises(ValueError, match="is not above t\\(2\\)"):
        bench_decode.time_hf(SlowerWithFewerTokens(), prompt, 6, 1, False)


def test_attention_softcap_rows_name_the_tiles_they_ran(monkeypatch):
    """Soft-capped launches skip the autotuner: their rows name the soft-cap tiles and the
    deterministic backward's two kernels, not the previous provider's autotuned picks."""
    from benchmarks import bench_attention
    from fastllama.kernels.flash_attention import softcap_config
    from fastllama.ops import attention as attention_ops

    monkeypatch.setattr(attention_ops, "autotuned_choices", lambda: {"fwd": "M1 N1 w1 s1", "dkdv_atomic": "M2 N2 w2 s2"})
    monkeypatch.setattr(bench_attention.common, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])  # one run
    fn = bench_attention._providers()["fastllama-softcap"]
    rows, _ = bench_attention.bench_case("fastllama-softcap", fn, 1, 2, 16, 64, True, torch.float32)
    q = torch.empty(1, 2, 16, 64)
    tile = {w: "M{} N{} w{} s{}".format(*softcap_config(w, q, True, "ieee")) for w in ("fwd", "dkdv", "dq")}
    assert [r["note"] for r in rows] == [tile["fwd"], f"dkdv {tile['dkdv']}; dq {tile['dq']}"]


def test_attention_providers_option_picks_rows(tmp_path, capsys):
    """--providers (what --quick passes) runs only the providers named, and names every provider
    the script has (one missing from PROVIDERS would silently never run)."""
    from benchmarks import bench_attention

    assert set(bench_attention._providers()) <= set(bench_attention.PROVIDERS)
    assert bench_attention.main(["--providers", "fastllama-atomic", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"fastllama-atomic"} and len(rows) == 2


def test_attention_partials_rows_run_the_partials_backward(tmp_path, monkeypatch):
    """fastllama-partials times the backward under set_deterministic_backward("partials") (read
    when the backward runs, so the whole case runs inside it), names the partials kernel's tile,
    and leaves the process's choice as it was; fastllama's rows run the default, "auto" (which
    recomputes off the GPU)."""
    from benchmarks import bench_attention
    from fastllama.kernels import flash_attention_backward as kbwd
    from fastllama.ops import attention as attention_ops

    launched = []
    real = kbwd.flash_attention_backward
    monkeypatch.setattr(kbwd, "flash_attention_backward",
                        lambda *a, **kw: launched.append(kw["dq_partials"]) or real(*a, **kw))
    monkeypatch.setattr(attention_ops, "autotuned_choices", lambda: {"dkdv_partials": "M2 N2 w2 s2", "dq": "M3"})
    assert bench_attention.main(["--providers", "fastllama", "fastllama-partials", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench_attention.json").read_text())["rows"]
    assert [(r["provider"], r["direction"]) for r in rows] == [("fastllama", "fwd"), ("fastllama", "bwd"),
                                                               ("fastllama-partials", "fwd"),
                                                               ("fastllama-partials", "bwd")]
    assert rows[3]["note"] == "dkdv_partials M2 N2 w2 s2"
    split = launched.index(1)  # (one program per (sequence, KV head) off the GPU)
    assert launched[:split] and set(launched[:split]) == {0} and set(launched[split:]) == {1}
    assert attention_ops._deterministic_backward["algorithm"] == "auto"


@pytest.mark.parametrize("chosen", ["partials", "recompute", "untimed"])
def test_attention_default_rows_say_what_auto_chose(monkeypatch, chosen):
    """On a GPU the default backward ("auto") chooses in the case's warm-up: fastllama's
    backward row says which it chose, both times, and names the tiles of the kernels it ran."""
    from benchmarks import bench_attention
    from fastllama.ops import attention as attention_ops

    entry = {"algorithm": chosen, "partials": 7, "recompute_ms": 6.3, "partials_ms": 5.1 if chosen == "partials" else 7,
             "why": ""}
    if chosen == "untimed":
        entry = {"algorithm": "recompute", "partials": 7, "recompute_ms": None, "partials_ms": None, "why": "no room"}
    calls = []
    monkeypatch.setattr(attention_ops, "deterministic_backward_choices",
                        lambda: calls.append(1) or ({"old": {}, "new": entry} if len(calls) > 1 else {"old": {}}))
    monkeypatch.setattr(attention_ops, "autotuned_choices", lambda: {"dkdv_partials": "M2", "dkdv": "M3", "dq": "M4"})
    monkeypatch.setattr(bench_attention.common, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])  # one run
    rows, _ = bench_attention.bench_case("fastllama", bench_attention._providers()["fastllama"], 1, 2, 16, 64, True,
                                         torch.float32)
    assert rows[0]["note"] == "" and rows[1]["note"] == {
        "partials": "auto: partials (P 7) 5.1 ms, recompute 6.3 ms; dkdv_partials M2",
        "recompute": "auto: recompute 6.3 ms, partials (P 7) 7 ms; dkdv M3; dq M4",
        "untimed": "auto: recompute (no room); dkdv M3; dq M4"}[chosen]


@pytest.mark.parametrize("order", ["grouped", "heads", "untimed"])
def test_attention_rows_say_what_order_the_shape_chose(monkeypatch, order):
    """The shape's first forward and first backward choose the program order in the case's
    warm-up: fastllama's rows say which and both times (nothing where the grouped order was the
    plain one)."""
    from benchmarks import bench_attention
    from fastllama.ops import attention as attention_ops

    timed = order != "untimed"
    entries = {(direction, 1): {"order": order if timed else "heads", "head_groups": (8, groups),
                                "heads_ms": 0.67 * scale if timed else None,
                                "grouped_ms": 0.62 * scale if timed else None}
               for direction, groups, scale in (("forward", 1, 1), ("backward", 4, 3))}
    calls = []
    monkeypatch.setattr(attention_ops, "program_order_choices",
                        lambda: calls.append(1) or ({("old",): {}, **entries} if len(calls) > 1 else {("old",): {}}))
    monkeypatch.setattr(attention_ops, "autotuned_choices", lambda: {"fwd": "M1", "dkdv": "M2", "dq": "M3"})
    monkeypatch.setattr(bench_attention.common, "time_ms", lambda fn, **kw: (fn(), 1.0)[1])  # one run
    rows, _ = bench_attention.bench_case("fastllama", bench_attention._providers()["fastllama"], 1, 2, 16, 64, True,
                                         torch.float32)
    assert [r["note"] for r in rows] == {
        "grouped": ["order: grouped (8 heads) 0.62 ms, by head 0.67 ms; M1",
                    "order: grouped (8 query / 4 KV heads) 1.86 ms, by head 2.01 ms; dkdv M2; dq M3"],
        "heads": ["order: by head 0.67 ms, grouped (8 heads) 0.62 ms; M1",
                  "order: by head 2.01 ms, grouped (8 query / 4 KV heads) 1.86 ms; dkdv M2; dq M3"],
        "untimed": ["M1", "dkdv M2; dq M3"]}[order]


def test_training_json_lists_the_timed_choices(monkeypatch):
    """Each timed choice's shapes come out as named fields, from the keys the ops really make."""
    from fastllama.ops import attention as attention_ops
    from fastllama.ops import cross_entropy as ce_ops

    q, k = torch.empty(2, 8, 300, 64, dtype=torch.bfloat16), torch.empty(2, 2, 300, 64, dtype=torch.bfloat16)
    shape = attention_ops._shape_key(q, k, 16, 300, 300, 600, 0, False)
    monkeypatch.setattr(ce_ops, "_weight_grad_gemm_choices", {(0, torch.bfloat16, 1000, 64, 4096): {"gemm": "triton"}})
    monkeypatch.setattr(attention_ops, "_backward_choices", {shape: {"algorithm": "partials"}})
    monkeypatch.setattr(attention_ops, "_program_orders", {("forward", *shape, "ieee", False): {"order": "grouped"},
                                                           ("backward", *shape, "ieee", False, True): {"order": "heads"}})
    choices = json.loads(json.dumps(train.timed_choices()))
    common = {"device": None, "dtype": "bfloat16", "head_dim": 64, "group": 4, "q_bucket": 512,
              "k_bucket": shape[6], "varlen": False}
    assert choices == {
        "cross_entropy_weight_grad_gemm": [{"device": 0, "dtype": "bfloat16", "vocab": 1000, "hidden": 64,
                                            "chunk_rows_bucket": 4096, "gemm": "triton"}],
        "attention_backward": [dict(common, partials_bucket=16, algorithm="partials")],
        "attention_program_order": [
            dict(common, direction="forward", rows_bucket=16, precision="ieee", softcap=False, order="grouped"),
            dict(common, direction="backward", rows_bucket=16, precision="ieee", softcap=False, deterministic=True,
                 order="heads")]}


def test_training_recompute_configuration_runs_under_the_recompute_backward(monkeypatch):
    """hf+fastllama-recompute: a patched model whose steps run with the recompute backward
    chosen, and the default restored after (hf+fastllama, before it, runs "auto")."""
    from fastllama.ops import attention as attention_ops

    seen = {}

    def steps(model, forward, ids, *args, **kwargs):
        seen[len(seen)] = (attention_ops._deterministic_backward["algorithm"], hasattr(model, "_fastllama_patch"))
        return 1.0, None, 0.0, None

    monkeypatch.setattr(train, "_train_steps", steps)
    s = train.default_settings("tiny", quick=True, configs=("hf+fastllama-recompute", "hf+fastllama"), layers=1)
    rows = train.run_train(s, progress=False, log=lambda *a: None)
    assert [(r["config"], r["status"]) for r in rows] == [("hf+fastllama", "ok"), ("hf+fastllama-recompute", "ok")]
    assert seen == {0: ("auto", True), 1: ("recompute", True)}
    assert attention_ops._deterministic_backward["algorithm"] == "auto"


def test_attention_tuning_rows_and_no_plot_for_them(tmp_path, monkeypatch):
    """bench_attention's tuning table: a row per timed candidate, fastest first, relative to the
    fastest; a candidate that failed (inf) has no ratio; plot_missing draws nothing for it."""
    from benchmarks import bench_attention
    from fastllama.ops import attention as attention_ops

    timings = {"fwd": {"M128 N64 w8 s3": 0.6, "M128 N128 w8 s2": 0.4, "M64 N64 w4 s3": float("inf")}}
    monkeypatch.setattr(attention_ops, "autotune_timings", lambda clear=False: timings)
    rows = bench_attention._tuning_rows({"provider": "fastllama", "T": 4096})
    assert [r["config"] for r in rows] == ["M128 N128 w8 s2", "M128 N64 w8 s3", "M64 N64 w4 s3"]
    assert [r["vs_best"] for r in rows] == [1.0, pytest.approx(1.5), None]
    assert all(r["kernel"] == "fwd" and r["T"] == 4096 for r in rows)
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    common.write_results("bench_attention_tuning", rows)
    from fastllama.bench.plots import plot_missing

    assert plot_missing(tmp_path) == []
    bench_attention.plot([], tmp_path / "none.png", False)  # a run stopped before its first row
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------
# --profile: kernel time by category
# ---------------------------------------------------------------------------------------------
def test_profile_categories_of_gpu_kernel_names():
    """Kernel names as profilers print them on an H100/H200 (SDPA's FA2, cuBLAS, ATen, inductor,
    Liger and fastllama's own kernels) land in the category a reader expects."""
    from fastllama.bench.profile import category

    expected = {
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, true>": "attention fwd",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, "
        "8, 2, 4, 2, false, false, cutlass::bfloat16_t>, false, true, false>": "attention bwd",
        "void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<128>>": "attention bwd",
        "fmha_cutlassB_bf16_aligned_64x64_k128_sm80": "attention bwd",
        "_attn_fwd": "attention fwd", "_attn_bwd_dkdv": "attention bwd", "_attn_bwd_dq": "attention bwd",
        "_bwd_preprocess": "attention bwd",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_"
        "segment_k_off_kernel__5x_cublas": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "void at::native::(anonymous namespace)::cunn_SoftMaxForward<8, c10::BFloat16, float, float, "
        "at::native::(anonymous namespace)::LogSoftMaxForwardEpilogue>(float*, c10::BFloat16 const*, int)": "loss",
        "void at::native::(anonymous namespace)::nll_loss_forward_reduce_cuda_kernel_2d<float, long>": "loss",
        "_lse_partials_kernel": "loss", "_loss_and_grad_kernel": "loss", "liger_cross_entropy_kernel": "loss",
        "rms_norm_fwd_kernel": "norm", "_rms_norm_backward_kernel": "norm", "rotary_kernel": "rotary",
        "swiglu_bwd_kernel": "swiglu",
        "void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::TensorIteratorBase&)"
        "::{lambda()#1}::operator()() const::{lambda(c10::BFloat16)#1}, std::array<char*, 2ul> >": "swiglu",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)1, false>, bool, float>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::BFloat16>, "
        "std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>, std::array<char*, 1ul>)":
            "elementwise/copy",
        "Memcpy DtoD (Device -> Device)": "elementwise/copy",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "inductor fused",
        "some_new_kernel": "other",
    }
    assert {name: category(name) for name in expected} == expected


def test_profile_summary_rows():
    from fastllama.bench.profile import summarize

    long_name = "sm90_xmma_gemm_" + "x" * 100
    kernels = [(long_name, 10, 6.0), ("_attn_fwd", 2, 3.0), ("nvjet_tst_a", 4, 1.0)]
    rows = summarize(kernels, {"config": "c"})
    assert [(r["category"], r["ms/step"], r["calls"]) for r in rows] == [("matmul", 7.0, 14), ("attention fwd", 3.0, 2)]
    assert rows[0]["share"] == pytest.approx(0.7) and rows[0]["config"] == "c"
    assert rows[0]["top kernel"] == long_name[:67] + "..."


@smoke_run_only
def test_bench_train_profile_writes_a_table_and_a_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))  # (--out sets it; restored after)
    assert main(["bench", "train", "--quick", "--profile", "--configs", "hf-sdpa", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    assert "Kernel time of one step by category" in capsys.readouterr().out
    data = json.loads((tmp_path / "train-tiny-profile.json").read_text())
    rows = data["rows"]
    assert {r["config"] for r in rows} == {"hf-sdpa"} and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert "matmul" in {r["category"] for r in rows}  # off-GPU: aten::mm's CPU time
    assert (tmp_path / "train-tiny-profile.png").stat().st_size > 1000
    assert "![train-tiny-profile](train-tiny-profile.png)" in (tmp_path / "train-tiny-profile.md").read_text()


def _check_smoke_results(folder, name: str) -> dict:
    """One script's results files: rows, labelled a smoke run, the script's own command."""
    data = json.loads((folder / f"{name}.json").read_text())
    assert data["rows"] and data["environment"]["measurement"] is False, name
    assert "not a measurement" in (folder / f"{name}.md").read_text(), name
    script = {"decode": "bench_decode", "moe_experts": "bench_moe"}.get(name, "bench_" + name.removeprefix("bench_"))
    assert data["environment"]["script"].startswith(f"python benchmarks/{script}.py"), name
    return data


@smoke_run_only
def test_op_benchmark_scripts_smoke_run(tmp_path, capsys, monkeypatch):
    """`fastllama bench ops` off-GPU: every script runs its tiny interpreter case and writes the
    shared results format, labelled as a smoke run."""
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))  # (--out sets it; restored after)
    assert main(["bench", "ops", "--out", str(tmp_path), "--no-progress"]) == 0
    for name in ("bench_attention", "cross_entropy", "norm_rope_swiglu", "moe_experts", "latent_decode"):
        _check_smoke_results(tmp_path, name)
    # the cross-entropy memory model (CPU allocations at shapes / 16) holds the target
    model = json.loads((tmp_path / "cross_entropy_memory_model.json").read_text())["rows"]
    assert [r["tokens"] for r in model if r["method"] == "fastllama"] == [4096, 8192, 16384, 32768]
    assert all(r["mem_vs_hf"] <= 0.25 for r in model if r["method"] == "fastllama"), model
    moe = json.loads((tmp_path / "moe_experts.json").read_text())["rows"]  # (saved bytes are exact off-GPU too)
    assert all(r["saved vs hf"] < 0.5 for r in moe if r["method"] == "fastllama") and len(moe) == 4
    import importlib.util

    if importlib.util.find_spec("matplotlib"):  # (the plot is linked from its table)
        assert "![bench_attention](bench_attention.png)" in (tmp_path / "bench_attention.md").read_text()
    latent = {r["method"]: r for r in json.loads((tmp_path / "latent_decode.json").read_text())["rows"]}
    assert set(latent) == {"hf-expand", "expanded-cache", "fastllama"} and latent["fastllama"]["max_diff"] < 1e-5
    assert latent["fastllama"]["cache KiB/token"] < latent["expanded-cache"]["cache KiB/token"] / 3


@smoke_run_only
def test_decode_benchmark_script_smoke_run(tmp_path, capsys, monkeypatch):
    """`fastllama bench decode` off-GPU (a missing re-export in benchmarks/common.py once
    crashed it before its first row)."""
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    assert main(["bench", "decode", "--out", str(tmp_path), "--no-progress"]) == 0
    decode = {r["impl"]: r for r in _check_smoke_results(tmp_path, "decode")["rows"]}
    assert decode["fastllama"]["tokens/s"] > 0 and "error" not in decode["fastllama"]
    # (the tiny Llama takes the fused decode step: both steps forced have rows of their own, and
    # each fastllama row says which step ran; off-GPU the default keeps the cuBLAS one)
    steps = [decode[f"fastllama{s}"]["step"] for s in ("", "-fused-step", "-cublas-step")]
    assert steps == ["cuBLAS", "fused", "cuBLAS"]
    assert all(decode[f"fastllama-{s}-step"]["tokens/s"] > 0 for s in ("fused", "cublas"))


def _run_pytest(*args: str, timeout: float):
    """A separate pytest run in the repository root, not as an xdist worker (this suite's
    `-n auto`): pytest-benchmark reads an inherited PYTEST_XDIST_WORKER and switches timing off."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True,
                          timeout=timeout, env=env)


@smoke_run_only
def test_pytest_benchmark_tests_pass_off_gpu(tmp_path):
    """benchmarks/ holds the op benchmarks as pytest-benchmark tests (one tiny interpreter case
    each off-GPU); CI runs tests/ only, so they are run from here, and every op is timed."""
    proc = _run_pytest("benchmarks", f"--benchmark-json={tmp_path / 'bench.json'}", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    timed = json.loads((tmp_path / "bench.json").read_text())["benchmarks"]
    assert len(timed) >= 10 and all(b["stats"]["median"] > 0 for b in timed), [b["name"] for b in timed]


def test_suite_runs_without_pytest_xdist():
    """The GPU machines' image has no pytest-xdist (gpu_check.sh runs the suite without -n):
    tests/conftest.py's xdist hook must not stop pytest there (an unknown hook is an error)."""
    proc = _run_pytest("-p", "no:xdist", "--collect-only", "tests/test_public_api.py", timeout=300)
    assert proc.returncode == 0 and "tests collected" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_gpu_timing_sizes_its_loop_from_a_warm_call(monkeypatch):
    # On CUDA, time_ms turns call counts into do_bench's milliseconds with one timed call. A first
    # call that compiles (0.2 s here, against microseconds after) must not be that call: do_bench
    # would then repeat the warm call for rep * compile time. Faked on CPU: events read the clock.
    import time
    import types

    import triton.testing

    class Event:
        def __init__(self, **_):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1e3

    seen = {}
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    monkeypatch.setattr(torch, "cuda", types.SimpleNamespace(Event=Event, synchronize=lambda: None))
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, **kw: seen.update(warmup=warmup, rep=rep) or 1.0)
    calls = []

    def compiles_first():
        if not calls:
            time.sleep(0.2)
        calls.append(1)

    common.time_ms(compiles_first)
    assert seen["rep"] < 50 and seen["warmup"] < 50, seen


def test_plots_are_skipped_without_matplotlib(monkeypatch, tmp_path, capsys):
    # matplotlib is optional (a GPU image may lack it): every plot is skipped with a note, never a
    # crash that costs the measurements written after it.
    import sys

    from benchmarks import bench_attention
    from fastllama.bench import profile

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    row = {"config": "hf-sdpa", "category": "matmul", "ms/step": 1.0}
    assert profile.plot_profile([row], tmp_path / "p.png") is False
    bench_attention.plot([{"direction": "fwd", "D": 64, "causal": True, "provider": "fastllama", "T": 128,
                           "tflops": 1.0}], tmp_path / "a.png", measurement=False)
    assert common.write_plot(tmp_path / "w.png", [{"x": 1, "y": 2.0, "s": "a"}], common.Plot("x", "y", "s")) is None
    assert not list(tmp_path.iterdir())
    assert capsys.readouterr().err.count("matplotlib not installed") == 3


@smoke_run_only
@pytest.mark.parametrize("script, timer", [("bench_norm_rope_swiglu", "_timed"), ("bench_cross_entropy", "_measure")])
def test_a_failing_method_is_an_error_row_and_the_exit_code(script, timer, tmp_path, monkeypatch):
    # One method raising (a broken baseline, a kernel error) must not lose the script's other rows,
    # and `bench ops` must exit 1 so that gpu_check.sh does not call the stage ok.
    import importlib

    mod = importlib.import_module(f"benchmarks.{script}")
    real, calls = getattr(mod, timer), []

    def first_call_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("broken baseline")
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, timer, first_call_fails)
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    # (--tokens: the cross-entropy script's CPU memory model at one size, not four: 80 s less)
    extra = ["--", "--tokens", "4096"] if script == "bench_cross_entropy" else []
    assert main(["bench", "ops", "--only", script, "--out", str(tmp_path), "--no-progress", *extra]) == 1
    name = {"bench_norm_rope_swiglu": "norm_rope_swiglu", "bench_cross_entropy": "cross_entropy"}[script]
    rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
    assert "broken baseline" in rows[0]["error"] and len(rows) > 1 and all(r.get("ms") for r in rows[1:])


@smoke_run_only
def test_decode_model_that_does_not_fit_is_an_error_row(tmp_path, monkeypatch):
    # The default 8B model on a 16 GB GPU: building it raised out of the script, and the rows of
    # the 1B model measured before it were never written.
    from benchmarks import bench_decode

    real = bench_decode.build_model

    def oom_first(shape, dtype, device):
        if not oom_first.raised:
            oom_first.raised = True
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")
        return real(shape, dtype, device)

    oom_first.raised = False
    monkeypatch.setattr(bench_decode, "build_model", oom_first)
    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    assert bench_decode.main(["--models", "tiny", "tiny", "--skip-hf"]) == 1
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert "OutOfMemoryError" in rows[0]["error"] and rows[1]["tokens/s"] > 0


@smoke_run_only
@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-gemma2"])
def test_decode_runs_a_transformers_gemma_and_counts_only_its_windows_keys(tmp_path, monkeypatch, shape):
    """``--models tiny-gemma3`` / ``tiny-gemma2`` (scores soft-capped: HF on eager attention): the
    Generator and HF's generate both run the same transformers model; the bytes a step reads
    count a windowed layer's window of the context, not all of it."""
    from benchmarks import bench_decode

    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    assert bench_decode.main(["--models", shape, "--new-tokens", "4"]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fastllama", "fastllama-unfused", "hf-static", "hf-static-patched"}
    assert all(r["tokens/s"] > 0 and "error" not in r for r in rows), rows
    model = bench_decode.build_model(shape, torch.float32, "cpu")
    assert model.config._attn_implementation == ("eager" if shape == "tiny-gemma2" else "sdpa")
    per_key = 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16 dims, fp32
    # layer 0 has a window of 8 keys, layer 1 none: 100 keys of context read 8 + 100
    assert bench_decode.step_bytes(model, 1, 100) - bench_decode.step_bytes(model, 1, 0) == (8 + 100) * per_key


@smoke_run_only
def test_decode_runs_a_latent_attention_model_and_counts_its_latent_cache(tmp_path, monkeypatch):
    """``--models tiny-minicpm3``: multi-head latent attention decoded by both; a step reads the
    latent and rotary key of each cached token (32 + 16 fp32 elements a layer), not K and V per
    head."""
    from benchmarks import bench_decode

    monkeypatch.setenv("FASTLLAMA_RESULTS_DIR", str(tmp_path))
    assert bench_decode.main(["--models", "tiny-minicpm3", "--new-tokens", "4"]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"fastllama", "fastllama-unfused", "hf-static", "hf-static-patched"}
    assert all(r["tokens/s"] > 0 and "error" not in r for r in rows), rows
    model = bench_decode.build_model("tiny-minicpm3", torch.float32, "cpu")
    assert bench_decode.step_bytes(model, 1, 100) - bench_decode.step_bytes(model, 1, 0) == 2 * 100 * (32 + 16) * 4


def test_decode_plot_has_a_panel_per_model_and_context(tmp_path, monkeypatch):
    # The decode sweep has two contexts per model: drawn into one panel, a line zigzagged between
    # them with nothing saying which point was which.
    plt = pytest.importorskip("matplotlib.pyplot")
    from fastllama.bench import plots

    made, real = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    rows = [{"model": "m", "context": c, "batch": b, "impl": i, "tokens/s": float(b * c)}
            for c in (512, 4096) for b in (1, 8) for i in ("fastllama", "hf")]
    assert common.write_plot(tmp_path / "d.png", rows, plots.KNOWN["decode"][0])
    titles = sorted(ax.get_title() for ax in made[0][1].flat if ax.get_visible())
    assert titles == ["decoding model=m context=4096", "decoding model=m context=512"]


@pytest.mark.parametrize("bad", [["--new-tokens", "1", "--skip-hf"], ["--batches", "0"], ["--contexts", "-3"],
                                 ["--reps", "0"]])
def test_decode_benchmark_refuses_arguments_that_time_nothing(bad, tmp_path, capsys):
    # --new-tokens 1 has no decode step to time (it reported 54,300 tokens/s from nothing);
    # batch 0 and negative contexts gave error rows or an abort with exit code 0.
    assert main(["bench", "decode", "--out", str(tmp_path), "--no-progress", "--", *bad]) == 1
    assert "must be" in capsys.readouterr().err
    assert not (tmp_path / "decode.json").exists()


@pytest.mark.parametrize("argv", [
    ["train", "--layers", "0"], ["train", "--seq-len", "-5"], ["train", "--batch", "0"], ["train", "--warmup", "-1"],
    ["train", "--steps", "0"], ["memory", "--tokens", "8", "8"], ["memory", "--tokens", "0", "8"],
    ["ops", "--only", "attention"], ["ops", "--benchmarks-dir", "/nonexistent"], ["train", "--out", "FILE"],
    ["train", "--out", "FILE/sub"],  # (a folder under a file: it failed after the first configuration)
])
def test_bench_refuses_bad_arguments_before_running(argv, tmp_path, capsys, monkeypatch):
    # Each of these used to be a traceback, a silent change (batch 0 ran batch 1) or a run whose
    # rows were all errors; now a usage error before any model is built.
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a.startswith("FILE") else a for a in argv]
    monkeypatch.setattr(train, "run_train", lambda *a, **k: pytest.fail("ran"))
    monkeypatch.setattr(memory, "memory_report", lambda *a, **k: pytest.fail("ran"))
    try:
        rc = main(["bench", *argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "must be >=" in err or "different counts" in err or "available:" in err or "benchmarks/" in err \
        or "cannot be a folder" in err, err


def test_results_record_a_command_that_can_be_typed_again_and_the_commit_override(monkeypatch):
    # `python -m fastllama.cli bench ...` (gpu_check.sh) was recorded as "cli.py bench ...", and a
    # copied tree with a stale .git recorded the wrong commit.
    import sys
    import types

    monkeypatch.setattr(sys, "argv", ["/x/fastllama/cli.py", "bench", "train", "--quick"])
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name="fastllama.cli")))
    assert common.command_line() == "python -m fastllama.cli bench train --quick"
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))
    monkeypatch.setattr(sys, "argv", ["/usr/bin/fastllama", "bench"])
    assert common.command_line() == "fastllama bench"
    monkeypatch.setenv("FASTLLAMA_GIT_COMMIT", "0123abc")
    assert common.environment()["git_commit"] == "0123abc"


@smoke_run_only
def test_interrupted_training_benchmark_keeps_its_rows_and_says_so(tmp_path, monkeypatch, capsys):
    # A time limit's SIGINT lost the configuration in progress (its measured shapes too), left no
    # row for the rest, wrote no `interrupted` flag and exited with a traceback.
    calls = []

    def steps(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.01, None, 1.0, None

    monkeypatch.setattr(train, "_train_steps", steps)
    rc = main(["bench", "train", "--configs", "hf-sdpa", "hf+fastllama", "--seq-len", "16", "32",
               "--out", str(tmp_path), "--no-progress"])
    assert rc == 130
    data = json.loads((tmp_path / "train-tiny.json").read_text())
    status = {(r["config"], r["seq_len"]): r["status"] for r in data["rows"]}
    assert status == {("hf-sdpa", 16): "ok", ("hf-sdpa", 32): train.INTERRUPTED,
                      ("hf+fastllama", 16): train.INTERRUPTED, ("hf+fastllama", 32): train.INTERRUPTED}
    assert data["interrupted"] is True


def test_default_bench_stops_after_an_interrupted_training_run(monkeypatch, tmp_path):
    from fastllama.bench import cli as bench_cli

    monkeypatch.setattr(bench_cli, "_train", lambda args, preset=None: 130)
    monkeypatch.setattr(bench_cli, "_memory", lambda *a, **k: pytest.fail("ran after an interrupt"))
    assert main(["bench", "--out", str(tmp_path), "--no-progress"]) == 130
    assert common.exit_code({"not": "rows"}) == 0 and common.exit_code([{"error": "x"}]) == 1


@pytest.mark.parametrize("name, gbps", [("NVIDIA H200", 4800.0), ("NVIDIA H100 80GB HBM3", 3350.0),
                                        ("NVIDIA H100 PCIe", 2000.0), ("NVIDIA GH200 480GB", None),
                                        ("NVIDIA A100-SXM4-80GB", 2039.0), ("NVIDIA L4", None)])
def test_spec_bandwidth_by_device_name(monkeypatch, name, gbps):
    """The datasheet bandwidth behind decode's "% of spec": a GH200 is not an H200 (its HBM3
    version has 4.0 TB/s, not 4.8), and an unknown GPU has no figure rather than a wrong one."""
    monkeypatch.setattr(common, "on_gpu", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert common.spec_bandwidth_gbps() == gbps


def test_memory_report_where_fake_execution_cannot_pick_a_kernel_is_an_error(monkeypatch, capsys, tmp_path):
    """Fake execution past a sliding window (HF builds a mask, whose values pick fastllama's
    kernel) raised DataDependentOutputException from deep in attention: now an error line, exit 2."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    def no_values(model, tokens):
        raise DataDependentOutputException(torch.ops.aten.equal.default)

    monkeypatch.setattr(memory, "measure_saved", no_values)
    monkeypatch.setattr(memory, "execution_for", lambda *a, **k: "fake")
    assert main(["bench", "memory", "--presets", "tiny", "--no-progress", "--out", str(tmp_path)]) == 2
    assert "fake execution cannot run hf-sdpa at [8, 16] tokens" in capsys.readouterr().err


def test_cross_entropy_rows_name_the_weight_grad_gemm_of_the_chunked_schedule(monkeypatch):
    """A fastllama row's note names the GEMM the chunked schedule timed and kept at its shape,
    and is empty where the shape ran the logits-in-the-weight-gradient schedule (no GEMM to
    choose), even when a chunked shape of the same V and H ran before it."""
    from benchmarks import bench_cross_entropy as bench
    from fastllama.ops import cross_entropy as ce_ops

    bf16, v, h = torch.bfloat16, 128256, 4096
    rows = ce_ops.chunk_rows_for(32768, h, v, bf16)
    assert rows == 4096  # (32k tokens: chunks of H rows; 4k: one block inside the weight gradient)
    monkeypatch.setattr(ce_ops, "_weight_grad_gemm_choices", {
        (0, bf16, v, h, 4096): {"gemm": "cublas", "triton_ms": 3.0, "cublas_ms": 2.0, "why": ""}})
    assert bench._weight_grad_gemm_note(32768, v, h, bf16) == (
        "chunks of 4096: weight-grad GEMM cublas (triton 3.00 ms, cublas 2.00 ms)")
    assert bench._weight_grad_gemm_note(4096, v, h, bf16) == ""
    assert bench._weight_grad_gemm_note(32768, v, h, torch.float16) == ""
