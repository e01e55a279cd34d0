"""The functional references agree with the Hugging Face / PyTorch code they stand in for."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig as HFConfig
from transformers.models.llama import modeling_llama as hf

from fastllama import reference as ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_bitwise_equal_to_hf(dtype):
    torch.manual_seed(0)
    norm = hf.LlamaRMSNorm(259, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(259).to(dtype)
    x = torch.randn(3, 7, 259).to(dtype)
    assert torch.equal(ref.rms_norm(x, norm.weight, 1e-5), norm(x))


def test_rms_norm_residual_returns_sum():
    x, r, w = torch.randn(4, 33), torch.randn(4, 33), torch.randn(33)
    y, s = ref.rms_norm(x, w, residual=r)
    assert torch.equal(s, x + r)
    assert torch.equal(y, ref.rms_norm(x + r, w))


@pytest.mark.parametrize("rope", [None, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=32),
                                  dict(rope_type="linear", factor=2.0)])
def test_rope_cos_sin_and_rotation_equal_hf(rope):
    cfg = HFConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_theta=50000.0, rope_scaling=rope,
                   max_position_embeddings=256)
    rotary = hf.LlamaRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 2, 40, 100, 255], [5, 6, 7, 8, 9, 10]])
    x = torch.randn(2, 6, 64)
    cos_hf, sin_hf = rotary(x, pos)
    params = dict(rope or {})
    rope_type = params.pop("rope_type", "default")
    inv_freq = ref.rope_inv_freq(32, 50000.0, rope_type, **params)
    torch.testing.assert_close(inv_freq, rotary.inv_freq, rtol=0, atol=0)
    cos, sin = ref.rope_cos_sin(pos, inv_freq)
    torch.testing.assert_close(cos, cos_hf, rtol=0, atol=0)
    torch.testing.assert_close(sin, sin_hf, rtol=0, atol=0)
    q, k = torch.randn(2, 2, 6, 32), torch.randn(2, 1, 6, 32)
    for a, b in zip(ref.apply_rotary_pos_emb(q, k, cos, sin), hf.apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(a, b)


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="yarn"):
        ref.rope_inv_freq(64, rope_type="yarn", factor=2.0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 1), (8, 2)])
def test_attention_matches_sdpa(causal, hq, hk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, hq, 37, 16), torch.randn(2, hk, 37, 16), torch.randn(2, hk, 37, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    torch.testing.assert_close(ref.attention(q, k, v, causal=causal), expected, rtol=1e-5, atol=1e-5)


def test_attention_bottom_right_causal_alignment():
    """Tq < Tk: the queries are the last Tq positions (KV cache / chunked prefill)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mask = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=12 - 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ref.attention(q, k, v, causal=True), expected)
    # ...which differs from SDPA's top-left `is_causal` whenever Tq != Tk
    assert not torch.allclose(ref.attention(q, k, v, causal=True),
                              F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_attention_window_and_padding_and_fully_masked_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    pad = torch.ones(2, 10, dtype=torch.bool)
    pad[1, :4] = False  # left padding of sequence 1
    out, lse = ref.attention(q, k, v, causal=True, window=(3, 0), key_padding_mask=pad, return_lse=True)
    i, j = torch.arange(10)[:, None], torch.arange(10)[None]
    mask = (j <= i) & (j >= i - 3)
    expected = F.scaled_dot_product_attention(q[:1], k[:1], v[:1], attn_mask=mask)
    torch.testing.assert_close(out[:1], expected)
    assert torch.isfinite(out).all()
    assert (out[1, :, :4] == 0).all() and torch.isneginf(lse[1, :, :4]).all()  # rows with no key


def test_cross_entropy_mean_ignores_and_all_ignored_is_zero():
    logits, labels = torch.randn(6, 11), torch.tensor([1, -100, 3, 4, -100, 10])
    torch.testing.assert_close(ref.cross_entropy(logits, labels), F.cross_entropy(logits, labels))
    torch.testing.assert_close(ref.cross_entropy(logits, labels, reduction="sum"),
                               F.cross_entropy(logits, labels, reduction="sum"))
    torch.testing.assert_close(ref.cross_entropy(logits, labels, num_items_in_batch=10),
                               F.cross_entropy(logits, labels, reduction="sum") / 10)
    assert ref.cross_entropy(logits, torch.full((6,), -100)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        ref.cross_entropy(logits, labels, reduction="avg")


@pytest.mark.parametrize("kind", ["causal-gqa", "window-tq<tk", "varlen-lse"])
def test_flash_backward_formulation_equals_autograd_in_float64(kind):
    """attention(flash_backward=True) is a second "PyTorch in the same dtype" for the parity
    harness; a wrong formula would silently loosen every flash-attention gradient check, so in
    float64 its gradients must equal autograd's."""
    from fastllama.reference.functional import attention_varlen

    torch.manual_seed(0)
    Tq, Tk = (9, 13) if kind == "window-tq<tk" else (13, 13)
    q = torch.randn(1, 4, Tq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, Tk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    if kind == "varlen-lse":
        cu = torch.tensor([0, 0, 1, 6, 13], dtype=torch.int32)
        fn = lambda flash: attention_varlen(q, k, v, cu, return_lse=True, flash_backward=flash)  # noqa: E731
    else:
        window = (3, 1) if kind == "window-tq<tk" else None
        fn = lambda flash: ref.attention(q, k, v, window=window, return_lse=True,  # noqa: E731
                                               flash_backward=flash)
    grads = []
    for flash in (False, True):
        out, lse = fn(flash)
        g_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        g_lse = torch.randn(lse.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        # fully masked rows have lse -inf: their lse gradient must not reach anything
        grads.append(torch.autograd.grad((out, lse), (q, k, v), (g_out, g_lse.masked_fill(lse.isinf(), 0))))
        assert torch.isfinite(out).all()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
