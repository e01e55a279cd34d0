"""ops.apply_rotary_pos_emb / apply_rotary_pos_emb_from_positions beyond the op-table parity
cases: fp32 cos/sin with half-precision q, in-place (with autograd), output layout, agreement of
the two variants, and bad input rejected before any launch."""
import pytest
import torch

from conftest import DEVICE
from fastllama import ops, reference
from fastllama.kernels import rotary as kernels
from fastllama.testing import assert_parity


def _qk(b=2, hq=4, hk=2, t=33, d=64, dtype=torch.bfloat16, transposed=True):
    def make(h):
        if transposed:
            return torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, t, d, device=DEVICE, dtype=dtype)
    return make(hq), make(hk)


def _cos_sin(b, t, d, dtype, start=100):
    pos = torch.arange(start, start + t, device=DEVICE)[None].expand(b, t)
    inv_freq = reference.rope_inv_freq(d, 500000.0).to(DEVICE)
    cos, sin = reference.rope_cos_sin(pos, inv_freq, dtype=dtype)
    return pos, inv_freq, cos, sin


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_cos_sin_with_half_q(dtype):
    """fp32 cos/sin are used as is (more exact than HF, which rounds them to q's dtype first);
    the output keeps q's dtype. PyTorch's error is HF's path: cos/sin cast to q's dtype."""
    q, k = _qk(dtype=dtype)
    _, _, cos, sin = _cos_sin(2, 33, 64, torch.float32)
    q.requires_grad_(), k.requires_grad_()

    def hf_path(q, k, cos, sin):
        return reference.apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))

    out = ops.apply_rotary_pos_emb(q, k, cos, sin)
    assert out[0].dtype == dtype
    assert_parity(ops.apply_rotary_pos_emb, reference.apply_rotary_pos_emb, q, k, cos, sin,
                  torch_op=hf_path, names=("q", "k", "cos", "sin"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [48, 2])
def test_partial_rotary_matches_hf(dtype, rotary_dim):
    """cos/sin over the first rotary_dim dims of each head (Phi-4-mini: 3/4 of them): those rotate,
    pairing i with i + rotary_dim / 2 as HF's rotate_half of the slice does, the rest pass through
    bit for bit, in q's layout; gradients too, and in place (the tail untouched)."""
    q, k = _qk(dtype=dtype, d=64, hq=3, hk=1)
    _, _, cos, sin = _cos_sin(2, 33, rotary_dim, dtype)
    assert_parity(ops.apply_rotary_pos_emb, reference.apply_rotary_pos_emb, q.requires_grad_(), k.requires_grad_(),
                  cos, sin, names=("q", "k", "cos", "sin"))
    with torch.no_grad():
        q2, k2 = ops.apply_rotary_pos_emb(q, k, cos, sin)
        assert q2.stride() == q.stride() and torch.equal(q2[..., rotary_dim:], q[..., rotary_dim:])
        assert not torch.equal(k2[..., :rotary_dim], k[..., :rotary_dim])
        ref_q, ref_k = reference.apply_rotary_pos_emb(q.float(), k.float(), cos.float(), sin.float())
        torch.testing.assert_close(q2.float(), ref_q, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
        qi, ki = q.detach().clone(), k.detach().clone()
        assert ops.apply_rotary_pos_emb(qi, ki, cos, sin, inplace=True)[0] is qi
        assert torch.equal(qi, q2) and torch.equal(ki, k2)


@pytest.mark.parametrize("family,rotary_dim", [("glm", 32), ("glm4", 64), ("helium", 64), ("ernie4_5", 64)])
def test_adjacent_pairs_match_the_families_own_rotary(family, rotary_dim):
    """``interleaved=True`` is the apply_rotary_pos_emb of GLM (half the head here, as GLM's
    default partial_rotary_factor 0.5), GLM-4, Helium and Ernie 4.5: adjacent pairs rotated by
    the tables' first half. Only that half is read: the second half of cos/sin is garbage here.
    Output, gradients, in place, and the (B, T, H, D) layout of unsqueeze_dim=2."""
    import importlib

    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    q, k = (t.requires_grad_() for t in _qk(dtype=torch.float32, d=64, hq=3, hk=1))
    _, _, cos, sin = _cos_sin(2, 33, rotary_dim, torch.float32)
    cos, sin = (torch.cat([t[..., :rotary_dim // 2], torch.randn_like(t[..., rotary_dim // 2:])], -1)
                for t in (cos, sin))
    grads = [torch.randn_like(q), torch.randn_like(k)]
    want = hf(q, k, cos, sin)
    got = ops.apply_rotary_pos_emb(q, k, cos, sin, interleaved=True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, (q, k), grads), torch.autograd.grad(want, (q, k), grads)):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    for g, w in zip(reference.apply_rotary_pos_emb(q, k, cos, sin, interleaved=True), want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="interleaved must be a bool"):
        ops.apply_rotary_pos_emb(q, k, cos, sin, interleaved=1)
    with torch.no_grad():
        qi, ki = q.detach().clone(), k.detach().clone()
        ops.apply_rotary_pos_emb(qi, ki, cos, sin, inplace=True, interleaved=True)
        torch.testing.assert_close((qi, ki), (got[0].detach(), got[1].detach()), rtol=0, atol=0)
        by_token = ops.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2,
                                            interleaved=True)
        torch.testing.assert_close(by_token[0].transpose(1, 2), got[0].detach(), rtol=0, atol=0)


def test_output_keeps_input_layout():
    q, k = _qk()  # transposed from (B, T, H, D)
    _, _, cos, sin = _cos_sin(2, 33, 64, torch.bfloat16)
    q2, k2 = ops.apply_rotary_pos_emb(q, k, cos, sin)
    assert q2.stride() == q.stride() and k2.stride() == k.stride()


@pytest.mark.parametrize("views", [False, True], ids=["activations", "hf-views"])
@pytest.mark.parametrize("variant", ["cos_sin", "positions", "partial"])
def test_inplace_matches_out_of_place_with_grads(variant, views):
    q0, k0 = _qk(dtype=torch.float32)
    pos, inv_freq, cos, sin = _cos_sin(2, 33, 64, torch.float32)
    if variant == "partial":  # the first 40 dims rotate
        cos, sin = cos[..., :40].contiguous(), sin[..., :40].contiguous()
    extra = (pos, inv_freq) if variant == "positions" else (cos, sin)
    op = ops.apply_rotary_pos_emb_from_positions if variant == "positions" else ops.apply_rotary_pos_emb
    go_q, go_k = torch.randn_like(q0), torch.randn_like(k0)

    qa, ka = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    ra = op(qa, ka, *extra)
    torch.autograd.backward(ra, (go_q, go_k))

    qb, kb = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    if views:  # HF's layout: views (.view().transpose()) of projection outputs; autograd refuses
        # a two-output Function that modifies views in place, so these take a copy path
        q_view, k_view = ((t.transpose(1, 2) * 1).transpose(1, 2) for t in (qb, kb))
        assert q_view._is_view() and k_view._is_view()
    else:
        q_view, k_view = qb * 1, kb * 1  # in place on non-leaf activations, as in a model
    ptrs = (q_view.data_ptr(), k_view.data_ptr())
    rb = op(q_view, k_view, *extra, inplace=True)
    assert rb[0] is q_view and rb[1] is k_view and (rb[0].data_ptr(), rb[1].data_ptr()) == ptrs
    torch.autograd.backward(rb, (go_q, go_k))

    for a, b in ((ra[0], rb[0]), (ra[1], rb[1]), (qa.grad, qb.grad), (ka.grad, kb.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inplace_without_grad():
    q, k = _qk(dtype=torch.float16, transposed=False)
    _, _, cos, sin = _cos_sin(2, 33, 64, torch.float16)
    expect = ops.apply_rotary_pos_emb(q, k, cos, sin)
    ptr = q.data_ptr()
    with torch.no_grad():
        got = ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
    assert got[0].data_ptr() == ptr
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_inplace_on_a_one_token_fused_qkv_projection():
    """A decode step's q and k from one fused qkv projection are disjoint views: rotating them in
    place must work. With T == 1, ``.view().transpose()`` gives q and k different strides for the
    size-1 token dim (which no element ever steps along); the overlap check counted that as
    possibly shared memory and refused."""
    hq, hk, d = 4, 2, 64
    qkv = torch.randn(2, 1, (hq + 2 * hk) * d)
    q = qkv[..., :hq * d].view(2, 1, hq, d).transpose(1, 2)
    k = qkv[..., hq * d:(hq + hk) * d].view(2, 1, hk, d).transpose(1, 2)
    assert q.stride(2) != k.stride(2)  # the case
    _, _, cos, sin = _cos_sin(2, 1, d, torch.float32)
    expect = ops.apply_rotary_pos_emb(q, k, cos, sin)
    got = ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
    assert got[0].data_ptr() == q.data_ptr()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)


def test_positions_variant_matches_fp32_cos_sin():
    """In-kernel cos/sin from positions == the cos/sin tensors HF would compute in fp32."""
    q, k = _qk(dtype=torch.float32, t=17, d=128)
    pos, inv_freq, cos, sin = _cos_sin(2, 17, 128, torch.float32, start=70000)
    a = ops.apply_rotary_pos_emb_from_positions(q, k, pos, inv_freq)
    b = ops.apply_rotary_pos_emb(q, k, cos, sin)
    # cosf of the same fp32 argument: the two libraries may differ in the last bit.
    torch.testing.assert_close(a, b, rtol=0, atol=2e-6)


def _bad_inputs():
    q, k = _qk(d=64)
    _, _, cos, sin = _cos_sin(2, 33, 64, torch.bfloat16)
    pos = torch.arange(33, device=DEVICE)
    inv = reference.rope_inv_freq(64).to(DEVICE)
    rot = ops.apply_rotary_pos_emb
    rot_pos = ops.apply_rotary_pos_emb_from_positions
    q7 = torch.randn(2, 4, 33, 7, device=DEVICE, dtype=torch.bfloat16)
    q512 = torch.randn(1, 1, 33, 512, device=DEVICE, dtype=torch.bfloat16)
    return [
        ("odd head_dim", lambda: rot(q7, q7, cos[..., :7], sin[..., :7]), ValueError, "head_dim 7"),
        ("head_dim 512", lambda: rot(q512, q512, cos, sin), ValueError, "head_dim 512"),
        ("odd rotary dim", lambda: rot(q, k, cos[..., :31], sin[..., :31]), ValueError, "an even rotary dim"),
        ("rotary dim > head_dim", lambda: rot(q[..., :32], k[..., :32], cos, sin), ValueError, "an even rotary dim"),
        ("q/k dtype", lambda: rot(q, k.float(), cos, sin), TypeError, "k has dtype"),
        ("int q", lambda: rot(q.to(torch.int32), k, cos, sin), TypeError, "q has dtype"),
        ("q 3d", lambda: rot(q[0], k, cos, sin), ValueError, "q must have 4 dims"),
        ("k seq_len", lambda: rot(q, k[:, :, :5], cos, sin), ValueError, "k has shape"),
        ("cos seq_len", lambda: rot(q, k, cos[:, :5], sin[:, :5]), ValueError, "cos has shape"),
        ("cos batch", lambda: rot(q, k, cos.repeat(2, 1, 1), sin.repeat(2, 1, 1)), ValueError, "cos has shape"),
        ("sin dtype", lambda: rot(q, k, cos, sin.float()), TypeError, "sin has dtype"),
        ("cos grad", lambda: rot(q, k, cos.clone().requires_grad_(), sin), ValueError, "cos requires grad"),
        ("q strided D", lambda: rot(q[..., ::2], k[..., ::2], cos[..., :32], sin[..., :32]), ValueError,
         "q must be contiguous in its last dim"),
        ("float positions", lambda: rot_pos(q, k, pos.float(), inv), TypeError, "position_ids has dtype"),
        ("positions length", lambda: rot_pos(q, k, pos[:5], inv), ValueError, "position_ids has shape"),
        ("inv_freq size", lambda: rot_pos(q, k, pos, inv[:16]), ValueError, "inv_freq has shape"),
        ("inv_freq dtype", lambda: rot_pos(q, k, pos, inv.double()), TypeError, "inv_freq has dtype"),
        ("in place, k is q", lambda: rot(q, q, cos, sin, inplace=True), ValueError, "q and k share memory"),
        ("in place, q and k overlap in one head", lambda: rot(q.transpose(1, 2)[:, :, :3].transpose(1, 2),
                                                            q.transpose(1, 2)[:, :, 2:].transpose(1, 2), cos, sin,
                                                            inplace=True), ValueError, "q and k share memory"),
        ("in place, expanded q", lambda: rot(q[:, :1].expand(q.shape), k, cos, sin, inplace=True), ValueError,
         "q has a stride-0"),
    ]


@pytest.fixture
def no_launch(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")
    monkeypatch.setattr(kernels, "rotary", boom)


@pytest.mark.parametrize("case", range(len(_bad_inputs())), ids=[c[0] for c in _bad_inputs()])
def test_bad_input_rejected_before_launch(case, no_launch):
    _, call, exc, message = _bad_inputs()[case]
    with pytest.raises(exc, match=message):
        call()


def test_cpu_tensor_without_interpreter(monkeypatch, no_launch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k = torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64)
    with pytest.raises(ValueError, match="q is on device cpu"):
        ops.apply_rotary_pos_emb(q, k, torch.randn(3, 64), torch.randn(3, 64))


def test_inplace_on_views_with_grad_compiles():
    """Under torch.compile the in-place path with grad takes the copy route (dynamo cannot ask
    whether a tensor is a view): same values and gradients as eager."""
    B, T, H, D = 1, 8, 2, 16
    x = torch.randn(B, T, H * D, device=DEVICE, requires_grad=True)
    _, _, cos, sin = _cos_sin(B, T, D, torch.float32)

    def f(x):
        q = (x * 1).view(B, T, H, D).transpose(1, 2)
        k = (x * 2).view(B, T, H, D).transpose(1, 2)
        q2, k2 = ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=True)
        return (q2 * k2).sum()

    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    (g_compiled,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(g_compiled, g_eager, rtol=0, atol=0)


def test_hf_signature_unsqueeze_dim_and_keyword_only_inplace():
    """HF's fifth argument is unsqueeze_dim (2: q, k as (B, T, H, D)); it was ``inplace``, so a
    call written for HF rotated the caller's q and k in place. Old HF passed position_ids there."""
    q, k = _qk(dtype=torch.float32, transposed=False)
    _, _, cos, sin = _cos_sin(2, 33, 64, torch.float32)
    q_bthd, k_bthd = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
    before = q_bthd.clone()
    got = ops.apply_rotary_pos_emb(q_bthd, k_bthd, cos, sin, 2)
    expect = reference.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_bthd, before)  # not in place
    for g, e in zip(got, expect):
        assert g.shape == e.transpose(1, 2).shape
        torch.testing.assert_close(g, e.transpose(1, 2), rtol=1e-5, atol=1e-5)
    for bad in (True, 3, torch.tensor([[7]])):
        with pytest.raises(ValueError, match="unsqueeze_dim"):
            ops.apply_rotary_pos_emb(q, k, cos, sin, bad)
    with pytest.raises(TypeError):
        ops.apply_rotary_pos_emb_from_positions(q, k, _cos_sin(2, 33, 64, torch.float32)[0],
                                                reference.rope_inv_freq(64, 500000.0).to(DEVICE), True)


def test_backward_with_different_cos_sin_halves():
    """cos/sin whose two halves differ (supported, see the kernel's docs): rope_cos_sin's halves
    are equal, which hid a swapped pair in the backward."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 9, 64, device=DEVICE, requires_grad=True)
    cos, sin = torch.randn(2, 9, 64, device=DEVICE), torch.randn(2, 9, 64, device=DEVICE)
    assert_parity(ops.apply_rotary_pos_emb, reference.apply_rotary_pos_emb, q, k, cos, sin)


@pytest.mark.parametrize("shape", ["T", "1xT"])
def test_positions_shared_by_a_batch(shape):
    torch.manual_seed(0)
    q = torch.randn(3, 4, 17, 64, device=DEVICE, requires_grad=True)
    k = torch.randn(3, 2, 17, 64, device=DEVICE, requires_grad=True)
    inv_freq = reference.rope_inv_freq(64, 10000.0).to(DEVICE)
    pos = torch.arange(5, 22, device=DEVICE)
    pos = pos if shape == "T" else pos[None]
    assert_parity(ops.apply_rotary_pos_emb_from_positions, reference.functional.apply_rotary_pos_emb_from_positions,
                  q, k, pos, inv_freq)


def test_in_place_with_heads_split_over_programs():
    """The GPU schedule, forced here: fewer heads per program than Hq + Hk (under the interpreter
    one program takes every head), in place: a k head must be rotated once."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 64, device=DEVICE)
    k = torch.randn(2, 3, 9, 64, device=DEVICE)
    pos = torch.arange(9, device=DEVICE)[None].expand(2, 9)
    cos, sin = reference.rope_cos_sin(pos, reference.rope_inv_freq(64))
    q_ref, k_ref = reference.apply_rotary_pos_emb(q, k, cos, sin)
    kernels.rotary(q, k, q, k, cos, sin, backward=False, block_t=16, heads_per_program=3, num_warps=1)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


def _rot_inputs(d=64, b=2, t=9, hq=4, hk=2, dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(b, hq, t, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, t, d, device=DEVICE, dtype=dtype, requires_grad=True)
    pos = torch.arange(3, 3 + t, device=DEVICE)[None].expand(b, t)
    cos, sin = reference.rope_cos_sin(pos, reference.rope_inv_freq(d).to(DEVICE), dtype=dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("d", [2, 256])
def test_rotary_accepts_the_smallest_and_largest_head_dim(d):
    """R02 / R03 (head_dim bounds off by one: 2 <= d became 4 <= d, d <= 256 became d < 256).
    tests/test_rotary.py. Both ends are documented as accepted."""
    q, k, cos, sin = _rot_inputs(d=d, t=5)
    assert_parity(ops.apply_rotary_pos_emb, reference.apply_rotary_pos_emb, q, k, cos, sin)


def test_rotary_in_place_with_only_q_a_view():
    """R04 (the copy path for views taken only when q AND k are views: q a view of a projection,
    k an activation of its own, went into the two-output in-place Function, which autograd
    refuses for views). tests/test_rotary.py."""
    q0, k0, cos, sin = _rot_inputs()
    go_q, go_k = torch.randn_like(q0), torch.randn_like(k0)
    ra = ops.apply_rotary_pos_emb(q0, k0, cos, sin)
    torch.autograd.backward(ra, (go_q, go_k))
    qb, kb = q0.detach().clone().requires_grad_(), k0.detach().clone().requires_grad_()
    q_view = (qb.transpose(1, 2) * 1).transpose(1, 2)
    k_act = kb * 1
    assert q_view._is_view() and not k_act._is_view()
    rb = ops.apply_rotary_pos_emb(q_view, k_act, cos, sin, inplace=True)
    torch.autograd.backward(rb, (go_q, go_k))
    for a, b in ((ra[0], rb[0]), (ra[1], rb[1]), (q0.grad, qb.grad), (k0.grad, kb.grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rotary_rejects_cos_and_sin_of_different_shapes():
    """R05 (the cos.shape == sin.shape check removed: a (T, D) cos with a (B, T, D) sin was read
    with the wrong strides, silently). tests/test_rotary.py (_bad_inputs)."""
    q, k, cos, sin = _rot_inputs()
    with pytest.raises(ValueError, match="sin has shape"):
        ops.apply_rotary_pos_emb(q, k, cos[0], sin)


def test_rotary_backward_of_an_expanded_upstream_gradient():
    """R06 (the backward's _unit_stride dropped: q2.sum() hands a stride-0 gradient to a kernel
    that reads unit stride in D). tests/test_rotary.py."""
    q, k, cos, sin = _rot_inputs()
    q2, k2 = ops.apply_rotary_pos_emb(q, k, cos, sin)
    (q2.sum() + k2.sum()).backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    a, b = reference.apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(q.grad, q64.grad.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k.grad, k64.grad.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_tensor_without_gradient_stays_out_of_the_graph(inplace):
    """q needs a gradient, k does not (a frozen key path, a persistent buffer): as with torch's
    ``q * cos + rotate_half(q) * sin`` (and copy_ in place), rotated k needs none, and in place k
    stays a leaf outside the graph: marked dirty by a Function, it was put in the graph, and a
    second step backward through a persistent k failed ("backward through the graph a second
    time"). q's gradient is torch's."""
    cos, sin = reference.rope_cos_sin(torch.arange(3, device=DEVICE)[None], reference.rope_inv_freq(16))
    k = torch.randn(1, 1, 3, 16, device=DEVICE)
    for _ in range(2):  # (the second step used to fail)
        leaf = torch.randn(1, 2, 3, 16, device=DEVICE, requires_grad=True)
        q = leaf * 1  # (in place needs a non-leaf)
        q_rot, k_rot = ops.apply_rotary_pos_emb(q, k, cos, sin, inplace=inplace)
        assert not k_rot.requires_grad and k_rot.grad_fn is None
        assert k.is_leaf and not k.requires_grad
        weights = torch.arange(16, device=DEVICE)
        (got,) = torch.autograd.grad((q_rot * weights).sum(), leaf)
        (expected,) = torch.autograd.grad((reference.apply_rotary_pos_emb(leaf, k, cos, sin)[0] * weights).sum(), leaf)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_an_input_its_used_outputs_do_not_reach_gets_no_gradient():
    """Only rotated q used: k gets None, as with torch's formula (not a zero tensor, which
    torch.autograd.grad(allow_unused=True) and .grad would show). The same for attention's v
    when only its log-sum-exp is used."""
    cos, sin = reference.rope_cos_sin(torch.arange(3, device=DEVICE)[None], reference.rope_inv_freq(16))
    q, k, v = (torch.randn(1, h, 3, 16, device=DEVICE, requires_grad=True) for h in (2, 1, 1))
    dq, dk = torch.autograd.grad(ops.apply_rotary_pos_emb(q, k, cos, sin)[0].square().sum(), (q, k), allow_unused=True)
    assert dk is None
    expected = torch.autograd.grad(reference.apply_rotary_pos_emb(q, k, cos, sin)[0].square().sum(), q)[0]
    torch.testing.assert_close(dq, expected, rtol=1e-6, atol=1e-6)
    assert torch.autograd.grad(ops.apply_rotary_pos_emb(q, k, cos, sin)[1].sum(), q, allow_unused=True)[0] is None
    lse = ops.flash_attention_with_lse(q, k, v)[1]
    assert torch.autograd.grad(lse.sum(), (q, v), allow_unused=True)[1] is None
