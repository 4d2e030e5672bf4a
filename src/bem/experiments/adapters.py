"""The trained adapter of a finished unit: where it lives, loading it, and restoring it when it is gone.

`bem run` saves each finished unit's modules at `RUN/adapters/<experiment>-<config hash>-d<data build>-s<seed>`. Stored
run folders (docs/results/*) commit the database but not the adapters, so a command that needs the trained
modules of such a unit (profiling, index-swap backfills, routing statistics) restores the adapter by training
the unit again: training is a fixed function of (config, seed) (see training.py), and the restored unit is
accepted only if its training curve equals the stored one (loss per step within `CURVE_TOLERANCE`), so the
adapter is the one whose scores are in the database.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from bem.errors import BEMError
from bem.experiments.config import ExperimentConfig
from bem.experiments.results import data_key, read_only_copy

log = logging.getLogger(__name__)

CURVE_TOLERANCE = 1e-4  # relative, per step: fp32 training on the same code and data repeats to ~1e-7


class AdapterMismatch(BEMError, RuntimeError):
    """A restored adapter's training curve differs from the stored one: it is not the unit that was scored."""


def unit_data(config: ExperimentConfig, data_root: Path | None = None, verify: bool = False) -> str:
    """The data build of the config's tasks as stored with its units (bem.experiments.results.data_key)."""
    from bem.data.prepare import data_fingerprints

    return data_key(data_fingerprints(config.tasks, data_root, verify=verify))


def unit_name(config: ExperimentConfig, seed: int, data_root: Path | None = None) -> str:
    """<experiment>-<config hash>-d<8 hex digits of the data build>-s<seed>: the folder name of a unit's checkpoints
    and adapter; units of the same config on different data builds never share one."""
    tag = hashlib.sha256(unit_data(config, data_root).encode()).hexdigest()[:8]
    return f"{config.name}-{config.config_hash()}-d{tag}-s{seed}"


def adapter_dir(out: Path, config: ExperimentConfig, seed: int, data_root: Path | None = None) -> Path:
    return Path(out) / "adapters" / unit_name(config, seed, data_root)


def stored_curve(db_path: Path, config: ExperimentConfig, seed: int,
                 data_root: Path | None = None) -> list[tuple[int, float]] | None:
    """(step, loss) of the finished unit, or None when the database holds no such unit."""
    conn = read_only_copy(db_path)
    try:
        row = conn.execute("SELECT id FROM units WHERE experiment=? AND config_hash=? AND seed=? AND "
                           "data_fingerprint IS ?", (config.name, config.config_hash(), seed,
                                                     unit_data(config, data_root))).fetchone()
        if row is None:
            return None
        return conn.execute("SELECT step, loss FROM curves WHERE unit_id=? ORDER BY step", (row[0],)).fetchall()
    finally:
        conn.close()


def restore_adapter(config: ExperimentConfig, seed: int, out: Path, data_root: Path | None = None) -> Path:
    """Train a finished unit again and save its adapter, after checking the curve against the stored one."""
    from bem import save_bem
    from bem.experiments.training import train_unit

    out = Path(out)
    curve = stored_curve(out / "results.sqlite", config, seed, data_root)
    if curve is None:
        raise FileNotFoundError(f"{out / 'results.sqlite'}: no finished unit {unit_name(config, seed, data_root)} to restore; "
                                f"run `bem run --out {out}` to train it")
    scratch = out / "checkpoints" / f"restore-{unit_name(config, seed, data_root)}"
    log.info("%s seed %d: adapter not in %s, training it again to restore it", config.name, seed, out / "adapters")
    hooks = extra = None
    if config.safety is not None:  # the safety block trains beside its skill unit, on its cached targets
        from bem.safety import adapter_extra, hooks_for

        hooks, extra = hooks_for(config, seed, out, data_root), adapter_extra(config)
    # compare at the first checkpoint before spending the rest of the budget: a machine whose arithmetic differs
    # from the one that trained the unit shows it in the first steps (the second call resumes, exactly)
    try:
        early = train_unit(config, seed, scratch, data_root, stop_after=min(config.training.checkpoint_every,
                                                                            config.training.steps), hooks=hooks)
        _check_curve(config, seed, data_root, early.curve, curve[:len(early.curve)])
        unit = train_unit(config, seed, scratch, data_root, hooks=hooks)
        worst = _check_curve(config, seed, data_root, unit.curve, curve)
    except AdapterMismatch:
        shutil.rmtree(scratch, ignore_errors=True)  # training is deterministic here: resuming it would differ again
        raise
    log.info("%s seed %d: restored, curve equal to the stored one within %.1e", config.name, seed, worst)
    target = adapter_dir(out, config, seed, data_root)
    save_bem(unit.model, target, extra=extra)
    shutil.rmtree(scratch, ignore_errors=True)
    return target


def _check_curve(config: ExperimentConfig, seed: int, data_root, rows: list[dict], stored: list) -> float:
    """The largest relative difference between a restored run's losses and the stored curve; AdapterMismatch when the
    steps differ or a loss differs by more than CURVE_TOLERANCE."""
    got = [(row["step"], row["loss"]) for row in rows]
    if [s for s, _ in got] != [s for s, _ in stored]:
        raise AdapterMismatch(f"{unit_name(config, seed, data_root)}: the restored run has steps {len(got)} but the stored "
                              f"unit has {len(stored)}")
    worst = max((abs(a - b) / max(abs(b), 1e-12) for (_, a), (_, b) in zip(got, stored)), default=0.0)
    if worst > CURVE_TOLERANCE:
        raise AdapterMismatch(f"{unit_name(config, seed, data_root)}: restored training loss differs from the stored curve by "
                              f"{worst:.2e} by step {got[-1][0]} (relative, allowed {CURVE_TOLERANCE:.0e}); the adapter "
                              "would not be the one that was scored, so it is not saved")
    return worst


def load_trained(config: ExperimentConfig, seed: int, out: Path, data_root: Path | None = None,
                 restore: bool = True):
    """(model, tokenizer): the base model with the finished unit's trained adapter loaded (restored first if the
    folder holds the unit but not its adapter and `restore` is set)."""
    from bem import load_bem
    from bem.models import load_base

    directory = adapter_dir(out, config, seed, data_root)
    if not (directory / "bem_weights.safetensors").is_file():
        if not restore:
            raise FileNotFoundError(f"{directory}: no saved adapter for {unit_name(config, seed, data_root)}")
        restore_adapter(config, seed, out, data_root)
    model, tokenizer = load_base(config.model)
    load_bem(model, directory)
    model.eval()
    return model, tokenizer
