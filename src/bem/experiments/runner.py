"""`bem run`: train the named experiments for each seed, evaluate them, store every per-item score."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from bem import save_bem
from bem.evaluate import evaluate_task
from bem.experiments.config import EXPERIMENTS_DIR, ExperimentConfig, load_experiment
from bem.experiments.results import ResultsDB
from bem.experiments.training import train_unit
from bem.tasks import side_layout

log = logging.getLogger(__name__)

QUICK_EXPERIMENTS = ["L0_lora", "S1_anchor"]


def load_configs(names: list[str], quick: bool, seeds: int | None, directory: Path = EXPERIMENTS_DIR,
                 overlay: str | None = None) -> list[ExperimentConfig]:
    overlay = overlay or ("_quick" if quick else None)
    configs = [load_experiment(n, directory, overlay=overlay) for n in names]
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds {seeds}: expected an integer >= 1")
        for c in configs:
            c.seeds = list(range(seeds))
    return configs


def unit_name(config: ExperimentConfig, seed: int) -> str:
    return f"{config.name}-{config.config_hash()}-s{seed}"


def run_unit(db: ResultsDB, run_id: int, config: ExperimentConfig, seed: int, out: Path,
             data_root: Path | None = None) -> int:
    """Train (resuming if a checkpoint exists), evaluate, and commit one unit."""
    name = unit_name(config, seed)
    checkpoint = out / "checkpoints" / name
    start = time.perf_counter()
    unit = train_unit(config, seed, checkpoint, data_root)
    train_seconds = time.perf_counter() - start
    if not unit.is_main:  # under DDP only the main process evaluates and writes
        return -1
    layout = side_layout(config.tasks) if config.side_inputs and config.bem.controller != "static" else None
    rows, summaries = [], []
    start = time.perf_counter()
    for task in config.tasks:
        r, s = evaluate_task(unit.model, unit.tokenizer, task, config.evaluation.items, config.evaluation.split,
                             config.evaluation.batch_size, data_root, layout)
        rows += r
        summaries.append(s)
    eval_seconds = time.perf_counter() - start
    save_bem(unit.model, out / "adapters" / name)
    unit_id = db.write_unit(run_id, config.name, config.config_hash(), config.to_dict(), seed, rows, summaries,
                            unit.curve, train_seconds, eval_seconds)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the unit is committed; its adapter is kept
    return unit_id


def run(names: list[str], out: Path, quick: bool = False, seeds: int | None = None, data_root: Path | None = None,
        directory: Path = EXPERIMENTS_DIR, command: str = "bem run", overlay: str | None = None) -> list[tuple[str, int, str]]:
    """Run every unfinished (experiment, seed) unit, seed by seed so that an interrupted run holds every
    experiment at its first seeds; returns (experiment, seed, 'done'|'skipped')."""
    configs = load_configs(names, quick, seeds, directory, overlay)
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch / torchrun only rank 0 writes
    db = ResultsDB(out / "results.sqlite")
    try:
        run_id = db.start_run(command, quick) if main_process else 0
        done = []
        units = sorted(((c, s) for c in configs for s in c.seeds), key=lambda u: u[0].seeds.index(u[1]))
        for config, seed in units:
            if db.finished(config.name, config.config_hash(), seed):
                log.info("%s seed %d: finished earlier, skipped", config.name, seed)
                done.append((config.name, seed, "skipped"))
                continue
            run_unit(db, run_id, config, seed, out, data_root)
            done.append((config.name, seed, "done"))
        return done
    finally:
        db.close()
