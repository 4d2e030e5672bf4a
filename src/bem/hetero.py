"""Heterogeneous batches (issue 18): one forward serves rows that each use another expert or code, against the base
model and PEFT's mixed-batch LoRA, measured in one process.

Subjects, all rank 8 per row on o_proj + down_proj (the shipped experiments' sites), four "adapters":
- `base`: the frozen model;
- `peft_single`: one PEFT LoRA adapter for every row (the price of an unmerged adapter);
- `peft_mixed`: four PEFT LoRA adapters, row i served by adapter i mod 4 (`adapter_names`, PEFT's mixed batch);
- `bem_bank`: one BEM site of rank 32 = 4 experts × 8, row i's mask m selecting expert i mod 4 (`bem_mask`);
- `bem_codes`: BEM routed (S1_anchor's chunk controller): every row its own code per chunk.

Work: one forward of a B × T batch (prefill), interleaved rounds (each round runs every subject once, in an order
rotated per round), medians; ratios against the base model of the same run. Modules are fresh with random non-zero
weights (cost does not depend on the values). A model is an embedded name or a shape: `qwen1.5b` builds a Llama of
Qwen2.5-1.5B's shapes with random weights, for speed only. Row equality (each row equal to its run alone) is a
test (tests/test_invariants.py, tests/test_experts.py); this module measures and asserts nothing.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bem.bench import _seeded_  # the same fresh non-zero adapter weights as `bem bench`

SUBJECTS = ("base", "peft_single", "peft_mixed", "bem_bank", "bem_codes")
ADAPTERS, RANK, SITES = 4, 8, ["o_proj", "down_proj"]
SHAPES = {"qwen1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                       "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936},
          "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 256}}
"""Model shapes built with random weights (a Llama of these sizes): speed only, never quality."""


def _base(model: str):
    if model in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SHAPES[model], max_position_embeddings=4096)).eval()
    from bem.models import load_base

    return load_base(model)[0]


def build(subject: str, model: str, batch: int, device: torch.device):
    """(model, forward kwargs) of one subject; rows cycle through the four adapters / experts."""
    base = _base(model)
    if subject == "base":
        return base.to(device), {}
    if subject.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=SITES)
        peft = get_peft_model(base, config, adapter_name="a0")
        if subject == "peft_mixed":
            for a in range(1, ADAPTERS):
                peft.add_adapter(f"a{a}", config)
        _seeded_([p for n, p in peft.named_parameters() if "lora_" in n], 1)
        kwargs = {"adapter_names": [f"a{i % ADAPTERS}" for i in range(batch)]} if subject == "peft_mixed" else {}
        return peft.to(device).eval(), kwargs
    from bem import BEMConfig, attach_bem

    if subject == "bem_bank":
        attach_bem(base, BEMConfig(rank=RANK * ADAPTERS, alpha=2.0 * RANK * ADAPTERS, sites=SITES, controller="static",
                                   experts=ADAPTERS, side_dim=0))
        mask = torch.zeros(batch, RANK * ADAPTERS)
        for i in range(batch):
            mask[i, (i % ADAPTERS) * RANK:(i % ADAPTERS + 1) * RANK] = 1.0
        kwargs = {"bem_mask": mask.to(device)}
    else:  # bem_codes: S1_anchor's routed module (chunk codes from the prompt, per row)
        from bem.experiments.config import load_experiment

        attach_bem(base, load_experiment("S1_anchor").bem)
        kwargs = {"bem_side": torch.randn(batch, base.bem_config.side_dim,
                                          generator=torch.Generator().manual_seed(2)).to(device)}
    _seeded_([p for p in base.parameters() if p.requires_grad], 1)
    return base.to(device), kwargs


@torch.no_grad()
def _forward_seconds(model, ids: torch.Tensor, kwargs: dict, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    extra = {"bem_prompt_len": torch.full((ids.shape[0],), ids.shape[1], device=device)} if "bem_side" in kwargs else {}
    model(ids, **kwargs, **extra)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_hetero(model: str = "smollm2-135m", batch: int = 16, seq: int = 512, rounds: int = 3,
                 device: str = "cpu", precision: str = "fp32", subjects=SUBJECTS, sequential: bool = False) -> dict:
    """Median forward seconds per subject and ratios: each subject over the base model, and PEFT's mixed batch over
    BEM's bank (how many times faster BEM serves the same four-adapter batch)."""
    from bem.precision import autocast

    dev = torch.device(device)
    vocab = SHAPES[model]["vocab_size"] if model in SHAPES else _base(model).config.vocab_size
    ids = torch.randint(3, min(vocab, 32000), (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    times: dict[str, list[float]] = {s: [] for s in subjects}
    with autocast(dev.type, precision):
        if sequential:  # one subject in memory at a time (a 1.5B model in fp32 is 6 GB a copy): not interleaved
            for s in subjects:
                subject = build(s, model, batch, dev)
                _forward_seconds(subject[0], ids, subject[1], dev)  # warm-up
                times[s] = [_forward_seconds(subject[0], ids, subject[1], dev) for _ in range(rounds)]
                del subject
        else:
            built = {s: build(s, model, batch, dev) for s in subjects}
            for s in subjects:  # warm-up
                _forward_seconds(built[s][0], ids, built[s][1], dev)
            for r in range(rounds):
                order = list(subjects[r % len(subjects):]) + list(subjects[:r % len(subjects)])
                for s in order:
                    times[s].append(_forward_seconds(built[s][0], ids, built[s][1], dev))
    median = {s: float(np.median(v)) for s, v in times.items()}
    ratios = {s: median[s] / median["base"] for s in subjects if "base" in median}
    if "peft_mixed" in median and "bem_bank" in median:
        ratios["peft_mixed_over_bem_bank"] = median["peft_mixed"] / median["bem_bank"]
    return {"model": model, "batch": batch, "seq": seq, "rounds": rounds, "device": device, "precision": precision,
            "interleaved": not sequential,
            "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "seconds": median, "ratios": ratios}


def markdown(result: dict) -> str:
    lines = [f"Forward of B{result['batch']} × T{result['seq']} on `{result['model']}`, {result['device']} "
             f"{result['precision']}, median of {result['rounds']} "
             + ("interleaved rounds" if result.get("interleaved", True) else "rounds, one subject at a time") + ":", "",
             "| subject | seconds | × base |", "|---|---|---|"]
    for s, sec in result["seconds"].items():
        lines.append(f"| {s} | {sec:.3f} | {result['ratios'].get(s, float('nan')):.3f} |")
    if "peft_mixed_over_bem_bank" in result["ratios"]:
        lines += ["", f"PEFT's mixed batch takes ×{result['ratios']['peft_mixed_over_bem_bank']:.2f} BEM's bank on the "
                  "same four-adapter batch (goal: ≥ 2.5; BEM's bank ≤ 1.15× base)."]
    return "\n".join(lines)


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    path.with_suffix(".md").write_text(markdown(result) + "\n")
