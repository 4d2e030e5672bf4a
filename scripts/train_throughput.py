"""Benchmark of one training step on the real model: Hugging Face's loss (`model(**batch).loss`, the output head over
every position) against `target_loss` (the head over target positions only), and the pad efficiency (real tokens /
padded tokens) of the first steps under both batch schedules.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/train_throughput.py [--experiment S1_anchor] [--repeats 3]

Both losses run forward + backward on the same batch (the first of the random schedule), one warm-up each, then
`--repeats` rounds alternating old and new so that other load on the machine hits both alike; medians are printed.
"""
from __future__ import annotations

import argparse
import sys
import statistics
import time
from pathlib import Path

import torch

from bem import attach_bem
from bem.data.batches import BatchSchedule, encode_cached, pad_batch, pad_efficiency
from bem.experiments.config import load_experiment
from bem.experiments.training import target_loss, training_examples
from bem.models import load_base

ROOT = Path(__file__).resolve().parents[1]


def step_seconds(model, batch, loss_fn) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss_fn(model, batch).backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="S1_anchor")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help="steps whose pad efficiency is measured")
    args = parser.parse_args()

    config = load_experiment(ROOT / "experiments" / f"{args.experiment}.yaml")
    tc = config.training
    model, tokenizer = load_base(config.model)
    attach_bem(model, config.bem)
    model.train()
    examples = training_examples(config)
    start = time.perf_counter()
    rows = encode_cached(tokenizer, examples, tc.max_length)
    print(f"encoded {len(rows)} examples in {time.perf_counter() - start:.2f} s (once per process)")

    lengths = [len(r) for r in rows]
    schedules = {mode: BatchSchedule(lengths, tc.batch_size, 0, mode) for mode in ("random", "length")}
    for mode, schedule in schedules.items():
        print(f"pad efficiency, first {args.steps} steps, {mode:6s}: "
              f"{pad_efficiency(lengths, [schedule(g) for g in range(args.steps)]):.3f}")

    batch = pad_batch([rows[i] for i in schedules["random"](0)], tokenizer.pad_token_id)
    real = int(batch["attention_mask"].sum())
    targets = int((batch["labels"] != -100).sum())
    print(f"batch: {tuple(batch['input_ids'].shape)}, {real} real tokens, {targets} target tokens, "
          f"{torch.get_num_threads()} threads")
    losses = {"old": lambda m, b: m(**b).loss, "new": target_loss}
    with torch.no_grad():
        values = {name: float(fn(model, batch)) for name, fn in losses.items()}
    print(f"loss: old {values['old']:.6f}, new {values['new']:.6f}")
    times: dict[str, list[float]] = {name: [] for name in losses}
    for name, fn in losses.items():
        step_seconds(model, batch, fn)  # warm-up
    for _ in range(args.repeats):
        for name, fn in losses.items():
            times[name].append(step_seconds(model, batch, fn))
    old, new = (statistics.median(times[name]) for name in ("old", "new"))
    for name, seconds in (("old", old), ("new", new)):
        print(f"{name}: {seconds:.3f} s/step (rounds {', '.join(f'{t:.3f}' for t in times[name])}), "
              f"{real / seconds:.0f} real tokens/s")
    print(f"new / old: {new / old:.3f} (step time), speed-up ×{old / new:.2f}")


if __name__ == "__main__":
    from bem.errors import BEMError

    try:
        main()
    except BEMError as err:  # a bad --experiment or --preset: one line, as the bem command prints it
        sys.exit(f"error: {err}")
