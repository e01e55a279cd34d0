"""latent_decode_attention beyond the op-table parity cases (tests/test_op_parity.py runs those:
heads 3/4/5/16, Tq 1/2/3, latent 48/64/128 with rotary 8/16/32, lengths 0-300, 1, 3 and 4 splits and
the default, a strided cache view, left padding, fp32/fp16/bf16; DeepSeek's 512 + 64 at 16 and 128 heads is cuda_only).

Here: that it IS multi-head latent attention (the expanded heads of a kv_b_proj give the same
output), exact zeros for empty sequences, split-count invariance and determinism, lengths past the
cache, left padding, two cache tensors against two views of one buffer, validation messages, and
torch.compile(fullgraph=True).
"""
import pytest
import torch

from conftest import DEVICE
from fastllama import ops
from fastllama.reference import functional as ref


def _setup(B=2, H=4, Tq=1, R=32, P=16, Tmax=100, lens=(0, 77), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_latent = torch.randn(B, H, Tq, R, generator=g).to(DEVICE, dtype)
    q_rope = torch.randn(B, H, Tq, P, generator=g).to(DEVICE, dtype)
    cache = torch.randn(B, Tmax, R + P, generator=g).to(DEVICE, dtype)
    for b, n in enumerate(lens):
        cache[b, n:] = float("nan")  # past each length: never read
    return q_latent, q_rope, cache[..., :R], cache[..., R:], torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def test_it_is_attention_over_the_heads_expanded_from_the_latent():
    """With q_latent = q_nope W_UK (per head) and the output taken back by W_UV, the op equals
    float64 attention of q = [q_nope, q_rope] over each head's k = [W_UK c, k_rope], v = W_UV c."""
    B, H, Tq, R, P, nope, dv, Tmax = 2, 3, 2, 32, 8, 12, 10, 40
    g = torch.Generator().manual_seed(1)
    q_nope, q_rope = torch.randn(B, H, Tq, nope, generator=g), torch.randn(B, H, Tq, P, generator=g)
    cache = torch.randn(B, Tmax, R + P, generator=g)
    w_uk, w_uv = torch.randn(H, nope, R, generator=g) / R ** 0.5, torch.randn(H, dv, R, generator=g) / R ** 0.5
    lens = torch.tensor([40, 17], dtype=torch.int32)
    scale = (nope + P) ** -0.5
    o_latent = ops.latent_decode_attention((q_nope @ w_uk).to(DEVICE), q_rope.to(DEVICE), cache[..., :R].to(DEVICE),
                                           cache[..., R:].to(DEVICE), lens.to(DEVICE), scale=scale, num_splits=3)
    got = o_latent.cpu() @ w_uv.transpose(1, 2)
    c, k_rope = cache[..., :R].double(), cache[..., R:].double()
    k = torch.cat((torch.einsum("hnr,btr->bhtn", w_uk.double(), c), k_rope[:, None].expand(B, H, Tmax, P)), -1)
    v = torch.einsum("hdr,btr->bhtd", w_uv.double(), c)
    q = torch.cat((q_nope, q_rope), -1).double()
    want = ref.decode_attention(q, k, v, lens, scale=scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 4])
def test_empty_sequence_gives_exact_zeros(splits):
    *inputs, lens = _setup(B=3, Tq=2, lens=(0, 5, 0))
    out = ops.latent_decode_attention(*inputs, lens, scale=0.2, num_splits=splits)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.isfinite(out).all()


def test_split_counts_agree_and_are_deterministic_and_lengths_are_clamped():
    *inputs, lens = _setup(H=5, Tq=3, lens=(77, 100))
    base = ops.latent_decode_attention(*inputs, lens, scale=0.2, num_splits=1)
    for s in (3, 32):
        out = ops.latent_decode_attention(*inputs, lens, scale=0.2, num_splits=s)
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
        assert torch.equal(out, ops.latent_decode_attention(*inputs, lens, scale=0.2, num_splits=s))
    # a length past the cache reads the whole cache, a negative one nothing
    past = torch.tensor([77, 500], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(ops.latent_decode_attention(*inputs, past, scale=0.2), base)
    negative = torch.tensor([-3, 100], dtype=torch.int32, device=DEVICE)
    out = ops.latent_decode_attention(*inputs, negative, scale=0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("splits", [1, 5])
def test_left_padding_is_the_cache_without_its_first_slots(splits):
    """Sequence b's slots before cache_leftpad[b] (NaN here) are never read: the output equals
    that of the caches with those slots cut off and the length shortened by as many; the query
    rows whose slot is before the pad (a padded prompt's padding) get exact zeros; pads past the
    length and negative ones are clamped."""
    *inputs, lens = _setup(B=4, H=3, Tq=4, lens=(60, 60, 60, 60), Tmax=64)
    pads = [0, 17, 58, 90]
    latent, rope = inputs[2].clone(), inputs[3].clone()
    for b, pad in enumerate(pads):
        latent[b, :pad], rope[b, :pad] = float("nan"), float("nan")
    leftpad = torch.tensor(pads, dtype=torch.int32, device=DEVICE)
    out = ops.latent_decode_attention(*inputs[:2], latent, rope, lens, scale=0.2, num_splits=splits,
                                      cache_leftpad=leftpad)
    for b, pad in enumerate(pads[:3]):
        shifted = [t[b:b + 1, pad:].contiguous() for t in inputs[2:]]
        want = ops.latent_decode_attention(inputs[0][b:b + 1], inputs[1][b:b + 1], *shifted, lens[b:b + 1] - pad,
                                           scale=0.2, num_splits=splits)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-5, atol=1e-6)
    # sequence 2: slots 58, 59 kept, so its queries 0 and 1 (slots 56, 57) see no key
    assert torch.equal(out[2, :, :2], torch.zeros_like(out[2, :, :2])) and bool(out[2, :, 2:].abs().sum() > 0)
    assert torch.equal(out[3], torch.zeros_like(out[3]))  # a pad past the length: nothing
    negative = leftpad.clone()
    negative[0] = -5
    torch.testing.assert_close(ops.latent_decode_attention(*inputs[:2], latent, rope, lens, scale=0.2,
                                                           num_splits=splits, cache_leftpad=negative)[0], out[0])


def test_two_cache_tensors_equal_two_views_of_one_buffer():
    *inputs, lens = _setup(H=6, Tq=2, lens=(33, 77))
    separate = [t.contiguous() for t in inputs[2:]]
    assert separate[0].data_ptr() != inputs[2].data_ptr()
    torch.testing.assert_close(ops.latent_decode_attention(*inputs[:2], *separate, lens, scale=0.2, num_splits=2),
                               ops.latent_decode_attention(*inputs, lens, scale=0.2, num_splits=2), rtol=0, atol=0)


def test_compile_fullgraph_matches_eager():
    *inputs, lens = _setup()

    def step(q_latent, q_rope, latent_cache, rope_cache, lens):
        return ops.latent_decode_attention(q_latent, q_rope, latent_cache, rope_cache, lens + 0, scale=0.3,
                                           num_splits=2, cache_leftpad=lens // 4)

    eager = step(*inputs, lens)
    compiled = torch.compile(step, fullgraph=True)(*inputs, lens)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def _bad(case):
    q_latent, q_rope, latent_cache, rope_cache, lens = _setup()
    kwargs = dict(scale=0.2)
    if case == "rows":
        q_latent, q_rope = q_latent.expand(2, 4, 17, 32), q_rope.expand(2, 4, 17, 16)
    elif case == "latent":
        q_latent, latent_cache = torch.zeros(2, 4, 1, 520, device=DEVICE), torch.zeros(2, 100, 520, device=DEVICE)
    elif case == "rope-shape":
        q_rope = q_rope[:, :3]
    elif case == "cache-width":
        latent_cache = latent_cache[..., :24]
    elif case == "cache-batch":
        rope_cache = rope_cache[:1]
    elif case == "cache-slots":
        rope_cache = rope_cache[:, :99]
    elif case == "dtype":
        rope_cache = rope_cache.half()
    elif case == "last-stride":
        latent_cache = latent_cache.transpose(1, 2).contiguous().transpose(1, 2)
    elif case == "lengths":
        lens = lens.long()
    elif case == "leftpad":
        kwargs["cache_leftpad"] = lens[:1]
    elif case == "scale":
        kwargs = dict(scale=float("nan"))
    elif case == "splits":
        kwargs["num_splits"] = 33
    elif case == "outputs":  # (stride-0 heads: the inputs are tiny, the outputs would not be)
        q_latent = torch.zeros(2, 1, 1, 512, device=DEVICE).expand(2, 8192, 16, 512)
        q_rope = torch.zeros(2, 1, 1, 16, device=DEVICE).expand(2, 8192, 16, 16)
        latent_cache = latent_cache.new_zeros(2, 100, 512)
        kwargs["num_splits"] = 32
    elif case == "grad":
        q_latent = q_latent.requires_grad_()
    return (q_latent, q_rope, latent_cache, rope_cache, lens), kwargs


@pytest.mark.parametrize("case, error, match", [
    ("rows", ValueError, "q_latent has 17 query rows"),
    ("latent", ValueError, "q_latent has 520 latent dims; accepted: 1 to 512"),
    ("rope-shape", ValueError, r"q_rope has shape \(2, 3, 1, 16\); accepted: \(2, 4, 1, P\)"),
    ("cache-width", ValueError, r"latent_cache has shape \(2, 100, 24\); accepted: \(2, 100, 32\)"),
    ("cache-batch", ValueError, r"rope_cache has shape \(1, 100, 16\); accepted: \(2, 100, 16\)"),
    ("cache-slots", ValueError, r"rope_cache has shape \(2, 99, 16\); accepted: \(2, 100, 16\)"),
    ("dtype", TypeError, "rope_cache"),
    ("last-stride", ValueError, "latent_cache"),
    ("lengths", TypeError, "cache_seqlens has dtype torch.int64"),
    ("leftpad", ValueError, r"cache_leftpad has shape \(1,\); accepted: \(2,\)"),
    ("scale", ValueError, "scale must be a finite float"),
    ("splits", ValueError, "num_splits must be None or an int in"),
    ("outputs", ValueError, r"with 32 splits needs per-sequence outputs past the kernel's int32 offsets"),
    ("grad", ValueError, "forward-only .* q_latent requires grad"),
])
def test_bad_input_is_refused_naming_the_argument(case, error, match):
    args, kwargs = _bad(case)
    with pytest.raises(error, match=match):
        ops.latent_decode_attention(*args, **kwargs)


def test_scale_is_required():
    *inputs, lens = _setup()
    with pytest.raises(TypeError, match="scale"):
        ops.latent_decode_attention(*inputs, lens)
