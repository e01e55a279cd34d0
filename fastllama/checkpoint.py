"""Hugging Face-format checkpoints: config.json + safetensors (one file, or sharded with an index).

Loading is strict and checks everything before touching a weight: a missing key, an unexpected
key or a shape mismatch raises :class:`CheckpointError` naming all of them, and the model is not
half-loaded.
"""
from __future__ import annotations

import contextlib
import json
import types
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["CheckpointError", "read_config", "read_generation_config", "load_pretrained", "save_pretrained",
           "checkpoint_files"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


class CheckpointError(ValueError):
    """A checkpoint directory does not match the model it is loaded into."""


def _read_json_object(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a JSON {type(data).__name__}; a JSON object is expected")
    return data


def read_config(path) -> dict:
    """The parsed ``config.json`` of a checkpoint directory."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (an HF-format checkpoint directory is expected)")
    return _read_json_object(cfg)


@contextlib.contextmanager
def _open_safetensors(file: Path, device=None):
    """``safe_open``, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        with safe_open(file, framework="pt", **({"device": device} if device else {})) as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def checkpoint_files(path) -> dict[str, Path]:
    """Maps every tensor name in the checkpoint to the safetensors file that holds it."""
    path = Path(path)
    if (path / INDEX).is_file():
        weight_map = _read_json_object(path / INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX} has no \"weight_map\" object (tensor name -> shard file)")
        files = {name: path / f for name, f in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not f.is_file()})
        if absent:
            raise CheckpointError(f"{path}: shard files named in {INDEX} are missing: {absent}")
        return files
    if (path / SINGLE).is_file():
        with _open_safetensors(path / SINGLE) as f:
            return {name: path / SINGLE for name in f.keys()}
    raise CheckpointError(f"{path}: neither {SINGLE} nor {INDEX} found")


def read_generation_config(path) -> types.SimpleNamespace | None:
    """``generation_config.json`` as attributes (every field kept, so that saving writes it back
    whole; ``eos_token_id``, ``pad_token_id``, ``bos_token_id`` always present), None when there
    is none. A malformed one is ignored with a warning, as HF's from_pretrained does."""
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return None
    try:
        data = _read_json_object(file)
    except CheckpointError as e:
        warnings.warn(f"{e}; ignored (the stop tokens are config.json's)", stacklevel=3)
        return None
    return types.SimpleNamespace(**{"eos_token_id": None, "pad_token_id": None, "bos_token_id": None, **data})


def _expected_tensors(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Persistent state of the model, with tied parameters listed once (first name wins)."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen[id(t)] = name
        out[name] = t.shape
    return out


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device=None):
    """Builds ``cls(config)`` from ``path`` and loads its weights strictly.

    ``dtype`` defaults to the config's ``torch_dtype``/``dtype`` when given there, else fp32.
    """
    path = Path(path)
    config = read_config(path)
    if dtype is None:
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = getattr(torch, name) if isinstance(name, str) and hasattr(torch, name) else torch.float32
    with torch.device("meta"):
        model = cls(config)
    files = checkpoint_files(path)
    expected = _expected_tensors(model)

    # Check every key and shape before loading anything.
    found: dict[str, tuple[int, ...]] = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file) as f:
            for name in f.keys():
                if files.get(name) == file:
                    found[name] = tuple(f.get_slice(name).get_shape())
    tied = getattr(model.config, "tie_word_embeddings", False)
    # Tied, either of the two may stand for both (HF ties the one the checkpoint has)
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    optional = {head, embed} if tied and (head in found or embed in found) else set()
    missing = sorted(set(expected) - set(found) - optional)
    # transformers < 4.31 saved each layer's rotary inv_freq buffer, a function of the config
    # that HF also ignores on load
    unexpected = sorted(k for k in set(found) - set(expected) - optional if not k.endswith("rotary_emb.inv_freq"))
    shapes = {k: tuple(v) for k, v in expected.items()}
    if optional:  # (tied: the head has the embedding's shape, and the other way round)
        shapes.setdefault(head, shapes.get(embed))
        shapes.setdefault(embed, shapes.get(head))
    mismatched = sorted(
        f"{k}: checkpoint {found[k]} vs model {shapes[k]}"
        for k in set(found) & set(shapes) if shapes[k] != found[k]
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched}")
        raise CheckpointError(f"{path} does not match {cls.__name__}:\n  " + "\n  ".join(problems))

    state = {}
    for file in sorted(set(files.values())):
        with _open_safetensors(file, device="cpu") as f:
            for name in f.keys():
                if name in expected or name in optional:
                    state[name] = f.get_tensor(name).to(dtype)
    model = model.to_empty(device=device or "cpu").to(dtype)
    if tied and head in state and embed in state and not torch.equal(state[head], state[embed]):
        # The config says tied, the checkpoint holds two different matrices: the config is wrong.
        # HF keeps both (untied, with a warning); tying would drop the trained head.
        warnings.warn(f"{path}: tie_word_embeddings is true but the checkpoint's lm_head.weight differs from "
                      "its embedding: loaded untied, as transformers does (set tie_word_embeddings=false)",
                      stacklevel=2)
        model.config.tie_word_embeddings = False
    elif tied:  # to_empty() makes a new tensor per module, which unties lm_head from the embedding
        model.lm_head.weight = model.model.embed_tokens.weight
        if embed not in state:
            state[embed] = state.pop(head)
        state.pop(head, None)
    model.load_state_dict(state, strict=False)  # every key was checked above
    model.generation_config = read_generation_config(path)
    return model


def save_pretrained(model, path) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (tied ``lm_head.weight`` left out, as HF does),
    and the ``generation_config.json`` the model was loaded with, if any (all of its fields)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf()
    config["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / SINGLE), metadata={"format": "pt"})
    if getattr(model, "generation_config", None) is not None:
        (path / GENERATION_CONFIG).write_text(json.dumps(vars(model.generation_config), indent=2, sort_keys=True))
