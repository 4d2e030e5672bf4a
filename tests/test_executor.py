"""`bem run --executor submitit` on submitit's local executor with 2 worker processes: the units run as jobs, only the
driver writes the database, and the stored results equal an in-process run's; a recorded unit replays exactly;
a preempted job is requeued with the same arguments."""
import sqlite3

from test_experiments import tiny_setup  # noqa: F401  (a tiny model, two experiments, a small data folder)


def _units(db_path):
    conn = sqlite3.connect(db_path)
    scores = conn.execute("SELECT u.experiment, u.seed, s.task, s.item_id, s.metric, s.value, s.prediction "
                          "FROM item_scores s JOIN units u ON u.id = s.unit_id ORDER BY 1, 2, 3, 4, 5").fetchall()
    curves = conn.execute("SELECT u.experiment, c.step, c.loss FROM curves c JOIN units u ON u.id = c.unit_id "
                          "ORDER BY 1, 2").fetchall()
    leases = conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0]
    conn.close()
    return scores, curves, leases


def test_submitit_jobs_store_what_an_in_process_run_stores(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    from bem.experiments.runner import run

    monkeypatch.setenv("BEM_DATA", str(tiny_setup / "data"))
    names, directory = ["tiny_lora", "tiny_bem"], tiny_setup / "experiments"
    local = run(names, tmp_path / "local", directory=directory, data_root=tiny_setup / "data")
    jobs = run(names, tmp_path / "jobs", directory=directory, data_root=tiny_setup / "data", executor="submitit",
               workers=2)
    assert sorted(jobs) == sorted(local) == [("tiny_bem", 0, "done"), ("tiny_lora", 0, "done")]
    ours, theirs = _units(tmp_path / "jobs" / "results.sqlite"), _units(tmp_path / "local" / "results.sqlite")
    assert ours[0] == theirs[0] and ours[0]  # the same per-item scores and replies
    assert [(e, s) for e, s, _ in ours[1]] == [(e, s) for e, s, _ in theirs[1]]
    assert all(abs(a[2] - b[2]) <= 1e-5 * max(1.0, abs(b[2])) for a, b in zip(ours[1], theirs[1]))
    assert ours[2] == 0  # every lease released
    assert list((tmp_path / "jobs" / "submitit").glob("*_result.pkl"))  # they did run as submitit jobs
    again = run(names, tmp_path / "jobs", directory=directory, data_root=tiny_setup / "data", executor="submitit")
    assert sorted(again) == [("tiny_bem", 0, "skipped"), ("tiny_lora", 0, "skipped")]


def test_recorded_writes_replay_into_the_database(tmp_path):
    from bem.experiments.executor import Recorder, replay
    from bem.experiments.results import ResultsDB

    rec = Recorder()
    rows = [{"task": "wordnet_define", "id": "a", "prediction": "x", "scores": {"chrf": 0.5}, "meta": {}}]
    summary = {"task": "wordnet_define", "means": {"chrf": 0.5}, "corpus": {}, "n": 1, "seconds": 1.0}
    assert rec.write_unit(0, "e", "h", {"k": 1}, 3, rows, [summary], [], 2.0, 1.0, "{}") == -1
    rec.write_condition(-1, "shuffled", [{**rows[0], "scores": {"chrf": 0.25}}])
    db = ResultsDB(tmp_path / "results.sqlite")
    run_id = db.start_run("test", False)
    unit = replay(db, run_id, rec.calls)
    assert db.unit_id("e", "h", 3, "{}") == unit
    assert db.conn.execute("SELECT value FROM condition_scores WHERE unit_id=?", (unit,)).fetchone()[0] == 0.25
    db.close()


def test_a_preempted_job_is_requeued_with_the_same_arguments():
    from bem.experiments.executor import UnitJob

    job = UnitJob()
    args = ("tiny_lora", False, None, "/experiments", None, 0, "/out", None, "{}")
    again = job.checkpoint(*args)
    assert again.function is job and again.args == args


def test_job_options_become_submitit_parameters(tmp_path):
    import pytest

    from bem.experiments.config import ConfigError
    from bem.experiments.executor import executor, job_parameters

    assert job_parameters(["slurm_partition=gpu", "gpus_per_node=1", "mem_gb=32.5"]) == {
        "slurm_partition": "gpu", "gpus_per_node": 1, "mem_gb": 32.5}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        job_parameters(["gpus"])
    with pytest.raises(ConfigError, match="cpus_per_tasks"):  # submitit refuses a misspelt parameter, naming it
        executor(tmp_path / "submitit", 2, 10, {"cpus_per_tasks": 2})


def test_a_job_keeps_the_drivers_precision_and_refuses_a_changed_config(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    import pytest

    from bem.experiments import runner
    from bem.experiments.executor import UnitJob

    seen = {}
    monkeypatch.setattr(runner, "run_unit", lambda db, run_id, config, *a, **k: seen.update(
        precision=(config.training.precision, config.evaluation.precision), hash=config.config_hash()))
    (config,) = runner.load_configs(["tiny_lora"], False, None, tiny_setup / "experiments")
    args = ("tiny_lora", False, None, str(tiny_setup / "experiments"), None, 0, str(tmp_path), None, "{}")
    monkeypatch.setenv("BEM_AUTO_PRECISION", "bf16")  # the worker's own machine would resolve auto to bf16
    UnitJob()(*args, ("fp32", "fp32"), config.config_hash())
    assert seen == {"precision": ("fp32", "fp32"), "hash": config.config_hash()}
    with pytest.raises(RuntimeError, match="differs from the driver's"):
        UnitJob()(*args, ("fp32", "fp32"), "0123456789ab")
