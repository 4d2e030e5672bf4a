"""Does bf16 change conclusions? One unit trained and evaluated in fp32 and again in bf16 (same experiment, seed,
data and budget), then each task's primary per-item scores compared paired: bf16 − fp32 with its BCa 95% interval and
a permutation p-value (bem.stats), the same statistics a verdict uses.

    python scripts/precision_compare.py [--experiment S1_anchor] [--preset quick] [--seed 0] [--out runs/precision]
                                        [--precision fp32|bf16|both]

`--precision fp32` and `--precision bf16` in two processes on one GPU train the twins side by side (the database
takes both); the comparison is printed once both units are stored.

Units go to OUT/results.sqlite (resumable: a finished precision is not trained again); the comparison is printed and
written to OUT/compare.json. bf16 is meant for hardware that runs it natively (a GPU, a CPU with AMX or AVX512-BF16):
where it is emulated the bf16 unit takes many times longer than the fp32 one, which the script says before it starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def scores(db, unit_id: int, task: str, metric: str) -> dict[str, float]:
    return dict(db.conn.execute("SELECT item_id, value FROM item_scores WHERE unit_id=? AND task=? AND metric=?",
                                (unit_id, task, metric)))


def train_and_score(db, run_id: int, config, seed: int, out: Path, data: str) -> int:
    import time

    from bem.evaluate import evaluate_task
    from bem.experiments.training import train_unit
    from bem.precision import inference_precision
    from bem.tasks import side_layout

    start = time.perf_counter()
    unit = train_unit(config, seed, out / "checkpoints" / f"{config.name}-{config.config_hash()}-s{seed}",
                      identity={"config_hash": config.config_hash(), "data": data})
    train_seconds, start = time.perf_counter() - start, time.perf_counter()
    layout = side_layout(config.tasks) if config.side_inputs else None
    rows, summaries = [], []
    with inference_precision(unit.model, config.evaluation.precision):
        for task in config.tasks:
            r, summary = evaluate_task(unit.model, unit.tokenizer, task, config.evaluation.items,
                                       config.evaluation.split, config.evaluation.batch_size, layout=layout)
            rows += r
            summaries.append(summary)
    return db.write_unit(run_id, config.name, config.config_hash(), config.to_dict(), seed, rows, summaries,
                         unit.curve, train_seconds, time.perf_counter() - start, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="S1_anchor")
    parser.add_argument("--preset", default="quick", help="overlay experiments/_PRESET.yaml; 'none' for the default budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "precision")
    parser.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                        help="train only this twin (another process may train the other); default: both")
    args = parser.parse_args()

    from bem.experiments.adapters import unit_data
    from bem.experiments.config import load_experiment
    from bem.experiments.results import ResultsDB
    from bem.precision import bf16_supported, default_device
    from bem.stats import paired_bca, permutation_pvalue
    from bem.tasks import SPECS

    device = default_device()
    if not bf16_supported(device):
        print(f"note: bf16 is emulated on this {device.type}: the bf16 unit will take many times the fp32 one's time",
              file=sys.stderr)
    base = load_experiment(args.experiment, overlay=None if args.preset == "none" else f"_{args.preset}")
    args.out.mkdir(parents=True, exist_ok=True)
    db = ResultsDB(args.out / "results.sqlite")
    data = unit_data(base, verify=True)
    run_id = db.start_run(" ".join(["python scripts/precision_compare.py", *sys.argv[1:]]), quick=False)
    units = {}
    for precision in ("fp32", "bf16"):
        config = dataclasses.replace(base, training=dataclasses.replace(base.training, precision=precision),
                                     evaluation=dataclasses.replace(base.evaluation, precision=precision))
        units[precision] = db.unit_id(config.name, config.config_hash(), args.seed, data)
        if units[precision] is None and args.precision in (precision, "both"):
            # trained and scored clean only (no index-swap conditions, no routing passes)
            units[precision] = train_and_score(db, run_id, config, args.seed, args.out, data)
    if None in units.values():
        missing = [p for p, u in units.items() if u is None]
        print(f"{args.experiment} seed {args.seed}: {missing[0]} twin not stored yet; run --precision {missing[0]}")
        return
    rows = []
    for task in base.tasks:
        metric = SPECS[task].primary
        a, b = scores(db, units["fp32"], task, metric), scores(db, units["bf16"], task, metric)
        items = sorted(a)
        x, y = [a[i] for i in items], [b[i] for i in items]
        ci = paired_bca(y, x)
        rows.append({"task": task, "metric": metric, "items": len(items), "fp32": sum(x) / len(x),
                     "bf16": sum(y) / len(y), "difference": ci.estimate, "ci95": [ci.low, ci.high],
                     "p": permutation_pvalue(y, x)})
    print(f"{args.experiment} seed {args.seed}, preset {args.preset}: bf16 − fp32, paired by item")
    print("| task | metric | items | fp32 | bf16 | bf16 − fp32 | BCa 95% CI | permutation p |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['metric']} | {r['items']} | {r['fp32']:.4f} | {r['bf16']:.4f} | "
              f"{r['difference']:+.4f} | [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}] | {r['p']:.3f} |")
    (args.out / "compare.json").write_text(json.dumps({"experiment": args.experiment, "preset": args.preset,
                                                       "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    from bem.errors import BEMError

    try:
        main()
    except BEMError as err:  # a bad --experiment or --preset: one line, as the bem command prints it
        sys.exit(f"error: {err}")
