"""Online shadow mode end to end on a tiny model and a small root of real items: `bem online simulate` serves a
stream with the frozen, naive and shadow systems; a crash at any point of a step and a rerun give the same rows and
decisions as one pass; a rollback restores the previous version bit for bit."""
import json
import sqlite3

import pytest
import torch

from conftest import tiny_run_folder
from test_router_env import root  # noqa: F401  (the small data root fixture)

TASKS = ["wordnet_qa", "bible_translate", "wordnet_define", "json_format"]


@pytest.fixture(scope="module")
def online_root(tmp_path_factory, root):  # noqa: F811
    """The router tests' root with every item repeated 12 times (new ids): enough for a stream and held-out sets."""
    from bem.data.prepare import record_task

    out = tmp_path_factory.mktemp("online_data")
    for task in TASKS:
        (out / task).mkdir()
        for split in ("train", "dev", "test"):
            items = [json.loads(line) for line in (root / task / f"{split}.jsonl").read_text().splitlines()]
            copies = [{**it, "id": f"{it['id']}#{k}"} for k in range(12) for it in items]
            if task == "wordnet_qa" and split == "test":  # index-swap fields, should a unit here score its conditions
                for it in copies:
                    for condition in ("shuffled", "corrupt"):
                        it[f"evidence_{condition}"], it[f"features_{condition}"] = it["evidence"][::-1], it["features"]
            (out / task / f"{split}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in copies))
        record_task(task, out, f"hand-made-{task}")
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("online_run")
    exp = tiny_run_folder(folder)
    (exp / "tbank.yaml").write_text(
        f"model: {folder / 'model'}\ntasks: {json.dumps(TASKS)}\nseeds: [0]\nanchor: null\nside_inputs: false\n"
        "bem: {rank: 8, alpha: 16, sites: [o_proj, down_proj], controller: static, experts: 4, side_dim: 0}\n"
        "training: {steps: 2, batch_size: 4, lr: 0.01, warmup_steps: 1, checkpoint_every: 2, max_length: 96, "
        "train_items: 2}\nevaluation: {items: 1, batch_size: 4, swap_seeds: 1}\n")
    (exp / "tlive.yaml").write_text(
        "base: tbank\ntasks: [wordnet_qa, bible_translate]\nside_inputs: true\n"
        "bem: {controller: chunk, chunk_size: 8, side_dim: 5}\n"
        f"training: {{init_bank: {exp / 'tbank.yaml'}}}\n")
    phases = [{"name": "stable", "items": 8, "tasks": ["wordnet_qa", "bible_translate"]},
              {"name": "drift", "items": 8, "tasks": ["wordnet_define", "json_format"]},
              {"name": "poisoned", "items": 8, "tasks": TASKS, "poison": True, "feedback": 1.0}]
    (exp / "tol.yaml").write_text(
        f"base: tlive\ntasks: {json.dumps(TASKS)}\n"
        f"online: {{live: {exp / 'tlive.yaml'}, phases: {json.dumps(phases)}, delay: 2, batch: 4, lr: 0.05, "
        "update_batch: 2, replay: 8, fisher_items: 2, canary_items: 2, watch_items: 2, check_every: 3, max_checks: 4, "
        "calibration_items: 8, delta: 0.2}\n")
    return folder


def _simulate(setup, online_root, monkeypatch, out, *extra):
    from bem.cli import main
    from bem.data import prepare as prepare_module

    monkeypatch.setenv("BEM_DATA", str(online_root))
    monkeypatch.setattr(prepare_module, "prepare", lambda tasks: None)  # the hand-made root stays as it is
    return main(["--debug", "online", "simulate", "--experiment", str(setup / "experiments" / "tol.yaml"), "--out", str(out),
                 *extra])


def _dump(out):
    conn = sqlite3.connect(out / "results.sqlite")
    items = conn.execute("SELECT system, idx, phase, task, version, score, observed, prediction FROM online_items "
                         "ORDER BY system, idx").fetchall()
    events = [(s, k, json.loads(j)) for s, k, j in conn.execute(
        "SELECT system, kind, json FROM online_events ORDER BY rowid")]
    conn.close()
    return items, events


@pytest.fixture(scope="module")
def one_pass(setup, online_root, tmp_path_factory):  # noqa: F811
    mp = pytest.MonkeyPatch()
    out = tmp_path_factory.mktemp("one_pass") / "run"
    try:
        assert _simulate(setup, online_root, mp, out) == 0
    finally:
        mp.undo()
    return out


def test_stream_served_by_three_systems(one_pass):
    items, events = _dump(one_pass)
    by = {s: [r for r in items if r[0] == s] for s in ("frozen", "naive", "shadow")}
    assert all(len(rows) == 24 for rows in by.values())
    assert [r[2] for r in by["frozen"]] == ["stable"] * 8 + ["drift"] * 8 + ["poisoned"] * 8
    assert {r[4] for r in by["frozen"]} == {0}  # frozen never changes
    assert max(r[4] for r in by["naive"]) > 0  # naive: a new version after every feedback batch
    # the stable phase has only the live unit's tasks, the drift phase only the others
    assert {r[3] for r in by["frozen"][:8]} <= {"wordnet_qa", "bible_translate"}
    assert {r[3] for r in by["frozen"][8:16]} <= {"wordnet_define", "json_format"}
    # the same requests, the same first replies (version 0 everywhere before any update)
    assert [r[1:4] for r in by["frozen"]] == [r[1:4] for r in by["shadow"]]
    assert by["frozen"][0][7] == by["naive"][0][7] == by["shadow"][0][7]
    # observed scores only for requests whose feedback arrived (delay 2: the last two never get theirs)
    assert all(r[6] is None for r in by["frozen"][-2:])
    assert sum(r[6] is not None for r in by["frozen"]) >= 8
    kinds = [k for s, k, _ in events if s == "shadow"]
    assert "check" in kinds
    calibration = [e for s, k, e in events if k == "calibration"]
    assert len(calibration) == 1 and len(calibration[0]["scores"]) == 8
    checks = [e for s, k, e in events if s == "shadow" and k == "check"]
    assert all(0 < e["delta"] <= 0.2 / 4 + 1e-12 for e in checks)  # δ / max_checks per check
    conn = sqlite3.connect(one_pass / "results.sqlite")
    units = {n for (n,) in conn.execute("SELECT experiment FROM units")}
    assert {"tol", "online/frozen", "online/naive", "tlive", "tbank"} <= units
    # the bank, trained first as the live unit's init, is its own unit's time: the live unit's seconds fit between
    # the two units' commits (they once included the bank's)
    (bank_done,), (live_seconds, live_done) = (conn.execute(
        f"SELECT {cols} FROM units WHERE experiment = ?", (name,)).fetchone()
        for cols, name in (("finished", "tbank"), ("train_seconds + eval_seconds, finished", "tlive")))
    assert 0 < live_seconds <= live_done - bank_done + 0.05
    assert (one_pass / "report.md").is_file()


def test_serving_version_0_from_the_frozen_replies_changes_nothing(setup, online_root, monkeypatch, tmp_path,  # noqa: F811
                                                                    one_pass):
    """Naive and shadow reuse the frozen system's replies while their live weights are version 0: a run that generates
    every reply itself stores the same rows and decisions."""
    from bem.online import simulate

    step = simulate.Simulation._step

    def generate_every_reply(self, *args):
        self.version0 = {}
        return step(self, *args)

    monkeypatch.setattr(simulate.Simulation, "_step", generate_every_reply)
    out = tmp_path / "run"
    assert _simulate(setup, online_root, monkeypatch, out) == 0
    assert _dump(out) == _dump(one_pass)
    items = _dump(one_pass)[0]
    assert any(s == "shadow" and version == 0 for s, _, _, _, version, *_ in items)  # the reuse did happen


def test_rerun_is_a_noop(setup, online_root, monkeypatch, one_pass):  # noqa: F811
    before = _dump(one_pass)
    assert _simulate(setup, online_root, monkeypatch, one_pass) == 0
    assert _dump(one_pass) == before


@pytest.mark.parametrize("where", ["after_state", "after_commit"])
def test_crash_and_rerun_give_the_same_rows_and_decisions(setup, online_root, monkeypatch, tmp_path, one_pass,
                                                          where):  # noqa: F811
    """A crash inside a step (its state written but not committed, or committed but older states not pruned) and a
    rerun: the same served requests, scores and events as one pass."""
    from safetensors.torch import load_file

    from bem.online import store

    calls = {"n": 0}
    real = store.write_state if where == "after_state" else store.commit_step

    def crashing(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 9:  # in the naive system's pass (frozen takes 6 steps, then calibration is stored)
            raise KeyboardInterrupt("killed")
        return result

    out = tmp_path / "run"
    target = "write_state" if where == "after_state" else "commit_step"
    monkeypatch.setattr(store, target, crashing)
    assert _simulate(setup, online_root, monkeypatch, out) == 130  # interrupted
    monkeypatch.setattr(store, target, real)
    assert _simulate(setup, online_root, monkeypatch, out) == 0
    assert _dump(out) == _dump(one_pass)
    for system in ("naive", "shadow"):  # and the same final weights, optimizer moments, Fisher and replay buffer
        (a,), (b,) = ([p for p in run.glob(f"online/*/{system}/step-*")] for run in (out, one_pass))
        assert (a / "state.json").read_text() == (b / "state.json").read_text()
        ta, tb = (load_file(p / "tensors.safetensors") for p in (a, b))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_rollback_restores_the_previous_version_bit_for_bit(setup, one_pass, tmp_path):
    import shutil

    from bem.experiments.config import load_experiment
    from bem.experiments.results import ResultsDB
    from bem.online import store
    from bem.online.simulate import rollback, stream_key

    out = tmp_path / "run"
    shutil.copytree(one_pass, out)
    config = load_experiment(setup / "experiments" / "tol.yaml")
    folder = out / "online" / f"tol-{config.config_hash()}-s0" / "shadow"
    db = ResultsDB(out / "results.sqlite")
    key = stream_key(config, 0)
    offset = store.committed_offset(db, key, "shadow")
    tensors, values = store.read_state(folder, offset)
    if len(values["history"]) < 2:  # nothing was promoted in this tiny stream: promote by hand to test the rollback
        v1 = {n[len("live/"):]: t + 1.0 for n, t in tensors.items() if n.startswith("live/")}
        store.save_version(folder / "versions", 1, v1)
        tensors.update({f"live/{n}": t for n, t in v1.items()})
        values["history"] = values["history"] + [1]
        store.write_state(folder, offset, tensors, values)
    before = values["history"]
    assert rollback(db, config, 0, out) == (before[-1], before[-2])
    tensors_after, values_after = store.read_state(folder, offset)
    assert values_after["history"] == before[:-1]
    previous = store.load_version(folder / "versions", before[-2])
    for n, t in previous.items():
        assert torch.equal(tensors_after[f"live/{n}"], t)
    assert any(e["kind"] == "rollback" and e.get("manual") for e in store.events(db, key, "shadow"))
    if len(before) == 2:
        with pytest.raises(ValueError, match="no earlier version"):
            rollback(db, config, 0, out)
    db.close()


def test_promotion_watch_and_rollback_paths(setup, online_root, monkeypatch, tmp_path):  # noqa: F811
    """Scripted gate outcomes (the tiny model's scores cannot earn a promotion): the first canary check promotes, the
    next downward alarm's watch comparison rolls back. Live serves the promoted weights in between and the rolled-back
    ones after; the versions on disk are the weights live served."""
    from safetensors.torch import load_file

    from bem.online import simulate
    from bem.online.canary import CanaryResult, RegressionResult
    from bem.online.drift import Alarm

    state = {"checks": 0, "watches": 0}

    def scripted_canary(live, shadow, delta, **kw):
        state["checks"] += 1
        return CanaryResult(state["checks"] == 1, 0.1, 0.05, delta, {}, [] if state["checks"] == 1 else ["scripted"])

    def scripted_regression(before, after, delta, **kw):
        state["watches"] += 1
        return RegressionResult(True, -0.1, -0.05, delta, {}, ["scripted drop"])

    monkeypatch.setattr(simulate, "canary_test", scripted_canary)
    monkeypatch.setattr(simulate, "regression_test", scripted_regression)
    monkeypatch.setattr(simulate.Monitor, "update", lambda self, score: [Alarm("adwin", 0, "down")])
    out = tmp_path / "run"
    assert _simulate(setup, online_root, monkeypatch, out) == 0
    items, events = _dump(out)
    kinds = [(k, e.get("version"), e.get("from"), e.get("to")) for s, k, e in events
             if s == "shadow" and k in ("promote", "watch", "rollback", "reset")]
    assert kinds[0] == ("promote", 1, None, None)
    assert ("rollback", None, 1, 0) in kinds and state["watches"] >= 1
    promoted_at = next(e["idx"] for s, k, e in events if s == "shadow" and k == "promote")
    rolled_at = next(e["idx"] for s, k, e in events if s == "shadow" and k == "rollback")
    shadow = [r for r in items if r[0] == "shadow"]
    assert all(r[4] == 0 for r in shadow if r[1] < promoted_at)  # version 0 before the promotion
    assert all(r[4] == 1 for r in shadow if promoted_at <= r[1] < rolled_at)
    assert all(r[4] == 0 for r in shadow if r[1] >= rolled_at)
    folder = next(out.glob("online/*/shadow"))
    v0, v1 = (load_file(folder / "versions" / f"v00{k}.safetensors") for k in (0, 1))
    assert any(not torch.equal(v0[k], v1[k]) for k in v0)  # the promoted shadow had learnt something
    final = load_file(next(folder.glob("step-*")) / "tensors.safetensors")
    assert all(torch.equal(final[f"live/{k}"], v0[k]) for k in v0)  # rolled back to v0 bit for bit


def test_kill_9_mid_stream_and_rerun(setup, online_root, tmp_path, one_pass):  # noqa: F811
    """A real SIGKILL of `bem online simulate` once the shadow system has committed a step (wherever it is then), and
    a rerun: the same rows and decisions as one pass."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    script = ("import sys; from bem.data import prepare as p; p.prepare = lambda tasks: None; from bem.cli import main; "
              f"sys.exit(main(['online', 'simulate', '--experiment', {str(setup / 'experiments' / 'tol.yaml')!r}, "
              f"'--out', {str(out)!r}]))")
    env = dict(os.environ, BEM_DATA=str(online_root), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        db = out / "results.sqlite"
        if db.is_file():
            conn = sqlite3.connect(db, timeout=30)
            try:
                done = conn.execute("SELECT COUNT(*) FROM online_steps WHERE system = 'shadow'").fetchone()[0]
            except sqlite3.OperationalError:
                done = 0
            conn.close()
            if done >= 1:
                break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: killed mid-stream
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr.decode()[-2000:]
    assert _dump(out) == _dump(one_pass)
