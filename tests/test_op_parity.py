"""Every op in the table vs its reference, forward and every gradient, under the parity rule.

Cases come from fastllama.optable: adding an op there adds it here. CPU runs use the
interpreter; ``cuda_only`` cases (the full shape matrix) run on a GPU.
"""
import pytest
import torch

from conftest import DEVICE
from fastllama import optable


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
    spec.parity(case, dtype, DEVICE, title=f"{spec.name} {case.id} {dtype}").raise_if_failed()


def test_table_is_not_empty_once_ops_exist():
    """Every op module in the table's registry contributes at least one spec with cases."""
    for spec in optable.all_specs():
        assert spec.cases, f"{spec.name} has no shape cases"


def _smallest_cpu_case(spec, dtype):
    """The op's case with the fewest tensor elements, among those the interpreter runs."""
    def size(case):
        args, _ = spec.make_args(case.params, dtype, "cpu")
        return sum(a.numel() for a in args if isinstance(a, torch.Tensor))
    return min((c for c in spec.cases if not c.cuda_only), key=size)


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    """Triton launches on the *current* CUDA device, not on its tensors' device: in a model spread
    over several GPUs (HF ``device_map="auto"``) the layers on cuda:1 would launch on cuda:0 and
    fail ("cannot be accessed from Triton") or read another GPU's memory. Every launcher enters
    ``torch.cuda.device_of`` of one of its tensors; here each kernel launch of every
    op, forward and backward, must happen inside such a block (a recorder stands in for it, so
    this runs on the CPU)."""
    import contextlib

    from triton.runtime.interpreter import InterpretedFunction

    guards, launches = [], []

    @contextlib.contextmanager
    def recording_device_of(obj):
        guards.append(obj)
        try:
            yield
        finally:
            guards.pop()

    run = InterpretedFunction.run

    def checked_run(self, *args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        guarded = bool(guards) and all(t.device == guards[-1].device for t in tensors)
        launches.append((self.fn.__name__, guarded))
        return run(self, *args, **kwargs)

    if DEVICE != "cpu":
        pytest.skip("checks launches under the interpreter")
    monkeypatch.setattr(torch.cuda, "device_of", recording_device_of)
    monkeypatch.setattr(InterpretedFunction, "run", checked_run)
    for spec in optable.all_specs():
        launches.clear()
        dtype = torch.bfloat16
        case = _smallest_cpu_case(spec, dtype)
        torch.manual_seed(0)
        args, kwargs = spec.make_args(case.params, dtype, DEVICE)
        out = spec.op(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
        assert launches, f"{spec.name} {case.id}: no kernel launched"
        unguarded = sorted({name for name, ok in launches if not ok})
        assert not unguarded, f"{spec.name} {case.id}: launched outside torch.cuda.device_of: {unguarded}"


@pytest.mark.skipif(DEVICE == "cpu" or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_every_op_on_the_second_gpu_while_the_first_is_current():
    """The multi-GPU case the recorder above stands for, where two GPUs exist."""
    assert torch.cuda.current_device() == 0
    for spec in optable.all_specs():
        case = _smallest_cpu_case(spec, torch.bfloat16)
        torch.manual_seed(0)
        spec.parity(case, torch.bfloat16, "cuda:1", title=f"{spec.name} {case.id} on cuda:1").raise_if_failed()


def test_benchmarks_time_rotary_cache_append_without_cache_copies():
    """The op benchmarks time ``spec.bench_op or spec.op``. rotary_cache_append's table ``op``
    appends into copies of the caches (the parity harness compares the caches it returns): at
    the benchmark shape the two copies are ~1000x the bytes the kernel writes, and were what the
    benchmark timed."""
    from fastllama.bench.common import NewStorages

    spec = next(s for s in optable.all_specs() if s.name == "rotary_cache_append")
    args, kwargs = spec.make_args(spec.cases[0].params, torch.float32, DEVICE)
    k_cache = args[3]
    sizes = []

    class Created(NewStorages):
        def created(self, tensor):
            sizes.append(tensor.untyped_storage().nbytes())

    with Created():
        (spec.bench_op or spec.op)(*args, **kwargs)
    assert max(sizes, default=0) < k_cache.untyped_storage().nbytes(), sizes
