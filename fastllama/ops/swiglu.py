"""``swiglu(gate, up)`` = ``silu(gate) * up`` and ``swiglu_fused(gate_up)`` for a merged projection
(``activation="gelu_tanh"``: GeGLU, ``gelu_tanh(gate) * up``, Gemma's MLP).

Custom ops: ``fastllama::swiglu`` / ``fastllama::swiglu_fused`` forward, each with a functional
backward op and an in-place one (``*_bwd_``) that writes the gradients into the saved inputs'
memory. Backward saves only the inputs and recomputes silu.
"""
from __future__ import annotations

import functools

import torch
import triton

from .. import reference
from .._interpreter import interpreter_active
from ..kernels import swiglu as _k
from ..optable import INT_HINTS, KernelBuild, OpCase, OpSpec
from ._checks import check_last_dim_contiguous, check_same, check_tensor, has_expanded_dim, savable, share_memory

__all__ = ["swiglu", "swiglu_fused"]


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
def _gpu_tile(n_cols: int, gelu: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) on a GPU. Llama sizes (I >= 1024) get 4 x 1024 tiles: 32 values a
    thread at 4 warps, four 16-byte bf16 vectors per tensor, enough bytes in flight to saturate
    HBM. Narrower rows get 2K-element tiles: 4K ones of 16 x 256 spilled on sm_80 (each row
    costs its own 64-bit pointers). GeGLU's wide rows take 2 x 1024: its backward spilled 8
    bytes at 4 x 1024 on sm_120 (fp16; ptxas held it to 80 registers)."""
    block_n = max(16, min(1024, triton.next_power_of_2(n_cols)))
    if block_n == 1024:
        return (2 if gelu else 4), block_n
    return 2048 // block_n, block_n


def _config(n_rows: int, n_cols: int, gelu: bool = False) -> dict:
    if interpreter_active():  # few, large programs: every program is a Python-level step
        block_n = max(16, min(4096, triton.next_power_of_2(n_cols)))
        block_m = max(1, min(triton.next_power_of_2(max(n_rows, 1)), 32768 // block_n))
        return dict(block_m=block_m, block_n=block_n, num_warps=1)
    block_m, block_n = _gpu_tile(n_cols, gelu)
    return dict(block_m=block_m, block_n=block_n, num_warps=4)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., I) -> (M, I): a view whenever the leading dims collapse to one stride (contiguous
    tensors, row slices, the halves of a gate_up buffer); otherwise reshape copies (documented)."""
    return t.reshape(-1, t.shape[-1])


def _unit_stride(g: torch.Tensor) -> torch.Tensor:
    """Upstream gradients may be expanded (stride 0); the kernels need unit column stride."""
    return g if g.stride(-1) == 1 else g.contiguous()


# ----------------------------------------------------------------------------------------------
# Custom ops: separate gate and up
# ----------------------------------------------------------------------------------------------
# ``gelu`` (every op below): GeGLU's gelu_tanh gate instead of SiLU.
@torch.library.custom_op("fastllama::swiglu", mutates_args=())
def _swiglu(gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    g = _rows(gate)
    _k.swiglu_forward(g, _rows(up), out.view(g.shape), gelu=gelu, **_config(*g.shape, gelu=gelu))
    return out


@_swiglu.register_fake
def _(gate, up, gelu=False):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("fastllama::swiglu_bwd", mutates_args=())
def _swiglu_bwd(d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    d_gate, d_up = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device) for _ in range(2))
    g = _rows(gate)
    _k.swiglu_backward(_rows(_unit_stride(d_out)), g, _rows(up), d_gate.view(g.shape), d_up.view(g.shape),
                       gelu=gelu, **_config(*g.shape, gelu=gelu))
    return d_gate, d_up


@_swiglu_bwd.register_fake
def _(d_out, gate, up, gelu=False):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


@torch.library.custom_op("fastllama::swiglu_bwd_", mutates_args=("gate", "up"))
def _swiglu_bwd_(d_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool = False) -> None:
    """Overwrites gate with d_gate and up with d_up. Needs gate/up whose rows collapse to one
    stride (checked before the forward), so the (M, I) views write into their memory."""
    g, u = gate.view(-1, gate.shape[-1]), up.view(-1, up.shape[-1])
    _k.swiglu_backward(_rows(_unit_stride(d_out)), g, u, g, u, gelu=gelu, **_config(*g.shape, gelu=gelu))


@_swiglu_bwd_.register_fake
def _(d_out, gate, up, gelu=False):
    return None


def _setup(ctx, inputs, output):
    gate, up, ctx.gelu = inputs
    ctx.save_for_backward(savable(gate), savable(up))


def _backward(ctx, d_out):
    gate, up = ctx.saved_tensors
    if ctx.inplace_backward:
        _swiglu_bwd_(d_out, gate, up, ctx.gelu)
        return gate, up, None
    return (*_swiglu_bwd(d_out, gate, up, ctx.gelu), None)


# ----------------------------------------------------------------------------------------------
# Custom ops: one (..., 2I) gate_up tensor, gate first
# ----------------------------------------------------------------------------------------------
def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, I) row views of the gate (first) and up (second) halves of a (..., 2I) tensor."""
    rows = _rows(t)
    half = rows.shape[-1] // 2
    return rows[:, :half], rows[:, half:]


@torch.library.custom_op("fastllama::swiglu_fused", mutates_args=())
def _swiglu_fused(gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    out = torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype, device=gate_up.device)
    g, u = _halves(gate_up)
    _k.swiglu_forward(g, u, out.view(g.shape), gelu=gelu, **_config(*g.shape, gelu=gelu))
    return out


@_swiglu_fused.register_fake
def _(gate_up, gelu=False):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("fastllama::swiglu_fused_bwd", mutates_args=())
def _swiglu_fused_bwd(d_out: torch.Tensor, gate_up: torch.Tensor, gelu: bool = False) -> torch.Tensor:
    d_gate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    g, u = _halves(gate_up)
    dg, du = _halves(d_gate_up)
    _k.swiglu_backward(_rows(_unit_stride(d_out)), g, u, dg, du, gelu=gelu, **_config(*g.shape, gelu=gelu))
    return d_gate_up


@_swiglu_fused_bwd.register_fake
def _(d_out, gate_up, gelu=False):
    return gate_up.new_empty(gate_up.shape)


@torch.library.custom_op("fastllama::swiglu_fused_bwd_", mutates_args=("gate_up",))
def _swiglu_fused_bwd_(d_out: torch.Tensor, gate_up: torch.Tensor, gelu: bool = False) -> None:
    """Overwrites gate_up with its gradient (rows collapsible to one stride: checked up front)."""
    rows = gate_up.view(-1, gate_up.shape[-1])
    half = rows.shape[-1] // 2
    g, u = rows[:, :half], rows[:, half:]
    _k.swiglu_backward(_rows(_unit_stride(d_out)), g, u, g, u, gelu=gelu, **_config(*g.shape, gelu=gelu))


@_swiglu_fused_bwd_.register_fake
def _(d_out, gate_up, gelu=False):
    return None


def _setup_fused(ctx, inputs, output):
    gate_up, ctx.gelu = inputs
    ctx.save_for_backward(savable(gate_up))


def _backward_fused(ctx, d_out):
    (gate_up,) = ctx.saved_tensors
    if ctx.inplace_backward:
        _swiglu_fused_bwd_(d_out, gate_up, ctx.gelu)
        return gate_up, None
    return _swiglu_fused_bwd(d_out, gate_up, ctx.gelu), None


# The in-place choice is not an op argument (it would change the schema): the public functions
# pick an autograd path below. register_autograd handles the functional one.
def _with_flag(setup, flag):
    def setup_context(ctx, inputs, output):
        setup(ctx, inputs, output)
        ctx.inplace_backward = flag
    return setup_context


torch.library.register_autograd("fastllama::swiglu", _backward, setup_context=_with_flag(_setup, False))
torch.library.register_autograd("fastllama::swiglu_fused", _backward_fused,
                                setup_context=_with_flag(_setup_fused, False))


class _InplaceBackward(torch.autograd.Function):
    """Same forward ops; backward writes the gradients into the saved inputs' memory."""

    @staticmethod
    def forward(ctx, fused, gelu, *inputs):
        ctx.fused, ctx.gelu, ctx.inplace_backward = fused, gelu, True
        ctx.save_for_backward(*inputs)
        return _swiglu_fused(*inputs, gelu) if fused else _swiglu(*inputs, gelu)

    @staticmethod
    def backward(ctx, d_out):
        if torch.is_grad_enabled():  # the in-place kernels have no derivative of their own
            raise RuntimeError("swiglu with inplace_backward=True has no double backward (backward(create_graph=True)"
                               "); use inplace_backward=False")
        grads = _backward_fused(ctx, d_out) if ctx.fused else _backward(ctx, d_out)
        return (None, None) + tuple(grads)[:-1]  # (the ops' own gelu flag gets no gradient)


# ----------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------
def _check_inplace_ok(name: str, t: torch.Tensor) -> None:
    if t.is_leaf and t.requires_grad:
        raise ValueError(f"inplace_backward=True would overwrite {name}, a leaf tensor that requires grad, "
                         f"with its own gradient; use it only on intermediate activations")
    if t._base is not None and t._base.is_leaf and t._base.requires_grad:
        raise ValueError(f"inplace_backward=True would overwrite {name}, a view of a leaf tensor that requires "
                         f"grad (a parameter?), with its gradient; use it only on intermediate activations")


def _rows_collapse(t: torch.Tensor) -> bool:
    """Whether (..., I) views as (M, I) (the in-place backward writes through such a view)."""
    try:
        t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return True


def _check_input(name: str, t) -> None:
    check_tensor(name, t)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim, got a scalar")
    check_last_dim_contiguous(name, t)


def validate_pair(gate, up) -> None:
    """The checks of :func:`swiglu` on its inputs (also used by ``swiglu_linear``)."""
    _check_input("gate", gate)
    _check_input("up", up)
    check_same("gate", gate, "up", up, "dtype")
    check_same("gate", gate, "up", up, "device")
    if gate.shape != up.shape:
        raise ValueError(f"up has shape {tuple(up.shape)} but gate has shape {tuple(gate.shape)}; they must match")
    if gate.shape[-1] == 0:
        raise ValueError(f"gate and up have shape {tuple(gate.shape)}: an intermediate size of 0; accepted: >= 1")


ACTIVATIONS = ("silu", "gelu_tanh")


def _gelu(activation) -> bool:
    """The kernels' flag for ``activation`` (ValueError names the accepted ones)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "gelu_tanh"


def swiglu(gate: torch.Tensor, up: torch.Tensor, inplace_backward: bool = False, *,
           activation: str = "silu") -> torch.Tensor:
    """``silu(gate) * up`` in one kernel (fp32 math, one rounding), the Llama MLP activation.

    Args:
        gate, up: (..., I), same shape, dtype (fp32/fp16/bf16) and device; any row strides with
            unit stride in the last dim.
        inplace_backward: backward writes d_gate into gate's memory and d_up into up's (saves two
            allocations). Only for intermediate activations nobody reads afterwards (the outputs
            of gate_proj/up_proj); rejected for leaves that require grad and their views; ignored
            (out of place) when gate and up share elements (``swiglu(x, x)``, overlapping views,
            expanded dims), when one of them does not require grad (nobody asked for its
            gradient, so its memory is not scratch), when the leading dims of either do not
            collapse to one stride (e.g. every other row) and under ``torch.compile`` (which plans
            buffer reuse itself). Not compatible with ``retain_graph=True`` / a second backward or
            with double backward (both raise).
        activation: (keyword only) "silu", or "gelu_tanh" for GeGLU: ``gelu(gate,
            approximate="tanh") * up``, Gemma's MLP (HF's ``gelu_pytorch_tanh``).

    Returns:
        A new contiguous (..., I) tensor. Backward saves gate and up only.
    """
    gelu = _gelu(activation)
    validate_pair(gate, up)
    # gate and up sharing elements (swiglu(x, x), overlapping views, an expanded dim): the in-place
    # backward would write d_gate and d_up over each other, so it runs out of place. (Disjoint
    # views of one buffer, like the two halves of a gate_up projection, keep the in-place
    # backward.) Under torch.compile the in-place write into chunk() halves breaks dynamo
    # ("output of Split is a view ... modified inplace"), and inductor reuses buffers anyway.
    if inplace_backward and (torch.compiler.is_compiling() or not (gate.requires_grad and up.requires_grad)
                             or share_memory(gate, up) or has_expanded_dim(gate) or has_expanded_dim(up)
                             or not (_rows_collapse(gate) and _rows_collapse(up))):
        inplace_backward = False
    if inplace_backward and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        _check_inplace_ok("gate", gate)
        _check_inplace_ok("up", up)
        return _InplaceBackward.apply(False, gelu, gate, up)
    return _swiglu(gate, up, gelu)


def swiglu_fused(gate_up: torch.Tensor, inplace_backward: bool = False, *, activation: str = "silu") -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = cat([gate, up], -1)`` of shape (..., 2I): the output of
    a merged gate_up projection, GATE FIRST (as HF/vLLM merged projections lay it out).

    The halves are read in place as strided views (no split copy); backward writes one
    (..., 2I) gradient (or, with ``inplace_backward``, overwrites ``gate_up`` with it; see
    :func:`swiglu`; out of place for a ``gate_up`` with an expanded dim or rows that do not
    collapse to one stride). ``activation`` as in :func:`swiglu`. Returns a new contiguous
    (..., I) tensor.
    """
    gelu = _gelu(activation)
    _check_input("gate_up", gate_up)
    if gate_up.shape[-1] % 2 or gate_up.shape[-1] == 0:
        raise ValueError(f"gate_up has last dim {gate_up.shape[-1]}; accepted: an even size 2*I >= 2 "
                         f"(gate first, then up)")
    # an expanded dim: rows would write their gradients over each other, so out of place (and
    # rows that do not view as (M, 2I): no view to write through)
    if inplace_backward and torch.is_grad_enabled() and gate_up.requires_grad and not torch.compiler.is_compiling() \
            and not has_expanded_dim(gate_up) and _rows_collapse(gate_up):
        _check_inplace_ok("gate_up", gate_up)
        return _InplaceBackward.apply(True, gelu, gate_up)
    return _swiglu_fused(gate_up, gelu)


# ----------------------------------------------------------------------------------------------
# Op table
# ----------------------------------------------------------------------------------------------
def _make_args(params: dict, dtype: torch.dtype, device: str):
    """shape (..., I); row_pad: gate/up are row slices of wider buffers; transposed: built
    (T, B, I) and transposed, so rows do not collapse (the reshape-copy path)."""
    *lead, n = params["shape"]
    pad = params.get("row_pad", 0)

    def make(width):
        if params.get("transposed"):
            return torch.randn(*reversed(lead), width, device=device, dtype=dtype).transpose(0, 1).requires_grad_()
        return (2 * torch.randn(*lead, width + pad, device=device, dtype=dtype))[..., :width].requires_grad_()

    kwargs = {"activation": "gelu_tanh"} if params.get("gelu") else {}
    if params.get("fused"):
        return (make(2 * n),), kwargs
    return (make(n), make(n)), kwargs


def _fused_reference(gate_up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    half = gate_up.shape[-1] // 2
    return reference.swiglu(gate_up[..., :half], gate_up[..., half:], activation=activation)


_DTYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _build_configs(gelu: bool = False) -> list[KernelBuild]:
    """GPU tiles for every intermediate size (BLOCK_N 16..1024) x dtype, forward and backward, x
    integer hints: n_cols and the row strides all plain or all multiples of 16 (every Llama
    intermediate size, so what those launches compile: Triton hints them at launch, and the hint
    on n_cols is what keeps the masked loads vectors). n_rows is never specialised (the kernels'
    do_not_specialize)."""
    builds = []
    for ptr in _DTYPES.values():
        for block_n in (16, 32, 64, 128, 256, 512, 1024):
            block_m, _ = _gpu_tile(block_n, gelu)
            consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "GELU": gelu}
            act = "geglu" if gelu else "swiglu"
            for hints, hint in INT_HINTS.items():
                ints = {"n_rows": "i32", "n_cols": hint}
                builds.append(KernelBuild(
                    _k.swiglu_fwd_kernel,
                    {"G": ptr, "U": ptr, "OUT": ptr, **ints, **{f"stride_{s}": hint for s in ("g", "u", "o")}},
                    consts, num_warps=4, label=f"{act} fwd {ptr[1:]} N{block_n}{hints}"))
                builds.append(KernelBuild(
                    _k.swiglu_bwd_kernel,
                    {"DOUT": ptr, "G": ptr, "U": ptr, "DG": ptr, "DU": ptr, **ints,
                     **{f"stride_{s}": hint for s in ("do", "g", "u", "dg", "du")}},
                    consts, num_warps=4, label=f"{act} bwd {ptr[1:]} N{block_n}{hints}"))
    return builds


_CASES = (
    OpCase("3x77x160", {"shape": (3, 77, 160)}),
    OpCase("1x1x4099", {"shape": (1, 1, 4099)}),
    OpCase("5x4099-rowpad", {"shape": (5, 4099), "row_pad": 13}),
    OpCase("77x3x96-transposed", {"shape": (3, 77, 96), "transposed": True}),
    OpCase("4096x14336", {"shape": (4096, 14336)}, cuda_only=True),
    OpCase("3x1000x11009", {"shape": (3, 1000, 11009)}, cuda_only=True),
)
_FUSED_CASES = (
    OpCase("3x77x2x96", {"shape": (3, 77, 96), "fused": True}),
    OpCase("2x4099-rowpad", {"shape": (2, 4099), "fused": True, "row_pad": 7}),
    OpCase("1x1x2x64", {"shape": (1, 1, 64), "fused": True}),
    OpCase("2x2048x2x14336", {"shape": (2, 2048, 14336), "fused": True}, cuda_only=True),
)

# GeGLU (activation="gelu_tanh"): the same kernels with GELU set; gates spread wide (2 randn) so
# both tails of the tanh approximation are exercised
_GEGLU_CASES = (
    OpCase("3x77x160", {"shape": (3, 77, 160), "gelu": True}),
    OpCase("5x4099-rowpad", {"shape": (5, 4099), "row_pad": 13, "gelu": True}),
    OpCase("77x3x96-transposed", {"shape": (3, 77, 96), "transposed": True, "gelu": True}),
    OpCase("4096x6912", {"shape": (4096, 6912), "gelu": True}, cuda_only=True),
)
_GEGLU_FUSED_CASES = (
    OpCase("3x77x2x96", {"shape": (3, 77, 96), "fused": True, "gelu": True}),
    OpCase("2x4099-rowpad", {"shape": (2, 4099), "fused": True, "row_pad": 7, "gelu": True}),
)

OP_SPECS = [
    OpSpec("swiglu", swiglu, reference.swiglu, _make_args, _CASES, kernels=("swiglu",),
           names=("gate", "up"), output_names=("out",), build_configs=_build_configs),
    # The same two kernels; its build configs are listed once, under "swiglu".
    OpSpec("swiglu_fused", swiglu_fused, _fused_reference, _make_args, _FUSED_CASES, kernels=("swiglu",),
           names=("gate_up",), output_names=("out",), build_configs=lambda: []),
    OpSpec("geglu", swiglu, reference.swiglu, _make_args, _GEGLU_CASES, kernels=("swiglu",),
           names=("gate", "up"), output_names=("out",), build_configs=functools.partial(_build_configs, gelu=True)),
    OpSpec("geglu_fused", swiglu_fused, _fused_reference, _make_args, _GEGLU_FUSED_CASES, kernels=("swiglu",),
           names=("gate_up",), output_names=("out",), build_configs=lambda: []),
]
