"""Record the data build of units stored before BEM stored one (schema 1), after checking it.

    python scripts/stamp_data_build.py RUN_FOLDER [--data DATA_ROOT] [--dry-run]

A unit stored without its data build is never matched by `bem run` (it trains the unit again) and is paired in the
analysis only with other units of unknown build. This script gives such a unit the current build's fingerprints when
the current test data reproduces every per-item score it stored: each stored reply is scored again against the item
of the same id in today's split and must give the stored value (within 1e-9) for every metric. A unit that fails
keeps no build and the script says which item differs. Only the evaluation split is checked: use it when the suite
was not rebuilt since the run (`bem data prepare` says "up to date").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bem.data.prepare import data_fingerprints
from bem.experiments.results import ResultsDB, data_key
from bem.tasks import SPECS, read_split


def check_unit(db: ResultsDB, unit_id: int, tasks: list[str], split: str, items: dict) -> str | None:
    """None when the current data reproduces every stored score of the unit, else the first difference."""
    for task in tasks:
        by_id = items.setdefault((task, split), {it["id"]: it for it in read_split(task, split)})
        scored: dict[str, dict] = {}
        for item_id, metric, value, prediction in db.conn.execute(
                "SELECT item_id, metric, value, prediction FROM item_scores WHERE unit_id=? AND task=?", (unit_id, task)):
            if item_id not in by_id:
                return f"{task} item {item_id} is not in today's {split} split"
            if item_id not in scored:
                scored[item_id] = SPECS[task].score(prediction, by_id[item_id])
            if abs(scored[item_id][metric] - value) > 1e-9:
                return f"{task} item {item_id} {metric}: stored {value}, today's data gives {scored[item_id][metric]}"
    return None


def main(argv: list[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", default=None, help="data folder (default: $BEM_DATA or ~/.cache/bem/data/v1)")
    parser.add_argument("--dry-run", action="store_true", help="check and print, write nothing")
    args = parser.parse_args(argv)
    db = ResultsDB(Path(args.run_dir) / "results.sqlite", create=False)
    items: dict = {}
    stamped = failed = 0
    for unit_id, experiment, seed, config_json in db.conn.execute(
            "SELECT u.id, u.experiment, u.seed, c.json FROM units u JOIN configs c ON c.hash = u.config_hash "
            "WHERE u.data_fingerprint IS NULL ORDER BY u.id").fetchall():
        config = json.loads(config_json)
        tasks, split = config["tasks"], config["evaluation"]["split"]
        problem = check_unit(db, unit_id, tasks, split, items)
        if problem:
            failed += 1
            print(f"{experiment} seed {seed}: not stamped: {problem}")
            continue
        build = data_key(data_fingerprints(tasks, Path(args.data) if args.data else None))
        if not args.dry_run:
            with db.conn:
                db.conn.execute("UPDATE units SET data_fingerprint=? WHERE id=?", (build, unit_id))
        stamped += 1
        print(f"{experiment} seed {seed}: {'would stamp' if args.dry_run else 'stamped'} {build}")
    db.close()
    print(f"{stamped} unit(s) {'checked' if args.dry_run else 'stamped'}, {failed} left without a data build")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
