"""A patched HF multi-head latent attention model (DeepSeek-V3/V2, GLM-4.7-Flash, Mistral 4,
MiniCPM3) decodes over its cached latents (fastllama/latent_attention.py): the same tokens as HF,
the latent kernel doing the decode steps, and HF's expansion everywhere else."""
import threading

import pytest
import torch

import fastllama
from fastllama import latent_attention, ops
from fastllama.attention import FALLBACKS
from fastllama.forwards import _hf_cache_name
from test_patch import ARCHS, build, ids

LATENT_ARCHS = ["deepseek-v3-mla", "deepseek-v2-mla", "glm4-moe-lite-mla", "mistral4-mla", "minicpm3-mla"]


@pytest.fixture
def latent_calls(monkeypatch):
    """Each ``ops.latent_decode_attention`` call's (query rows, cache slots, left-padded?)."""
    calls, op = [], ops.latent_decode_attention

    def spy(*args, **kwargs):
        calls.append((args[0].shape[2], args[2].shape[1], kwargs.get("cache_leftpad") is not None))
        return op(*args, **kwargs)

    monkeypatch.setattr(ops, "latent_decode_attention", spy)
    return calls


def _padded_prompts(seq: int):
    x = ids(batch=3, seq=seq)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return x.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("arch", LATENT_ARCHS)
def test_left_padded_generation_decodes_over_the_latents(arch, cache, latent_calls):
    """fp32, three left-padded prompts of 20 slots: HF's greedy tokens and its scores to 1e-4,
    every decode step of every layer on the latent kernel (left pads passed), the prefill (20
    tokens) expanded as HF does, nothing falling back to SDPA."""
    model = build(arch).eval()
    x, mask = _padded_prompts(seq=20)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
              cache_implementation=cache, output_scores=True, return_dict_in_generate=True)
    expected = model.generate(x, **kw)
    fastllama.patch(model)
    FALLBACKS.clear()
    got = model.generate(x, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.scores, expected.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    layers = model.config.num_hidden_layers
    slots = 25 if cache == "static" else None  # (a static cache: 20 + 6 - 1 slots; a dynamic one grows)
    assert latent_calls == [(1, slots or 21 + i, True) for i in range(5) for _ in range(layers)]
    assert not FALLBACKS, FALLBACKS
    assert not any("_fastllama_latent_forwards" in m.__dict__ or "expand_kv" in m.__dict__ for m in model.modules())
    assert not latent_attention._thread_state().pending


def test_short_prompts_and_unpadded_batches_take_the_latent_kernel_too(latent_calls):
    """A prefill of up to 16 tokens runs on the latent kernel too, left-padded (its padding
    queries see no key) or not (no mask: every cached key, no left pads)."""
    model = build("deepseek-v3-mla").eval()
    x, mask = _padded_prompts(seq=9)
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(x, attention_mask=mask, **kw)
    unpadded = model.generate(x[1:2], **kw)
    fastllama.patch(model)
    assert torch.equal(model.generate(x, attention_mask=mask, **kw), expected)
    assert [c[0] for c in latent_calls[::2]] == [9, 1, 1, 1] and all(c[2] for c in latent_calls)
    latent_calls.clear()
    assert torch.equal(model.generate(x[1:2], **kw), unpadded)
    assert latent_calls == [(9, 9, False)] * 2 + [(1, 10 + i, False) for i in range(3) for _ in range(2)]


def test_training_and_other_attention_implementations_expand_as_hf_does(latent_calls):
    """Nothing that needs gradients runs on the forward-only kernel: a training step's loss and
    gradients equal the unpatched model's; with the attention implementation switched back to
    SDPA after patching, the stand-ins are never made (the tokens stay HF's)."""
    model = build("deepseek-v3-mla").train()
    x = ids(batch=2, seq=12)
    reference = build("deepseek-v3-mla").train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    fastllama.patch(model, cross_entropy=False)
    model.zero_grad()
    patched_loss = model(input_ids=x, labels=x).loss
    patched_loss.backward()
    reference(input_ids=x, labels=x).loss.backward()
    torch.testing.assert_close(patched_loss, loss, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not latent_calls
    model.eval()
    kw = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = model.generate(x, **kw)
    assert latent_calls
    latent_calls.clear()
    model.set_attn_implementation("sdpa")
    assert torch.equal(model.generate(x, **kw), expected) and not latent_calls


@pytest.mark.parametrize("change", ["hook", "forward"])
def test_a_kv_b_proj_that_computes_more_than_its_weight_is_expanded(change, latent_calls):
    """The absorbed products read kv_b_proj's weight: a forward hook on it (a LoRA's delta, say)
    or a forward set on the instance would be left out, so those steps expand through the module
    as HF does (the tokens stay HF's), and no step runs on the latent kernel."""
    model = build("deepseek-v2-mla").eval()
    x = ids(batch=2, seq=6)
    for layer in model.model.layers:
        proj = layer.self_attn.kv_b_proj
        if change == "hook":
            proj.register_forward_hook(lambda module, args, out: out * 1.5)
        else:
            proj.forward = lambda h, proj=proj: torch.nn.functional.linear(h, proj.weight) * 1.5
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    expected = model.generate(x, **kw)
    fastllama.patch(model)
    got = model.generate(x, **kw)
    assert torch.equal(got.sequences, expected.sequences) and not latent_calls
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_query_that_needs_gradients_is_never_sent_to_the_forward_only_kernel(latent_calls):
    """Only q_proj trainable (a LoRA on q, say), a 12-token sequence: layer 0's latents need no
    gradient, its query does; the step expands as HF does (loss and gradients HF's)."""
    model, reference = build("deepseek-v2-mla").train(), build("deepseek-v2-mla").train()
    for m in (model, reference):
        for name, p in m.named_parameters():
            p.requires_grad_(".q_proj." in name)
    fastllama.patch(model, cross_entropy=False)
    x = ids(batch=2, seq=12)
    loss, expected = model(input_ids=x, labels=x).loss, reference(input_ids=x, labels=x).loss
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = [(p.grad, q.grad) for p, q in zip(model.parameters(), reference.parameters()) if p.requires_grad]
    assert grads and not latent_calls
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_autocast_and_non_causal_attention_are_expanded_as_hf_does(latent_calls):
    """Under autocast the products would run in another dtype than the kernel's inputs; a module
    made bidirectional (is_causal=False, an encoder's use) is not what the causal kernel computes:
    both expand, and give what the unpatched model gives."""
    model, reference = build("minicpm3-mla").eval(), build("minicpm3-mla").eval()
    fastllama.patch(model)
    x = ids(batch=2, seq=10)
    with torch.no_grad():
        truth = reference(x).logits
        with torch.autocast(x.device.type, dtype=torch.bfloat16):  # (DESIGN.md's rule against fp32)
            error, hf_error = ((m(x).logits.float() - truth).abs().max() for m in (model, reference))
    assert error <= 2 * hf_error, (error, hf_error)
    for m in (model, reference):
        for layer in m.model.layers:
            layer.self_attn.is_causal = False
    with torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, reference(x, use_cache=False).logits,
                                   rtol=1e-4, atol=1e-5)
    assert not latent_calls


def test_a_forward_in_another_thread_between_a_deferral_and_its_attention(monkeypatch):
    """Two threads running one patched model: thread B's whole forward runs after thread A's
    layer-0 expand_kv deferred and before A's attention took its latents. Each thread keeps its
    own: both outputs are the unpatched model's, and nothing is left on the modules."""
    model, reference = build("deepseek-v3-mla").eval(), build("deepseek-v3-mla").eval()
    fastllama.patch(model)
    x, y = ids(batch=2, seq=6, seed=1), ids(batch=2, seq=6, seed=2)
    take, other = latent_attention.take_latents, {}

    def take_after_another_forward(attn, key):
        if not other:
            other["thread"] = threading.Thread(target=lambda: other.update(out=model(y).logits))
            other["thread"].start()
            other["thread"].join()
        return take(attn, key)

    monkeypatch.setattr(latent_attention, "take_latents", take_after_another_forward)
    with torch.no_grad():
        out = model(x).logits
        torch.testing.assert_close(out, reference(x).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(other["out"], reference(y).logits, rtol=1e-4, atol=1e-5)
    assert not any("_fastllama_latent_forwards" in m.__dict__ or "expand_kv" in m.__dict__ for m in model.modules())


def test_bf16_decode_steps_are_as_close_to_fp32_as_hf_bf16():
    """DESIGN.md's rule on the decode steps' logits (teacher-forced: a 20-token prompt, then 4
    tokens one at a time through the cache): the patched bf16 model's error against the fp32
    model is within 2x HF bf16's own (at least 1 bf16 ulp of the logits' scale)."""
    x = ids(batch=2, seq=24, seed=3)

    def step_logits(model):
        with torch.no_grad():
            out = model(input_ids=x[:, :20], use_cache=True)
            logits, cache = [], _hf_cache_name()  # (past_key_values before transformers 5.2x)
            for t in range(20, 24):
                out = model(input_ids=x[:, t:t + 1], **{cache: getattr(out, cache)}, use_cache=True)
                logits.append(out.logits.float())
        return torch.cat(logits, dim=1)

    truth = step_logits(build("deepseek-v3-mla").eval())
    hf_error = (step_logits(build("deepseek-v3-mla", torch.bfloat16).eval()) - truth).abs().max()
    patched = fastllama.patch(build("deepseek-v3-mla", torch.bfloat16).eval())
    error = (step_logits(patched) - truth).abs().max()
    assert error <= 2 * max(hf_error, truth.abs().max() * 2 ** -8), (error, hf_error)


def test_patch_summary_names_the_latent_attention_and_unpatch_restores_it():
    model = build("glm4-moe-lite-mla").eval()
    x = ids(batch=1, seq=5)
    before = model(x).logits
    fastllama.patch(model)
    rows = [(cls, status) for _, cls, _, status in model.__dict__["_fastllama_patch"].summary
            if cls.endswith("Attention")]
    assert rows == [("Glm4MoeLiteAttention", "patched")] * model.config.num_hidden_layers
    fastllama.unpatch(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(model(x).logits, before)


def test_a_latent_attention_whose_model_attention_stays_hf_is_reported_skipped():
    """v heads wider than q/k's: the attention kernels refuse the model (its attention stays
    HF's), so its latent attention modules are reported skipped, with the reason, not patched."""
    cfg_cls, model_cls, kw = ARCHS["deepseek-v2-mla"]
    model = model_cls(cfg_cls(**dict(kw, v_head_dim=64), attn_implementation="sdpa")).eval()
    fastllama.patch(model)
    rows = [status for _, cls, _, status in model.__dict__["_fastllama_patch"].summary if cls.endswith("Attention")]
    assert rows and all(r.startswith("skipped: v_head_dim=64 is above q/k's head dim") for r in rows), rows
    assert model.config._attn_implementation == "sdpa"

