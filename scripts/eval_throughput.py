"""Evaluation decoding: generate() (rows that ended leave the batch) against transformers' generate (every row to the
end), on SmolLM2 with BEM routed (S1_anchor's modules, untrained: U = 0, so replies are the base model's) — a benchmark,
not a test.

    python scripts/eval_throughput.py [--items 64] [--batch-sizes 16 32 64] [--rounds 2]

Prints seconds per task and batch size for both paths, their ratio, and whether the replies are equal.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def hf_generate(model, tokenizer, prompts, max_new_tokens, batch_size, side):
    """The path before: transformers' generate per length-sorted batch (finished rows computed to the end)."""
    from bem.data.batches import prompt_ids

    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    replies = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, bem_prompt_len=mask.sum(1), bem_side=side[idx])
        for row, i in enumerate(idx):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=["wordnet_qa", "bible_translate"])
    args = parser.parse_args()

    from bem import attach_bem
    from bem.evaluate import generate
    from bem.experiments.config import load_experiment
    from bem.models import load_base
    from bem.tasks import SPECS, load_items, side_layout, side_vectors

    config = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "S1_anchor.yaml")
    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    model.eval()
    layout = side_layout(config.tasks)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.items} items per task; "
          f"medians of {args.rounds} interleaved rounds")
    print("| task | batch | generate (before) s | greedy, rows leave (now) s | ratio | same replies |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        spec = SPECS[task]
        items = load_items(task, "test", args.items)
        prompts, side = [spec.prompt(it) for it in items], torch.tensor(side_vectors(task, items, layout))
        for batch in args.batch_sizes:
            times = {"before": [], "now": []}
            for r in range(args.rounds):
                for path in (("before", "now") if r % 2 == 0 else ("now", "before")):
                    start = time.perf_counter()
                    if path == "before":
                        before = hf_generate(model, tokenizer, prompts, spec.max_new_tokens, batch, side)
                    else:
                        now = generate(model, tokenizer, prompts, spec.max_new_tokens, batch, side=side)
                    times[path].append(time.perf_counter() - start)
            b, n = (float(torch.tensor(times[k]).median()) for k in ("before", "now"))
            print(f"| {task} | {batch} | {b:.1f} | {n:.1f} | {n / b:.2f} | {before == now} |", flush=True)


if __name__ == "__main__":
    main()
