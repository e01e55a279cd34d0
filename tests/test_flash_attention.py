"""ops.flash_attention beyond the op-table parity cases (tests/test_op_parity.py runs those).

Here: every masked/unmasked block phase with small forced blocks, fully masked rows, huge logits,
bit-identical backward, agreement with SDPA's causal conventions, output layout, varlen with
different key lengths, torch.compile, the tf32 opt-in, autotune pruning, the build list, and
bad input. All parity checks use the DESIGN.md rule (fastllama.testing.assert_parity).
"""
import functools
import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, INTERPRETER
from fastllama import ops, optable
from fastllama.kernels import flash_attention as kfa
from fastllama.ops import attention as A
from fastllama.reference import functional as R
from fastllama.testing import assert_parity

SMALL = {"fwd": (32, 16, 4, 1), "dq": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1)}


def _qkv(B, Hq, Hk, Tq, Tk, D, dtype, grad=True, scale=1.0):
    make = lambda H, T: (scale * torch.randn(B, H, T, D, device=DEVICE, dtype=torch.float32)).to(dtype)
    return tuple(t.requires_grad_(grad) for t in (make(Hq, Tq), make(Hk, Tk), make(Hk, Tk)))


def _parity(dtype, *qkv, deterministic=True, **kwargs):
    return assert_parity(functools.partial(ops.flash_attention, deterministic=deterministic, **kwargs),
                         functools.partial(A._reference, **kwargs), *qkv, names=("q", "k", "v"), output_names=("out",),
                         title=f"{kwargs}{'' if deterministic else ' atomic dQ'}")


@pytest.mark.parametrize("Tq,Tk,causal,window", [
    (45, 77, True, None),        # queries are the last 45 positions: blocks above the diagonal skipped
    (77, 45, False, (13, 5)),    # window edges inside blocks on both sides; first rows see few keys
    (77, 45, True, (20, -1)),    # Tq > Tk causal: 32 rows see nothing
])
def test_small_blocks_every_phase(monkeypatch, Tq, Tk, causal, window):
    """Blocks of 16/32 split short sequences into skipped, masked-edge and mask-free blocks."""
    monkeypatch.setattr(A, "FORCE_CONFIG", SMALL)
    torch.manual_seed(0)
    hq = 2 if window is None else 1  # one case keeps a GQA group in the small-block dK/dV loop
    _parity(torch.float32, *_qkv(1, hq, 1, Tq, Tk, 64, torch.float32), causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_small_blocks_every_phase(monkeypatch, dtype):
    """Soft-capped scores (Gemma 2) with 16/32-wide blocks, in the fp32 and the 16-bit code paths
    of all three kernels: skipped, masked-edge and mask-free blocks, a window, Tq != Tk and GQA.
    The cap comes before the mask (a masked score is -inf, not -cap), and here it binds: scores
    of std 9 capped at 5."""
    monkeypatch.setattr(A, "FORCE_CONFIG", SMALL)
    torch.manual_seed(0)
    for Tq, Tk, causal, window in ((45, 77, True, None), (77, 45, False, (13, 5)), (77, 45, True, None)):
        _parity(dtype, *_qkv(1, 2, 1, Tq, Tk, 64, dtype, scale=3.0), causal=causal, window=window, softcap=5.0)


def test_softcap_runs_the_deterministic_backward(monkeypatch):
    """The atomic-dQ kernel has no soft-capped build: deterministic=False with softcap runs the
    deterministic backward, and the kernel launcher refuses the pair."""
    from fastllama.kernels import flash_attention_backward as kbwd

    seen, real = [], kbwd.flash_attention_backward
    monkeypatch.setattr(kbwd, "flash_attention_backward",
                        lambda *args, **kwargs: seen.append(kwargs["deterministic"]) or real(*args, **kwargs))
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 64, torch.float16)
    out = ops.flash_attention(q, k, v, softcap=5.0, deterministic=False)
    out.sum().backward()
    assert seen == [True]
    with pytest.raises(ValueError, match="softcap"):
        real(out, q, k, v, out, torch.zeros(2, 1, 2, 40), scale=0.125, before=80, after=0, deterministic=False,
             softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16])  # fp16 runs the same 16-bit code path
def test_small_blocks_16bit_varlen_gqa(monkeypatch, dtype):
    """16-bit inputs (the late-scale fused multiply-add path) with 16-row blocks: varlen with
    Tq != Tk per sequence, a sequence without queries and short ones whose query blocks return
    early from the reversed grid, GQA 4:1, causal and a window; then dense Tq > Tk (fully masked
    16-bit rows come out 0, no NaN)."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in SMALL})
    torch.manual_seed(0)
    lens_q, lens_k = [70, 3, 0, 33, 17], [50, 9, 4, 33, 40]
    cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
    q, _, _ = _qkv(1, 4, 1, sum(lens_q), 1, 32, dtype)
    _, k, v = _qkv(1, 4, 1, 1, sum(lens_k), 32, dtype)
    for causal, window in ((True, None), (False, (7, 3))):
        _parity(dtype, q, k, v, causal=causal, window=window, cu_seqlens=cu(lens_q), cu_seqlens_k=cu(lens_k))
    q, k, v = _qkv(1, 4, 2, 61, 29, 32, dtype)
    _parity(dtype, q, k, v, causal=True)
    out = ops.flash_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atomic_dq_backward(monkeypatch, dtype):
    """deterministic=False: dQ added with atomics in the dK/dV kernel. 16-row blocks so several
    key blocks add into each dQ row: varlen with Tq != Tk (a sequence without queries, one without
    keys), GQA 4:1, causal, a window, full attention over a key length that leaves a partial key
    block (its padding keys must add nothing to dQ, though no mask covers the interior rows), and
    dense Tq > Tk, in bf16 (fp16 runs the same 16-bit code); then, in both dtypes, large negative
    scores (lse << 0), where fp16 overflowed. dK and dV are the deterministic path's bit for bit
    (same kernel, same order)."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (16, 16, 4, 1) for name in SMALL})
    torch.manual_seed(0)

    def check(q, k, v, **kwargs):
        # The parity run's own dK, dV and upstream gradient, caught by hooks on the tensors it
        # passes, then the deterministic backward of that upstream gradient: the same bits.
        seen = {}

        def atomic(q, k, v):
            for name, t in (("dk", k), ("dv", v)):
                t.register_hook(lambda g, name=name: seen.__setitem__(name, g))
            out = ops.flash_attention(q, k, v, deterministic=False, **kwargs)
            out.register_hook(lambda g: seen.__setitem__("dout", g))
            return out

        assert_parity(atomic, functools.partial(A._reference, **kwargs), q, k, v, names=("q", "k", "v"),
                      output_names=("out",), title=f"{kwargs} atomic dQ")
        exact = torch.autograd.grad(ops.flash_attention(q, k, v, **kwargs), (k, v), seen["dout"])
        assert torch.equal(seen["dk"], exact[0]) and torch.equal(seen["dv"], exact[1])

    if dtype == torch.bfloat16:
        lens_q, lens_k = [70, 3, 0, 33, 17, 5], [50, 9, 4, 33, 40, 0]
        cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
        q, _, _ = _qkv(1, 4, 1, sum(lens_q), 1, 32, dtype)
        _, k, v = _qkv(1, 4, 1, 1, sum(lens_k), 32, dtype)
        for causal, window in ((True, None), (False, (7, 3)), (False, None)):
            check(q, k, v, causal=causal, window=window, cu_seqlens=cu(lens_q), cu_seqlens_k=cu(lens_k))
        check(*_qkv(2, 2, 2, 37, 45, 64, dtype), causal=False)
        check(*_qkv(1, 4, 2, 61, 29, 32, dtype), causal=True)
    # Scores near -18, so every lse is far below 0: a padding key that is zeroed rather than
    # masked scores 0 there and p = 2^(-lse2) overflows fp16 (dQ came out NaN).
    q, k, v = _qkv(1, 2, 1, 24, 20, 64, dtype)
    with torch.no_grad():
        q.add_(1.5)
        k.sub_(1.5)
    check(q, k, v, causal=False)
    check(q, k, v, causal=False, window=(7, 3))


def test_atomic_dq_leaves_fp32_and_torch_deterministic_mode_deterministic(monkeypatch):
    """fp32 inputs always run the exact, deterministic backward; deterministic=False is accepted
    (a model may switch it on globally) and changes nothing. Under
    torch.use_deterministic_algorithms(True) 16-bit inputs run it too."""
    from fastllama.kernels import flash_attention_backward as kbwd

    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 64, torch.float32)
    grads = [torch.autograd.grad(ops.flash_attention(q, k, v, deterministic=d), (q, k, v), torch.ones_like(q))
             for d in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="fp16/bf16"):
        kfa.dkdv_atomic_configs(64, 4)

    launched = []
    backward = kbwd.flash_attention_backward
    monkeypatch.setattr(kbwd, "flash_attention_backward",
                        lambda *a, **kw: launched.append(kw["deterministic"]) or backward(*a, **kw))
    q, k, v = _qkv(1, 2, 1, 40, 40, 64, torch.bfloat16)
    was = torch.are_deterministic_algorithms_enabled()
    for mode in (False, True):
        torch.use_deterministic_algorithms(mode)
        try:
            torch.autograd.grad(ops.flash_attention(q, k, v, deterministic=False), (q, k, v), torch.ones_like(q))
        finally:
            torch.use_deterministic_algorithms(was)
    assert launched == [False, True]


def test_hopper_only_block_shapes_under_the_interpreter(monkeypatch):
    """The block shapes the sm_90 rows add (warps and stages mean nothing to the interpreter):
    the i-th new shape of each kernel runs together, bf16, causal GQA with edge blocks."""
    shapes = {}
    for name, table in (("fwd", kfa.fwd_configs), ("dq", kfa.dq_configs), ("dkdv", kfa.dkdv_configs),
                        ("dkdv_atomic", kfa.dkdv_atomic_configs)):
        shared = {c[:2] for d in (64, 128, 256) for c in table(d, 2, "ieee", True, 80)}
        shapes[name] = sorted({c[:2] for d in (64, 128, 256) for c in table(d, 2, "ieee", True, 90)} - shared)
        assert shapes[name], f"no Hopper-only block shape for {name}"
    torch.manual_seed(0)
    qkv = _qkv(1, 2, 1, 77, 77, 64, torch.bfloat16)
    for i in range(max(map(len, shapes.values()))):
        force = {name: (*s[i % len(s)], 4, 1) for name, s in shapes.items()}
        monkeypatch.setattr(A, "FORCE_CONFIG", force)
        for deterministic in (True, False):
            _parity(torch.bfloat16, *(t.detach().clone().requires_grad_() for t in qkv), causal=True,
                    deterministic=deterministic)


def test_long_sequence_bf16():
    torch.manual_seed(0)
    _parity(torch.bfloat16, *_qkv(1, 1, 1, 1023, 1023, 64, torch.bfloat16), causal=True)


def test_fully_masked_rows_are_zero_not_nan():
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 8, 64, torch.bfloat16)
    out, lse = ops.flash_attention_with_lse(q, k, v, causal=True)  # rows 0..31 precede every key
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()
    (out.float().sum() + lse[:, :, 32:].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :32], torch.zeros_like(q.grad[:, :, :32]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_nan_row_reports_nan_not_no_key(dtype):
    """A query row whose scores are all NaN (a NaN in its q, or in the one key it sees) gives NaN
    output AND NaN lse, as torch.logsumexp does: max() skips NaN, so its running max stayed -inf
    and the row passed for one that sees no key (lse -inf, the documented sentinel), which an
    lse-weighted merge of key chunks then drops as empty, turning the NaN into finite values."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 8, 16, device=DEVICE, dtype=dtype) for _ in range(3))
    q[0, 0, 4] = float("nan")
    k[0, 0, 0, 0] = float("nan")
    out, lse = ops.flash_attention_with_lse(q, k, v, causal=True, window=(0, 0))  # row i sees key i only
    assert out[0, 0, 4].isnan().all() and out[0, 0, 0].isnan().all()
    assert lse[0, 0, 4].isnan() and lse[0, 0, 0].isnan()
    rest = [1, 2, 3, 5, 6, 7]
    assert torch.isfinite(out[0, 0, rest]).all() and torch.isfinite(lse[0, 0, rest]).all()


def test_varlen_zero_length_keys_and_queries():
    """Per sequence Tq != Tk (bottom-right), a sequence without keys (its rows give 0) and one
    without queries (its keys get zero gradient)."""
    torch.manual_seed(0)
    lens_q, lens_k = [5, 0, 30, 7, 1], [9, 4, 30, 0, 1]
    q, k, v = _qkv(1, 2, 1, sum(lens_q), sum(lens_k), 64, torch.float32)
    cu = lambda lens: torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEVICE)
    _parity(torch.float32, q, k, v, causal=True, cu_seqlens=cu(lens_q), cu_seqlens_k=cu(lens_k))
    out = ops.flash_attention(q, k, v, cu_seqlens=cu(lens_q), cu_seqlens_k=cu(lens_k))
    assert torch.equal(out[:, :, 35:42], torch.zeros_like(out[:, :, 35:42]))  # the 7 queries with no key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_large_logits(dtype):
    """|logits| ~ 1e4: exp2 only ever sees s - max <= 0, nothing overflows. In 16 bits PyTorch's
    own attention rounds such scores to +-32 (bf16) and its error says little, so the kernel is
    also held to PyTorch with fp32 scores rounded once at the end (what flash kernels compute)."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, dtype, scale=60.0 if dtype != torch.float16 else 8.0)
    with torch.no_grad():
        s = (q.float() @ k.float().transpose(-1, -2)) * 64 ** -0.5
    assert s.abs().max() > (5e3 if dtype != torch.float16 else 100)  # (fp16 inputs stop at 65504)
    _parity(dtype, q, k, v, causal=False)
    if dtype != torch.float32:
        fp32_scores = lambda q, k, v: A._reference(q.float(), k.float(), v.float(), causal=False).to(dtype)  # noqa: E731
        assert_parity(functools.partial(ops.flash_attention, causal=False), functools.partial(A._reference, causal=False),
                      q, k, v, torch_op=fp32_scores)


@pytest.mark.parametrize("scale", [0.0, -0.25])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_zero_and_negative_scale(dtype, scale):
    """SDPA takes any finite scale. The kernels scale 16-bit scores after the row max (exact for
    a positive scale only), so the op runs c <= 0 as (-q, |c|) or (0 q, 1): no NaN, parity."""
    torch.manual_seed(0)
    _parity(dtype, *_qkv(1, 2, 1, 40, 40, 64, dtype), causal=True, scale=scale)


def test_backward_is_deterministic(monkeypatch):
    """Two backward runs give identical bits (no atomics; every sum in a fixed order), with
    several key and query blocks per program and a GQA group of 4 summed into each dK/dV."""
    monkeypatch.setattr(A, "FORCE_CONFIG", {name: (32, 32, 4, 1) for name in SMALL})
    torch.manual_seed(0)
    q, k, v = _qkv(1, 4, 1, 77, 77, 64, torch.bfloat16)
    dout = torch.randn_like(q)
    grads = [torch.autograd.grad(ops.flash_attention(q, k, v), (q, k, v), dout) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_causal_alignment_matches_sdpa():
    """Tq == Tk: SDPA's is_causal agrees. Tq < Tk: bottom-right, SDPA's explicit lower-right mask
    agrees and its is_causal (top-left) does not."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, torch.float32, grad=False)
    assert_close = functools.partial(torch.testing.assert_close, atol=2e-6, rtol=0)
    assert_close(ops.flash_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    q = q[:, :, 40:]
    mask = torch.ones(24, 64, dtype=torch.bool, device=DEVICE).tril(diagonal=40)
    ours = ops.flash_attention(q, k, v)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert (ours - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max() > 1e-2


def test_strided_views_and_output_layout():
    """HF's transposed views are read in place and out keeps their (B, T, H, D) memory order;
    q/k/v sliced out of one fused projection (non-dense) work too."""
    torch.manual_seed(0)
    B, T, Hq, Hk, D = 2, 50, 2, 1, 64
    qkv = torch.randn(B, T, (Hq + 2 * Hk) * D, device=DEVICE).view(B, T, Hq + 2 * Hk, D)
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.split([Hq, Hk, Hk], dim=2))
    _parity(torch.float32, q, k, v)
    dense = torch.randn(B, T, Hq, D, device=DEVICE).transpose(1, 2)
    assert ops.flash_attention(dense, dense[:, :2], dense[:, :2]).transpose(1, 2).is_contiguous()


def test_lse_matches_reference():
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 33, 70, 80, torch.float32, grad=False)
    out, lse = ops.flash_attention_with_lse(q, k, v, causal=True, window=(20, 0))
    ref_out, ref_lse = R.attention(q.double(), k.double(), v.double(), window=(20, 0), return_lse=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=0)


def test_torch_compile_fullgraph():
    """One custom op each way: fullgraph tracing sees no graph break, and values match eager."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 40, 40, 64, torch.float32)

    def step(q, k, v):
        return ops.flash_attention(q, k, v, window=(16, 0)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(step(q, k, v), (q, k, v))
    compiled_grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_with_sinks():
    """Attention sinks (an autograd Function around the custom ops) trace whole too, and the
    compiled gradients, the sinks' included, are eager's bit for bit."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 4, 2, 40, 40, 64, torch.float32)
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)

    def step(q, k, v, sinks):
        return (ops.flash_attention(q, k, v, window=(16, 0), sinks=sinks) * torch.arange(64, device=DEVICE)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(step(q, k, v, sinks), (q, k, v, sinks))
    compiled_grads = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    for a, b in zip(eager_grads, compiled_grads):
        assert torch.equal(a, b)
    assert eager_grads[3].abs().min() > 0


def test_torch_compile_dynamic_with_a_module_float_scale():
    """Under torch.compile(dynamic=True) a module's float attribute (HF's self.scaling) is traced as
    a symbolic float: validation must not need its value (math.isfinite on it broke fullgraph)."""
    torch.manual_seed(0)

    class Attend(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scaling = 0.2

        def forward(self, q, k, v):
            return ops.flash_attention(q, k, v, scale=self.scaling)

    torch._dynamo.reset()
    module = Attend()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend="eager")
    for t in (24, 17):
        q, k, v = _qkv(1, 2, 1, t, t, 32, torch.float32)
        assert torch.equal(compiled(q, k, v), module(q, k, v))


def test_tf32_opt_in():
    """fp32_precision="tf32" is about as accurate as fp16 inputs (10-bit mantissa products)."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 2, 64, 64, 64, torch.float32)
    to_half = lambda fn: lambda *t: fn(*(x.half() for x in t)).float()  # fp16 rounding, fp32 output
    assert_parity(functools.partial(ops.flash_attention, fp32_precision="tf32"), A._reference, q, k, v,
                  torch_op=to_half(A._reference), atol_floor=0.0)


def test_interpreter_does_not_autotune():
    if not INTERPRETER:
        pytest.skip("interpreter only")
    assert A._config("fwd", 4096) == kfa.INTERPRETER_CONFIG["fwd"]
    assert A._config("fwd", 48)[:2] == (64, 64)  # tiles shrink to fit short sequences


def test_autotuned_choices_names_the_latest_picks(monkeypatch):
    """What the benchmarks note beside fastllama's timings: the tile each autotuner last chose."""
    from fastllama.kernels import flash_attention_backward as kbwd

    for tuned in (kfa._attn_fwd_tuned, kbwd._attn_bwd_dq_tuned, kbwd._attn_bwd_dkdv_tuned,
                  kbwd._attn_bwd_dkdv_atomic_tuned):
        monkeypatch.setattr(tuned, "latest", None)
    assert A.autotuned_choices() == {}
    latest = kfa._attn_fwd_tuned.for_sm(90)
    c = latest.configs[0]
    monkeypatch.setattr(kfa._attn_fwd_tuned, "latest", latest)
    monkeypatch.setattr(latest, "best_config", c, raising=False)
    assert A.autotuned_choices() == {"fwd": f"M{c.kwargs['BLOCK_M']} N{c.kwargs['BLOCK_N']} w{c.num_warps} "
                                            f"s{c.num_stages}"}


def test_autotune_timings_reads_each_candidates_median_and_clears(monkeypatch):
    """The benchmark's tuning table: every candidate's median (Triton's [median, p20, p80]),
    failed candidates as inf, and clear=True so a shape whose key was tuned before records none."""
    from fastllama.kernels import flash_attention_backward as kbwd

    for tuned in (kfa._attn_fwd_tuned, kbwd._attn_bwd_dq_tuned, kbwd._attn_bwd_dkdv_tuned,
                  kbwd._attn_bwd_dkdv_atomic_tuned):
        monkeypatch.setattr(tuned, "latest", None)
    assert A.autotune_timings() == {}
    latest = kfa._attn_fwd_tuned.for_sm(90)
    a, b = latest.configs[:2]
    monkeypatch.setattr(kfa._attn_fwd_tuned, "latest", latest)
    monkeypatch.setattr(latest, "configs_timings", {a: [0.5, 0.4, 0.6], b: [float("inf")] * 3}, raising=False)
    name = A._config_name
    assert A.autotune_timings() == {"fwd": {name(a): 0.5, name(b): float("inf")}}
    assert A.autotune_timings(clear=True) == {"fwd": {name(a): 0.5, name(b): float("inf")}}
    assert A.autotune_timings() == {}


def test_autotune_key_tells_causal_full_and_window_apart():
    """Causal and full attention at one length tune separately (they do different work per query
    block); the flags keep the key a multiple of 16 (no extra JIT specialisation)."""
    from fastllama.kernels.flash_attention import key_bucket, mask_bounds, seqlen_bucket

    T = 4000
    keys = {name: key_bucket(T, T, *mask_bounds(causal, window, 2 * T + 1))
            for name, causal, window in [("full", False, None), ("causal", True, None), ("window", True, (256, 0)),
                                         ("window wider than T", True, (2 * T, 0))]}
    assert len({keys["full"], keys["causal"], keys["window"]}) == 3
    assert keys["window wider than T"] == keys["causal"]  # a bound that never masks is no bound
    assert all(k % 16 == 0 and k & 0xFFFFF == seqlen_bucket(T) for k in keys.values())


def test_one_autotuner_per_arch():
    """Triton's tuning cache has no device in its key: each arch gets its own autotuner, and an
    sm_80 one never holds a Hopper-only tile (a tile tuned on an H100 would otherwise be launched
    on an A100 in the same process)."""
    from fastllama.kernels import flash_attention_backward as kbwd

    for tuned in (kfa._attn_fwd_tuned, kbwd._attn_bwd_dq_tuned, kbwd._attn_bwd_dkdv_tuned,
                  kbwd._attn_bwd_dkdv_atomic_tuned):
        ampere, hopper = tuned.for_sm(80), tuned.for_sm(90)
        assert ampere is not hopper and tuned.for_sm(80) is ampere
        tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        shared = {c for table in tuned.tables[:2] for row in table.values() for c in row}
        assert {tile(c) for c in ampere.configs} == shared
        hopper_only = ({c for row in tuned.tables[2].values() for c in row}
                       | {c for rows in tuned.tables[3].get(90, ()) for row in rows.values() for c in row})
        assert hopper_only <= {tile(c) for c in hopper.configs}
        assert {tile(c) for c in hopper.configs} <= shared | hopper_only


@pytest.mark.parametrize("name,capability,shared_kb,arch", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), 163, 80), ("NVIDIA H100 80GB HBM3", (9, 0), 227, 90),
    ("NVIDIA L4", (8, 9), 99, 86), ("NVIDIA A10", (8, 6), 99, 86), ("NVIDIA GeForce RTX 5090", (12, 0), 99, 120),
    ("NVIDIA B200", (10, 0), 227, 100), ("NVIDIA B300", (10, 3), 227, 100), ("NVIDIA Jetson Thor", (11, 0), 227, 100),
    ("NVIDIA GB10", (12, 1), 99, 120), ("Orin", (8, 7), 163, 80),
    ("Tesla T4", (7, 5), 64, None), ("Tesla V100-SXM2-16GB", (7, 0), 96, None)])
def test_table_arch_follows_shared_memory(monkeypatch, name, capability, shared_kb, arch):
    """The tables a GPU runs: sm_90's with the Hopper tiles, the 99 KB rows on GPUs with that much
    shared memory per block (an L4 ran the A100's 115 KB forward tiles, which Triton refuses to
    launch there), and a clear error below 99 KB instead of Triton's out-of-resources one."""
    import types

    props = types.SimpleNamespace(name=name, shared_memory_per_block_optin=shared_kb * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    kfa.table_arch.cache_clear(), optable._cuda_arch.cache_clear()
    try:
        if arch is None:
            with pytest.raises(ValueError, match=f"need 99 KB of shared memory per block.*{shared_kb} KB"):
                kfa.table_arch(torch.device("cuda", 0))
        else:
            assert kfa.table_arch(torch.device("cuda", 0)) == arch
        # the other ops' configs (CE's GEMM tile): the same arch; below 99 KB the sm_80 builds
        assert optable.device_arch(torch.device("cuda", 0)) == (arch or 80)
        assert kfa.table_arch(torch.device("cpu")) == 0 and optable.device_arch(torch.device("cpu")) == 0
    finally:
        kfa.table_arch.cache_clear(), optable._cuda_arch.cache_clear()


def test_attention_entry_points_check_the_gpu_before_launch(monkeypatch):
    """flash_attention, decode_attention and the Generator ask for the device check before
    anything runs (on a T4 the user reads which GPUs work, not Triton's out-of-resources error at
    the first launch), and the check refuses a CUDA device below 99 KB of shared memory."""
    import types

    from fastllama import generate as G
    from fastllama.ops import _checks
    from fastllama.ops import decode as D
    from fastllama.reference import Llama, LlamaConfig

    class Refused(Exception):
        pass

    def refuse(t):
        raise Refused(t.device)

    for module in (A, D, G):
        monkeypatch.setattr(module, "check_attention_device", refuse)
    q, k, v = _qkv(1, 2, 1, 3, 3, 16, torch.float32, grad=False)
    with pytest.raises(Refused):
        ops.flash_attention(q, k, v)
    with pytest.raises(Refused):
        ops.decode_attention(q, k, v, torch.full((1,), 3, dtype=torch.int32, device=q.device))
    model = Llama(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1)).to(DEVICE)
    with pytest.raises(Refused):
        G.Generator(model, 1, 8)

    t4 = types.SimpleNamespace(name="Tesla T4", shared_memory_per_block_optin=64 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: t4)
    kfa.table_arch.cache_clear(), optable._cuda_arch.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"Tesla T4, sm_75\) has 64 KB.*attention=False"):
            _checks.check_attention_device(types.SimpleNamespace(device=torch.device("cuda", 0)))
        _checks.check_attention_device(q)  # CPU tensors (the interpreter) are not asked about
    finally:
        kfa.table_arch.cache_clear(), optable._cuda_arch.cache_clear()


def test_fake_cuda_tensors_trace_without_a_gpu():
    """Shape tracing (FakeTensorMode) with CUDA tensors on a host without a GPU: the device check
    must not ask the (absent) GPU (it raised "Torch not compiled with CUDA enabled"); the
    launchers ask before any real launch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
        assert ops.flash_attention(q, q, q).shape == q.shape
        q1 = torch.empty(1, 2, 1, 64, device="cuda", dtype=torch.bfloat16)
        lens = torch.empty(1, dtype=torch.int32, device="cuda")
        assert ops.decode_attention(q1, q, q, lens, num_splits=2).shape == q1.shape


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
def test_launch_side_picks_the_devices_tables(monkeypatch, sm):
    """The launchers ask the device's table arch: the autotuner of that arch, and with autotuning
    off the first candidate of that arch's row (on sm_86 the bf16 d128 forward's first tile is
    (128, 64, 8, 2), not sm_80's (128, 64, 8, 3), which does not fit there)."""
    from fastllama.kernels import flash_attention_backward as kbwd

    monkeypatch.setattr(kfa, "table_arch", lambda device: sm)
    device = torch.device("cuda", 0)
    for tuned in (kfa._attn_fwd_tuned, kbwd._attn_bwd_dq_tuned, kbwd._attn_bwd_dkdv_tuned):
        monkeypatch.setattr(tuned, "latest", tuned.latest)  # restored after the test
        assert tuned.for_device(device) is tuned.for_sm(sm)
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    first = kfa.untuned_config("fwd", q, True, "ieee")
    assert first == kfa.fwd_configs(128, 2, "ieee", True, sm)[0]
    assert first == ((128, 64, 8, 2) if sm in (86, 120) else (128, 64, 8, 3))


def test_replacement_rows_replace_only_their_own_rows():
    """Every ``_SM86_ROWS`` row replaces an existing sm_80 row, and the sm_86 tables differ from
    the sm_80 ones only there: rows that fit and do not spill keep their tuned candidates. The
    same for the ``_SM120_ROWS`` against the sm_86 tables, the ``_SM100_ROWS`` against sm_80's and
    the ``_SM90_ROWS`` against sm_80's with the Hopper-only tiles."""
    assert kfa.REPLACEMENTS == {86: (kfa._SM86_ROWS,), 90: (kfa._SM90_ROWS,), 100: (kfa._SM100_ROWS,),
                                120: (kfa._SM86_ROWS, kfa._SM120_ROWS)}
    for name, (aligned_table, unaligned_table, extras, replacements) in kfa.CONFIG_TABLES.items():
        for rows in (kfa._SM86_ROWS, kfa._SM90_ROWS, kfa._SM100_ROWS, kfa._SM120_ROWS):
            for aligned, row, kind in rows[name]:
                assert (row, kind) in (aligned_table if aligned else unaligned_table), (name, aligned, row, kind)
        configs = {"fwd": kfa.fwd_configs, "dq": kfa.dq_configs, "dkdv": kfa.dkdv_configs,
                   "dkdv_atomic": kfa.dkdv_atomic_configs, "dkdv_partials": kfa.dkdv_partials_configs}[name]
        for aligned, table in ((True, aligned_table), (False, unaligned_table)):
            for row, kind in table:
                elem, precision = (2, "ieee") if kind == "16-bit" else (4, kind)
                for sm, base, rows in ((86, 80, kfa._SM86_ROWS), (120, 86, kfa._SM120_ROWS), (100, 80, kfa._SM100_ROWS)):
                    got = configs(row, elem, precision, aligned, sm)
                    assert got == rows[name].get((aligned, row, kind), configs(row, elem, precision, aligned, base))
                    assert got
                hopper = configs(row, elem, precision, aligned, 80) + (extras.get(row, []) if aligned and kind == "16-bit"
                                                                       else [])
                assert configs(row, elem, precision, aligned, 90) == kfa._SM90_ROWS[name].get((aligned, row, kind), hopper)


@pytest.mark.parametrize("sm", [80, 86, 90, 100, 120])
@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("dtype,D,precision", [(torch.bfloat16, 128, "ieee"), (torch.float16, 80, "ieee"),
                                               (torch.bfloat16, 64, "ieee"), (torch.float32, 256, "ieee"),
                                               (torch.float32, 128, "tf32"), (torch.float32, 256, "tf32"),
                                               (torch.bfloat16, 256, "ieee")])
def test_autotune_candidates_are_the_built_ones(dtype, D, precision, aligned, sm, monkeypatch):
    """Each autotuner keeps only its (stride alignment, head dim, dtype, fp32 precision, device
    arch) row, and every kept config is in the build list the build report compiles for that
    arch. Unaligned launches get the ``*_UNALIGNED`` tables (smaller tiles that do not spill
    without the 16-element stride hint); an sm_90 device adds the Hopper-only tiles to the
    aligned 16-bit rows, and those are built for sm_90 alone; a 99 KB GPU (sm_86) swaps in the
    ``_SM86_ROWS``, and no tile of its sm_80 row that they drop is built for it; sm_120 the same
    with the ``_SM120_ROWS`` on top, sm_100 the sm_80 tables with the ``_SM100_ROWS``."""
    from fastllama.kernels import flash_attention_backward as kbwd

    q = torch.empty(1, 1, 1, D, dtype=dtype)
    archs = {(b.label, b.num_warps, b.num_stages): b.archs for b in A._build_configs()}
    d_pad = kfa.padded_head_dim(D)
    ptr = {torch.float32: f"fp32/{precision}", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    kind = precision if dtype == torch.float32 else "16-bit"
    hopper = sm == 90 and aligned and kind == "16-bit"
    kernels = [("fwd", kfa._attn_fwd_tuned, kfa.fwd_configs), ("dq", kbwd._attn_bwd_dq_tuned, kfa.dq_configs),
               ("dkdv", kbwd._attn_bwd_dkdv_tuned, kfa.dkdv_configs)]
    if dtype != torch.float32:
        kernels.append(("dkdv_atomic", kbwd._attn_bwd_dkdv_atomic_tuned, kfa.dkdv_atomic_configs))
    for name, tuned, table in kernels:
        tuned = tuned.for_sm(sm)
        kept = tuned.early_config_prune(tuned.configs, {"Q": q}, D_PAD=d_pad, PRECISION=precision, ALIGNED=aligned)
        got = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
        assert got == set(table(d_pad, dtype.itemsize, precision, aligned, sm)) and got
        shared = set(kfa.CONFIG_TABLES[name][0 if aligned else 1][(max(64, d_pad), kind)])
        extra = set(kfa.CONFIG_TABLES[name][2].get(max(64, d_pad), [])) - shared if hopper else set()
        small = None
        for rows in kfa.CONFIG_TABLES[name][3].get(sm, ()):  # e.g. sm_86's replacement rows, then sm_120's
            small = rows.get((aligned, max(64, d_pad), kind), small)
        assert got == (set(small) if small else shared | extra)
        # (dQ and dK/dV: sm_90's rows are its own, _SM90_ROWS)
        assert not hopper or d_pad > 128 or extra or small, "no Hopper-only tile for an aligned 16-bit d64/d128 row"
        for bm, bn, w, s in got:
            label = f"flash_attention {name} {ptr} d{D}{'' if aligned else ' unaligned'} M{bm} N{bn}"
            built_for = archs[label, w, s]
            assert built_for is None or f"sm_{sm}" in built_for, (label, w, s, built_for)
        if small:  # the dropped tiles are not built for this arch (they do not fit or spill there)
            for bm, bn, w, s in shared - set(small):
                label = f"flash_attention {name} {ptr} d{D}{'' if aligned else ' unaligned'} M{bm} N{bn}"
                assert archs[label, w, s] is not None and f"sm_{sm}" not in archs[label, w, s]


def test_autotune_off_launches_the_rows_first_candidate(monkeypatch):
    """FASTLLAMA_AUTOTUNE=0 (read at import) reaches the launchers as autotune=False, and they
    launch the row's first candidate directly (a pruned one-candidate autotuner would still be
    timed by Triton before 3.7)."""
    import subprocess
    import sys

    monkeypatch.setattr(kfa, "table_arch", lambda device: 90)
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    for which, table in (("fwd", kfa.fwd_configs), ("dq", kfa.dq_configs), ("dkdv", kfa.dkdv_configs),
                         ("dkdv_atomic", kfa.dkdv_atomic_configs)):
        assert kfa.untuned_config(which, q, True, "ieee") == table(128, 2, "ieee", True, 90)[0]
        assert kfa.untuned_config(which, q, False, "ieee") == table(128, 2, "ieee", False, 90)[0]
    code = "from fastllama.ops import attention as A; print(A._AUTOTUNE)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, FASTLLAMA_AUTOTUNE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip().splitlines()[-1] == expected


def test_unaligned_head_dim():
    """head_dim 40 gives strides that are not multiples of 16: the ALIGNED=False kernels run
    (their own config tables on a GPU) and match the reference, forward and backward."""
    torch.manual_seed(0)
    q, k, v = _qkv(1, 2, 1, 37, 37, 40, torch.float32)
    assert not kfa.strides_aligned(q, k, v)
    _parity(torch.float32, q, k, v, causal=True)


def test_build_list_is_complete_and_unique():
    builds = A._build_configs()
    keys = [(b.kernel, tuple(sorted(b.signature.items())), tuple(sorted(b.constexprs.items())), b.num_warps,
             b.num_stages) for b in builds]
    assert len(set(keys)) == len(keys)
    for D in (64, 80, 96, 128, 256):
        assert any(b.constexprs.get("HEAD_DIM") == D and b.constexprs.get("IS_VARLEN") for b in builds)
    # Every aligned specialisation has its unaligned twin, compiled with plain "i32" strides.
    spec = lambda b: (b.kernel, b.signature["Q"], *(b.constexprs[n] for n in ("HEAD_DIM", "IS_VARLEN", "PRECISION")))
    aligned = {spec(b) for b in builds if b.constexprs.get("ALIGNED") is True}
    unaligned = [b for b in builds if b.constexprs.get("ALIGNED") is False]
    assert aligned == {spec(b) for b in unaligned}
    assert all(t == "i32" for b in unaligned for n, t in b.signature.items() if n.startswith("stride_"))


# ----------------------------------------------------------------------------------------------
# Bad input: a ValueError/TypeError naming the argument, before any launch
# ----------------------------------------------------------------------------------------------
def _bad(**over):
    q, k, v = _qkv(1, 4, 2, 8, 8, 64, torch.float32, grad=False)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return args


_cu = lambda *vals: torch.tensor(vals, dtype=torch.int32, device=DEVICE)
_t = lambda *shape, dtype=torch.float32: torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("over,exc,match", [
    (dict(k=_t(2, 2, 8, 64), v=_t(2, 2, 8, 64)), ValueError, "batch size"),
    (dict(k=_t(1, 2, 8, 32), v=_t(1, 2, 8, 32)), ValueError, "head_dim"),
    (dict(v=_t(1, 2, 9, 64)), ValueError, "v has shape"),
    (dict(k=_t(1, 3, 8, 64), v=_t(1, 3, 8, 64)), ValueError, "multiple of the number of key/value heads"),
    (dict(q=_t(1, 65536, 1, 8), k=_t(1, 1, 1, 8), v=_t(1, 1, 1, 8)), ValueError, "65536 heads"),
    (dict(q=_t(1, 4, 8, 320), k=_t(1, 2, 8, 320), v=_t(1, 2, 8, 320)), ValueError, "head_dim 320"),
    (dict(k=_t(1, 2, 8, 64, dtype=torch.float16)), TypeError, "k has dtype"),
    (dict(q=_t(1, 4, 8, 64, dtype=torch.int64)), TypeError, "q has dtype"),
    (dict(q=_t(4, 8, 64)), ValueError, "q must have 4 dims"),
    (dict(q=_t(1, 4, 8, 128)[..., ::2]), ValueError, "q must be contiguous in its last dim"),
    (dict(window=4), TypeError, "window must be None or a pair"),
    (dict(window=(4, 0, 1)), TypeError, "window must be None or a pair"),
    (dict(window=(4.0, 0)), TypeError, "window must be None or a pair"),
    (dict(window=(-2, 0)), ValueError, "window entries"),
    (dict(scale="0.1"), TypeError, "scale"),
    (dict(scale=float("nan")), TypeError, "scale"),
    (dict(causal=1), TypeError, "causal"),
    (dict(fp32_precision="tf32x3"), ValueError, "fp32_precision"),
    (dict(deterministic=0), TypeError, "deterministic must be a bool"),
    (dict(softcap=0.0), ValueError, "softcap must be"),
    (dict(softcap=-30.0), ValueError, "softcap must be"),
    (dict(softcap=float("inf")), ValueError, "softcap must be"),
    (dict(softcap=float("nan")), ValueError, "softcap must be"),
    (dict(softcap="50"), TypeError, "softcap must be"),
    (dict(softcap=True), TypeError, "softcap must be"),
    (dict(softcap=1e39), ValueError, "softcap must be"),
    (dict(softcap=1e-300), ValueError, "softcap must be"),
    (dict(softcap=1e-37, scale=100.0), ValueError, "scale / softcap overflows fp32"),
    (dict(cu_seqlens=_cu(0, 8).long()), TypeError, "cu_seqlens has dtype"),
    (dict(cu_seqlens=_cu(0, 3, 8)[None]), ValueError, "cu_seqlens must have 1 dims"),
    (dict(cu_seqlens=_cu(0, 3, 9)), ValueError, "cu_seqlens must start at 0"),
    (dict(cu_seqlens=_cu(0, 5, 3, 8)), ValueError, "never decrease"),
    (dict(cu_seqlens=_cu(0, 8), cu_seqlens_k=_cu(0, 4, 8)), ValueError, "cu_seqlens_k has 3 entries"),
    (dict(cu_seqlens_k=_cu(0, 8)), ValueError, "without cu_seqlens"),
    (dict(q=_t(2, 4, 8, 64), k=_t(2, 2, 8, 64), v=_t(2, 2, 8, 64), cu_seqlens=_cu(0, 8)), ValueError, "batch size 1"),
    (dict(k=_t(1, 2, 6, 64), v=_t(1, 2, 6, 64), cu_seqlens=_cu(0, 8)), ValueError, "pass cu_seqlens_k"),
    (dict(sinks=_t(3)), ValueError, "sinks has 3 entries but q has 4 heads"),
    (dict(sinks=_t(1, 4)), ValueError, "sinks must have 1 dims"),
    (dict(sinks=_t(4, dtype=torch.int64)), TypeError, "sinks has dtype"),
    (dict(sinks=0.5), TypeError, "sinks must be a torch.Tensor"),
])
def test_bad_input(over, exc, match, monkeypatch):
    from fastllama.kernels import flash_attention_backward as kbwd

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    monkeypatch.setattr(kfa, "flash_attention_forward", launched)
    monkeypatch.setattr(kbwd, "flash_attention_backward", launched)
    args = _bad(**over)
    with pytest.raises(exc, match=match):
        ops.flash_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_more_sequence_heads_than_the_grid_axis_run_in_groups(monkeypatch, varlen):
    # a varlen pack of 1M tokens in 512-token samples at 32 heads is 65536 (sequence, head)
    # programs, one past CUDA's second grid axis; here the limit is lowered to 5 (2 sequences)
    from fastllama.ops import attention as A

    B, lens = (1, [7, 0, 12, 5, 9]) if varlen else (5, None)
    T = sum(lens) if varlen else 11
    q, k, v = (torch.randn(B, 2, T, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = _cu(0, *torch.tensor(lens).cumsum(0).tolist()) if varlen else None
    go = torch.randn(B, 2, T, 64, device=DEVICE)
    results = []
    for limit in (65535, 5):
        monkeypatch.setattr(A, "MAX_GRID_Y", limit)
        out, lse = ops.flash_attention_with_lse(q, k, v, causal=True, cu_seqlens=cu)
        results.append((out, lse, *torch.autograd.grad((out * go).sum() + lse.sum(), (q, k, v))))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_huge_window_is_no_window():
    # (2**31 - 1, 0), "unlimited" by habit: the kernels add the bounds to positions in 32 bits on a
    # GPU, where an unclamped value wrapped and no key block was visited (zero dK/dV)
    q, k, v = (torch.randn(1, 2, 40, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    go = torch.randn(1, 2, 40, 64, device=DEVICE)
    grads = []
    for window in (None, (2**31 - 1, 0)):
        out = ops.flash_attention(q, k, v, causal=True, window=window)
        grads.append((out, *torch.autograd.grad(out, (q, k, v), go)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    import fastllama.ops._checks as checks

    monkeypatch.setattr(checks, "interpreter_active", lambda: False)
    q = torch.randn(1, 2, 4, 64)
    with pytest.raises(ValueError, match="q is on device cpu"):
        ops.flash_attention(q, q, q)


# ----------------------------------------------------------------------------------------------
# The full grid (GPU): op-table cases marked cuda_only run in tests/test_op_parity.py
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("window", [(255, 0), (100, 30)])
@pytest.mark.parametrize("Tq,Tk", [(1023, 1023), (512, 2048)])
def test_window_grid(dtype, window, Tq, Tk):
    torch.manual_seed(0)
    _parity(dtype, *_qkv(2, 8, 2, Tq, Tk, 128, dtype), causal=window[1] == 0, window=window)


@pytest.mark.skipif(INTERPRETER, reason="GPU only: every tile of this device's tables (16 cases, not the matrix)")
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("which", ["fwd", "dq", "dkdv", "dkdv_atomic", "dkdv_partials"])
def test_every_autotune_candidate_of_this_gpu(monkeypatch, which, D):
    """The autotuner may pick any candidate of the device's row (the Hopper-only tiles on an
    H100/H200), and the interpreter only ever runs its own large tile: each candidate, forced in
    turn, must pass the parity rule on an odd-length causal GQA case with edge blocks on both
    axes (the other two kernels keep their row's first candidate). The dQ-partials kernel runs
    with as many partials as this GPU's SM count gives."""
    torch.manual_seed(0)
    sm = kfa.table_arch(torch.device(DEVICE))
    tables = {"fwd": kfa.fwd_configs, "dq": kfa.dq_configs, "dkdv": kfa.dkdv_configs,
              "dkdv_atomic": kfa.dkdv_atomic_configs, "dkdv_partials": kfa.dkdv_partials_configs}
    row = lambda name: tables[name](kfa.padded_head_dim(D), 2, "ieee", True, sm)
    qkv = _qkv(2, 4, 2, 333, 333, D, torch.bfloat16)
    algorithm = "partials" if which == "dkdv_partials" else "recompute"
    for config in row(which):
        monkeypatch.setattr(A, "FORCE_CONFIG", {name: row(name)[0] for name in tables} | {which: config})
        with A.deterministic_backward(algorithm):
            _parity(torch.bfloat16, *(t.detach().clone().requires_grad_() for t in qkv), causal=True,
                    deterministic=which != "dkdv_atomic")
            if which in ("dkdv_atomic", "dkdv_partials"):  # interior blocks that see a partial key block's padding keys
                _parity(torch.bfloat16, *(t.detach().clone().requires_grad_() for t in qkv), causal=False,
                        deterministic=which != "dkdv_atomic")


def test_k_and_v_with_different_layouts():
    """k a transposed (B, T, H, D) view, v dense (B, H, T, D): reading v with k's strides passed
    every test that built k and v alike."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 40, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 40, 2, 64, device=DEVICE).transpose(1, 2).requires_grad_()
    v = torch.randn(1, 2, 40, 64, device=DEVICE, requires_grad=True)
    assert_parity(functools.partial(ops.flash_attention, causal=True), functools.partial(A._reference, causal=True),
                  q, k, v)


@pytest.mark.parametrize("window", [(5, -1), (-1, 3)])
def test_unlimited_side_of_a_non_causal_window(window):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 64, device=DEVICE, requires_grad=True) for _ in range(3))
    assert_parity(functools.partial(ops.flash_attention, causal=False, window=window),
                  functools.partial(A._reference, causal=False, window=window), q, k, v)


def test_grid_groups_of_varlen_sequences_with_other_key_lengths(monkeypatch):
    """More sequences than a grid dimension holds run in groups, each with its cu_seqlens rebased;
    key boundaries that differ from the query ones must be rebased by their own start."""
    torch.manual_seed(0)
    lens_q, lens_k = [7, 0, 12, 5, 9], [9, 4, 12, 8, 9]

    def cu(lens):
        return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    q = torch.randn(1, 2, sum(lens_q), 64, device=DEVICE)
    k, v = (torch.randn(1, 2, sum(lens_k), 64, device=DEVICE) for _ in range(2))
    outs = []
    for limit in (65535, 5):
        monkeypatch.setattr(A, "MAX_GRID_Y", limit)
        outs.append(ops.flash_attention(q, k, v, causal=True, cu_seqlens=cu(lens_q), cu_seqlens_k=cu(lens_k)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def _far_rows(buf, offset, rows, stride, d, seed):
    """(1, 1, rows, d) view of ``buf`` whose rows are ``stride`` elements apart, filled."""
    view = torch.as_strided(buf, (1, 1, rows, d), (rows * stride, rows * stride, stride, 1), offset)
    view.copy_(torch.randn(1, 1, rows, d, generator=torch.Generator().manual_seed(seed)))
    return view


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter shows the int32 wrap as a crash; on a GPU it would "
                    "be an illegal address")
def test_token_stride_too_large_for_int32_tile_offsets_is_read_from_a_copy():
    """A token stride just under 2**31 (Triton passes it as int32): row 2 of a tile sits past
    element 2**31, and the kernels' int32 row offsets wrapped (a segfault under the interpreter,
    an illegal address on a GPU). Such inputs now run on contiguous copies: same bits as dense
    inputs. The 4 GiB buffer is virtual: only the rows used are touched."""
    stride, rows, d = 2**30 + 64, 3, 16
    buf = torch.empty((rows - 1) * stride + 256, dtype=torch.float16)
    far = [_far_rows(buf, off, rows, stride, d, seed) for seed, off in enumerate((0, 64, 128, 192))]
    dense = [t.contiguous() for t in far]
    results = []
    for q, k, v, do in (far, dense):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = ops.flash_attention(q, k, v, causal=False)
        out.backward(do)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


def _small_qkv(hq=4, hk=2, t=8, d=64, dtype=torch.float32):
    torch.manual_seed(0)
    return tuple(torch.randn(1, h, t, d, device=DEVICE, dtype=dtype) for h in (hq, hk, hk))


@pytest.mark.parametrize("case", ["no kv heads", "cu_seqlens strided", "v dtype", "window of bools"])
def test_flash_attention_bad_input(case, monkeypatch):
    """A01 (Hk == 0 unchecked: ZeroDivisionError from Hq % 0), A02 (cu_seqlens contiguity
    unchecked: the kernels read entry i at base + i, so a strided one gave other boundaries),
    A03 (v's dtype unchecked: only k's was compared with q's), A06 (window=(True, 0) accepted:
    bool is an int). tests/test_flash_attention.py::test_bad_input."""
    from fastllama.kernels import flash_attention as kfa
    from fastllama.kernels import flash_attention_backward as kbwd

    def launched(*args, **kwargs):
        raise AssertionError("a kernel was launched before the input was rejected")

    monkeypatch.setattr(kfa, "flash_attention_forward", launched)
    monkeypatch.setattr(kbwd, "flash_attention_backward", launched)
    q, k, v = _small_qkv()
    if case == "no kv heads":
        call, exc, match = lambda: ops.flash_attention(q, k[:, :0], v[:, :0]), ValueError, "multiple of the number"
    elif case == "cu_seqlens strided":
        cu = torch.tensor([0, 99, 3, 99, 8], dtype=torch.int32, device=DEVICE)[::2]
        call, exc, match = lambda: ops.flash_attention(q, k[:, :, :8], v, cu_seqlens=cu), ValueError, \
            "cu_seqlens must be contiguous"
    elif case == "v dtype":
        call, exc, match = lambda: ops.flash_attention(q, k, v.half()), TypeError, "v has dtype"
    else:
        call, exc, match = lambda: ops.flash_attention(q, k, v, window=(True, 0)), TypeError, "window must be"
    with pytest.raises(exc, match=match):
        call()


def test_flash_attention_fake_kernel_matches_the_real_one():
    """A04 (register_fake of flash_attention_fwd gives the softmax statistics q's dtype; the
    kernel returns fp32). tests/test_flash_attention.py: the compile tests run only
    flash_attention, whose graph drops the statistics."""
    from fastllama.ops.attention import _validate

    q, k, v = _small_qkv(dtype=torch.float16)
    for softcap in (None, 5.0):
        scale, before, after, precision, det, cap = _validate(q, k, v, True, None, None, None, None, "ieee", True,
                                                              softcap)
        torch.library.opcheck(torch.ops.fastllama.flash_attention_fwd.default,
                              (q, k, v, scale, before, after, None, None, precision, det, cap),
                              test_utils=("test_schema", "test_faketensor"))


def test_atomic_backward_autotuner_zeroes_dq_without_copying_it():
    """Each timed candidate of the atomic dK/dV kernel adds into the fp32 dQ buffer, which the
    launch starts at zeros: Triton's hooks around every timed run must bring it back to zeros
    without a clone and a copy-back of the whole buffer (restore_value did that inside the timed
    call: two extra passes over B*H*T*D*4 bytes added to every candidate's time)."""
    from fastllama.bench.common import NewStorages
    from fastllama.kernels import flash_attention_backward as kfb

    tuner = kfb._attn_bwd_dkdv_atomic_tuned.for_sm(90)
    dq = torch.zeros(2, 3, 33, 64)
    sizes = []

    class Created(NewStorages):
        def created(self, tensor):
            sizes.append(tensor.untyped_storage().nbytes())

    with Created():
        for _ in range(2):  # two timed candidates, as Autotuner._bench runs them
            tuner.pre_hook({"DQ": dq})
            dq.add_(1.0)  # what the candidate's atomics add
            tuner.post_hook({"DQ": dq}, exception=None)
        tuner.pre_hook({"DQ": dq}, reset_only=True)  # before the run that counts
    assert torch.count_nonzero(dq) == 0
    assert max(sizes, default=0) < dq.untyped_storage().nbytes(), sizes
