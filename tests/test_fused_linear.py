"""Norms and SwiGLU folded into the linears around them (fastllama.ops.fused_linear).

Op-level parity runs from the op table (tests/test_op_parity.py). Here: bad input, autocast,
what the backward keeps, and that ``fastllama.patch`` takes the fused path exactly when it may
(plain nn.Linear projections, no hooks) with the same results either way.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

import fastllama
from conftest import DEVICE
from fastllama import ops, reference
from fastllama.reference import Llama, LlamaConfig
from fastllama.testing import assert_parity

FUSED_NODES = ("_NormLinearsBackward", "_SwiGLULinearBackward")


def _nodes(loss) -> dict[str, int]:
    """Count of backward nodes by class name in the graph of ``loss``."""
    counts, seen, todo = {}, set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
        todo.extend(n for n, _ in node.next_functions)
    return counts


def _model(dtype=torch.float32, seed=0, layers=2):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = Llama(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return fastllama.patch(model.to(DEVICE, dtype).train())


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    _, loss = model(ids, labels=ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, _nodes(loss)


def _ids(batch=2, seq=19):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def test_patched_model_takes_the_fused_path_and_matches_the_unfused_one():
    model, ids = _model(), _ids()
    loss, grads, nodes = _loss_and_grads(model, ids)
    assert nodes.get("_NormLinearsBackward") == 4 and nodes.get("_SwiGLULinearBackward") == 2, nodes
    # a global hook must see every module call: patch then keeps the unfused path everywhere
    handle = nn_module.register_module_forward_hook(lambda m, a, o: None)
    try:
        loss_u, grads_u, nodes_u = _loss_and_grads(model, ids)
    finally:
        handle.remove()
    assert not any(n in nodes_u for n in FUSED_NODES), nodes_u
    # same kernels and matmuls, fp32: only the order of the q/k/v gradient sum may differ
    torch.testing.assert_close(loss, loss_u, rtol=1e-6, atol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_u[name], rtol=1e-5, atol=1e-7, msg=name)


def test_hooked_projection_keeps_its_call():
    model, ids = _model(), _ids()
    calls = []
    layer0, layer1 = model.model.layers
    layer0.mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append("down"))
    layer1.self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append("q"))
    _, _, nodes = _loss_and_grads(model, ids)
    assert calls == ["down", "q"], calls
    # layer 0 keeps attention fused, layer 1 keeps its MLP fused; the other two are unfused
    assert nodes.get("_NormLinearsBackward") == 2 and nodes.get("_SwiGLULinearBackward") == 1, nodes


def test_backward_keeps_the_norm_input_not_its_output():
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    w = torch.ones(32, device=DEVICE, requires_grad=True)
    wq, wk = (torch.randn(o, 32, device=DEVICE, requires_grad=True) for o in (16, 8))
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q, k = ops.rms_norm_linear(x, w, [wq, wk])
        out = ops.swiglu_linear(q, q.flip(-1), torch.randn(4, 16, device=DEVICE))
    big = [t for t in kept if t.numel() == x.numel() or t.numel() == q.numel()]
    # the norm's input and the swiglu's two inputs; not the normalised x, not swiglu's output
    assert len(big) == 3 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in big]
    (out.sum() + k.sum()).backward()
    assert x.grad is not None and wq.grad is not None and wk.grad is not None and w.grad is not None


def test_autocast_matches_norm_then_linear_under_autocast():
    x = torch.randn(2, 7, 48, device=DEVICE, requires_grad=True)
    w = (1 + 0.1 * torch.randn(48, device=DEVICE)).requires_grad_()
    wq = (0.1 * torch.randn(24, 48, device=DEVICE)).requires_grad_()
    bq = torch.randn(24, device=DEVICE, requires_grad=True)
    wd = (0.1 * torch.randn(48, 24, device=DEVICE)).requires_grad_()
    device_type = torch.device(DEVICE).type

    def run(fused, autocast=True):
        for t in (x, w, wq, bq, wd):
            t.grad = None
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            if fused:
                (q,) = ops.rms_norm_linear(x, w, [wq], [bq])
                out = ops.swiglu_linear(q, q, wd)
            else:
                q = F.linear(ops.rms_norm(x, w), wq, bq)
                out = F.linear(ops.swiglu(q, q), wd)
        out.float().square().sum().backward()
        return out, [t.grad for t in (x, w, wq, bq, wd)]

    out_f, grads_f = run(True)
    out_u, grads_u = run(False)
    _, truth = run(False, autocast=False)  # fp32 throughout
    assert out_f.dtype == out_u.dtype == torch.bfloat16
    torch.testing.assert_close(out_f, out_u, rtol=0, atol=0)
    for gf, gu, gt in zip(grads_f, grads_u, truth):
        assert gf.dtype == gu.dtype == torch.float32  # fp32 master weights get fp32 gradients
        # the parity rule: the fused path's error against fp32 within 2x of the unfused bf16 path's
        # (on the interpreter the two are bit-identical; GPU GEMMs may round differently)
        assert (gf - gt).norm() <= 2 * (gu - gt).norm() + 1e-6 * gt.norm()


def test_bad_input_is_rejected_before_launch():
    x = torch.randn(4, 32, device=DEVICE)
    w = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="weights is empty"):
        ops.rms_norm_linear(x, w, [])
    with pytest.raises(ValueError, match=r"weights\[1\].*\(out_features, 32\)"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE), torch.randn(8, 31, device=DEVICE)])
    with pytest.raises(ValueError, match="one per weight"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE)], [None, None])
    with pytest.raises(TypeError, match="must match"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="bias of weights"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE)], [torch.randn(7, device=DEVICE)])
    # every weight and bias, not only the first, must have the input's dtype (as F.linear requires)
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype torch.bfloat16"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE).bfloat16()])
    with pytest.raises(TypeError, match=r"bias of weights\[0\] has dtype torch.float64"):
        ops.rms_norm_linear(x, w, [torch.randn(8, 32, device=DEVICE)], [torch.randn(8, device=DEVICE).double()])
    g = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="up has shape"):
        ops.swiglu_linear(g, g[:, :8], torch.randn(8, 16, device=DEVICE))
    with pytest.raises(ValueError, match="weight has shape"):
        ops.swiglu_linear(g, g, torch.randn(8, 15, device=DEVICE))


def test_unused_outputs_leave_their_weights_without_a_gradient():
    """As nn.Linear: a projection (or the norm) whose output the loss never uses gets grad None,
    not zeros (an optimizer with weight decay moves a zero-grad parameter, skips a None one)."""
    x, r = (torch.randn(3, 5, 32, device=DEVICE, requires_grad=True) for _ in range(2))
    w = (1 + 0.1 * torch.randn(32, device=DEVICE)).requires_grad_()
    wq, wk = (torch.randn(o, 32, device=DEVICE, requires_grad=True) for o in (16, 8))
    q, k, s = ops.rms_norm_linear(x, w, [wq, wk], residual=r)
    q.sum().backward()
    assert wq.grad is not None and wk.grad is None and w.grad is not None
    for p in (x, r, w, wq):
        p.grad = None
    q, k, s = ops.rms_norm_linear(x, w, [wq, wk], residual=r)
    (2 * s).sum().backward()  # only the residual stream
    assert wq.grad is None and w.grad is None
    assert torch.equal(x.grad, torch.full_like(x, 2.0)) and torch.equal(r.grad, x.grad)
    x.grad = r.grad = None
    y, s = ops.rms_norm(x, w, residual=r)
    (2 * s).sum().backward()
    assert w.grad is None and torch.equal(x.grad, torch.full_like(x, 2.0)) and torch.equal(r.grad, x.grad)


def test_norm_linear_backward_recomputes_with_the_callers_eps():
    # the backward recomputes the norm; the cases above all used the default eps
    torch.manual_seed(0)
    x = torch.randn(3, 7, 96, device=DEVICE, requires_grad=True)
    w = (1 + 0.5 * torch.randn(96, device=DEVICE)).requires_grad_()
    wa = (0.1 * torch.randn(40, 96, device=DEVICE)).requires_grad_()
    assert_parity(lambda x, w, wa: ops.rms_norm_linear(x, w, [wa], eps=0.5)[0],
                  lambda x, w, wa: F.linear(reference.rms_norm(x, w, 0.5), wa), x, w, wa)


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


def test_swiglu_linear_bias_gradient_with_a_frozen_weight():
    """F02 (the bias gradient asked needs_input_grad[2], the weight's flag: a trainable bias on a
    frozen weight got no gradient). tests/test_fused_linear.py."""
    torch.manual_seed(0)
    gate = (2 * torch.randn(3, 7, 40, device=DEVICE)).requires_grad_()
    up = torch.randn(3, 7, 40, device=DEVICE, requires_grad=True)
    weight = 0.1 * torch.randn(24, 40, device=DEVICE)  # frozen
    bias = (0.1 * torch.randn(24, device=DEVICE)).requires_grad_()
    report = assert_parity(ops.swiglu_linear, lambda g, u, w, b: F.linear(reference.swiglu(g, u), w, b),
                           gate, up, weight, bias, names=("gate", "up", "weight", "bias"))
    assert "dbias" in [r.name for r in report.rows]


def test_outputs_with_a_bias_take_in_place_ops_under_autograd():
    """F.linear of a 3-D input with a bias returns a view of its 2-D product; made inside a custom
    Function, such a view refused in-place ops ("is a view and is being modified inplace"),
    which F.linear's own output takes. Gradients after the in-place scaling are torch's."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_()
    x, r, nw, w, b, gate, up = t(2, 3, 16), t(2, 3, 16), t(16), t(8, 16), t(8), t(2, 3, 16), t(2, 3, 16)
    scale = torch.rand(2, 3, 8, generator=g).to(DEVICE)

    def loss(norm_linear, swiglu_linear):
        a, s = norm_linear()
        c = swiglu_linear()
        a *= scale
        c *= scale
        return a.square().sum() + c.square().sum() + s.sum()

    inputs = (x, r, nw, w, b, gate, up)
    got = torch.autograd.grad(loss(lambda: ops.rms_norm_linear(x, nw, [w], [b], residual=r),
                                   lambda: ops.swiglu_linear(gate, up, w, b)), inputs)
    expected = torch.autograd.grad(loss(lambda: (F.linear(F.rms_norm(x + r, (16,), nw, 1e-6), w, b), x + r),
                                        lambda: F.linear(F.silu(gate) * up, w, b)), inputs)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_inference_tensors_feed_trainable_weights():
    """Features made under torch.inference_mode, frozen, into a norm / SwiGLU / their fused linears
    whose weights train: torch's formulas save tensors computed from the features and run; the
    ops saved the features themselves ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode():
        feats, feats2 = torch.randn(4, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    w = torch.ones(16, device=DEVICE, requires_grad=True)
    W = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    up = torch.randn(4, 16, device=DEVICE, requires_grad=True)
    for ours, theirs, params in (
            (lambda: ops.rms_norm(feats, w), lambda: F.rms_norm(feats, (16,), w, 1e-6), (w,)),
            (lambda: ops.swiglu(feats, up), lambda: F.silu(feats) * up, (up,)),
            (lambda: ops.rms_norm_linear(feats, w, [W])[0], lambda: F.linear(F.rms_norm(feats, (16,), w, 1e-6), W),
             (w, W)),
            (lambda: ops.swiglu_linear(feats, feats2, W), lambda: F.linear(F.silu(feats) * feats2, W), (W,))):
        got = torch.autograd.grad(ours().square().sum(), params)
        expected = torch.autograd.grad(theirs().square().sum(), params)
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
