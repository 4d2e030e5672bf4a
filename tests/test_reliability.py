"""Issue 13: the results database, data identity and the CLI hold up against bad input (docs/reliability.md).

Config validation has its table in test_config_validation.py and checkpoints theirs in test_checkpoints.py.
"""
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bem.errors import BEMError, DatabaseError, DataError
from bem.experiments.config import ConfigError
from bem.experiments.results import SCHEMA_VERSION, ResultsDB, read_only_copy

REPO = Path(__file__).resolve().parents[1]
QUICK_DB = REPO / "docs/results/quick/results.sqlite"  # a stored database (tests work on copies)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bem(*args, env=None, cwd=None):
    """`bem ARGS` in a child process: (exit status, stdout, stderr)."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "bem.cli", *args], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama (SmolLM2's tokenizer) as a local folder, a prepared data folder, and two static experiments:
    tiny_a (a baseline) and tiny_b (anchored on tiny_a), a few seconds each to train."""
    from bem.data.prepare import prepare
    from bem.models import load_base, tiny as tiny_model

    root = tmp_path_factory.mktemp("reliability")
    tokenizer = load_base("smollm2-135m")[1]
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    prepare(["wordnet_define"], root / "data")
    experiments = root / "experiments"
    experiments.mkdir()
    common = (f"model: {root / 'model'}\ntasks: [wordnet_define]\nseeds: [0]\nside_inputs: false\n"
              "bem:\n  rank: 4\n  sites: [o_proj, down_proj]\n  controller: static\n"
              "training:\n  steps: 2\n  batch_size: 2\n  lr: 0.01\n  warmup_steps: 1\n  checkpoint_every: 2\n"
              "  max_length: 48\n  train_items: 8\nevaluation:\n  items: 4\n  batch_size: 4\n")
    (experiments / "tiny_a.yaml").write_text(common + "anchor: null\n")
    (experiments / "tiny_b.yaml").write_text(common.replace("lr: 0.01", "lr: 0.02") + "anchor: tiny_a\n")
    return root


@pytest.fixture
def env(tiny, tmp_path, monkeypatch):
    """A copy of the tiny data folder (tests may tamper with it) and the tiny experiments, for this test alone."""
    data = tmp_path / "data"
    shutil.copytree(tiny / "data", data)
    monkeypatch.setenv("BEM_DATA", str(data))
    return {"data": data, "experiments": tiny / "experiments", "out": tmp_path / "run"}


def _run(env, names=("tiny_a",)):
    from bem.experiments import runner

    return runner.run(list(names), env["out"], directory=env["experiments"])


# --- the results database --------------------------------------------------------------------------
def test_analyze_and_report_never_create_a_run_folder(tmp_path):
    from bem.experiments.analysis import analyze
    from bem.experiments.report import write_report

    missing = tmp_path / "typo"
    for call in (lambda: analyze(missing), lambda: write_report(missing)):
        with pytest.raises(DatabaseError, match=r"typo/results.sqlite: no results database \(the folder does not exist\)"):
            call()
    assert not missing.exists()
    missing.mkdir()
    with pytest.raises(DatabaseError, match="the folder holds no results.sqlite"):
        analyze(missing)
    assert list(missing.iterdir()) == []


def test_a_foreign_database_is_refused_and_left_untouched(tmp_path):
    from bem.experiments.analysis import analyze

    path = tmp_path / "results.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE invoices (id INTEGER, total REAL)")
    conn.commit()
    conn.close()
    before = _sha(path)
    with pytest.raises(DatabaseError, match=r"is not a BEM results database \(schema version 0, tables \['invoices'\]\)"):
        analyze(tmp_path)
    with pytest.raises(DatabaseError, match="BEM does not write into another program's database"):
        ResultsDB(path)
    assert _sha(path) == before
    path.write_bytes(b"these are not the droids " * 100)
    with pytest.raises(DatabaseError, match="is not an SQLite database"):
        analyze(tmp_path)
    conn = sqlite3.connect(path.with_name("newer.sqlite"))
    conn.execute("CREATE TABLE units (id)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseError, match=f"schema version {SCHEMA_VERSION + 1} was written by a newer BEM"):
        read_only_copy(path.with_name("newer.sqlite"))


def test_a_truncated_database_is_reported_as_damaged_with_its_path(tmp_path):
    from bem.experiments.analysis import analyze

    path = tmp_path / "results.sqlite"
    path.write_bytes(QUICK_DB.read_bytes()[: QUICK_DB.stat().st_size // 2])
    for call in (lambda: analyze(tmp_path), lambda: ResultsDB(path)):
        with pytest.raises(DatabaseError, match=r"results.sqlite: the results database is damaged \(truncated or corrupted"):
            call()


def _as_schema_1(path: Path) -> None:
    """Turn a copy of a stored database into what an older BEM wrote: units without a data build, no version."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE units_v1 (id INTEGER PRIMARY KEY, experiment TEXT, config_hash TEXT REFERENCES configs(hash),
            seed INTEGER, run_id INTEGER REFERENCES runs(id), finished REAL, train_seconds REAL, eval_seconds REAL,
            UNIQUE (experiment, config_hash, seed));
        INSERT INTO units_v1 SELECT id, experiment, config_hash, seed, run_id, finished, train_seconds, eval_seconds
            FROM units;
        DROP TABLE units;
        ALTER TABLE units_v1 RENAME TO units;
        DROP TABLE IF EXISTS leases;
        PRAGMA user_version = 0;""")
    conn.close()


def test_an_older_bem_database_is_read_through_a_copy_and_migrated_only_when_written(tmp_path):
    path = tmp_path / "results.sqlite"
    shutil.copy(QUICK_DB, path)
    _as_schema_1(path)
    before = _sha(path)
    conn = read_only_copy(path)
    assert conn.execute("SELECT COUNT(*), COUNT(data_fingerprint) FROM units").fetchone()[1] == 0
    conn.close()
    assert _sha(path) == before  # reading changed nothing
    units = sqlite3.connect(path).execute("SELECT id, experiment, config_hash, seed FROM units ORDER BY id").fetchall()
    db = ResultsDB(path)  # opened for writing: brought up to schema 2, every unit kept with its id
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.conn.execute("SELECT id, experiment, config_hash, seed FROM units ORDER BY id").fetchall() == units
    db.close()


def test_a_read_only_database_is_analysed_without_being_written(tmp_path, monkeypatch):
    """An archived run folder: analysis and the report (written elsewhere) work, the database stays byte-equal."""
    from bem.experiments import results
    from bem.experiments.analysis import analyze
    from bem.experiments.report import write_report

    run = tmp_path / "archived"
    run.mkdir()
    shutil.copy(QUICK_DB, run / "results.sqlite")
    before = _sha(run / "results.sqlite")
    (run / "results.sqlite").chmod(0o444)
    run.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root writes through file modes: make BEM see them as a user would
            monkeypatch.setattr(results, "writable", lambda path: False)
        result = analyze(run, n_resamples=200)
        assert result["verdicts_stored"] is False and result["verdicts"]
        with pytest.raises(BEMError, match="is read-only; the report"):
            if os.geteuid() == 0:
                monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run)
            write_report(run, n_resamples=200)
        monkeypatch.undo()
        if os.geteuid() == 0:
            monkeypatch.setattr(results, "writable", lambda path: False)
        report = write_report(run, n_resamples=200, to=tmp_path / "elsewhere")
        assert report == tmp_path / "elsewhere" / "report.md" and "## Verdicts" in report.read_text()
    finally:
        run.chmod(0o755)
    assert _sha(run / "results.sqlite") == before


def test_database_errors_name_the_file(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    ResultsDB(path).close()
    other = sqlite3.connect(path)
    other.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    monkeypatch.setattr(ResultsDB, "timeout", 0.1)
    try:
        with pytest.raises(DatabaseError, match=r"results.sqlite: the database stayed locked by another process"):
            ResultsDB(path).start_run("bem run", False)
    finally:
        other.rollback()
        other.close()


def test_a_unit_held_by_a_live_process_is_left_to_it_and_a_dead_ones_lease_is_taken_over(env):
    from bem.experiments.adapters import unit_data
    from bem.experiments.config import load_experiment

    config = load_experiment("tiny_a", env["experiments"])
    key = ("tiny_a", config.config_hash(), 0, unit_data(config))
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        db = ResultsDB(env["out"] / "results.sqlite")
        db.conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key[0], key[1], key[3], key[2], holder.pid, __import__("socket").gethostname(), 0.0))
        db.conn.commit()
        status = _run(env)
        assert status[0][:2] == ("tiny_a", 0) and status[0][2].startswith(f"busy: process {holder.pid} on ")
        assert db.conn.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 0  # not trained twice
    finally:
        holder.kill()
        holder.wait()
    assert _run(env) == [("tiny_a", 0, "done")]  # the holder is gone: its lease is taken over
    assert db.conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0  # released after the unit
    db.close()


def test_two_runs_on_one_folder_never_train_a_unit_twice(env):
    """Two `bem run`s started together on one folder: one trains each unit, the other leaves it ('busy') or finds it
    finished ('skipped'); both end cleanly and the database holds each unit once."""
    code = ("import sys; from pathlib import Path; from bem.experiments import runner; "
            "print(runner.run(['tiny_a', 'tiny_b'], Path(sys.argv[1]), directory=Path(sys.argv[2])))")
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(env["out"]), str(env["experiments"])], env=full,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    statuses = [s for out, _ in outputs for (_, _, s) in eval(out.strip().splitlines()[-1])]  # noqa: S307
    assert statuses.count("done") == 2 and all(s == "skipped" or s.startswith("busy: ") for s in statuses if s != "done")
    conn = sqlite3.connect(env["out"] / "results.sqlite")
    assert conn.execute("SELECT experiment, COUNT(*) FROM units GROUP BY experiment").fetchall() == [("tiny_a", 1),
                                                                                                    ("tiny_b", 1)]
    assert conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0


# --- data identity ---------------------------------------------------------------------------------
def _rebuild(data: Path, task: str = "wordnet_define") -> None:
    """Stand-in for a rebuilt suite: the task's files change (one test item dropped) and so does its fingerprint."""
    manifest = json.loads((data / "manifest.json").read_text())
    entry = manifest["tasks"][task]
    test = data / task / "test.jsonl"
    test.write_text("".join(test.read_text().splitlines(keepends=True)[1:]))
    entry["files"][f"{task}/test.jsonl"] = _sha(test)
    entry["fingerprint"] = "0" * 16
    entry["counts"]["test"] -= 1
    (data / "manifest.json").write_text(json.dumps(manifest))


def test_a_rebuilt_suite_starts_new_units_and_they_are_never_pooled(env):
    from bem.experiments.analysis import analyze

    assert _run(env, ["tiny_a", "tiny_b"]) == [("tiny_a", 0, "done"), ("tiny_b", 0, "done")]
    manifest = env["data"] / "manifest.json"
    manifest_bytes = manifest.read_bytes()
    assert _run(env, ["tiny_a", "tiny_b"]) == [("tiny_a", 0, "skipped"), ("tiny_b", 0, "skipped")]
    assert manifest.read_bytes() == manifest_bytes  # nothing rewrites the manifest during a run
    _rebuild(env["data"])
    assert _run(env, ["tiny_a"]) == [("tiny_a", 0, "done")]  # same config, new data build: a new unit
    conn = sqlite3.connect(env["out"] / "results.sqlite")
    builds = conn.execute("SELECT experiment, data_fingerprint FROM units ORDER BY id").fetchall()
    assert len(builds) == 3 and json.loads(builds[2][1]) == {"wordnet_define": "0" * 16} != json.loads(builds[0][1])
    result = analyze(env["out"], n_resamples=200)
    assert result["comparisons"] == []  # tiny_a's latest units and tiny_b's were scored on different data
    (verdict,) = result["verdicts"]
    assert verdict["verdict"] == "no verdict" and "different data builds" in verdict["reasons"][0]
    assert result["units"]["tiny_a"]["data"] == {"wordnet_define": "0" * 16}


def test_a_tampered_split_is_refused_by_run_and_eval(env):
    from bem.evaluate import zero_shot

    test = env["data"] / "wordnet_define" / "test.jsonl"
    test.write_text(test.read_text().replace('"target": "', '"target": "tampered ', 1))
    with pytest.raises(DataError, match="test.jsonl does not match its sha256 in .*manifest.json"):
        _run(env)
    with pytest.raises(DataError, match="test.jsonl does not match its sha256"):
        zero_shot("smollm2-135m", ["wordnet_define"], 4, env["out"] / "zero_shot")
    assert not (env["out"] / "zero_shot").exists()


def test_more_evaluation_items_than_the_split_holds_is_an_error(env, tmp_path):
    experiments = tmp_path / "experiments"
    shutil.copytree(env["experiments"], experiments)
    path = experiments / "tiny_a.yaml"
    path.write_text(path.read_text().replace("items: 4", "items: 90000"))
    with pytest.raises(ConfigError, match=r"tiny_a.yaml: evaluation.items = 90000 is not allowed for task "
                                          r"wordnet_define: its test split holds \d+ items"):
        _run({**env, "experiments": experiments})


def test_prepare_does_not_rewrite_an_up_to_date_manifest(env):
    from bem.data.prepare import prepare

    manifest = env["data"] / "manifest.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    assert prepare(["wordnet_define"], env["data"])["tasks"]["wordnet_define"]["status"] == "up to date"
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before


# --- the CLI ---------------------------------------------------------------------------------------
def test_cli_errors_are_one_line_with_a_hint_and_debug_shows_the_traceback(tmp_path):
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    (experiments / "bad.yaml").write_text("training:\n  lr: .nan\n")
    rc, out, err = _bem("list", env={"BEM_EXPERIMENTS": str(experiments)})
    assert rc == 2 and "Traceback" not in err and err.startswith("error: ") and "bad.yaml" in err
    assert "training.lr" in err and len(err.strip().splitlines()) <= 2
    rc, _, err = _bem("--debug", "list", env={"BEM_EXPERIMENTS": str(experiments)})
    assert rc != 0 and "Traceback" in err and "ConfigError" in err
    rc, _, err = _bem("analyze", str(tmp_path / "no_such_run"))
    assert rc == 2 and err.startswith("error: ") and "hint: " in err and not (tmp_path / "no_such_run").exists()
    from bem.experiments.config import list_presets

    rc, _, err = _bem("run", "--preset", "nosuch", "--out", str(tmp_path / "r"))
    assert rc == 2 and f"--preset 'nosuch' is not allowed; expected one of {list_presets()}" in err
    assert not (tmp_path / "r").exists()
    rc, _, err = _bem("run", "--experiments", "_defaults", "--out", str(tmp_path / "r"))
    assert rc == 2 and "_defaults" in err and "Traceback" not in err and not (tmp_path / "r").exists()
    rc, _, err = _bem("run", "--seeds", "0")
    assert rc == 2 and "--seeds: invalid _positive value" not in err and "expected an integer >= 1" in err


def test_an_unexpected_error_is_reported_as_a_bug(monkeypatch, capsys):
    from bem import cli

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: KeyError: 'oops'") and "report it" in err and "--debug" in err
    with pytest.raises(KeyError):
        cli.main(["--debug", "list"])


def test_units_of_an_older_bem_get_a_data_build_only_when_todays_data_reproduces_their_scores(env):
    import runpy

    stamp = runpy.run_path(str(REPO / "scripts/stamp_data_build.py"))["main"]
    assert _run(env, ["tiny_a", "tiny_b"]) == [("tiny_a", 0, "done"), ("tiny_b", 0, "done")]
    conn = sqlite3.connect(env["out"] / "results.sqlite")
    build = conn.execute("SELECT data_fingerprint FROM units WHERE experiment='tiny_a'").fetchone()[0]
    with conn:  # as stored by an older BEM: no data build; and one stored score of tiny_b differs from today's data
        conn.execute("UPDATE units SET data_fingerprint=NULL")
        conn.execute("UPDATE item_scores SET value=value+0.5 WHERE rowid=(SELECT MIN(s.rowid) FROM item_scores s "
                     "JOIN units u ON u.id=s.unit_id WHERE u.experiment='tiny_b')")
    assert stamp([str(env["out"])]) == 1  # one unit left without a build
    assert conn.execute("SELECT experiment, data_fingerprint FROM units ORDER BY experiment").fetchall() == [
        ("tiny_a", build), ("tiny_b", None)]
    assert _run(env, ["tiny_a"]) == [("tiny_a", 0, "skipped")]  # stamped: matched again, not retrained


def test_gates_alpha_is_the_level_the_verdicts_use(tmp_path):
    from bem.experiments.analysis import analyze

    shutil.copy(QUICK_DB, tmp_path / "results.sqlite")
    conn = sqlite3.connect(tmp_path / "results.sqlite")
    with conn:
        for config_hash, text in conn.execute("SELECT hash, json FROM configs").fetchall():
            config = json.loads(text)
            config["gates"]["alpha"] = 0.5
            conn.execute("UPDATE configs SET json=? WHERE hash=?", (json.dumps(config), config_hash))
    reasons = [r for v in analyze(tmp_path, n_resamples=200)["verdicts"] for r in v["reasons"]]
    assert any("is not < 0.5 (gates.alpha)" in r for r in reasons)
    assert not any("is not < 0.05" in r for r in reasons)


def test_the_wall_clock_ends_at_a_runs_last_committed_work_conditions_included(tmp_path, monkeypatch):
    """Work committed after a run's last unit (index-swap or knob conditions) counts in its wall clock; a database
    of an earlier BEM (no run_marks) still reads, ending at its units."""
    import bem.experiments.results as results
    from bem.experiments.results import wall_clock

    clock = iter([100.0, 160.0, 400.0, 1000.0])
    monkeypatch.setattr(results.time, "time", lambda: next(clock))
    db = ResultsDB(tmp_path / "results.sqlite")
    run = db.start_run("bem run", False)  # t = 100
    row = {"task": "wordnet_qa", "id": "a", "prediction": "x", "scores": {"f1": 1.0}}
    unit = db.write_unit(run, "e", "h", {}, 0, [row], [], [], 1.0, 1.0)  # unit at 160, its mark at 400
    db.write_condition(unit, "knob=0", [row])  # at 1000: after the last unit
    assert wall_clock(db.conn) == [(run, 900.0, 1)]
    db.conn.execute("DROP TABLE run_marks")  # as an older BEM wrote it
    assert wall_clock(db.conn) == [(run, 60.0, 1)]
    db.close()
