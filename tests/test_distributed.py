"""Patched models train under PyTorch's own engines: DDP and FSDP2 (``fully_shard``).

Two processes (gloo; on CPU the kernels run under the Triton interpreter) train a tiny GQA Llama
for 3 AdamW steps, one 16-token sequence per rank. The same training in one process is the
reference: the two ranks' sequences run as two micro-batches and the summed gradients are
halved, which is what DDP and FSDP2 do (each rank's gradient averaged over the 2 ranks).

Comparison, the parity rule (DESIGN.md) with the one-process run as "PyTorch in the same dtype":
the losses of both ranks at every step and every final parameter must be within
``2 * |one process fp32 - truth| + eps*|truth|`` of the truth, the same training in float64
(unpatched HF model, ``float64_truth`` so its hard-coded fp32 upcasts run in float64). So the
engine may cost no more accuracy than fp32 itself does. The one-process baseline of a patched run
is the patched model (kernel rounding is test_patch's / test_convergence's business; after three
Adam steps it differs from HF's rounding by up to 8x on single elements, measured). On CPU the
distributed runs come out bitwise equal to their one-process baseline (the same sums, ``g/2``
exact), so the margin is large; a wrong or missing gradient (a shard-only lm_head weight, an
untied embedding) moves parameters by about the learning rate, 1e-3, against errors near 1e-6.

One spawn runs every scenario in sequence (process start-up costs more than a scenario); the
one-process references are computed here meanwhile. Scenarios cover DDP and FSDP2 (decoder
layers + root; embeddings and lm_head as their own units; tied embeddings as one unit
``[embed_tokens, lm_head]``), gradient checkpointing on and off, patching before and after
wrapping, HF Trainer's loss convention (``num_items_in_batch``, ``loss *= world``: in place), and
FSDP1: ``patch`` refuses a wrapped model with advice; a model patched before wrapping trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fastllama
from conftest import DEVICE, enable_activation_checkpointing
from fastllama import testing

WORLD, STEPS, SEQ, LR = 2, 3, 16, 1e-3
CONFIG = dict(vocab_size=300, hidden_size=128, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=64, max_position_embeddings=64)

# One xdist worker runs the whole module: the `runs` fixture (both ranks' training) runs once.
pytestmark = [pytest.mark.xdist_group("distributed")]
if DEVICE == "cuda" and torch.cuda.device_count() < WORLD:
    pytestmark.append(pytest.mark.skip(
        reason=f"needs {WORLD} CUDA devices (nccl); without a GPU it runs on CPU with gloo"))


@dataclasses.dataclass(frozen=True)
class Scenario:
    engine: str  # "ddp" or "fsdp2"
    patched: bool
    shard: str = ""  # fsdp2: "layers" (decoder layers + root), "units" (+ embed_tokens, lm_head), "tied"
    tied: bool = False
    checkpointing: bool = False
    patch_after_wrap: bool = False
    trainer: bool = False  # HF Trainer's loss convention


SCENARIOS = {
    "ddp-checkpointing-patched-after-wrap": Scenario("ddp", True, checkpointing=True, patch_after_wrap=True),
    "fsdp2-layers-checkpointing": Scenario("fsdp2", True, "layers", checkpointing=True),
    "fsdp2-head-units-trainer": Scenario("fsdp2", True, "units", trainer=True),
    "fsdp2-tied-checkpointing-patched-after-wrap": Scenario("fsdp2", True, "tied", tied=True, checkpointing=True,
                                                             patch_after_wrap=True),
    "ddp-unpatched": Scenario("ddp", False),
    "fsdp2-layers-unpatched": Scenario("fsdp2", False, "layers"),
    "fsdp2-head-units-unpatched-checkpointing-trainer": Scenario("fsdp2", False, "units", checkpointing=True,
                                                                 trainer=True),
    "fsdp2-tied-unpatched-checkpointing": Scenario("fsdp2", False, "tied", tied=True, checkpointing=True),
}


def build(tied: bool, dtype=torch.float32, device=DEVICE) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, tie_word_embeddings=tied, attn_implementation="sdpa"))
    with torch.no_grad():  # non-trivial norm weights
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.to(device, dtype).train()


def batches() -> torch.Tensor:
    """(STEPS, WORLD, SEQ): one sequence per rank per step."""
    return torch.randint(3, CONFIG["vocab_size"], (STEPS, WORLD, SEQ), generator=torch.Generator().manual_seed(1))


def loss_of(model, x, trainer: bool):
    """``(output, loss)`` of one micro-batch ``x`` (1, SEQ)."""
    if not trainer:
        out = model(input_ids=x, labels=x)
        return out, out.loss
    # HF Trainer (average_tokens_across_devices): the loss is divided by the token count of the
    # global batch and multiplied back by the number of processes, in place. Per rank this is
    # the rank's mean loss again, so the one-process reference is the same.
    out = model(input_ids=x, labels=x, num_items_in_batch=torch.tensor(WORLD * (SEQ - 1), device=x.device))
    loss = out.loss
    loss *= WORLD
    return out, loss


# ---------------------------------------------------------------------------------------------
# One process: the reference
# ---------------------------------------------------------------------------------------------
def train_one_process(tied: bool, patched: bool, dtype) -> tuple[torch.Tensor, list[dict]]:
    """Losses (STEPS, WORLD) and the parameters after each step."""
    model = build(tied, dtype)
    if patched:
        fastllama.patch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    truth = testing.float64_truth() if dtype == torch.float64 else contextlib.nullcontext()
    losses, params = [], []
    for batch in batches():
        for x in batch.to(DEVICE):
            with truth:
                loss = model(input_ids=x[None], labels=x[None]).loss
                loss.backward()
            losses.append(loss.detach())
        for p in model.parameters():
            p.grad.div_(WORLD)
        opt.step()
        opt.zero_grad(set_to_none=True)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return torch.stack(losses).view(STEPS, WORLD), params


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------
def _full(p: torch.Tensor) -> torch.Tensor:
    return p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach().clone()


def _wrap(model, sc: Scenario, device):
    if sc.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if sc.shard == "units":
        fully_shard(model.model.embed_tokens, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
    elif sc.shard == "tied":  # FSDP2 wants tied modules in one group
        fully_shard([model.model.embed_tokens, model.lm_head], mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _run_scenario(sc: Scenario, rank: int, device) -> dict:
    model = build(sc.tied, device=device)
    if sc.checkpointing:
        enable_activation_checkpointing(model)
    if sc.patched and not sc.patch_after_wrap:
        fastllama.patch(model)
    wrapped = _wrap(model, sc, device)
    if sc.patched and sc.patch_after_wrap:
        fastllama.patch(wrapped)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=0.01)
    losses, logits = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in batches():
            out, loss = loss_of(wrapped, batch[rank : rank + 1].to(device), sc.trainer)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach().cpu())
            logits.append(out.logits is not None)
    summary = fastllama.patch_summary(wrapped if sc.patch_after_wrap else model)
    return dict(
        losses=torch.stack(losses), built_logits=any(logits),
        params={n: _full(p).cpu() for n, p in model.named_parameters()},
        sharded=[n for n, p in model.named_parameters() if hasattr(p, "to_local") and p.to_local().numel() < p.numel()],
        tied=model.lm_head.weight is model.model.embed_tokens.weight,
        summary=summary, attn=model.config._attn_implementation,
        view_warnings=[str(w.message) for w in caught if "view tensor" in str(w.message)],
    )


def _fsdp1(rank: int, device) -> dict:
    """FSDP1: ``patch`` on a wrapped model (and on the model inside) is refused with advice; a
    model patched BEFORE wrapping trains one step."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    def wrap(model):
        return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=device)

    model = build(False, device=device)
    wrapped = wrap(model)
    refusals = []
    for target in (wrapped, model):
        try:
            fastllama.patch(target)
            refusals.append(None)
        except TypeError as e:
            refusals.append(str(e))
    wrapped = wrap(fastllama.patch(build(False, device=device)))
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR, weight_decay=0.01)
    _, loss = loss_of(wrapped, batches()[0, rank : rank + 1].to(device), False)
    loss.backward()
    opt.step()
    with FullyShardedDataParallel.summon_full_params(wrapped):
        params = {n.replace("_fsdp_wrapped_module.", ""): p.detach().cpu().clone() for n, p in wrapped.named_parameters()}
    return dict(refusals=refusals, loss=loss.detach().cpu(), params=params)


def _worker(rank: int, outdir: str) -> None:
    torch.set_num_threads(1)  # two ranks share a small machine
    warnings.filterwarnings("ignore", message=".*FSDP.*deprecat.*")
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    device = torch.device("cuda", rank) if DEVICE == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{outdir}/store", rank=rank, world_size=WORLD,
                            timeout=timedelta(minutes=5))
    try:
        for name, sc in SCENARIOS.items():
            torch.save(_run_scenario(sc, rank, device), f"{outdir}/{name}.{rank}.pt")
        torch.save(_fsdp1(rank, device), f"{outdir}/fsdp1.{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    ctx = mp.start_processes(_worker, args=(str(out),), nprocs=WORLD, join=False, start_method="spawn")
    refs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spins (it doubled the CPU time here)
    try:
        for tied in (False, True):  # in this process, while the ranks run
            refs[tied, "truth"] = train_one_process(tied, False, torch.float64)
            refs[tied, False] = train_one_process(tied, False, torch.float32)
            refs[tied, True] = train_one_process(tied, True, torch.float32)
    finally:
        torch.set_num_threads(threads)
    error = None
    try:
        while not ctx.join():
            pass
    except Exception as e:  # a rank raised or died: its traceback goes into every test that needs it
        error = f"{type(e).__name__}: {e}"

    def load(name):
        files = [out / f"{name}.{r}.pt" for r in range(WORLD)]
        if not all(f.exists() for f in files):
            pytest.fail(f"rank results for {name!r} missing; the ranks failed with:\n{error}")
        return [torch.load(f, weights_only=False) for f in files]

    return load, refs


def _parity(title, got_losses, got_params, truth, same):
    """The parity rule over losses (STEPS x WORLD) and every parameter; returns the report."""
    names = list(truth[1])
    assert sorted(got_params) == sorted(names), f"parameter names differ: {list(got_params)} vs {names}"
    return testing.parity_report(
        lambda: (got_losses, *(got_params[n] for n in names)),
        lambda: (truth[0], *(truth[1][n] for n in names)),
        torch_op=lambda: (same[0], *(same[1][n] for n in names)),
        output_names=["losses", *names], check_grad=False, title=title)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_process_training_matches_one_process(runs, name):
    load, refs = runs
    sc = SCENARIOS[name]
    ranks = load(name)
    result = ranks[0]
    losses = torch.stack([r["losses"] for r in ranks], dim=1)  # (STEPS, WORLD)
    truth, same = refs[sc.tied, "truth"], refs[sc.tied, sc.patched]
    report = _parity(name, losses, result["params"], (truth[0], truth[1][-1]), (same[0], same[1][-1]))
    assert report.passed, report.table()

    # the run is what the scenario says: sharded, patched (fused loss, no logits), still tied
    if sc.engine == "fsdp2":
        assert result["sharded"] == list(result["params"]), f"not sharded over {WORLD} ranks: {result['sharded']}"
    assert result["tied"] == sc.tied
    if sc.patched:
        plain = fastllama.patch_summary(fastllama.patch(build(sc.tied, device="cpu")))
        assert result["summary"].count("patched") == plain.count("patched"), result["summary"]
        assert "skipped" not in result["summary"], result["summary"]
        assert result["attn"] == "fastllama" and not result["built_logits"]
        assert not result["view_warnings"], result["view_warnings"]
    else:
        assert result["attn"] == "sdpa" and result["built_logits"]


def test_fsdp1_wrapped_model_is_refused_with_advice(runs):
    load, _ = runs
    for r in load("fsdp1"):
        for message in r["refusals"]:  # the FSDP1 wrapper, and the model inside it
            assert message is not None, "patch accepted an FSDP1-wrapped model"
            assert "FSDP1" in message and "BEFORE wrapping" in message and "fully_shard" in message, message


def test_fsdp1_model_patched_before_wrapping_trains(runs):
    load, refs = runs
    ranks = load("fsdp1")
    losses = torch.stack([r["loss"] for r in ranks])[None]  # (1, WORLD)
    truth, same = refs[False, "truth"], refs[False, True]
    report = _parity("fsdp1, one step", losses, ranks[0]["params"], (truth[0][:1], truth[1][0]),
                     (same[0][:1], same[1][0]))
    assert report.passed, report.table()
