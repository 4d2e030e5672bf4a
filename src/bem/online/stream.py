"""The online stream (SPEC §5): a deterministic, replayable sequence of requests from the suite's test splits in
known phases (stable → drift → noise → poisoned feedback → recovery), with delayed feedback for a fraction of them.

Feedback is a reference reply that arrives `delay` requests after its request. In a noisy phase a share of each
reference's words is replaced by words of other references; in a poisoned phase the references are shuffled across the
phase's requests (a derangement: every reference belongs to another request, usually of another task). The learners
see only the feedback; the true score of every reply is computed against the item's own reference, for the report.
Held-out sets come from the dev split: the canary (scored before a promotion), the watch set (after one), and
calibration items from the train split (the drift detectors' stable scores)."""
from __future__ import annotations

import random
from dataclasses import dataclass

from bem.experiments.config import OnlineConfig, Phase
from bem.tasks import SPECS, load_items, training_target

ONLINE_TASKS = ("wordnet_qa", "bible_translate", "wordnet_define", "json_format")
"""Tasks a stream draws from: those with a reference reply to give as feedback."""


@dataclass(frozen=True)
class Request:
    index: int
    """Position in the stream."""
    phase: str
    task: str
    item: dict
    feedback: str | None
    """The reference reply that comes back as feedback (noisy or poisoned in those phases); None: no feedback."""
    arrives: int
    """Index of the request with which the feedback arrives (index + delay)."""

    @property
    def prompt(self) -> str:
        return SPECS[self.task].prompt(self.item)


def weights_of(phase: Phase) -> list[float]:
    w = phase.weights or [1.0] * len(phase.tasks)
    return [x / sum(w) for x in w]


def build_stream(config: OnlineConfig, seed: int = 0, root=None) -> list[Request]:
    """Every request of the stream, in order; the same config and seed give the same stream."""
    rng = random.Random(f"bem-online-stream-{seed}")
    tasks_of = [rng.choices(p.tasks, weights_of(p), k=p.items) for p in config.phases]
    counts = {t: sum(ts.count(t) for ts in tasks_of) for t in ONLINE_TASKS}
    pools = {}
    for task, n in counts.items():
        if n:
            items = load_items(task, "test", n, root)
            if len(items) < n:
                raise ValueError(f"online stream: {n} {task} requests need {n} test items; the split has {len(items)}")
            rng.shuffle(items)
            pools[task] = iter(items)
    requests, index = [], 0
    for phase, tasks in zip(config.phases, tasks_of):
        items = [next(pools[t]) for t in tasks]
        has = [rng.random() < phase.feedback for _ in tasks]
        refs = [training_target(t, it) for t, it in zip(tasks, items)]
        refs = _feedback(refs, has, phase, rng)
        for task, item, ref, got in zip(tasks, items, refs, has):
            requests.append(Request(index, phase.name, task, item, ref if got else None, index + config.delay))
            index += 1
    return requests


def _feedback(refs: list[str], has: list[bool], phase: Phase, rng: random.Random) -> list[str]:
    """The references as they come back in this phase: shuffled across requests (poison), words replaced (noise)."""
    given = [i for i, h in enumerate(has) if h]
    out = list(refs)
    if phase.poison and len(given) > 1:
        shift = rng.randrange(1, len(given))  # a rotation of a shuffled order: no request keeps its own reference
        order = list(given)
        rng.shuffle(order)
        for k, i in enumerate(order):
            out[i] = refs[order[(k + shift) % len(order)]]
    if phase.noise > 0:
        words = [w for i in given for w in refs[i].split()] or ["the"]
        for i in given:
            out[i] = " ".join(rng.choice(words) if rng.random() < phase.noise else w for w in out[i].split())
    return out


def held_out(config: OnlineConfig, seed: int = 0, root=None) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(canary, watch): disjoint dev items per task of the stream, `canary_items` and `watch_items` each."""
    tasks = stream_tasks(config)
    canary, watch = {}, {}
    for task in tasks:
        items = load_items(task, "dev", None, root)
        random.Random(f"bem-online-heldout-{seed}-{task}").shuffle(items)
        need = config.canary_items + config.watch_items
        if len(items) < need:
            raise ValueError(f"online: canary_items + watch_items = {need} {task} dev items needed; the split has "
                             f"{len(items)}")
        canary[task], watch[task] = items[:config.canary_items], items[config.canary_items:need]
    return canary, watch


def calibration_items(config: OnlineConfig, seed: int = 0, root=None) -> list[tuple[str, dict]]:
    """`calibration_items` train items drawn with the first phase's mixture: the live system's scores on them are the
    stable scores the drift detectors are calibrated on."""
    rng = random.Random(f"bem-online-calibration-{seed}")
    first = config.phases[0]
    tasks = rng.choices(first.tasks, weights_of(first), k=config.calibration_items)
    out = []
    for task in dict.fromkeys(tasks):
        items = load_items(task, "train", tasks.count(task), root)
        out += [(task, it) for it in items]
    return out


def stream_tasks(config: OnlineConfig) -> list[str]:
    """The tasks of the stream, in the order they first appear."""
    return list(dict.fromkeys(t for p in config.phases for t in p.tasks))
