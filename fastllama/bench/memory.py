"""The training-memory report: bytes autograd keeps for backward, per token, per layer.

Activation memory is what autograd saves between the forward and the backward. It does not
depend on the device, so it is measured here on whatever device runs the forward (the CPU under
the Triton interpreter is fine): ``torch.autograd.graph.saved_tensors_hooks`` sees every tensor
an op saves for its backward (C++ ops and ``ctx.save_for_backward`` alike), and the report adds
tensors that a Python autograd function keeps as plain ``ctx`` attributes, found by walking the
graph, so nothing fastllama keeps escapes the count.

How bytes are counted:

* a storage is counted once however many views of it are saved, at its full size (a saved
  slice keeps the whole storage alive);
* parameters (and views of them) are not activations and are not counted;
* a storage belongs to the part of the model that saved it first: a decoder layer, the LM head
  + loss (what ``LlamaForCausalLM.forward`` does after the decoder), or "other" (embedding,
  rotary tables, final norm);
* the model is run at two token counts and each part is fitted as ``fixed + per_token * tokens``:
  the slope is the per-token cost, the intercept what a step keeps regardless of its length
  (fastllama's fused linear cross-entropy computes the LM head's weight gradient in the forward
  and keeps it until the backward: that shows up here, honestly, as fixed bytes).

Only the forward runs (saved tensors are all known when it returns), with two decoder layers
(layer 0 also owns the rotary tables; "per layer" is the last layer) and a real vocabulary.

Execution is "real" (the kernels run; on a CPU under the Triton interpreter) or "fake" (the same
forward under ``FakeTensorMode``: every op, fastllama's custom ops through their registered fake
implementations, produces tensors with shapes but no data, and autograd saves exactly what it
saves for real). By default the big shapes run fake on a CPU, where a bf16 GEMM with a 128k
reduction takes over a minute; tests/test_bench.py checks that fake and real save the same
tensors, byte for byte, tensor by tensor.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from .._interpreter import wrong_bf16_values_ok
from . import common
from .presets import get_preset

__all__ = ["SavedBytes", "measure_saved", "memory_report", "MODES", "DEFAULT_PRESETS", "DEFAULT_TOKENS"]

MODES = ("hf-sdpa", "hf+fastllama", "reference+fastllama")
DEFAULT_PRESETS = ("tiny", "llama-3.2-1b", "llama-3-8b", "qwen3-0.6b", "phi-4-mini", "gemma-3-1b", "olmo-2-1b",
                   "qwen3-30b-a3b", "deepseek-v2-lite")
DEFAULT_TOKENS = (8, 16)
# The step length at which the head + loss is also compared with its fixed bytes included (the
# issues' training shape: sequences of 4k tokens)
STEP_TOKENS = 4096
_HEAD = "head+loss"
_OTHER = "other"
_HEAD_AT_STEP = f"head+loss vs HF, {STEP_TOKENS}-token step"


@dataclasses.dataclass
class SavedBytes:
    """Bytes saved for backward by each part of the model in one forward of ``tokens`` tokens."""

    tokens: int
    by_part: dict[str, int]  # "layer.<i>", "head+loss", "other"
    ctx_attribute_bytes: int  # of which: tensors kept as ctx attributes, not via save_for_backward
    detail: list[tuple]  # (part, module, shape, dtype, nbytes, how) per storage


def _storage_key(t: torch.Tensor):
    # the StorageImpl pointer: the same for every view of one storage
    return t.untyped_storage()._cdata


def _part(module_name: str) -> str:
    """Which part of a causal LM a module belongs to, by its qualified name."""
    if module_name == "?":
        return "unattributed"  # kept on a ctx object: found after the forward, module unknown
    m = re.match(r"model\.layers\.(\d+)(\.|$)", module_name)
    if m:
        return f"layer.{m.group(1)}"
    if module_name == "" or module_name.startswith("lm_head"):
        return _HEAD  # what the causal-LM forward does around the decoder: the head and the loss
    return _OTHER  # embedding, rotary tables, final norm


def _is_part_boundary(module_name: str) -> bool:
    """Modules the recorder hooks: enough to tell the parts apart (the root, the LM head, each
    decoder layer, the other children of the base model), and no deeper, because hooks change
    what they watch: ``fastllama.patch`` folds a norm into the linears after it only when no
    hooks need those modules' calls (see ``fastllama.forwards``)."""
    return (module_name.count(".") <= 1 or re.fullmatch(r"model\.layers\.\d+", module_name) is not None)


class _Recorder:
    """Attributes each saved storage to the innermost module running when it is first saved."""

    def __init__(self, model: nn.Module):
        self.params = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
        self.seen: dict = {}  # storage key -> (part, nbytes)
        self.detail: list[tuple] = []  # (part, module, shape, dtype, nbytes, how)
        self.stack: list[str] = []
        self.handles = []
        self.ctx_bytes = 0
        self.keep = []  # the storages counted, kept alive so that no key is reused
        for name, module in model.named_modules():
            if _is_part_boundary(name):
                self._track(module, name)

    def _track(self, module: nn.Module, name: str) -> None:
        def enter(m, args):
            self.stack.append(name)

        def leave(m, args, out):  # (a hook that returns something replaces the output)
            self.stack.pop()

        from ..forwards import output_agnostic

        self.handles.append(module.register_forward_pre_hook(enter))
        # (marked: on a patched lm_head an unmarked hook would turn the fused loss off)
        self.handles.append(module.register_forward_hook(output_agnostic(leave)))

    def add(self, t: torch.Tensor, module: str | None = None, how: str = "saved") -> int:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return 0
        key = _storage_key(t)
        if key in self.params or key in self.seen:
            return 0
        nbytes = t.untyped_storage().nbytes()
        self.keep.append(t.untyped_storage())
        if module is None:
            module = self.stack[-1] if self.stack else ""
        part = _part(module)
        self.seen[key] = (part, nbytes)
        self.detail.append((part, module, tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes, how))
        return nbytes

    def pack(self, t):
        self.add(t)
        return t  # keep the tensor itself: the forward and backward behave exactly as without hooks

    def add_ctx_attributes(self, root) -> None:
        """Tensors stashed on Python autograd ``ctx`` objects (not via save_for_backward)."""
        # the visited nodes are kept, not only their ids: a node wrapper freed during the walk
        # could give its id to a node not visited yet, which would then be skipped
        visited, seen_ids, todo = [], set(), [root]
        while todo:
            node = todo.pop()
            if node is None or id(node) in seen_ids:
                continue
            visited.append(node)
            seen_ids.add(id(node))
            for value in getattr(node, "__dict__", {}).values():
                for t in tree_leaves(value):  # also inside nested lists, tuples and dicts
                    if isinstance(t, torch.Tensor):
                        self.ctx_bytes += self.add(t, "?", how=f"ctx attribute of {type(node).__name__}")
            todo.extend(n for n, _ in node.next_functions)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def recorded_forward(model: nn.Module, input_ids: torch.Tensor):
    """One training forward of ``model`` (HF or reference causal LM) with ``labels=input_ids``,
    watched by a :class:`_Recorder`; returns ``(recorder, loss)``. While ``loss`` is alive its
    graph keeps every saved tensor alive (tests check the recorder against that)."""
    rec = _Recorder(model)
    try:
        # Only bytes are counted. Under the interpreter bf16 values come out wrong (its tl.dot,
        # triton-lang/triton#11584; the ops refuse them unless told so) and NumPy warns of
        # overflows in them: noise, silenced here.
        with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t), warnings.catch_warnings(), \
                wrong_bf16_values_ok():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = model(input_ids=input_ids, labels=input_ids)
        loss = out.loss if hasattr(out, "loss") else out[1]
        rec.add_ctx_attributes(loss.grad_fn)
    finally:
        rec.close()
    return rec, loss


def measure_saved(model: nn.Module, tokens: int, batch: int = 1, seed: int = 0) -> SavedBytes:
    """One training forward of ``model`` (HF or reference causal LM) on random tokens with labels;
    returns the bytes saved for backward by each part."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g).to(device)
    rec, loss = recorded_forward(model, ids)
    by_part: dict[str, int] = {}
    for part, nbytes in rec.seen.values():
        by_part[part] = by_part.get(part, 0) + nbytes
    del loss
    return SavedBytes(batch * tokens, by_part, rec.ctx_bytes, rec.detail)


def _is_fake() -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


def build_model(mode: str, config: dict, dtype=torch.bfloat16, device="cpu") -> nn.Module:
    """A training-mode model for ``mode`` with cheap random weights (values do not change what
    is saved): "hf-sdpa", "hf+fastllama" (HF sdpa, then ``fastllama.patch``), "reference+fastllama".
    Under a ``FakeTensorMode`` the weights are fake too (no memory, no compute)."""
    from .presets import hf_model, reference_model

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    make = reference_model if mode.startswith("reference") else hf_model
    if _is_fake():
        model = make(config, dtype, device)  # initialisation costs nothing on fake tensors
    else:
        model = _cheap_random(make(config, dtype, "meta").to_empty(device=device), dtype)
    model.train()
    if mode.endswith("fastllama"):
        from ..patching import patch

        patch(model)
    return model


def _cheap_random(model: nn.Module, dtype) -> nn.Module:
    """Fills the weights of a model allocated with ``to_empty`` (norm weights 1) and recomputes
    its rotary buffers."""
    device = next(model.parameters()).device
    with torch.no_grad():
        # one random block tiled over every weight: memcpy speed (uniform_ on a 128k x 4096
        # bf16 embedding alone takes many seconds on a CPU)
        block = torch.empty(1 << 20, dtype=dtype).uniform_(-0.02, 0.02).to(device)
        for p in model.parameters():
            flat = p.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - start)
                flat[start:start + n].copy_(block[:n])
        for m in model.modules():
            if hasattr(m, "variance_epsilon"):
                m.weight.fill_(1.0)
    if hasattr(model, "inv_freq"):  # the reference model
        model.inv_freq = model.config.inv_freq().to(device)
    else:  # a fresh rotary module (its buffers, one set per layer type for Gemma 3, on device)
        rot = model.model.rotary_emb
        with torch.device(device):
            model.model.rotary_emb = type(rot)(rot.config)
    return model


def execution_for(preset: str, device: str, execution: str = "auto") -> str:
    """"real" (run the kernels) or "fake" (shapes only, under FakeTensorMode). "auto": real on a
    GPU and for the tiny preset; fake for the big shapes on a CPU, where a bf16 GEMM over a 128k
    vocabulary takes minutes (tests/test_bench.py checks fake == real byte for byte)."""
    if execution not in ("auto", "real", "fake"):
        raise ValueError(f"execution must be 'auto', 'real' or 'fake', got {execution!r}")
    if execution != "auto":
        return execution
    return "real" if device == "cuda" or preset == "tiny" else "fake"


def measure_mode(mode: str, config: dict, token_counts, device="cpu", execution="real"):
    """``measure_saved`` at each token count for a freshly built ``mode`` model."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    torch.manual_seed(0)
    with FakeTensorMode() if execution == "fake" else contextlib.nullcontext():
        model = build_model(mode, config, device=device)
        try:
            return [measure_saved(model, t) for t in token_counts]
        except DataDependentOutputException as e:
            # fastllama's attention reads a mask's values to pick its kernel; a fake tensor has
            # none (HF builds masks past a sliding window, or for a mask it cannot skip)
            raise ValueError(f"fake execution cannot run {mode} at {list(token_counts)} tokens: the model builds "
                             "an attention mask there, whose values pick fastllama's kernel; use fewer tokens "
                             "(below any sliding window) or a GPU (real execution)") from e


def memory_report(presets=DEFAULT_PRESETS, modes=MODES, token_counts=DEFAULT_TOKENS,
                  device="cpu", progress: bool = True, execution: str = "auto") -> list[dict]:
    """Rows (one per preset x mode) of saved bytes per token per layer, for the LM head + loss,
    and the fixed bytes, fitted over ``token_counts``; ratios to HF sdpa where it was measured."""
    t1, t2 = token_counts
    rows = []
    # (the reference model is a Llama: its mode runs for Llama presets only)
    jobs = [(p, m) for p in presets for m in modes
            if not (m.startswith("reference") and get_preset(p).model_type != "llama")]
    bar = common.progress_bar(jobs, desc="memory report", disable=not progress, leave=False)
    for preset_name, mode in bar:
        bar.set_postfix_str(f"{preset_name} {mode}")
        preset = get_preset(preset_name, layers=2)
        how = execution_for(preset_name, device, execution)
        a, b = measure_mode(mode, preset.config, (t1, t2), device, how)

        def fit(part):
            slope = (b.by_part.get(part, 0) - a.by_part.get(part, 0)) / (t2 - t1)
            return slope, a.by_part.get(part, 0) - slope * t1

        layer_slope, layer_fixed = fit("layer.1")
        head_slope, head_fixed = fit(_HEAD)
        other_slope, other_fixed = fit(_OTHER)
        lost_slope, lost_fixed = fit("unattributed")
        rows.append({
            "preset": preset_name, "mode": mode, "execution": how,
            "layer KiB/token": layer_slope / 1024, "head+loss KiB/token": head_slope / 1024,
            "other KiB/token": other_slope / 1024,
            "unattributed KiB/token": lost_slope / 1024,
            "layer fixed KiB": layer_fixed / 1024,
            "head+loss fixed MiB": head_fixed / 2**20,
            "ctx-attribute bytes": b.ctx_attribute_bytes,
            "raw": {"tokens": [t1, t2], "by_part": [a.by_part, b.by_part]},
        })
    base = {r["preset"]: r for r in rows if r["mode"] == "hf-sdpa"}
    for r in rows:
        hf = base.get(r["preset"])
        if hf is not None:
            r["layer vs HF"] = r["layer KiB/token"] / hf["layer KiB/token"]
            r["head+loss vs HF"] = r["head+loss KiB/token"] / hf["head+loss KiB/token"]
            # the per-token ratio leaves out the fixed bytes (fastllama's LM-head weight gradient,
            # computed in the forward): with them, at a step of STEP_TOKENS tokens
            r[_HEAD_AT_STEP] = _head_bytes(r, STEP_TOKENS) / _head_bytes(hf, STEP_TOKENS)
    return rows


def _head_bytes(row: dict, tokens: int) -> float:
    """Bytes the LM head + loss keeps for a step of ``tokens`` tokens: fixed + per token."""
    return row["head+loss fixed MiB"] * 2**20 + row["head+loss KiB/token"] * 1024 * tokens


MEMORY_COLUMNS = ["preset", "mode", "execution", "layer KiB/token", "layer vs HF", "head+loss KiB/token", "head+loss vs HF",
                  "head+loss fixed MiB", _HEAD_AT_STEP, "other KiB/token", "unattributed KiB/token"]
MEMORY_PLOTS = [
    common.Plot(x="preset", y="layer KiB/token", series="mode", title="saved for backward per token per layer",
                higher_is_better=False),
    common.Plot(x="preset", y="head+loss KiB/token", series="mode", title="saved by LM head + loss per token",
                higher_is_better=False),
]


def public_row(row: dict) -> dict:
    """The row as stored in the results JSON (without the raw per-part byte counts)."""
    return {k: v for k, v in row.items() if k != "raw"}


def memory_extra(rows: list[dict], token_counts) -> dict:
    """What the JSON keeps next to the rows: method, raw counts, targets."""
    return {
        "method": "torch.autograd.graph.saved_tensors_hooks over one training forward (labels given), bf16, "
                  "2 decoder layers, real vocabulary; execution 'real' runs the kernels (the Triton interpreter on a CPU), "
                  "'fake' runs the same forward under FakeTensorMode (same saved tensors, shapes only); storages counted once at full size, parameters excluded, "
                  "tensors kept as ctx attributes included; per token = slope between the two token counts; "
                  "'per layer' = layer 1 (layer 0 also owns the rotary tables); "
                  f"'{_HEAD_AT_STEP}' = (fixed + per token x {STEP_TOKENS}) over HF's, the fixed bytes included",
        "token_counts": list(token_counts),
        "raw_bytes_by_part": [{"preset": r["preset"], "mode": r["mode"], **r["raw"]} for r in rows],
        "targets": {"layer vs HF": "<= 0.5", "head+loss vs HF": "<= 0.05"},
    }
