"""`bem run --executor submitit`: units as idempotent jobs on SLURM (or submitit's local executor), results written by
the driver alone.

A job trains and evaluates one (experiment, config hash, seed) unit exactly as `runner.run_unit` does, in the run
folder (checkpoints and the adapter live there: the folder must be on a file system the workers share), but against
a `Recorder` instead of the database: the recorder keeps every write the unit would make (the unit, its routing
statistics, its index-swap conditions) and the job returns them. The driver replays them into `results.sqlite`, so
only the driver process ever opens the database: SQLite is never used over a network file system.

A job is `submitit.helpers.Checkpointable`: preempted or timed out, it is requeued with the same arguments, and the
unit resumes from its newest checkpoint. Units that depend on others (a bank under `training.init_bank`, the router,
online and safety experiments) and backfills of finished units run in the driver, as with `--executor local`.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Recorder:
    """Stands in for ResultsDB inside a job: keeps the writes of one unit (in order) for the driver to replay."""

    def __init__(self):
        self.calls: list[tuple[str, tuple]] = []

    def write_unit(self, run_id, experiment, config_hash, config_json, seed, rows, summaries, curve, train_seconds,
                   eval_seconds, data=None) -> int:
        self.calls.append(("write_unit", (experiment, config_hash, config_json, seed, rows, summaries, curve,
                                          train_seconds, eval_seconds, data)))
        return -1  # the driver's replay gives the real id

    def write_routing(self, unit_id, task, stats) -> None:
        self.calls.append(("write_routing", (task, stats)))

    def write_condition(self, unit_id, condition, rows) -> None:
        self.calls.append(("write_condition", (condition, rows)))

    def routing(self, unit_id) -> dict:
        return {}  # a fresh unit has nothing stored yet

    def conditions_done(self, unit_id, task) -> set:
        return set()


def replay(db, run_id: int, calls: list[tuple[str, tuple]]) -> int:
    """Write a job's recorded calls into the driver's database; returns the unit's id."""
    unit_id = None
    for name, args in calls:
        if name == "write_unit":
            unit_id = db.write_unit(run_id, *args)
        elif name == "write_routing":
            db.write_routing(unit_id, *args)
        elif name == "write_condition":
            db.write_condition(unit_id, *args)
        else:
            raise ValueError(f"unknown recorded call {name!r}")
    if unit_id is None:
        raise ValueError("the job recorded no unit: nothing to replay")
    return unit_id


try:  # submitit is needed only with --executor submitit
    from submitit.helpers import Checkpointable as _JobBase
except ImportError:  # pragma: no cover - without submitit a job is a plain callable (never submitted)
    _JobBase = object


class UnitJob(_JobBase):
    """One unit, run in a worker process: `UnitJob()(name, ...)` returns the recorded writes. A submitit Checkpointable:
    preempted or timed out, it is requeued with the same arguments and the unit resumes from its checkpoint."""

    def __call__(self, name: str, quick: bool, seeds: int | None, directory: str, overlay: str | None, seed: int,
                 out: str, data_root: str | None, data: str, precisions: tuple[str, str] | None = None,
                 config_hash: str | None = None) -> list[tuple[str, tuple]]:
        from bem.experiments.runner import load_configs, run_unit

        (config,) = load_configs([name], quick, seeds, Path(directory), overlay)
        if precisions is not None:  # the driver's resolution of `auto`: a GPU worker must not turn a CPU unit into bf16
            config.training.precision, config.evaluation.precision = precisions
        if config_hash is not None and config.config_hash() != config_hash:
            raise RuntimeError(f"{name} seed {seed}: the job's config hash {config.config_hash()} differs from the "
                               f"driver's {config_hash}: the experiment file changed after the run was submitted")
        recorder = Recorder()
        run_unit(recorder, -1, config, seed, Path(out), Path(data_root) if data_root else None, data)
        return recorder.calls


def distributable(config) -> bool:
    """A unit a job can run alone: it needs no other unit of the folder first."""
    return (config.training.init_bank is None and config.router is None and config.online is None
            and config.safety is None)


def job_parameters(pairs: list[str]) -> dict:
    """`--job KEY=VALUE` options as submitit parameters (numbers as numbers): gpus_per_node=1, cpus_per_task=8,
    mem_gb=32, slurm_partition=gpu, ... (submitit's AutoExecutor.update_parameters)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--job {pair!r} is not allowed; expected KEY=VALUE (e.g. slurm_partition=gpu)")
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def executor(folder: Path, workers: int, timeout_min: int, parameters: dict | None = None):
    """The submitit executor: `submitit` picks SLURM where `sbatch` exists, else runs jobs as local processes."""
    try:
        import submitit
    except ImportError:
        raise ModuleNotFoundError("--executor submitit needs the PyPI package submitit; install it with: pip install "
                                  "submitit==1.5.4   (or: make setup)") from None
    ex = submitit.AutoExecutor(folder=folder)
    try:
        ex.update_parameters(timeout_min=timeout_min, slurm_array_parallelism=workers, **(parameters or {}))
    except (ValueError, TypeError, NameError) as err:  # submitit names the parameter it does not know
        from bem.experiments.config import ConfigError

        raise ConfigError(f"--job {parameters}: {str(err).splitlines()[0]}") from None
    return ex


def run_jobs(db, run_id: int, units: list, out: Path, data_root: Path | None, workers: int, directory: Path,
             quick: bool, seeds: int | None, overlay: str | None, timeout_min: int = 24 * 60,
             poll_s: float = 2.0, parameters: dict | None = None) -> list[tuple[str, int, str]]:
    """Submit `units` ((config, seed, data) whose leases this driver holds) as jobs, at most `workers` at a time
    (SLURM: one job array with that parallelism), replay each result as it arrives and release its lease."""
    ex = executor(out / "submitit", workers, timeout_min, parameters)
    local = ex.cluster in ("local", "debug")
    fn = UnitJob()
    pending, running, done = list(units), [], []

    def submit(config, seed, data):
        return ex.submit(fn, config.source if Path(config.source).is_absolute() else config.name, quick, seeds,
                         str(directory), overlay, seed, str(out), str(data_root) if data_root else None, data,
                         (config.training.precision, config.evaluation.precision), config.config_hash())

    if not local:  # SLURM: one array, the parallelism set on the executor
        with ex.batch():
            handles = [submit(*u) for u in pending]
        running, pending = list(zip(handles, pending)), []
    while pending or running:
        while local and pending and len(running) < workers:
            u = pending.pop(0)
            running.append((submit(*u), u))
            log.info("%s seed %d: submitted as job %s", u[0].name, u[1], running[-1][0].job_id)
        finished = [(h, u) for h, u in running if h.done()]
        for h, u in finished:
            running.remove((h, u))
            config, seed, data = u
            try:
                unit_id = replay(db, run_id, h.result())
                done.append((config.name, seed, "done"))
                log.info("%s seed %d: job %s done, stored as unit %d", config.name, seed, h.job_id, unit_id)
            except Exception as err:  # the job failed: its error is in the job's log; the unit stays unfinished
                done.append((config.name, seed, f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"))
                log.error("%s seed %d: job %s failed (%s); its log is in %s", config.name, seed, h.job_id,
                          type(err).__name__, out / "submitit")
            finally:
                db.release(config.name, config.config_hash(), seed, data)
        if running and not finished:
            time.sleep(poll_s)
    return done
