"""Convergence: a patched model trains like the unpatched one, step for step (also under HF Trainer).

A 2-layer GQA Llama is trained for 12 AdamW steps on the text the repo ships (byte tokens), once
unpatched and once patched, from the same initial weights and the same batches (its loss falls
from 5.5 to about 3.2 in those steps). The losses must
agree at every step and the final parameters must stay close: the way Liger-Kernel's convergence
tests compare. fp32, so any difference is rounding order, not precision.
"""
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastllama
from conftest import DEVICE

TEXT = (Path(__file__).parent / "data" / "tiny_corpus.txt").read_bytes()
STEPS, BATCH, SEQ = 12, 1, 32


def batches():
    data = torch.tensor(list(TEXT), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) - SEQ, (BATCH,), generator=g)
        yield torch.stack([data[s : s + SEQ] for s in starts]).to(DEVICE)


def train(model):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for x in batches():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_patched_training_follows_unpatched():
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=224, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg).to(DEVICE).train()
    patched = LlamaForCausalLM(cfg).to(DEVICE).train()
    patched.load_state_dict(plain.state_dict())
    initial = {n: p.detach().clone() for n, p in plain.named_parameters()}
    fastllama.patch(patched)

    expected, got = train(plain), train(patched)
    assert expected[-1] < expected[0] - 1.0, f"the model did not learn: {expected}"
    for step, (a, b) in enumerate(zip(expected, got)):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: loss {b} vs unpatched {a}"
    # AdamW moves every element by about lr per step whatever its gradient's size, so a single
    # element whose gradient sits at rounding-noise level can step the other way now and then
    # (seen: one element of 16384 off by 1.4 lr). What must hold is that each tensor as a whole
    # went where the unpatched one went: the distance between the two runs is under 1% of how
    # far training moved it (a wrong gradient moves whole tensors elsewhere).
    for (name, p), q in zip(plain.named_parameters(), patched.parameters()):
        moved = (p - initial[name]).norm()
        apart = (q - p).norm()
        assert apart <= 0.01 * moved, f"{name}: patched is {apart:.3g} from unpatched, training moved it {moved:.3g}"


def _examples(n=16, seed=1):
    """Token-id examples of different lengths (6..29), as a tokenized dataset holds them."""
    data = list(TEXT)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 30, (), generator=g))
        start = int(torch.randint(0, len(data) - length, (), generator=g))
        out.append({"input_ids": data[start:start + length]})
    return out


def test_hf_trainer_with_gradient_accumulation_packed_and_padded(tmp_path):
    """HF Trainer end to end (its loss convention: num_items_in_batch over accumulated batches),
    with padding-free packing (DataCollatorWithFlattening: position_ids restart per example) and
    with right-padded batches: patched losses follow unpatched ones, and no attention call falls
    back to SDPA."""
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from fastllama import attention

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=224, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      attn_implementation="sdpa", pad_token_id=0, use_cache=False)  # HF packs only without a cache
    torch.manual_seed(0)
    initial = LlamaForCausalLM(cfg).state_dict()

    class PadTokens:  # right padding with labels -100 (a tokenizer-free DataCollatorForLanguageModeling)
        def __call__(self, examples):
            longest = max(len(e["input_ids"]) for e in examples)
            ids = torch.zeros(len(examples), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, e in enumerate(examples):
                ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
                mask[i, :len(e["input_ids"])] = 1
            return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    def run(patch, collator):
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(initial)
        if patch:
            fastllama.patch(model)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=2, learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=DEVICE == "cpu", seed=0, data_seed=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_examples(), data_collator=collator)
        attention.FALLBACKS.clear()
        trainer.train()
        assert not attention.FALLBACKS, attention.FALLBACKS
        if patch:  # the kernels' path: varlen attention over the packed examples, or over the padded rows' runs
            assert attention._last_plan[2].kind == ("packed" if isinstance(collator, DataCollatorWithFlattening) else "runs")
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    for collator in (DataCollatorWithFlattening(), PadTokens()):
        expected, got = run(False, collator), run(True, collator)
        assert len(expected) == 2
        for step, (a, b) in enumerate(zip(expected, got)):
            assert abs(a - b) <= 1e-4 * abs(a), f"{type(collator).__name__} step {step}: {b} vs unpatched {a}"
