"""decode_attention and rotary_cache_append beyond the op-table parity cases
(tests/test_op_parity.py runs those: Tq 1/4/16, lengths 0/1/3/77/1000, GQA 1/4/8, D 64/80/128,
fp32/fp16/bf16, 1 and many splits, strided cache views; the full matrix is cuda_only).

Here: exact zeros for empty sequences, split-count invariance and determinism, lengths past
the cache, output layout, validation messages, soft-capped scores at their limits, and
torch.compile(fullgraph=True).
"""
import pytest
import torch

from conftest import DEVICE
from fastllama import ops, reference
from fastllama.reference import functional as ref


def _setup(B=3, Hq=8, Hk=2, Tq=1, D=64, Tmax=300, lens=(0, 77, 300), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Tq, Hq, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k = torch.randn(B, Hk, Tmax, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hk, Tmax, D, generator=g).to(DEVICE, dtype)
    for b, n in enumerate(lens):
        k[b, :, n:] = float("nan")
        v[b, :, n:] = float("nan")
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("splits", [1, 4])
def test_empty_sequence_gives_exact_zeros(splits):
    q, k, v, lens = _setup(lens=(0, 5, 0), Tq=2)
    out = ops.decode_attention(q, k, v, lens, num_splits=splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens), rtol=0, atol=1e-6)


def test_split_counts_agree_and_are_deterministic():
    q, k, v, lens = _setup(B=2, Hq=4, Hk=1, Tq=3, lens=(77, 300))
    base = ops.decode_attention(q, k, v, lens, num_splits=1)
    for s in (3, 32):
        out = ops.decode_attention(q, k, v, lens, num_splits=s)
        torch.testing.assert_close(out, base, rtol=0, atol=2e-6)
        assert torch.equal(out, ops.decode_attention(q, k, v, lens, num_splits=s)), f"splits={s} not deterministic"
    torch.testing.assert_close(base, ref.decode_attention(q, k, v, lens), rtol=0, atol=2e-6)


def test_unlimited_window_is_no_window():
    q, k, v, lens = _setup(B=2, Hq=4, Hk=1, Tq=3, lens=(77, 300))
    base = ops.decode_attention(q, k, v, lens, num_splits=2)
    for window in ((-1, 0), (300, 0), (2**40, 0)):  # -1, or as long as the cache (or longer)
        assert torch.equal(ops.decode_attention(q, k, v, lens, num_splits=2, window=window), base), window


def test_window_splits_only_the_keys_in_it():
    """A windowed query's chunks cover its window, not the cache: at length 1000 a window of 400
    keys (402 with Tq = 2: 4 key blocks of 128 under the interpreter) gives each of 4 splits one
    block, the result equals one split's, and the 598 older slots (NaN) are never read."""
    q, k, v, lens = _setup(B=1, Hq=4, Hk=1, Tq=2, Tmax=1000, lens=(1000,))
    k[:, :, :1000 - 2 - 400] = float("nan")
    v[:, :, :1000 - 2 - 400] = float("nan")
    out = ops.decode_attention(q, k, v, lens, num_splits=4, window=(400, 0))
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens, window=(400, 0)), rtol=0, atol=2e-6)
    torch.testing.assert_close(out, ops.decode_attention(q, k, v, lens, num_splits=1, window=(400, 0)),
                               rtol=0, atol=2e-6)


def test_lengths_outside_the_cache_are_clamped():
    q, k, v, _ = _setup(lens=(300, 300, 300))
    over = ops.decode_attention(q, k, v, torch.tensor([305, 10**6, -4], dtype=torch.int32, device=DEVICE),
                                num_splits=3)
    full = ops.decode_attention(q, k, v, torch.tensor([300, 300, 0], dtype=torch.int32, device=DEVICE),
                                num_splits=3)
    assert torch.equal(over, full)


def test_output_keeps_the_projection_layout_and_custom_scale():
    q, k, v, lens = _setup(lens=(3, 9, 40))
    out = ops.decode_attention(q, k, v, lens, scale=0.3)
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory, like q: o_proj reshapes for free
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens, scale=0.3), rtol=0, atol=2e-6)


@pytest.mark.parametrize("splits", [1, 3])
def test_unaligned_strides(splits):
    """head_dim 24 (strides not multiples of 16): the unvectorised specialisation."""
    from fastllama.kernels.decode_attention import strides_aligned

    q, k, v, lens = _setup(B=2, Hq=4, Hk=2, Tq=2, D=24, Tmax=48, lens=(5, 40))
    assert not strides_aligned(q, k, v)
    out = ops.decode_attention(q, k, v, lens, num_splits=splits)
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens), rtol=0, atol=2e-6)


def test_decode_attention_validation():
    q, k, v, lens = _setup()
    with pytest.raises(ValueError, match="query rows"):
        ops.decode_attention(torch.zeros(3, 8, 17, 64, device=DEVICE), k, v, lens)
    with pytest.raises(TypeError, match="k_cache has dtype"):
        ops.decode_attention(q, k.half(), v, lens)
    with pytest.raises(ValueError, match="multiple"):
        ops.decode_attention(q[:, :7], k[:, :1].expand(3, 3, 300, 64), v[:, :1].expand(3, 3, 300, 64), lens)
    with pytest.raises(TypeError, match="cache_seqlens has dtype torch.int64"):
        ops.decode_attention(q, k, v, lens.long())
    with pytest.raises(ValueError, match=r"cache_seqlens has shape \(2,\)"):
        ops.decode_attention(q, k, v, lens[:2])
    with pytest.raises(ValueError, match="k_cache has shape"):
        ops.decode_attention(q, k[:, :, :, :32], v[:, :, :, :32], lens)
    with pytest.raises(ValueError, match="num_splits"):
        ops.decode_attention(q, k, v, lens, num_splits=ops.decode.MAX_SPLITS + 1)
    with pytest.raises(ValueError, match="contiguous in its last dim"):
        ops.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), v, lens)
    with pytest.raises(ValueError, match="forward-only"):
        ops.decode_attention(q.detach().requires_grad_(), k, v, lens)
    # the kernels read entry b at base + b: a strided lengths tensor once gave silently wrong rows
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        ops.decode_attention(q, k, v, torch.stack([lens, lens], 1)[:, 0])
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        ops.decode_attention(q, k, v, lens[:1].expand(3))
    with pytest.raises(ValueError, match="cache_leftpad must be contiguous"):
        ops.decode_attention(q, k, v, lens, cache_leftpad=torch.zeros_like(lens)[:, None].repeat(1, 2)[:, 1])
    with pytest.raises(ValueError, match="q has 8 heads and k_cache 0"):
        ops.decode_attention(q, k[:, :0], v[:, :0], lens)
    with pytest.raises(TypeError, match=r"window must be None or a pair of ints.*sliding_window=W"):
        ops.decode_attention(q, k, v, lens, window=20)
    with pytest.raises(ValueError, match="decode attention is causal, so the right bound must be 0"):
        ops.decode_attention(q, k, v, lens, window=(20, 3))
    with pytest.raises(ValueError, match="left bound must be >= 0 or -1"):
        ops.decode_attention(q, k, v, lens, window=(-2, 0))
    with pytest.raises(ValueError, match="sinks has 4 entries but q has 8 heads"):
        ops.decode_attention(q, k, v, lens, sinks=torch.zeros(4, device=DEVICE))
    with pytest.raises(TypeError, match="sinks has dtype"):
        ops.decode_attention(q, k, v, lens, sinks=torch.zeros(8, device=DEVICE, dtype=torch.int32))
    with pytest.raises(ValueError, match="forward-only.*sinks requires grad"):
        ops.decode_attention(q, k, v, lens, sinks=torch.zeros(8, device=DEVICE, requires_grad=True))
    with torch.no_grad():  # fine without grad mode
        ops.decode_attention(q.detach().requires_grad_(), k, v, torch.tensor([1, 1, 1], dtype=torch.int32,
                                                                                device=DEVICE))


@pytest.mark.parametrize("softcap, error", [(0.0, ValueError), (-30.0, ValueError), (float("inf"), ValueError),
                                            (float("nan"), ValueError), (1e39, ValueError), (1e-300, ValueError),
                                            ("50", TypeError), (True, TypeError)])
def test_softcap_bad_values(softcap, error):
    q, k, v, lens = _setup()
    with pytest.raises(error, match="softcap must be"):
        ops.decode_attention(q, k, v, lens, softcap=softcap)


def test_softcap_that_overflows_the_scale():
    q, k, v, lens = _setup()
    with pytest.raises(ValueError, match="softcap=1e-37 with scale=100.0: scale / softcap overflows fp32"):
        ops.decode_attention(q, k, v, lens, scale=100.0, softcap=1e-37)
    ops.decode_attention(q, k, v, lens, scale=1.0, softcap=1e-37)  # 1e37: within fp32


def test_softcap_16bit_limit_and_extremes():
    """fp16/bf16 take caps up to MAX_16BIT_SOFTCAP (the kernel's capped scores are exact to about
    1e-7 of the cap), fp32 any; scores 1e4 times past the cap give exactly +-cap (no overflow,
    no NaN), an empty sequence zeros. The capped split and single-pass results agree."""
    def within_parity(q, k, v, lens, softcap):  # the DESIGN.md rule: 2x PyTorch's own error
        truth = ref.decode_attention(q.double(), k.double(), v.double(), lens, softcap=softcap)
        torch_error = (ref.decode_attention(q, k, v, lens, softcap=softcap).double() - truth).abs().max()
        error = (ops.decode_attention(q, k, v, lens, softcap=softcap).double() - truth).abs().max()
        return error <= 2 * torch_error

    q, k, v, lens = _setup(dtype=torch.float16, lens=(0, 77, 300))
    with pytest.raises(ValueError, match="softcap=20000.0 with torch.float16 inputs; accepted: at most 10000"):
        ops.decode_attention(q, k, v, lens, softcap=2e4)
    assert within_parity(q * 0.1, k, v, lens, 1e4)  # scores of 0.1, far below the cap
    q, k, v, lens = _setup(lens=(0, 77, 300))
    assert within_parity(q, k, v, lens, 1e30)
    # scores q.k * scale = +-(0.5 .. 1.5) * 1e4 / 8, exact products: every one capped to +-2 exactly
    q = torch.zeros_like(q)
    q[..., 0] = 1e4
    k[..., 0] = torch.where(torch.rand_like(k[..., 0]) < 0.5, -1.0, 1.0) * (0.5 + torch.rand_like(k[..., 0]))
    out = ops.decode_attention(q, k, v, lens, softcap=2.0, num_splits=3)
    torch.testing.assert_close(out.double(), ref.decode_attention(q.double(), k.double(), v.double(), lens,
                                                                  softcap=2.0), rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out, ops.decode_attention(q, k, v, lens, softcap=2.0, num_splits=1), rtol=1e-6,
                               atol=1e-6)
    # fp16's capped scores (2^(+-huge) = inf or 0 in the kernel's tanh): +-2 too; what differs is
    # the rounding of the probabilities and the output to fp16 (2^-11 relative)
    out = ops.decode_attention(q.half(), k.half(), v.half(), lens, softcap=2.0, num_splits=3)
    torch.testing.assert_close(out.double(), ref.decode_attention(q.half().double(), k.half().double(),
                                                                  v.half().double(), lens, softcap=2.0),
                               rtol=0, atol=2e-3)


def _rotary_setup(B=2, T=3, Hq=4, Hk=2, D=32, Tmax=12):
    q = torch.randn(B, T, Hq, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, device=DEVICE).transpose(1, 2)
    v = torch.randn(B, T, Hk, D, device=DEVICE).transpose(1, 2)
    kc, vc = torch.zeros(B, Hk, Tmax, D, device=DEVICE), torch.zeros(B, Hk, Tmax, D, device=DEVICE)
    cos, sin = ref.rope_cos_sin(torch.arange(Tmax, device=DEVICE)[None], ref.rope_inv_freq(D))
    return q, k, v, kc, vc, cos[0], sin[0]


def test_rotary_cache_append_in_place_and_validation():
    q, k, v, kc, vc, cos, sin = _rotary_setup()
    lens = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    q_ref, kc_ref, vc_ref = ref.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens)
    q_rot = ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref) and torch.equal(q_rot, q_ref)
    assert torch.equal(lens, torch.tensor([0, 9], dtype=torch.int32, device=DEVICE))  # the caller advances it
    with pytest.raises(ValueError, match="head_dim 31"):
        ops.rotary_cache_append(q[..., :31], k[..., :31], v[..., :31], kc[..., :31], vc[..., :31], cos[:, :31],
                                sin[:, :31], lens)
    with pytest.raises(ValueError, match="positions is only accepted"):
        ops.rotary_cache_append(q, k, v, kc, vc, cos[None, :3].expand(2, 3, 32), sin[None, :3].expand(2, 3, 32),
                                lens, positions=lens)
    with pytest.raises(TypeError, match="cos has dtype"):
        ops.rotary_cache_append(q, k, v, kc, vc, cos.double(), sin, lens)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens, interleaved="pairs")
    with pytest.raises(ValueError, match="k_cache has shape"):
        ops.rotary_cache_append(q, k, v, kc[:, :1], vc[:, :1], cos, sin, lens)
    with pytest.raises(ValueError, match="forward-only"):
        ops.rotary_cache_append(q, k.detach().requires_grad_(), v, kc, vc, cos, sin, lens)
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, torch.stack([lens, lens], 1)[:, 0])
    with pytest.raises(ValueError, match="positions must be contiguous"):
        ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens, positions=torch.stack([lens, lens], 1)[:, 0])
    with pytest.raises(ValueError, match="q has 0 heads"):  # (nothing would reach the cache)
        ops.rotary_cache_append(q[:, :0], k, v, kc, vc, cos, sin, lens)
    # written in place: aliased or expanded caches would lose writes (k_cache is v_cache kept v only)
    with pytest.raises(ValueError, match="k_cache and v_cache share memory"):
        ops.rotary_cache_append(q, k, v, kc, kc, cos, sin, lens)
    with pytest.raises(ValueError, match="k_cache has a stride-0"):
        ops.rotary_cache_append(q, k, v, kc[:1].expand_as(kc), vc, cos, sin, lens)
    with pytest.raises(ValueError, match="k and k_cache share memory"):
        ops.rotary_cache_append(q, kc[:, :, :3], v, kc, vc, cos, sin, lens)
    qkv = torch.randn(2, 3, 8, 32, device=DEVICE).transpose(1, 2)  # q, k, v as views of one buffer: fine
    ops.rotary_cache_append(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], kc, vc, cos, sin, lens)


@pytest.mark.parametrize("tokens_per_program,rows", [(1, None), (1, 4), (2, 4), (3, 2), (4, 1024)])
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_cache_append_every_row_block_layout(tokens_per_program, rows, rotary_dim):
    """The op runs the GPU's launch (one token per program, ``block_r`` rows) only on a GPU; here
    the kernel runs it and others under the interpreter: row blocks that end inside a token's
    heads, cross into the next token, or hold q, k and v of several tokens, with the rows past
    the last token masked; full and partial rotary, cache slots and given positions."""
    from fastllama.kernels import rotary_cache as rk
    q, k, v, kc, vc, cos, sin = _rotary_setup(B=2, T=3, Hq=6, Hk=2, D=32, Tmax=12)
    cos, sin = ref.rope_cos_sin(torch.arange(12, device=DEVICE)[None], ref.rope_inv_freq(rotary_dim))
    cos, sin = cos[0], sin[0]
    lens = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    for positions in (None, torch.tensor([2, 5], dtype=torch.int32, device=DEVICE)):
        q_ref, kc_ref, vc_ref = ref.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens, positions)
        kc2, vc2 = kc.clone(), vc.clone()
        q_rot = rk.rotary_cache_append_forward(q, k, v, kc2, vc2, cos, sin, lens, positions,
                                               tokens_per_program=tokens_per_program, rows=rows)
        torch.testing.assert_close(q_rot, q_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(kc2, kc_ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(vc2, vc_ref)


def test_compile_fullgraph_matches_eager():
    """One decode step (append + attend, and attend with capped scores) compiles as custom ops,
    no graph break."""
    q, k, v, kc, vc, cos, sin = _rotary_setup(T=1, Tmax=40)
    lens = torch.tensor([7, 30], dtype=torch.int32, device=DEVICE)

    def step(q, k, v, kc, vc, lens):
        q = ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens)
        return ops.decode_attention(q, kc, vc, lens + 1, num_splits=2), ops.decode_attention(q, kc, vc, lens + 1,
                                                                                             softcap=1.5)

    kc2, vc2 = kc.clone(), vc.clone()
    eager = step(q, k, v, kc, vc, lens)
    compiled = torch.compile(step, fullgraph=True)(q, k, v, kc2, vc2, lens)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # the mutation survived compilation


@pytest.mark.parametrize("splits", [1, 3])
def test_k_and_v_caches_with_different_layouts(splits):
    # reading v with k's head or token strides passed every test that built the caches alike
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 64, device=DEVICE)
    k = torch.randn(2, 2, 48, 64, device=DEVICE)
    v = torch.randn(2, 48, 2, 64, device=DEVICE).transpose(1, 2)
    lens = torch.tensor([5, 40], dtype=torch.int32, device=DEVICE)
    out = ops.decode_attention(q, k, v, lens, num_splits=splits)
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens), rtol=0, atol=2e-6)


@pytest.mark.parametrize("splits", [3, 5])
def test_splits_that_do_not_divide_the_block_count(splits):
    # 1000 keys are 8 blocks of the interpreter's 128: 3 or 5 splits leave a remainder
    torch.manual_seed(0)
    q = torch.randn(2, 4, 2, 64, device=DEVICE)
    k, v = (torch.randn(2, 2, 1000, 64, device=DEVICE) for _ in range(2))
    lens = torch.tensor([1000, 700], dtype=torch.int32, device=DEVICE)
    out = ops.decode_attention(q, k, v, lens, num_splits=splits)
    torch.testing.assert_close(out, ref.decode_attention(q, k, v, lens), rtol=0, atol=2e-6)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter shows the int32 wrap as a crash")
def test_token_strides_too_large_for_int32_tile_offsets():
    """q with such a stride runs from a copy (same bits); a cache with one is refused (it is not
    copied every step). Strides just under 2**31: the kernel's int32 row offsets wrapped."""
    stride, d = 2**30 + 64, 16
    buf = torch.empty(2 * stride + 256, dtype=torch.float16)
    q = torch.as_strided(buf, (1, 3, 1, d), (3 * stride, stride, stride, 1))
    q.copy_(torch.randn(1, 3, 1, d))
    k, v = (torch.randn(1, 1, 8, d, dtype=torch.float16) for _ in range(2))
    lens = torch.tensor([5], dtype=torch.int32)
    torch.testing.assert_close(ops.decode_attention(q, k, v, lens), ops.decode_attention(q.contiguous(), k, v, lens),
                               rtol=0, atol=0)
    far_cache = torch.as_strided(buf, (1, 1, 3, d), (3 * stride, 3 * stride, stride, 1), 64)
    with pytest.raises(ValueError, match="k_cache has a token stride of"):
        ops.decode_attention(q.contiguous(), far_cache, far_cache.clone(), lens.clamp(max=3))


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


def _decode_inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 32, device=DEVICE)
    kc, vc = torch.randn(2, 2, 16, 32, device=DEVICE), torch.randn(2, 2, 16, 32, device=DEVICE)
    lens = torch.tensor([3, 16], dtype=torch.int32, device=DEVICE)
    return q, kc, vc, lens


@pytest.mark.parametrize("case", ["v_cache length", "nan scale", "zero splits"])
def test_decode_attention_bad_input(case):
    """D01 (v_cache's shape not compared with k_cache's: a shorter v_cache was read past its end),
    D02 (a NaN / inf scale accepted), D03 (num_splits=0 accepted: 1 <= n became 0 <= n).
    tests/test_decode_attention.py::test_decode_attention_validation."""
    q, kc, vc, lens = _decode_inputs()
    kwargs, match = {}, "num_splits"
    if case == "v_cache length":
        vc, match = vc[:, :, :8], "v_cache has shape"
    elif case == "nan scale":
        kwargs, match = {"scale": float("nan")}, "scale must be a finite"
    else:
        kwargs = {"num_splits": 0}
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(q, kc, vc, lens, **kwargs)


@pytest.mark.parametrize("case", ["empty table", "v shape", "sin shape", "odd rotary dim", "rotary dim > head_dim"])
def test_rotary_cache_append_bad_input(case):
    """D04 (a (0, D) cos/sin table accepted: positions are clamped to P - 1 = -1, a read before the
    table), D05 (v's shape not compared with k's), D06 (sin's shape not compared with cos's).
    tests/test_decode_attention.py::test_rotary_cache_append_in_place_and_validation."""
    torch.manual_seed(0)
    B, T, Hq, Hk, D, Tmax = 2, 3, 4, 2, 32, 12
    q = torch.randn(B, Hq, T, D, device=DEVICE)
    k, v = torch.randn(B, Hk, T, D, device=DEVICE), torch.randn(B, Hk, T, D, device=DEVICE)
    kc, vc = torch.zeros(B, Hk, Tmax, D, device=DEVICE), torch.zeros(B, Hk, Tmax, D, device=DEVICE)
    cos, sin = reference.rope_cos_sin(torch.arange(Tmax, device=DEVICE)[None], reference.rope_inv_freq(D))
    cos, sin = cos[0], sin[0]
    lens = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)
    if case == "empty table":
        cos, sin, match = cos[:0], sin[:0], "cos has shape"
    elif case == "v shape":
        v, match = v[:, :, :2], "v has shape"
    elif case == "sin shape":
        sin, match = sin[:6], "sin has shape"
    elif case == "odd rotary dim":  # partial rotary takes an even rotary dim (two halves)
        cos, sin, match = cos[:, :15].contiguous(), sin[:, :15].contiguous(), "an even R < 32"
    else:
        cos, sin, match = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1), "an even R < 32"
    with pytest.raises(ValueError, match=match):
        ops.rotary_cache_append(q, k, v, kc, vc, cos, sin, lens)
