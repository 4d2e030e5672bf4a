"""Heterogeneous batches (issue 18, item 1): BEM's per-row experts and codes against the base model and PEFT's
mixed-batch LoRA, one forward of B × T. A benchmark, not a test: it prints ratios measured in one process.

    python scripts/bench_hetero.py                                   # SmolLM2-135M, B16 × T512, CPU fp32
    python scripts/bench_hetero.py --model qwen1.5b --batch 2 --seq 128 --sequential   # 1.5B shape, random weights
    python scripts/bench_hetero.py --device cuda --precision bf16    # on a GPU
"""
import argparse
from pathlib import Path

from bem.hetero import SUBJECTS, bench_hetero, markdown, write

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="embedded model name, or a shape: qwen1.5b, tiny")
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--seq", type=int, default=512)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--device", default="cpu")
parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
parser.add_argument("--subjects", nargs="+", default=list(SUBJECTS), choices=list(SUBJECTS))
parser.add_argument("--sequential", action="store_true", help="one subject in memory at a time (large models)")
parser.add_argument("--out", default=None, help="JSON path (default docs/perf/hetero-MODEL-DEVICE-PRECISION.json)")
args = parser.parse_args()
result = bench_hetero(args.model, args.batch, args.seq, args.rounds, args.device, args.precision, args.subjects,
                      args.sequential)
print(markdown(result))
out = Path(args.out or f"docs/perf/hetero-{args.model}-{args.device}-{args.precision}.json")
write(result, out)
print(f"stored {out} and {out.with_suffix('.md')}")
