"""Where an online stream keeps what it did: rows of the run's SQLite (every served request, every event, every
committed stream offset) and files beside it (each system's resumable state, each promoted version).

A serving step is committed in this order: its state folder is written (atomically, by rename), then one database
transaction holds its requests, its events and its offset, then older state folders are removed. A kill at any point
leaves the last committed offset with its state folder, and a rerun redoes the uncommitted step identically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The tables (in bem.experiments.results.SCHEMA):
#   online_items (stream, system, idx, phase, task, item_id, version, score, observed, prediction)
#   online_events (stream, system, idx, kind, json)
#   online_steps (stream, system, offset)
# stream: `experiment:config_hash:s<seed>`; system: frozen | naive | shadow; idx: the request's position. score: the
# reply's true score (its item's own reference); observed: its score against the feedback, if any came back (what the
# system sees); events: calibration, alarm, check, promote, refuse, reset, watch, rollback (json: their numbers).


def committed_offset(db, stream: str, system: str) -> int:
    row = db.conn.execute("SELECT MAX(offset) FROM online_steps WHERE stream = ? AND system = ?", (stream, system)).fetchone()
    return row[0] or 0


def commit_step(db, stream: str, system: str, offset: int, items: list[dict], events: list[dict]) -> None:
    """One transaction: the step's served requests, its events and its new offset."""
    with db.conn:
        db.conn.executemany(
            "INSERT OR REPLACE INTO online_items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(stream, system, r["idx"], r["phase"], r["task"], r["item_id"], r["version"], r["score"], r.get("observed"),
              r["prediction"]) for r in items])
        db.conn.executemany("INSERT INTO online_events VALUES (?, ?, ?, ?, ?)",
                            [(stream, system, e["idx"], e["kind"], json.dumps(e, sort_keys=True, default=_plain)) for e in events])
        db.conn.execute("INSERT OR IGNORE INTO online_steps VALUES (?, ?, ?)", (stream, system, offset))


def _plain(value):
    """numpy scalars and arrays in an event as plain JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"an online event holds {type(value).__name__} {value!r}, which JSON cannot store")


def items(db, stream: str, system: str) -> list[dict]:
    rows = db.conn.execute("SELECT idx, phase, task, item_id, version, score, observed, prediction FROM online_items "
                      "WHERE stream = ? AND system = ? ORDER BY idx", (stream, system)).fetchall()
    keys = ("idx", "phase", "task", "item_id", "version", "score", "observed", "prediction")
    return [dict(zip(keys, r)) for r in rows]


def events(db, stream: str, system: str | None = None) -> list[dict]:
    query = "SELECT json FROM online_events WHERE stream = ?" + (" AND system = ?" if system else "") + " ORDER BY rowid"
    return [json.loads(j) for (j,) in db.conn.execute(query, (stream, system) if system else (stream,)).fetchall()]


# --- state folders and versions ------------------------------------------------------------------------------
def write_state(folder: Path, offset: int, tensors: dict[str, torch.Tensor], values: dict) -> Path:
    """`folder/step-<offset>`: tensors.safetensors + state.json, complete or absent (written aside, then renamed)."""
    target = folder / f"step-{offset:07d}"
    scratch = folder / f".step-{offset:07d}.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, scratch / "tensors.safetensors")
    (scratch / "state.json").write_text(json.dumps(values, sort_keys=True, default=_plain))
    for f in scratch.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target


def read_state(folder: Path, offset: int) -> tuple[dict[str, torch.Tensor], dict]:
    target = folder / f"step-{offset:07d}"
    if not (target / "state.json").is_file():
        raise FileNotFoundError(f"{target}: the state of committed offset {offset} is missing; the run folder was "
                                "changed by hand. Remove its online rows to restart the stream")
    return load_file(target / "tensors.safetensors"), json.loads((target / "state.json").read_text())


def prune_states(folder: Path, keep: int) -> None:
    """Remove every state folder but the committed one (older ones, and a newer one a kill left uncommitted)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith((".step-", "step-")) and p.name != f"step-{keep:07d}":
                shutil.rmtree(p, ignore_errors=True)


def save_version(folder: Path, version: int, weights: dict[str, torch.Tensor]) -> Path:
    path = folder / f"v{version:03d}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in weights.items()}, scratch)
    os.replace(scratch, path)
    return path


def load_version(folder: Path, version: int) -> dict[str, torch.Tensor]:
    path = folder / f"v{version:03d}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: version {version} was not saved (versions: "
                                f"{sorted(p.name for p in folder.glob('v*.safetensors'))})")
    return load_file(path)
