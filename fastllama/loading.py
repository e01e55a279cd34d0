"""What ``fastllama generate`` loads: a checkpoint directory's model and tokenizer.

A Llama loads into :class:`fastllama.reference.Llama` (no transformers needed); the other
families the generator runs load through transformers (:data:`TRANSFORMERS_MODEL_TYPES`), as
strictly as the reference loader: a tensor missing from the files or of the wrong shape is an
error, not a random weight.
"""
from __future__ import annotations

import warnings

import torch

from .checkpoint import CheckpointError
from .reference.model import Llama

__all__ = ["load_checkpoint", "load_tokenizer", "TRANSFORMERS_MODEL_TYPES"]


class _HFTokenizer:
    """A ``tokenizer.json`` (HF ``tokenizers``) with fastllama.Tokenizer's encode/decode."""

    def __init__(self, path):
        from tokenizers import Tokenizer as _Tok

        self.tok = _Tok.from_file(str(path))
        self.eos_id = -1

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids  # BOS as the file's post-processor adds it

    def decode(self, ids) -> str:
        # ids outside the vocabulary (a checkpoint's vocab padded past the tokenizer's, -1 pads)
        # are skipped, as sentencepiece's wrapper does
        n = self.tok.get_vocab_size(with_added_tokens=True)
        return self.tok.decode([int(i) for i in ids if 0 <= int(i) < n], skip_special_tokens=True)


def load_tokenizer(path):
    """The tokenizer of checkpoint directory ``path``, as ``fastllama generate`` loads it: its
    ``tokenizer.json`` when present and ``tokenizers`` is installed (as HF does; Llama 3 ships
    only this), else its sentencepiece ``tokenizer.model`` (:class:`fastllama.Tokenizer`). Both
    have ``encode(text) -> ids`` (with the BOS the tokenizer adds) and ``decode(ids) -> text``.

    Raises:
        FileNotFoundError: neither file is there (or only a tokenizer.json without ``tokenizers``).
        ValueError: the file is not a readable tokenizer (a bad tokenizer.json next to a good
            tokenizer.model warns and uses the latter).
    """
    from pathlib import Path

    from .tokenizer import Tokenizer

    path = Path(path)
    json_file, sp_file = path / "tokenizer.json", path / "tokenizer.model"
    if json_file.is_file():
        try:
            return _HFTokenizer(json_file)
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001  (tokenizers raises a bare Exception on a bad file)
            if not sp_file.is_file():
                raise ValueError(f"{json_file} is not a readable tokenizer file: {e}") from None
            warnings.warn(f"{json_file} is not a readable tokenizer file ({e}); using {sp_file}", stacklevel=2)
    if sp_file.is_file():
        try:
            return Tokenizer(path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{sp_file} is not a sentencepiece model: {e}") from None
    raise FileNotFoundError(f"{path}: no tokenizer.model (sentencepiece) nor a usable tokenizer.json "
                            f"(needs the `tokenizers` package)")


# config.json model types that ``fastllama generate`` loads through transformers (the Generator
# runs them as they are); "llama" loads into the reference model, without transformers.
TRANSFORMERS_MODEL_TYPES = ("mistral", "ministral", "qwen2", "qwen3", "smollm3", "phi3", "granite", "gemma",
                            "gemma2", "gemma3_text", "olmo2", "olmo3", "cwm", "seed_oss", "helium", "ernie4_5",
                            "glm", "glm4", "arcee", "apertus", "exaone4", "vaultgemma", "hyperclovax", "ministral3",
                            "hunyuan_v1_dense",
                            "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                            "flex_olmo", "granitemoe", "olmo", "dots1", "glm4_moe",
                            "hunyuan_v1_moe", "ernie4_5_moe", "mellum", "solar_open", "minimax_m2", "exaone_moe",
                            "gpt_oss", "granitemoeshared", "granite_swa", "granitemoe_swa",
                            "llama4_text",  # (Llama 4's text model alone: a multimodal "llama4" is not taken)
                            "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4", "minicpm3")


def load_checkpoint(path, dtype: torch.dtype, device) -> torch.nn.Module:
    """The model of checkpoint directory ``path`` in eval mode, as ``fastllama generate`` loads
    it: a Llama into :class:`fastllama.reference.Llama` (strict, see
    :mod:`fastllama.checkpoint`); a Mistral, Ministral, Qwen2, Qwen3, SmolLM3, Phi-3, Granite,
    Gemma, Gemma 2, Gemma 3 text, OLMo 2, OLMo 3, CWM, Seed-OSS, Helium, Ernie 4.5, GLM, GLM-4,
    Arcee, Apertus, EXAONE 4, VaultGemma, HyperCLOVA X, Ministral 3, HunYuan (dense), Mixtral,
    Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, GraniteMoE, dots.llm1, GLM-4.5, HunYuan MoE, Ernie 4.5 MoE, Mellum,
    Solar Open, MiniMax-M2, EXAONE MoE, gpt-oss, GraniteMoeShared, Granite SWA, GraniteMoE SWA,
    Llama 4 (text, ``llama4_text``), DeepSeek-V3, DeepSeek-V2, GLM-4.7-Flash, Mistral 4, MiniCPM3
    or OLMo (1) model (``model_type`` in config.json) through transformers'
    ``AutoModelForCausalLM`` (Mistral 4's own causal LM class: no auto class maps it), which must
    then be installed. (gpt-oss's released weights are MXFP4-quantised experts: transformers
    dequantises them to ``dtype`` where its MXFP4 kernels do not run; where they do, it keeps
    quantised expert modules, which the generator refuses, naming them.)"""
    import json
    from pathlib import Path

    config = Path(path) / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (ValueError, AttributeError):
            pass  # the reference loader reports a malformed config.json
    if isinstance(model_type, str) and model_type != "llama" and model_type not in TRANSFORMERS_MODEL_TYPES:
        hint = (" (a Gemma 3 with its vision tower: the text model alone, model_type 'gemma3_text', is supported)"
                if model_type == "gemma3" else "")
        raise ValueError(f"{path} holds a {model_type!r} model, which fastllama generate does not take{hint}; "
                         f"supported model types: {', '.join(sorted(['llama', *TRANSFORMERS_MODEL_TYPES]))}")
    if model_type not in TRANSFORMERS_MODEL_TYPES:
        return Llama.from_pretrained(path, dtype=dtype, device=device).eval()
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ValueError(f"{path} holds a {model_type!r} model, which loads through transformers: "
                         "pip install transformers") from None
    from safetensors import SafetensorError

    from .model_weights import _HF_CAUSAL_LMS

    loader = transformers.AutoModelForCausalLM
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:  # (Mistral 4's text model: no auto class maps it)
        loader = next(getattr(transformers, name) for name in _HF_CAUSAL_LMS
                      if getattr(transformers, name).config_class.model_type == model_type)
    try:
        # (ignore_mismatched_sizes: a tensor of the wrong shape is listed, not raised as an error
        # that names none; the check below refuses it)
        model, info = loader.from_pretrained(path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, SafetensorError) as e:  # missing or unreadable weight files: the user's to fix
        raise ValueError(f"transformers could not load the {model_type!r} checkpoint {path}: {e}") from None
    # transformers initialises a weight the files lack (or one of the wrong shape) at random and
    # only logs it: as strict as the reference loader (fastllama.checkpoint) instead
    def describe(entry):  # a mismatch is (name, checkpoint shape, model shape)
        if isinstance(entry, tuple) and len(entry) == 3:
            return f"{entry[0]} (checkpoint {tuple(entry[1])}, config {tuple(entry[2])})"
        return str(entry)

    problems = {what: sorted(describe(k) for k in info.get(key) or ())
                for what, key in (("missing keys", "missing_keys"), ("shape mismatches", "mismatched_keys"))}
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        raise CheckpointError(f"{path} does not match its {model_type!r} config: "
                              + "; ".join(f"{what}: {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                                          for what, keys in problems.items()))
    return model.to(device).eval()
