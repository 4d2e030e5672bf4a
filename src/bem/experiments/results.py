"""The results database: SQLite in the run folder.

One finished (experiment, config hash, seed) unit is written in one transaction, so a killed run
leaves either a whole unit or none; a changed config has another hash and is a new unit.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, started REAL, command TEXT, quick INTEGER);
CREATE TABLE IF NOT EXISTS configs (hash TEXT PRIMARY KEY, experiment TEXT, json TEXT);
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY, experiment TEXT, config_hash TEXT REFERENCES configs(hash), seed INTEGER,
    run_id INTEGER REFERENCES runs(id), finished REAL, train_seconds REAL, eval_seconds REAL,
    UNIQUE (experiment, config_hash, seed));
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
"""


class ResultsDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def start_run(self, command: str, quick: bool) -> int:
        with self.conn:
            return self.conn.execute("INSERT INTO runs (started, command, quick) VALUES (?, ?, ?)",
                                     (time.time(), command, int(quick))).lastrowid

    def finished(self, experiment: str, config_hash: str, seed: int) -> bool:
        row = self.conn.execute("SELECT 1 FROM units WHERE experiment=? AND config_hash=? AND seed=?",
                                (experiment, config_hash, seed)).fetchone()
        return row is not None

    def write_unit(self, run_id: int, experiment: str, config_hash: str, config_json: dict, seed: int,
                   rows: list[dict], summaries: list[dict], curve: list[dict], train_seconds: float,
                   eval_seconds: float) -> int:
        """Everything of one finished unit, in one transaction."""
        with self.conn:
            self.conn.execute("INSERT OR IGNORE INTO configs (hash, experiment, json) VALUES (?, ?, ?)",
                              (config_hash, experiment, json.dumps(config_json, sort_keys=True)))
            unit = self.conn.execute(
                "INSERT INTO units (experiment, config_hash, seed, run_id, finished, train_seconds, eval_seconds) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (experiment, config_hash, seed, run_id, time.time(), train_seconds, eval_seconds)).lastrowid
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
                 for name, value in {**s["means"], **s["corpus"], "seconds_per_item": s["seconds"] / s["n"]}.items()])
            self.conn.executemany("INSERT INTO curves VALUES (?, ?, ?, ?, ?)",
                                  [(unit, c["step"], c["loss"], c["lr"], c["grad_norm"]) for c in curve])
        return unit

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

    def finished_seeds(self, experiment: str, config_hash: str) -> list[int]:
        return [s for (s,) in self.conn.execute("SELECT seed FROM units WHERE experiment=? AND config_hash=? ORDER BY seed",
                                                (experiment, config_hash))]

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
    def unit_id(self, experiment: str, config_hash: str, seed: int) -> int | None:
        row = self.conn.execute("SELECT id FROM units WHERE experiment=? AND config_hash=? AND seed=?",
                                (experiment, config_hash, seed)).fetchone()
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
