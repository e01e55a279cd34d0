"""The parity harness itself: it passes a correct op and fails wrong ones."""
import pytest
import torch

from fastllama import reference
from fastllama.testing import assert_parity, parity_report


def _inputs(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 77, 259, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(259)).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_passes_against_itself(dtype):
    report = assert_parity(reference.rms_norm, reference.rms_norm, *_inputs(dtype))
    assert [r.name for r in report.rows] == ["out0", "darg0", "darg1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrong_op_fails(dtype):
    def wrong(x, w, eps=1e-6):  # forgets the eps and the fp32 upcast, scales by 1.05
        return 1.05 * reference.rms_norm(x, w, eps)

    report = parity_report(wrong, reference.rms_norm, *_inputs(dtype))
    assert not report.passed
    with pytest.raises(AssertionError, match="FAIL"):
        report.raise_if_failed()


def test_wrong_gradient_fails_with_correct_forward():
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return reference.rms_norm(x, w)

        @staticmethod
        def backward(ctx, g):
            x, w = ctx.saved_tensors
            with torch.enable_grad():
                xx, ww = x.detach().requires_grad_(), w.detach().requires_grad_()
                dx, dw = torch.autograd.grad(reference.rms_norm(xx, ww), (xx, ww), g)
            return dx, dw * 0.5  # wrong weight gradient

    report = parity_report(BadGrad.apply, reference.rms_norm, *_inputs(torch.float32))
    failed = {r.name for r in report.rows if not r.passed}
    assert failed == {"darg1"}, report.table()


def test_nan_where_truth_is_finite_fails():
    def with_nan(x, w):
        out = reference.rms_norm(x, w).clone()
        out[0, 0, 0] = float("nan")
        return out

    report = parity_report(with_nan, reference.rms_norm, *_inputs(torch.float32), check_grad=False)
    assert not report.passed
    assert "non-finite" in report.rows[0].problem


def test_inf_where_truth_is_finite_fails():
    def with_inf(x, w):
        out = reference.rms_norm(x, w).clone()
        out[1, 2, 3] = float("inf")
        return out

    report = parity_report(with_inf, reference.rms_norm, *_inputs(torch.bfloat16), check_grad=False)
    assert not report.passed
    assert "(1, 2, 3)" in report.rows[0].problem


def test_missing_gradient_fails():
    def detached_weight(x, w):
        return reference.rms_norm(x, w.detach())

    report = parity_report(detached_weight, reference.rms_norm, *_inputs(torch.float32))
    assert not report.passed
    assert any("missing gradient" in r.problem for r in report.rows)


def test_table_names_worst_index():
    x, w = _inputs(torch.float32)

    def off_by_one_element(x, w):
        out = reference.rms_norm(x, w).clone()
        out[2, 5, 7] += 1.0
        return out

    report = parity_report(off_by_one_element, reference.rms_norm, x, w, check_grad=False, names=["x", "w"])
    assert report.rows[0].worst_index == (2, 5, 7)
    assert "(2, 5, 7)" in report.table()


# ---------------------------------------------------------------------------------------------
# Ways a wrong op could slip through (each found by planting the bug; all failed to fail before)
# ---------------------------------------------------------------------------------------------
def _masked_lse(x):
    """Row log-sum-exp with the second half of the rows fully masked: truth -inf there."""
    keep = torch.arange(x.shape[0])[:, None] < x.shape[0] // 2
    return torch.logsumexp(x.masked_fill(~keep, float("-inf")), dim=-1)


@pytest.mark.parametrize("wrong", [float("inf"), float("nan")])
def test_wrong_non_finite_value_where_the_truth_is_minus_inf_fails(wrong):
    x = torch.randn(6, 9, dtype=torch.float16)

    def planted(x):
        out = _masked_lse(x).clone()
        out[-1] = wrong  # a fully masked row: -inf expected
        return out

    assert parity_report(_masked_lse, _masked_lse, x).passed  # the same -inf: passes
    report = parity_report(planted, _masked_lse, x)
    assert not report.passed and "where the truth is -inf" in report.rows[0].problem


def test_gradients_are_checked_under_no_grad():
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            return reference.rms_norm(x, w)

        @staticmethod
        def backward(ctx, g):
            return g * 0, None  # wrong gradient of x, none for w

    with torch.no_grad():
        report = parity_report(BadGrad.apply, reference.rms_norm, *_inputs(torch.float32))
    assert [r.name for r in report.rows] == ["out0", "darg0", "darg1"]
    assert not report.passed


def test_output_dtype_must_be_pytorchs():
    report = parity_report(lambda x, w: reference.rms_norm(x, w).float(), reference.rms_norm,
                           *_inputs(torch.bfloat16), check_grad=False)
    assert not report.passed and "dtype torch.float32" in report.rows[0].problem


def test_names_must_cover_every_argument_and_output():
    x, w = _inputs(torch.float32)
    with pytest.raises(ValueError, match="names has 1 entries for 2 arguments"):
        parity_report(reference.rms_norm, reference.rms_norm, x, w, names=["x"])
    with pytest.raises(ValueError, match="output_names has 2 entries"):
        parity_report(reference.rms_norm, reference.rms_norm, x, w, output_names=["y", "z"])


def test_nested_and_integer_outputs_are_compared():
    x = torch.randn(4, 10)

    def ref(x):
        return (x * 2, (x + 1, x.argmax(-1)))

    def wrong_nested(x):
        return (x * 2, (x + 1.5, x.argmax(-1)))

    def wrong_index(x):
        return (x * 2, (x + 1, x.argmin(-1)))

    assert [r.name for r in parity_report(ref, ref, x).rows] == ["out0", "out1", "out2"]
    assert not parity_report(wrong_nested, ref, x).passed
    report = parity_report(wrong_index, ref, x)
    assert [r.passed for r in report.rows] == [True, True, False]


def test_nothing_to_compare_fails():
    x = torch.randn(4, 10)
    assert not parity_report(lambda x: None, lambda x: None, x).passed


def test_truth_uses_the_same_rounded_upstream_gradient():
    """y = x + r in bf16 has an exact gradient (the upstream gradient itself) in every dtype;
    drawn in float64 and left unrounded for the truth alone, it made PyTorch's bf16 gradient look
    ~1e-2 wrong and let a wrong gradient of that size pass."""
    x, r = (torch.randn(64, 33, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    report = parity_report(torch.add, torch.add, x, r)
    assert [row.torch_err for row in report.rows[1:]] == [0.0, 0.0]

    class OffGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            g2 = g.clone()
            g2[0, 0] += 0.05 * g.abs().max()  # well inside the old, inflated allowance
            return g2, g

    assert not parity_report(OffGrad.apply, torch.add, x, r).passed


def test_finite_pytorch_where_the_truth_is_nan_does_not_make_the_allowance_infinite():
    # A second PyTorch formulation that is finite where the truth is NaN (a fully masked row) must
    # not count as an infinite error of PyTorch's: the allowance stays finite, a wrong op fails.
    x = torch.randn(16, dtype=torch.float16)

    def nan_first(t, scale):
        y = t * scale
        y[0] = float("nan")
        return y

    zero_first = lambda t: torch.where(torch.arange(t.numel()) == 0, 0.0, t * 2).to(t.dtype)  # noqa: E731
    report = parity_report(lambda t: nan_first(t, 3.0), lambda t: nan_first(t, 2.0), x,
                           torch_op=[lambda t: nan_first(t, 2.0), zero_first], check_grad=False)
    assert not report.passed and report.rows[0].allowed < 1, report.table()


def test_every_run_gets_its_own_inputs_with_their_strides():
    # An op that writes into its input must not change the caller's tensor, nor the inputs the
    # truth is computed from: a wrong in-place op fails, a right one passes.
    base = torch.randn(4, 16)
    x = base[:, ::2]  # a strided view: the copy keeps its strides
    seen = []

    def zero_in_place(t):
        seen.append(t.stride())
        return t.zero_()

    def double_in_place(t):
        return t.mul_(2)

    before = base.clone()
    assert not parity_report(zero_in_place, lambda t: t.clone(), x).passed
    assert parity_report(double_in_place, lambda t: t * 2, x).passed
    assert torch.equal(base, before)
    assert seen == [x.stride()]


def test_tensors_inside_a_list_argument_are_compared():
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.float16, requires_grad=True)
    weights = [torch.randn(8, 8, dtype=torch.float16, requires_grad=True)]

    class ZeroWeightGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, w):
            ctx.save_for_backward(t, w)
            return t @ w.t()

        @staticmethod
        def backward(ctx, g):
            t, w = ctx.saved_tensors
            return g @ w, torch.zeros_like(w)

    matmul = lambda t, ws: t @ ws[0].t()  # noqa: E731
    report = parity_report(lambda t, ws: ZeroWeightGrad.apply(t, ws[0]), matmul, x, weights, names=["x", "w"])
    assert [(r.name, r.passed) for r in report.rows] == [("out0", True), ("dx", True), ("dw[0]", False)], report.table()
    assert parity_report(matmul, matmul, x, weights).passed


def test_output_of_the_wrong_shape_or_type_is_a_failing_row():
    x = torch.randn(4, 8, requires_grad=True)
    report = parity_report(lambda t: t.t().contiguous(), lambda t: t * 1, x)
    assert "shape (8, 4)" in report.rows[0].problem and not report.passed
    report = parity_report(lambda t: 1.0, lambda t: t.sum(), x, check_grad=False)
    assert "float" in report.rows[0].problem and not report.passed


def test_integer_inputs_get_their_own_copy_too():
    # an op that advances its lengths in place changed the caller's tensor and the truth's input
    lens = torch.tensor([1, 2, 3, 4])

    def advances(x, n):
        n += 1
        return x * n

    report = parity_report(advances, lambda x, n: x * n, torch.ones(4), lens, check_grad=False)
    assert not report.passed and lens.tolist() == [1, 2, 3, 4]


# Tests from mutation testing (op wrappers, harness, modules): each fails on a plausible bug the
# suite let through.


def _offset(x, c):
    return x + c


def test_forward_allowance_is_twice_pytorchs_error_plus_the_floor():
    """T01 (fwd_factor default 2.0 -> 3.0). tests/test_testing.py. An op 2.5x as far from the truth
    as PyTorch fails; its row's allowance is exactly 2 * PyTorch's error + eps * max|truth|."""
    x = 1 + torch.rand(64, 33)  # float32 in [1, 2): the truth (x itself) is exact
    report = parity_report(lambda t: _offset(t, 2.5e-3), lambda t: t, x, torch_op=lambda t: _offset(t, 1e-3))
    row = report.rows[0]
    floor = torch.finfo(torch.float32).eps * float(x.abs().max())
    assert row.allowed == pytest.approx(2 * row.torch_err + floor, rel=1e-9)
    assert not report.passed
    assert parity_report(lambda t: _offset(t, 1.5e-3), lambda t: t, x, torch_op=lambda t: _offset(t, 1e-3)).passed


def _grad_off(c):
    class F2(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2 + c
    return F2.apply


def test_gradient_allowance_is_three_times_pytorchs_error_plus_the_floor():
    """T02 (bwd_factor default 3.0 -> 4.0). tests/test_testing.py. A gradient 3.5x as far from the
    truth as PyTorch's fails; 2.5x passes."""
    x = torch.randn(64, 33, requires_grad=True)
    torch_like = _grad_off(1e-3)
    report = parity_report(_grad_off(3.5e-3), lambda t: t * 2, x, torch_op=torch_like)
    assert [r.passed for r in report.rows] == [True, False], report.table()
    assert parity_report(_grad_off(2.5e-3), lambda t: t * 2, x, torch_op=torch_like).passed


def test_pytorch_overflowing_where_the_truth_is_finite_does_not_fail_a_correct_op():
    """T04 (PyTorch's error taken where only the truth is finite: `torch.where(finite, same,
    truth)`). tests/test_testing.py. fp16 PyTorch overflows to inf in x * 1000 where the float64
    truth is finite; that must not make the allowance infinite (which fails every op)."""
    x = (100 + 10 * torch.rand(8, 16)).to(torch.float16)

    def scaled(t):
        return (t * 1000) / 1000  # fp16: inf; float64: t

    def exact(t):
        return scaled(t.float()).to(t.dtype)

    report = parity_report(exact, scaled, x)
    assert report.passed, report.table()


def test_integer_output_of_another_dtype_fails():
    """T05 (integer outputs compared without their dtype). tests/test_testing.py."""
    x = torch.randn(4, 10)
    report = parity_report(lambda t: (t * 2, t.argmax(-1).int()), lambda t: (t * 2, t.argmax(-1)), x)
    assert [r.passed for r in report.rows] == [True, False]


def test_equal_integer_outputs_pass():
    """T09 (ParityRow.passed with `<` instead of `<=`: an exact integer row, error 0 and
    allowance 0, failed). tests/test_testing.py."""
    x = torch.randn(4, 10)
    ref = lambda t: (t * 2, t.argmax(-1))  # noqa: E731
    report = parity_report(ref, ref, x)
    assert report.passed, report.table()


def test_gradient_for_an_input_the_reference_ignores_fails():
    """T06 (a kernel gradient is skipped when the reference has none for that input).
    tests/test_testing.py. The truth's gradient is zero there: a non-zero one must fail."""
    class Leaky(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2, torch.ones(4, 8)

    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    report = parity_report(Leaky.apply, lambda a, b: a * 2, a, b, names=["a", "b"])
    assert [(r.name, r.passed) for r in report.rows] == [("out0", True), ("da", True), ("db", False)], report.table()


def test_an_op_returning_fewer_outputs_fails():
    """T07 (the 'op returned N outputs, reference M' row dropped: zip compared the common prefix
    only). tests/test_testing.py."""
    x = torch.randn(4, 10)
    report = parity_report(lambda t: (t * 2,), lambda t: (t * 2, t + 1), x)
    assert not report.passed and "op returned 1 outputs, reference 2" in report.table()


def test_float64_truth_runs_grouped_matmuls_in_float64():
    """HF's mixture-of-experts layers multiply with torch's grouped matmul, which has no float64
    kernel: inside float64_truth it runs as a loop in float64, values and gradients equal to
    the float32 kernel's to float32 rounding (rows past the last group, which the kernel leaves
    unwritten, are 0)."""
    from fastllama.testing import float64_truth

    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    g = torch.Generator().manual_seed(0)
    a = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 8, 12, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([4, 4, 11], dtype=torch.int32)  # an empty group, two rows past the last
    with float64_truth():
        out = grouped_mm(a, b, offs=offs)
    assert out.dtype == torch.float64
    out[:11].sum().backward()
    a32, b32 = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    expected = grouped_mm(a32, b32, offs=offs)
    expected[:11].sum().backward()
    torch.testing.assert_close(out[:11].float(), expected[:11])
    assert (out[11:] == 0).all()
    torch.testing.assert_close(a.grad[:11].float(), a32.grad[:11])  # (the kernel leaves the rest unwritten)
    torch.testing.assert_close(b.grad.float(), b32.grad)


# Harness audit (2026-12-06): each of these passed something wrong.
def test_a_backward_writing_into_its_incoming_gradient_is_judged_on_its_own_copy():
    """Each run gets its own upstream gradient: a backward that scales dY in place (reusing the
    buffer) changed the gradient the later runs used, passing a wrong one and failing a right one."""
    def scaling_in_place(factor, wrong):
        class Op(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x * factor

            @staticmethod
            def backward(ctx, g):
                return g.mul_(factor * (1.5 if wrong else 1.0))
        return Op.apply

    x = torch.randn(16, requires_grad=True)
    assert not parity_report(scaling_in_place(1.0, wrong=True), lambda t: t * 1, x).passed
    assert parity_report(scaling_in_place(2.0, wrong=False), lambda t: t * 2, x).passed


def test_tensors_bound_by_partial_get_their_own_copy_and_may_not_be_written():
    """Keyword tensors bound with functools.partial (the op table's cu_seqlens) were shared by
    every run: an op that merged two sequences in them made the reference compute the same."""
    import functools

    def merged_segments(x, offsets):
        offsets[2] = offsets[1]  # a kernel "bug": sequences 1 and 2 merged
        return torch.stack([x[a:b].sum() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])

    def segments(x, offsets):
        return torch.stack([x[a:b].sum() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())])

    offsets = torch.tensor([0, 3, 5, 9])
    x = torch.randn(9, requires_grad=True)
    report = parity_report(functools.partial(merged_segments, offsets=offsets),
                           functools.partial(segments, offsets=offsets), x)
    assert not report.passed and offsets.tolist() == [0, 3, 5, 9]
    assert "wrote into an integer input" in report.table()
    assert parity_report(functools.partial(segments, offsets=offsets), functools.partial(segments, offsets=offsets), x).passed


def test_dict_outputs_and_the_references_none_places_are_compared():
    x = torch.randn(8, requires_grad=True)
    assert not parity_report(lambda t: (t * 2, {"aux": t + 100}), lambda t: (t * 2, {"aux": t + 1}), x).passed
    assert not parity_report(lambda t: (t * 2, {"other": t + 1}), lambda t: (t * 2, {"aux": t + 1}), x).passed
    assert parity_report(lambda t: (t * 2, {"aux": t + 1}), lambda t: (t * 2, {"aux": t + 1}), x).passed
    report = parity_report(lambda t: (t * 2, t * 999), lambda t: (t * 2, None), x)
    assert not report.passed and "where the reference gives None" in report.table()


def test_a_plain_pytorch_op_of_another_shape_is_a_problem_not_a_larger_allowance():
    """A broadcastable (64, 1) against (64,) inflated PyTorch's error to the spread of the whole
    tensor, and with it the allowance: an op off by 0.5 passed."""
    x = torch.randn(64, requires_grad=True)
    report = parity_report(lambda t: t + 0.5, lambda t: t * 1, x, torch_op=lambda t: t[:, None] * 1)
    assert not report.passed and "PyTorch's own op gave shape (64, 1)" in report.table()


def test_non_tensor_outputs_must_equal_the_references():
    """A Python value in the reference's outputs (a count, a flag) was never compared: an op
    giving 3.0 (or tensor(5.)) where the reference gives 2.0 passed."""
    x = torch.randn(8, requires_grad=True)
    assert not parity_report(lambda t: (t * 2, 3.0), lambda t: (t * 2, 2.0), x).passed
    assert not parity_report(lambda t: (t * 2, torch.tensor(5.0)), lambda t: (t * 2, 2.0), x).passed
    assert not parity_report(lambda t: (t * 2, 2), lambda t: (t * 2, 2.0), x).passed  # (another type)
    assert parity_report(lambda t: (t * 2, 2.0), lambda t: (t * 2, 2.0), x).passed


def test_a_tensor_needing_grad_bound_by_partial_is_refused():
    """Only positional arguments' gradients are compared: a weight bound with functools.partial
    had its gradient (here 1.5x too large) silently go unchecked."""
    import functools

    class GradTimes1_5(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g * 1.5

    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(8, requires_grad=True)
    with pytest.raises(ValueError, match="bound by functools.partial requires grad"):
        parity_report(functools.partial(lambda t, w: t * GradTimes1_5.apply(w), w=w),
                      functools.partial(lambda t, w: t * w, w=w), x)
    assert not parity_report(lambda t, w: t * GradTimes1_5.apply(w), lambda t, w: t * w, x, w).passed
