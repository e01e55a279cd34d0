"""fastllama.generate against the reference model: greedy tokens, KV-cache contents, sampling,
stop tokens, streaming, and the ``fastllama generate`` CLI on a tiny checkpoint."""
import contextlib
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from conftest import DEVICE, INTERPRETER
import fastllama
from fastllama import ops
from fastllama.cli import main
from fastllama.generate import Generator, TextStreamer, generate, sample_logits
from fastllama.reference import Llama, LlamaConfig

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"


def _tiny_model(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return Llama(LlamaConfig(**cfg)).to(DEVICE).eval()


def _left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


@pytest.mark.parametrize("lengths", [(5, 16, 11), (23, 41, 17)], ids=["decode-kernel-prefill", "flash-prefill"])
def test_greedy_tokens_equal_the_reference_batch_of_three(model, lengths):
    """Three prompts of different lengths (left-padded for the reference, unpadded in the fast
    cache); one sequence hits a stop token early and is then padded, as in the reference.
    Prompts up to 16 tokens are prefilled by the decode kernel, longer ones by flash attention."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]
    ids, mask = _left_padded(prompts)
    free = model.generate(ids, 8, attention_mask=mask, stop_tokens=[])
    stop = int(free[1, ids.shape[1] + 2])  # sequence 1 stops at its third new token
    expected = model.generate(ids, 8, attention_mask=mask, stop_tokens=[stop], pad_token_id=0)
    got = generate(model, ids, 8, attention_mask=mask, stop_tokens=[stop], pad_token_id=0)
    assert torch.equal(got, expected), f"\nfast:\n{got}\nreference:\n{expected}"
    assert (got[1, ids.shape[1] + 3:] == 0).all()


def test_cache_after_77_token_prompt_and_5_steps_equals_the_reference(model):
    """Prefill (flash attention, T = 77) then 5 decode steps: every layer's K/V cache slots
    0..81 equal the reference model's KVCache (fp32)."""
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 300, (1, 77), generator=g).to(DEVICE)
    gen = Generator(model, 1, 83)
    out = gen.generate(prompt, 6, stop_tokens=[])
    assert gen.stats.steps == 5 and out.shape == (1, 83)

    model.setup_caches(1, 83)
    try:
        logits = model(prompt, cache_start=0)[:, -1]
        tokens = [logits.argmax(-1)]
        for step in range(5):
            logits = model(tokens[-1][:, None], cache_start=77 + step)[:, -1]
            tokens.append(logits.argmax(-1))
        assert torch.equal(out[0, 77:], torch.stack(tokens, 1)[0])
        for i, cache in enumerate(model.caches):
            torch.testing.assert_close(gen.k_cache[i][:1, :, :82], cache.k[:, :, :82], msg=f"layer {i} keys")
            torch.testing.assert_close(gen.v_cache[i][:1, :, :82], cache.v[:, :, :82], msg=f"layer {i} values")
    finally:
        model.caches = None


def test_lists_streaming_and_reuse(model):
    """List prompts in, lists out (cut after the stop token); the streamer sees every step; a
    reused Generator (second call, different lengths) still matches the reference."""
    gen = Generator(model, 2, 24)
    seen = []

    class Collect:
        def put(self, ids):
            seen.append(list(ids))

        def end(self):
            seen.append("end")

    first = gen.generate([[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], 4, stop_tokens=[], streamer=Collect())
    assert [r[-4:] for r in first] == [list(col) for col in zip(*seen[:-1])] and seen[-1] == "end"
    ids, mask = _left_padded([[40, 41], [50, 51, 52, 53, 54, 55]])
    expected = model.generate(ids, 5, attention_mask=mask, stop_tokens=[])
    assert torch.equal(gen.generate(ids, 5, attention_mask=mask, stop_tokens=[]), expected)
    stop = expected[0, 7].item()
    cut = gen.generate([[40, 41]], 5, stop_tokens=[stop])[0]
    assert cut == [40, 41] + expected[0, 6:8].tolist()
    # stop tokens as a tensor (0-d, or with an id that never comes) or an array: the same ids
    for given in (torch.tensor(stop), torch.tensor([stop, 299]), expected[0, 7:8].numpy()):
        assert gen.generate([[40, 41]], 5, stop_tokens=given)[0] == cut


def test_a_transformers_streamer_is_called_as_hf_generate_calls_it(model):
    """transformers' TextStreamer (prompt first, then each step's ids, as tensors; its
    skip_prompt) prints the text of the prompt and the generated tokens, as under HF's generate."""
    from transformers import TextStreamer as HFTextStreamer

    class Tok:
        def decode(self, ids, **kwargs):
            return "".join(f"<{int(i)}>" for i in ids)

    class Collect(HFTextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            self.pieces = getattr(self, "pieces", []) + [text]

    gen = Generator(model, 1, 16)
    for skip in (False, True):
        for prompt in ([[5, 6, 7]], torch.tensor([[5, 6, 7]], device=DEVICE)):
            streamer = Collect(Tok(), skip_prompt=skip)
            out = gen.generate(prompt, 4, stop_tokens=[], streamer=streamer)
            tokens = out[0] if isinstance(out, list) else out[0].tolist()
            assert "".join(streamer.pieces) == Tok().decode(tokens[3 if skip else 0:]), (skip, streamer.pieces)


def test_sampling_rules_on_device():
    logits = torch.randn(256, 50, generator=torch.Generator().manual_seed(3))
    greedy = logits.argmax(-1)
    assert torch.equal(sample_logits(logits), greedy)
    assert torch.equal(sample_logits(logits, 0.7, top_k=1), greedy)
    assert torch.equal(sample_logits(logits, 1.3, top_p=1e-6), greedy)
    top3 = torch.topk(logits, 3, dim=-1).indices
    picks = sample_logits(logits, 1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert (picks[:, None] == top3).any(-1).all()
    assert not torch.equal(picks, greedy)  # it does sample
    # top_p keeps the smallest prefix of the sorted distribution that reaches p
    probs = logits.softmax(-1)
    sp, order = probs.sort(-1, descending=True)
    keep = ((sp.cumsum(-1) - sp) < 0.5).sum(-1)
    picks = sample_logits(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))
    rank = (order == picks[:, None]).float().argmax(-1)
    assert (rank < keep).all()
    # a tiny temperature is greedy, not NaN (logits / 1e-40 overflowed to inf; argmax of NaN is 0)
    assert torch.equal(sample_logits(logits, 1e-40, generator=torch.Generator().manual_seed(0)), greedy)
    # the empirical distribution follows p (exponential race == categorical)
    row = torch.tensor([[0.0, 1.0, 2.0]]).expand(20000, 3)
    freq = torch.bincount(sample_logits(row, 1.0, generator=torch.Generator().manual_seed(1)), minlength=3) / 20000
    torch.testing.assert_close(freq, row[0].softmax(-1), atol=0.015, rtol=0)


def test_sampled_generation_is_seeded_and_checked(model):
    def run(seed):  # an explicit generator needs the eager loop on CUDA (graphs replay the default one)
        return generate(model, [[5, 6, 7]], 4, temperature=0.8, top_k=20, stop_tokens=[], cuda_graph=False,
                        generator=torch.Generator(device=DEVICE).manual_seed(seed))

    a, b = run(5), run(5)
    assert a == b and len(a[0]) == 7
    gen = Generator(model, 1, 8)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        gen.generate([[1, 2, 3]], 6)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], 2)
    with pytest.raises(ValueError, match="at most 1"):
        gen.generate([[1], [2]], 2)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[1]], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        Generator(_tiny_model(num_hidden_layers=1).cpu(), 1, 4, cuda_graph=True)


def test_text_streamer_emits_increments():
    class Tok:
        def decode(self, ids):
            return "".join(chr(96 + i) for i in ids)

    pieces = []
    s = TextStreamer(Tok(), pieces.append, sequence=1, stop_tokens=[0])
    for ids in ([9, 1], [9, 2], [9, 0], [9, 3]):
        s.put(ids)
    s.end()
    assert pieces == ["a", "b"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_ckpt")
    spm.SentencePieceTrainer.train(
        input=str(CORPUS), model_prefix=str(d / "tokenizer"), vocab_size=300, model_type="bpe",
        character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
    )
    _tiny_model(seed=4).cpu().save_pretrained(d)
    return d


def test_cli_generate_streams_the_reference_text(checkpoint, capsys):
    from fastllama import Tokenizer

    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The keeper counted",
                 "--max-new-tokens", "6", "--device", DEVICE, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    tok = Tokenizer(checkpoint)
    ids = torch.tensor([tok.encode("The keeper counted")], device=DEVICE)
    ref = Llama.from_pretrained(checkpoint, device=DEVICE).generate(ids, 6, stop_tokens=[2])
    # the text of prompt + new tokens, decoded together: decoding the new tokens on their own
    # drops the space a SentencePiece piece carries before its first word
    expected_text = tok.decode(ref[0].tolist())
    assert out.startswith(expected_text), out
    assert "tokens/s" in out and "prefill" in out
    # no decode step to time: said so, not "0.00 tokens/s"
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "The keeper counted",
                 "--max-new-tokens", "1", "--device", DEVICE, "--dtype", "float32"]) == 0
    assert "no decode step" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["Qwen3", "Phi3", "Granite", "Gemma", "Gemma2", "Gemma3", "Olmo3", "Apertus",
                                    "Glm4Moe", "GptOss", "Llama4", "DeepseekV3"])
def test_cli_generate_loads_a_transformers_checkpoint(checkpoint, tmp_path, capsys, family):
    """model_type "qwen3" / "phi3" / "granite" / "gemma" / "gemma2" / "gemma3_text" / "olmo3" /
    "apertus" (xIELU's parameters and buffers) / "glm4_moe" (experts, the router's score bias) /
    "gpt_oss" (attention sinks, experts of its own layout with biases) / "llama4_text" (its experts,
    chunked attention) / "deepseek_v3" (multi-head latent attention, experts)
    (transformers' save_pretrained, the fixture's tokenizer): the CLI loads it with transformers
    and streams the text of HF's own greedy generate."""
    import transformers

    from fastllama import Tokenizer

    (tmp_path / "tokenizer.model").write_bytes((checkpoint / "tokenizer.model").read_bytes())
    torch.manual_seed(0)
    config = {"Gemma3": "Gemma3TextConfig", "Llama4": "Llama4TextConfig"}.get(family, f"{family}Config")
    experts = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                   n_group=1, topk_group=1) if family == "Glm4Moe" else {}
    if family == "GptOss":
        experts = dict(num_local_experts=4, num_experts_per_tok=2)
    if family == "Llama4":
        experts = dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=160, attention_chunk_size=4)
    if family == "DeepseekV3":
        experts = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                       n_group=1, topk_group=1, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8)  # (its rotary width)
    model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, config)(**{
        **dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2, pad_token_id=0), **experts}))
    _nontrivial_weights(model)
    model.save_pretrained(tmp_path)
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "The keeper counted",
                 "--max-new-tokens", "6", "--device", DEVICE, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    tok = Tokenizer(tmp_path)
    ids = torch.tensor([tok.encode("The keeper counted")], device=DEVICE)
    ref = model.to(DEVICE).generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert out.startswith(tok.decode(ref[0].tolist())), out


def test_cli_generate_stops_on_generation_config_eos(checkpoint, tmp_path, capsys):
    """Llama-3 Instruct's <|eot_id|> is an eos only in generation_config.json."""
    import json

    from fastllama import Tokenizer

    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        (tmp_path / f).write_bytes((checkpoint / f).read_bytes())
    tok = Tokenizer(tmp_path)
    ids = torch.tensor([tok.encode("The keeper counted")], device=DEVICE)
    ref = Llama.from_pretrained(tmp_path, device=DEVICE).generate(ids, 6, stop_tokens=[])
    third = int(ref[0, ids.shape[1] + 2])
    assert third not in ref[0, ids.shape[1]:ids.shape[1] + 2].tolist() + [2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, third]}))
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "The keeper counted",
                 "--max-new-tokens", "6", "--device", DEVICE, "--dtype", "float32"]) == 0
    assert "[3 new tokens" in capsys.readouterr().out


def test_cli_generate_rejects_bad_arguments_with_a_message(checkpoint, capsys, tmp_path):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", "--max-new-tokens", "-3"]) == 2
    assert "fastllama generate: error: --max-new-tokens must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(checkpoint / "nowhere"), "--prompt", "hi"]) == 2
    assert "fastllama generate: error:" in capsys.readouterr().err
    # (each was a traceback, a NaN temperature sampled id 0 every step, or an error after the prompt)
    for bad, says in ((["--temperature", "nan"], "--temperature must be >= 0"), (["--top-k", "0"], "--top-k must be"),
                      (["--top-p", "1.5"], "--top-p must be"), (["--device", "tpu"], "is not a device")):
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", *bad]) == 2
        captured = capsys.readouterr()
        assert says in captured.err and captured.out == "", (bad, captured)
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((checkpoint / f).read_bytes())
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--device", DEVICE]) == 2
    assert "is not a sentencepiece model" in capsys.readouterr().err
    # a transformers family whose weights are missing or broken: an error line, not a traceback
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 300}))
    (tmp_path / "model.safetensors").unlink()
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--device", DEVICE]) == 2
    assert "transformers could not load the 'mistral' checkpoint" in capsys.readouterr().err
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00")
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--device", DEVICE]) == 2
    assert "transformers could not load the 'mistral' checkpoint" in capsys.readouterr().err
    # a model type it does not take: named, with the ones it does (it said "supported: 'llama'")
    from fastllama.generate import TRANSFORMERS_MODEL_TYPES

    every_type = ", ".join(sorted(["llama", *TRANSFORMERS_MODEL_TYPES]))  # (sorted: one list, not two orders)
    for model_type, says in (("gpt2", "'gpt2' model, which fastllama generate does not take; supported model "
                                      f"types: {every_type}"),
                             ("gemma3", "the text model alone, model_type 'gemma3_text', is supported")):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--device", DEVICE]) == 2
        assert says in capsys.readouterr().err


def test_streamer_decodes_a_window_not_the_whole_text():
    """Each step decoded prompt + everything generated: 25 ms per token after a 100k-token prompt
    (and inside the timed decode loop). It decodes the unprinted tokens and a little context."""
    lengths = []

    class Tok:
        def decode(self, ids):
            lengths.append(len(ids))
            return "".join(chr(97 + i % 26) for i in ids)

    pieces = []
    s = TextStreamer(Tok(), pieces.append, prompt=list(range(10_000)))
    for t in range(5):
        s.put([t])
    s.end()
    assert "".join(pieces) == "abcde" and max(lengths) < 20, lengths


def test_streamed_text_equals_the_final_decode_with_byte_fallback_after_a_multibyte_prompt(tmp_path):
    """HF's byte fallback decodes a run of byte tokens together: a window starting inside the
    prompt's last character turned the new characters into U+FFFD too ("东京" + "是大的")."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers

    from fastllama.generate import _HFTokenizer

    # Llama-2's layout: byte tokens are ordinary vocabulary entries (not special: those are
    # skipped in decode), characters outside the vocabulary fall back to them
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)),
              *sorted(set(CORPUS.read_text()) - {" ", "\n"} | {"\u2581"})]
    tok = tokenizers.Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>",
                                          byte_fallback=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    wrapped = _HFTokenizer(tmp_path / "tokenizer.json")
    for prompt_text, new_text in (("东京", "是大的"), ("The sea 😀", " and 日本語 keeper")):
        prompt = wrapped.encode(prompt_text)
        ids = wrapped.encode(prompt_text + new_text)
        assert ids[:len(prompt)] == prompt and any(i >= 3 and i < 259 for i in ids)  # byte tokens in play
        pieces = []
        s = TextStreamer(wrapped, pieces.append, prompt=prompt)
        for t in ids[len(prompt):]:
            s.put([t])
        s.end()
        assert wrapped.decode(prompt) + "".join(pieces) == wrapped.decode(ids) == prompt_text + new_text


def test_streamer_takes_the_batch_prompt_of_generate():
    """README: ``streamer=TextStreamer(tok, on_text, prompt=ids)`` with the (B, T) ids given to
    generate (it raised "only one element tensors can be converted"): row ``sequence`` is taken."""
    class Tok:
        def decode(self, ids):
            return "".join(chr(97 + i) for i in ids)

    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    for sequence in (0, 1):
        pieces = []
        s = TextStreamer(Tok(), pieces.append, sequence=sequence, prompt=ids)
        s.put([6, 7])
        assert s.ids == ids[sequence].tolist() + [6 + sequence] and pieces == [chr(97 + 6 + sequence)]
    assert TextStreamer(Tok(), prompt=ids[1]).ids == [3, 4, 5]
    with pytest.raises(ValueError, match=r"prompt must be token ids.*\(2, 3, 1\)"):
        TextStreamer(Tok(), prompt=ids[..., None])


def test_streamer_continues_the_prompt_and_takes_the_calls_stop_tokens(checkpoint):
    from fastllama import Tokenizer

    tok = Tokenizer(checkpoint)
    model = Llama.from_pretrained(checkpoint, device=DEVICE).eval()
    prompts = [tok.encode("The keeper"), tok.encode("counted the")]
    gen = Generator(model, 2, 32)
    first = gen.generate(prompts, 3, stop_tokens=[])
    stop = first[0][len(prompts[0])]  # sequence 0 stops at once; sequence 1 keeps the loop going
    pieces = []
    out = gen.generate(prompts, 5, stop_tokens=[stop], streamer=TextStreamer(tok, pieces.append, prompt=prompts[0]))
    assert out[0] == prompts[0] + [stop]
    assert pieces == []  # nothing after the stop token (pad tokens of later steps are not text)
    pieces = []
    gen.generate(prompts, 3, stop_tokens=[], streamer=TextStreamer(tok, pieces.append, prompt=prompts[0]))
    assert tok.decode(prompts[0]) + "".join(pieces) == tok.decode(first[0])


def test_zero_new_tokens_updates_stats_and_ends_the_stream(model):
    gen = Generator(model, 2, 16)
    gen.generate([[5, 6, 7], [8, 9]], 3, stop_tokens=[])
    ended = []

    class Collect:
        def put(self, ids):
            raise AssertionError("no step runs")

        def end(self):
            ended.append(True)

    assert gen.generate([[5, 6]], 0, streamer=Collect()) == [[5, 6]]
    assert ended == [True] and gen.stats.new_tokens == 0 and gen.stats.batch == 1 and gen.stats.prompt_tokens == 2
    with pytest.raises(TypeError, match="not text"):
        gen.generate(["123"], 2)


def test_finished_sequences_with_an_invalid_pad_id_and_token_counts(model):
    """pad_token_id -1 (padding for Tokenizer.decode): a finished sequence's pad is not fed to
    the embedding (an index error once one of two sequences had stopped); stats count real
    tokens, stop included, pads not."""
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    gen = Generator(model, 2, 16)
    free = gen.generate(prompts, 6, stop_tokens=[])
    stop = free[0][4]  # sequence 0 stops at its second new token
    assert stop not in free[1][4:], "pick prompts whose second sequence does not stop"
    out = gen.generate(prompts, 6, stop_tokens=[stop], pad_token_id=-1)
    assert out == [free[0][:5], free[1]]
    assert gen.stats.new_tokens == 2 + 6
    ids = torch.tensor([[0] + prompts[0], prompts[1]], device=DEVICE)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], device=DEVICE)
    padded = generate(model, ids, 6, attention_mask=mask, stop_tokens=[stop], pad_token_id=-1)
    assert padded[0, 4:].tolist() == free[0][3:5] + [-1] * 4
    # the reference model's own generate too (it fed the pad to its embedding), stop ids as a tensor
    reference = model.generate(ids, 6, attention_mask=mask, stop_tokens=torch.tensor([stop]), pad_token_id=-1)
    assert torch.equal(reference, padded)


def test_a_one_dimensional_prompt_is_refused_before_a_cache_is_built(model, monkeypatch):
    import fastllama.generate as generation

    monkeypatch.setattr(generation, "Generator", lambda *a, **k: pytest.fail("a cache was sized from a 1-D shape"))
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        generate(model, torch.arange(3, 40, device=DEVICE), 4)


@pytest.mark.skipif(not INTERPRETER, reason="bfloat16 is refused only under the Triton interpreter")
def test_cli_refuses_bfloat16_under_the_interpreter(checkpoint, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "hi", "--dtype", "bfloat16"]) == 2
    assert "--dtype bfloat16 needs a GPU" in capsys.readouterr().err


# GPU-only paths (real CUDA graphs) run in gpu_check.sh's first test stage: skipif, not cuda_only
# (that marker is for the slow shape matrix, which runs last).
@pytest.mark.skipif(INTERPRETER, reason="real CUDA graphs need a GPU")
def test_cuda_graph_replay_matches_eager_and_reference(model):
    """The captured decode step (replayed from static buffers) gives the eager loop's tokens,
    for two calls of different prompt lengths on one Generator (one capture, reused)."""
    graph, eager = Generator(model, 3, 64, cuda_graph=True), Generator(model, 3, 64, cuda_graph=False)
    for lens in ((5, 30, 17), (9, 2, 40)):
        prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(lens)]
        a = graph.generate(prompts, 12, stop_tokens=[])
        assert graph.stats.cuda_graph and len(graph._states) == 1
        assert a == eager.generate(prompts, 12, stop_tokens=[])
        ids, mask = _left_padded(prompts)
        ref = model.generate(ids, 12, attention_mask=mask, stop_tokens=[])
        assert [r[-12:] for r in a] == ref[:, -12:].tolist()


class _FakeCudaGraphs:
    """Stand-ins for torch.cuda's streams and graphs, so the CUDA-graph branch of Generator runs
    on the CPU: a "capture" executes the step once (as a real capture records it), then restores
    every buffer and the RNG state (a real capture computes nothing and draws nothing); a replay
    runs the recorded Python step again. ``fail`` makes the next capture raise. A model the fused
    decode step serves has both steps captured (``fused_decode=None``); their timings stand in
    as equal (the cuBLAS step is kept; tests/test_fused_decode.py scripts them)."""

    def __init__(self, monkeypatch):
        self.captures, self.fail, self.current, self.capture_streams = 0, False, None, []
        for name, value in (("Stream", _FakeStream), ("stream", lambda s: contextlib.nullcontext()),
                            ("current_stream", lambda *a: self), ("CUDAGraph", _FakeGraph),
                            ("graph", self.graph)):
            monkeypatch.setattr(torch.cuda, name, value)
        original = Generator._capture_step

        def capture(gen, st):
            self.current = (gen, st)
            return original(gen, st)

        monkeypatch.setattr(Generator, "_capture_step", capture)
        monkeypatch.setattr(Generator, "_replay_ms", lambda gen, st: 1.0)

    def wait_stream(self, other):
        pass

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        self.capture_streams.append(stream)
        if self.fail:
            self.fail = False
            raise RuntimeError("capture failed")
        gen, st = self.current
        buffers = (*gen.k_cache, *gen.v_cache, st.token, st.seqlens, st.done)
        saved, rng = [t.clone() for t in buffers], torch.get_rng_state()
        yield
        for t, v in zip(buffers, saved):
            t.copy_(v)
        torch.set_rng_state(rng)
        graph.step, graph.state, graph.fused = (lambda: gen._step(st)), st, st.fused
        self.captures += 1


class _FakeStream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        pass


class _FakeGraph:
    def replay(self):
        # (the step recorded reads st.fused when it runs; a real graph runs the step it captured)
        assert self.state.fused == self.fused, "replaying a graph captured for the other decode step"
        self.step()


def test_cuda_graph_branch_with_stand_in_graphs(model, monkeypatch):
    """The CUDA-graph branch on the CPU (stand-in graphs, see _FakeCudaGraphs): greedy tokens
    equal the eager loop's; one capture per (batch, sampling) key and none for a single new token;
    sampling under one torch.manual_seed gives the same tokens on the call that captures as on
    later calls (the warm-up draws from its own generator); a failed capture is retried on the
    next call, never silently replaced by the eager loop. (Two captures per key: the cuBLAS step
    and the fused one, see test_fused_decode.)"""
    fake = _FakeCudaGraphs(monkeypatch)
    eager, graph = Generator(model, 3, 64), Generator(model, 3, 64)
    graph.cuda_graph = True  # the constructor refuses it for a CPU model; the stand-ins make it run
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3]]
    assert graph.generate(prompts, 1, stop_tokens=[]) == eager.generate(prompts, 1, stop_tokens=[])
    assert fake.captures == 0 and not graph.stats.cuda_graph
    assert graph.generate(prompts, 6, stop_tokens=[]) == eager.generate(prompts, 6, stop_tokens=[])
    assert fake.captures == 2 and graph.stats.cuda_graph
    # captured on a stream of the model's device (torch's default capture stream is made on
    # whichever GPU was current at the process's first capture: empty graphs on any other GPU)
    assert isinstance(fake.capture_streams[-1], _FakeStream) and fake.capture_streams[-1].device == graph.device

    sampled = []
    for _ in range(2):
        torch.manual_seed(123)
        sampled.append(graph.generate([[5, 6, 7]] * 3, 6, temperature=1.0, stop_tokens=[]))
    torch.manual_seed(123)
    assert sampled[0] == sampled[1] == eager.generate([[5, 6, 7]] * 3, 6, temperature=1.0, stop_tokens=[])
    assert fake.captures == 4

    fake.fail = True
    with pytest.raises(RuntimeError, match="capture failed"):
        graph.generate([[5, 6]], 4, stop_tokens=[])
    assert graph.generate([[5, 6]], 4, stop_tokens=[]) == eager.generate([[5, 6]], 4, stop_tokens=[])
    assert fake.captures == 6 and graph.stats.cuda_graph


def test_cli_generate_uses_tokenizer_json_when_present(checkpoint, tmp_path, capsys):
    """A checkpoint with a tokenizer.json (HF `tokenizers`) and no sentencepiece model."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train([str(CORPUS)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((checkpoint / f).read_bytes())
    tok.save(str(tmp_path / "tokenizer.json"))

    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "The sea", "--max-new-tokens", "4",
                 "--device", DEVICE, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode("The sea").ids
    assert ids[0] == 1
    ref = Llama.from_pretrained(tmp_path, device=DEVICE).generate(torch.tensor([ids], device=DEVICE), 4,
                                                                  stop_tokens=[2])
    assert out.startswith(tok.decode(ref[0].tolist(), skip_special_tokens=True)), out  # (prompt + new, as above)
    assert out.startswith("The sea ")  # this model's first new piece starts a word: its space survives


def test_fused_projections_share_the_models_weights_and_follow_them(tmp_path):
    """q/k/v and gate/up run as one GEMM each over a buffer the parameters become views of: the
    model's values and Parameter objects are unchanged, a second Generator adopts the layout
    without copying, writes to the weights (even through ``.data``, which autograd's version
    counters miss) are seen by the next call, a re-pointed parameter is laid out again, moving
    the model to another dtype is an error, and the model still saves and loads."""
    model = _tiny_model(seed=3, attention_bias=True, mlp_bias=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40))]

    def reference_tokens():
        ids, mask = _left_padded(prompts)
        return model.generate(ids, 6, attention_mask=mask, stop_tokens=[])[:, ids.shape[1]:].tolist()

    gen = Generator(model, 2, 64)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    qkv, gate_up = gen._projections[1]
    assert qkv.weight.shape == (64 + 32 + 32, 64) and gate_up.bias.shape == (2 * 160,)
    assert attn.v_proj.weight.data_ptr() == qkv.weight[96:].data_ptr()
    assert mlp.up_proj.bias.data_ptr() == gate_up.bias[160:].data_ptr()
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    unfused = Generator(model, 2, 64, fuse_projections=False)
    assert unfused._projections == []
    expected = reference_tokens()
    assert [g[5:] for g in gen.generate(prompts[:1], 6, stop_tokens=[])] == [expected[0]]
    assert [p[len(q):] for p, q in zip(gen.generate(prompts, 6, stop_tokens=[]), prompts)] == expected
    assert unfused.generate(prompts, 6, stop_tokens=[]) == gen.generate(prompts, 6, stop_tokens=[])

    again = Generator(model, 2, 64)
    assert again._projections[1][0].weight.data_ptr() == qkv.weight.data_ptr()  # adopted, not copied

    with torch.no_grad():
        attn.k_proj.weight.data.mul_(-1.5)  # lands in the fused buffer
        mlp.gate_proj.bias.add_(0.5)
    changed = reference_tokens()
    assert changed != expected
    assert [p[len(q):] for p, q in zip(gen.generate(prompts, 6, stop_tokens=[]), prompts)] == changed

    mlp.up_proj.weight.data = torch.randn_like(mlp.up_proj.weight)  # re-pointed: laid out again
    assert not gate_up.intact()
    repointed = reference_tokens()
    assert [p[len(q):] for p, q in zip(gen.generate(prompts, 6, stop_tokens=[]), prompts)] == repointed
    assert gen._projections[1][1] is not gate_up and gen._projections[1][1].intact()
    assert gen._projections[1][0] is qkv  # the untouched group is kept

    model.save_pretrained(tmp_path)
    loaded = Llama.from_pretrained(tmp_path, device=DEVICE)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

    model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="build a new Generator"):
        gen.generate(prompts, 2)


def test_captured_graphs_are_dropped_when_a_weight_moves(monkeypatch):
    """A CUDA graph holds every weight's address: in-place writes keep the graph (it reads the
    same memory), a parameter given new memory makes the next call capture again (both the
    cuBLAS and the fused step)."""
    fake = _FakeCudaGraphs(monkeypatch)
    model = _tiny_model(seed=4)
    gen = Generator(model, 1, 32)
    gen.cuda_graph = True
    gen.generate([[5, 6, 7]], 4, stop_tokens=[])
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(2.0)
    gen.generate([[5, 6, 7]], 4, stop_tokens=[])
    assert fake.captures == 2
    model.model.layers[0].self_attn.o_proj.weight.data = model.model.layers[0].self_attn.o_proj.weight.clone()
    gen.generate([[5, 6, 7]], 4, stop_tokens=[])
    assert fake.captures == 4


def test_fused_projections_never_resize_a_shared_storage():
    """Parameters that share one storage in another order (up before gate) are copied into a
    buffer of their own, never viewed past the storage's end (that would resize it, and fail for
    a storage that can't be resized, e.g. one from numpy)."""
    import numpy as np

    model = _tiny_model(seed=5)
    mlp = model.model.layers[0].mlp
    shared = torch.from_numpy(np.concatenate([mlp.up_proj.weight.detach().numpy(),
                                              mlp.gate_proj.weight.detach().numpy()])).to(DEVICE)
    mlp.up_proj.weight.data, mlp.gate_proj.weight.data = shared[:160], shared[160:]
    expected = [model.generate(torch.tensor([[5, 6, 7]], device=DEVICE), 4, stop_tokens=[])[0, 3:].tolist()]
    gen = Generator(model, 1, 16)
    assert shared.untyped_storage().nbytes() == 2 * 160 * 64 * 4
    assert gen._projections[0][1].intact()
    assert [g[3:] for g in gen.generate([[5, 6, 7]], 4, stop_tokens=[])] == expected


def _nontrivial_weights(model) -> None:
    """Norms and biases off their initial values, the routers' score biases too (buffers in some
    families), and attention sinks (gpt-oss, Granite SWA) that take a good part of each row's mass."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(0.1 * torch.randn_like(b))
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.normal_(0.0, 2.0)


def _hf_model(arch):
    import transformers

    base = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    cfg_cls, model_cls, extra = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "llama3-rope-tied": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
            tie_word_embeddings=True, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=16))),
        "qwen2-bias": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=6)),
        "qwen3-qk-norm": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16)),
        "phi3-merged-proj": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0)),
        "phi3-partial-rope": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0, rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.75))),
        # Phi-4-mini's rotary: partial, longrope (short factors up to original_max_position_embeddings,
        # its attention factor on cos/sin), taken up to that length
        "phi3-partial-longrope": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
            pad_token_id=0, original_max_position_embeddings=32, rope_parameters=dict(
                rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                short_factor=[1.0, 1.5, 2.0, 3.0, 5.0, 8.0], long_factor=[2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
                original_max_position_embeddings=32))),
        "granite-multipliers": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(
            embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.05, logits_scaling=8.0)),
        "smollm3-nope": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM, dict(
            pad_token_id=0, no_rope_layer_interval=2)),  # rotary in layer 0 only
        "ministral-layer-window": (transformers.MinistralConfig, transformers.MinistralForCausalLM, dict(
            head_dim=16, sliding_window=6, layer_types=["full_attention", "sliding_attention"])),
        # Gemma 3: four unit-offset norms a layer, q/k norms, GeGLU, the embedding scale, a window
        # and its own rotary base on the local layers, query_pre_attn_scalar's scale, and the
        # final logit soft-capping (at a cap the tiny logits reach)
        # Gemma (1): Gemma's norms, GeGLU and embedding scale in Llama's layer
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(head_dim=16, pad_token_id=0)),
        # Gemma 2: Gemma 3's layer without q/k norms, its attention scores soft-capped (0.1 binds on
        # these scores; checked in test_gemma2_score_softcapping_binds_and_is_computed) and a window.
        # Eager attention: transformers 5.17's sdpa path drops the cap (5.25 refuses sdpa for Gemma 2)
        "gemma2-window-softcap": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM, dict(
            head_dim=16, pad_token_id=0, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=0.1, final_logit_softcapping=0.5,
            attn_implementation="eager")),
        "gemma3-window-softcap": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, dict(
            head_dim=16, pad_token_id=0, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=0.5)),
        # OLMo 2/3: norms after each branch only, q/k norms over all heads, rounded once; a window
        "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(pad_token_id=0)),
        "olmo3-window": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM, dict(
            pad_token_id=0, sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
        # mixtures of experts (top-2 of 4, the experts on ops.moe_experts, the router HF's):
        # Mixtral with a window; Qwen2-MoE's shared expert and a dense layer; Qwen3-MoE's per-head
        # q/k norms; OLMoE's q/k norms over all heads and its q/k/v clipping
        "mixtral-window": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(
            sliding_window=6, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2-moe-shared": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            mlp_only_layers=[1])),
        "qwen3-moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
        "olmoe-clip": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM, dict(
            pad_token_id=0, num_experts=4, num_experts_per_tok=2, clip_qkv=1.0)),
        # CWM: Llama's layers, a window on some of them (Qwen2's layer_types); Seed-OSS: Llama's
        # with q/k/v biases (its residual dropout is off in eval); FlexOlmo: OLMo 2's norms, experts
        "cwm-window": (transformers.CwmConfig, transformers.CwmForCausalLM, dict(
            sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
        "seed-oss-bias": (transformers.SeedOssConfig, transformers.SeedOssForCausalLM, dict(attention_bias=True)),
        "flex-olmo": (transformers.FlexOlmoConfig, transformers.FlexOlmoForCausalLM, dict(
            pad_token_id=0, num_experts=4, num_experts_per_tok=2)),
        # the rotary of adjacent pairs: Helium (its norms rounded once), Ernie 4.5 (biases), GLM
        # (merged gate/up; rotary on half of each head) and GLM-4 (GLM's, each branch normed too)
        "helium": (transformers.HeliumConfig, transformers.HeliumForCausalLM, dict(head_dim=16)),
        "ernie4_5-bias": (transformers.Ernie4_5Config, transformers.Ernie4_5ForCausalLM, dict(use_bias=True)),
        "glm": (transformers.GlmConfig, transformers.GlmForCausalLM, dict(pad_token_id=0)),
        "glm4": (transformers.Glm4Config, transformers.Glm4ForCausalLM, dict(pad_token_id=0)),
        # gateless MLPs, down(act(up(x))): Arcee's ReLU^2 (with MLP biases and yarn rotary scaling);
        # Apertus's xIELU (its own parameters), per-head q/k norms and norms named otherwise
        "arcee-yarn-bias": (transformers.ArceeConfig, transformers.ArceeForCausalLM, dict(
            mlp_bias=True, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                original_max_position_embeddings=16))),
        "apertus": (transformers.ApertusConfig, transformers.ApertusForCausalLM, dict(
            pad_token_id=0, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=16))),
        # EXAONE 4: OLMo 2's norm layout (Llama's norm), per-head q/k norms, windowed layers with
        # rotary and global layers without (NoPE)
        "exaone4-window": (transformers.Exaone4Config, transformers.Exaone4ForCausalLM, dict(
            head_dim=16, pad_token_id=0, sliding_window=6, layer_types=["sliding_attention", "full_attention"])),
        # VaultGemma: Gemma 2's attention (score soft-capping, a window, query_pre_attn_scalar) and
        # final soft-capping, its layer without the branch norms (eager: as Gemma 2's)
        "vaultgemma-window-softcap": (transformers.VaultGemmaConfig, transformers.VaultGemmaForCausalLM, dict(
            head_dim=16, pad_token_id=0, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=24, attn_logit_softcapping=0.1, final_logit_softcapping=0.5,
            attn_implementation="eager")),
        # HyperCLOVA X: Granite's multipliers (its logits multiplied, not divided), applied after
        # the norm of each branch (use_post_norm) or with none
        "hyperclovax-post-norm": (transformers.HyperCLOVAXConfig, transformers.HyperCLOVAXForCausalLM, dict(
            embedding_multiplier=1.5, residual_multiplier=0.7, logits_scaling=0.5, attention_multiplier=0.2)),
        "hyperclovax": (transformers.HyperCLOVAXConfig, transformers.HyperCLOVAXForCausalLM, dict(
            use_post_norm=False, embedding_multiplier=1.5, residual_multiplier=0.7, logits_scaling=0.5)),
        # Ministral 3: q scaled by Llama 4's factor of its position (steps of 8 positions here,
        # so prompt, decode and ring positions reach factors above 1), a window on every layer
        "ministral3-window-llama4-scale": (transformers.Ministral3Config, transformers.Ministral3ForCausalLM, dict(
            head_dim=16, sliding_window=6, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                original_max_position_embeddings=8,
                                                                llama_4_scaling_beta=0.5))),
        # HunYuan: each head's q and k normed after rotary (its NTK-alpha rotary: "dynamic" with
        # a fixed alpha, a fixed table), attention biases
        "hunyuan-ntk-alpha": (transformers.HunYuanDenseV1Config, transformers.HunYuanDenseV1ForCausalLM, dict(
            head_dim=16, attention_bias=True, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                                   alpha=4.0, factor=1.0))),
        # GraniteMoE: Granite's multipliers, its experts in the layer's block_sparse_moe, picked by its router
        "granitemoe-multipliers": (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM, dict(
            num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0, residual_multiplier=0.22,
            attention_multiplier=0.05, logits_scaling=8.0)),
        # OLMo (1): weightless LayerNorms, q/k/v clipped
        "olmo-clip": (transformers.OlmoConfig, transformers.OlmoForCausalLM, dict(pad_token_id=0, clip_qkv=0.1)),
        # dots.llm1: its router (sigmoid scores, groups, a scaling factor), shared experts added
        # as they are, a dense first layer, per-head q/k norms
        "dots1-shared": (transformers.Dots1Config, transformers.Dots1ForCausalLM, dict(
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, sliding_window=None)),
        # GLM-4.5: dots.llm1's experts and router, rotary on half of each head, per-head q/k norms
        "glm4-moe-qk-norm": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM, dict(
            head_dim=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, use_qk_norm=True)),
        # HunYuan MoE: HunYuan's attention, top-2 of 4 experts and a shared MLP added as it is
        "hunyuan-moe-shared": (transformers.HunYuanMoEV1Config, transformers.HunYuanMoEV1ForCausalLM, dict(
            head_dim=16, num_experts=4, moe_topk=2)),
        # Ernie 4.5 MoE: Ernie 4.5's attention and biases, top-2 of 4 experts, a shared expert, a dense first layer
        "ernie4_5-moe-shared": (transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM, dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, moe_num_shared_experts=1,
            moe_layer_start_index=1, use_bias=True)),
        # Mellum (per-head q/k norms, a window and rotary base per layer type), Solar Open (GLM-4.5's
        # router and shared experts), MiniMax-M2 (q/k norms over all heads, rotary on half of each
        # head), EXAONE MoE (EXAONE 4's attention, shared experts): top-2 of 4 experts
        "mellum-window": (transformers.MellumConfig, transformers.MellumForCausalLM, dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, sliding_window=6,
            layer_types=["sliding_attention", "full_attention"])),
        "solar-open-shared": (transformers.SolarOpenConfig, transformers.SolarOpenForCausalLM, dict(
            head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
            n_group=2, topk_group=1, routed_scaling_factor=2.5)),
        "minimax-m2-partial-rope": (transformers.MiniMaxM2Config, transformers.MiniMaxM2ForCausalLM, dict(
            head_dim=16, num_local_experts=4, num_experts_per_tok=2, rope_parameters=dict(
                rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
        "exaone-moe-window": (transformers.ExaoneMoeConfig, transformers.ExaoneMoeForCausalLM, dict(
            head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
            first_k_dense_replace=1, n_group=2, topk_group=1, sliding_window=6,
            layer_types=["sliding_attention", "full_attention"])),
        # GraniteMoeShared: GraniteMoE's with a shared MLP beside the experts (input_linear /
        # output_linear); Granite SWA: attention sinks (made large below), windows, a rotary base
        # per layer (0: none); GraniteMoE SWA: both
        "granitemoeshared-multipliers": (transformers.GraniteMoeSharedConfig, transformers.GraniteMoeSharedForCausalLM,
                                         dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=96,
                                              embedding_multiplier=12.0, residual_multiplier=0.22,
                                              attention_multiplier=0.05, logits_scaling=8.0)),
        "granite-swa-sinks-nope": (transformers.GraniteSWAConfig, transformers.GraniteSWAForCausalLM, dict(
            head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            num_hidden_layers=3, layer_rope_theta=[10000.0, 0.0, 500.0], embedding_multiplier=1.5,
            residual_multiplier=0.7, attention_multiplier=0.2, logits_scaling=0.5)),
        "granitemoe-swa-sinks-shared": (transformers.GraniteMoeSWAConfig, transformers.GraniteMoeSWAForCausalLM, dict(
            head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
            layer_rope_theta=[0.0, 10000.0], num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=96)),
        # Llama 4 (text): chunked attention (chunks of 4: prompts and decoding cross them) with
        # complex rotary and L2 q/k norms after it, a NoPE layer of full attention whose q is
        # scaled by position (temperature tuning: steps every 2 positions), a MoE layer (top-2
        # of 4 experts, each chosen expert's input scaled by its sigmoid score, a shared expert)
        "llama4-chunked": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM, dict(
            head_dim=16, intermediate_size_mlp=160, num_local_experts=4, num_experts_per_tok=2,
            interleave_moe_layer_step=2, no_rope_layers=[1, 0], attention_chunk_size=4, attn_temperature_tuning=True,
            floor_scale=2, attn_scale=0.5, use_qk_norm=True)),
        # gpt-oss: attention sinks (made large below), a window on every other layer, yarn rotary
        # tables of half a head, attention biases; top-2 of 4 experts of its own layout (weights
        # (E, H, 2I), biases, a clamped SwiGLU of interleaved columns: a limit the scores reach)
        "gpt-oss-sinks-window": (transformers.GptOssConfig, transformers.GptOssForCausalLM, dict(
            head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=6, swiglu_limit=0.05,
            layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
                rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                original_max_position_embeddings=32))),
        # Multi-head latent attention: q through a low-rank projection and its norm (DeepSeek-V3,
        # GLM-4.7-Flash, Mistral 4, MiniCPM3) or q_proj (DeepSeek-V2), K/V per head expanded from a
        # latent of 24, rotary on 8 of q/k's 24 dims (interleaved pairs: DeepSeek-V3's
        # rope_interleave, DeepSeek-V2's complex tables; GLM-4.7-Flash's and MiniCPM3's halves),
        # v heads of 16 (DeepSeek-V2: 32, wider than q/k's); a dense first layer, then top-2 of 4
        # experts and a shared one; Mistral 4: yarn tables (its mscale in the attention's scale)
        # and q scaled by position (Llama 4's factor, steps every 8 positions)
        **{name: (getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM"), {
            **dict(num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16),
            **({} if prefix == "MiniCPM3" else dict(
                n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                first_k_dense_replace=1, n_group=1, topk_group=1)), **more})
           for name, prefix, more in [
               # (its config's eps far from the latent norms' own, which they keep)
               ("deepseek-v3-mla", "DeepseekV3", dict(rope_interleave=True, rms_norm_eps=1e-2)),
               ("deepseek-v2-mla-wide-v", "DeepseekV2", dict(q_lora_rank=None, v_head_dim=32)),
               ("glm4-moe-lite-mla", "Glm4MoeLite", dict(rope_interleave=False)),
               ("mistral4-mla-yarn", "Mistral4", dict(rope_interleave=True, max_position_embeddings=32,
                                                      rope_parameters=dict(
                   type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, beta_fast=32.0,
                   beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0, llama_4_scaling_beta=0.3,
                   partial_rotary_factor=1 / 3))),
               ("minicpm3-mla", "MiniCPM3", dict(scale_emb=2.5, scale_depth=1.4, dim_model_base=16))]},
    }[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**base, **extra}))  # (extra may override base: a third layer)
    _nontrivial_weights(model)
    model.generation_config.eos_token_id = None
    return model.to(DEVICE).eval()


@pytest.mark.parametrize("arch", ["llama", "llama3-rope-tied", "qwen2-bias", "mistral-window", "qwen3-qk-norm",
                                  "phi3-merged-proj", "phi3-partial-rope", "phi3-partial-longrope",
                                  "granite-multipliers", "smollm3-nope",
                                  "ministral-layer-window", "gemma", "gemma2-window-softcap", "gemma3-window-softcap",
                                  "olmo2", "olmo3-window",
                                  "mixtral-window", "qwen2-moe-shared", "qwen3-moe", "olmoe-clip",
                                  "cwm-window", "seed-oss-bias", "flex-olmo", "helium", "ernie4_5-bias", "glm",
                                  "glm4", "arcee-yarn-bias", "apertus", "exaone4-window",
                                  "vaultgemma-window-softcap", "hyperclovax-post-norm", "hyperclovax",
                                  "ministral3-window-llama4-scale", "hunyuan-ntk-alpha", "granitemoe-multipliers",
                                  "olmo-clip", "dots1-shared", "glm4-moe-qk-norm", "hunyuan-moe-shared",
                                  "ernie4_5-moe-shared", "mellum-window", "solar-open-shared",
                                  "minimax-m2-partial-rope", "exaone-moe-window", "gpt-oss-sinks-window",
                                  "granitemoeshared-multipliers", "granite-swa-sinks-nope",
                                  "granitemoe-swa-sinks-shared", "llama4-chunked", "deepseek-v3-mla",
                                  "deepseek-v2-mla-wide-v", "glm4-moe-lite-mla", "mistral4-mla-yarn",
                                  "minicpm3-mla"])
def test_hf_model_greedy_tokens_equal_hf_generate(arch):
    """An HF causal LM (its own weights and rotary module, rope scaling, q/k/v biases,
    Qwen3's per-head q/k norms, SmolLM3's layers without rotary, Phi-3's merged projections,
    Phi-4-mini's partial rotary, Granite's multipliers, Gemma 3 and OLMo 2/3 included) decodes the tokens
    of its own greedy ``generate`` (fp32), three prompts of different lengths in one batch,
    with sliding windows (6 keys) shorter than the prompts and the cache, in prefill and decode.
    The prefill's logits are HF's (Granite's scaled, Gemma's soft-capped: sampling with a
    temperature reads them)."""
    model = _hf_model(arch)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 21)), [3, 4]]
    expected = [model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    got = Generator(model, 3, 24).generate(prompts, 6, stop_tokens=[])
    assert [g[len(p):] for g, p in zip(got, prompts)] == expected
    # and the logits themselves (greedy tokens of a tiny model can survive a wrong layer)
    gen, ids = Generator(model, 1, 24), torch.tensor([prompts[1]], device=DEVICE)
    with torch.no_grad():
        expected_logits = model(ids).logits[0, -1]
        slots = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        torch.testing.assert_close(gen._forward(ids, slots, None)[0], expected_logits, rtol=1e-4, atol=1e-4)
    # the norms are computed from their weights: a hooked one is refused
    hooked = {"qwen3-qk-norm": ("self_attn.k_norm", "Qwen3RMSNorm"), "glm4": ("post_mlp_layernorm", "Glm4RMSNorm"),
              "apertus": ("feedforward_layernorm", "ApertusRMSNorm"),
              "hunyuan-ntk-alpha": ("self_attn.key_layernorm", "HunYuanDenseV1RMSNorm"),
              "olmo-clip": ("post_attention_layernorm", "OlmoLayerNorm")}
    if arch in hooked:
        name, cls = hooked[arch]
        handle = model.model.layers[1].get_submodule(name).register_forward_hook(lambda *a: None)
        with pytest.raises(ValueError, match=f"layers.1.{name} is a hooked {cls}"):
            Generator(model, 1, 24).generate([[3, 4]], 2)
        handle.remove()


def test_latent_attention_caches_the_latent_and_prefills_with_flash_attention():
    """A multi-head latent attention model (DeepSeek-V3's) prefilled past the decode kernel's 16
    tokens (flash attention on the heads expanded from the latent, v's padded to q/k's) and
    decoded over its latent cache (ops.latent_decode_attention) gives HF's greedy tokens; the
    cache holds each token's normed latent (24 dims, HF's kv_a_layernorm output) and rotary key
    (8): 32 elements per token and layer, where the expanded heads would take 4 x (24 + 16)."""
    model = _hf_model("deepseek-v3-mla")
    prompts = [list(range(3, 23)), list(range(40, 57))]
    expected = [model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=4, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    gen = Generator(model, 2, 32)
    got = gen.generate(prompts, 4, stop_tokens=[])
    assert [g[len(p):] for g, p in zip(got, prompts)] == expected
    assert [tuple(c.shape) for c in gen.k_cache] == [(2, 32, 32)] * 2 and gen.v_cache == []
    latents = []
    handle = model.model.layers[1].self_attn.kv_a_layernorm.register_forward_hook(lambda m, i, o: latents.append(o))
    with torch.no_grad():
        model(torch.tensor([prompts[0] + got[0][20:23]], device=DEVICE))  # (the last token is not cached yet)
    handle.remove()
    torch.testing.assert_close(gen.k_cache[1][0, :23, :24], latents[0].reshape(23, 24), rtol=1e-5, atol=1e-5)
    # a bias on kv_b_proj (HF's have none) would not be absorbed: refused
    kv_b = model.model.layers[0].self_attn.kv_b_proj
    kv_b.bias = torch.nn.Parameter(torch.zeros(kv_b.out_features, device=DEVICE))
    with pytest.raises(ValueError, match="layers.0.self_attn.kv_b_proj has a bias"):
        Generator(model, 1, 8)
    kv_b.bias = None
    # rotary tables of another width than the heads' rotary dims (a config's head_dim sets them):
    # refused, as HF fails on them
    model.config.head_dim = 16
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(DEVICE)
    with pytest.raises(ValueError, match="rotary tables of 16 dims for its attention's qk_rope_head_dim=8"):
        Generator(model, 1, 8)


@pytest.mark.parametrize("arch", ["deepseek-v3-mla", "dots1-shared", "mistral4-mla-yarn"])
def test_a_16_bit_checkpoint_with_fp32_routers_loads_and_decodes(tmp_path, arch):
    """transformers loads DeepSeek's, GLM-4.5's, dots.llm1's ... routers in fp32 under a 16-bit
    dtype (_keep_in_fp32_modules_strict), and computes them in fp32: the generator calls those
    modules, so it takes them (it refused such a model before). Mistral 4's text model has no
    AutoModelForCausalLM entry: load_checkpoint loads it with its own class."""
    from fastllama.generate import load_checkpoint

    _hf_model(arch).save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, torch.float16, DEVICE)
    routers = [n for n, p in model.named_parameters() if p.dtype == torch.float32]
    # (transformers >= 5.2x keeps "gate.weight" fp32; 5.17 loads it in fp16)
    kept = "gate.weight" in (getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    assert routers == (["model.layers.1.mlp.gate.weight"] if kept else [])
    prompt = list(range(10, 21))
    expected = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=5, do_sample=False,
                              pad_token_id=0)[0, len(prompt):].tolist()
    assert Generator(model, 1, 24).generate([prompt], 5, stop_tokens=[])[0][len(prompt):] == expected
    if routers:  # a router a model does not keep fp32 by design is refused (the generator reads it as is)
        model._keep_in_fp32_modules_strict = []
        with pytest.raises(ValueError, match="the model has parameters on"):
            Generator(model, 1, 24)


@pytest.mark.parametrize("change, match", [
    (dict(num_key_value_heads=2), "num_key_value_heads=2 != num_attention_heads=4"),
    (dict(kv_lora_rank=520), "kv_lora_rank = 520; the generator's latent attention kernels take at most 512"),
    (dict(qk_nope_head_dim=250), "qk_nope_head_dim \\+ qk_rope_head_dim = 258"),
])
def test_latent_attention_the_kernels_cannot_take_is_refused_up_front(change, match):
    import transformers

    cfg = transformers.DeepseekV3Config(**{**dict(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, head_dim=8, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1), **change})
    with pytest.raises(ValueError, match=match):
        Generator(transformers.DeepseekV3ForCausalLM(cfg).to(DEVICE), 1, 8)


def test_gpt_oss_loaded_in_fp16_keeps_its_fp32_norms(tmp_path):
    """transformers loads gpt-oss in fp16 with its norms' weights in fp32 (_keep_in_fp32_modules):
    the generator takes the model so (each norm rounds once from its fp32 weight, as HF's does)
    and decodes HF's own fp16 greedy tokens."""
    from fastllama.generate import load_checkpoint

    _hf_model("gpt-oss-sinks-window").save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, torch.float16, DEVICE)
    assert model.model.norm.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.float16
    prompts = [[5, 6, 7, 8, 9], list(range(10, 21))]
    expected = [model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    got = Generator(model, 2, 24).generate(prompts, 6, stop_tokens=[])
    assert [g[len(p):] for g, p in zip(got, prompts)] == expected
    # (other parameters in another dtype are still refused)
    model.lm_head.float()
    with pytest.raises(ValueError, match="build a new Generator"):
        Generator(model, 1, 24).generate([[3, 4]], 2)


def test_a_gateless_mlps_activation_is_called_and_followed():
    """Arcee's and Apertus's MLPs have no gate: the generator calls the model's own activation
    module on up(x). A hooked one is refused (a captured decode step would not run the hook
    again); one swapped for another module is what the next call computes."""
    model = _hf_model("arcee-yarn-bias")
    act = model.model.layers[1].mlp.act_fn
    handle = act.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="layers.1.mlp.act_fn has forward hooks"):
        Generator(model, 1, 24)
    handle.remove()
    gen, ids = Generator(model, 1, 24), torch.tensor([list(range(10, 21))], device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    gen.generate([[3, 4]], 1)  # (each call binds the modules as they are now)
    with torch.no_grad():
        torch.testing.assert_close(gen._forward(ids, slots, None)[0], model(ids).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_windowed_layers_hold_a_ring_of_their_window_and_keep_each_positions_key():
    """A layer with a sliding window of W keys gets a cache of W slots (position p in slot p mod
    W), the others max_seq_len; after a batch prefill (prompts shorter and longer than the ring)
    and decode steps that wrap it, each ring slot holds the key and value of the latest position
    that maps to it, bit for bit what the same Generator wrote for that position with rings
    turned off (each layer max_seq_len slots, the window applied by the kernels)."""
    model = _hf_model("ministral-layer-window")  # layer 0 full, layer 1 a window of 6 keys
    prompts, new = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], list(range(20, 26))], 7
    ringed = Generator(model, 3, 30)
    assert ringed.cache_lengths == [30, 6] and [c.shape[2] for c in ringed.k_cache] == [30, 6]
    got = ringed.generate(prompts, new, stop_tokens=[])

    full = Generator(model, 3, 30)
    full.cache_lengths = [30, 30]  # the same layers, every cache max_seq_len long
    full.k_cache, full.v_cache = ([torch.zeros_like(full.k_cache[0]) for _ in range(2)] for _ in range(2))
    assert full.generate(prompts, new, stop_tokens=[]) == got
    for b, p in enumerate(prompts):
        n = len(p) + new - 1  # positions written: the last token sampled is not fed back
        for pos in range(n - 6, n):
            for ring, whole in ((ringed.k_cache[1], full.k_cache[1]), (ringed.v_cache[1], full.v_cache[1])):
                assert torch.equal(ring[b, :, pos % 6], whole[b, :, pos]), (b, pos)
        assert torch.equal(ringed.k_cache[0][b, :, :n], full.k_cache[0][b, :, :n])

    # a ring is never longer than the cache: a window of max_seq_len keys or more is no ring
    assert Generator(model, 1, 6).cache_lengths == [6, 6] and Generator(model, 1, 4).cache_lengths == [4, 4]


def _fill_ring_by_hand(ring, full, lengths):
    for b, n in enumerate(lengths):
        for p in range(max(0, n - ring.shape[2]), n):
            ring[b, :, p % ring.shape[2]] = full[b, :, p]


def test_fill_ring_copies_the_last_window_of_each_prompt():
    from fastllama.generate import _fill_ring

    full = torch.randn(4, 2, 13, 3)
    ring = torch.randn(4, 2, 5, 3)
    expected = ring.clone()
    lengths = [13, 1, 5, 7]  # longer than the ring, one token, exactly the ring, one past it
    _fill_ring_by_hand(expected, full, lengths)
    _fill_ring(ring, full, torch.tensor(lengths, dtype=torch.int32))
    assert torch.equal(ring, expected)


def _refuses_hooked_experts(model, block: str) -> Generator:
    """A Generator over ``model`` that refuses the call while layer 1's experts (in its ``block``)
    have a forward hook, and takes it again once the hook is gone."""
    gen = Generator(model, 1, 16)
    handle = model.model.layers[1].get_submodule(f"{block}.experts").register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=f"layers.1.{block}.experts: hooked"):
        gen.generate([[3, 4]], 2)
    handle.remove()
    return gen


def test_moe_experts_the_generator_cannot_read_are_refused(monkeypatch):
    """A mixture of experts runs from the expert weights: hooked experts, a device where torch's
    grouped matmul does not run, and a swapped expert activation are refused at the call."""
    from fastllama.ops import experts as experts_op

    model = _hf_model("qwen3-moe")
    gen = _refuses_hooked_experts(model, "mlp")
    monkeypatch.setattr(experts_op, "grouped_mm_available", lambda device: False)
    with pytest.raises(ValueError, match="grouped matmul does not run"):
        gen.generate([[3, 4]], 2)
    monkeypatch.undo()
    act = model.model.layers[0].mlp.experts.act_fn
    model.model.layers[0].mlp.experts.act_fn = torch.nn.ReLU()
    with pytest.raises(ValueError, match="layers.0.mlp.experts.act_fn is ReLU"):
        gen.generate([[3, 4]], 2)
    model.model.layers[0].mlp.experts.act_fn = act
    assert gen.generate([[3, 4]], 2) == Generator(model, 1, 16).generate([[3, 4]], 2)


def test_which_grouped_matmuls_sync_with_the_host(monkeypatch):
    """torch's grouped matmul needs no host sync only in its bf16 kernels of sm_90 / sm_100;
    elsewhere on CUDA it reads the offsets on the host (no CUDA graph), never on the CPU."""
    import types

    from fastllama.ops import experts as experts_op

    for major, dtype, syncs in ((9, torch.bfloat16, False), (10, torch.bfloat16, False), (9, torch.float16, True),
                                (9, torch.float32, True), (8, torch.bfloat16, True), (12, torch.bfloat16, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, major=major: (major, 0))
        weight = types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
        assert experts_op.grouped_mm_syncs(weight) is syncs, (major, dtype)
    assert not experts_op.grouped_mm_syncs(torch.zeros(2, dtype=torch.float16))


@pytest.mark.skipif(INTERPRETER, reason="real CUDA graphs need a GPU")
def test_a_mixture_of_experts_that_syncs_decodes_without_a_cuda_graph():
    """An fp32 mixture of experts (its grouped matmul syncs with the host): the Generator
    decodes it eagerly by default, HF's tokens, and refuses cuda_graph=True with the reason."""
    from fastllama.ops import experts as experts_op

    model = _hf_model("qwen3-moe")
    assert experts_op.grouped_mm_syncs(model.model.layers[0].mlp.experts.gate_up_proj)
    gen = Generator(model, 1, 16)
    assert not gen.cuda_graph
    prompt = torch.tensor([[3, 4, 5]], device=DEVICE)
    expected = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert gen.generate([[3, 4, 5]], 4, stop_tokens=[])[0] == expected[0].tolist()
    with pytest.raises(ValueError, match="reads its group offsets on the host"):
        Generator(model, 1, 16, cuda_graph=True)


def test_gemma2_score_softcapping_binds_and_is_computed(monkeypatch):
    """Gemma 2's attention score cap (0.1 here) changes the logits, and the generator computes
    them capped, in prefill (flash attention, and the decode kernel for a prompt of up to 16
    tokens) and in decode steps (the windowed layer's ring of 6 slots too); a cap changed on the
    modules after the generator was built is the one the next call uses, as in HF's forward:
    the captured decode step (stand-in graphs) is captured again. A cap the 16-bit decode
    kernel does not take is refused."""
    model = _hf_model("gemma2-window-softcap")
    ids = torch.tensor([list(range(10, 34))], device=DEVICE)
    gen, slots = Generator(model, 1, 32), torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        for cap in (0.1, None, 0.3):
            for layer in model.model.layers:
                layer.self_attn.attn_logit_softcapping = cap
            gen._bind_weights()  # (what each generate call does first)
            for n in (9, 21, 22, 23, 24):  # the decode kernel, flash attention, decode steps
                expected = model(ids[:, :n]).logits[0, -1]
                tokens, at = (ids[:, :n], slots) if n < 22 else (ids[:, n - 1:n], slots + n - 1)
                torch.testing.assert_close(gen._forward(tokens, at, None)[0], expected, rtol=1e-4, atol=1e-4)
            if cap is None:
                assert (expected - capped).abs().max() > 1e-3  # the cap binds
            capped = expected
    fake = _FakeCudaGraphs(monkeypatch)
    gen.cuda_graph = True
    gen.generate([[5, 6, 7]], 4, stop_tokens=[])
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.1
    tokens = gen.generate([[5, 6, 7]], 4, stop_tokens=[])
    assert fake.captures == 2 and tokens == Generator(model, 1, 32).generate([[5, 6, 7]], 4, stop_tokens=[])
    model.model.layers[1].self_attn.attn_logit_softcapping = 2e4
    model.half()
    with pytest.raises(ValueError, match="attn_logit_softcapping=20000.0 is above"):
        Generator(model, 1, 32)


def test_gemma3_bidirectional_attention_is_refused_and_activations_followed():
    """What the kernels do not compute is refused (bidirectional attention; a layer type's
    rotary table narrower than the head); an MLP activation swapped between GELU-tanh and SiLU
    after the generator was built is what the next call computes; a score cap Gemma 3 stores
    but does not apply is not applied."""
    model = _hf_model("gemma3-window-softcap")
    # Gemma 3's attention stores attn_logit_softcapping but never applies it: nor does the generator
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = 0.05
    ids = torch.tensor([list(range(10, 22))], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(Generator(model, 1, 24)._forward(ids, torch.zeros(1, dtype=torch.int32,
                                                                                   device=DEVICE), None)[0],
                                   model(ids).logits[0, -1], rtol=1e-4, atol=1e-4)
    gen = Generator(model, 1, 24)
    for layer in model.model.layers:
        layer.mlp.act_fn = torch.nn.SiLU()
    gen.generate([[5, 6, 7]], 1)
    ids = torch.tensor([list(range(10, 21))], device=DEVICE)
    with torch.no_grad():  # (greedy tokens of a tiny model can survive the wrong activation)
        torch.testing.assert_close(gen._forward(ids, torch.zeros(1, dtype=torch.int32, device=DEVICE), None)[0],
                                   model(ids).logits[0, -1], rtol=1e-4, atol=1e-4)
    fastllama.patch(model)  # fastllama's own forwards (Gemma's norms too) are no replacement
    gen.generate([[5, 6, 7]], 2)
    fastllama.unpatch(model)
    model.model.layers[1].self_attn.is_causal = False
    with pytest.raises(ValueError, match="bidirectional attention"):
        Generator(model, 1, 24)
    model.model.layers[1].self_attn.is_causal = True
    # a rotary table of a layer type covering half the head (Gemma's attention rotates it all)
    rotary = model.model.rotary_emb
    rotary.sliding_attention_inv_freq = rotary.sliding_attention_inv_freq[:4]
    with pytest.raises(ValueError, match="rotary tables of 8 of its 16 head dims"):
        Generator(model, 1, 24)


@pytest.mark.parametrize("arch,flags", [("olmo3-window", (False, True)), ("gemma3-window-softcap", (True, True)),
                                        ("gemma", (True, True)), ("llama", (False, False))])
def test_generator_norms_round_as_the_family_does(monkeypatch, arch, flags):
    """Every norm the generator computes rounds as the model's own does (fp32 logits cannot tell
    one rounding from two): OLMo's w once, Gemma's 1 + w once, Llama's twice. OLMo's q/k norms
    span all heads (hidden-wide rows), the others' one head."""
    model = _hf_model(arch)
    gen = Generator(model, 1, 24)
    seen = []
    rms_norm = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda x, w, *a, **k: seen.append(
        (x.shape[-1], k["unit_offset"], k["round_once"])) or rms_norm(x, w, *a, **k))
    gen.generate([[3, 4, 5]], 2)
    assert {(u, r) for _, u, r in seen} == {flags}
    widths = {n for n, _, _ in seen}
    assert widths == ({64, 32} if arch.startswith("olmo") else {64, 16} if arch.startswith("gemma3") else {64})


def test_phi3_swapped_activation_is_refused():
    """A Phi-3 MLP whose ``activation_fn`` is no longer SiLU is refused at the call (the
    generator's MLP is SwiGLU, computed without calling it)."""
    model = _hf_model("phi3-merged-proj")
    gen = Generator(model, 1, 24)
    model.model.layers[1].mlp.activation_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="layers.1.mlp.activation_fn is GELU"):
        gen.generate([[3, 4]], 2)


def test_hf_defaults_lora_and_qwen2_layer_types(monkeypatch):
    """Stop tokens default to config + generation_config eos ids (HF's generate stops on both);
    a projection that is not a plain nn.Linear (LoRA: its .weight is the base weight only) or
    has hooks is refused at the call, not silently ignored; a Qwen2 config windows the layers
    from max_window_layers on, as HF's attention does."""
    import transformers

    model = _hf_model("llama")
    model.config.eos_token_id, model.generation_config.eos_token_id = 2, [2, 7]
    model.generation_config.pad_token_id = 5
    gen = Generator(model, 1, 24)
    sampling = gen._check([[3, 4]], 2, 0.0, None, None, None, None, None)
    assert sampling.stop == (2, 7) and sampling.pad == 5
    model.generation_config.pad_token_id = None  # then HF's generate pads with the first eos
    model.generation_config.eos_token_id = [7, 2]
    assert Generator(model, 1, 24)._check([[3, 4]], 2, 0.0, None, None, None, None, None).pad == 7
    model.generation_config.eos_token_id = [2, 7]

    attn = model.model.layers[1].self_attn
    handle = attn.o_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="o_proj has forward hooks"):
        gen.generate([[3, 4]], 2)
    handle.remove()

    class LoraLinear(torch.nn.Linear):
        pass

    lora = LoraLinear(64, 32, bias=False).to(DEVICE)
    attn.k_proj = lora
    with pytest.raises(ValueError, match="k_proj is a LoraLinear, not a plain nn.Linear"):
        gen.generate([[3, 4]], 2)

    attn.k_proj = torch.nn.Linear(64, 32, bias=False).to(DEVICE)
    gen.generate([[3, 4]], 2)  # plain again: fine
    # modules edited by hand that the weights alone do not compute: refused, not silently wrong
    attn.k_proj.forward = lambda x, lin=attn.k_proj: torch.nn.Linear.forward(lin, x) * 2
    with pytest.raises(ValueError, match="k_proj is an nn.Linear with a forward set on the instance"):
        gen.generate([[3, 4]], 2)
    del attn.k_proj.forward
    layer = model.model.layers[0]
    norm = layer.post_attention_layernorm
    layer.post_attention_layernorm = torch.nn.LayerNorm(64).to(DEVICE)
    with pytest.raises(ValueError, match="layers.0.post_attention_layernorm is a LayerNorm"):
        gen.generate([[3, 4]], 2)
    layer.post_attention_layernorm = norm
    act = layer.mlp.act_fn
    layer.mlp.act_fn = torch.nn.GELU()
    with pytest.raises(ValueError, match="layers.0.mlp.act_fn is GELU"):
        gen.generate([[3, 4]], 2)
    layer.mlp.act_fn = act
    act.forward = torch.nn.functional.gelu  # still a SiLU class, but not what runs
    with pytest.raises(ValueError, match="layers.0.mlp.act_fn is SiLUActivation"):
        gen.generate([[3, 4]], 2)
    del act.forward
    norm.forward = lambda x: x
    with pytest.raises(ValueError, match="post_attention_layernorm is a forward-replaced LlamaRMSNorm"):
        gen.generate([[3, 4]], 2)
    del norm.forward
    gen.generate([[3, 4]], 2)
    fastllama.patch(model)  # fastllama's own forwards are no replacement
    gen.generate([[3, 4]], 2)
    fastllama.unpatch(model)

    for max_window_layers, windows in ((2, [None, None]), (1, [None, (3, 0)])):
        cfg = transformers.Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, use_sliding_window=True, sliding_window=4,
                                       max_window_layers=max_window_layers)
        qwen = transformers.Qwen2ForCausalLM(cfg).to(DEVICE)
        assert Generator(qwen, 1, 16).windows == windows  # the layers HF's own attention windows


def test_unsupported_model_is_refused():
    import transformers

    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        Generator(torch.nn.Linear(2, 2), 1, 8)


def test_rotary_scaling_that_changes_with_the_length_is_taken_up_to_its_limit():
    """"dynamic" NTK and "longrope" tables change once a sequence is longer than a limit (HF
    computes them anew from the length): the generator precomputes one table, so it takes them
    for a cache up to that limit (where HF's tables are the original ones: the same tokens), and
    refuses a longer cache, naming the limit."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=16,
                                   rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()
    model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="rope_type='dynamic'.* max_seq_len must be <= 16, got 17"):
        Generator(model, 1, 17)
    # a longer sequence first grows HF's tables (HF's next shorter one sends them back); the
    # generator, built in between, takes the original ones all the same
    model(torch.zeros(1, 40, dtype=torch.long, device=DEVICE))
    gen = Generator(model, 1, 16)
    prompt = [5, 6, 7, 8, 9]
    expected = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=11, do_sample=False)
    assert gen.generate([prompt], 11, stop_tokens=[])[0] == expected[0].tolist()
    ids = torch.tensor([list(range(3, 19))], device=DEVICE)  # (and the logits, at all 16 positions)
    with torch.no_grad():
        torch.testing.assert_close(gen._forward(ids, torch.zeros(1, dtype=torch.int32, device=DEVICE), None)[0],
                                   model(ids).logits[0, -1], rtol=1e-4, atol=1e-4)
    longrope = _hf_model("phi3-partial-longrope")
    with pytest.raises(ValueError, match="rope_type='longrope'.* max_seq_len must be <= 32, got 33"):
        Generator(longrope, 1, 33)


@pytest.mark.skipif(INTERPRETER, reason="real CUDA graphs need a GPU")
def test_cuda_graph_with_an_hf_model_follows_moved_weights():
    """An HF model (bf16, fused projections with biases): the captured step gives the eager
    loop's tokens; after a weight gets new memory and new values, the next call captures again
    and follows them (a stale graph would read the freed buffer)."""
    model = _hf_model("qwen2-bias").to(torch.bfloat16)
    graph, eager = Generator(model, 2, 48, cuda_graph=True), Generator(model, 2, 48, cuda_graph=False)
    prompts = [[5, 6, 7, 8], list(range(10, 30))]
    before = graph.generate(prompts, 8, stop_tokens=[])
    assert graph.stats.cuda_graph and before == eager.generate(prompts, 8, stop_tokens=[])
    down = model.model.layers[0].mlp.down_proj
    down.weight.data = down.weight.detach() * -2.0
    torch.cuda.empty_cache()
    after = graph.generate(prompts, 8, stop_tokens=[])
    assert graph.stats.cuda_graph and after == eager.generate(prompts, 8, stop_tokens=[])
    assert after != before


@pytest.mark.skipif(INTERPRETER, reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ["minicpm3-mla", "deepseek-v2-mla-wide-v"])
def test_cuda_graph_of_a_latent_attention_step_equals_the_eager_loop(arch):
    """The latent attention's decode step (the cache write by index, the absorbed q, the latent
    kernel and its split combine) captured as a CUDA graph gives the eager loop's tokens, bf16,
    prompts shorter and longer than the 16-token prefill threshold. (DeepSeek-V2's experts sync
    with the host outside bf16 on sm_90/100: MiniCPM3 is dense, captured everywhere.)"""
    model = _hf_model(arch).to(torch.bfloat16)
    graph, eager = Generator(model, 2, 48, cuda_graph=None), Generator(model, 2, 48, cuda_graph=False)
    prompts = [[5, 6, 7, 8], list(range(10, 30))]
    got = graph.generate(prompts, 12, stop_tokens=[])
    assert got == eager.generate(prompts, 12, stop_tokens=[])
    if arch.startswith("minicpm3"):
        assert graph.stats.cuda_graph


# Tests from mutation testing: each fails on a plausible bug the suite let through.
def test_generator_uses_the_models_rms_norm_eps():
    """Every other model here has the default eps; the second layer's cached keys depend on the
    first layer's norms."""
    model = _tiny_model(seed=4, rms_norm_eps=0.5)
    prompt = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gen = Generator(model, 1, 10)
    gen.generate(prompt, 1, stop_tokens=[])
    model.setup_caches(1, 10)
    try:
        model(prompt, cache_start=0)
        for i, cache in enumerate(model.caches):
            torch.testing.assert_close(gen.k_cache[i][:1, :, :9], cache.k[:, :, :9], msg=f"layer {i} keys")
    finally:
        model.caches = None


@pytest.mark.parametrize("arch, module", [("llama", "model.layers.1.mlp"), ("llama", "model.layers.0.self_attn"),
                                          ("llama", "model.layers.1"), ("glm4-moe-qk-norm", "model.layers.1.mlp"),
                                          ("glm4-moe-qk-norm", "model.layers.1.mlp.shared_experts"),
                                          ("granitemoeshared-multipliers", "model.layers.1.shared_mlp"),
                                          ("granitemoeshared-multipliers", "model.layers.0.shared_mlp.input_linear")])
def test_hooks_on_the_modules_the_generator_computes_itself_are_refused(arch, module):
    """The generator computes each decoder layer, its attention, its MLP (or mixture-of-experts
    block and shared experts) from their weights, calling none of them: a hook there (which
    changed the output by 0.08 to 0.14 and went unnoticed) is refused, naming the module."""
    model = _hf_model(arch)
    handle = model.get_submodule(module).register_forward_hook(lambda m, i, o: o)
    with pytest.raises(ValueError, match=f"{module.removeprefix('model.')} has forward hooks"):
        Generator(model, 1, 16).generate([[3, 4]], 2)
    handle.remove()
    assert len(Generator(model, 1, 16).generate([[3, 4]], 2)[0]) == 4


def test_forward_pre_hooks_are_refused_by_the_generator():
    model = _tiny_model(num_hidden_layers=1)
    gen = Generator(model, 1, 8)
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    try:
        with pytest.raises(ValueError, match="o_proj has forward hooks"):
            gen.generate([[3, 4]], 2)
    finally:
        handle.remove()


def test_top_p_keeps_the_token_that_reaches_p():
    """Probabilities 0.5 / 0.3 / 0.2 with top_p 0.7 keep tokens 0 and 1: the smallest set whose
    probability reaches p, not one token short of it."""
    from fastllama.reference.model import filter_logits, sample

    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert torch.isfinite(filter_logits(logits, 1.0, top_p=0.7)).tolist() == [[True, True, False]]
    rows = logits.expand(4000, 3)
    for picks in (sample_logits(rows, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0)),
                  sample(rows, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))):
        counts = torch.bincount(picks, minlength=3)
        assert counts[2] == 0 and counts[1] > 1000, counts


def test_row_blocks_not_intact_after_a_weight_shrinks():
    """A last weight re-pointed to a shorter view of its block (same start address) is no longer
    laid out: the fused GEMM would keep computing the old rows."""
    from fastllama.model_weights import RowBlocks

    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 4).to(DEVICE), torch.nn.Linear(8, 6).to(DEVICE)
    blocks = RowBlocks([a, b])
    assert blocks.intact()
    b.weight.data = b.weight.data[:3]
    b.bias.data = b.bias.data[:3]
    assert not blocks.intact()


def _decode_step_launches(model, **generator_kwargs):
    """The device work of one decode step, as names: each Triton launch and each aten op that is
    not a view (the custom ops' own launches are the Triton ones)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    gen = Generator(model, 2, 64, cuda_graph=False, **generator_kwargs)
    gen.generate([[5, 6, 7], [8]], 2)  # (greedy)
    st = next(iter(gen._states.values()))
    names = []
    launch = InterpretedFunction.__getitem__

    def recorded(self, grid):
        names.append(self.fn.__name__)
        return launch(self, grid)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            # (_unsafe_view: a view its schema does not mark; scalar_tensor: a host scalar)
            if func.namespace == "aten" and not func.is_view and name not in ("_unsafe_view", "scalar_tensor"):
                names.append(name)
            return func(*args, **(kwargs or {}))

    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(InterpretedFunction, "__getitem__", recorded)
        with Ops():
            gen._step(st)
    return names


@pytest.mark.skipif(not INTERPRETER, reason="counts the interpreter's launches")
def test_a_greedy_decode_step_launches_ten_kernels_per_layer_and_eleven_more():
    """At batch 1 a decode step is a few hundred launches of a few microseconds each beside
    reading the weights once: each one counts. Per layer: the input norm, the q/k/v GEMM, rotary +
    cache append, decode attention (on a GPU a split kernel and its combine; here one pass), the
    output projection, the add + norm, the gate/up GEMM, SwiGLU, the down GEMM. Per step: the
    token fed (a finished sequence's pad is not an id), the embedding, the lengths, the last add +
    final norm, the LM head, greedy argmax into the token buffer, the pad of finished sequences,
    the stop-token check (3 ops) and the lengths advanced."""
    one, two = (_decode_step_launches(_tiny_model(num_hidden_layers=n)) for n in (1, 2))
    layer = list(two)
    for n in one:
        layer.remove(n)
    assert sorted(layer) == sorted(["rms_norm_fwd_kernel", "mm", "rotary_cache_kernel", "decode_split_kernel", "mm",
                                    "rms_norm_fwd_kernel", "mm", "swiglu_fwd_kernel", "mm"]), layer
    fixed = list(one)
    for n in layer:
        fixed.remove(n)
    assert fixed == ["where", "embedding", "add", "rms_norm_fwd_kernel", "mm", "argmax", "masked_fill_", "eq", "any",
                     "bitwise_or_", "add_"], fixed


def test_a_transformers_checkpoint_missing_a_tensor_or_misshapen_is_refused(tmp_path):
    """transformers initialises a weight its files lack at random and only logs it, and raises
    its own RuntimeError for a wrong shape: load_checkpoint (what ``fastllama generate`` runs)
    refuses both with a CheckpointError naming the tensor, as the reference loader does."""
    import transformers
    from safetensors.torch import load_file, save_file

    from fastllama.checkpoint import CheckpointError
    from fastllama.generate import load_checkpoint

    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16))
    model.save_pretrained(tmp_path)
    good = load_file(tmp_path / "model.safetensors")
    assert isinstance(load_checkpoint(tmp_path, torch.float32, "cpu"), transformers.Qwen3ForCausalLM)
    name = "model.layers.1.self_attn.o_proj.weight"
    save_file({k: v for k, v in good.items() if k != name}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing keys: \['{name}'\]"):
        load_checkpoint(tmp_path, torch.float32, "cpu")
    save_file(dict(good, **{name: good[name][:, :32].contiguous()}), tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"shape mismatches: .*{name}"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_fastllama_generate_loads_every_family_the_generator_takes():
    """``fastllama generate`` loads through transformers exactly the HF causal LMs the Generator
    runs (a Llama loads into the reference model): the two lists stay one."""
    import transformers

    from fastllama import model_weights
    from fastllama.generate import TRANSFORMERS_MODEL_TYPES

    types = {getattr(transformers, name).config_class.model_type for name in model_weights._HF_CAUSAL_LMS}
    assert types - {"llama"} == set(TRANSFORMERS_MODEL_TYPES)


@pytest.mark.parametrize("arch", ["llama", "gemma", "olmo2", "flex-olmo", "helium", "glm4"])
def test_the_generators_norms_round_as_the_models_own(arch):
    """bf16: the generator computes each RMSNorm from its weight; it must round as the model's own
    class does: Llama's rounds the normalised x, then multiplies by w (two roundings), Gemma's,
    OLMo 2's, FlexOlmo's and Helium's compute in fp32 and round once (FlexOlmo's and Helium's
    rounded twice: a last-bit difference in about a third of the elements, which bf16 decoding
    can turn into another token)."""
    model = _hf_model(arch).to(torch.bfloat16)
    gen = Generator(model, 1, 8)
    x = torch.randn(3, 5, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    norm = model.model.layers[0].post_attention_layernorm
    with torch.no_grad():
        norm.weight.add_(torch.randn_like(norm.weight))  # weights far from 1: rounding w * x matters
        mismatched = (gen._norm(x, norm) != norm(x)).float().mean().item()
    assert mismatched < 0.01, mismatched


def test_ernie_generates_in_bf16_with_its_fp32_rotary_tables():
    """Ernie 4.5's rotary module keeps cos/sin in fp32 whatever the model's dtype, and HF rotates
    with them in fp32: the generator keeps them so (the rotary + cache-append kernel takes fp32
    tables beside 16-bit q; it refused them, and a bf16 Ernie did not generate at all)."""
    model = _hf_model("ernie4_5-bias").to(torch.bfloat16)
    gen = Generator(model, 1, 24)
    assert gen.rotary[0][0].dtype == torch.float32
    ids = torch.tensor([list(range(10, 21))], device=DEVICE)
    with torch.no_grad():
        got = gen._forward(ids, torch.zeros(1, dtype=torch.int32, device=DEVICE), None)[0].float()
        want = model(ids).logits[0, -1].float()
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.abs().max().item())
    assert len(gen.generate([[5, 6, 7]], 4, stop_tokens=[])[0]) == 7


def test_granitemoe_experts_are_named_where_the_layer_keeps_them():
    """GraniteMoE's layer keeps its experts in ``block_sparse_moe`` (not ``mlp``): a hooked one is
    refused under that name, and the generator reads the router's weights and indices whatever
    order its transformers version returns them in."""
    model = _hf_model("granitemoe-multipliers")
    _refuses_hooked_experts(model, "block_sparse_moe")
    router = model.model.layers[0].block_sparse_moe.router
    logits, weights, index = router(torch.randn(5, model.config.hidden_size, device=DEVICE))
    if logits.is_floating_point():  # (transformers 5.25's order; 5.17 returns index first)
        router.forward = lambda x, f=router.forward: tuple(reversed(f(x)))  # the other order: same tokens
        expected = Generator(model, 1, 16).generate([[3, 4, 5]], 4)
        del router.forward
        assert Generator(model, 1, 16).generate([[3, 4, 5]], 4) == expected
