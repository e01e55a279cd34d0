"""``fastllama.verify(model, inputs)``: every patched module against its original, on real
activations, under the parity rule (README.md).

One forward pass of the patched model records the inputs each patched module receives; then each
module is run three ways on those inputs: patched, original in float64 (the truth) and original
in the model's dtype (as it was, and with HF's eager attention: both plain PyTorch), and
:mod:`fastllama.testing` compares outputs and the gradients of the inputs and of the module's
parameters. Containers (decoder layers, the whole model) are compared against their fully
original computation, so their rows measure the accumulated difference.

Attention masks differ per attention implementation (SDPA takes None for "causal" or a boolean
mask, eager an additive float mask), so each original run gets the mask HF builds for ITS
implementation, recorded in one more forward pass; the patched run's mask would make eager
attention non-causal. With a padding mask, positions that are padding are left out of every
comparison: what a padding query's row holds is implementation-defined (eager and SDPA differ
there by O(1)), and letting it into "PyTorch's own error" would hide real errors elsewhere.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .attention import FALLBACKS
from .patching import _install_original, _installed_at, _state, is_patched
from .testing import ParityReport, ParityRow, float64_truth, parity_report

__all__ = ["verify", "VerifyReport"]


@dataclasses.dataclass
class VerifyReport:
    """Per-module parity reports; ``str(report)`` is the table, ``report.passed`` the verdict."""

    modules: list[tuple[str, str, ParityReport]]
    fallbacks: dict

    @property
    def passed(self) -> bool:
        return bool(self.modules) and all(r.passed for _, _, r in self.modules)

    def table(self) -> str:
        """One line per compared tensor of every module, then counts and the attention fallbacks."""
        width = max([len(r.name) for _, _, rep in self.modules for r in rep.rows] + [6]) + 2
        head = f"{'module':<36}{'class':<22}{'tensor':<{width}}{'max|err|':>11}{'allowed':>11}{'ratio':>7}  ok"
        lines = [head, "-" * len(head)]
        for name, cls, rep in self.modules:
            for r in rep.rows:
                ok = "yes" if r.passed else f"NO {r.problem}".rstrip()
                lines.append(f"{name[-35:]:<36}{cls[:21]:<22}{r.name:<{width}}{r.kernel_err:>11.2e}"
                             f"{r.allowed:>11.2e}{r.ratio:>7.2f}  {ok}")
        n_fail = sum(not r.passed for _, _, rep in self.modules for r in rep.rows)
        lines.append(f"{len(self.modules)} modules, {sum(len(rep.rows) for _, _, rep in self.modules)} tensors, "
                     f"{n_fail} failing")
        if self.fallbacks:
            lines.append("attention calls that fell back to PyTorch in the patched forward pass: "
                         + ", ".join(f"{k}: {v}" for k, v in self.fallbacks.items()))
        return "\n".join(lines)

    __str__ = table


@contextlib.contextmanager
def _original_forwards(model: nn.Module, attn: str | None = None):
    """Temporarily runs ``model`` unpatched: instance forwards removed, and the attention
    implementation set to ``attn`` (default: the one it had before patching)."""
    saved = [(m, attr, m.__dict__[attr]) for m in model.modules() if (attr := _installed_at(m)) is not None]
    for m, attr, _ in saved:
        _install_original(m, attr)
    state = _state(model)
    if state is None or state.attn_before is None:
        attn = None
    else:
        attn = attn or state.attn_before
    config = getattr(model, "config", None)
    if attn is not None:
        current = config._attn_implementation
        model.set_attn_implementation(attn)
    try:
        yield
    finally:
        for m, attr, fwd in saved:
            m.__dict__[attr] = fwd
        if attn is not None:
            model.set_attn_implementation(current)


def _losses_only(out):
    """With labels the patched causal LM builds no logits: compare the loss alone. Other model
    outputs (a base model's ``last_hidden_state`` ...) are compared field by field."""
    if hasattr(out, "loss") and hasattr(out, "logits"):
        return (out.loss,) if out.loss is not None else (out.logits,)
    if hasattr(out, "to_tuple"):  # an HF ModelOutput: a dict, which the harness would not look into
        return out.to_tuple()
    if isinstance(out, tuple):
        if len(out) == 2 and (out[1] is None or isinstance(out[1], torch.Tensor) and out[1].dim() == 4):
            return (out[0],)  # attention: (output, weights); eager's weights are no output the kernels change
        if len(out) == 2 and isinstance(out[1], torch.Tensor) and out[1].dim() == 0:  # reference (logits, loss)
            return (out[1],)
    return out


def _masks_under(model: nn.Module, inputs, attn: str, modules) -> dict:
    """The ``attention_mask`` each of ``modules`` receives when the model runs unpatched with
    attention implementation ``attn`` (HF builds a different mask for each implementation)."""
    seen: dict = {}

    def hook(module, args, kwargs):
        if module not in seen and "attention_mask" in kwargs:
            seen[module] = kwargs["attention_mask"]

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules if m is not model]
    try:
        with torch.no_grad(), _original_forwards(model, attn=attn):
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _real_positions(inputs):
    """(B, T) bool of the non-padding positions when ``inputs`` has a 2-D attention mask with
    padding, else None."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
        return mask.bool()
    return None


def _labels_without_padding(labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``labels`` with -100 (ignored) at padding and after it: a causal LM's loss at position t
    pairs the logits of t with the label of t + 1, and a padding position's logits are
    implementation-defined."""
    labels = labels.clone()
    labels[~real] = -100
    labels[:, 1:][~real[:, :-1]] = -100
    return labels


def _select_rows(out, real):
    """Outputs with leading (B, T) dims reduced to their real positions (index, so gradients
    reach only those)."""
    if real is None:
        return out
    pick = lambda t: t[real] if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == real.shape else t  # noqa: E731
    return pytree.tree_map(pick, out)


def _capture(model: nn.Module, inputs) -> list[tuple[str, nn.Module, tuple, dict]]:
    targets = {m: n for n, m in model.named_modules() if hasattr(m, "_fastllama")}
    targets.setdefault(model, "")
    seen: dict[nn.Module, tuple] = {}

    def hook(module, args, kwargs):
        if module not in seen:
            def keep(t):
                return t.detach().clone().requires_grad_(t.requires_grad and t.is_floating_point()) \
                    if isinstance(t, torch.Tensor) else t
            seen[module] = (pytree.tree_map(keep, args), pytree.tree_map(keep, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in targets]
    try:
        with torch.enable_grad():  # so captured activations know whether they need a gradient
            _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    order = [m for m in model.modules() if m in seen]
    return [(targets[m] or "<model>", m, *seen[m]) for m in reversed(order)]  # leaves first


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def _active_dropout(model: nn.Module) -> str | None:
    """The first module that drops out at random in this mode (a training model with
    ``attention_dropout`` or an ``nn.Dropout`` with p > 0), as 'name (p=...)'; None if none."""
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            return f"{name or '<model>'} (p={p})"
    return None


def verify(model: nn.Module, inputs, *, backward: bool = True, modules=None, print_table: bool = True) -> VerifyReport:
    """Checks every patched module of ``model`` against its original forward on ``inputs``.

    Args:
        model: a model ``fastllama.patch`` was applied to.
        inputs: what ``model`` is called with: a dict of keyword arguments (for HF models, e.g.
            ``{"input_ids": ids, "labels": ids}``; ``use_cache=False`` is added) or a tensor.
            With a padding ``attention_mask``, padding positions are not compared and their
            ``labels`` (and those right after them) become -100 for every run.
        backward: also compare gradients of each module's inputs and parameters.
        modules: names of the modules to check (as in ``named_modules``; "<model>" is the whole
            model); default: every patched module and the whole model.
        print_table: print the table as well as returning it.

    Returns:
        :class:`VerifyReport` (``.passed``, ``.table()``).

    Raises:
        ValueError: ``model`` is not patched, has weights on the meta device, or drops out at
            random (train mode with dropout > 0: every run would draw other masks, and their
            noise would count as PyTorch's own error, hiding real errors; use ``model.eval()``
            or dropout 0); ``modules`` is empty or names modules that did not run patched; every
            label is ignored (HF's loss is then NaN, fastllama's 0: nothing to compare).
    """
    if not is_patched(model):
        raise ValueError("verify needs a patched model: call fastllama.patch(model) first")
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("verify runs the model: its weights are on the meta device (load or materialise them first)")
    dropping = _active_dropout(model)
    if dropping is not None:
        raise ValueError(f"verify compares deterministic runs, but {dropping} drops out at random in train mode: "
                         "call model.eval() or set the dropout to 0")
    if modules is not None:
        modules = list(modules)  # (once: a generator would be empty the second time)
        if not modules:
            raise ValueError("modules is empty: nothing to compare (None checks every patched module)")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hf_model = hasattr(config, "use_cache") or hasattr(text_config, "use_cache")
    if isinstance(inputs, torch.Tensor) and hf_model:
        inputs = {"input_ids": inputs}  # (so that use_cache=False goes with it)
    if isinstance(inputs, dict) and hf_model:
        # (a composite model, e.g. Llava, keeps use_cache on its text config only; a cache built
        # by one run would be read by the next)
        inputs = dict(inputs, use_cache=False)
    real = _real_positions(inputs)
    if real is not None and isinstance(inputs.get("labels"), torch.Tensor):
        inputs = dict(inputs, labels=_labels_without_padding(inputs["labels"], real))
    labels = inputs.get("labels") if isinstance(inputs, dict) else None
    # (the loss pairs position t with label t + 1: the first label never counts)
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and bool((labels[:, 1:] == -100).all()):
        raise ValueError("every label that counts is -100 (ignored, padding included): HF's loss is NaN there "
                         "and fastllama's 0; nothing to compare")
    before = dict(FALLBACKS)
    captured = _capture(model, inputs)
    # the fallbacks of the patched model's own forward pass (the per-module runs below repeat
    # attention calls, which would count again)
    fallbacks = {k: v - before.get(k, 0) for k, v in FALLBACKS.items() if v != before.get(k, 0)}
    if modules is not None:
        wanted = set(modules)
        unknown = wanted - {name for name, *_ in captured}
        if unknown:
            raise ValueError(f"modules {sorted(unknown)} were not run as patched modules; "
                             f"checkable: {[name for name, *_ in captured]}")
        captured = [c for c in captured if c[0] in wanted]
    # The masks of the original runs' implementations (HF models only; the reference model
    # builds its masks inside the attention call).
    state = _state(model)
    masks = {}
    if state is not None and state.attn_before is not None:
        masks = {attn: _masks_under(model, inputs, attn, [m for _, m, *_ in captured])
                 for attn in {state.attn_before, "eager"}}
    results = []
    for name, module, args, kwargs in captured:
        params = dict(module.named_parameters())
        leaves, spec = pytree.tree_flatten((args, kwargs))
        float_pos = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        tensors = [leaves[i] for i in float_pos] + [p.detach().requires_grad_(backward and p.requires_grad)
                                                     for p in params.values()]
        labels = [f"in{i}" for i in range(len(float_pos))] + list(params)

        def run(*ts, _module=module, _leaves=leaves, _spec=spec, _pos=float_pos, _names=list(params), attn=None):
            filled = list(_leaves)
            for i, t in zip(_pos, ts):
                filled[i] = t
            a, kw = pytree.tree_unflatten(filled, _spec)
            if attn is not None and _module in masks.get(attn, {}):
                kw = dict(kw, attention_mask=masks[attn][_module])
            p = dict(zip(_names, ts[len(_pos):]))
            return _select_rows(_losses_only(torch.func.functional_call(_module, p, tuple(a), kw)), real)

        def original(*ts, _run=run):
            # HF modules upcast to float32 by hand; for the float64 truth make that float64
            truth = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in ts)
            with _original_forwards(model), (float64_truth() if truth else contextlib.nullcontext()):
                return _run(*ts, attn=state.attn_before if state is not None else None)

        def eager_pytorch(*ts, _run=run):
            with _original_forwards(model, attn="eager"):
                return _run(*ts, attn="eager")

        # "PyTorch in the same dtype": the original model as it was, and with HF's eager attention
        # (probabilities rounded to the dtype before P @ V, as GPU attention kernels do; CPU SDPA
        # keeps them in fp32). PyTorch's error is the larger of the two, tensor by tensor: a
        # scalar like the loss carries one noisy sample of rounding error per formulation.
        plain_pytorch = [original, eager_pytorch]

        for t in tensors[: len(float_pos)]:
            t.requires_grad_(backward and t.requires_grad)
        report = parity_report(run, original, *tensors, torch_op=plain_pytorch, names=labels, check_grad=backward)
        results.append((name, type(module).__name__, report))
    if backward and results and not any(r.kind == "grad" for _, _, rep in results for r in rep.rows):
        # (a frozen model: nothing requires grad, so no backward kernel was compared)
        results.append(("<model>", type(model).__name__, ParityReport([ParityRow(
            "(gradients)", "grad", float("inf"), 0.0, 0.0, None,
            problem="backward=True, but no input or parameter requires grad: no gradient was compared "
                    "(unfreeze something, or pass backward=False)")])))
    report = VerifyReport(results, fallbacks)
    if print_table:
        print(report.table())
    return report
