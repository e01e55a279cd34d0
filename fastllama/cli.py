"""The ``fastllama`` command line.

Subcommands register themselves in :data:`COMMANDS` (name -> (help, add_arguments, run)), so a
new one is a function pair and one line, not an edit of ``main``. The interpreter switch
happens before any subcommand imports triton, so every command also runs on a CPU-only machine.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from . import __version__

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str):
    """Decorator: registers ``run(args) -> exit code``; ``run.add_arguments(parser)`` if defined."""

    def wrap(run):
        COMMANDS[name] = (help, getattr(run, "add_arguments", lambda p: None), run)
        return run

    return wrap


# ---------------------------------------------------------------------------------------------
# fastllama parity: reference model vs Hugging Face, then every kernel vs its reference
# ---------------------------------------------------------------------------------------------
def _parity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-hf", action="store_true", help="skip the reference-vs-Hugging-Face part")
    p.add_argument("--skip-ops", action="store_true", help="skip the kernel-vs-reference part")


def _parity(args: argparse.Namespace) -> int:
    ok = True
    if not args.skip_hf:
        from .hf_parity import TINY_CONFIGS, compare_with_hf

        print("Reference Llama vs Hugging Face LlamaForCausalLM (fp32, random tiny checkpoints)")
        print(f"{'config':<20}{'max|logit diff|':>17}{'20 greedy tokens':>18}  result")
        for name, cfg in TINY_CONFIGS.items():
            r = compare_with_hf(name, cfg)
            ok &= r.passed
            print(f"{name:<20}{r.max_logit_diff:>17.2e}{'identical' if r.tokens_equal else 'DIFFER':>18}  "
                  f"{'ok' if r.passed else 'FAIL'}")
    if not args.skip_ops:
        ok &= _op_parity()
    return 0 if ok else 1


_parity.add_arguments = _parity_arguments
command("parity", "check the reference model against Hugging Face and every kernel against its reference")(_parity)


def _op_parity() -> bool:
    import torch

    from . import optable

    specs = optable.all_specs()
    dev = "cuda" if torch.cuda.is_available() and not _interpreting() else "cpu"
    print(f"\nKernels vs pure-PyTorch references ({'CUDA' if dev == 'cuda' else 'CPU, Triton interpreter'}),"
          " first shape case per op, forward and gradients")
    if not specs:
        print("(no kernels registered yet)")
        return True
    ok = True
    if dev == "cpu":
        print("(bfloat16 rows are left out on the CPU: the Triton interpreter's bf16 tl.dot multiplies raw "
              "bits, triton-lang/triton#11584, and its bf16 casts truncate; the test suite shims both, "
              "the library does not)")
    for spec in specs:
        case = next(c for c in spec.cases if not c.cuda_only or dev == "cuda")
        for dtype in spec.dtypes:
            if dev == "cpu" and dtype == torch.bfloat16:
                continue
            torch.manual_seed(0)
            rep = spec.parity(case, dtype, dev, title=f"\n{spec.name} [{case.id}] {str(dtype).removeprefix('torch.')}")
            ok &= rep.passed
            print(rep.table())
    return ok


def _interpreting() -> bool:
    from ._interpreter import interpreter_active

    return interpreter_active()


# fastllama build-report: every kernel config compiled for sm_80/86/90/100/120 (fastllama/build_report.py;
# importing it is cheap, it loads triton only when it runs)
from . import build_report as _build_report  # noqa: E402

command("build-report", "compile every kernel config for sm_80/86/90/100/120 without a GPU: registers, spills, "
        "shared memory, occupancy, tensor-core instructions (wgmma, tcgen05), compile time")(_build_report.cli_run)

# fastllama bench [train|memory|ops|decode]: the package's main job (fastllama/bench/cli.py; cheap
# to import, it loads torch/transformers only when it runs)
from .bench import cli as _bench_cli  # noqa: E402

_bench_cli.run.add_arguments = _bench_cli.add_arguments
command("bench", _bench_cli.HELP)(_bench_cli.run)


# ---------------------------------------------------------------------------------------------
# fastllama verify: patched vs original, module by module
# ---------------------------------------------------------------------------------------------
def _verify_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="an HF config.json: a model with random weights is built from it")
    src.add_argument("--checkpoint", help="an HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    from .bench.common import at_least

    p.add_argument("--batch", type=at_least(1), default=2)
    # (2 tokens at least: the loss compares a label shifted by one; one token has none)
    p.add_argument("--seq-len", type=at_least(2), default=64)
    p.add_argument("--no-backward", action="store_true", help="compare forward outputs only")


def _verify_model(args: argparse.Namespace):
    """The model ``fastllama verify`` checks, patched: random weights from --config or the
    weights of --checkpoint, in train mode without dropout."""
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .patching import patch

    dev = "cpu" if _interpreting() else "cuda"
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.config:
        with open(args.config) as f:
            fields = json.load(f)
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ValueError(f"{args.config} has no \"model_type\": an HF config.json names its model family "
                             "(e.g. \"llama\", \"mistral\", \"qwen2\")")
        config = AutoConfig.for_model(**fields)
    else:
        if not os.path.isdir(args.checkpoint):  # (transformers would take it for a Hub name and go online)
            raise ValueError(f"--checkpoint {args.checkpoint}: no such directory")
        config = AutoConfig.from_pretrained(args.checkpoint)
    # train mode (the training paths are what is checked), but without dropout: runs that draw
    # other masks cannot be compared (verify refuses them). Llama's attention_dropout, Phi-3's
    # resid_pdrop and embd_pdrop ...
    for field, value in sorted(config.to_dict().items()):
        if (field.endswith(("dropout", "pdrop")) and isinstance(value, (int, float)) and not isinstance(value, bool)
                and value and hasattr(config, field)):
            print(f"{field}={value} set to 0: verify compares deterministic runs")
            setattr(config, field, 0.0)
    if args.config:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.checkpoint, config=config, dtype=dtype)
    model = model.to(dev).train()
    patch(model, verbose=True)
    return model


def _verify(args: argparse.Namespace) -> int:
    import torch

    from .verification import verify

    try:
        model = _verify_model(args)
    except (ValueError, TypeError, OSError) as e:  # bad arguments or files (json's errors are ValueErrors)
        print(f"fastllama verify: error: {e}", file=sys.stderr)
        return 2
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=dev)
    print()
    report = verify(model, {"input_ids": ids, "labels": ids}, backward=not args.no_backward)
    return 0 if report.passed else 1


_verify.add_arguments = _verify_arguments
command("verify", "run every patched module of a model against its original (parity table)")(_verify)


# ---------------------------------------------------------------------------------------------
# fastllama generate: fast generation with the decode kernels (fastllama.generate)
# ---------------------------------------------------------------------------------------------
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="HF-format directory: config.json, safetensors, and "
                   "tokenizer.json (used when present, as HF does) or tokenizer.model (sentencepiece); a Llama, "
                   "or a Mistral, Ministral, Qwen2, Qwen3, SmolLM3, Phi-3, Granite, Gemma, Gemma 2, Gemma 3 "
                   "(gemma3_text), OLMo 2, OLMo 3, CWM, Seed-OSS, Helium, Ernie 4.5, GLM, GLM-4, Arcee, Apertus, "
                   "EXAONE 4, VaultGemma, HyperCLOVA X, Ministral 3, HunYuan (dense), OLMo (1), or the mixtures of "
                   "experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, GraniteMoE, dots.llm1, GLM-4.5, "
                   "HunYuan MoE, Ernie 4.5 MoE, Mellum, Solar Open, MiniMax-M2, EXAONE MoE, gpt-oss, GraniteMoeShared, "
                   "Granite SWA, GraniteMoE SWA, Llama 4 (text: llama4_text), or the multi-head latent "
                   "attention models DeepSeek-V3, DeepSeek-V2, GLM-4.7-Flash, Mistral 4, MiniCPM3 (loaded through "
                   "transformers; docs/models.md)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (Triton interpreter)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--no-cuda-graph", action="store_true", help="run the decode step eagerly")


def _generate(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError
    from .generate import run_cli

    try:
        return run_cli(args)
    except (ValueError, TypeError, FileNotFoundError, CheckpointError) as e:  # bad arguments or files
        print(f"fastllama generate: error: {e}", file=sys.stderr)
        return 2


_generate.add_arguments = _generate_arguments
command("generate", "generate text from a checkpoint with fastllama's decode kernels, streaming it")(_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastllama",
        description="Triton kernels for Llama-family models: parity checks, benchmarks, generation.",
    )
    parser.add_argument("--version", action="version", version=f"fastllama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from ._interpreter import use_interpreter_if_no_gpu

    parser = build_parser()
    args = parser.parse_args(argv)
    # before anything imports triton; --device cpu runs the kernels in the interpreter even
    # where a GPU is present (Triton's GPU launchers take CUDA tensors only)
    use_interpreter_if_no_gpu(cpu_requested=str(getattr(args, "device", None) or "").startswith("cpu"))
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "dtype", None) == "bfloat16" and _interpreting():
        print(f"fastllama {args.command}: error: --dtype bfloat16 needs a GPU: on the CPU the kernels run under "
              "the Triton interpreter, whose bf16 tl.dot multiplies raw bits (triton-lang/triton#11584) and whose "
              "bf16 casts truncate, so results would be wrong; use --dtype float32 (or float16) here", file=sys.stderr)
        return 2
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
