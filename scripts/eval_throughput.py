"""Evaluation decoding paths on SmolLM2 with BEM routed (S1_anchor's modules, untrained: U = 0, so replies are the base
model's) — a benchmark, not a test: transformers' generate (every row to the end), and bem.evaluate.generate with
decoding dynamic (rows that ended leave the batch), static (a static KV cache) and compiled (its decode step under
torch.compile; CUDA graphs on a GPU).

    python scripts/eval_throughput.py [--items 64] [--batch-sizes 16 32 64] [--rounds 2]
                                      [--paths hf_generate dynamic static compiled] [--device cpu|cuda]

Prints seconds per task and batch size for each path, their ratios to the first, and whether the replies are equal.
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
    parser.add_argument("--paths", nargs="+", default=["hf_generate", "dynamic"],
                        choices=["hf_generate", "dynamic", "static", "compiled"],
                        help="hf_generate: transformers' generate per batch; the others: generate(decoding=...)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from bem import attach_bem
    from bem.evaluate import generate
    from bem.experiments.config import load_experiment
    from bem.models import load_base
    from bem.tasks import SPECS, load_items, side_layout, side_vectors

    config = load_experiment(Path(__file__).resolve().parents[1] / "experiments" / "S1_anchor.yaml")
    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    model.eval().to(args.device)
    layout = side_layout(config.tasks)
    first = args.paths[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; {args.items} items per task; "
          f"medians of {args.rounds} interleaved rounds after one warm-up (compiling happens there: its seconds are "
          f"the 'warm-up s' column); ratios against {first}")
    print("| task | batch | " + " | ".join(f"{p} s" for p in args.paths) + " | " +
          " | ".join(f"{p} / {first}" for p in args.paths[1:]) + " | warm-up s | same replies |")
    print("|---|---|" + "---|" * (2 * len(args.paths) + 1))
    for task in args.tasks:
        spec = SPECS[task]
        items = load_items(task, "test", args.items)
        prompts, side = [spec.prompt(it) for it in items], torch.tensor(side_vectors(task, items, layout))

        def run(path, batch):
            if path == "hf_generate":
                return hf_generate(model, tokenizer, prompts, spec.max_new_tokens, batch, side)
            return generate(model, tokenizer, prompts, spec.max_new_tokens, batch, side=side, decoding=path)

        for batch in args.batch_sizes:
            times, replies, warm = {p: [] for p in args.paths}, {}, {}
            for path in args.paths:  # warm-up: compiles the static step for this shape
                start = time.perf_counter()
                replies[path] = run(path, batch)
                warm[path] = time.perf_counter() - start
            for r in range(args.rounds):
                order = args.paths[r % len(args.paths):] + args.paths[:r % len(args.paths)]
                for path in order:
                    start = time.perf_counter()
                    replies[path] = run(path, batch)
                    times[path].append(time.perf_counter() - start)
            med = {p: float(torch.tensor(times[p]).median()) for p in args.paths}
            same = all(replies[p] == replies[first] for p in args.paths)
            print(f"| {task} | {batch} | " + " | ".join(f"{med[p]:.1f}" for p in args.paths) + " | " +
                  " | ".join(f"{med[p] / med[first]:.2f}" for p in args.paths[1:]) +
                  f" | {max(warm.values()):.0f} | {same} |", flush=True)


if __name__ == "__main__":
    main()
