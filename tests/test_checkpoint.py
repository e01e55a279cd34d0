"""HF-format checkpoints: sharded loading, strict key checks, and round trips both ways."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from fastllama.checkpoint import CheckpointError
from fastllama.hf_parity import TINY_CONFIGS
from fastllama.reference import Llama

hf_logging.disable_progress_bar()


def _hf(name="gqa4-untied", **kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(HFConfig(**dict(TINY_CONFIGS[name], **kw))).eval()


def _same_logits(a, b, ids):
    """The two models compute the same function: compared in float64 copies, so that which fp32
    GEMM kernel this CPU's BLAS picks cannot decide the test (in fp32 the two differ by a few ulps
    of logits near 50, 1.1e-5 on some CPUs). What remains in float64 is the fp32 rotary tables
    both compute their own way (5e-6 here); a wrong weight mapping shows as O(1) differences."""
    with torch.no_grad():
        torch.testing.assert_close(_logits(copy.deepcopy(a).double(), ids), _logits(copy.deepcopy(b).double(), ids),
                                   rtol=0, atol=1e-5)


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf()
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = Llama.from_pretrained(tmp_path)
    _same_logits(ours, hf, torch.randint(0, 263, (1, 10)))


@pytest.mark.parametrize("name", ["gqa4-untied", "mha-tied"])
def test_saved_by_fastllama_loads_in_hf(tmp_path, name):
    torch.manual_seed(1)
    ours = Llama(TINY_CONFIGS[name]).eval()
    ours.save_pretrained(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    _same_logits(hf, ours, torch.randint(0, 263, (2, 10)))
    again = Llama.from_pretrained(tmp_path)
    assert again.config.tie_word_embeddings == (name == "mha-tied")
    if again.config.tie_word_embeddings:
        assert again.lm_head.weight is again.model.embed_tokens.weight


def test_dtype_argument_and_config_dtype(tmp_path):
    _hf().save_pretrained(tmp_path)
    assert Llama.from_pretrained(tmp_path, dtype=torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def _corrupt(tmp_path, edit):
    _hf().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_key_is_named(tmp_path):
    _corrupt(tmp_path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: \['model.layers.1.mlp.up_proj.weight'\]"):
        Llama.from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    _corrupt(tmp_path, lambda s: s.__setitem__("model.layers.9.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected keys: .*model.layers.9.extra"):
        Llama.from_pretrained(tmp_path)


def test_old_transformers_rotary_buffers_are_ignored(tmp_path):
    # transformers < 4.31 saved each layer's rotary inv_freq (a function of the config); HF ignores it
    _corrupt(tmp_path, lambda s: s.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    assert isinstance(Llama.from_pretrained(tmp_path), Llama)


def test_shape_mismatch_is_named(tmp_path):
    _hf().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 160
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight: checkpoint \(176, 64\) vs model \(160, 64\)"):
        Llama.from_pretrained(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIGS["gqa4-untied"]))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Llama.from_pretrained(tmp_path)


def test_unsupported_config_raises_before_weights(tmp_path):
    _hf().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="dynamic"):
        Llama.from_pretrained(tmp_path)


def test_malformed_files_are_checkpoint_errors_naming_the_file(tmp_path):
    """A config that is not a JSON object, a truncated or garbage safetensors file, an index
    without a weight_map: CheckpointError naming the file (they were AttributeError, the
    library's SafetensorError and KeyError: tracebacks from the CLI)."""
    _hf().save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json holds a JSON list"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Llama.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config)
    weights = (tmp_path / "model.safetensors").read_bytes()
    for broken in (weights[: len(weights) // 2], b"\xff" * 64):
        (tmp_path / "model.safetensors").write_bytes(broken)
        with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
            Llama.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match='index.json has no "weight_map"'):
        Llama.from_pretrained(tmp_path)


def test_generation_config_eos_ids_are_default_stop_tokens(tmp_path):
    """HF's generate stops on generation_config.json's eos ids too (Llama-3 Instruct's <|eot_id|>
    is only there); the reference model's generate ignored them. Saved back with the model."""
    hf = _hf()
    hf.save_pretrained(tmp_path)
    ids = torch.tensor([[5, 9, 4]])
    free = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 3:]
    stop = int(free[2])  # the third token becomes an eos of generation_config.json only
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop], "pad_token_id": 0}))
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    expected = hf.generate(ids, max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    ours = Llama.from_pretrained(tmp_path).eval()
    got = ours.generate(ids, max_new_tokens=8)[0, 3:].tolist()
    assert got[:3] == expected[:3] and expected[2] == stop
    assert all(t == 0 for t in got[3:])  # stopped: the rest is padding
    ours.save_pretrained(tmp_path / "again")
    assert Llama.from_pretrained(tmp_path / "again").generation_config.eos_token_id == [2, stop]


def test_generation_config_survives_a_save_and_a_malformed_one_is_ignored(tmp_path):
    """Saving into the directory loaded from keeps every field (sampling defaults too: writing
    back only the token ids made an Instruct checkpoint greedy in HF); a malformed file is
    ignored with a warning, as HF's from_pretrained does, not a refused checkpoint."""
    _hf().save_pretrained(tmp_path)
    fields = {"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (tmp_path / "generation_config.json").write_text(json.dumps(fields))
    Llama.from_pretrained(tmp_path).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert {k: saved[k] for k in fields} == fields
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.warns(UserWarning, match="generation_config.json is not valid JSON"):
        model = Llama.from_pretrained(tmp_path)
    assert model.generation_config is None


def _rewrite(path, config=None, weights=None):
    """Edits a saved checkpoint in place: ``config(dict)`` and ``weights(dict)`` change them."""
    if config is not None:
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        state = load_file(path / "model.safetensors")
        weights(state)
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def test_tied_config_over_two_different_matrices_loads_untied_as_hf_does(tmp_path):
    """The reference tied anyway and dropped the checkpoint's trained head: logits off by 28.7."""
    _hf("mha-tied").save_pretrained(tmp_path)
    _rewrite(tmp_path, weights=lambda s: s.update({"lm_head.weight": torch.randn_like(s["model.embed_tokens.weight"])}))
    with pytest.warns(UserWarning, match="loaded untied"):
        ours = Llama.from_pretrained(tmp_path)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight and not ours.config.tie_word_embeddings
    _same_logits(ours, LlamaForCausalLM.from_pretrained(tmp_path), torch.randint(0, 263, (1, 10)))


def test_tied_checkpoint_holding_only_the_head_ties_to_it(tmp_path):
    _hf("mha-tied").save_pretrained(tmp_path)
    _rewrite(tmp_path, weights=lambda s: s.update({"lm_head.weight": s.pop("model.embed_tokens.weight")}))
    ours = Llama.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _same_logits(ours, LlamaForCausalLM.from_pretrained(tmp_path), torch.randint(0, 263, (1, 10)))


@pytest.mark.parametrize("edit", [
    # rope_scaling added next to the saved rope_parameters (as older guides say): it wins in HF
    lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # a top-level original_max_position_embeddings wins over the one in the rope dict
    lambda c: c.update(original_max_position_embeddings=4),
    # none at all: llama3 falls back to max_position_embeddings
    lambda c: (c["rope_parameters"].pop("original_max_position_embeddings"), c.update(max_position_embeddings=16)),
], ids=["rope_scaling-wins", "top-level-original-max", "no-original-max"])
def test_rope_keys_are_read_as_transformers_reads_them(tmp_path, edit):
    """Each of these gave the reference other rotary frequencies than HF (logits off by 3.5-5.2)
    or a bare KeyError."""
    _hf("llama3-rope").save_pretrained(tmp_path)
    _rewrite(tmp_path, config=edit)
    _same_logits(Llama.from_pretrained(tmp_path), LlamaForCausalLM.from_pretrained(tmp_path),
                 torch.randint(0, 263, (1, 40)))


def test_config_dtype_wins_over_legacy_torch_dtype(tmp_path):
    """transformers 5 takes ``dtype`` when a config.json has both it and ``torch_dtype``."""
    import transformers

    _hf().save_pretrained(tmp_path)
    _rewrite(tmp_path, config=lambda c: c.update(dtype="float16", torch_dtype="float32"))
    assert transformers.AutoConfig.from_pretrained(tmp_path).dtype == torch.float16
    assert Llama.from_pretrained(tmp_path).lm_head.weight.dtype == torch.float16


def test_tied_checkpoint_with_a_head_of_the_wrong_shape_is_named(tmp_path):
    _hf("mha-tied").save_pretrained(tmp_path)
    _rewrite(tmp_path, weights=lambda s: s.update({"lm_head.weight": torch.zeros(5, 64)}))
    with pytest.raises(CheckpointError, match=r"lm_head.weight: checkpoint \(5, 64\)"):
        Llama.from_pretrained(tmp_path)
