"""ops.moe_experts (a mixture of experts' experts: grouped matmuls, the fused gated activation,
one tensor kept for backward) against the reference under the parity rule, what it keeps, and
bad input."""
import functools

import pytest
import torch

from conftest import DEVICE
from fastllama import ops, reference
from fastllama.testing import assert_parity


def _inputs(T=37, k=2, E=5, H=64, I=48, dtype=torch.float32, weights_dtype=None, unused_expert=True, seed=0):
    """Routing as a softmax router makes it (weights of each token's k experts summing to 1);
    with ``unused_expert`` no token picks the last expert (its weight gradients must be 0)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, H, generator=g).to(DEVICE, dtype).requires_grad_()
    choices = E - 1 if unused_expert else E
    index = torch.stack([torch.randperm(choices, generator=g)[:k] for _ in range(T)]).to(DEVICE)
    weights = torch.rand(T, k, generator=g).softmax(-1).to(DEVICE, weights_dtype or dtype).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H ** 0.5).to(DEVICE, dtype).requires_grad_()
    down = (torch.randn(E, H, I, generator=g) / I ** 0.5).to(DEVICE, dtype).requires_grad_()
    return hidden, index, weights, gate_up, down


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype,weights_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                 (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32-routing"])  # (Mixtral's routing weights stay fp32)
def test_parity_with_the_reference(dtype, weights_dtype, activation):
    """Output and the gradients of hidden, the routing weights and both expert weights, 37
    tokens (odd), top-2 of 5 experts, one of them chosen by no token."""
    args = _inputs(dtype=dtype, weights_dtype=weights_dtype)
    assert_parity(functools.partial(ops.moe_experts, activation=activation),
                  functools.partial(reference.moe_experts, activation=activation), *args,
                  names=["hidden", "top_k_index", "top_k_weights", "gate_up_proj", "down_proj"])


def test_an_expert_no_token_chose_gets_zero_gradients_and_uneven_groups_are_summed_right():
    hidden, index, weights, gate_up, down = _inputs(T=29, k=3, E=6, unused_expert=True, seed=3)
    index[:20] = torch.tensor([0, 1, 2], device=DEVICE)  # expert 0-2 crowded, 3-4 few, 5 none
    out = ops.moe_experts(hidden, index, weights, gate_up, down)
    expected = reference.moe_experts(hidden, index, weights, gate_up, down)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert (gate_up.grad[5] == 0).all() and (down.grad[5] == 0).all()
    grads = [t.grad.clone() for t in (hidden, weights, gate_up, down)]
    for t in (hidden, weights, gate_up, down):
        t.grad = None
    expected.square().sum().backward()
    for got, t in zip(grads, (hidden, weights, gate_up, down)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_backward_keeps_one_gate_up_output_per_pair():
    """Saved for backward: the gate-up output (S, 2I), the inputs and the sort (S integers); no
    (S, H) or (S, I) float tensor (the gathered token rows, the activation and the expert
    outputs are recomputed or not needed)."""
    T, k, H, I = 37, 2, 64, 48
    hidden, index, weights, gate_up, down = _inputs(T=T, k=k, H=H, I=I)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.moe_experts(hidden, index, weights, gate_up, down)
    inputs = {t.data_ptr() for t in (hidden, weights, gate_up, down)}
    made = [t for t in saved if t.data_ptr() not in inputs]
    floats = [tuple(t.shape) for t in made if t.is_floating_point()]
    assert floats == [(T * k, 2 * I)], floats
    assert all(t.numel() <= T * k + 8 for t in made if not t.is_floating_point())


def test_bad_input_is_refused_before_any_work():
    hidden, index, weights, gate_up, down = (t.detach() for t in _inputs())
    with pytest.raises(ValueError, match="top_k_index / top_k_weights"):
        ops.moe_experts(hidden, index, weights[:, :1], gate_up, down)
    with pytest.raises(TypeError, match="int32 or int64"):
        ops.moe_experts(hidden, index.float(), weights, gate_up, down)
    with pytest.raises(ValueError, match=r"gate_up_proj must be \(E, 2I, H\)"):
        ops.moe_experts(hidden, index, weights, gate_up[:, :, :32], down)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.moe_experts(hidden, index, weights, gate_up, down.half())
    with pytest.raises(ValueError, match="multiples of 4"):
        ops.moe_experts(hidden[:, :30], index, weights, gate_up[:, :, :30], down[:, :30])
    with pytest.raises(ValueError, match="activation"):
        ops.moe_experts(hidden, index, weights, gate_up, down, activation="relu")
    if DEVICE == "cpu":  # (on CUDA the check would be a host sync: the docstring says what happens there)
        for bad in (gate_up.shape[0], -1):  # E: one past the last expert
            wrong = index.clone()
            wrong[3, 1] = bad
            with pytest.raises(ValueError, match="top_k_index holds expert ids from"):
                ops.moe_experts(hidden, wrong, weights, gate_up, down)


def test_frozen_experts_get_no_weight_gradients_and_the_rest_is_unchanged():
    """Experts that do not require grad (adapters elsewhere) get none, and the gradients of the
    tokens and routing weights are those of the trainable case, bit for bit."""
    hidden, index, weights, gate_up, down = _inputs()
    ops.moe_experts(hidden, index, weights, gate_up, down).square().sum().backward()
    expected = hidden.grad.clone(), weights.grad.clone()
    hidden.grad = weights.grad = None
    gate_up.requires_grad_(False), down.requires_grad_(False)
    gate_up.grad = down.grad = None
    ops.moe_experts(hidden, index, weights, gate_up, down).square().sum().backward()
    assert gate_up.grad is None and down.grad is None
    assert torch.equal(hidden.grad, expected[0]) and torch.equal(weights.grad, expected[1])


def test_a_second_backward_works_and_double_backward_is_refused():
    """``retain_graph=True`` then a second backward gives the same gradients again (the kept
    gate-up output is not overwritten); a backward that would itself be differentiated is refused."""
    hidden, index, weights, gate_up, down = _inputs()
    out = ops.moe_experts(hidden, index, weights, gate_up, down).square().sum()
    out.backward(retain_graph=True)
    first = [t.grad.clone() for t in (hidden, weights, gate_up, down)]
    out.backward()
    for g, t in zip(first, (hidden, weights, gate_up, down)):
        torch.testing.assert_close(t.grad, 2 * g)
    out = ops.moe_experts(hidden, index, weights, gate_up, down).square().sum()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(out, hidden, create_graph=True)


def test_fp32_tokens_with_16bit_experts_get_an_fp32_gradient_summed_in_fp32():
    hidden, index, weights, gate_up, down = _inputs(dtype=torch.bfloat16, weights_dtype=torch.float32)
    hidden = hidden.detach().float().requires_grad_()
    out = ops.moe_experts(hidden, index, weights, gate_up, down)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert hidden.grad.dtype == torch.float32
    expected = hidden.detach().clone().requires_grad_()
    reference.moe_experts(expected, index, weights, gate_up, down).sum().backward()
    torch.testing.assert_close(hidden.grad, expected.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_compiles_in_every_dtype_and_matches_eager(dtype):
    """torch.compile(fullgraph=True) of moe_experts, forward and backward, gives eager's values
    in every dtype the op takes (torch's own fake grouped matmul accepts bf16 only)."""
    args = _inputs(T=13, E=4, H=32, I=16, dtype=dtype)

    def run(fn):
        out = fn(*args)
        grads = torch.autograd.grad(out.square().sum(), [args[i] for i in (0, 2, 3, 4)])
        return [out, *grads]

    eager = run(ops.moe_experts)
    torch._dynamo.reset()
    compiled = run(torch.compile(ops.moe_experts, fullgraph=True, backend="aot_eager"))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
