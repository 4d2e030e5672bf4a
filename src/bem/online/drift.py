"""Drift monitor for the shadow-mode score stream: ADWIN, Page–Hinkley and a two-sample test, calibrated by
simulation.

Each feedback item gives a quality score in [0, 1]. `Monitor.update(score)` feeds it to three detectors and
returns the alarms raised at that item; a detector that alarms restarts from scratch, so it can fire again.
The monitor holds no state that is not a function of the scores seen, so it is restored by replaying them
(`Monitor.replay`), never by pickling. `calibrate` picks each detector's most sensitive setting whose false
alarm rate on simulated stable streams (i.i.d. resamples of real stable-period scores) is at most a target.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np
from river.drift import ADWIN, PageHinkley
from scipy.stats import mannwhitneyu

log = logging.getLogger(__name__)

DETECTORS = ("adwin", "page_hinkley", "two_sample")
GRIDS = {  # most sensitive first
    "adwin_delta": [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.002, 1e-4],
    "ph_threshold_std": [2, 3, 5, 8, 12, 20, 30, 40, 50, 70, 100],  # × std of the stable scores
    "two_sample_alpha": [0.01, 1e-3, 1e-4, 1e-5],
}


@dataclass(frozen=True)
class Thresholds:
    """Detector settings. Defaults for ADWIN and Page–Hinkley are river's own (so its doc examples hold)."""
    adwin_delta: float = 0.002
    ph_threshold: float = 50.0  # river's lambda; in score units, so it must scale with the scores (calibrate)
    ph_delta: float = 0.005  # river's `delta`: per-item allowance, about half the smallest mean shift worth catching
    ph_min_instances: int = 30
    two_sample_alpha: float = 1e-3
    window: int = 200  # two-sample window size; also the "recent" span used for an alarm's direction

    @property
    def every(self) -> int:
        return max(1, self.window // 4)


@dataclass(frozen=True)
class Alarm:
    detector: str  # one of DETECTORS
    index: int  # position of the item in the stream since the monitor was created (0-based)
    direction: str  # 'down' | 'up'


class TwoSample:
    """Reference window (first `window` scores after a (re)start) vs the latest `window` scores, which slide.

    Once both are full and disjoint, every `every` items a two-sided Mann–Whitney U test (asymptotic, tie
    corrected) is run; p < alpha is an alarm and the test restarts with a new reference window. Mann–Whitney
    rather than Welch's t: scores are bounded, skewed and often discrete (0/1 validity, F1 with mass at 0 and
    1), and a rank test gives the same p under any increasing rescaling of the scores, so a calibrated alpha
    does not depend on the score scale. The repeated, overlapping tests make the per-item false-alarm rate
    differ from alpha; `calibrate` measures it instead of assuming it.
    """

    def __init__(self, window: int = 200, alpha: float = 1e-3, every: int | None = None):
        self.window, self.alpha = window, alpha
        self.every = every or max(1, window // 4)
        self.restart()

    def restart(self) -> None:
        self.reference: list[float] = []
        self.recent: deque[float] = deque(maxlen=self.window)
        self.n = 0  # items since restart
        self.p = 1.0

    def update(self, x: float) -> bool:
        self.n += 1
        if len(self.reference) < self.window:
            self.reference.append(x)
            return False
        self.recent.append(x)
        if len(self.recent) < self.window or (self.n - 2 * self.window) % self.every:
            return False
        ref, rec = self.reference, list(self.recent)
        if min(ref) == max(ref) == min(rec) == max(rec):  # all tied: U has no variance, nothing changed
            self.p = 1.0
        else:
            self.p = float(mannwhitneyu(ref, rec, alternative="two-sided", method="asymptotic").pvalue)
        if self.p < self.alpha:
            self.restart()
            return True
        return False


class _River:
    """A river detector that is replaced by a fresh one after it fires (river itself resets on the next update,
    to the same state; doing it here makes the restart explicit and the state after an alarm clean)."""

    def __init__(self, make):
        self.make = make
        self.detector = make()

    def update(self, x: float) -> bool:
        self.detector.update(x)
        if self.detector.drift_detected:
            self.detector = self.make()
            return True
        return False


def _make(name: str, th: Thresholds):
    if name == "adwin":
        return _River(lambda: ADWIN(delta=th.adwin_delta))
    if name == "page_hinkley":
        return _River(lambda: PageHinkley(min_instances=th.ph_min_instances, delta=th.ph_delta,
                                          threshold=th.ph_threshold, mode="both"))
    if name == "two_sample":
        return TwoSample(th.window, th.two_sample_alpha, th.every)
    raise ValueError(f"unknown detector {name!r}; expected one of {DETECTORS}")


@dataclass
class Monitor:
    """ADWIN + Page–Hinkley (both directions) + TwoSample on one score stream.

    Direction of an alarm: sign of (mean of the last k scores − mean of the earlier scores since that detector
    last restarted), k = min(window, n // 2) with n the scores since the restart; 'up' if positive, else 'down'.
    """
    thresholds: Thresholds = field(default_factory=Thresholds)

    def __post_init__(self):
        self.detectors = {name: _make(name, self.thresholds) for name in DETECTORS}
        self.n = 0
        self.last: deque[float] = deque(maxlen=self.thresholds.window)
        self.since = {name: [0, 0.0] for name in DETECTORS}  # [count, sum] since each detector's last restart

    def update(self, score: float) -> list[Alarm]:
        x = float(score)
        self.last.append(x)
        alarms = []
        for name, detector in self.detectors.items():
            since = self.since[name]
            since[0] += 1
            since[1] += x
            if detector.update(x):
                alarms.append(Alarm(name, self.n, self._direction(*since)))
                self.since[name] = [0, 0.0]
        self.n += 1
        return alarms

    def _direction(self, count: int, total: float) -> str:
        k = min(self.thresholds.window, count // 2)
        if k == 0:
            return "down"
        recent = sum(list(self.last)[-k:])
        return "up" if recent / k - (total - recent) / (count - k) > 0 else "down"

    @classmethod
    def replay(cls, thresholds: Thresholds, scores) -> tuple[Monitor, list[Alarm]]:
        """Rebuild a monitor by feeding the stored scores in order; returns it and every alarm it raised."""
        monitor = cls(thresholds)
        alarms = [a for s in scores for a in monitor.update(s)]
        return monitor, alarms


# --- measurement -----------------------------------------------------------------------------------------------

def alarm_indices(name: str, thresholds: Thresholds, stream) -> list[int]:
    """Indices at which one detector (alone, with restarts) alarms on a stream."""
    detector = _make(name, thresholds)
    return [i for i, x in enumerate(np.asarray(stream, dtype=float).tolist()) if detector.update(x)]


def false_alarms_per_10k(thresholds: Thresholds, streams, detectors=DETECTORS) -> dict[str, float]:
    """Alarms per 10,000 items on streams assumed stable (every alarm is false)."""
    items = sum(len(s) for s in streams)
    return {name: 1e4 * sum(len(alarm_indices(name, thresholds, s)) for s in streams) / items
            for name in detectors}


def detection_delays(thresholds: Thresholds, streams, change_at: int,
                     detectors=DETECTORS) -> tuple[dict[str, list[int | None]], dict[str, int]]:
    """Per detector and stream: delay = first alarm index ≥ change_at minus change_at (None = missed).

    Also returns, per detector, the number of alarms before change_at over all streams (false alarms).
    """
    delays: dict[str, list[int | None]] = {name: [] for name in detectors}
    early = {name: 0 for name in detectors}
    for stream in streams:
        for name in detectors:
            idx = alarm_indices(name, thresholds, stream)
            early[name] += sum(i < change_at for i in idx)
            after = [i for i in idx if i >= change_at]
            delays[name].append(after[0] - change_at if after else None)
    return delays, early


def median_delay(delays: list[int | None]) -> float | None:
    """Median over detected changes (None if none was detected); report the miss count separately."""
    hit = [d for d in delays if d is not None]
    return float(np.median(hit)) if hit else None


# --- calibration -----------------------------------------------------------------------------------------------

def simulate_stable(stable_scores, n_streams: int = 20, stream_length: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_streams, stream_length) i.i.d. resamples of real stable-period scores."""
    scores = np.asarray(stable_scores, dtype=float)
    return np.random.default_rng(seed).choice(scores, size=(n_streams, stream_length), replace=True)


def calibrate(stable_scores, target_per_10k: float = 1.0, stream_length: int = 2000, n_streams: int = 20,
              seed: int = 0, grids: dict | None = None, window: int = 200, ph_delta_std: float = 0.1,
              ph_min_instances: int = 30) -> Thresholds:
    """Per detector, the most sensitive grid setting with false alarms per 10k ≤ target on simulated streams.

    Page–Hinkley works in score units, so its threshold grid is std × multiples and its delta is
    ph_delta_std × std. If no setting reaches the target, the least sensitive one is taken, with a warning.
    Page–Hinkley tracks the mean since its last restart, so its per-item rate drifts with stream length: keep
    stream_length near the span between restarts expected in service.
    """
    grids = {**GRIDS, **(grids or {})}
    std = float(np.std(stable_scores)) or 1.0
    streams = simulate_stable(stable_scores, n_streams, stream_length, seed)
    base = Thresholds(ph_delta=ph_delta_std * std, ph_min_instances=ph_min_instances, window=window)
    candidates = {
        "adwin": [("adwin_delta", d) for d in grids["adwin_delta"]],
        "page_hinkley": [("ph_threshold", m * std) for m in grids["ph_threshold_std"]],
        "two_sample": [("two_sample_alpha", a) for a in grids["two_sample_alpha"]],
    }
    chosen = {}
    for name, grid in candidates.items():
        for key, value in grid:
            rate = false_alarms_per_10k(replace(base, **{key: value}), streams, [name])[name]
            if rate <= target_per_10k:
                break
        else:
            log.warning("%s: no setting reaches %.3g false alarms/10k (least sensitive %s=%.3g gives %.3g)",
                        name, target_per_10k, key, value, rate)
        log.info("%s: %s=%.4g, %.3g false alarms/10k on %d×%d simulated items",
                 name, key, value, rate, n_streams, stream_length)
        chosen[key] = value
    return replace(base, **chosen)
