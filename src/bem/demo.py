"""The interim main job (`bem run --quick`) until the experiment runner lands.

SmolLM2-135M-Instruct + BEM (prefix + chunk codes) trained on WordNet 3.0 definition modelling
(word → gloss), compared with the frozen base on held-out synsets by target-token loss. Real
model, real data, measured numbers; no statistics or variants yet (those are the runner's job).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bem import BEMConfig, attach_bem, bem_disabled, save_bem
from bem.data.batches import Example, collate
from bem.data.prepare import split_of
from bem.metrics import normalize_answer
from bem.data.wordnet import read_synsets
from bem.models import load_base

log = logging.getLogger(__name__)


@dataclass
class DemoArgs:
    out: Path = Path("runs/quick")
    model: str = "smollm2-135m"
    train_items: int = 256
    eval_items: int = 64
    steps: int = 60
    batch_size: int = 8
    lr: float = 2e-3
    seed: int = 0


def definition_items(n_train: int, n_eval: int) -> dict[str, list[tuple[str, str]]]:
    items = {"train": [], "eval": []}
    for s in read_synsets("n"):
        if len(s.lemmas[0].split()) == 1 and 3 <= len(s.definition.split()) <= 16:
            # held-out = the data suite's dev+test buckets of the same lemma, so no eval word is trained on
            items["train" if split_of("lemma:" + normalize_answer(s.lemmas[0])) == "train" else "eval"].append(
                (s.lemmas[0], s.definition))
    return {"train": _spread(items["train"], n_train), "eval": _spread(items["eval"], n_eval)}


def _spread(items: list, n: int) -> list:
    """n items evenly spaced through the list (WordNet files are ordered by lexicographer file)."""
    return items[:: max(1, len(items) // n)][:n] if n > 0 else []


def encode(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Word → gloss pairs as a training batch (chat template, loss on the gloss only)."""
    return collate(tokenizer, [Example(f"Define the word: {word}", gloss) for word, gloss in pairs])


def target_loss(model, batches) -> float:
    """Mean loss per target token over the batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b).loss) * n
            count += n
    return total / count


def run_demo(args: DemoArgs) -> dict:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tok = load_base(args.model)
    data = definition_items(args.train_items, args.eval_items)
    bs = args.batch_size
    eval_batches = [encode(tok, data["eval"][i:i + bs]) for i in range(0, len(data["eval"]), bs)]
    attach_bem(model, BEMConfig(rank=8, alpha=16, controller="chunk", chunk_size=8))
    with bem_disabled(model):
        base_loss = target_loss(model, eval_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    curve = []
    for step in (bar := tqdm(range(args.steps), desc="train BEM", unit="step")):
        i = (step * bs) % len(data["train"])
        batch = encode(tok, data["train"][i:i + bs])
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping before any score is written")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    bem_loss = target_loss(model, eval_batches)
    sample = data["eval"][0]
    enc = encode(tok, [sample])
    n_prompt = int(enc["bem_prompt_len"][0])
    out = model.generate(enc["input_ids"][:, :n_prompt], max_new_tokens=24, do_sample=False,
                         bem_prompt_len=n_prompt, pad_token_id=tok.pad_token_id)
    result = {
        "task": "wordnet definition modelling (word -> gloss), WordNet 3.0 nouns",
        "model": args.model, "train_items": len(data["train"]), "eval_items": len(data["eval"]),
        "steps": args.steps, "batch_size": bs, "lr": args.lr,
        "trainable_parameters": sum(p.numel() for p in params),
        "eval_target_loss_base": base_loss, "eval_target_loss_bem": bem_loss,
        "eval_perplexity_base": math.exp(base_loss), "eval_perplexity_bem": math.exp(bem_loss),
        "train_curve": curve,
        "sample": {"word": sample[0], "reference": sample[1],
                   "bem_output": tok.decode(out[0, n_prompt:], skip_special_tokens=True)},
        "wall_seconds": time.perf_counter() - start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_bem(model, args.out / "adapter")
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    return result
