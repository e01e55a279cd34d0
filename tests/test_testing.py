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
