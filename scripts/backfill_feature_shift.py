"""Add `feature_shift` (and `gate_feature_shift` with head gates; bem.routing_stats) to the routing statistics of units
stored before they existed.

    python scripts/backfill_feature_shift.py RUN_DIR [--experiments ...] [--preset cpu] [--retrain]

For every finished routed unit of RUN_DIR (each experiment's latest config) whose controller reads side inputs, the
tasks with side inputs (wordnet_qa's evidence features, easy_vqa's image features) whose stored statistics lack
`feature_shift` are measured again from the unit's trained adapter and its stored replies, and replace the stored ones
(the other statistics come out as stored: the same adapter, replies and code). `bem run` measures it for every new unit;
it does not backfill it, because a folder committed without its adapters would retrain every unit for it. Without
`--retrain` a unit whose adapter folder is missing is skipped and named.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--experiments", nargs="+", default=None)
    parser.add_argument("--preset", default=None, help="the overlay the folder's units were run with (cpu, quick, ...)")
    parser.add_argument("--retrain", action="store_true", help="restore missing adapters by retraining (slow)")
    args = parser.parse_args()

    from bem.experiments.adapters import adapter_dir, load_trained
    from bem.experiments.config import load_experiment
    from bem.experiments.results import ResultsDB
    from bem.experiments.runner import store_routing
    from bem.tasks import SIDE_DIMS, SPECS

    db = ResultsDB(args.run_dir / "results.sqlite")
    latest = db.conn.execute("SELECT u.id, u.experiment, u.seed, u.config_hash FROM units u WHERE u.config_hash = "
                             "(SELECT v.config_hash FROM units v WHERE v.experiment = u.experiment ORDER BY v.finished "
                             "DESC LIMIT 1) ORDER BY u.id").fetchall()
    skipped, configs = [], {}
    for unit_id, experiment, seed, config_hash in latest:
        if args.experiments and experiment not in args.experiments:
            continue
        if experiment not in configs:
            configs[experiment] = load_experiment(experiment, overlay=f"_{args.preset}" if args.preset else None)
        config = configs[experiment]
        if config.config_hash() != config_hash:
            skipped.append(f"{experiment} seed {seed} (stored config {config_hash}, the experiment file's "
                           f"{config.config_hash()}: another --preset?)")
            continue
        if config.bem.controller == "static" or config.router is not None or config.side_inputs is not True:
            continue
        stored = db.routing(unit_id)
        wanted = ["feature_shift"] + (["gate_feature_shift"] if config.bem.head_groups else [])
        tasks = [t for t in config.tasks if t in SIDE_DIMS and t in stored
                 and any(stat not in stored[t]["all"] for stat in wanted)]
        if not tasks:
            continue
        if not args.retrain and not (adapter_dir(args.run_dir, config, seed) / "bem_weights.safetensors").is_file():
            skipped.append(f"{experiment} seed {seed} (no adapter folder; --retrain restores it)")
            continue
        model, tokenizer = load_trained(config, seed, args.run_dir)
        rows = {task: db.predictions(unit_id, task, SPECS[task].primary) for task in tasks}
        store_routing(db, unit_id, model, tokenizer, config, tasks, rows)
        for task in tasks:
            shift = db.routing(unit_id)[task]["all"]
            print(f"{experiment} seed {seed} {task}: feature_shift {shift['feature_shift']:.4f} "
                  f"(×{shift.get('feature_shift_ratio', float('nan')):.3f} of the code spread)", flush=True)
    db.close()
    if skipped:
        print(f"skipped: {'; '.join(skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
