"""Every op in the table vs its reference, forward and every gradient, under the parity rule.

Cases come from fastllama.optable: adding an op there adds it here. CPU runs use the
interpreter; ``cuda_only`` cases (the full shape matrix) run on a GPU.
"""
import functools

import pytest
import torch

from conftest import DEVICE
from fastllama import optable
from fastllama.testing import assert_parity


def _cases():
    for spec in optable.all_specs():
        for case in spec.cases:
            for dtype in spec.dtypes:
                marks = [pytest.mark.cuda_only] if case.cuda_only else []
                dname = str(dtype).removeprefix("torch.")
                yield pytest.param(spec, case, dtype, id=f"{spec.name}-{case.id}-{dname}", marks=marks)


@pytest.mark.parametrize("spec,case,dtype", list(_cases()))
def test_parity(spec, case, dtype):
    torch.manual_seed(0)
    args, kwargs = spec.make_args(case.params, dtype, DEVICE)
    assert_parity(
        functools.partial(spec.op, **kwargs),
        functools.partial(spec.reference, **kwargs),
        *args,
        names=spec.names,
        output_names=spec.output_names,
        title=f"{spec.name} {case.id} {dtype}",
    )


def test_table_is_not_empty_once_ops_exist():
    """Every op module in the table's registry contributes at least one spec with cases."""
    for spec in optable.all_specs():
        assert spec.cases, f"{spec.name} has no shape cases"
