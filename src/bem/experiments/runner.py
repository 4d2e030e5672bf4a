"""`bem run`: train the named experiments for each seed, evaluate them, store every per-item score."""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from bem import save_bem
from bem.evaluate import FEATURE_SWAP, INDEX_SWAP, evaluate_task
from bem.experiments.adapters import unit_data, unit_name  # runner.unit_name is public
from bem.experiments.config import EXPERIMENTS_DIR, ConfigError, ExperimentConfig, load_experiment
from bem.experiments.results import ResultsDB, data_key
from bem.experiments.training import train_unit
from bem.experts import bank_masks
from bem.precision import inference_precision, resolve
from bem.tasks import SPECS, side_layout

log = logging.getLogger(__name__)

QUICK_EXPERIMENTS = ["L0_lora", "S1_anchor"]


def load_configs(names: list[str], quick: bool, seeds: int | None, directory: Path = EXPERIMENTS_DIR,
                 overlay: str | None = None) -> list[ExperimentConfig]:
    overlay = overlay or ("_quick" if quick else None)
    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1):
        raise ConfigError(f"--seeds {seeds!r} is not allowed; expected an integer >= 1 (seeds 0..N-1)")
    configs = [load_experiment(n, directory, overlay=overlay) for n in dict.fromkeys(names)]
    if seeds is not None:
        for c in configs:
            c.seeds = list(range(seeds))
    return configs


def check_data(configs: list[ExperimentConfig], data_root: Path | None = None) -> dict[str, str]:
    """{experiment: its data build (results.data_key)}, after checking every task's files against the manifest and
    that each task's evaluation split holds the items the config asks for (never silently fewer)."""
    from bem.data.prepare import data_fingerprints, read_manifest

    tasks = list(dict.fromkeys(t for c in configs for t in c.tasks))
    fingerprints = data_fingerprints(tasks, data_root)
    counts = {t: e.get("counts", {}) for t, e in read_manifest(data_root)["tasks"].items()}
    for c in configs:
        for task in c.tasks:
            have = counts.get(task, {}).get(c.evaluation.split)
            if have is not None and c.evaluation.items > have:
                raise ConfigError(f"{c.source}: evaluation.items = {c.evaluation.items} is not allowed for task {task}: "
                                  f"its {c.evaluation.split} split holds {have} items; expected at most {have}")
    return {c.name: data_key({t: fingerprints[t] for t in c.tasks}) for c in configs}


def _layout(config: ExperimentConfig) -> dict | None:
    """The side-input layout the unit's controller reads at evaluation (None: it reads none)."""
    return (side_layout(config.tasks, config.side_inputs == "zeroed")
            if config.side_inputs and config.bem.controller != "static" else None)


def swap_conditions(config: ExperimentConfig, seed: int | None = None) -> list[tuple[str, str]]:
    """(task, condition) pairs of the index swap (SPEC §6) a unit is evaluated under besides clean: every task
    with swapped variants (wordnet_qa), and for systems whose controller reads the evidence features also
    `features_shuffled` (clean text, another query's features). Every system reads the evidence in its prompt (and routed systems with side
    inputs read its features too), so every such unit gets them. The variants exist for the test split only."""
    if config.evaluation.split != "test" or config.router is not None:  # a router is scored on its own episodes
        return []
    if config.safety is not None:  # the safety block: its knob curve (bem.safety), no index swap
        from bem.safety import knob_conditions

        return knob_conditions(config)
    limit = config.evaluation.swap_seeds
    if seed is not None and limit is not None and seed not in config.seeds[:limit]:
        return []  # evaluation.swap_seeds: only the experiment's first seeds get the conditions
    reads_features = config.side_inputs is True and config.bem.controller != "static"  # zeroed: nothing to swap
    return [(task, condition) for task in config.tasks
            for condition in INDEX_SWAP.get(task, ()) + (FEATURE_SWAP.get(task, ()) if reads_features else ())]


def missing_conditions(db: ResultsDB, unit_id: int, config: ExperimentConfig, seed: int) -> list[tuple[str, str]]:
    return [(task, c) for task, c in swap_conditions(config, seed) if c not in db.conditions_done(unit_id, task)]


def evaluate_conditions(db: ResultsDB, unit_id: int, model, tokenizer, config: ExperimentConfig,
                        todo: list[tuple[str, str]], data_root: Path | None = None) -> None:
    """Evaluate a finished unit's model under each (task, condition) and commit each one on its own, so that a
    crash keeps what was done and a rerun evaluates only the rest."""
    from bem.safety import knob_mask, knob_of

    masks = bank_masks(config.bem, config.tasks)
    for task, condition in todo:
        start = time.perf_counter()
        lam, mask, clean = knob_of(condition), masks.get(task), condition
        if lam is not None:  # the safety block scaled by λ, the text as it is
            rs = config.safety.block_rank
            mask, clean = knob_mask(config.bem.rank - rs, rs, lam)[0], "clean"
        with inference_precision(model, resolve(config.evaluation.precision)):
            rows, summary = evaluate_task(model, tokenizer, task, config.evaluation.items, config.evaluation.split,
                                          config.evaluation.batch_size, data_root, _layout(config), condition=clean,
                                          mask=mask, decoding=config.evaluation.decoding)
        db.write_condition(unit_id, condition, rows)
        log.info("%s unit %d: %s %s evaluated in %.0f s (%s)", config.name, unit_id, task, condition,
                 time.perf_counter() - start, summary["means"])


ROUTING_ITEMS = 100  # items per task the routing statistics read (docs/results/v13_cpu's seed-0 units used all 500)


def missing_routing(db: ResultsDB, unit_id: int, config: ExperimentConfig) -> list[str]:
    """Tasks of a routed unit without stored routing statistics (item 8 of issue 12: is routing alive?)."""
    if config.bem.controller == "static" or config.router is not None:
        return []
    return [task for task in config.tasks if task not in db.routing(unit_id)]


def store_routing(db: ResultsDB, unit_id: int, model, tokenizer, config: ExperimentConfig, tasks: list[str],
                  rows: dict[str, list[dict]], data_root: Path | None = None) -> None:
    """How far the unit's routing moves on each task (routing_stats.measure_task_routing: one teacher-forced pass over
    each item's prompt and its reply, which by the causality rule gives the codes generation used)."""
    from bem.routing_stats import measure_task_routing

    for task in tasks:
        step = max(1, len(rows[task]) // ROUTING_ITEMS)  # evenly spread: the pass costs about one prefill per item
        with inference_precision(model, resolve(config.evaluation.precision)):
            stats = measure_task_routing(model, tokenizer, task, rows[task][::step][:ROUTING_ITEMS], _layout(config),
                                         data_root, config.evaluation.split, config.evaluation.batch_size)
        db.write_routing(unit_id, task, stats)


def backfill_unit(db: ResultsDB, unit_id: int, config: ExperimentConfig, seed: int, out: Path,
                  todo: list[tuple[str, str]], routing: list[str], data_root: Path | None = None) -> None:
    """A finished unit that lacks index-swap conditions or routing statistics (a killed run, or a run stored before
    they existed): load its trained modules (retrained deterministically where the adapter folder is missing) and
    compute only what is missing."""
    from bem.experiments.adapters import load_trained  # lazy: it may train, which pulls in Accelerate

    log.info("%s seed %d: finished earlier; adding %s", config.name, seed,
             ", ".join([f"{t} {c}" for t, c in todo] + [f"{t} routing statistics" for t in routing]))
    model, tokenizer = load_trained(config, seed, out, data_root=data_root)
    if routing:
        rows = {task: db.predictions(unit_id, task, SPECS[task].primary) for task in routing}
        store_routing(db, unit_id, model, tokenizer, config, routing, rows, data_root)
    evaluate_conditions(db, unit_id, model, tokenizer, config, todo, data_root)


def _bank_init(db: ResultsDB, run_id: int, config: ExperimentConfig, seed: int, out: Path,
               data_root: Path | None) -> dict | None:
    """`training.init_bank`: the bank's trained site tensors, the bank trained first in `out` if it is not there yet."""
    if config.training.init_bank is None:
        return None
    from bem.router.experiment import bank_weights

    bank = load_experiment(config.training.init_bank, overlay=config.preset)
    bank_data = unit_data(bank, data_root)
    if db.unit_id(bank.name, bank.config_hash(), seed, bank_data) is None:
        log.info("%s: training its bank %s seed %d first", config.name, bank.name, seed)
        run_unit(db, run_id, bank, seed, out, data_root, bank_data, extras=False)
    return bank_weights(out, bank, seed)


def run_unit(db: ResultsDB, run_id: int, config: ExperimentConfig, seed: int, out: Path,
             data_root: Path | None = None, data: str | None = None, extras: bool = True) -> int:
    """Train (resuming if a checkpoint exists), evaluate, and commit one unit; then its routing statistics and
    index-swap conditions, each committed on its own. `extras=False` skips those two: a unit trained as another
    experiment's material (a router's bank and trained baselines, an online stream's live unit, a bank under
    `training.init_bank`) is scored on its tasks only, since nothing reads the rest."""
    data = data if data is not None else unit_data(config, data_root, verify=True)
    name = unit_name(config, seed, data_root)
    checkpoint = out / "checkpoints" / name
    hooks = None
    if config.safety is not None:  # the skill unit first, then the best-of-k targets (bem.safety)
        from bem.safety import safety_hooks

        hooks = safety_hooks(db, run_id, config, seed, out, data_root)
    init = _bank_init(db, run_id, config, seed, out, data_root)  # a bank trained here is its own unit's time, not ours
    start = time.perf_counter()
    unit = train_unit(config, seed, checkpoint, data_root, identity={"config_hash": config.config_hash(), "data": data},
                      init=init, hooks=hooks)
    train_seconds = time.perf_counter() - start
    if not unit.is_main:  # under DDP only the main process evaluates and writes
        return -1
    layout, masks = _layout(config), bank_masks(config.bem, config.tasks)  # a bank: each expert alone on its task
    rows, summaries, by_task = [], [], {}
    start = time.perf_counter()
    with inference_precision(unit.model, resolve(config.evaluation.precision)):  # fp32 weights back before saving
        for task in config.tasks:
            r, s = evaluate_task(unit.model, unit.tokenizer, task, config.evaluation.items, config.evaluation.split,
                                 config.evaluation.batch_size, data_root, layout, mask=masks.get(task),
                                 decoding=config.evaluation.decoding)
            rows += r
            by_task[task] = r
            summaries.append(s)
    eval_seconds = time.perf_counter() - start
    extra = None
    if config.safety is not None:  # how orthogonal the blocks are, and what a loaded adapter needs to know
        from bem.safety import adapter_extra, orthogonality

        rk = config.bem.rank - config.safety.block_rank
        summaries.append({"task": "orthogonality", "means": orthogonality(unit.model, rk), "corpus": {}, "n": 1,
                          "seconds": None})  # not a timed evaluation: no seconds_per_item
        extra = adapter_extra(config)
    save_bem(unit.model, out / "adapters" / name, extra=extra)
    unit_id = db.write_unit(run_id, config.name, config.config_hash(), config.to_dict(), seed, rows, summaries,
                            unit.curve, train_seconds, eval_seconds, data)
    shutil.rmtree(checkpoint, ignore_errors=True)  # the unit is committed; its adapter is kept
    if extras:
        store_routing(db, unit_id, unit.model, unit.tokenizer, config, missing_routing(db, unit_id, config), by_task,
                      data_root)
        evaluate_conditions(db, unit_id, unit.model, unit.tokenizer, config, swap_conditions(config, seed), data_root)
    return unit_id


def run(names: list[str], out: Path, quick: bool = False, seeds: int | None = None, data_root: Path | None = None,
        directory: Path = EXPERIMENTS_DIR, command: str = "bem run", overlay: str | None = None,
        seed: int | None = None, executor: str = "local", workers: int = 2,
        job_parameters: dict | None = None) -> list[tuple[str, int, str]]:
    """Run every unfinished (experiment, seed) unit, seed by seed so that an interrupted run holds every
    experiment at its first seeds; returns (experiment, seed, 'done'|'skipped'|'backfilled'|'busy: ...'). A finished
    unit that lacks index-swap conditions (see swap_conditions) or routing statistics gets only those: 'backfilled'.
    A unit is identified by its config hash and the data build of its tasks: against a rebuilt suite every unit is
    new. A unit another process is working on (its lease, see ResultsDB.claim) is left to it: 'busy'. `seed`: run only
    that seed of each experiment (`bem experts train --seed`). `executor="submitit"`: fresh units that need no other
    unit run as submitit jobs, at most `workers` at once (bem.experiments.executor); the rest run here."""
    if executor not in ("local", "submitit"):
        raise ConfigError(f"--executor {executor!r} is not allowed; expected 'local' or 'submitit'")
    if executor == "submitit":  # its parameters are checked before any unit is claimed
        from bem.experiments.executor import executor as submitit_executor

        submitit_executor(out / "submitit", workers, 60, job_parameters)
    configs = load_configs(names, quick, seeds, directory, overlay)
    if seed is not None:
        for c in configs:
            c.seeds = [seed]
    data = check_data(configs, data_root)
    main_process = os.environ.get("RANK", "0") == "0"  # under accelerate launch / torchrun only rank 0 writes
    db = ResultsDB(out / "results.sqlite")
    try:
        run_id = db.start_run(command, quick) if main_process else 0
        done, jobs = [], []  # jobs: (config, seed, data) of units submitted to the executor, leases held
        units = sorted(((c, s) for c in configs for s in c.seeds), key=lambda u: u[0].seeds.index(u[1]))
        for config, seed in units:
            key = (config.name, config.config_hash(), seed, data[config.name])
            unit_id = db.unit_id(*key)
            finished = unit_id is not None
            if finished and (config.online is not None  # an online stream's unit is its served requests, nothing to add
                             or not (main_process and (missing_conditions(db, unit_id, config, seed)
                                                       or missing_routing(db, unit_id, config)))):
                log.info("%s seed %d: finished earlier, skipped", config.name, seed)
                done.append((config.name, seed, "skipped"))
                continue
            holder = db.claim(*key, finished_ok=finished) if main_process else None
            if holder == "finished":
                log.info("%s seed %d: finished by another process meanwhile, skipped", config.name, seed)
                done.append((config.name, seed, "skipped"))
                continue
            if holder is not None:
                log.warning("%s seed %d: %s is working on it; left to that process", config.name, seed, holder)
                done.append((config.name, seed, f"busy: {holder}"))
                continue
            from bem.experiments.executor import distributable

            if executor == "submitit" and not finished and distributable(config):
                jobs.append((config, seed, data[config.name]))  # the lease stays held until its result is stored
                continue
            try:
                if finished:
                    backfill_unit(db, unit_id, config, seed, out, missing_conditions(db, unit_id, config, seed),
                                  missing_routing(db, unit_id, config), data_root)
                    done.append((config.name, seed, "backfilled"))
                elif config.online is not None:  # online shadow mode: the live unit, then the stream (resumable)
                    from bem.online.simulate import run_stream

                    run_stream(db, run_id, config, seed, out, data_root, data[config.name])
                    done.append((config.name, seed, "done"))
                elif config.router is not None:  # the agentic router: bank, oracles, AR0/AR1, the quick baselines
                    from bem.router.experiment import run_unit as run_router_unit

                    run_router_unit(db, run_id, config, seed, out, data_root, data[config.name], trained_baselines=False)
                    done.append((config.name, seed, "done"))
                else:
                    run_unit(db, run_id, config, seed, out, data_root, data[config.name])
                    done.append((config.name, seed, "done"))
            finally:
                if main_process:
                    db.release(*key)
        if jobs:
            from bem.experiments.executor import run_jobs

            done += run_jobs(db, run_id, jobs, out, data_root, workers, directory, quick, seeds, overlay,
                             parameters=job_parameters)
        if main_process:  # the router's baselines that train, and every system's cost, once its units are done
            from bem.router.experiment import run_unit as run_router_unit

            for config, seed in units:
                if config.router is not None and db.unit_id(config.name, config.config_hash(), seed, data[config.name]):
                    run_router_unit(db, run_id, config, seed, out, data_root, data[config.name])
            from bem.mm import TASK, store_text_baselines

            for config in configs:  # easy_vqa's text baselines on the items its experiments are scored on (bem.mm)
                if TASK in config.tasks and config.router is None and config.online is None:
                    for system in store_text_baselines(db, run_id, config, data_root):
                        log.info("mm/%s: stored on %s's easy_vqa items", system, config.name)
        return done
    finally:
        db.close()
