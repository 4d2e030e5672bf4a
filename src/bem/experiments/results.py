"""The results database: SQLite in the run folder.

One finished (experiment, config hash, data build, seed) unit is written in one transaction, so a killed run
leaves either a whole unit or none; a changed config has another hash and a rebuilt task suite another data
build, and either is a new unit. The file carries BEM's schema version (`PRAGMA user_version`): a file without it
and without BEM's tables is someone else's and is never written to; a database of an older BEM (schema 1, no
version stamp) is brought up to date when opened for writing and read through an in-memory copy otherwise.
Reading (`bem analyze`, `bem report`) never creates a file or changes one it cannot write.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

from bem.errors import DatabaseError

SCHEMA_VERSION = 2  # 1: no version stamp, units without a data build; 2: units.data_fingerprint, leases

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, command TEXT, quick INTEGER);
CREATE TABLE IF NOT EXISTS configs (hash TEXT PRIMARY KEY, experiment TEXT, json TEXT);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY, experiment TEXT, config_hash TEXT REFERENCES configs(hash), seed INTEGER,
    run_id INTEGER REFERENCES runs(id), finished REAL, train_seconds REAL, eval_seconds REAL,
    data_fingerprint TEXT,  -- {task: fingerprint} of the data build it was trained and scored on (NULL: schema 1)
    UNIQUE (experiment, config_hash, data_fingerprint, seed));
CREATE TABLE IF NOT EXISTS item_scores (
    unit_id INTEGER REFERENCES units(id), task TEXT, item_id TEXT, metric TEXT, value REAL, prediction TEXT);
CREATE INDEX IF NOT EXISTS item_scores_by_unit ON item_scores(unit_id, task, metric);
CREATE TABLE IF NOT EXISTS item_meta (task TEXT, item_id TEXT, key TEXT, value REAL, UNIQUE (task, item_id, key));
CREATE TABLE IF NOT EXISTS item_refs (task TEXT, item_id TEXT, reference TEXT, UNIQUE (task, item_id));
CREATE TABLE IF NOT EXISTS metrics (unit_id INTEGER REFERENCES units(id), task TEXT, metric TEXT, value REAL);
CREATE TABLE IF NOT EXISTS curves (unit_id INTEGER REFERENCES units(id), step INTEGER, loss REAL, lr REAL, grad_norm REAL);
CREATE TABLE IF NOT EXISTS profiles (experiment TEXT, config_hash TEXT, metric TEXT, value REAL, device TEXT);
CREATE TABLE IF NOT EXISTS profile_units (experiment TEXT, config_hash TEXT, device TEXT, status TEXT, seed INTEGER,
    kv_denominator INTEGER, UNIQUE (experiment, config_hash, device));
CREATE TABLE IF NOT EXISTS profile_ratios (experiment TEXT, config_hash TEXT, versus TEXT, metric TEXT, ratio REAL,
    device TEXT);
CREATE TABLE IF NOT EXISTS verdicts (experiment TEXT, config_hash TEXT, versus TEXT, verdict TEXT, reasons TEXT, json TEXT);
-- index swap (SPEC §6): per-item scores of a unit under a swapped index; clean scores stay in item_scores
CREATE TABLE IF NOT EXISTS condition_scores (
    unit_id INTEGER REFERENCES units(id), condition TEXT, task TEXT, item_id TEXT, metric TEXT, value REAL,
    prediction TEXT);
CREATE INDEX IF NOT EXISTS condition_scores_by_unit ON condition_scores(unit_id, condition, task, metric);
-- is routing alive: per routed unit and task, bem.routing_stats.measure_routing's {site: {stat: value}}
CREATE TABLE IF NOT EXISTS routing (unit_id INTEGER REFERENCES units(id), task TEXT, site TEXT, stat TEXT, value REAL);
-- a unit being trained: the process holding it; a second process skips the unit instead of training it twice
-- the router's training curves (AR0's epochs, AR1's updates): one row per (step, metric)
CREATE TABLE IF NOT EXISTS router_curves (unit_id INTEGER REFERENCES units(id), step INTEGER, metric TEXT, value REAL);
CREATE TABLE IF NOT EXISTS online_items (stream TEXT, system TEXT, idx INTEGER, phase TEXT, task TEXT, item_id TEXT,
    version INTEGER, score REAL, observed REAL, prediction TEXT, UNIQUE (stream, system, idx));
CREATE TABLE IF NOT EXISTS online_events (stream TEXT, system TEXT, idx INTEGER, kind TEXT, json TEXT);
CREATE TABLE IF NOT EXISTS online_steps (stream TEXT, system TEXT, offset INTEGER, UNIQUE (stream, system, offset));
-- the time of a run's last committed work of any kind (a unit, an index-swap or knob condition, routing statistics):
-- the end of its wall clock, which units.finished alone misses for work done after the last unit
CREATE TABLE IF NOT EXISTS run_marks (run_id INTEGER PRIMARY KEY REFERENCES runs(id), last REAL);
CREATE TABLE IF NOT EXISTS leases (experiment TEXT, config_hash TEXT, data_fingerprint TEXT, seed INTEGER, pid INTEGER,
    host TEXT, started REAL, PRIMARY KEY (experiment, config_hash, data_fingerprint, seed));
"""
BEM_TABLES = {"runs", "configs", "units", "item_scores", "metrics", "curves"}  # every BEM database has these


class _Connection(sqlite3.Connection):
    """A connection whose errors name the database file and say what to do (sqlite3's name neither)."""

    path: Path = Path("?")

    def _named(self, err: sqlite3.Error) -> DatabaseError:
        text = str(err)
        if "locked" in text or "busy" in text:
            return DatabaseError(f"{self.path}: the database stayed locked by another process ({text})",
                                 hint="another `bem` command is writing this run folder; wait for it or stop it")
        if "disk is full" in text or "disk I/O" in text:
            return DatabaseError(f"{self.path}: cannot write the database ({text})",
                                 hint="free some space and run the same command again; finished units are stored")
        if "readonly" in text:
            return DatabaseError(f"{self.path}: the database is read-only ({text})",
                                 hint="`bem analyze` and `bem report --to DIR` read a read-only database")
        if "malformed" in text or "not a database" in text:
            return _damaged(self.path, err)
        return DatabaseError(f"{self.path}: {text}")

    def execute(self, *args):
        try:
            return super().execute(*args)
        except sqlite3.Error as err:
            raise self._named(err) from err

    def executemany(self, *args):
        try:
            return super().executemany(*args)
        except sqlite3.Error as err:
            raise self._named(err) from err

    def executescript(self, *args):
        try:
            return super().executescript(*args)
        except sqlite3.Error as err:
            raise self._named(err) from err

    def commit(self):
        try:
            return super().commit()
        except sqlite3.Error as err:
            raise self._named(err) from err


def _damaged(path: Path, err: Exception) -> DatabaseError:
    size = path.stat().st_size if path.exists() else 0
    return DatabaseError(f"{path}: the results database is damaged (truncated or corrupted; {size:,} bytes on disk): "
                         f"SQLite says '{err}'",
                         hint="restore it from a copy; finished adapters in the run folder's adapters/ are intact and "
                              "`bem run` retrains only what the database no longer holds")


def _inspect(conn: sqlite3.Connection, path: Path) -> str:
    """'empty', 'legacy' (schema 1) or 'current'; raises DatabaseError for a file that is not an intact BEM database."""
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        page_size, pages = (conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("page_size", "page_count"))
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    except (sqlite3.DatabaseError, DatabaseError) as err:
        if "not a database" in str(err):
            raise DatabaseError(f"{path} is not an SQLite database, so not a BEM results database",
                                hint="point the command at a run folder written by `bem run`") from None
        raise (err if isinstance(err, DatabaseError) else _damaged(path, err)) from None
    if check != "ok" or path.stat().st_size < page_size * pages:
        raise _damaged(path, RuntimeError(check if check != "ok" else f"{pages} pages of {page_size} bytes expected"))
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"{path}: schema version {version} was written by a newer BEM; this one reads up to "
                            f"{SCHEMA_VERSION}", hint="upgrade BEM")
    if version == SCHEMA_VERSION and BEM_TABLES <= tables:
        return "current"
    if version == 0 and not tables:
        return "empty"
    if version == 0 and BEM_TABLES <= tables:
        return "legacy"
    raise DatabaseError(f"{path} is not a BEM results database (schema version {version}, tables "
                        f"{sorted(tables)[:6]}); BEM does not write into another program's database",
                        hint="give `bem` a run folder written by `bem run`, or a new folder")


def _migrate(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: units get a data build (NULL: unknown, never pooled with units of a known build) in their
    identity, and the leases table is added."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(units)")}
    with conn:
        if "data_fingerprint" not in columns:  # SQLite's way to change a constraint: new table, copy, drop, rename
            ddl = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS units ("):]
            ddl = ddl[:ddl.index(";") + 1].replace("EXISTS units (", "EXISTS units_v2 (")
            conn.execute(ddl)
            old = "id, experiment, config_hash, seed, run_id, finished, train_seconds, eval_seconds"
            conn.execute(f"INSERT INTO units_v2 ({old}) SELECT {old} FROM units")
            conn.execute("DROP TABLE units")
            conn.execute("ALTER TABLE units_v2 RENAME TO units")
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.commit()


def writable(path: Path) -> bool:
    """Whether SQLite can write `path` (the file and, for its journal, its folder)."""
    path = Path(path)
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def read_only_copy(path: Path) -> sqlite3.Connection:
    """An in-memory copy of an existing BEM database, brought up to the current schema: reading never writes the
    file, works on read-only and archived databases, and refuses files that are not intact BEM databases."""
    path = Path(path)
    if not path.is_file():
        folder = path.parent
        where = "the folder does not exist" if not folder.is_dir() else "the folder holds no results.sqlite"
        raise DatabaseError(f"{path}: no results database ({where})",
                            hint=f"`bem run --out {folder}` writes one; check the folder name")
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise DatabaseError(f"{path}: cannot open the results database: {err}") from None
    try:
        state = _inspect(source, path)
        if state == "empty":
            raise DatabaseError(f"{path}: the results database is empty (no unit was ever written)",
                                hint=f"run `bem run --out {path.parent}` first")
        copy = sqlite3.connect(":memory:")
        try:
            source.backup(copy)
        except sqlite3.DatabaseError as err:
            raise _damaged(path, err) from None
    finally:
        source.close()
    if state == "legacy":
        _migrate(copy)
    return copy


def open_for_analysis(path: Path) -> sqlite3.Connection:
    """`read_only_copy` in which `units` shows, per experiment, only the units of its latest (config hash, data
    build): what the analysis and the report compare. Older configs and other data builds stay in `main.units`
    (the report lists them) and are never pooled with the latest."""
    conn = read_only_copy(path)
    conn.execute("CREATE TEMP VIEW units AS SELECT u.* FROM main.units u JOIN (SELECT experiment, config_hash, "
                 "data_fingerprint FROM main.units GROUP BY experiment HAVING finished = MAX(finished)) l "
                 "ON l.experiment = u.experiment AND l.config_hash = u.config_hash "
                 "AND l.data_fingerprint IS u.data_fingerprint")
    return conn


def data_key(fingerprints: dict[str, str]) -> str:
    """The stored form of a unit's data build: {task: fingerprint} as sorted JSON."""
    return json.dumps(fingerprints, sort_keys=True)


class ResultsDB:
    """The run folder's database, opened for writing (created when `create` and missing)."""

    timeout = 60.0  # seconds a write waits for another process's transaction

    def __init__(self, path: Path, create: bool = True):
        self.path = Path(path)
        self.run_id: int | None = None  # set by start_run: whose work _mark records
        if not self.path.is_file():
            if not create:
                raise DatabaseError(f"{self.path}: no results database here",
                                    hint=f"`bem run --out {self.path.parent}` writes one; check the folder name")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DatabaseError(f"{self.path.parent}: cannot create the run folder: {err.strerror}") from None
        elif not writable(self.path):
            raise DatabaseError(f"{self.path} is read-only; this command writes results into it",
                                hint="`bem analyze` and `bem report --to DIR` read a read-only database")
        try:
            self.conn = sqlite3.connect(self.path, timeout=self.timeout, factory=_Connection)
            self.conn.path = self.path
            state = _inspect(self.conn, self.path)
            if state == "legacy":
                _migrate(self.conn)
            else:
                self.conn.executescript(SCHEMA)
                if state == "empty":
                    self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as err:
            raise DatabaseError(f"{self.path}: cannot open the results database for writing: {err}") from None

    def close(self) -> None:
        self.conn.close()

    def start_run(self, command: str, quick: bool) -> int:
        """A new `bem run` invocation; the work this connection commits afterwards is marked as its (run_marks)."""
        with self.conn:
            self.run_id = self.conn.execute("INSERT INTO runs (started, command, quick) VALUES (?, ?, ?)",
                                            (time.time(), command, int(quick))).lastrowid
        return self.run_id

    def _mark(self) -> None:
        """Inside a write's transaction: the current run (if any) committed work now."""
        if self.run_id is not None:
            self.conn.execute("INSERT OR REPLACE INTO run_marks VALUES (?, ?)", (self.run_id, time.time()))

    def finished(self, experiment: str, config_hash: str, seed: int, data: str | None) -> bool:
        return self.unit_id(experiment, config_hash, seed, data) is not None

    # --- leases: one process per unit ---------------------------------------------------------------
    def claim(self, experiment: str, config_hash: str, seed: int, data: str | None, finished_ok: bool = False) -> str | None:
        """Take the unit for this process; None when taken, else who holds it ('finished' when it is done and
        `finished_ok` is not set: a backfill of a finished unit sets it). A lease of a process that is gone (same
        host, pid not running) is taken over."""
        key = (experiment, config_hash, data, seed)
        self.conn.execute("BEGIN IMMEDIATE")  # one claimer at a time; others wait (timeout 60 s)
        try:
            if not finished_ok and self.unit_id(experiment, config_hash, seed, data) is not None:
                self.conn.rollback()
                return "finished"
            row = self.conn.execute("SELECT pid, host, started FROM leases WHERE experiment=? AND config_hash=? AND "
                                    "data_fingerprint IS ? AND seed=?", key).fetchone()
            if row is not None and _alive(row[0], row[1]):
                self.conn.rollback()
                return f"process {row[0]} on {row[1]}, since {time.strftime('%H:%M:%S', time.localtime(row[2]))}"
            self.conn.execute("DELETE FROM leases WHERE experiment=? AND config_hash=? AND data_fingerprint IS ? "
                              "AND seed=?", key)
            self.conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?, ?, ?, ?)",
                              (*key, os.getpid(), socket.gethostname(), time.time()))
            self.conn.commit()
            return None
        except BaseException:
            self.conn.rollback()
            raise

    def release(self, experiment: str, config_hash: str, seed: int, data: str | None) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM leases WHERE experiment=? AND config_hash=? AND data_fingerprint IS ? AND "
                              "seed=? AND pid=?", (experiment, config_hash, data, seed, os.getpid()))

    def write_unit(self, run_id: int, experiment: str, config_hash: str, config_json: dict, seed: int,
                   rows: list[dict], summaries: list[dict], curve: list[dict], train_seconds: float,
                   eval_seconds: float, data: str | None = None) -> int:
        """Everything of one finished unit, in one transaction."""
        if self.unit_id(experiment, config_hash, seed, data) is not None:
            raise DatabaseError(f"{self.path}: unit {experiment} {config_hash} seed {seed} is already stored "
                                "(another process finished it); the new scores are not written")
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO configs (hash, experiment, json) VALUES (?, ?, ?)",
                              (config_hash, experiment, json.dumps(config_json, sort_keys=True)))
            unit = self.conn.execute(
                "INSERT INTO units (experiment, config_hash, seed, run_id, finished, train_seconds, eval_seconds, "
                "data_fingerprint) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment, config_hash, seed, run_id, time.time(), train_seconds, eval_seconds, data)).lastrowid
            self.conn.executemany(
                "INSERT INTO item_scores VALUES (?, ?, ?, ?, ?, ?)",
                [(unit, r["task"], r["id"], metric, value, r["prediction"]) for r in rows for metric, value in r["scores"].items()])
            self.conn.executemany(
                "INSERT OR IGNORE INTO item_meta VALUES (?, ?, ?, ?)",
                [(r["task"], r["id"], k, v) for r in rows for k, v in r.get("meta", {}).items()])
            self.conn.executemany(
                "INSERT OR IGNORE INTO item_refs VALUES (?, ?, ?)",
                [(r["task"], r["id"], r["reference"]) for r in rows if r.get("reference")])
            self.conn.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?)",
                [(unit, s["task"], name, value) for s in summaries
                 for name, value in {**s["means"], **s["corpus"], **({} if s.get("seconds") is None else
                                                                      {"seconds_per_item": s["seconds"] / s["n"]})}.items()])
            self.conn.executemany("INSERT INTO curves VALUES (?, ?, ?, ?, ?)",
                                  [(unit, c["step"], c["loss"], c["lr"], c["grad_norm"]) for c in curve])
            self._mark()
        return unit

    def write_router_curve(self, unit_id: int, rows: list[dict]) -> None:
        with self.conn:
            self.conn.executemany("INSERT INTO router_curves VALUES (?, ?, ?, ?)",
                                  [(unit_id, r["step"], r["metric"], r["value"]) for r in rows])

    def item_scores(self, experiment: str, task: str, metric: str, config_hash: str | None = None) -> dict[int, dict[str, float]]:
        """{seed: {item_id: value}} of the finished units of an experiment (latest config unless given)."""
        config_hash = config_hash or self.latest_hash(experiment)
        out: dict[int, dict[str, float]] = {}
        for seed, item, value in self.conn.execute(
                "SELECT u.seed, s.item_id, s.value FROM item_scores s JOIN units u ON u.id = s.unit_id "
                "WHERE u.experiment=? AND u.config_hash=? AND s.task=? AND s.metric=?",
                (experiment, config_hash, task, metric)):
            out.setdefault(seed, {})[item] = value
        return out

    def finished_seeds(self, experiment: str, config_hash: str, data: str | None) -> list[int]:
        return [s for (s,) in self.conn.execute("SELECT seed FROM units WHERE experiment=? AND config_hash=? AND "
                                                "data_fingerprint IS ? ORDER BY seed", (experiment, config_hash, data))]

    def write_profiles(self, profiles) -> None:
        """Each profile's metrics and what was profiled (trained unit and its seed, untrained modules, or the base)."""
        with self.conn:
            for p in profiles:
                self.conn.execute("INSERT OR REPLACE INTO profile_units VALUES (?, ?, ?, ?, ?, ?)",
                                  (p.name, p.config_hash, p.device, p.status, p.seed, p.kv_denominator))
                self.conn.execute("DELETE FROM profiles WHERE experiment=? AND config_hash=? AND device=?",
                                  (p.name, p.config_hash, p.device))
                self.conn.executemany("INSERT INTO profiles VALUES (?, ?, ?, ?, ?)",
                                      [(p.name, p.config_hash, metric, getattr(p, metric), p.device)
                                       for metric in ("prefill_p50_ms", "prefill_p95_ms", "decode_p50_ms",
                                                      "decode_p95_ms", "peak_memory_mb", "kv_hit_rate")])

    def write_profile_ratios(self, rows: list[tuple]) -> None:
        """Rows (experiment, config_hash, versus, metric, ratio, device), measured in one process."""
        with self.conn:
            for experiment, config_hash, versus, _, _, device in {r[:3] + (None, None, r[5]) for r in rows}:
                self.conn.execute("DELETE FROM profile_ratios WHERE experiment=? AND config_hash=? AND versus=? "
                                  "AND device=?", (experiment, config_hash, versus, device))
            self.conn.executemany("INSERT INTO profile_ratios VALUES (?, ?, ?, ?, ?, ?)", rows)

    def profile(self, experiment: str, config_hash: str) -> dict[str, float]:
        return dict(self.conn.execute("SELECT metric, value FROM profiles WHERE experiment=? AND config_hash=?",
                                      (experiment, config_hash)).fetchall())

    def latest_hash(self, experiment: str) -> str | None:
        row = self.conn.execute("SELECT config_hash FROM units WHERE experiment=? ORDER BY finished DESC LIMIT 1",
                                (experiment,)).fetchone()
        return row[0] if row else None

    # --- index swap (SPEC §6) ------------------------------------------------------------------
    def unit_id(self, experiment: str, config_hash: str, seed: int, data: str | None) -> int | None:
        row = self.conn.execute("SELECT id FROM units WHERE experiment=? AND config_hash=? AND seed=? AND "
                                "data_fingerprint IS ?", (experiment, config_hash, seed, data)).fetchone()
        return row[0] if row else None

    def conditions_done(self, unit_id: int, task: str) -> set[str]:
        """The index-swap conditions of a unit's task that are stored (each is written whole or not at all)."""
        return {c for (c,) in self.conn.execute("SELECT DISTINCT condition FROM condition_scores WHERE unit_id=? "
                                                "AND task=?", (unit_id, task))}

    def write_condition(self, unit_id: int, condition: str, rows: list[dict]) -> None:
        """One unit's per-item scores under one condition, in one transaction (replacing any earlier ones)."""
        if not self.conn.execute("SELECT 1 FROM units WHERE id=?", (unit_id,)).fetchone():
            raise ValueError(f"unit id {unit_id} is not in {self.path}; conditions belong to a finished unit")
        with self.conn:
            for task in {r["task"] for r in rows}:
                self.conn.execute("DELETE FROM condition_scores WHERE unit_id=? AND condition=? AND task=?",
                                  (unit_id, condition, task))
            self.conn.executemany(
                "INSERT INTO condition_scores VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(unit_id, condition, r["task"], r["id"], metric, value, r["prediction"])
                 for r in rows for metric, value in r["scores"].items()])
            self._mark()

    # --- is routing alive (bem.routing_stats) ----------------------------------------------------
    def write_routing(self, unit_id: int, task: str, stats: dict[str, dict[str, float]]) -> None:
        """A unit's routing statistics on one task ({site: {stat: value}}), replacing earlier ones, in one transaction."""
        if not self.conn.execute("SELECT 1 FROM units WHERE id=?", (unit_id,)).fetchone():
            raise ValueError(f"unit id {unit_id} is not in {self.path}; routing statistics belong to a finished unit")
        with self.conn:
            self.conn.execute("DELETE FROM routing WHERE unit_id=? AND task=?", (unit_id, task))
            self.conn.executemany("INSERT INTO routing VALUES (?, ?, ?, ?, ?)",
                                  [(unit_id, task, site, stat, float(value))
                                   for site, values in stats.items() for stat, value in values.items()])
            self._mark()

    def predictions(self, unit_id: int, task: str, metric: str) -> list[dict]:
        """[{"id", "prediction"}] of a unit's clean evaluation on a task (one row per item, in stored order)."""
        return [{"id": i, "prediction": p} for i, p in self.conn.execute(
            "SELECT item_id, prediction FROM item_scores WHERE unit_id=? AND task=? AND metric=? ORDER BY rowid",
            (unit_id, task, metric))]

    def routing(self, unit_id: int) -> dict[str, dict[str, dict[str, float]]]:
        """{task: {site: {stat: value}}} of a unit, as written by write_routing."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for task, site, stat, value in self.conn.execute(
                "SELECT task, site, stat, value FROM routing WHERE unit_id=? ORDER BY rowid", (unit_id,)):
            out.setdefault(task, {}).setdefault(site, {})[stat] = value
        return out


def _alive(pid: int, host: str) -> bool:
    """Whether the process holding a lease still runs (another host's process is assumed to)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False  # this process's own lease, left by a unit that failed: take it again
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wall_clock(conn) -> list[tuple[int, float, int]]:
    """(run id, seconds from the run's start to its last committed work, units committed) for every `bem run` of the
    folder that committed something: the wall clock of the whole job. The last work is the later of its last unit
    and its last mark (run_marks: conditions, routing statistics); a database written before run_marks existed has
    units only, so work after a run's last unit is missed there."""
    marks = conn.execute("SELECT 1 FROM sqlite_master WHERE name='run_marks'").fetchone() is not None
    units = {run: (last, n) for run, last, n in conn.execute(
        "SELECT run_id, MAX(finished), COUNT(id) FROM units GROUP BY run_id")}
    last_mark = dict(conn.execute("SELECT run_id, last FROM run_marks")) if marks else {}
    out = []
    for run, started in conn.execute("SELECT id, started FROM runs ORDER BY id"):
        last_unit, n = units.get(run, (None, 0))
        ends = [t for t in (last_unit, last_mark.get(run)) if t is not None]
        if ends:
            out.append((run, max(ends) - started, n))
    return out


def wall_clock_lines(wall: list[tuple[int, float, int]], command: str = "bem run") -> list[str]:
    """The report's sentence on the job's wall clock (see wall_clock); none for a folder without runs."""
    if not wall:
        return []
    total = sum(seconds for _, seconds, _ in wall)
    return ["", f"Wall clock of the job: {total / 60:.0f} min over {len(wall)} `{command}` invocation(s) (each from its "
            "start to its last committed work, on the machine that ran it; time lost to a killed run is not "
            "included): " + "; ".join(f"run {run}: {seconds / 60:.0f} min, {n} units" for run, seconds, n in wall) + "."]
