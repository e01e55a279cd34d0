"""torch.compile(fullgraph=True) over a function using rms_norm (+residual), rotary and SwiGLU:
each op is one custom op in the graph (no graph break), and compiled == eager, forward and
backward. Runs on CPU under the interpreter (the custom_op + register_fake path compiles there)."""
import torch

from conftest import DEVICE
from fastllama import ops, reference


def _block(x, residual, norm_w, q, k, cos, sin, gate_up, gate, up, position_ids, inv_freq):
    # No other arithmetic in the graph: inductor then emits no C++ kernel of its own (a gcc run
    # costs more CPU than every kernel here under the interpreter).
    h, residual = ops.rms_norm(x, norm_w, 1e-5, residual=residual)
    q, k = ops.apply_rotary_pos_emb(q, k, cos, sin)
    q2, k2 = ops.apply_rotary_pos_emb_from_positions(q, k, position_ids, inv_freq)
    return h, residual, q2, k2, ops.swiglu_fused(gate_up), ops.swiglu(gate, up)


def _inputs(dtype=torch.float32):
    b, t, hidden, hq, hk, d = 2, 9, 64, 4, 2, 32

    def rand(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype).requires_grad_()

    pos = torch.arange(t, device=DEVICE)[None].expand(b, t) + 5
    inv_freq = reference.rope_inv_freq(d).to(DEVICE)
    cos, sin = reference.rope_cos_sin(pos, inv_freq, dtype=dtype)
    q = torch.randn(b, t, hq, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hk, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_()
    return (rand(b, t, hidden), rand(b, t, hidden), rand(hidden), q, k, cos, sin, rand(b, t, 96),
            rand(b, t, 48), rand(b, t, 48), pos, inv_freq)


def _run(fn, args):
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if a.is_floating_point() else a for a in args]
    outs = fn(*leaves)
    torch.manual_seed(1)
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    return outs, [a.grad for a in leaves if a.requires_grad]


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    counts = {}

    def counting_backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "fastllama" in str(node.target):
                counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return gm.forward

    args = _inputs()
    eager_out, eager_grads = _run(_block, args)
    # The graph dynamo captures holds our ops as single custom-op nodes.
    torch.compile(_block, fullgraph=True, backend=counting_backend)(*args)
    assert counts == {"fastllama.rms_norm_fwd.default": 1, "fastllama.rotary.default": 2,
                      "fastllama.swiglu_fused.default": 1, "fastllama.swiglu.default": 1}, counts

    # And the real compiler (AOT autograd + inductor) reproduces eager exactly: the same kernels.
    torch._dynamo.reset()
    compiled_out, compiled_grads = _run(torch.compile(_block, fullgraph=True), args)
    for a, b in zip(list(eager_out) + eager_grads, list(compiled_out) + compiled_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
