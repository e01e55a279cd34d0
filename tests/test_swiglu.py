"""ops.swiglu / ops.swiglu_fused beyond the op-table parity cases: what backward saves, in-place
gradients, fused == separate, the module form, and bad input rejected before any launch."""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from fastllama import modules, ops, reference
from fastllama.kernels import swiglu as kernels


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def test_backward_saves_gate_and_up_only():
    gate, up = _t(3, 5, 96).requires_grad_(), _t(3, 5, 96).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.swiglu(gate, up)
    assert sorted(t.data_ptr() for t in saved) == sorted([gate.data_ptr(), up.data_ptr()])


def test_fused_equals_separate_halves():
    """Gate first: swiglu_fused(cat([gate, up], -1)) == swiglu(gate, up), bit for bit."""
    gate_up = _t(2, 7, 2 * 80, dtype=torch.float16).requires_grad_()
    out = ops.swiglu_fused(gate_up)
    go = torch.randn_like(out)
    out.backward(go)
    g, u = gate_up.detach()[..., :80].clone().requires_grad_(), gate_up.detach()[..., 80:].clone().requires_grad_()
    out2 = ops.swiglu(g, u)
    out2.backward(go)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(gate_up.grad, torch.cat([g.grad, u.grad], -1), rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_inplace_backward_matches_and_reuses_memory(fused, activation):
    x = _t(4, 9, 2 * 64, dtype=torch.float32)
    go = _t(4, 9, 64, dtype=torch.float32)
    grads = []
    for inplace in (False, True):
        leaf = x.clone().requires_grad_()
        act = leaf * 1  # an intermediate activation, like a projection's output
        act.retain_grad()
        if fused:
            out = ops.swiglu_fused(act, inplace_backward=inplace, activation=activation)
        else:
            out = ops.swiglu(act[..., :64], act[..., 64:], inplace_backward=inplace, activation=activation)
        ptr = act.data_ptr()
        out.backward(go)
        grads.append(leaf.grad)
        if inplace:  # the gradient landed in the activation's own memory
            torch.testing.assert_close(act.detach(), grads[0], rtol=0, atol=0)
            assert act.data_ptr() == ptr
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_inplace_backward_with_gate_and_up_in_one_storage_runs_out_of_place():
    # swiglu(x, x): an in-place backward would write d_gate and d_up over each other
    x = (torch.randn(5, 24, device=DEVICE) * 2).requires_grad_()
    h = x * 1.0
    ops.swiglu(h, h, inplace_backward=True).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (F.silu(x64) * x64).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


def test_inplace_backward_rejects_leaves_and_their_views():
    gate, up = _t(4, 32).requires_grad_(), _t(4, 32).requires_grad_()
    with pytest.raises(ValueError, match="leaf tensor"):
        ops.swiglu(gate, up, inplace_backward=True)
    param = torch.nn.Parameter(_t(4, 64))  # its halves would be overwritten with gradients
    with pytest.raises(ValueError, match="view of a leaf tensor"):
        ops.swiglu(param[:, :32], param[:, 32:], inplace_backward=True)
    with pytest.raises(ValueError, match="view of a leaf tensor"):
        ops.swiglu_fused(param[:2], inplace_backward=True)


def test_inplace_backward_leaves_an_input_that_needs_no_grad_alone():
    gate = (_t(4, 32, dtype=torch.float32) * 1).requires_grad_()
    up = _t(4, 32, dtype=torch.float32)
    before = up.clone()
    ops.swiglu(gate, up, inplace_backward=True).sum().backward()
    torch.testing.assert_close(up, before, rtol=0, atol=0)


@pytest.mark.parametrize("fused", [False, True])
def test_inplace_backward_on_rows_that_do_not_collapse_runs_out_of_place(fused):
    """The first 3 of 7 rows per batch of an activation, (4, 3, 32) with strides (224, 32, 1): any
    row strides are accepted, so the in-place request falls back instead of raising ValueError."""
    x = torch.randn(4, 7, 32, device=DEVICE, requires_grad=True)
    grads = []
    for inplace in (False, True):
        x.grad = None
        rows = (x * 1.0)[:, :3]
        if fused:
            out = ops.swiglu_fused(rows, inplace_backward=inplace)
        else:
            out = ops.swiglu(rows[..., :16], rows[..., 16:], inplace_backward=inplace)
        out.sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_inplace_backward_with_partly_overlapping_views_is_correct():
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    h = x * 1.0
    ops.swiglu(h[:, :32], h[:, 1:33], inplace_backward=True).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (F.silu(x64[:, :32]) * x64[:, 1:33]).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


def test_inplace_backward_on_chunked_halves_compiles():
    """Dynamo refuses in-place writes into the outputs of chunk(); under torch.compile the
    in-place backward is off (inductor plans buffer reuse itself)."""
    x = torch.randn(4, 64, device=DEVICE, requires_grad=True)

    def f(x):
        gate, up = (x * 1).chunk(2, -1)
        return ops.swiglu(gate, up, inplace_backward=True)

    torch.compile(f, backend="aot_eager", fullgraph=True)(x).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (F.silu(x64[:, :32]) * x64[:, 32:]).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)


def test_share_memory_is_exact_for_views_with_equal_strides():
    import itertools

    from fastllama.ops._checks import share_memory

    def brute(a, b):
        def addrs(t):
            return {t.data_ptr() + t.element_size() * sum(i * st for i, st in zip(ix, t.stride()))
                    for ix in itertools.product(*map(range, t.shape))}
        return bool(addrs(a) & addrs(b))

    buf = torch.randn(4, 10, 12)
    qkv = torch.randn(2, 7, 8 * 8).view(2, 7, 8, 8).transpose(1, 2)  # 4 q, 2 k, 2 v heads
    pairs = [(buf[..., :6], buf[..., 6:]), (buf[..., :6], buf[..., 5:11]), (buf[:, ::2], buf[:, 1::2]),
             (buf[:, ::2], buf[:, 2::2]), (qkv[:, :4], qkv[:, 4:6]), (qkv[:, :4], qkv[:, 3:5]),
             (qkv[:, 4:6], qkv[:, 6:]), (buf, torch.randn(4, 10, 12))]
    assert [share_memory(a, b) for a, b in pairs] == [brute(a, b) for a, b in pairs] == \
        [False, True, False, True, False, True, False, False]
    flat, g = torch.randn(4000), torch.Generator().manual_seed(0)
    for _ in range(300):  # random nested layouts, random offsets
        shape = [int(n) for n in torch.randint(1, 5, (3,), generator=g)]
        s2 = int(torch.randint(1, 4, (1,), generator=g))
        s1 = s2 * shape[2] + int(torch.randint(0, 4, (1,), generator=g))
        strides = (s1 * shape[1] + int(torch.randint(0, 6, (1,), generator=g)), s1, s2)
        a, b = (flat.as_strided(shape, strides, int(torch.randint(0, 150, (1,), generator=g))) for _ in range(2))
        assert share_memory(a, b) == brute(a, b)


def test_module_matches_hf_mlp():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=64, intermediate_size=160)
    torch.manual_seed(0)
    hf = LlamaMLP(config).to(DEVICE)
    ours = modules.LlamaMLP(config).to(DEVICE)
    ours.load_state_dict(hf.state_dict())
    assert ours.state_dict().keys() == hf.state_dict().keys()
    x = _t(2, 5, 64, dtype=torch.float32)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_act"):
        modules.LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act="gelu"))


def test_empty():
    gate, up = _t(0, 32).requires_grad_(), _t(0, 32).requires_grad_()
    out = ops.swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (0, 32) and gate.grad.shape == (0, 32)


def test_expanded_upstream_gradient():
    gate, up = _t(5, 48, dtype=torch.float32).requires_grad_(), _t(5, 48, dtype=torch.float32).requires_grad_()
    ops.swiglu(gate, up).sum().backward()
    g2, u2 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    reference.swiglu(g2, u2).sum().backward()
    torch.testing.assert_close(gate.grad, g2.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(up.grad, u2.grad.float(), rtol=1e-5, atol=1e-6)


def _bad_inputs():
    g = _t(4, 32)
    return [
        ("shape", lambda: ops.swiglu(g, _t(4, 33)), ValueError, "up has shape"),
        ("dtype", lambda: ops.swiglu(g, _t(4, 32, dtype=torch.float16)), TypeError, "up has dtype"),
        ("int", lambda: ops.swiglu(g.to(torch.int64), g), TypeError, "gate has dtype"),
        ("strided last dim", lambda: ops.swiglu(_t(4, 64)[:, ::2], g), ValueError, "gate must be contiguous"),
        ("scalar", lambda: ops.swiglu(_t(1)[0], _t(1)[0]), ValueError, "at least 1 dim"),
        ("odd gate_up", lambda: ops.swiglu_fused(_t(4, 33)), ValueError, "gate_up has last dim 33"),
        ("size 0", lambda: ops.swiglu(_t(4, 0), _t(4, 0)), ValueError, "intermediate size of 0"),
        ("fused size 0", lambda: ops.swiglu_fused(_t(4, 0)), ValueError, "gate_up has last dim 0"),
        ("fused dtype", lambda: ops.swiglu_fused(g.to(torch.int32)), TypeError, "gate_up has dtype"),
    ]


@pytest.fixture
def no_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")
    monkeypatch.setattr(kernels, "swiglu_forward", boom)


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_rejected_before_launch(case, no_launch):
    _, call, exc, message = _bad_inputs()[case]
    with pytest.raises(exc, match=message):
        call()


def test_cpu_tensor_without_interpreter(monkeypatch, no_launch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="gate is on device cpu"):
        ops.swiglu(torch.randn(2, 8), torch.randn(2, 8))


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_inplace_backward_has_no_double_backward(fused):
    """The in-place kernels have no derivative: create_graph raises (it gave second-order
    gradients off by 100%)."""
    x = _t(3, 2 * 32, dtype=torch.float32).requires_grad_()
    gate_up = x * 2  # an activation, not a leaf: in-place backward allowed
    out = ops.swiglu_fused(gate_up, True) if fused else ops.swiglu(*gate_up.chunk(2, -1), True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_fused_inplace_backward_with_an_expanded_gate_up_runs_out_of_place():
    """Rows of an expanded gate_up share memory: writing their gradients in place summed them
    over each other (dx 360 off at magnitude 100)."""
    x = _t(1, 24, dtype=torch.float32).requires_grad_()
    w = _t(64, 24, dtype=torch.float32)
    go = _t(5, 32, dtype=torch.float32)  # rows differ (with equal rows the overwrites agreed)
    (ops.swiglu_fused((x @ w.t()).expand(5, 64), inplace_backward=True) * go).sum().backward()
    x2 = x.detach().double().requires_grad_()
    (reference.swiglu(*((x2 @ w.double().t()).expand(5, 64)).chunk(2, -1)) * go.double()).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), rtol=1e-5, atol=1e-4)


def test_gate_and_up_with_different_row_strides():
    # every other test builds gate and up alike, so reading one with the other's stride passed
    from fastllama.testing import assert_parity

    torch.manual_seed(0)
    gate = torch.randn(5, 4099 + 13, device=DEVICE)[:, :4099].requires_grad_()
    up = torch.randn(5, 4099, device=DEVICE).requires_grad_()
    assert_parity(ops.swiglu, reference.swiglu, gate, up)


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


class _Config:
    def __init__(self, **kw):
        self.hidden_size, self.intermediate_size = 32, 80
        self.__dict__.update(kw)


def test_llama_mlp_module_honours_mlp_bias():
    """M02 (modules.LlamaMLP ignores config.mlp_bias). tests/test_swiglu.py. HF's LlamaMLP has
    biases on all three projections when mlp_bias=True: the state_dict keys must match."""
    mlp = modules.LlamaMLP(_Config(mlp_bias=True, hidden_act="silu"))
    assert sorted(mlp.state_dict()) == sorted(f"{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj")
                                              for t in ("weight", "bias"))


def test_llama_mlp_module_accepts_swish():
    """M03 (modules.LlamaMLP rejects hidden_act='swish', which is silu in HF's ACT2FN).
    tests/test_swiglu.py."""
    torch.manual_seed(0)
    mlp = modules.LlamaMLP(_Config(hidden_act="swish")).to(DEVICE)
    x = torch.randn(3, 32, device=DEVICE)
    expect = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), expect, rtol=1e-5, atol=1e-5)


def test_swiglu_fake_kernels_match_the_real_ones():
    """S03 (register_fake of swiglu_fused returns the (..., 2I) input's shape, not (..., I)).
    tests/test_swiglu.py (or tests/test_compile.py, whose eager == compiled check let it pass:
    the fallback kernel's real output is used, but the graph around it is planned with the
    fake shape)."""
    gate_up = torch.randn(3, 5, 2 * 48, device=DEVICE, requires_grad=True)
    gate, up = torch.randn(3, 5, 48, device=DEVICE), torch.randn(3, 5, 48, device=DEVICE)
    torch.library.opcheck(torch.ops.fastllama.swiglu_fused.default, (gate_up,),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fastllama.swiglu.default, (gate, up),
                          test_utils=("test_schema", "test_faketensor"))


def test_geglu_matches_gemma3_mlp_and_rejects_unknown_activations():
    """activation="gelu_tanh": HF's Gemma3MLP (GELUTanh gate) through the kernel, forward and
    backward (fp32: to rounding); any other activation name is a ValueError."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    torch.manual_seed(0)
    mlp = Gemma3MLP(Gemma3TextConfig(hidden_size=64, intermediate_size=160)).to(DEVICE)
    x = (2 * torch.randn(3, 7, 64, device=DEVICE)).requires_grad_()
    expected = mlp(x)
    expected.sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    out = mlp.down_proj(ops.swiglu(mlp.gate_proj(x), mlp.up_proj(x), activation="gelu_tanh"))
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-6)
    gate = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.swiglu(gate, gate, activation="gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.swiglu_fused(gate, activation="relu")
