"""The parity harness: does a kernel match pure PyTorch as well as PyTorch itself does?

The rule (README.md, after flash-attention's tests): compute the truth in float64 from the SAME
low-precision inputs, then compare the kernel's error with the error that the plain PyTorch op
makes when run in the input dtype::

    max|kernel - truth| <= 2 * max|torch_same_dtype - truth| + atol_floor     (outputs)
    max|grad   - truth| <= 3 * max|torch_same_dtype_grad - truth| + atol_floor (input gradients)

``atol_floor`` defaults to one unit of the dtype's epsilon at the tensor's largest magnitude
(``finfo(dtype).eps * max|truth|``), so an op whose PyTorch version happens to round exactly
is not held to an impossible zero. A non-finite kernel value where the truth is finite fails.

What the rule cannot see: both terms are maxima over the whole tensor, so a few very large
elements set the allowance for all of it. In the residual stream of a real checkpoint (a few
channels in the hundreds, the others near 0.02), an fp16 error of 0.1 on the small channels
passes: the floor alone is eps * 300 = 0.29. Random-weight models (the tests, ``fastllama
verify --config``) have no such channels; ``verify`` on a real checkpoint is weaker there.

Under the Triton interpreter an fp32 ``tl.dot`` is numpy's ``matmul`` (OpenBLAS here), whose
error is larger than torch's CPU matmul that the same-dtype PyTorch op uses: 4.1e-5 against
2.4e-5 on a 256 x 256 x 256 product of unit normals. An fp32 attention kernel therefore shows
up to about 2.5x PyTorch's output error on the CPU (head dim 256, 77 tokens: 1.6e-6 against
6.2e-7) with nothing wrong in its own math: the same steps written in torch with numpy's
products give the kernel's error to the last digit. Most of the 2x allowance (plus the floor) is
spent there, so fp32 cases at large head dims have little margin on the CPU.

Example (on a GPU; on a CPU, under the Triton interpreter, use float16 or float32)::

    import torch
    from fastllama import ops, reference, testing
    x = torch.randn(3, 77, 4099, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    w = torch.randn(4099, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    testing.assert_parity(ops.rms_norm, reference.rms_norm, x, w)
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

__all__ = ["ParityRow", "ParityReport", "parity_report", "assert_parity", "float64_truth"]


@dataclasses.dataclass
class ParityRow:
    """One compared tensor: an output or the gradient of one input."""

    name: str
    kind: str  # "output" or "grad"
    kernel_err: float
    torch_err: float
    allowed: float
    worst_index: tuple[int, ...] | None
    problem: str = ""  # set when the comparison could not be made (missing grad, non-finite)

    @property
    def ratio(self) -> float:
        if self.allowed > 0:
            return self.kernel_err / self.allowed
        return 0.0 if self.kernel_err == 0 else float("inf")

    @property
    def passed(self) -> bool:
        # an infinite allowance (an atol_floor of inf) would pass anything
        return not self.problem and self.kernel_err <= self.allowed < float("inf")


@dataclasses.dataclass
class ParityReport:
    """All rows of one parity check; ``str(report)`` is a readable table."""

    rows: list[ParityRow]
    title: str = ""

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def table(self) -> str:
        """The rows as a text table; failing rows are marked ``<-- FAIL``."""
        head = f"{'tensor':<16}{'kind':<8}{'max|err|':>12}{'torch err':>12}{'allowed':>12}{'ratio':>8}  worst index / problem"
        lines = [self.title] if self.title else []
        lines += [head, "-" * len(head)]
        for r in self.rows:
            where = r.problem or (str(r.worst_index) if r.worst_index is not None else "")
            mark = "" if r.passed else "  <-- FAIL"
            lines.append(
                f"{r.name:<16}{r.kind:<8}{r.kernel_err:>12.3e}{r.torch_err:>12.3e}{r.allowed:>12.3e}{r.ratio:>8.2f}  {where}{mark}"
            )
        return "\n".join(lines)

    __str__ = table

    def raise_if_failed(self) -> "ParityReport":
        """Returns the report, or raises ``AssertionError`` with its table when a row failed."""
        if not self.passed:
            raise AssertionError("parity check failed\n" + self.table())
        return self


def _flatten(out: Any) -> tuple:
    """Outputs as a flat tuple: nested tuples/lists and dicts (their values, keys in sorted
    order, each key counted as an output of its own) are flattened (a nested output is compared
    like any other), None entries kept so that positions line up between runs."""
    if isinstance(out, (tuple, list)):
        return tuple(leaf for item in out for leaf in _flatten(item))
    if isinstance(out, dict):
        return tuple(leaf for key in sorted(out, key=str) for leaf in (_DictKey(key), *_flatten(out[key])))
    return (out,)


@dataclasses.dataclass(frozen=True)
class _DictKey:
    """A dict output's key, in the flat outputs: two runs whose dicts have other keys differ there."""

    key: Any


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in memory of its own, with the same sizes and strides (a transposed view,
    a slice of a wider tensor, an expanded stride-0 view stay what they are: the strides are
    part of what a kernel is tested on). A run that writes into its inputs (an in-place op)
    must neither change the caller's tensors nor the inputs of the other runs."""
    t = t.detach()
    if t.numel() == 0:
        return t.clone()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    region = t.as_strided((extent,), (1,), t.storage_offset()).clone()
    return region.as_strided(t.shape, t.stride(), 0)


def _convert(arg: Any, dtype: torch.dtype | None) -> Any:
    """A tensor in memory of its own: a floating one as a leaf (cast to ``dtype`` if given)
    keeping requires_grad, any other (labels, lengths) as a plain copy; non-tensors as they are."""
    if not isinstance(arg, torch.Tensor):
        return arg
    if not arg.is_floating_point():
        return _own_copy(arg)
    leaf = _own_copy(arg) if dtype is None or dtype == arg.dtype else arg.detach().to(dtype)
    return leaf.requires_grad_(arg.requires_grad)


def _fresh(fn: Callable) -> tuple[Callable, list]:
    """``fn`` with its own copy of every tensor bound by ``functools.partial`` (keyword arguments
    such as ``cu_seqlens``: a run that writes into them must not change the other runs'), and
    the (original, copy) pairs of those that are not floating (see :func:`_changed_integers`)."""
    if not isinstance(fn, functools.partial):
        return fn, []
    if any(isinstance(a, torch.Tensor) and a.requires_grad for a in (*fn.args, *fn.keywords.values())):
        # its gradient would not be compared (only the positional arguments' are)
        raise ValueError("a tensor bound by functools.partial requires grad: pass it as a positional argument "
                         "so that its gradient is checked")
    inner, pairs = _fresh(fn.func)
    args = [_convert(a, None) for a in fn.args]
    kwargs = {k: _convert(v, None) for k, v in fn.keywords.items()}
    pairs += [(a, c) for a, c in zip(list(fn.args) + list(fn.keywords.values()), args + list(kwargs.values()))
              if isinstance(a, torch.Tensor) and not a.is_floating_point()]
    return functools.partial(inner, *args, **kwargs), pairs


def _changed_integers(pairs) -> bool:
    """Whether a run changed an integer input (labels, lengths, offsets): no op may write those."""
    return any(c.shape != a.shape or not torch.equal(c, a) for a, c in pairs)


def _run(fn: Callable, args: Sequence, grad_outputs: Callable | None, dtype: torch.dtype | None):
    """Runs ``fn`` on fresh leaves of ``args``; returns (outputs, grads of the inputs needing grad,
    whether it changed an integer input).

    ``grad_outputs(outs)`` gives the upstream gradient of each output (None: no backward).
    """
    fn, integers = _fresh(fn)
    # enable_grad: under a caller's no_grad the reference would give no gradients and every
    # gradient row would silently go missing.
    with torch.enable_grad():
        leaves = pytree.tree_map(lambda a: _convert(a, dtype), list(args))
        integers += [(a, c) for a, c in zip(pytree.tree_leaves(list(args)), pytree.tree_leaves(leaves))
                     if isinstance(a, torch.Tensor) and not a.is_floating_point()]
        outs = _flatten(fn(*leaves))
        grad_outputs = grad_outputs(outs) if grad_outputs is not None else None
        wanted = [a for a in pytree.tree_leaves(leaves) if isinstance(a, torch.Tensor) and a.requires_grad]
        grads: list[torch.Tensor | None] = []
        if wanted and grad_outputs is not None:
            # (a copy per run: a backward that writes into its incoming gradient, as a kernel
            # reusing the dY buffer may, must not change the other runs')
            pairs = [
                (o, g.to(o.dtype, copy=True)) for o, g in zip(outs, grad_outputs)
                if g is not None and isinstance(o, torch.Tensor) and o.requires_grad
            ]
            if pairs:
                grads = list(torch.autograd.grad([p[0] for p in pairs], wanted, [p[1] for p in pairs],
                                                 allow_unused=True))
            else:
                grads = [None] * len(wanted)
    return outs, grads, _changed_integers(integers)


def _nonfinite_mismatch(value: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Where the truth is not finite (an lse of -inf for a fully masked row ...), the value must be
    the same infinity, or NaN where the truth is NaN: True where it is not."""
    same = (value == truth) | (torch.isnan(value) & torch.isnan(truth))
    return ~torch.isfinite(truth) & ~same


def _max_err(value: torch.Tensor, truth: torch.Tensor) -> tuple[float, tuple[int, ...] | None]:
    value = value.to(truth.dtype)
    diff = (value - truth).abs()
    # exact matches at non-finite truth count 0, any mismatch there inf (inf - inf would be NaN)
    diff = torch.where(torch.isfinite(truth), diff, 0.0)
    diff = torch.where(_nonfinite_mismatch(value, truth), float("inf"), diff)
    diff = torch.nan_to_num(diff, nan=float("inf"), posinf=float("inf"))
    if diff.numel() == 0:
        return 0.0, None
    flat = int(diff.argmax())
    return float(diff.flatten()[flat]), tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def _compare(name, kind, value, same_list, truth, factor, atol_floor, dtype) -> ParityRow:
    if value is None:
        return ParityRow(name, kind, float("inf"), 0.0, 0.0, None, problem="kernel gave no value (missing gradient?)")
    if not isinstance(value, torch.Tensor):
        return ParityRow(name, kind, float("inf"), 0.0, 0.0, None, problem=f"kernel gave a {type(value).__name__}, not a tensor")
    if value.shape != truth.shape:
        return ParityRow(name, kind, float("inf"), 0.0, 0.0, None,
                         problem=f"shape {tuple(value.shape)} != expected {tuple(truth.shape)}")
    truth = truth.detach().to(torch.float64)
    value = value.detach().to(torch.float64)
    finite = torch.isfinite(truth)
    bad = (finite & ~torch.isfinite(value)) | _nonfinite_mismatch(value, truth)
    # PyTorch's own op may overflow where the truth does not, or be finite where the truth is
    # NaN (a fully masked row): judge it only where both are finite, or one such position would
    # make its error, and so the allowance, infinite.
    torch_err = 0.0
    for same in same_list:
        if same is None:
            continue
        if same.shape != truth.shape:  # (a broadcastable one would inflate PyTorch's error, the allowance)
            return ParityRow(name, kind, float("inf"), 0.0, 0.0, None,
                             problem=f"PyTorch's own op gave shape {tuple(same.shape)} != expected {tuple(truth.shape)}")
        same = same.detach().to(torch.float64)
        same = torch.where(torch.isfinite(same) & finite, same, truth)
        torch_err = max(torch_err, _max_err(same, truth)[0])
    if atol_floor is None:
        scale = float(truth[finite].abs().max()) if finite.any() else 0.0
        atol_floor = torch.finfo(dtype).eps * scale
    allowed = factor * torch_err + atol_floor
    err, where = _max_err(value, truth)
    problem = ""
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        problem = (f"non-finite value where the truth is finite, first at {idx}" if finite[idx] else
                   f"{value[idx].item()} where the truth is {truth[idx].item()}, first at {idx}")
    return ParityRow(name, kind, err, torch_err, allowed, where, problem)


# Grouped matmuls (HF's mixture-of-experts layers) have no float64 kernel
_GROUPED_MM = tuple(f for f in (getattr(torch.nn.functional, "grouped_mm", None), getattr(torch, "_grouped_mm", None))
                    if f is not None)


def _grouped_mm_float64(a, b, offs=None, bias=None, out_dtype=None):
    """A grouped matmul as a loop, for the float64 truth: rows ``offs[g - 1]:offs[g]`` of ``a``
    (S, K) times ``b[g]`` (G, K, N), the form HF's experts use (rows past ``offs[-1]`` are 0)."""
    if offs is None or a.dim() != 2 or b.dim() != 3 or bias is not None:
        raise NotImplementedError("float64_truth computes only grouped_mm(a (S, K), b (G, K, N), offs=...)")
    ends = offs.tolist()
    pieces = [a[start:end] @ b[g] for g, (start, end) in enumerate(zip([0] + ends[:-1], ends))]
    pieces.append(a.new_zeros(a.shape[0] - ends[-1], b.shape[2]))
    out = torch.cat(pieces)
    return out if out_dtype is None else out.to(out_dtype)


class float64_truth(torch.overrides.TorchFunctionMode):
    """Context manager: code that hard-codes float32 upcasts runs in float64 instead.

    Hugging Face modules compute statistics with ``x.to(torch.float32)``, ``.float()`` or
    ``softmax(..., dtype=torch.float32)``; fed float64 inputs to get the truth, they would still
    round to float32 there. Inside this mode every float32 request becomes float64, so such code
    gives a float64 truth. Only for computing references, never in a model's real run.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        if func in _GROUPED_MM and any(isinstance(a, torch.Tensor) and a.dtype == torch.float64 for a in args):
            return _grouped_mm_float64(*args, **kwargs)
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        kwargs = {k: (torch.float64 if v is torch.float32 else v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def parity_report(
    op: Callable,
    reference: Callable,
    *args: Any,
    torch_op: Callable | None = None,
    names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    check_grad: bool = True,
    fwd_factor: float = 2.0,
    bwd_factor: float = 3.0,
    atol_floor: float | None = None,
    truth_dtype: torch.dtype = torch.float64,
    seed: int = 0,
    title: str = "",
) -> ParityReport:
    """Compares ``op(*args)`` with ``reference`` under the parity rule; returns a report.

    Args:
        op: the function under test (a fastllama op).
        reference: the pure-PyTorch reference; it is run on ``args`` cast to ``truth_dtype``
            (the truth) and on ``args`` as given (PyTorch's own error in that dtype).
        args: positional inputs. Floating tensors with ``requires_grad=True`` get their
            gradients checked, also inside lists and tuples (named ``name[i]``); other tensors
            (integer labels, masks) and non-tensors pass as is. Each run gets its own copy of
            every tensor, strides kept, so an op that writes into its inputs changes neither
            the caller's tensors nor the other runs'. Bind keyword arguments with
            ``functools.partial``: its tensors are copied per run too (a lambda's are shared).
            No run may write into an integer tensor (positional or bound): that is a failing row.
        torch_op: what "plain PyTorch in the same dtype" means, if not ``reference``. A list of
            callables (several standard PyTorch formulations, e.g. eager and SDPA attention)
            takes the largest of their errors as PyTorch's error, tensor by tensor.
        names / output_names: labels of all positional inputs and of the outputs in the table.
        check_grad: also compare input gradients, using one fixed random upstream gradient per
            floating output (seeded, the same values for every run, each run its own copy).
        fwd_factor / bwd_factor: the 2x / 3x of the rule.
        atol_floor: overrides the default floor (``eps(dtype) * max|truth|`` per tensor).
        truth_dtype: float64 by default.
        seed: seeds the random upstream gradients.
        title: a first line for the report's table.
    """
    torch_op = torch_op or reference
    # Names must cover exactly what they label: a short list would silently leave inputs' gradients
    # or outputs out of the comparison.
    if names is not None and len(names) != len(args):
        raise ValueError(f"names has {len(names)} entries for {len(args)} arguments")
    arg_names = list(names) if names is not None else [f"arg{i}" for i in range(len(args))]
    # Tensors inside a list or tuple argument (the weights of ops.rms_norm_linear) count like any
    # other input, named name[i], in the order the runs find them (pytree order).
    inputs = []
    for name, a in zip(arg_names, args):
        leaves = [a] if isinstance(a, torch.Tensor) else pytree.tree_leaves(a)
        inputs += [(name if t is a else f"{name}[{i}]", t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    in_dtypes = [t.dtype for _, t in inputs if t.is_floating_point()]
    low_dtype = min(in_dtypes, key=lambda d: torch.finfo(d).bits) if in_dtypes else torch.float32

    cached: list = []

    def grad_outputs(outs):
        # Drawn once, from the first (kernel) run's outputs, then reused, ROUNDED to that output's
        # dtype: the truth must come from the same low-precision upstream gradient as the other
        # runs, or its difference from the float64 draw counts as PyTorch's own error.
        if not cached:
            gen = torch.Generator().manual_seed(seed)
            cached.extend(
                torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype).to(o.device)
                if isinstance(o, torch.Tensor) and o.is_floating_point() else None
                for o in outs
            )
        # (an output of the wrong shape gets no upstream gradient: its row reports the shape)
        return [g if g is not None and isinstance(o, torch.Tensor) and o.shape == g.shape else None
                for g, o in zip(cached, outs)]

    grad_outputs = grad_outputs if check_grad else None
    out_k, grad_k, wrote_integers = _run(op, args, grad_outputs, None)
    out_t, grad_t, _ = _run(reference, args, grad_outputs, truth_dtype)
    same_runs = [_run(f, args, grad_outputs, None) for f in (torch_op if isinstance(torch_op, (list, tuple)) else [torch_op])]

    if output_names is not None and len(output_names) != len(out_t):
        raise ValueError(f"output_names has {len(output_names)} entries; the reference returned {len(out_t)} outputs")
    grad_inputs = [(n, t) for n, t in inputs if t.requires_grad]
    out_names = list(output_names) if output_names is not None else [f"out{i}" for i in range(len(out_t))]

    rows = []
    if wrote_integers:
        rows.append(ParityRow("inputs", "output", float("inf"), 0.0, 0.0, None,
                              problem="op wrote into an integer input (labels, lengths, offsets)"))
    if len(out_k) != len(out_t):
        rows.append(ParityRow("outputs", "output", float("inf"), 0.0, 0.0, None,
                              problem=f"op returned {len(out_k)} outputs, reference {len(out_t)}"))
    for n, (name, k, t) in enumerate(zip(out_names, out_k, out_t)):
        same = [run[0][n] if n < len(run[0]) else None for run in same_runs]
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            expected = same[0] if isinstance(same[0], torch.Tensor) and same[0].is_floating_point() else None
            dtype = expected.dtype if expected is not None else low_dtype
            row = _compare(name, "output", k, same, t, fwd_factor, atol_floor, dtype)
            if not row.problem and expected is not None and k.dtype != expected.dtype:
                row.problem = f"dtype {k.dtype}, PyTorch gives {expected.dtype}"
            rows.append(row)
        elif isinstance(t, torch.Tensor):  # integer / bool outputs (indices, counts): exactly equal
            equal = isinstance(k, torch.Tensor) and k.dtype == t.dtype and k.shape == t.shape and torch.equal(k, t)
            rows.append(ParityRow(name, "output", 0.0 if equal else float("inf"), 0.0, 0.0, None,
                                  problem="" if equal else "differs from the reference (compared exactly)"))
        elif not (type(k) is type(t) and k == t):  # a dict key, None, a Python number: equal, same type
            rows.append(ParityRow(name, "output", float("inf"), 0.0, 0.0, None,
                                  problem=f"op gave {k!r:.60} where the reference gives {t!r:.60}"))
    for n, ((name, a), k, t) in enumerate(zip(grad_inputs, grad_k, grad_t)):
        if t is None:  # the reference's outputs do not depend on this input
            if k is None:
                continue
            t = torch.zeros_like(k, dtype=truth_dtype)
        rows.append(_compare("d" + name, "grad", k, [run[1][n] for run in same_runs], t, bwd_factor, atol_floor, a.dtype))
    if not rows:
        rows.append(ParityRow("(nothing)", "output", float("inf"), 0.0, 0.0, None,
                              problem="no tensor output or gradient to compare"))
    return ParityReport(rows, title)


def assert_parity(op: Callable, reference: Callable, *args: Any, **kwargs: Any) -> ParityReport:
    """:func:`parity_report`, raising ``AssertionError`` with the table when any row fails."""
    return parity_report(op, reference, *args, **kwargs).raise_if_failed()
