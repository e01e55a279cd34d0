"""ops.decode_linear (a decode step's linear with its norm, gated activation and residual add
fused in) and the Generator's fused decode step built on it. The op's parity cases are in the op
table (tests/test_op_parity.py); here: its bad inputs, and the fused step against the cuBLAS one."""
import warnings
from pathlib import Path

import pytest
import torch

from conftest import DEVICE, INTERPRETER
from fastllama import ops
from fastllama.generate import Generator
from test_generate import _decode_step_launches, _FakeCudaGraphs, _hf_model, _tiny_model


def _inputs(M=2, K=32, N=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=dtype).to(DEVICE)
    w = torch.randn(N, K, generator=g, dtype=dtype).to(DEVICE)
    return x, w


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.randn(24, 31)), ValueError, r"weight has shape \(24, 31\) but x has 32 features"),
    (dict(weight=torch.randn(24, 32, dtype=torch.float16)), TypeError, "weight has dtype torch.float16"),
    (dict(weight=torch.randn(24, 64)[:, ::2]), ValueError, "weight must be contiguous in its last dim"),
    (dict(bias=torch.randn(23)), ValueError, r"bias has shape \(23,\); it must be \(24,\)"),
    (dict(activation="relu"), ValueError, "activation must be one of"),
    (dict(weight=torch.randn(25, 32), activation="silu"), ValueError, "an even count; got 25 rows"),
    (dict(norm_weight=torch.randn(31)), ValueError, r"norm_weight has shape \(31,\); it must be \(32,\)"),
    (dict(norm_weight=torch.randn(32), norm="gemma"), ValueError, "norm must be one of"),
    (dict(norm_weight=torch.randn(32), eps=-1.0), ValueError, "eps must be a float >= 0"),
    (dict(residual=torch.randn(2, 12)), ValueError,
     r"residual has shape \(2, 12\); it must be the output's, \(2, 24\)"),
    (dict(residual=torch.randn(2, 12), activation="silu"), None, None),  # (gated: 24 rows give 12 outputs)
    (dict(x=torch.randn(2, 32, dtype=torch.float64)), TypeError, "x has dtype torch.float64"),
    # (the kernel reads bias and norm weight as contiguous vectors: a strided one read wrong values)
    (dict(bias=torch.randn(48)[::2]), ValueError, "bias must be contiguous in its last dim"),
    (dict(norm_weight=torch.randn(64)[::2]), ValueError, "norm_weight must be contiguous in its last dim"),
])
def test_bad_inputs_are_refused_before_launch(kwargs, error, match):
    x, w = _inputs()
    kwargs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    x, w = kwargs.pop("x", x), kwargs.pop("weight", w)
    if error is None:
        assert ops.decode_linear(x, w, **kwargs).shape == (2, 12)
        return
    with pytest.raises(error, match=match):
        ops.decode_linear(x, w, **kwargs)


def test_it_is_forward_only():
    x, w = _inputs()
    with pytest.raises(ValueError, match="decode_linear is forward-only .* weight requires grad"):
        ops.decode_linear(x, w.requires_grad_())
    with torch.no_grad():
        assert ops.decode_linear(x, w).shape == (2, 24)


def test_leading_dims_and_a_transposed_input_view():
    """x of shape (B, T, K) and a non-contiguous (but unit last stride) view come out as
    F.linear's, to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 40, generator=g).to(DEVICE)[:, ::2]  # (3, 3, 40), rows every other
    w = torch.randn(18, 40, generator=g).to(DEVICE)
    r = torch.randn(3, 3, 18, generator=g).to(DEVICE)
    torch.testing.assert_close(ops.decode_linear(x, w, residual=r), r + torch.nn.functional.linear(x, w))


# --------------------------------------------------------------------------------------------
# The Generator's fused decode step
# --------------------------------------------------------------------------------------------
FUSED_ARCHS = ["llama", "qwen2-bias", "qwen3-qk-norm", "gemma", "phi3-merged-proj", "helium", "mistral-window"]


@pytest.mark.parametrize("arch", FUSED_ARCHS)
def test_the_fused_step_gives_the_cublas_steps_tokens_and_logits(arch):
    """fp32, three prompts of different lengths: the fused step decodes HF's greedy tokens (q/k/v
    biases, Qwen3's q/k norms, Gemma's (1 + w) norms and GeGLU, Phi-3's merged projections,
    Helium's once-rounded norms, Mistral's window), and a decode step's logits equal the cuBLAS
    step's to fp32 rounding."""
    model = _hf_model(arch)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 21)), [3, 4]]
    expected = [model.generate(torch.tensor([p], device=DEVICE), max_new_tokens=6, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    gen = Generator(model, 3, 24, fused_decode=True)
    got = gen.generate(prompts, 6, stop_tokens=[])
    assert [g[len(p):] for g, p in zip(got, prompts)] == expected
    assert gen.stats.fused_decode
    with torch.no_grad():
        tokens = torch.tensor([[7], [11], [13]], device=DEVICE)
        slots = torch.tensor([5, 11, 2], dtype=torch.int32, device=DEVICE)
        fused, cublas = (gen._forward(tokens, slots, None, fused=f) for f in (True, False))
    torch.testing.assert_close(fused, cublas, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_fused_step_rounds_as_the_cublas_step(dtype):
    """16-bit: a decode step's logits on the fused layers against the cuBLAS step's and against
    fp32 truth (the same weights in fp32): within twice the cuBLAS step's own error (plus 1e-3,
    for logits where both are nearly exact)."""
    model = _hf_model("gemma")  # (its norm rounds once, its MLP is GeGLU)
    truth_gen = Generator(model, 2, 16, fused_decode=False)
    prompts = [[5, 6, 7, 8, 9], [3, 4, 5]]
    truth_gen.generate(prompts, 2, stop_tokens=[])
    tokens = torch.tensor([[7], [11]], device=DEVICE)
    slots = torch.tensor([6, 4], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        truth = truth_gen._forward(tokens, slots, None)
    model = model.to(dtype)
    gen = Generator(model, 2, 16, fused_decode=True)
    gen.generate(prompts, 2, stop_tokens=[])
    with torch.no_grad():
        fused, cublas = (gen._forward(tokens, slots, None, fused=f).float() for f in (True, False))
    fused_err, cublas_err = ((t - truth).abs().max().item() for t in (fused, cublas))
    assert fused_err <= 2 * cublas_err + 1e-3, (fused_err, cublas_err)


@pytest.mark.skipif(not INTERPRETER, reason="counts the interpreter's launches")
def test_a_fused_decode_step_launches_six_kernels_per_layer():
    """Per layer: the q/k/v linear with the input norm, rotary + cache append, decode attention
    (one pass here; on a GPU with key splits a combine kernel too), the output projection with the
    residual add, gate/up with the norm and SwiGLU, the down projection with the residual add
    (the cuBLAS step: nine here, see test_generate). Per step: the final norm has no residual add
    left to do."""
    one, two = (_decode_step_launches(_tiny_model(num_hidden_layers=n), fused_decode=True) for n in (1, 2))
    layer = list(two)
    for n in one:
        layer.remove(n)
    assert sorted(layer) == sorted(["decode_linear_kernel", "rotary_cache_kernel", "decode_split_kernel",
                                    "decode_linear_kernel", "decode_linear_kernel", "decode_linear_kernel"]), layer
    fixed = list(one)
    for n in layer:
        fixed.remove(n)
    assert fixed == ["where", "embedding", "add", "rms_norm_fwd_kernel", "mm", "argmax", "masked_fill_", "eq", "any",
                     "bitwise_or_", "add_"], fixed


@pytest.mark.parametrize("arch, problem", [
    ("granite-multipliers", "it scales its residual branches"),
    ("gemma2-window-softcap", "layer 0 norms its branches' outputs"),
    ("mixtral-window", "layer 0's MLP is not a gated SiLU or GELU-tanh MLP"),
    ("deepseek-v3-mla", "its attention is multi-head latent attention"),
    ("olmo-clip", "its norms are LayerNorms without weights"),
])
def test_models_the_fused_step_does_not_serve(monkeypatch, arch, problem):
    """fused_decode=True names what keeps a model from the fused step; the default captures and
    runs the cuBLAS step alone for it (stand-in graphs; the fused step timed faster would win
    where it could), and fused_problem says why."""
    model = _hf_model(arch)
    with pytest.raises(ValueError, match=f"fused_decode=True, but {problem}"):
        Generator(model, 1, 16, fused_decode=True)
    fake = _FakeCudaGraphs(monkeypatch)
    monkeypatch.setattr(Generator, "_replay_ms", lambda gen, st: 1.0 if st.fused else 2.0)
    gen = Generator(model, 1, 16)
    gen.cuda_graph = True  # (the constructor refuses it for a CPU model; the stand-ins make it run)
    assert problem in gen.fused_problem
    gen.generate([[3, 4, 5]], 3, stop_tokens=[])
    assert not gen.stats.fused_decode and gen.stats.cuda_graph and fake.captures == 1


def test_a_generator_without_fused_projections_is_not_fused():
    with pytest.raises(ValueError, match="fuse_projections=False"):
        Generator(_tiny_model(), 1, 16, fuse_projections=False, fused_decode=True)


@pytest.mark.parametrize("fused_faster", [True, False])
def test_the_default_captures_both_steps_and_keeps_the_faster(monkeypatch, fused_faster):
    """fused_decode=None with a CUDA graph (stand-in graphs, test_generate._FakeCudaGraphs):
    both steps are captured and timed once per (batch, sampling) key, the faster is replayed
    (its tokens are the eager cuBLAS loop's), and :attr:`Generator.decode_timings` says what was
    measured. Sampling under one seed draws the same on the capturing call as after."""
    fake = _FakeCudaGraphs(monkeypatch)
    timed = []

    def replay_ms(gen, st):
        timed.append(st.fused)
        return 1.0 if st.fused == fused_faster else 2.0

    monkeypatch.setattr(Generator, "_replay_ms", replay_ms)
    model = _tiny_model()
    eager = Generator(model, 3, 64, fused_decode=False)
    graph = Generator(model, 3, 64)
    graph.cuda_graph = True  # (the constructor refuses it for a CPU model; the stand-ins make it run)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3]]
    assert graph.generate(prompts, 6, stop_tokens=[]) == eager.generate(prompts, 6, stop_tokens=[])
    assert fake.captures == 2 and timed == [False, True]
    assert graph.stats.fused_decode == fused_faster and graph.stats.cuda_graph
    assert next(iter(graph._states.values())).graph.fused == fused_faster  # (the graph kept is that step's)
    assert graph.decode_timings == ({"cuBLAS": 2.0, "fused": 1.0} if fused_faster else {"cuBLAS": 1.0, "fused": 2.0})
    assert graph.generate(prompts, 4, stop_tokens=[]) == eager.generate(prompts, 4, stop_tokens=[])
    assert fake.captures == 2  # (captured once per key)
    if not fused_faster:
        return  # (the sampling below does not depend on which step won: run once)
    sampled = []
    for _ in range(2):
        torch.manual_seed(123)
        sampled.append(graph.generate([[5, 6, 7]] * 3, 6, temperature=1.0, stop_tokens=[]))
    torch.manual_seed(123)
    assert sampled[0] == sampled[1] == eager.generate([[5, 6, 7]] * 3, 6, temperature=1.0, stop_tokens=[])
    assert fake.captures == 4


def test_a_step_that_fails_while_it_is_timed(monkeypatch):
    """The fused graph failing in its timed replays is dropped like a failed build: the cuBLAS
    graph decodes, with a warning; the cuBLAS graph failing there raises, and the next call
    captures again (nothing half-chosen is kept). A CUDA error is never fallen back from (it
    leaves the context unusable, the cuBLAS graph's too)."""
    fake = _FakeCudaGraphs(monkeypatch)
    model = _tiny_model()
    eager = Generator(model, 1, 32, fused_decode=False).generate([[5, 6, 7]], 5, stop_tokens=[])
    for failing in (True, False):
        graph = Generator(model, 1, 32)
        graph.cuda_graph = True

        def replay_ms(gen, st):
            if st.fused == failing:
                raise RuntimeError("out of resource: shared memory")
            return 1.0

        monkeypatch.setattr(Generator, "_replay_ms", replay_ms)
        if failing:
            with pytest.warns(RuntimeWarning, match="fused decode step failed to run: .*out of resource"):
                assert graph.generate([[5, 6, 7]], 5, stop_tokens=[]) == eager
            assert not graph.stats.fused_decode and graph.stats.cuda_graph
        else:
            with pytest.raises(RuntimeError, match="out of resource"):
                graph.generate([[5, 6, 7]], 5, stop_tokens=[])
            assert next(iter(graph._states.values())).graph is None
            monkeypatch.setattr(Generator, "_replay_ms", lambda gen, st: 2.0 - st.fused)
            captures = fake.captures
            assert graph.generate([[5, 6, 7]], 5, stop_tokens=[]) == eager
            assert fake.captures == captures + 2 and graph.stats.fused_decode
    cuda_error = Generator(model, 1, 32)
    cuda_error.cuda_graph = True
    monkeypatch.setattr(Generator, "_replay_ms", lambda gen, st: (_ for _ in ()).throw(
        RuntimeError("CUDA error: an illegal memory access was encountered")) if st.fused else 1.0)
    with pytest.raises(RuntimeError, match="CUDA error: an illegal memory access"):
        cuda_error.generate([[5, 6, 7]], 5, stop_tokens=[])


def test_a_fused_step_that_fails_to_build_leaves_the_cublas_step(monkeypatch):
    """The default's optional step raising while it is warmed up (a compile error on some GPU)
    does not stop decoding: a RuntimeWarning names it (pointing at the caller), the cuBLAS step is
    captured and kept, and the Generator does not try it again."""
    fake = _FakeCudaGraphs(monkeypatch)
    model = _tiny_model()
    graph = Generator(model, 1, 32)
    graph.cuda_graph = True

    def broken(*args, **kwargs):
        raise RuntimeError("no such instruction on this GPU")

    monkeypatch.setattr(ops, "decode_linear", broken)
    with pytest.warns(RuntimeWarning, match="fused decode step failed to run: RuntimeError: no such instruction") as w:
        tokens = graph.generate([[5, 6, 7]], 5, stop_tokens=[])
    ours = [x for x in w if "fused decode step failed" in str(x.message)]  # (Triton 3.6 adds NumPy's)
    assert Path(ours[0].filename).resolve() == Path(__file__).resolve()
    assert tokens == Generator(model, 1, 32, fused_decode=False).generate([[5, 6, 7]], 5, stop_tokens=[])
    assert not graph.stats.fused_decode and graph.decode_timings == {"cuBLAS": 1.0}
    assert "no such instruction" in graph.fused_problem
    captures = fake.captures
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph.generate([[5, 6]], 5, stop_tokens=[], temperature=0.5)  # (a new key: the cuBLAS step alone)
    assert not [x for x in caught if not issubclass(x.category, DeprecationWarning)]  # (NumPy's, under Triton 3.6)
    assert fake.captures == captures + 1
    assert "no such instruction" in graph.fused_problem and not graph.stats.fused_decode


@pytest.mark.skipif(INTERPRETER, reason="real CUDA graphs need a GPU")
def test_real_cuda_graphs_of_both_steps():
    """On a GPU: the default captures and times both steps for real (decode_timings holds two
    positive times) and decodes the eager cuBLAS loop's tokens whichever it keeps; the fused step
    forced into a graph does too."""
    model = _tiny_model()
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3]]
    eager = Generator(model, 3, 64, cuda_graph=False, fused_decode=False).generate(prompts, 8, stop_tokens=[])
    default = Generator(model, 3, 64)
    assert default.generate(prompts, 8, stop_tokens=[]) == eager and default.stats.cuda_graph
    assert set(default.decode_timings) == {"cuBLAS", "fused"} and min(default.decode_timings.values()) > 0
    assert default.stats.fused_decode == (default.decode_timings["fused"] < default.decode_timings["cuBLAS"])
    forced = Generator(model, 3, 64, fused_decode=True)
    assert forced.generate(prompts, 8, stop_tokens=[]) == eager and forced.stats.fused_decode
    # sampling under one seed: the call that captures and times (replays drawing from the CUDA
    # generator) draws what a later call draws
    sampled, fresh = [], Generator(model, 3, 64)
    for _ in range(2):
        torch.manual_seed(123)
        sampled.append(fresh.generate(prompts, 8, temperature=1.0, stop_tokens=[]))
    assert sampled[0] == sampled[1]
