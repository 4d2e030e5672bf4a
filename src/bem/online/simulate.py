"""`bem online simulate`: the stream served by three systems, one after the other, each resumable step by step.

- frozen: the live unit as trained, never updated (the monitor still watches it: detection delays, false alarms);
- naive: the live weights fine-tuned on every feedback batch as it arrives, no guard;
- shadow: live serves from its own weights; a shadow copy learns (EWC + prox + replay, `learner.py`); a canary
  check (every `check_every` feedback items, or on a drift alarm) promotes it only if the one-sided lower bound of
  its improvement on the canary set is > 0 at δ / max_checks and no task is significantly worse (`canary.py`); after
  a promotion, a downward alarm compares live with its predecessor on the watch set and a significant drop rolls back.

One serving step: the live weights reply to `batch` requests (true scores against each item's own reference); the
feedback arriving with them is scored against the replies it belongs to (observed scores, the monitor's input); the
learner learns from it; the shadow may be checked. Then the step is committed (`store.py`).

Nothing is generated twice: while a system's live weights are version 0 (naive before its first update, shadow
before its first promotion or after a rollback to it) it serves the frozen system's stored replies to the same
batches, and canary and watch scores are cached per version (a version's weights never change)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from bem.data.batches import Example
from bem.evaluate import generate
from bem.experiments.config import ExperimentConfig, load_experiment
from bem.online import store
from bem.online.canary import canary_test, planned_delta, regression_test
from bem.online.drift import Monitor, Thresholds, calibrate
from bem.online.learner import Learner, load_weights, snapshot, trainable
from bem.online.stream import Request, build_stream, calibration_items, held_out
from bem.router.env import part_score
from bem.tasks import SPECS, side_layout, side_vectors

log = logging.getLogger(__name__)
SYSTEMS = ("frozen", "naive", "shadow")


def observed_score(task: str, reply: str, reference: str) -> float:
    """The reply's score by its task's metric against a feedback reference text (which may be another task's)."""
    if task == "wordnet_qa":
        return part_score(task, reply, {"answers": [reference]})
    if task == "json_format":
        try:
            target = json.loads(reference)
        except json.JSONDecodeError:
            return 0.0
        return part_score(task, reply, {"target": target}) if isinstance(target, dict) and target else 0.0
    return part_score(task, reply, {"target": reference})


class Server:
    """The model and what serving needs: replies to (task, item) pairs under given weights."""

    def __init__(self, model, tokenizer, live: ExperimentConfig, batch_size: int, root=None):
        self.model, self.tokenizer, self.batch_size, self.root = model, tokenizer, batch_size, root
        self.layout = side_layout(live.tasks, live.side_inputs == "zeroed") if live.side_inputs else {}

    def side(self, task: str, items: list[dict]) -> list[tuple] | None:
        return side_vectors(task, items, self.layout, self.root) if self.layout else None

    @torch.no_grad()
    def replies(self, pairs: list[tuple[str, dict]]) -> list[str]:
        """Greedy replies to (task, item) pairs: one generate call for all tasks, each row up to its task's limit
        (per-row limits give each reply what a call of its task alone gives; batches are fuller on a mixed stream)."""
        if not pairs:
            return []
        side = [None] * len(pairs)
        for task in dict.fromkeys(t for t, _ in pairs):
            idx = [i for i, (t, _) in enumerate(pairs) if t == task]
            rows = self.side(task, [pairs[i][1] for i in idx])
            for i, row in zip(idx, rows or [None] * len(idx)):
                side[i] = row
        return generate(self.model, self.tokenizer, [SPECS[t].prompt(it) for t, it in pairs],
                        [SPECS[t].max_new_tokens for t, _ in pairs], self.batch_size,
                        side=None if side[0] is None else torch.tensor(side), desc="serve")

    def scores(self, sets: dict[str, list[dict]]) -> dict[str, list[float]]:
        pairs = [(t, it) for t, items in sets.items() for it in items]
        replies = self.replies(pairs)
        out = {t: [] for t in sets}
        for (t, it), r in zip(pairs, replies):
            out[t].append(part_score(t, r, it))
        return out

    def example(self, request: Request) -> Example:
        side = self.side(request.task, [request.item])
        return Example(request.prompt, request.feedback, side[0] if side else None)


def stream_key(config: ExperimentConfig, seed: int) -> str:
    return f"{config.name}:{config.config_hash()}:s{seed}"


class Simulation:
    """One system's pass over the stream, resumable at any committed step."""

    def __init__(self, system: str, config: ExperimentConfig, seed: int, out: Path, db, server: Server,
                 requests: list[Request], canary: dict, watch: dict, thresholds: Thresholds, live0: dict):
        self.system, self.config, self.c, self.db, self.server = system, config, config.online, db, server
        self.requests, self.canary, self.watch, self.thresholds = requests, canary, watch, thresholds
        self.key, self.seed = stream_key(config, seed), seed
        self.folder = out / "online" / f"{config.name}-{config.config_hash()}-s{seed}" / system
        self.learner = Learner(server.model, server.tokenizer, self.c, guarded=system == "shadow",
                               max_length=config.training.max_length) if system != "frozen" else None
        self.live, self.history = dict(live0), [0]  # versions promoted, newest last: live is history[-1]
        self.checks, self.since_check = 0, 0
        self.canary_cache, self.watch_cache = {}, {}  # {version: scores}: a version's weights never change
        self.version0 = {}  # {request index: reply} of version 0 (the frozen system's), reused while live is version 0
        self.delta = planned_delta(self.c.delta, self.c.max_checks)

    @property
    def version(self) -> int:
        return self.history[-1]

    @property
    def previous(self) -> int | None:
        return self.history[-2] if len(self.history) > 1 else None

    # --- state ---------------------------------------------------------------------------------------------
    def _values(self, offset: int) -> dict:
        v = {"offset": offset, "history": self.history, "checks": self.checks, "since_check": self.since_check}
        return v | (self.learner.values() if self.learner else {})

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"live/{n}": t for n, t in self.live.items()}
        return out | (self.learner.tensors() if self.learner else {})

    def _restore(self, offset: int) -> None:
        tensors, values = store.read_state(self.folder, offset)
        self.live = {n[len("live/"):]: t for n, t in tensors.items() if n.startswith("live/")}
        self.history = values["history"]
        self.checks, self.since_check = values["checks"], values["since_check"]
        if self.learner:
            self.learner.restore(tensors, values)

    def _use(self, weights: dict[str, torch.Tensor]) -> None:
        load_weights(self.learner.params if self.learner else trainable(self.server.model, False), weights)

    # --- the loop --------------------------------------------------------------------------------------------
    def run(self) -> None:
        start = store.committed_offset(self.db, self.key, self.system)
        store.prune_states(self.folder, start)
        if start:
            self._restore(start)
            log.info("online %s: resumed at request %d (version %d)", self.system, start, self.version)
        elif self.learner:
            self._seed_replay()
            self.learner.set_anchor(self.live)
            store.save_version(self.folder / "versions", 0, self.live)
        past = store.items(self.db, self.key, self.system)
        if self.system != "frozen":
            self.version0 = {r["idx"]: r["prediction"] for r in store.items(self.db, self.key, "frozen")}
        monitor, _ = Monitor.replay(self.thresholds, [r["observed"] for r in past if r["observed"] is not None])
        replies = {r["idx"]: r["prediction"] for r in past}
        bar = tqdm(range(start, len(self.requests), self.c.batch), desc=f"online {self.system}", unit="step",
                   initial=start // self.c.batch, total=-(-len(self.requests) // self.c.batch))
        for t in bar:
            rows, events = self._step(t, monitor, replies)
            store.write_state(self.folder, t + len(rows), self._tensors(), self._values(t + len(rows)))
            store.commit_step(self.db, self.key, self.system, t + len(rows), rows, events)
            store.prune_states(self.folder, t + len(rows))
            bar.set_postfix(version=self.version, score=round(sum(r["score"] for r in rows) / len(rows), 3))

    def _seed_replay(self) -> None:
        """The replay buffer starts with the data the live unit was trained on (a seeded sample of it)."""
        import random

        from bem.experiments.training import training_examples

        live = load_experiment(self.c.live, overlay=self.config.preset)
        examples = training_examples(live, self.server.root)
        examples = random.Random(f"bem-online-replay-{self.seed}").sample(examples, min(self.c.replay, len(examples)))
        for ex in examples:
            self.learner.replay.add(Example(ex.prompt, ex.target, ex.side))

    def _step(self, t: int, monitor: Monitor, replies: dict[int, str]) -> tuple[list[dict], list[dict]]:
        batch = self.requests[t:t + self.c.batch]
        own = snapshot(self.learner.params) if self.learner else None  # the shadow's weights while live serves
        if self.version == 0 and all(r.index in self.version0 for r in batch):
            texts = [self.version0[r.index] for r in batch]  # the same weights on the same batch: the same replies
        else:
            self._use(self.live)
            texts = self.server.replies([(r.task, r.item) for r in batch])
            if own is not None:
                self._use(own)
        rows = [{"idx": r.index, "phase": r.phase, "task": r.task, "item_id": str(r.item.get("id", "")),
                 "version": self.version, "score": part_score(r.task, x, r.item), "prediction": x}
                for r, x in zip(batch, texts)]
        replies.update({r.index: x for r, x in zip(batch, texts)})
        arrived = [q for q in self.requests[max(0, t - self.c.delay):max(0, t + len(batch) - self.c.delay)]
                   if q.feedback is not None and t <= q.arrives < t + len(batch)]
        events, alarms = [], []
        for q in arrived:  # the feedback's score against the reply it belongs to: what the system observes
            score = observed_score(q.task, replies[q.index], q.feedback)
            row = next((r for r in rows if r["idx"] == q.index), None)
            if row is not None:
                row["observed"] = score
            else:
                self.db.conn.execute("UPDATE online_items SET observed = ? WHERE stream = ? AND system = ? AND idx = ?",
                                (score, self.key, self.system, q.index))
            for a in monitor.update(score):
                alarms.append(a)
                events.append({"idx": q.arrives, "kind": "alarm", "detector": a.detector, "direction": a.direction,
                               "feedback_index": a.index})
        if self.learner and arrived:
            examples = [self.server.example(q) for q in arrived]
            self.learner.learn(examples)
            self.since_check += len(arrived)
            if self.system == "naive":  # live is what was learnt (versions counted, not saved)
                self.live, self.history = snapshot(self.learner.params), [self.version + 1]
        if self.system == "shadow":
            events += self._guard(t + len(batch), alarms)
        return rows, events

    def _guard(self, idx: int, alarms: list) -> list[dict]:
        """Canary checks, promotions, resets and rollbacks of the shadow system after a serving step."""
        events = []
        down = any(a.direction == "down" for a in alarms)
        if down and len(self.history) > 1:
            events += self._watch(idx)
        due = self.since_check >= self.c.check_every or (alarms and self.since_check > 0)
        if due and self.checks < self.c.max_checks:
            events += self._check(idx)
        return events

    def _scores(self, cache: dict, items: dict, weights: dict, version: int | None) -> dict[str, list[float]]:
        """Scores of `weights` on a held-out set, cached by version (None: the shadow's, never cached)."""
        if version is not None and version in cache:
            return cache[version]
        self._use(weights)
        scores = self.server.scores(items)
        if version is not None:
            cache[version] = scores
        return scores

    def _check(self, idx: int) -> list[dict]:
        shadow = snapshot(self.learner.params)
        live_scores = self._scores(self.canary_cache, self.canary, self.live, self.version)
        shadow_scores = self._scores(self.canary_cache, self.canary, shadow, None)
        self._use(shadow)
        result = canary_test(live_scores, shadow_scores, self.delta, seed=self.checks)
        self.checks, self.since_check = self.checks + 1, 0
        events = [{"idx": idx, "kind": "check", "check": self.checks, **result.to_dict()}]
        if result.promote:
            self.history = self.history + [self._next_version()]
            self.live = shadow
            store.save_version(self.folder / "versions", self.version, shadow)
            self.canary_cache[self.version] = shadow_scores
            self.learner.set_anchor(self.live)
            events.append({"idx": idx, "kind": "promote", "version": self.version, "previous": self.history[-2],
                           "improvement": result.improvement, "lower": result.lower})
        elif regression_test(live_scores, shadow_scores, self.delta, seed=self.checks).rollback:
            self._reset()  # a shadow significantly worse than live is discarded
            events.append({"idx": idx, "kind": "reset", "version": self.version,
                           "improvement": result.improvement})
        return events

    def _watch(self, idx: int) -> list[dict]:
        """After a promotion, a downward alarm: live vs its predecessor on the watch set; a drop rolls back."""
        previous = store.load_version(self.folder / "versions", self.history[-2])
        own = snapshot(self.learner.params)
        before = self._scores(self.watch_cache, self.watch, previous, self.history[-2])
        after = self._scores(self.watch_cache, self.watch, self.live, self.version)
        self._use(own)
        result = regression_test(before, after, self.delta, seed=10_000 + self.version)
        events = [{"idx": idx, "kind": "watch", "version": self.version, "previous": self.history[-2], **result.to_dict()}]
        if result.rollback:
            events.append({"idx": idx, "kind": "rollback", "from": self.version, "to": self.history[-2]})
            self.live, self.history = previous, self.history[:-1]
            self._reset()
        return events

    def _reset(self) -> None:
        load_weights(self.learner.params, self.live)
        self.learner.reset_optimizer()
        self.learner.set_anchor(self.live)

    def _next_version(self) -> int:
        versions = [int(p.stem[1:]) for p in (self.folder / "versions").glob("v*.safetensors")]
        return max(versions, default=0) + 1


# --- the whole run -----------------------------------------------------------------------------------------
def run_stream(db, run_id: int, config: ExperimentConfig, seed: int, out: Path, data_root=None,
               data: str | None = None) -> None:
    """Train the live unit if needed, calibrate the detectors, run the three systems, then store each as a unit."""
    from bem.experiments.adapters import load_trained, unit_data
    from bem.experiments.runner import run_unit
    from bem.router.experiment import summaries

    c = config.online
    live = load_experiment(c.live, overlay=config.preset)
    if db.unit_id(live.name, live.config_hash(), seed, unit_data(live, data_root)) is None:
        log.info("online: training the live unit %s seed %d first", live.name, seed)
        run_unit(db, run_id, live, seed, out, data_root, extras=False)
    model, tokenizer = load_trained(live, seed, out, data_root)
    server = Server(model, tokenizer, live, config.evaluation.batch_size, data_root)
    requests = build_stream(c, seed, data_root)
    canary, watch = held_out(c, seed, data_root)
    live0 = snapshot(trainable(model, False))
    thresholds = _thresholds(db, config, seed, server, data_root)
    key = stream_key(config, seed)
    for system in SYSTEMS:
        name = config.name if system == "shadow" else f"online/{system}"
        if db.unit_id(name, config.config_hash(), seed, data) is not None:
            continue
        start = time.perf_counter()
        load_weights(trainable(model, False), live0)
        Simulation(system, config, seed, out, db, server, requests, canary, watch, thresholds, live0).run()
        rows = [{"task": r["task"], "id": f"online-{r['idx']:05d}", "prediction": r["prediction"],
                 "scores": {"score": r["score"]}, "meta": {}} for r in store.items(db, key, system)]
        seconds = time.perf_counter() - start
        db.write_unit(run_id, name, config.config_hash(), config.to_dict(), seed, rows, summaries(rows, seconds), [],
                      0.0, seconds, data)
        log.info("online %s: mean true score %.4f over %d requests", system,
                 sum(r["scores"]["score"] for r in rows) / len(rows), len(rows))


def _thresholds(db, config: ExperimentConfig, seed: int, server: Server, data_root) -> Thresholds:
    """The detectors calibrated to `false_alarms` per 10,000 on simulated stable streams of the live unit's scores on
    train items of the first phase's mixture; stored as an event, so a rerun reuses them."""
    key = stream_key(config, seed)
    stored = [e for e in store.events(db, key, "calibration") if e["kind"] == "calibration"]
    if stored:
        return Thresholds(**stored[-1]["thresholds"])
    pairs = calibration_items(config.online, seed, data_root)
    replies = server.replies(pairs)
    scores = [part_score(t, r, it) for (t, it), r in zip(pairs, replies)]
    n = sum(p.items for p in config.online.phases)
    thresholds = calibrate(scores, target_per_10k=config.online.false_alarms, stream_length=max(n, 200), seed=seed)
    store.commit_step(db, key, "calibration", 0, [], [{"idx": 0, "kind": "calibration", "thresholds": asdict(thresholds),
                                                      "scores": scores}])
    return thresholds


def rollback(db, config: ExperimentConfig, seed: int, out: Path) -> tuple[int, int]:
    """`bem online rollback`: the shadow system's live weights go back to the version promoted before the current one,
    at the last committed offset (its state is rewritten there; a resumed stream serves from it). Returns (from, to)."""
    key = stream_key(config, seed)
    folder = out / "online" / f"{config.name}-{config.config_hash()}-s{seed}" / "shadow"
    offset = store.committed_offset(db, key, "shadow")
    if not offset:
        raise ValueError(f"{out}: the shadow system of {config.name} seed {seed} has served nothing yet; nothing to roll "
                         "back")
    tensors, values = store.read_state(folder, offset)
    history = values["history"]
    if len(history) < 2:
        raise ValueError(f"{out}: live is version {history[-1]}, the first one; there is no earlier version to roll "
                         "back to")
    previous = store.load_version(folder / "versions", history[-2])
    tensors.update({f"live/{n}": t for n, t in previous.items()})
    values["history"] = history[:-1]
    store.write_state(folder, offset, tensors, values)
    store.commit_step(db, key, "shadow", offset, [], [{"idx": offset, "kind": "rollback", "from": history[-1],
                                                       "to": history[-2], "manual": True}])
    return history[-1], history[-2]
