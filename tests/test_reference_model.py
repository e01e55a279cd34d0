"""The reference Llama matches Hugging Face and generates sensibly."""
import pytest
import torch

from fastllama.hf_parity import TINY_CONFIGS, compare_with_hf
from fastllama.reference import Llama, LlamaConfig
from fastllama.reference.model import sample


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_same_logits_and_greedy_tokens_as_hf(name):
    result = compare_with_hf(name, TINY_CONFIGS[name])
    assert result.new_tokens == 20
    assert result.max_logit_diff <= 1e-5, result
    assert result.tokens_equal, result


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(TINY_CONFIGS["gqa4-untied"], **kw)
    return Llama(cfg).eval()


def test_left_padded_batch_generates_like_single_prompts():
    model = _tiny()
    prompts = [torch.tensor([5, 9, 17, 33, 2 + 40]), torch.tensor([7, 8]), torch.tensor([11, 12, 13])]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batch = model.generate(ids, max_new_tokens=8, attention_mask=mask, stop_tokens=[])
    for i, p in enumerate(prompts):
        single = model.generate(p[None], max_new_tokens=8, stop_tokens=[])
        assert torch.equal(batch[i, width:], single[0, len(p):])


def test_cache_decoding_matches_full_forward():
    model = _tiny()
    ids = torch.randint(3, 263, (2, 12))
    full = model(ids)
    model.setup_caches(2, 12)
    part = torch.cat([model(ids[:, :9], cache_start=0), model(ids[:, 9:10], cache_start=9),
                      model(ids[:, 10:], cache_start=10)], dim=1)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_stop_tokens_pad_finished_sequences():
    model = _tiny()
    ids = torch.randint(3, 263, (2, 4))
    greedy = model.generate(ids, max_new_tokens=6, stop_tokens=[])
    first = int(greedy[0, 4])
    out = model.generate(ids, max_new_tokens=6, stop_tokens=[first], pad_token_id=0)
    assert out[0, 4] == first and (out[0, 5:] == 0).all()


def test_finished_rows_repeat_eos_without_a_pad_token():
    """As HF's generate: with no pad token, finished sequences are filled with the (first) eos."""
    model = _tiny()
    ids = torch.randint(3, 263, (2, 4))
    first = int(model.generate(ids, max_new_tokens=1, stop_tokens=[])[0, 4])
    model.config.eos_token_id, model.config.pad_token_id = [first, 7], None
    out = model.generate(ids, max_new_tokens=5)
    assert out[0, 4] == first and (out[0, 5:] == first).all()


def test_explicit_null_special_tokens_stay_none():
    """transformers writes "eos_token_id": null when a model has none; that is not "missing" (it
    used to become the default 2, and generation stopped on token 2)."""
    cfg = LlamaConfig.from_hf(dict(TINY_CONFIGS["gqa4-untied"], eos_token_id=None, bos_token_id=None))
    assert cfg.eos_token_id is None and cfg.bos_token_id is None
    assert cfg.to_hf()["eos_token_id"] is None
    missing = {k: v for k, v in TINY_CONFIGS["gqa4-untied"].items() if k not in ("eos_token_id", "bos_token_id")}
    assert (LlamaConfig.from_hf(missing).bos_token_id, LlamaConfig.from_hf(missing).eos_token_id) == (1, 2)


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5]])
    assert sample(logits).item() == 1
    assert sample(logits, temperature=1.0, top_k=1).item() == 1
    assert sample(logits, temperature=1.0, top_p=0.01).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    model = _tiny()
    ids = torch.randint(3, 263, (1, 4))
    a = model.generate(ids, 10, temperature=0.8, top_p=0.9, generator=g1, stop_tokens=[])
    b = model.generate(ids, 10, temperature=0.8, top_p=0.9, generator=g2, stop_tokens=[])
    assert torch.equal(a, b)


def test_loss_with_labels_matches_shifted_cross_entropy():
    model = _tiny()
    ids = torch.randint(3, 263, (2, 9))
    logits, loss = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("bad,match", [
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)), "yarn"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="gpt2"), "model_type"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_unsupported_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(dict(TINY_CONFIGS["gqa4-untied"], **bad))


def test_generate_rejects_bad_arguments():
    model = _tiny()
    ids = torch.randint(3, 263, (1, 4))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, 2, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, 2, temperature=-1.0)


def test_pad_token_row_of_the_embedding_gets_no_gradient_as_in_hf():
    torch.manual_seed(0)
    model = Llama(dict(TINY_CONFIGS["gqa4-untied"], pad_token_id=0))
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    model(ids, attention_mask=(ids != 0).long(), labels=ids)[1].backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad[0].abs().max() == 0 and grad[5].abs().max() > 0


@pytest.mark.parametrize("same", [dict(hidden_act="swish"), dict(pretraining_tp=2)])
def test_config_keys_that_change_nothing_in_hf_are_accepted(same):
    # swish is silu; pretraining_tp > 1 only sliced HF's old matmuls (the same function)
    LlamaConfig.from_hf(dict(TINY_CONFIGS["gqa4-untied"], **same))


def test_a_rope_type_without_its_parameters_is_named():
    with pytest.raises(ValueError, match="needs low_freq_factor, high_freq_factor"):
        LlamaConfig.from_hf(dict(TINY_CONFIGS["gqa4-untied"], rope_scaling=dict(rope_type="llama3", factor=8.0)))


def test_config_defaults_are_transformers_defaults():
    """A config.json that leaves a key out must mean what it means for transformers."""
    import transformers

    ours = LlamaConfig.from_hf({"model_type": "llama"})
    hf = transformers.LlamaConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "rms_norm_eps", "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, key) == getattr(hf, key), key
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]
