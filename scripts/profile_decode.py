"""Where a decode step's time goes: torch.profiler over greedy decode steps of the base model and of a BEM subject
(`bem bench`'s subjects), fp32 and bf16 autocast; prints each one's total and its top operators by self CPU time.

    python scripts/profile_decode.py [--subject bem_routed] [--batch 8] [--prompt-len 128] [--steps 16]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bem import bench
from bem.precision import autocast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subject", default="bem_routed", choices=bench.SUBJECTS)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cpu")
    ids = torch.randint(10, 30000, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(0))
    for name in ("base", args.subject):
        model, _, side_dim = bench.build(name, "smollm2-135m", device)
        model.eval()
        kwargs = bench._kwargs(side_dim, args.batch, args.prompt_len, device)
        for precision in ("fp32", "bf16") if bench.bf16_supported(device) else ("fp32",):  # emulated bf16 says nothing
            with torch.no_grad(), autocast(device, precision):
                out = model(ids, use_cache=True, **kwargs)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                for _ in range(2):  # warm-up steps
                    out = model(token, past_key_values=cache, use_cache=True)
                    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        out = model(token, past_key_values=cache, use_cache=True)
                        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e3 / args.steps
            calls = sum(e.count for e in events) / args.steps
            print(f"\n== {name} {precision}: {total:.1f} ms of operator self time per decode step, "
                  f"{calls:.0f} operator calls per step")
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
                print(f"  {e.key:40s} {e.self_cpu_time_total / 1e3 / args.steps:8.2f} ms  {e.count / args.steps:6.0f} calls")


if __name__ == "__main__":
    main()
